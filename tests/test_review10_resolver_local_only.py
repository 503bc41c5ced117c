"""Review of issue 10: the holder's transport Resolver must answer from its own store
only. It looked the key up with the daemon's internal Client, whose get on a local miss
asks its own daemon to FETCH the key from the cluster: a peer's read of a key this
daemon no longer holds (a stale location record, a key deleted here) made this daemon
pull the key from another holder, resurrecting a local delete, and kept the transport
thread busy for up to the client's timeout while the reader had long given up."""

import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import make_kv, kv  # noqa: F401
from kvstore.errors import ObjectGoneOnPeer
from kvstore.transport.base import PeerAddr, ReadOp
from kvstore.transport.tcp import TcpTransport


def test_a_read_of_a_key_the_holder_lacks_is_gone_and_fetches_nothing(kv):
    a, c = kv["a"], kv["c"]
    value = b"v" * 5000
    with c.client() as cc:
        assert cc.put(b"elsewhere", value)
    deadline = time.monotonic() + 10
    with a.client() as ca:
        while not ca.contains_anywhere([b"elsewhere"])[0]:
            assert time.monotonic() < deadline, "location records did not arrive"
            time.sleep(0.05)
        assert not ca.contains(b"elsewhere")            # only on c
    inc = a.cluster_stats()["incarnation"]
    with open(kv.secret, "rb") as f:
        secret = f.read().rstrip(b"\r\n")
    t = TcpTransport(secret)
    try:
        buf = bytearray(len(value))
        t0 = time.monotonic()
        res = t.read(PeerAddr(a.addr, a.tcp_port()), [ReadOp(b"elsewhere", 0, len(value), inc)], [buf], 2.0)
        took = time.monotonic() - t0
    finally:
        t.close()
    assert isinstance(res[0], ObjectGoneOnPeer), res
    assert took < 1.0, f"the holder took {took:.2f} s to say it lacks the key"
    st = a.cluster_stats()
    assert st.get("fetch_requests", 0) == 0, "a peer's read made the holder fetch the key itself"
    with a.client() as ca:
        assert not ca.contains(b"elsewhere"), "the holder pulled a key it was only asked to serve"
