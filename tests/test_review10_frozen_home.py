"""Review of issue 10: a lookup whose first home does not answer (its daemon stopped,
SIGSTOP, or hung) must move on to the key's next home within the transfer timeout. Each
LOOKUP was given the whole FETCH deadline (the client's timeout, 9.5 s by default), so
one frozen home turned a get of a key held by a healthy third host into a 9.5 s wait and
then an error, instead of the value within ~2 s."""

import signal
import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import make_kv, kv  # noqa: F401
from kvstore.cluster.directory import homes


def test_a_frozen_first_home_costs_the_transfer_timeout_not_the_deadline(kv):
    a, b, c = kv["a"], kv["b"], kv["c"]
    ids = [a.id, b.id, c.id]
    with b.client() as cb:
        key = next(k for k in (f"fh{i}".encode() for i in range(1000))   # a is its first home, and
                   if homes(cb._key(k), ids) == [a.id, c.id])  # b is not one (it must ask a)
    value = b"z" * 20000
    with c.client() as cc:
        assert cc.put(key, value)
    deadline = time.monotonic() + 10
    with b.client() as cb:
        while not cb.contains_anywhere([key])[0]:
            assert time.monotonic() < deadline, "location records did not arrive"
            time.sleep(0.05)
    a.kill(signal.SIGSTOP)                     # still a member (its lease runs on), answers nothing
    try:
        with b.client() as cb:
            t0 = time.monotonic()
            v = cb.get(key)
            took = time.monotonic() - t0
            assert v is not None and bytes(v) == value
            cb.release(key)
    finally:
        a.kill(signal.SIGCONT)
    assert took < 4.0, f"a get behind a frozen home took {took:.1f} s"
    assert b.cluster_stats().get("lookup_failures", 0) >= 1
