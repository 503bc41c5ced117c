"""Nothing lost when the daemon dies: SIGKILL it, restart it on the same data dir, and
every object sealed before the kill is back with identical bytes; objects that were
mid-creation are never half-visible (sealed later by a living creator, or reclaimed if
their creator died)."""

import hashlib
import random
import re
import signal

from conftest import run_py, wait_for, wait_line


def _fill(c, n, seed):
    rng = random.Random(seed)
    digests = {}
    for i in range(n):
        data = rng.randbytes(rng.choice([1, 100, 4096, 70000, 300000]))
        c.put(f"obj{i}", data)
        digests[f"obj{i}"] = hashlib.sha256(data).digest()
    return digests


def test_daemon_sigkill_then_restart_recovers_every_sealed_object(make_daemon):
    d = make_daemon(size="128MiB")
    with d.client() as c:
        digests = _fill(c, 300, 1)
        c.create("mid-creation", 1000)[:5] = b"half!"
        d.stop(signal.SIGKILL)
        d.start()
        log = d.read_log()
        m = re.findall(r"recovered (\d+) objects \((\d+) bytes\) from \S+ in ([\d.]+) s", log)
        assert m and int(m[-1][0]) == 300, log[-2000:]
        with d.client() as fresh:
            for k, h in digests.items():
                assert hashlib.sha256(fresh.get(k)).digest() == h, k
            assert not fresh.contains("mid-creation")         # never half-visible
            assert fresh.verify() == []
        c.seal("mid-creation")                                # its creator lives on: it may finish
    with d.client() as fresh:
        assert bytes(fresh.get("mid-creation")[:5]) == b"half!"


def test_creations_of_clients_that_died_with_the_daemon_are_reclaimed(make_daemon):
    d = make_daemon(size="64MiB")
    p = run_py("""
        import sys, time
        from kvstore.client import Client
        c = Client(sys.argv[1]); c.put("kept", b"sealed before the crash")
        c.create("orphan", 1 << 20); c.get("kept")
        print("ready", flush=True); time.sleep(60)
    """, d.socket, background=True)
    wait_line(p, "ready")
    d.stop(signal.SIGKILL)
    p.kill()
    p.wait()
    d.start()
    with d.client() as c:
        st = c.stats()
        assert st["creating"] == 0 and st["held_extents"] == 0 and st["clients"] == 1
        assert bytes(c.get("kept")) == b"sealed before the crash" and not c.contains("orphan")
        assert "cleaned up after 1 dead clients" in d.read_log()
        assert c.verify() == []


def test_repeated_daemon_kills_lose_nothing(make_daemon):
    d = make_daemon(size="64MiB")
    digests = {}
    with d.client() as c:                 # one client lives through every kill
        for round_ in range(5):
            digests.update({f"r{round_}-{k}": h for k, h in _fill(c, 30, round_).items()})
            # _fill wrote obj<i>; keep them under per-round keys (the same client
            # goes on working across every kill: it needs no daemon for data calls)
            for i in range(30):
                v = c.get(f"obj{i}")
                c.put(f"r{round_}-obj{i}", bytes(v))
                c.release(f"obj{i}")
                c.delete(f"obj{i}")
            d.stop(signal.SIGKILL)
            d.start()
        with d.client() as fresh:
            for k, h in digests.items():
                assert hashlib.sha256(fresh.get(k)).digest() == h, k
            assert fresh.verify() == []


def test_client_reconnects_by_itself_and_keeps_its_holds(make_daemon):
    import threading
    import time
    d = make_daemon(size="64MiB")
    c = d.client(reconnect_timeout=20)
    try:
        c.put("before", b"x" * 5000)
        view = c.get("before")                       # held across the crash
        cid = c.cid
        d.stop(signal.SIGKILL)
        wait_for(lambda: c._down, what="the watchdog noticing the daemon is gone")
        result = {}

        def late_put():
            t0 = time.monotonic()
            result["ok"] = c.put("during", b"made while the daemon was down")
            result["waited"] = time.monotonic() - t0
        t = threading.Thread(target=late_put)
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), "a call while the daemon is down waits for it"
        d.start()
        t.join(20)
        assert result.get("ok") is True and result["waited"] >= 0.4
        assert c.cid == cid                          # resumed, not re-registered
        assert bytes(view[:3]) == b"xxx"             # a view from before the crash
        st = c.stats()                               # the control socket works again
        assert st["held_extents"] == 1 and st["connected"] == 1
        c.release("before")
        assert c.stats()["held_extents"] == 0
        assert "reconnected" in d.read_log()
    finally:
        c.close()


def test_calls_give_up_with_store_unavailable_when_the_daemon_stays_down(make_daemon):
    import time
    import pytest
    from kvstore.errors import StoreUnavailable
    d = make_daemon(size="64MiB")
    with d.client(reconnect_timeout=0.5) as c:
        c.put("k", b"v")
        d.stop(signal.SIGKILL)
        wait_for(lambda: c._down, what="the watchdog noticing the daemon is gone")
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            c.get("k")
        assert 0.4 <= time.monotonic() - t0 < 5     # bounded: never hangs
        d.start()
        wait_for(lambda: not c._down, timeout=15, what="reconnection")
        assert bytes(c.get("k")) == b"v"


def test_client_follows_a_daemon_that_came_back_with_a_fresh_store(make_daemon):
    d = make_daemon(size="64MiB")
    with d.client() as c:
        c.put("old", b"old store")
        old_view = c.get("old")
        d.destroy()                                  # the store is gone, not just the process
        d.start()
        wait_for(lambda: not c._down and c.contains("old") is False, timeout=15,
                 what="the client moving to the fresh store")
        assert c.put("new", b"new store")
        with d.client() as other:
            assert bytes(other.get("new")) == b"new store"
        assert bytes(old_view) == b"old store"       # old views stay readable


def _corrupt(seg_path, offset, data):
    import mmap
    import os
    fd = os.open(seg_path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, offset + len(data))
        m[offset:offset + len(data)] = data
        m.close()
    finally:
        os.close(fd)


def test_checksums_catch_corruption_on_copy_and_on_recovery(make_daemon):
    import numpy as np
    import pytest
    from kvstore.errors import ChecksumMismatch
    d = make_daemon(size="64MiB")
    with d.client() as c:
        for k in ("a", "b", "c"):
            c.put(k, k.encode() * 100000)
        seg = c.stats()["segment_path"]
        assert c.read("a") == b"a" * 100000           # a verified copy
        out = bytearray(100000)
        assert c.read("b", out) == 100000 and bytes(out) == b"b" * 100000

        def offset(k):
            v = c.get(k)
            off = np.frombuffer(v, dtype=np.uint8).ctypes.data - c._ro_range[0]
            c.release(k)
            return off
        _corrupt(seg, offset("a") + 10, b"X")         # a bit rot / stray write in the segment
        with pytest.raises(ChecksumMismatch, match="dropped"):
            c.read("a")
        assert not c.contains("a") and c.get("a") is None    # never served again
        _corrupt(seg, offset("b") + 99999, b"Y")
        d.stop(signal.SIGKILL)
        d.start()
        log = d.read_log()
        assert "dropped 1 objects whose bytes no longer matched their checksum: b'b'" in log
    with d.client() as fresh:
        assert not fresh.contains("b") and fresh.read("c") == b"c" * 100000
        assert fresh.verify() == []


def test_segment_removed_while_daemon_down_gives_a_clean_start(make_daemon):
    import os
    d = make_daemon(size="64MiB")
    with d.client() as c:
        c.put("x", b"1")
        seg = c.stats()["segment_path"]
    d.stop(signal.SIGKILL)
    os.unlink(seg)                                    # e.g. an operator cleaned /dev/shm
    d.start()
    assert "of the previous daemon is gone (reboot?); starting empty" in d.read_log()
    with d.client() as c:
        assert not c.contains("x") and c.stats()["objects"] == 0
        assert c.put("x", b"2") and c.verify() == []


def test_restart_with_a_new_size_starts_fresh_in_new_files_and_clients_follow(make_daemon):
    import os
    d = make_daemon(size="64MiB")
    index_file = os.path.join(d.data_dir, "index", "data.mdb")
    with d.client() as c:
        c.put("old", b"1")
        inode = os.stat(index_file).st_ino
        d.stop(signal.SIGKILL)
        d.size = "32MiB"                                # a size change means a fresh store
        d.start()
        assert "size changed" in d.read_log()
        assert os.stat(index_file).st_ino != inode      # new files: stale handles see the old store
        wait_for(lambda: not c._down and c.segment_size == 32 << 20, timeout=15,
                 what="the client moving to the fresh store")
        assert c.put("new", b"2") and not c.contains("old")
        with d.client() as other:
            assert other.cid != c.cid and bytes(other.get("new")) == b"2"
            assert other.verify() == []


def test_an_index_of_an_older_schema_is_not_adopted(make_daemon):
    import os
    from kvstore.store.schema import SCHEMA, Env
    d = make_daemon(size="64MiB")
    with d.client() as c:
        c.put("k", b"v")
    d.stop()
    idx = Env(os.path.join(d.data_dir, "index"), 64 << 20)
    with idx.env.begin(write=True) as txn:
        txn.put(b"schema", str(SCHEMA - 1).encode(), db=idx.dbs.meta)
    idx.close()
    d.start()
    assert f"index schema {SCHEMA - 1} is not this daemon's {SCHEMA}; starting empty" in d.read_log()
    with d.client() as c:
        assert c.stats()["objects"] == 0 and c.put("k", b"v2")


def test_close_wakes_a_call_waiting_for_the_daemon(make_daemon):
    import threading
    import time
    from kvstore.errors import ClientClosed
    d = make_daemon(size="64MiB")
    c = d.client(reconnect_timeout=60)
    c.put("k", b"v")
    d.stop(signal.SIGKILL)
    wait_for(lambda: c._down, what="the watchdog noticing")
    got = {}

    def waiter():
        try:
            c.get("k")
        except Exception as e:
            got["e"] = e
    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    c.close()
    t.join(10)
    assert isinstance(got.get("e"), ClientClosed) and time.monotonic() - t0 < 3
