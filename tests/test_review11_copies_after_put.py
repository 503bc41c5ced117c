"""Review 11: Client.copies() right after a put must count this host (it holds the key)."""

import signal
import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import make_kv, kv  # noqa: F401
from kvstore.cluster.directory import homes


def test_copies_counts_this_host_right_after_put_while_announcer_is_slow(kv):
    """copies() says "how many hosts hold it sealed, this one included": a key this
    client just put (contains() finds it here) is held by at least 1 host. The daemon
    counts itself only through ``k in self.local`` (filled by its announcer thread) or
    a home's record (sent by that same thread), so while the announcer is stuck sending
    an earlier batch to a slow home, copies() answers 0 for keys held right here."""
    a, b, c = kv["a"], kv["b"], kv["c"]
    ids = [a.id, b.id, c.id]
    with a.client() as ca:
        first = [k for k in (f"slow{i}".encode() for i in range(400)) if c.id in homes(ca._key(k), ids)][:20]
        # keys whose homes are a and b (both answer), put after the announcer got stuck on c
        second = [k for k in (f"mine{i}".encode() for i in range(400))
                  if set(homes(ca._key(k), ids)) == {a.id, b.id}][:20]
        c.kill(signal.SIGSTOP)
        try:
            assert ca.put_many(first, [b"x" * 100] * len(first)) == [True] * len(first)
            time.sleep(0.2)                  # the announcer is now waiting on c (2 s)
            assert ca.put_many(second, [b"y" * 100] * len(second)) == [True] * len(second)
            assert all(ca.contains(k) for k in second)
            got = ca.copies(second)
        finally:
            c.kill(signal.SIGCONT)
    assert min(got) >= 1, f"keys held on this host counted on 0 hosts: {got}"
