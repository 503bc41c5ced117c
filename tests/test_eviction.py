"""Eviction: LRU order, held and pinned objects kept, StoreFull with nothing changed,
and the daemon's high/low watermark sweep."""

import time

import pytest

from conftest import run_py, wait_for, wait_line
from kvstore.errors import StoreFull

MiB = 1 << 20
NO_SWEEP = ("--high-watermark", "1.0", "--low-watermark", "0.99")  # sweep never runs


def test_lru_victim_is_least_recently_used(make_daemon):
    d = make_daemon(size="8MiB", extra=NO_SWEEP)
    with d.client() as c:
        for i in range(8):
            assert c.put(f"k{i}", bytes([i]) * MiB)
        time.sleep(0.15)          # LRU stamps are exact to 100 ms
        c.get("k0")
        c.release("k0")           # k0 is now the most recently used
        assert c.put("k8", b"\x08" * MiB)
        assert c.contains("k0") and not c.contains("k1")
        assert all(c.contains(f"k{i}") for i in range(2, 9))
        assert c.verify() == []


def test_held_and_pinned_objects_are_never_evicted(make_daemon):
    d = make_daemon(size="8MiB", extra=NO_SWEEP)
    with d.client() as c:
        c.put("pinned", b"p" * MiB, pin=True)
        c.put("held", b"h" * MiB)
        p = run_py("""
            import sys, time
            from kvstore.client import Client
            c = Client(sys.argv[1]); v = c.get("held"); print("holding", flush=True); time.sleep(60)
        """, d.socket, background=True)
        wait_line(p, "holding")
        for i in range(30):                  # churn far more than the segment holds
            c.put(f"churn{i}", bytes([i]) * MiB)
        assert bytes(c.get("pinned")[:1]) == b"p" and bytes(c.get("held")[:1]) == b"h"
        c.release("pinned")
        c.release("held")
        p.kill()
        p.wait()
        c.unpin("pinned")
        wait_for(lambda: c.stats()["held_extents"] == 0, what="holder cleanup")
        for i in range(30, 40):
            c.put(f"churn{i}", bytes([i]) * MiB)
        assert not c.contains("pinned") and not c.contains("held")


def test_store_full_when_nothing_can_be_evicted_changes_nothing(make_daemon):
    d = make_daemon(size="8MiB", extra=NO_SWEEP)
    with d.client() as c:
        for i in range(4):
            c.put(f"pin{i}", b"x" * MiB, pin=True)
        for i in range(3):
            c.put(f"held{i}", b"y" * MiB)
            c.get(f"held{i}")
        c.put("free", b"z" * MiB)                # the only evictable object
        before = c.stats()
        with pytest.raises(StoreFull, match="held, pinned"):
            c.put("too-big", b"w" * (2 * MiB))   # evicting 'free' would not be enough
        after = c.stats()
        assert c.contains("free"), "a failed put must not evict anything"
        assert after["used"] == before["used"] and after["objects"] == before["objects"]
        assert c.verify() == []
        assert c.put("fits", b"v" * MiB)         # evicts 'free'
        assert not c.contains("free")


def test_big_put_evicts_many_small_objects(make_daemon):
    d = make_daemon(size="8MiB", extra=NO_SWEEP)
    with d.client() as c:
        for i in range(120):
            c.put(f"s{i}", bytes([i % 256]) * (64 << 10))
        assert c.put("large", b"L" * (4 * MiB))
        assert bytes(c.get("large")[-1:]) == b"L"
        assert c.verify() == []


def test_daemon_sweeps_between_watermarks(make_daemon):
    d = make_daemon(size="16MiB", extra=("--high-watermark", "0.5", "--low-watermark", "0.25"))
    with d.client() as c:
        for i in range(6):                       # 6 MiB: below the high watermark
            c.put(f"w{i}", bytes([i]) * MiB)
        time.sleep(0.2)
        assert c.stats()["objects"] == 6
        for i in range(6, 10):                   # 10 MiB: above 8 MiB
            c.put(f"w{i}", bytes([i]) * MiB)
        wait_for(lambda: c.stats()["used"] <= 4 * MiB, what="sweep to the low watermark")
        assert c.stats()["used"] > 2 * MiB       # it stopped at the low watermark
        assert not c.contains("w0") and c.contains("w9")   # oldest went first


def test_full_index_is_a_typed_error_and_changes_nothing(make_daemon):
    from kvstore.errors import IndexFull
    d = make_daemon(size="64MiB", extra=("--index-map-size", "1MiB"))
    with d.client() as c:
        n = 0
        with pytest.raises(IndexFull, match="index_map_size"):
            for n in range(100000):
                c.put(b"%0250d" % n, b"v")
        assert n > 100
        assert c.contains(b"%0250d" % (n - 1)) and not c.contains(b"%0250d" % n)
        assert bytes(c.get(b"%0250d" % 0)) == b"v"
        assert c.verify() == []


def test_recently_used_last_object_is_still_evictable(make_daemon):
    """CLOCK: an object given a second chance at the end of the walk is reached again."""
    d = make_daemon(size="64MiB", extra=NO_SWEEP)
    with d.client() as c:
        c.put("a", b"a" * (40 * MiB))
        c.get("a")
        c.release("a")                          # referenced, and the only lru entry
        assert c.put("b", b"b" * (40 * MiB))
        assert not c.contains("a") and c.contains("b")


def test_put_that_must_evict_never_writes_into_a_victim_before_commit(make_daemon):
    """A put writes only into space the daemon granted it, and the daemon answers a grant
    only after the eviction that made room has committed: no victim is ever clobbered,
    whatever a put that evicts does."""
    d = make_daemon(size="8MiB", extra=NO_SWEEP)
    with d.client() as c:
        for i in range(128):
            c.put(f"s{i}", bytes([i]) * (64 << 10))
        for i in range(128, 200):                 # each of these must evict
            assert c.put(f"s{i}", bytes([i % 256]) * (64 << 10))
        for i in range(200):
            got = c.read(f"s{i}")                 # verified: checksum as recorded at seal
            assert got is None or got == bytes([i % 256]) * (64 << 10)
        assert c.verify() == []
