"""Review: a refused request must not hide live objects, even for a while.

Store.allocate() used to evict (Batch.hide -> table.unpublish, at once, inside the
transaction) until nothing evictable was left, then raise StoreFull; the transaction
was aborted and Batch._restore() published the hidden objects again. Between the two
every reader saw those objects missing, though nothing was ever removed: a create()
that cannot fit made other clients' get/contains of long-sealed keys return a miss
(claim 3), and nothing in flight made the reader settle. Two ways to be unable to fit:
an object pinned, or an object held (which the free-space pre-check counts as
evictable, and evict() then skips).
"""

import time

import pytest

from conftest import run_py, wait_line
from kvstore.errors import StoreFull

WATCHER = """
    import sys, time
    from kvstore.client import Client
    c = Client(sys.argv[1])
    if sys.argv[3] == "hold":
        assert c.get("k5") is not None             # held: evict() must skip it
    keys = [f"k{i}" for i in range(0, 2000, 37)]
    assert all(c.contains(k) for k in keys)
    print("watching", flush=True)
    misses, end = 0, time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        for k in keys:
            if not c.contains(k):
                misses += 1
    print("misses", misses, flush=True)
"""


def _refused_creates_hide_nothing(daemon, c, hold):
    """Refuse creates of the whole segment for 3 s while a watcher counts misses."""
    w = run_py(WATCHER, daemon.socket, 4.0, hold, background=True)
    wait_line(w, "watching")
    end = time.monotonic() + 3.0
    refused = 0
    while time.monotonic() < end:
        with pytest.raises(StoreFull):
            c.create("huge", c.segment_size)
        refused += 1
    line = wait_line(w, "misses")
    w.wait()
    assert refused > 0
    assert int(line.split()[1]) == 0, f"a reader missed live keys {line.split()[1]} times"


def test_a_refused_create_never_hides_other_objects(daemon):
    c = daemon.client()
    try:
        for i in range(2000):                       # one by one: put_many has its own bug
            c.put(f"k{i}", b"v" * 1000)
        c.put("pinned", b"p" * 1000, pin=True)     # nothing can free the whole segment
        _refused_creates_hide_nothing(daemon, c, "no")
    finally:
        c.close()


def test_a_refused_create_never_hides_other_objects_while_one_is_held(daemon):
    with daemon.client() as p:
        for i in range(2000):
            p.put(f"k{i}", b"v" * 1000)
    c = daemon.client()                             # no arena of its own: nothing else in use
    try:
        _refused_creates_hide_nothing(daemon, c, "hold")
    finally:
        c.close()
