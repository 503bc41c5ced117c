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

# The child: puts A (4 KiB of 1s) through a short-lived writer client, so that A's
# extent is freed whole when A is deleted and B (4 KiB of 7s) is put at the same offset.
CHILD = """
import sys
import numpy as np, torch
from kvstore.client import Client
from kvstore.errors import ReadOnlyView

sock = sys.argv[1]
N = 4096
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
                import sys
                import numpy as np, torch
                from kvstore.client import Client
                c = Client(sys.argv[1])
                t = c.get_tensor("a")
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
