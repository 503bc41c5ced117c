"""Review 11: put(..., replicas=N, wait=...) of a key that already exists here (keys are
content hashes: a repeat put is normal, e.g. of a block this host fetched) never gets
its copies: the repeat seals nothing, so nothing asks for replicas, and the call waits
its whole timeout and raises ReplicasShort."""

import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import make_kv, kv  # noqa: F401
from kvstore.errors import ReplicasShort


def test_repeat_put_with_wait_gets_its_copies(kv):
    a = kv["a"]
    with a.client() as ca:
        assert ca.put(b"rep", b"r" * 5000)                # one copy: here
        t0 = time.monotonic()
        try:
            out = ca.put(b"rep", b"r" * 5000, replicas=2, wait=3)
        except ReplicasShort as e:
            raise AssertionError(f"a repeat put asking for 2 copies waited {time.monotonic() - t0:.1f} s "
                                 f"and raised: {e}") from None
        assert out is False
        assert ca.copies([b"rep"]) == [2]
