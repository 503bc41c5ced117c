"""The Mooncake facade with pointers that went stale after register_buffer (issue 9, item 5).

Each stale case used to kill the process (SIGSEGV or SIGBUS from get_into/put_from), so
each runs in a child process: an old-style crash fails the test with the child's signal
instead of killing pytest. The child registers real memory (libc malloc, anonymous and
file-backed mmap), invalidates it the way a caller could, then calls every copying method
and prints their codes; the test asserts the codes are negative, the error is kept in
last_error and logged once at WARNING, nothing was stored, and the child exits normally.
Also here: buffers in the store's own segment mappings are refused, and the happy path
(including copies large enough to be split over two threads) is byte-exact."""

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvstore.client.mooncake import ErrorCode, MooncakeDistributedStore
from kvstore.client.safecopy import CallerMemory, checked
from kvstore.errors import InvalidValue

from conftest import ROOT

BAD = ErrorCode.INVALID_PARAMS

# The child's common part: a store on the test's daemon, libc, a WARNING counter, and
# calls() that runs every copying method against [p, p+n) and prints the results.
PRELUDE = r'''
import ctypes, logging, mmap, os, sys
from kvstore.client.mooncake import MooncakeDistributedStore
libc = ctypes.CDLL(None, use_errno=True)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_PRIVATE, MAP_SHARED, MAP_ANON, MAP_FIXED = 0x02, 0x01, 0x20, 0x10
PROT_NONE, PROT_READ, PROT_RW = 0, 1, 3
PAGE = mmap.PAGESIZE

class Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.n = 0
    def emit(self, record):
        self.n += 1
warned = Count()
logging.getLogger("kvstore.mooncake").addHandler(warned)

s = MooncakeDistributedStore()
assert s.setup({"master_server_address": sys.argv[1]}) == 0
VALUE = bytes(range(256)) * 64                  # 16 KiB
assert s.put("stored", VALUE) == 0

def anon(n, prot=PROT_RW):
    p = libc.mmap(None, n, prot, MAP_PRIVATE | MAP_ANON, -1, 0)
    assert p not in (None, ctypes.c_void_p(-1).value)
    return p

def one(name, fn):
    before = warned.n
    code = fn()
    err = s.last_error
    print(name, code, warned.n - before, type(err).__name__ if err is not None else None,
          "EFAULT" in str(err), flush=True)

def calls(p, n, which="all"):
    n = min(n, len(VALUE))
    if which in ("all", "put"):
        one("put_from", lambda: s.put_from("new", p, n))
        one("batch_put_from", lambda: s.batch_put_from(["new"], [p], [n])[0])
        one("put_multi", lambda: s.batch_put_from_multi_buffers(["new"], [[p, p]], [[8, n - 8]])[0])
        print("stored_new", s.is_exist("new"), flush=True)
    if which in ("all", "get"):
        one("get_into", lambda: s.get_into("stored", p, n))
        one("batch_get_into", lambda: s.batch_get_into(["stored"], [p], [n])[0])
        one("get_multi", lambda: s.batch_get_into_multi_buffers(["stored"], [[p, p + 8]], [[8, n - 8]])[0])
    assert s.get("stored") == VALUE
    s.close()
    print("survived", flush=True)
'''


def child(daemon, body):
    """Run PRELUDE + body in a new interpreter; returns (returncode, {name: fields}, output)."""
    code = PRELUDE + textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", code, daemon.socket], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    lines = {}
    for line in r.stdout.splitlines():
        name, *rest = line.split()
        lines[name] = rest
    return r.returncode, lines, r.stdout + r.stderr


def assert_survived_refused(rc, got, out, names):
    if rc < 0:
        pytest.fail(f"the child was killed by {signal.Signals(-rc).name} (the old crash):\n{out}")
    assert rc == 0 and "survived" in got, out
    for name in names:
        code, logged, err, efault = got[name]
        assert int(code) == BAD, (name, out)
        # one WARNING line per failed call, the typed error in last_error, naming EFAULT
        assert (logged, err, efault) == ("1", "InvalidValue", "True"), (name, out)
    if "stored_new" in got:
        assert got["stored_new"] == ["0"], out          # nothing was stored from bad memory


PUTS = ("put_from", "batch_put_from", "put_multi")
GETS = ("get_into", "batch_get_into", "get_multi")


@pytest.fixture(autouse=True)
def _needs_checked_copies():
    if not checked():
        pytest.skip("process_vm_readv on this process is refused here (seccomp?): the facade's "
                    "copies fall back to unchecked memmove")


def test_heap_buffer_freed_after_register(daemon):
    rc, got, out = child(daemon, """
        n = 1 << 20                       # above malloc's mmap threshold: free() unmaps it
        p = libc.malloc(n)
        ctypes.memset(p, 7, n)
        assert s.register_buffer(p, n) == 0
        libc.free(p)
        calls(p, n)
    """)
    assert_survived_refused(rc, got, out, PUTS + GETS)


def test_heap_buffer_freed_and_its_address_reserved(daemon):
    """The freed range is mapped again PROT_NONE (as glibc's thread arenas and guard pages
    reserve address space): still mapped, so a mincore() probe passes, and any access faults."""
    rc, got, out = child(daemon, """
        n = 1 << 20
        p = libc.malloc(n)
        assert s.register_buffer(p, n) == 0
        libc.free(p)
        base = p & ~(PAGE - 1)
        MAP_FIXED_NOREPLACE = 0x100000
        q = libc.mmap(base, n + PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANON | MAP_FIXED_NOREPLACE, -1, 0)
        assert q == base, "the freed range was taken by something else meanwhile"
        calls(p, n)
    """)
    assert_survived_refused(rc, got, out, PUTS + GETS)


def test_buffer_reprotected_read_only(daemon):
    rc, got, out = child(daemon, """
        n = 4 * PAGE
        p = anon(n)
        ctypes.memset(p, 7, n)
        assert s.register_buffer(p, n) == 0
        assert libc.mprotect(p, n, PROT_READ) == 0
        calls(p, n, "get")
    """)
    assert_survived_refused(rc, got, out, GETS)


def test_buffer_reprotected_none(daemon):
    rc, got, out = child(daemon, """
        n = 4 * PAGE
        p = anon(n)
        assert s.register_buffer(p, n) == 0
        assert libc.mprotect(p + PAGE, PAGE, PROT_NONE) == 0      # one page in the middle
        calls(p, n)
    """)
    assert_survived_refused(rc, got, out, PUTS + GETS)


def test_mapping_replaced_by_a_read_only_one(daemon):
    rc, got, out = child(daemon, """
        n = 4 * PAGE
        p = anon(n)
        assert s.register_buffer(p, n) == 0
        q = libc.mmap(p, n, PROT_READ, MAP_PRIVATE | MAP_ANON | MAP_FIXED, -1, 0)
        assert q == p
        calls(p, n, "get")
        assert ctypes.string_at(p, n) == bytes(n)                 # nothing was written there
    """)
    assert_survived_refused(rc, got, out, GETS)


def test_file_backed_buffer_whose_file_was_truncated(daemon, tmp_path):
    rc, got, out = child(daemon, f"""
        n = 8 * PAGE
        path = {str(tmp_path / "backing")!r}
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, n)
        p = libc.mmap(None, n, PROT_RW, MAP_SHARED, fd, 0)
        ctypes.memset(p, 7, n)
        assert s.register_buffer(p, n) == 0
        os.ftruncate(fd, 0)               # every page now lies past the file's end: SIGBUS
        calls(p, n)
        os.close(fd)
    """)
    assert_survived_refused(rc, got, out, PUTS + GETS)


def test_unmapped_during_copies_from_another_thread(daemon):
    """A caller that unmaps and remaps its buffer while copies run: every copy either
    completes or is refused, and the process survives."""
    rc, got, out = child(daemon, """
        import threading, time
        n = 8 << 20
        p = anon(n)
        assert s.register_buffer(p, n) == 0
        src = bytes(range(256)) * (n // 256)
        assert s.put("big", src) == 0
        stop = threading.Event()
        def flip():
            while not stop.is_set():
                libc.munmap(p + n // 2, PAGE)
                time.sleep(0.0002)
                libc.mmap(p + n // 2, PAGE, PROT_RW, MAP_PRIVATE | MAP_ANON | MAP_FIXED, -1, 0)
        t = threading.Thread(target=flip)
        t.start()
        codes = set()
        deadline = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < deadline:
            codes.add(s.get_into("big", p, n))
            codes.add(s.put_from(f"k{i}", p, n))
            s.remove(f"k{i}")          # else 8 MiB puts evict "big" from the 64 MiB store: -704
            i += 1
        stop.set()
        t.join()
        print("codes", *sorted(codes))
        s.close()
        print("survived", flush=True)
    """)
    if rc < 0:
        pytest.fail(f"the child was killed by {signal.Signals(-rc).name}:\n{out}")
    assert rc == 0 and "survived" in got, out
    assert set(map(int, got["codes"])) <= {0, 8 << 20, BAD}, out


def test_kernel_checked_copy_refuses_a_truncated_file_mapping(tmp_path):
    """process_vm_readv/writev answer EFAULT for pages past the file's end (a plain
    access there is SIGBUS); short copies are reported, never taken as complete."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import mmap, os
        import numpy as np
        from kvstore.client.safecopy import CallerMemory
        from kvstore.errors import InvalidValue
        P = mmap.PAGESIZE
        fd = os.open({str(tmp_path / "f")!r}, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 4 * P)
        m = mmap.mmap(fd, 4 * P)
        m[:] = b"x" * (4 * P)
        p = np.frombuffer(m, dtype=np.uint8).ctypes.data
        os.ftruncate(fd, 2 * P)           # pages 2 and 3 are now past the end
        ours = bytearray(4 * P)
        CallerMemory(p, 2 * P).read_into(memoryview(ours)[:2 * P])      # the live half copies
        assert bytes(ours[:2 * P]) == b"x" * (2 * P)
        for what in ("read", "write"):
            try:
                if what == "read":
                    CallerMemory(p, 4 * P).read_into(memoryview(ours))
                else:
                    CallerMemory(p, 4 * P).write_from(memoryview(ours))
            except InvalidValue as e:
                assert "EFAULT" in str(e) and hex(p + 2 * P) in str(e), e   # where it stopped
                print(what, "refused")
    """)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, f"rc {r.returncode}:\n{r.stdout}{r.stderr}"
    assert r.stdout.split() == ["read", "refused", "write", "refused"]


# ---- buffers in the segment ------------------------------------------------------------------
@pytest.fixture
def store(daemon):
    s = MooncakeDistributedStore()
    assert s.setup({"master_server_address": daemon.socket}) == 0
    yield s
    s.close()


def test_register_buffer_in_the_segment_is_refused(store, daemon):
    assert store.put("a", b"A" * 4096) == 0 and store.put("b", b"B" * 4096) == 0
    att = store._client._conn.att
    for lo, hi in (att.rw_range, att.ro_range):
        for ptr, size in ((lo, hi - lo), (lo + 4096, 4096), (lo - 4096, 8192), (hi - 10, 20)):
            assert store.register_buffer(ptr, size) == BAD
            assert isinstance(store.last_error, InvalidValue)
    assert "segment" in str(store.last_error)
    # the attack of the issue: get_into "a" over "b" through the writable mapping
    off_b = store._client._reader.lookup(store._client._key("b")).offset
    assert store.register_buffer(att.rw_range[0] + off_b, 4096) == BAD
    assert store.get_into("a", att.rw_range[0] + off_b, 4096) == BAD
    assert store.get("b") == b"B" * 4096


def test_a_mapping_of_the_segment_file_is_refused(store):
    """Any mapping of the segment's file, e.g. one the caller made itself, not only the
    client's own."""
    import mmap
    import os
    att = store._client._conn.att
    if att.cow_fd < 0:
        pytest.skip("a hugetlbfs segment: the client keeps no fd to map it again here")
    m = mmap.mmap(att.cow_fd, att.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        p = np.frombuffer(m, dtype=np.uint8).ctypes.data
        assert store.register_buffer(p + 8192, 4096) == BAD and "segment" in str(store.last_error)
    finally:
        del p
        try:
            m.close()
        except BufferError:
            pass
    assert os.fstat(att.cow_fd).st_size == att.size


def test_the_tensor_mapping_is_refused(store):
    """A tensor view's memory (a private copy-on-write mapping of the segment on /dev/shm,
    the read-only mapping on hugetlbfs) is refused too: get_into there would show other
    bytes through the tensor."""
    torch = pytest.importorskip("torch", reason="tensor views need torch")
    assert store.put("t", np.arange(4096, dtype=np.float32)) == 0
    t = store._client.get_tensor("t", dtype=torch.float32)
    p = t.data_ptr()
    assert store.register_buffer(p, 4096) == BAD and "segment" in str(store.last_error)
    assert store.register_buffer(p - 4096, 8192) == BAD
    assert float(t[5]) == 5.0
    del t
    store._client.release("t")


def test_a_registered_buffer_the_segment_later_covers_is_refused_at_copy_time(store):
    """The segment may be mapped where a buffer was registered (freed, then the client
    reconnected to a fresh store): each copy checks the range again."""
    from kvstore.client.mooncake import _Buffer
    assert store.put("a", b"A" * 4096) == 0 and store.put("b", b"B" * 4096) == 0
    c = store._client
    lo = c._conn.att.rw_range[0]
    off_b = c._reader.lookup(c._key("b")).offset
    store._registry = ((lo,), (_Buffer(lo, c.segment_size),))   # as if registered before
    assert store.get_into("a", lo + off_b, 4096) == BAD and "segment" in str(store.last_error)
    assert store.batch_get_into(["a"], [lo + off_b], [4096]) == [BAD]
    assert store.put_from("c", lo + off_b, 4096) == BAD and store.is_exist("c") == 0
    assert store.get("b") == b"B" * 4096


# ---- the happy path ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 4096, 65536 + 3, 1 << 20, 9 << 20])
def test_round_trip_is_byte_exact(store, n):
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n + 64, dtype=np.uint8)
    assert store.register_buffer(src.ctypes.data, n) == 0
    assert store.register_buffer(dst.ctypes.data, dst.nbytes) == 0
    assert store.put_from(f"k{n}", src.ctypes.data, n) == 0
    assert store.get(f"k{n}") == src.tobytes()
    assert store.get_into(f"k{n}", dst.ctypes.data + 64, n) == n
    assert np.array_equal(dst[64:], src) and not dst[:64].any()
    half = n // 2
    assert store.batch_put_from_multi_buffers([f"m{n}"], [[src.ctypes.data + half, src.ctypes.data]],
                                              [[n - half, half]]) == [0]
    dst[:] = 0
    assert store.batch_get_into_multi_buffers([f"m{n}"], [[dst.ctypes.data, dst.ctypes.data + 64 + half]],
                                              [[n - half, dst.nbytes - 64 - half]]) == [n]
    assert np.array_equal(np.concatenate([dst[64 + half:64 + 2 * half], dst[:n - half]]), src)


def test_caller_memory_copies_match_memcpy():
    n = 5 << 20                                   # above safecopy.PARALLEL: two threads
    src = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n, dtype=np.uint8)
    CallerMemory(src.ctypes.data, n).read_into(memoryview(dst))
    assert np.array_equal(src, dst)
    out = np.zeros(n, dtype=np.uint8)
    CallerMemory(out.ctypes.data, n)[3:].write_from(memoryview(src)[:n - 3])
    assert np.array_equal(out[3:], src[:n - 3]) and out[:3].sum() == 0
    with pytest.raises(InvalidValue):
        CallerMemory(out.ctypes.data, 10).write_from(memoryview(src)[:11])   # no room


def test_without_process_vm_the_facade_still_works_and_refuses_unmapped_memory(daemon):
    """Where the kernel refuses process_vm_* (a seccomp profile), copies fall back to a
    mincore probe and memmove: the happy path works and a freed buffer is still refused
    (that fallback cannot catch re-protected or truncated memory; the log says so)."""
    rc, got, out = child(daemon, """
        import kvstore.client.safecopy as safecopy
        safecopy._checked = False
        n = 1 << 20
        p = libc.malloc(n)
        ctypes.memset(p, 7, n)
        assert s.register_buffer(p, n) == 0
        assert s.put_from("fallback", p, n) == 0
        ctypes.memset(p, 0, n)
        assert s.get_into("fallback", p, n) == n and ctypes.string_at(p, n) == b"\\x07" * n
        libc.free(p)
        calls(p, n)
    """)
    assert rc == 0 and "survived" in got, out
    for name in PUTS + GETS:
        assert int(got[name][0]) == BAD and got[name][1] == "1", (name, out)


@pytest.mark.parametrize("n", [0, 1, 4096, 1 << 20, (1 << 20) + 1, (5 << 20) + 7])
def test_hashed_copies_give_the_store_checksum(n):
    """The copies that hash as they go compute kvstore.checksum's checksum exactly (one
    level up to a CHUNK, two above; split over two threads from safecopy.PARALLEL)."""
    from kvstore.checksum import checksum
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n, dtype=np.uint8)
    assert CallerMemory(src.ctypes.data, n).read_into_hashed(memoryview(dst)) == checksum(src)
    assert np.array_equal(src, dst)
    out = np.zeros(n, dtype=np.uint8)
    assert CallerMemory(out.ctypes.data, n).write_hashed(memoryview(src)) == checksum(src)
    assert np.array_equal(src, out)
