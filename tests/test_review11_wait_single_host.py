"""Review 11: outside a cluster, put(..., replicas=2, wait=...) returns as if the copies
were made: the docstring promises "return only once that many hosts hold the object,
else raise ReplicasShort naming how many do", and copies() says 1."""

import pytest

from kvstore.errors import ReplicasShort


def test_wait_for_two_copies_on_a_single_host_is_short(daemon):
    with daemon.client() as c:
        with pytest.raises(ReplicasShort):
            c.put(b"solo", b"s" * 100, replicas=2, wait=0.5)
        assert c.copies([b"solo"]) == [1]
