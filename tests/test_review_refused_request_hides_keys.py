"""Review: a refused request still hides live objects for a while.

Store.allocate() evicts (Batch.hide -> table.unpublish, at once, inside the transaction)
until nothing evictable is left, then raises StoreFull; Daemon._apply_together aborts
the transaction and Batch._restore() publishes the hidden objects again. Between the two
every reader sees those objects missing, though nothing was ever removed: a create()
that cannot fit makes other clients' get/contains of long-sealed keys return a miss
(claim 3), and nothing in flight makes the reader settle.
"""

import time

import pytest

from conftest import run_py, wait_line
from kvstore.errors import StoreFull

WATCHER = """
    import sys, time
    from kvstore.client import Client
    c = Client(sys.argv[1])
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


def test_a_refused_create_never_hides_other_objects(daemon):
    c = daemon.client()
    try:
        for i in range(2000):                       # one by one: put_many has its own bug
            c.put(f"k{i}", b"v" * 1000)
        c.put("pinned", b"p" * 1000, pin=True)     # nothing can free the whole segment
        w = run_py(WATCHER, daemon.socket, 4.0, background=True)
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
    finally:
        c.close()
