"""Peer control messages (issue 10, security: fuzzed as the local protocol is): every
encode/decode pair round-trips, and random, truncated or oversized payloads are a
ProtocolError, never another exception and never a huge allocation."""

import random
import struct

import pytest

from kvstore.cluster import peerwire as w
from kvstore.cluster.directory import Location
from kvstore.errors import ProtocolError


def split(frame_bytes):
    n, mtype = w.read_header(frame_bytes[:5])
    assert n == len(frame_bytes) - 5
    return mtype, frame_bytes[5:]


def test_round_trips():
    keys = [b"a", b"k" * 300, bytes(range(256))]
    assert w.decode(*split(w.lookup(keys))) == keys
    found = {b"a": [Location("10.0.0.1:7700", 3, 4096, 100, 77)], b"b": []}
    assert w.decode(*split(w.locations(found))) == {b"a": [("10.0.0.1:7700", 3, 4096, 100, 77)], b"b": []}
    items = [(b"x", 0, 1, 2), (b"y", 2 ** 63, 2 ** 40, 2 ** 64 - 1)]
    assert w.decode(*split(w.announce("h:1", 9, items))) == ("h:1", 9, items)
    assert w.decode(*split(w.withdraw("h:1", 9, keys))) == ("h:1", 9, keys)
    assert w.decode(*split(w.delete(keys))) == keys
    assert w.decode(*split(w.ok(12))) == 12
    assert w.decode(*split(w.error(51, "no route"))) == (51, "no route")


def test_limits_refuse_before_reading():
    with pytest.raises(ProtocolError, match="over the"):
        w.read_header(struct.pack("<IB", w.MAX_PAYLOAD + 1, w.LOOKUP))
    with pytest.raises(ProtocolError, match="unknown"):
        w.read_header(struct.pack("<IB", 1, 200))
    with pytest.raises(ProtocolError, match="over the"):
        w.decode(w.LOOKUP, struct.pack("<I", w.MAX_ITEMS + 1))
    with pytest.raises(ProtocolError, match="split"):
        w.lookup([b"k"] * (w.MAX_ITEMS + 1))
    with pytest.raises(ProtocolError):                      # trailing bytes
        w.decode(w.OK, struct.pack("<Q", 1) + b"x")
    with pytest.raises(ProtocolError):                      # empty key
        w.decode(w.LOOKUP, struct.pack("<IH", 1, 0))


def test_fuzz_every_decoder():
    rnd = random.Random(10)
    samples = [w.lookup([b"k1", b"k2"]), w.announce("h:1", 1, [(b"k", 1, 2, 3)]),
               w.withdraw("h:1", 1, [b"k"]), w.locations({b"k": [Location("h:1", 1, 2, 3, 4)]}),
               w.ok(1), w.error(1, "x"), w.delete([b"k"]), w.verify([b"k", b"k2"])]
    for _ in range(20000):
        mtype = rnd.choice(list(w.DECODERS))
        kind = rnd.random()
        if kind < 0.4:
            payload = rnd.randbytes(rnd.randint(0, 64))
        else:
            base = bytearray(split(rnd.choice(samples))[1])
            if kind < 0.7 and base:
                base = base[:rnd.randint(0, len(base) - 1)]           # truncated
            else:
                for _ in range(rnd.randint(1, 4)):                     # flipped bytes
                    if base:
                        base[rnd.randrange(len(base))] = rnd.randrange(256)
            payload = bytes(base)
        try:
            w.decode(mtype, payload)
        except ProtocolError:
            pass
