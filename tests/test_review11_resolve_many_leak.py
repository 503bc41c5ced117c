"""Review 11: TcpServer._answer releases the leases of a resolve_many that answered the
wrong number of parts (a resolver bug it guards against); since the peek change it
assigns ``many`` only after the length check, so those leases are never released."""

from kvstore.errors import ObjectGoneOnPeer
from kvstore.transport import open_server, open_transport

from test_transport_contract import SECRET, segment  # noqa: F401 (fixture)
from test_transport_contract import ShmResolver


class ShortMany:
    def __init__(self, base):
        self.base = base

    def resolve(self, op):
        return self.base.resolve(op)

    def resolve_many(self, ops):             # a buggy resolver: one answer short
        out = []
        for op in ops[:-1]:
            try:
                out.append(self.base.resolve(op))
            except ObjectGoneOnPeer as e:
                out.append(e)
        return out


def test_leases_of_a_short_resolve_many_are_released(segment):  # noqa: F811
    base = ShmResolver(segment.path, segment.objects)
    server = open_server("tcp", ShortMany(base), secret=SECRET, host="127.0.0.1")
    tr = open_transport("tcp", secret=SECRET, streams=1)
    try:
        keys = [b"page", b"one", b"kb/1", b"kb/2"]
        ops = [segment.op(k) for k in keys]
        bufs = [bytearray(op.size) for op in ops]
        assert tr.read(server.address, ops, bufs, 5.0) == [None] * 4      # resolve() one by one
        assert base.settled(2.0), (base.acquired, base.released)
    finally:
        tr.close()
        server.close()
        base.close()
