"""Views that cannot show wrong bytes, and typed errors for missing extras (issue 9).

torch has no read-only tensors, and several writes get past ReadOnlyTensor. On /dev/shm
segments each tensor view has its own private copy-on-write mapping (client/views.py),
so such a write is seen by that tensor only: never by another view of the object, a
get, another process, or a later tensor of another object put in the same extent (the
old single process-wide mapping kept the written page, and get_tensor of the next
object there returned the old bytes). On hugetlbfs the same holds while the pool has a
huge page to spare for the copy; without one the write kills the process with SIGBUS
(chosen and documented there): the tests do it in a child and check that nothing else
sees a wrong byte.

Every write is done in a child process (a real second client) against a real daemon.
"""

import os
import signal
import subprocess

import numpy as np
import pytest

from conftest import run_py
from kvstore import host

MiB = 1 << 20
SHM = ("--hugepages", "off")

# The writes that get past ReadOnlyTensor; each adds 1 to every byte of tensor t.
BYPASSES = {
    "aten_add_": "torch.ops.aten.add_.Tensor(t, 1)",
    "as_subclass": "t.as_subclass(torch.Tensor).add_(1)",
    "set_": "u = torch.empty(0, dtype=torch.uint8); u.set_(t); u.add_(1)",
    "disable_subclass": ("with torch._C.DisableTorchFunctionSubclass():\n"
                         "        t.add_(1)"),
    "np_from_dlpack": "a = np.from_dlpack(t); assert a.flags.writeable; a += 1",
}

# Both children's helpers (N is set by each): A and B, put through a short-lived writer
# client, and the offset of an object in the segment.
_PUT_AND_OFFSET = """
A, B = np.full(N, 1, np.uint8), np.full(N, 7, np.uint8)

def put(key, value):
    with Client(sock) as w:
        assert w.put(key, value)

def offset(c, key):
    v = c.get(key)
    off = np.frombuffer(v, np.uint8).ctypes.data - c._ro_range[0]
    del v
    c.release(key)
    return off
"""


# The child: puts A (4 KiB of 1s) through a short-lived writer client, so that A's
# extent is freed whole when A is deleted and B (4 KiB of 7s) is put at the same offset.
CHILD = """
import sys
import numpy as np, torch
from kvstore.client import Client
from kvstore.errors import ReadOnlyView

sock = sys.argv[1]
N = 4096
""" + _PUT_AND_OFFSET + """
failed = []                                  # every check runs; the test lists what failed

def check(ok, what):
    if not ok:
        failed.append(what)

c = Client(sock)
put("a", A)
off_a = offset(c, "a")
t = c.get_tensor("a")
other = c.get_tensor("a")                    # a second view, live during the write
try:
    t.add_(1)
    raise SystemExit("ReadOnlyTensor let add_ through")
except ReadOnlyView:
    pass
print("writing", flush=True)
{write}
print("written", flush=True)
# the write is real: the tensor written through shows it
assert bytes(t.as_subclass(torch.Tensor).numpy()) == bytes(A + 1), "the bypass wrote nothing"
# ... and nothing else does
check(bytes(other.as_subclass(torch.Tensor).numpy()) == bytes(A), "a live view saw the write")
third = c.get_tensor("a")
check(bytes(third.as_subclass(torch.Tensor).numpy()) == bytes(A), "a later view saw the write")
check(bytes(c.get("a")) == bytes(A), "the segment saw the write")
check(c.read("a") == bytes(A), "read saw the write")
for _ in range(4):
    c.release("a")
del t, other, third
assert c.delete("a")
put("b", B)
assert offset(c, "b") == off_a, "B is not in A's extent: the test proves nothing"
tb = c.get_tensor("b")
check(bytes(tb.as_subclass(torch.Tensor).numpy()) == bytes(B), "get_tensor of B showed A's old bytes")
check(bytes(c.get("b")) == bytes(B), "get of B showed other bytes")
c.release("b"); c.release("b")
c.close()
print("ok" if not failed else "FAILED: " + "; ".join(failed), flush=True)
"""


@pytest.mark.parametrize("bypass", sorted(BYPASSES))
def test_write_past_guard_never_shows_in_other_views(make_daemon, bypass):
    d = make_daemon(size="4MiB", extra=SHM)
    with d.client() as c:
        assert c.backing == "shm"
    r = run_py(CHILD.replace("{write}", BYPASSES[bypass]), d.socket, check=False)
    assert r.returncode == 0, f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    assert r.stdout.splitlines() == ["writing", "written", "ok"], r.stdout
    with d.client() as c:                    # another process: B's bytes, A's never
        t = c.get_tensor("b")
        assert bytes(t.numpy()) == b"\x07" * 4096
        c.release("b")


def test_write_out_of_bounds_stays_in_the_view(make_daemon):
    """Two small objects share a page (extents are 64-byte aligned). A write through one's
    tensor that reaches the whole page (as_strided past its end) shows in neither
    object's other views."""
    d = make_daemon(size="4MiB", extra=SHM)
    r = run_py("""
        import sys
        import numpy as np, torch
        from kvstore.client import Client
        c = Client(sys.argv[1])
        c.put_many(["x", "y"], [b"x" * 64, b"y" * 64])
        vx, vy = c.get("x"), c.get("y")
        ax, ay = (np.frombuffer(v, np.uint8).ctypes.data for v in (vx, vy))
        assert ax // 4096 == ay // 4096 and ay == ax + 64, (ax, ay)
        ty = c.get_tensor("y")
        tx = c.get_tensor("x")
        raw = tx.as_subclass(torch.Tensor)
        # x's 64 bytes and y's (torch checks strides against the storage; numpy does not)
        wide = np.lib.stride_tricks.as_strided(np.from_dlpack(raw), (128,), (1,), writeable=True)
        wide[:] = 0
        assert bytes(raw.numpy()) == bytes(64)               # the write landed in tx's pages
        assert bytes(ty.as_subclass(torch.Tensor).numpy()) == b"y" * 64
        assert bytes(vy) == b"y" * 64 and bytes(vx) == b"x" * 64
        t2 = c.get_tensor("y")
        assert bytes(t2.as_subclass(torch.Tensor).numpy()) == b"y" * 64
        print("ok")
        """, d.socket)
    assert r.stdout.strip() == "ok"


def test_view_memory_lives_as_long_as_its_users(make_daemon):
    """A tensor view's mapping stays while any tensor or array using it lives (slices,
    np.from_dlpack), goes when the last one does, and costs no file descriptor."""
    d = make_daemon(size="16MiB", extra=SHM)
    r = run_py("""
        import gc, os, sys
        import numpy as np, torch
        from kvstore.client import Client, views
        from kvstore.errors import ReadOnlyView
        c = Client(sys.argv[1])
        c.put("k", np.arange(256, dtype=np.uint8).tobytes() * 64)
        fds = len(os.listdir("/proc/self/fd"))
        ts = [c.get_tensor("k") for _ in range(300)]
        assert len(views._LIVE) == 300
        assert len(os.listdir("/proc/self/fd")) == fds          # no fd per view
        s = ts[0][256:512]                                     # a slice: still guarded
        try:
            s.add_(1)
            raise SystemExit("slice not guarded")
        except ReadOnlyView:
            pass
        arr = np.from_dlpack(ts[1])
        del ts
        for _ in range(300):
            c.release("k")
        gc.collect()
        assert len(views._LIVE) == 2                           # the slice's and arr's
        assert bytes(s.as_subclass(torch.Tensor).numpy()) == bytes(range(256))
        assert bytes(arr[:256]) == bytes(range(256))
        del s, arr
        gc.collect()
        assert views._LIVE == {}
        print("ok")
        """, d.socket)
    assert r.stdout.strip() == "ok"


def test_array_and_buffer_views_refuse_writes_and_never_fault(make_daemon):
    """numpy arrays and pyarrow Buffers are read-only by flags that cannot be turned off;
    a conversion that ignores them (torch.from_dlpack of the array, or of numpy's view
    of the Buffer) writes into the view's private pages: no fault, and no other view sees
    it. get()'s memoryviews refuse writes too."""
    d = make_daemon(size="4MiB", extra=SHM)
    with d.client() as c:
        c.put("k", np.full(4096, 3, np.uint8))
        arr, buf, v = c.get_array("k"), c.get_buffer("k"), c.get("k")
        with pytest.raises(ValueError):
            arr[0] = 1
        with pytest.raises(ValueError):
            arr.flags.writeable = True
        assert not buf.is_mutable and memoryview(buf).readonly
        with pytest.raises(TypeError):
            v[0] = 1
        # a tensor view can be put back (read as a source) and round-trips
        t = c.get_tensor("k")
        assert c.put("copy", t) and c.read("copy") == b"\x03" * 4096
        r = run_py("""
            import sys, warnings
            import numpy as np, torch
            from kvstore.client import Client
            warnings.simplefilter("ignore")
            c = Client(sys.argv[1])
            a = c.get_array("k")
            ta = torch.from_dlpack(a)                   # torch ignores the read-only flag
            b = c.get_buffer("k")
            tb = torch.from_dlpack(np.frombuffer(b, np.uint8))   # the same, through numpy
            ta.add_(1); tb.add_(2)
            assert bytes(a) == b"\\x04" * 4096 and bytes(b) == b"\\x05" * 4096  # their own pages
            assert bytes(c.get("k")) == bytes(c.get_array("k")) == b"\\x03" * 4096
            assert bytes(c.get_tensor("k").numpy()) == c.read("k") == b"\\x03" * 4096
            print("ok")
            """, d.socket)
        assert r.stdout.strip() == "ok"
        assert bytes(v) == bytes(arr) == bytes(t.numpy()) == buf.to_pybytes() == b"\x03" * 4096
        for _ in range(4):
            c.release("k")


# ---- hugetlbfs: a private copy when a huge page is spare, else SIGBUS; never wrong bytes ---

def _huge_daemon(make_daemon, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages and mounting hugetlbfs needs root")
    with open("/proc/filesystems") as f:
        if "hugetlbfs" not in f.read():
            pytest.skip("the kernel has no hugetlbfs")
    if host.huge_page_size() != 2 * MiB:
        pytest.skip("the default huge page size is not 2 MiB")
    with open("/proc/sys/vm/nr_hugepages") as f:
        nr_before = int(f.read())
    mnt = tmp_path / "hugetlbfs"
    d = make_daemon(size="8MiB", extra=["--hugepages", "require", "--reserve-hugepages",
                                        "--hugetlbfs-dir", str(mnt)], start=False)
    try:
        d.start()
    except RuntimeError:
        _undo_huge(d, mnt, nr_before)
        line = next((l for l in d.read_log().splitlines() if "huge pages are required" in l), "")
        if any(r in line for r in ("cannot raise vm.nr_hugepages", "only", "cannot mount hugetlbfs",
                                   "cannot allocate")):
            pytest.skip(f"the kernel refused huge pages: {line}")
        raise
    return d, mnt, nr_before


def _undo_huge(d, mnt, nr_before):
    d.destroy()
    if host.is_hugetlbfs(str(mnt)):
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    with open("/proc/sys/vm/nr_hugepages") as f:
        changed = int(f.read()) != nr_before
    if changed:
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(nr_before))


def _free_huge_pages():
    """Huge pages a MAP_NORESERVE copy-on-write fault can take: free and not reserved."""
    info = host.meminfo()
    return info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0)


@pytest.mark.parametrize("bypass", ["aten_add_", "np_from_dlpack"])
def test_hugetlbfs_write_past_guard_with_a_spare_page(make_daemon, tmp_path, bypass):
    """On hugetlbfs a tensor view is a private mapping too: with a huge page to spare in
    the pool, the write lands in the writer's own copy and shows nowhere else (the same
    checks as on /dev/shm, extent reuse included)."""
    d, mnt, nr_before = _huge_daemon(make_daemon, tmp_path)
    try:
        with open("/proc/sys/vm/nr_hugepages") as f:
            nr = int(f.read())
        with open("/proc/sys/vm/nr_hugepages", "w") as f:      # undone by _undo_huge
            f.write(str(nr + 1))
        if _free_huge_pages() < 1:
            pytest.skip("the kernel gave no spare huge page")
        r = run_py(CHILD.replace("{write}", BYPASSES[bypass]), d.socket, check=False)
        assert r.returncode == 0, f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        assert r.stdout.splitlines() == ["writing", "written", "ok"], r.stdout
        with d.client() as c:
            assert c.backing == "hugetlbfs"
            assert bytes(c.get_tensor("b").numpy()) == b"\x07" * 4096
            c.release("b")
    finally:
        _undo_huge(d, mnt, nr_before)


@pytest.mark.parametrize("bypass", ["aten_add_", "np_from_dlpack"])
def test_hugetlbfs_write_past_guard_without_a_spare_page_faults(make_daemon, tmp_path, bypass):
    """With no huge page to spare, the copy-on-write cannot be had and the write kills the
    child with SIGBUS (the documented choice, client/views.py); no view anywhere, in the
    dead child's store or another process, shows a wrong byte."""
    import mmap
    d, mnt, nr_before = _huge_daemon(make_daemon, tmp_path)
    hold = None
    try:
        with d.client() as c:
            assert c.backing == "hugetlbfs"
            c.put("a", np.full(4096, 1, np.uint8))
            held = c.get_tensor("a")                     # a live view in another process
            spare = _free_huge_pages()
            if spare > 0:                                # take them: reserved at mmap, untouched
                hold = mmap.mmap(-1, spare * host.huge_page_size(),
                                 flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_HUGETLB", 0x40000))
            if _free_huge_pages() != 0:
                pytest.skip("huge pages were freed meanwhile by another process")
            r = run_py("""
                import mmap, sys
                import numpy as np, torch
                from kvstore.client import Client
                c = Client(sys.argv[1])
                t = c.get_tensor("a")
                # a huge page freed by another process since the parent's check: take it too
                info = dict(l.split(":") for l in open("/proc/meminfo") if l.startswith("HugePages_"))
                late = int(info["HugePages_Free"]) - int(info["HugePages_Rsvd"])
                if late > 0:
                    hold = mmap.mmap(-1, late * (2 << 20), flags=mmap.MAP_PRIVATE | 0x40000)
                print("writing", flush=True)
                {write}
                print("survived", flush=True)
                """.replace("{write}", BYPASSES[bypass]), d.socket, check=False)
            assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr)
            assert r.stdout.split() == ["writing"]
            assert bytes(held.numpy()) == b"\x01" * 4096
            t = c.get_tensor("a")
            assert bytes(t.numpy()) == b"\x01" * 4096
            assert c.read("a") == b"\x01" * 4096
            c.release("a"); c.release("a")
            del held, t
            r = run_py("""
                import sys
                from kvstore.client import Client
                c = Client(sys.argv[1])
                assert bytes(c.get_tensor("a").numpy()) == b"\\x01" * 4096
                print("ok")
                """, d.socket)
            assert r.stdout.strip() == "ok"
    finally:
        if hold is not None:
            hold.close()
        _undo_huge(d, mnt, nr_before)


# ---- missing extras ----------------------------------------------------------------------

def test_missing_extras_raise_missing_extra(make_daemon):
    """Without torch or pyarrow, get_tensor / get_buffer / get_buffers raise MissingExtra
    naming the pip extra, take no hold, and everything else works."""
    d = make_daemon(size="4MiB", extra=SHM)
    r = run_py("""
        import sys
        sys.modules["torch"] = None              # as if neither extra were installed
        sys.modules["pyarrow"] = None
        import numpy as np
        from kvstore.client import Client
        from kvstore.errors import MissingExtra
        c = Client(sys.argv[1])
        assert c.put("k", np.arange(16, dtype=np.uint8))
        for call, extra in ((lambda: c.get_tensor("k"), "kvstore[torch]"),
                            (lambda: c.get_buffer("k"), "kvstore[arrow]"),
                            (lambda: c.get_buffers(["k"]), "kvstore[arrow]")):
            try:
                call()
                raise SystemExit("no error")
            except MissingExtra as e:
                assert isinstance(e, ImportError)
                assert f"pip install '{extra}'" in str(e), str(e)
                print(str(e))
            assert c._reader.held == {}, c._reader.held     # no hold left behind
        assert list(c.get_array("k")) == list(range(16))
        c.release("k")
        assert c.delete("k")
        print("ok")
        """, d.socket)
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "ok"
    assert lines[0].startswith("get_tensor needs torch")
    assert lines[1].startswith("get_buffer needs pyarrow")
    assert lines[2].startswith("get_buffers needs pyarrow")


def test_view_that_cannot_be_mapped_is_a_typed_error(make_daemon):
    """When the process cannot map another tensor view (vm.max_map_count or, here, an
    address-space limit), get_tensor raises TooManyHolds saying what to do, and keeps no
    hold; the next get_tensor works once there is room."""
    d = make_daemon(size="64MiB", extra=SHM)
    r = run_py("""
        import resource, sys
        import numpy as np, torch
        from kvstore.client import Client
        from kvstore.errors import TooManyHolds
        c = Client(sys.argv[1])
        c.put("big", np.ones(32 << 20, np.uint8))
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + (8 << 20), hard))
        try:
            c.get_tensor("big")
            raise SystemExit("mapped past the limit")
        except TooManyHolds as e:
            assert "vm.max_map_count" in str(e), str(e)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        assert c._reader.held == {}, c._reader.held
        t = c.get_tensor("big")
        assert int(t[-1]) == 1
        c.release("big")
        print("ok")
        """, d.socket)
    assert r.stdout.strip() == "ok"


def test_views_from_many_threads(make_daemon):
    """Threads taking, writing past the guard and dropping views at once: every fresh view
    shows the sealed bytes, and every mapping is gone at the end."""
    d = make_daemon(size="16MiB", extra=SHM)
    r = run_py("""
        import gc, sys, threading, time
        import numpy as np, torch
        from kvstore.client import Client, views
        c = Client(sys.argv[1])
        keys = [f"k{i}" for i in range(16)]
        c.put_many(keys, [np.full(1000 + 61 * i, i, np.uint8) for i in range(16)])
        bad, stop = [], time.monotonic() + 1.5
        def work(seed):
            rng = np.random.default_rng(seed)
            while time.monotonic() < stop:
                i = int(rng.integers(16))
                t = c.get_tensor(keys[i])
                if not bool((t.as_subclass(torch.Tensor) == i).all()):
                    bad.append((seed, i))
                torch.ops.aten.add_.Tensor(t, 1)           # a write past the guard
                a = c.get_array(keys[i])
                if not bool((a == i).all()):
                    bad.append((seed, i, "array"))
                del t, a
                c.release(keys[i]); c.release(keys[i])
        ts = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in ts: t.start()
        for t in ts: t.join()
        gc.collect()
        assert not bad, bad[:5]
        assert views._LIVE == {}, len(views._LIVE)
        from kvstore.client import buffers
        assert buffers._VIEW_STARTS == [] and buffers._VIEW_RANGES == {}
        assert c._reader.held == {}
        print("ok")
        """, d.socket)
    assert r.stdout.strip() == "ok"


# ---- released view mappings are cached for reuse (client/mapcache.py) ----------------------

# The child: a view written past the guard is released into the cache; the next view of
# the same pages, of the same object (a) and of a new object in the same extent (b),
# reuses that very mapping and shows the sealed bytes. The written pages are reverted
# when the view is released (pagemap sees none left; on hugetlbfs the copy's huge page
# goes back to the pool then, not when the mapping is unmapped).
REUSE_CHILD = """
import gc, sys
import numpy as np, torch
from kvstore.client import Client, buffers, mapcache, views

sock = sys.argv[1]
N = 3 * 4096
""" + _PUT_AND_OFFSET + """
def free_huge():
    return int(dict(l.split(":") for l in open("/proc/meminfo"))["HugePages_Free"])

def write(t):
    {write}
    assert bytes(t.as_subclass(torch.Tensor).numpy()[:4]) != bytes(4), "the bypass wrote nothing"

def raw(x):
    return bytes(x.as_subclass(torch.Tensor).numpy()) if isinstance(x, torch.Tensor) else bytes(x)

failed = []

def check(ok, what):
    if not ok:
        failed.append(what)

c = Client(sock)
put("a", A)
off_a = offset(c, "a")
t = c.get_tensor("a")
(base,) = list(views._LIVE)                         # t's own mapping
length = buffers._VIEW_RANGES[base][0] - base
before = free_huge()
write(t)
assert bytes(t.as_subclass(torch.Tensor).numpy()) == bytes(A + 1)
assert len(mapcache.private_pages(base, length)) > 0, "pagemap does not see the written pages"
written = free_huge()
del t
c.release("a")
gc.collect()
cache = c._conn.att.view_cache
check(cache.stats() == (1, length), f"the released mapping was not cached: {cache.stats()}")
left = mapcache.private_pages(base, length)
check(left is not None and len(left) == 0, "a written page stayed in the cached mapping")
check(c.backing == "shm" or free_huge() > written, "the copy's huge page was kept after release")

# (a) the same object again
t = c.get_tensor("a")
assert list(views._LIVE) == [base], "the cached mapping was not reused: the test proves nothing"
check(raw(t) == bytes(A), "(a) the reused mapping showed the written bytes")
check(cache.stats() == (0, 0), "a mapping in use stayed in the cache")
write(t)
del t
c.release("a")
a = c.get_array("a")                                # an array reuses the tensor's mapping
assert list(views._LIVE) == [base]
check(raw(a) == bytes(A), "(a) an array on the reused mapping showed the written bytes")
del a
c.release("a")
t = c.get_tensor("a")
write(t)
del t
c.release("a")
gc.collect()

# (b) a new object in the same extent
assert c.delete("a")
put("b", B)
assert offset(c, "b") == off_a, "B is not in A's extent: the test proves nothing"
tb = c.get_tensor("b")
assert list(views._LIVE) == [base], "the cached mapping was not reused for B"
check(raw(tb) == bytes(B), "(b) get_tensor of B on the reused mapping showed other bytes")
write(tb)
del tb
c.release("b")
buf = c.get_buffer("b")
assert list(views._LIVE) == [base]
check(buf.to_pybytes() == bytes(B), "(b) get_buffer of B on the reused mapping showed other bytes")
check(bytes(c.get("b")) == c.read("b") == bytes(B), "the segment saw a write")
del buf
c.release("b"); c.release("b")
c.close()
print("ok" if not failed else "FAILED: " + "; ".join(failed), flush=True)
"""


@pytest.mark.parametrize("bypass", ["aten_add_", "np_from_dlpack"])
def test_written_view_released_into_the_cache_shows_sealed_bytes_when_reused(make_daemon, bypass):
    d = make_daemon(size="4MiB", extra=SHM)
    r = run_py(REUSE_CHILD.replace("{write}", BYPASSES[bypass]), d.socket, check=False)
    assert r.returncode == 0, f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    assert r.stdout.strip() == "ok", r.stdout
    with d.client() as c:                    # another process: B's bytes, never a written one
        assert bytes(c.get_tensor("b").numpy()) == b"\x07" * (3 * 4096)
        c.release("b")


@pytest.mark.parametrize("bypass", ["aten_add_", "np_from_dlpack"])
def test_hugetlbfs_written_view_released_into_the_cache(make_daemon, tmp_path, bypass):
    """The same on hugetlbfs, where pagemap reports a written huge page as private (one
    entry per base page) and MADV_DONTNEED gives it back to the pool at release."""
    d, mnt, nr_before = _huge_daemon(make_daemon, tmp_path)
    try:
        with open("/proc/sys/vm/nr_hugepages") as f:
            nr = int(f.read())
        with open("/proc/sys/vm/nr_hugepages", "w") as f:      # undone by _undo_huge
            f.write(str(nr + 1))
        if _free_huge_pages() < 1:
            pytest.skip("the kernel gave no spare huge page")
        r = run_py(REUSE_CHILD.replace("{write}", BYPASSES[bypass]), d.socket, check=False)
        assert r.returncode == 0, f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        assert r.stdout.strip() == "ok", r.stdout
    finally:
        _undo_huge(d, mnt, nr_before)


def _private_maps(inode):
    """[(lo, hi)] of this process's private mappings of the file with this inode."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[1][3] == "p" and parts[4] == str(inode):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


def test_view_cache_is_bounded_and_emptied_at_close(make_daemon):
    """At most MAX_MAPPINGS released mappings and MAX_BYTES of range stay cached (the
    oldest are unmapped); close() unmaps them all, and a view freed after close is
    unmapped, not cached: no private mapping of the segment is left in the process."""
    d = make_daemon(size="16MiB", extra=SHM)
    r = run_py("""
        import gc, os, sys
        import numpy as np, torch
        from kvstore.client import Client, buffers, mapcache, views
        c = Client(sys.argv[1])
        ino = os.fstat(c._conn.att.cow_fd).st_ino
        def private_bytes():
            n = 0
            for line in open("/proc/self/maps"):
                p = line.split()
                if len(p) >= 5 and p[1][3] == "p" and p[4] == str(ino):
                    lo, hi = (int(x, 16) for x in p[0].split("-"))
                    n += hi - lo
            return n
        keys = [f"k{i}" for i in range(300)]
        c.put_many(keys, [np.full(4096, i % 251, np.uint8) for i in range(300)])
        ts = [c.get_tensor(k) for k in keys]              # 300 different page ranges
        assert len(views._LIVE) == 300
        del ts
        c.release_many(keys)
        gc.collect()
        cache = c._conn.att.view_cache
        n, size = cache.stats()
        assert n == mapcache.MAX_MAPPINGS == 256, n
        assert private_bytes() == size > 0, (private_bytes(), size)   # the rest were unmapped
        assert bytes(c.get_tensor("k299").numpy()) == bytes([299 % 251]) * 4096   # cached, fresh bytes
        c.release("k299")
        gc.collect()
        # the byte bound, on a cache made with a smaller one
        cache.max_bytes = 3 * 65536
        c.put_many(["b0", "b1", "b2", "b3"], [np.full(65536 - 64, 5, np.uint8)] * 4)
        ts = [c.get_array(k) for k in ("b0", "b1", "b2", "b3")]
        del ts
        c.release_many(["b0", "b1", "b2", "b3"])
        gc.collect()
        n, size = cache.stats()
        assert size <= 3 * 65536 and n <= 3, (n, size)
        assert private_bytes() == size
        # close: everything unmapped; a view that outlives the client is unmapped when freed
        kept = c.get_tensor("k0")
        assert private_bytes() > size
        c.close()
        assert cache.stats() == (0, 0) and cache.closed
        (base,) = list(views._LIVE)
        assert private_bytes() == buffers._VIEW_RANGES[base][0] - base    # kept's only
        assert bytes(kept.numpy()) == bytes(4096)
        del kept
        gc.collect()
        assert private_bytes() == 0 and views._LIVE == {}
        print("ok")
        """, d.socket)
    assert r.stdout.strip() == "ok"


def test_fresh_store_never_reuses_a_mapping_of_the_old_segment(make_daemon):
    """When the client moves to a fresh store (the daemon came back with a new segment),
    the old attachment's cached mappings are unmapped, and a view of an object of the new
    store at the same offset maps the new segment."""
    import gc
    from conftest import wait_for
    d = make_daemon(size="4MiB", extra=SHM)
    c = d.client()
    try:
        c.put("k", np.full(4096, 1, np.uint8))
        t = c.get_tensor("k")
        old_base = t.data_ptr()
        del t
        c.release("k")
        gc.collect()
        old_att = c._conn.att
        old_ino = os.fstat(old_att.cow_fd).st_ino
        old_cache = old_att.view_cache
        assert old_cache.stats()[0] == 1 and len(_private_maps(old_ino)) == 1
        seg = c.stats()["segment_path"]
        d.stop(signal.SIGKILL)
        os.unlink(seg)                                   # the next daemon starts a fresh store
        d.start()
        wait_for(lambda: c._conn.att is not old_att and not c._down, timeout=15,
                 what="the client moving to the fresh store")
        assert old_cache.closed and old_cache.stats() == (0, 0)
        assert _private_maps(old_ino) == []              # the old segment's mappings are gone
        c.put("k", np.full(4096, 2, np.uint8))
        t = c.get_tensor("k")
        assert bytes(t.numpy()) == b"\x02" * 4096
        new_ino = os.fstat(c._conn.att.cow_fd).st_ino
        assert new_ino != old_ino
        assert any(lo <= t.data_ptr() < hi for lo, hi in _private_maps(new_ino)), old_base
        del t
        c.release("k")
    finally:
        c.close()


def test_cached_mappings_give_way_when_the_address_space_is_short(make_daemon):
    """A view that cannot be mapped for lack of room first unmaps the cached mappings and
    tries again: the room they took is not lost to the process."""
    d = make_daemon(size="64MiB", extra=SHM)
    r = run_py("""
        import gc, resource, sys
        import numpy as np, torch
        from kvstore.client import Client
        c = Client(sys.argv[1])
        c.put("cached", np.ones(16 << 20, np.uint8))
        c.put("next", np.full(12 << 20, 2, np.uint8))
        t = c.get_tensor("cached")
        del t
        c.release("cached")
        gc.collect()
        cache = c._conn.att.view_cache
        assert cache.stats() == (1, 16 << 20), cache.stats()
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + (8 << 20), hard))
        try:
            t = c.get_tensor("next")          # fits only once the cached mapping is gone
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        assert cache.stats() == (0, 0), cache.stats()
        assert int(t[0]) == 2 and int(t[-1]) == 2
        del t
        c.release("next")
        print("ok")
        """, d.socket)
    assert r.stdout.strip() == "ok"


def test_forked_child_closes_its_copy_of_the_cache(make_daemon):
    """After fork the child's copy of the cache is closed (its client is orphaned): its
    copies of cached mappings are unmapped, and so are its views when freed; the
    parent's cache is untouched and still reused."""
    d = make_daemon(size="4MiB", extra=SHM)
    r = run_py("""
        import gc, os, sys
        import numpy as np, torch
        from kvstore.client import Client, views
        c = Client(sys.argv[1])
        c.put("k", np.full(8192, 4, np.uint8))
        ino = os.fstat(c._conn.att.cow_fd).st_ino
        def private_maps():
            return sum(1 for l in open("/proc/self/maps")
                       if len(l.split()) >= 5 and l.split()[1][3] == "p" and l.split()[4] == str(ino))
        t, u = c.get_tensor("k"), c.get_tensor("k")
        del u
        c.release("k")
        gc.collect()
        cache = c._conn.att.view_cache
        assert cache.stats()[0] == 1 and private_maps() == 2
        pid = os.fork()
        if pid == 0:
            ok = private_maps() == 1 and cache.closed and cache.stats() == (0, 0)
            del t
            gc.collect()
            os._exit(0 if ok and private_maps() == 0 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert cache.stats()[0] == 1 and not cache.closed and private_maps() == 2
        assert bytes(t.numpy()) == b"\\x04" * 8192
        del t
        c.release("k")
        t = c.get_tensor("k")                        # a cached one: no new mapping
        assert private_maps() == 2 and bytes(t.numpy()) == b"\\x04" * 8192
        del t
        c.release("k")
        c.close()
        assert private_maps() == 0
        print("ok")
        """, d.socket)
    assert r.stdout.strip() == "ok"
