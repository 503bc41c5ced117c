"""Review of issue 10: a holder cut off longer than its lease (the others dropped it and
its location records) must announce its objects again when it comes back. Nothing told
it to: its own view of the membership never changed while it was cut off (it could not
read etcd), so after it re-registered under the same incarnation its objects stayed
unfindable from every other host (a get was a plain miss) until some unrelated
membership change."""

import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import make_kv, kv  # noqa: F401


def test_a_holder_back_from_a_long_cut_is_found_again(kv):
    a, b = kv["a"], kv["b"]
    values = {f"cut{i}".encode(): bytes([i]) * 5000 for i in range(30)}
    with a.client() as ca:
        for k, v in values.items():
            assert ca.put(k, v)
    deadline = time.monotonic() + 10
    with b.client() as cb:
        while not all(cb.contains_anywhere(list(values))):
            assert time.monotonic() < deadline, "location records did not arrive"
            time.sleep(0.05)
    kv.cl.cut("a")
    try:
        deadline = time.monotonic() + 10
        while a.id in b.cluster_stats().get("members", []):   # its lease expired
            assert time.monotonic() < deadline, "the cut holder never left b's view"
            time.sleep(0.1)
    finally:
        kv.cl.heal("a")
    deadline = time.monotonic() + 12
    with b.client() as cb:
        while True:
            found = cb.contains_anywhere(list(values))
            if all(found):
                break
            assert time.monotonic() < deadline, \
                f"{found.count(False)} of {len(values)} objects of the healed holder are still unfindable"
            time.sleep(0.2)
        got = cb.read_many(list(values))
        assert [bytes(x) for x in got] == list(values.values())
