"""Object semantics across real processes: immutability, zero-copy, holds, delete,
waiting for a seal, and what a client's death leaves behind."""

import mmap
import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import run_py, wait_for, wait_line
from kvstore.errors import GetTimeout, NotSealed, ReadOnlyView


def test_sealed_views_are_read_only_in_another_process(daemon):
    with daemon.client() as c:
        c.put("imm", np.arange(256, dtype=np.uint8))
    run_py("""
        import sys, numpy as np
        from kvstore.client import Client
        from kvstore.errors import ReadOnlyView
        c = Client(sys.argv[1])
        v = c.get("imm")
        try:
            v[0] = 99
            raise SystemExit("memoryview write went through")
        except TypeError:
            pass
        a = c.get_array("imm")
        try:
            a[0] = 99
            raise SystemExit("numpy write went through")
        except ValueError:
            pass
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            t = c.get_tensor("imm")
            for write in (lambda: t.add_(1), lambda: t.__setitem__(0, 5), lambda: t.zero_(),
                          lambda: t[1:4].fill_(7), lambda: torch.add(t, 1, out=t),
                          lambda: t.view(16, 16).copy_(torch.zeros(16, 16, dtype=torch.uint8))):
                try:
                    write()
                    raise SystemExit("torch write went through")
                except ReadOnlyView:
                    pass
            assert not t.numpy().flags.writeable
        assert bytes(c.get("imm")) == bytes(range(256))
    """, daemon.socket)
    with daemon.client() as c:
        assert bytes(c.get("imm")) == bytes(range(256))


def test_get_is_zero_copy(daemon):
    """A get's view is the segment itself: bytes changed in the segment file (out of
    band, by this test) show through a view another process already holds."""
    with daemon.client() as c:
        c.put("zc", b"A" * 4096)
        seg_path = c.stats()["segment_path"]
        v = c.get("zc")
        # the view's address is inside this client's read-only mapping of the segment
        addr = np.frombuffer(v, dtype=np.uint8).ctypes.data
        lo, hi = c._ro_range
        assert lo <= addr < hi
        off = addr - lo
        p = run_py("""
            import sys, time
            from kvstore.client import Client
            c = Client(sys.argv[1]); v = c.get("zc")
            print("holding", bytes(v[:4]).decode(), flush=True)
            deadline = time.time() + 20
            while bytes(v[:4]) != b"ZZZZ" and time.time() < deadline:
                time.sleep(0.01)
            print("saw", bytes(v[:4]).decode(), flush=True)
        """, daemon.socket, background=True)
        wait_line(p, "holding AAAA")
        fd = os.open(seg_path, os.O_RDWR)
        try:
            m = mmap.mmap(fd, off + 4096)
            m[off:off + 4] = b"ZZZZ"
            m.close()
        finally:
            os.close(fd)
        assert "saw ZZZZ" in wait_line(p, "saw")
        p.wait(10)
        assert bytes(v[:4]) == b"ZZZZ"


def test_large_get_copies_nothing(daemon):
    """Getting a 32 MiB object 200 times costs no memory: the views share the segment."""
    with daemon.client() as c:
        c.put("big", np.ones(32 << 20, dtype=np.uint8))
        import resource
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        views = [c.get("big") for _ in range(200)]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert (after - before) * 1024 < (32 << 20)   # 200 copies would be 6.4 GB
        assert all(v.nbytes == 32 << 20 for v in views)


def test_get_waits_for_seal_like_plasma(daemon):
    """A get of an object another client is creating waits for its seal, then returns the
    sealed bytes. Deterministic under any load: the child first proves the object is
    being created (get with timeout=0 raises GetTimeout), then runs the get in a thread and
    reports only once that thread is inside get's wait loop (its stack shows get_many
    sleeping) and has not returned; the parent seals only after that report."""
    with daemon.client() as c:
        buf = c.create("slow", 3)
        p = run_py("""
            import sys, threading, time
            from kvstore.client import Client
            from kvstore.errors import GetTimeout
            c = Client(sys.argv[1])
            try:
                c.get("slow", timeout=0)
                raise SystemExit("get of an object being created did not wait")
            except GetTimeout:
                pass
            got = []
            t = threading.Thread(target=lambda: got.append(bytes(c.get("slow"))), daemon=True)
            t.start()

            def waiting():          # the get thread is sleeping in get_many's wait loop
                f = sys._current_frames().get(t.ident)
                names = []
                while f is not None:
                    names.append(f.f_code.co_name)
                    f = f.f_back
                return "get_many" in names and names[0] in ("sleep", "next_delay")
            deadline = time.monotonic() + 60
            while not waiting():
                if got or time.monotonic() > deadline:
                    raise SystemExit(f"the get never waited: {got}")
                time.sleep(0.001)
            print("blocked", bool(got), flush=True)
            t.join(60)
            print("got", got[0].decode() if got else None, flush=True)
        """, daemon.socket, background=True)
        assert wait_line(p, "blocked").split() == ["blocked", "False"]   # still waiting
        with pytest.raises(NotSealed):
            c.get("slow")
        buf[:] = b"yes"
        c.seal("slow")
        assert wait_line(p, "got").split() == ["got", "yes"]
        assert p.wait(10) == 0


def test_get_timeout_and_creator_death(daemon):
    with daemon.client() as c:
        p = run_py("""
            import sys, time
            from kvstore.client import Client
            c = Client(sys.argv[1]); c.create("orphan", 100)
            print("created", flush=True); time.sleep(60)
        """, daemon.socket, background=True)
        wait_line(p, "created")
        with pytest.raises(GetTimeout):
            c.get("orphan", timeout=0.2)
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("v", c.get("orphan")))
        t.start()
        time.sleep(0.3)
        p.send_signal(signal.SIGKILL)
        p.wait()
        t.join(10)
        assert not t.is_alive() and result["v"] is None   # reclaimed, so a miss


def test_delete_of_held_object_waits_for_last_release(daemon):
    with daemon.client() as c:
        c.put("held", b"keepme" * 1000)
        used_before = c.stats()["used"]
        p = run_py("""
            import sys, time
            from kvstore.client import Client
            c = Client(sys.argv[1]); v = c.get("held")
            print("holding", flush=True)
            time.sleep(60)
        """, daemon.socket, background=True)
        wait_line(p, "holding")
        assert c.delete("held") is True
        assert not c.contains("held") and c.get("held") is None
        st = c.stats()
        assert st["doomed"] == 1 and st["used"] == used_before
        # the same key may be put again at once, in new space
        assert c.put("held", b"new")
        p.kill()
        p.wait()
        wait_for(lambda: c.stats()["doomed"] == 0, what="doomed extent freed after holder died")
        assert bytes(c.get("held")) == b"new"
        assert c.verify() == []


def test_delete_then_release_frees_space(daemon):
    with daemon.client() as a, daemon.client() as b:
        a.put("d", b"x" * 100000)
        v = b.get("d")
        used = a.stats()["used"]
        a.delete("d")
        assert bytes(v[:3]) == b"xxx"           # still readable while held
        b.release("d")
        assert a.stats()["used"] < used and a.stats()["doomed"] == 0


def test_killed_client_releases_holds_and_reclaims_creations(daemon):
    with daemon.client() as c:
        c.put("kept", b"k" * 5000)
        base = c.stats()
        p = run_py("""
            import sys, time
            from kvstore.client import Client
            c = Client(sys.argv[1])
            c.get("kept")
            buf = c.create("half", 1 << 20); buf[:10] = b"0123456789"
            c.put("done", b"sealed by the dead")
            print("ready", flush=True); time.sleep(60)
        """, daemon.socket, background=True)
        wait_line(p, "ready")
        st = c.stats()
        assert st["held_extents"] == 1 and st["creating"] == 1
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        wait_for(lambda: c.stats()["creating"] == 0 and c.stats()["held_extents"] == 0,
                 what="cleanup after SIGKILL")
        assert not c.contains("half")
        assert bytes(c.get("done")) == b"sealed by the dead"       # sealed objects survive
        assert c.stats()["used"] == base["used"] + 64               # only 'done' remains
        assert "reclaimed 1 unsealed" in daemon.read_log()
        assert c.verify() == []


def test_many_processes_at_once_keep_index_consistent(daemon):
    code = """
        import sys, random
        from kvstore.client import Client
        from kvstore.errors import StoreFull
        c = Client(sys.argv[1]); r = random.Random(int(sys.argv[2]))
        for i in range(400):
            k = "k%d" % r.randrange(60)
            op = r.random()
            if op < 0.4:
                try:
                    c.put(k, bytes([len(k)]) * r.randrange(1, 300000))
                except StoreFull:
                    pass
            elif op < 0.8:
                v = c.get(k)
                if v is not None:
                    assert len(set(bytes(v[:50]))) <= 1, "torn object"
                    c.release(k)
            else:
                c.delete(k)
        print("ok")
    """
    procs = [run_py(code, daemon.socket, seed, background=True) for seed in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "ok" in out, err
    with daemon.client() as c:
        assert c.verify() == []
        st = c.stats()
        assert st["held_extents"] == 0 and st["creating"] == 0


def test_client_killed_mid_transaction_leaves_no_lock_and_no_damage(daemon):
    """Clients run index transactions themselves; SIGKILL one while it hammers the
    index, many times: the next writer recovers LMDB's robust lock and the index stays
    consistent (every extent accounted for once)."""
    import random
    rng = random.Random(3)
    hammer = """
        import sys
        from kvstore.client import Client
        c = Client(sys.argv[1]); i = 0
        print("go", flush=True)
        while True:
            k = "h%d" % (i % 200)
            c.put(k, b"x" * (1 + i % 70000))
            v = c.get(k)
            if v is not None:
                c.release(k)
            if i % 3 == 0:
                c.delete(k)
            i += 1
    """
    with daemon.client() as c:
        for round_ in range(8):
            p = run_py(hammer, daemon.socket, background=True)
            wait_line(p, "go")
            time.sleep(rng.uniform(0.05, 0.3))
            p.send_signal(signal.SIGKILL)
            p.wait()
            done = threading.Event()
            threading.Thread(target=lambda: (c.put(f"after{round_}", b"ok"), done.set()),
                             daemon=True).start()
            assert done.wait(10), "a writer is stuck behind a dead client's lock"
            wait_for(lambda: c.stats()["held_extents"] == 0 and c.stats()["creating"] == 0,
                     what="cleanup of the killed client")
            assert c.verify() == []
        assert all(bytes(c.get(f"after{r}")) == b"ok" for r in range(8))


def test_a_holder_never_gets_a_deleted_or_replaced_object(daemon):
    with daemon.client() as x, daemon.client() as y:
        y.put("k", b"OLD-VALUE")
        old = x.get("k")
        y.delete("k")
        assert x.get("k") is None                 # the hold does not resurrect it
        y.put("k", b"NEW-VALUE")
        assert bytes(x.get("k")) == b"NEW-VALUE"
        assert bytes(old) == b"OLD-VALUE"         # the old view stays valid while held
        x.release("k")
        x.release("k")                            # one release per successful get
        wait_for(lambda: y.stats()["doomed"] == 0 and y.stats()["held_extents"] == 0, what="holds gone")
        assert y.verify() == []


def test_release_many_with_an_unheld_key_changes_nothing(daemon):
    from kvstore.errors import ObjectNotFound
    with daemon.client() as c:
        c.put("a", b"1")
        c.get("a")
        with pytest.raises(ObjectNotFound, match="does not hold"):
            c.release_many(["a", "never"])
        with pytest.raises(ObjectNotFound, match="1 times, not 2"):
            c.release_many(["a", "a"])
        assert c.stats()["held_extents"] == 1
        c.release("a")                            # the hold was still there to release
        assert c.stats()["held_extents"] == 0


def test_parent_killed_after_fork_is_cleaned_up_though_child_lives(daemon):
    p = run_py("""
        import os, signal, sys, time
        from kvstore.client import Client
        c = Client(sys.argv[1])
        c.put("f", b"v"); c.get("f"); c.create("unsealed", 10)
        pid = os.fork()
        if pid == 0:
            time.sleep(30); os._exit(0)
        print("child", pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, daemon.socket, background=True)
    child = int(wait_line(p, "child").split()[1])
    try:
        with daemon.client() as c:
            wait_for(lambda: c.stats()["held_extents"] == 0 and c.stats()["creating"] == 0,
                     timeout=10, what="cleanup of the dead parent while its child lives")
    finally:
        os.kill(child, signal.SIGKILL)
        p.wait()


def test_tensor_writes_that_slip_past_the_guard_never_crash_or_corrupt(daemon):
    pytest.importorskip("torch", reason="torch extra not installed")
    run_py("""
        import sys, torch, torch.nn.functional as F
        from kvstore.client import Client
        c = Client(sys.argv[1])
        c.put("t", torch.arange(16, dtype=torch.float32) - 8)
        t = c.get_tensor("t", torch.float32)
        assert c.backing == "shm"
        F.relu(t, inplace=True)               # nested in-place: not seen by the guard
        torch.from_dlpack(t).add_(1)          # DLPack bypasses the subclass
        c.close()
        try:
            t[0:4].add_(1)
        except Exception:
            pass
        c2 = Client(sys.argv[1])
        assert c2.get_array("t", "float32")[:4].tolist() == [-8.0, -7.0, -6.0, -5.0]
    """, daemon.socket)


def test_a_client_killed_inside_a_lookup_leaves_nothing_behind(daemon):
    """Clients never open the LMDB index (only the daemon does), so a client killed in the
    middle of a lookup holds no reader slot, pins no page and takes no lock: it loops
    on lookups until it is killed, and the store carries on unchanged."""
    p = run_py("""
        import sys, time
        from kvstore.client import Client
        c = Client(sys.argv[1]); c.put("r", b"1")
        assert "data.mdb" not in open("/proc/self/maps").read()   # no LMDB mapping at all
        print("reading", flush=True)
        while True:
            c.contains("r"); c.get("r"); c.release("r")
    """, daemon.socket, background=True)
    wait_line(p, "reading")
    with daemon.client() as c:
        p.kill()
        p.wait()
        for i in range(2000):                    # many commits while it lies dead
            c.put(f"k{i}", b"x" * 100)
            c.delete(f"k{i}")
        assert bytes(c.get("r")) == b"1"
        c.release("r")
        wait_for(lambda: c.stats()["clients"] == 1, what="the daemon dropping the dead client")
        assert c.verify() == []
