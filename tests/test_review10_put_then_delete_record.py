"""Review of issue 10: a key put and deleted while the announcer was busy must not stay
"somewhere" in the cluster. The announcer merged the queued events into one withdraw
list and one announce list and sent the withdraws first: a put followed by a delete in
one batch left the home with an ANNOUNCE after the WITHDRAW, a record of a key that
exists nowhere, kept until the holder restarts (contains_anywhere said True for good)."""

import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import make_kv, kv  # noqa: F401


def test_put_then_delete_in_one_announce_batch_leaves_no_record(kv):
    a, b = kv["a"], kv["b"]
    gone = [f"gone{i}".encode() for i in range(20)]
    with a.client() as ca:
        for round_ in range(3):
            # a large batch keeps the announcer busy while the next events queue up
            ca.put_many([f"bulk{round_}-{i}".encode() for i in range(20000)], [b"v"] * 20000)
            for k in gone:
                ca.put(k, b"short-lived")
                ca.delete(k)
    deadline = time.monotonic() + 15
    with b.client() as cb:
        while not all(cb.contains_anywhere([b"bulk2-19999", b"bulk0-0"])):
            assert time.monotonic() < deadline, "location records did not arrive"
            time.sleep(0.1)
        time.sleep(1.0)                                # every queued event has been sent
        assert cb.contains_anywhere(gone) == [False] * len(gone)
