"""Review (after 9910b04): Store.allocate's new pre-check (ext > free + lru_bytes:
refuse without evicting) counts objects that clients HOLD as evictable (lru_bytes
includes them; evict() then skips them), and ignores fragmentation. With one object
held, a create() of the whole segment passes the pre-check, evicts (hides) every other
object, fails with StoreFull, and Batch._restore publishes them again: meanwhile
readers miss keys that were never removed (claim 3). Each such request also costs a
full eviction pass and restore (a flood of them stalls the daemon).
"""

import time

import pytest

from conftest import run_py, wait_line
from kvstore.errors import StoreFull

WATCHER = """
    import sys, time
    from kvstore.client import Client
    c = Client(sys.argv[1])
    assert c.get("k5") is not None                 # held: evict() must skip it
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


def test_a_refused_create_never_hides_other_objects_while_one_is_held(daemon):
    with daemon.client() as p:
        for i in range(2000):
            p.put(f"k{i}", b"v" * 1000)
    w = run_py(WATCHER, daemon.socket, 4.0, background=True)
    wait_line(w, "watching")
    c = daemon.client()                             # no arena of its own: nothing else in use
    try:
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
