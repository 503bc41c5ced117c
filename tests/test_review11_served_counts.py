"""Review 11: a holder's served / served_bytes count objects and their bytes once each,
not once per 1 MiB piece the reader now asks for (Transport.read on_piece cuts every
object over 1 MiB into pieces, each resolved, and counted, as if it were an object)."""

import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import make_kv, kv  # noqa: F401


def test_one_large_object_pulled_once_counts_once_on_its_holder(kv):
    a, b = kv["a"], kv["b"]
    value = bytes(range(256)) * (4 * 4096)          # 4 MiB: four pieces
    with a.client() as ca:
        assert ca.put(b"big4", value)
    deadline = time.monotonic() + 10
    with b.client() as cb:
        while not cb.contains_anywhere([b"big4"])[0]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = a.cluster_stats()
        got = cb.read(b"big4")
        assert bytes(got) == value
    after = a.cluster_stats()
    assert b.cluster_stats()["fetched"] == 1
    assert after.get("served", 0) - before.get("served", 0) == 1
    assert after.get("served_bytes", 0) - before.get("served_bytes", 0) == len(value)
