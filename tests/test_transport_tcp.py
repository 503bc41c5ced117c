"""The TCP peer transport beyond the contract: the wire as a hostile peer sees it.

Hand-made hellos and frames against a real TcpServer (wrong versions, garbage and
truncated frames from a seeded RNG, before and after the handshake, requests over the
limits, readers that vanish), and hand-made servers against a real TcpTransport (a peer
speaking another version, a lying peer that claims or sends more bytes than asked).
"""

import logging
import os
import random
import socket
import struct
import threading
import time

import pytest

from kvstore.cluster import auth
from kvstore.errors import (ConfigError, ObjectGoneOnPeer, PeerIncompatible, PeerUnreachable,
                            TransportError)
from kvstore.transport import wire
from kvstore.transport.base import ReadOp
from kvstore.transport.tcp import TcpServer, TcpTransport

from test_transport_contract import SECRET, Peer, segment  # noqa: F401 (segment: the fixture)


@pytest.fixture
def tcp(segment):  # noqa: F811
    p = Peer("tcp", segment, frame_timeout=0.5)
    yield p
    p.close()


def _authed(address):
    s = socket.create_connection(address, timeout=2)
    auth.dial_handshake(s, SECRET, timeout=2)
    return s


def _closed_by_peer(s, timeout=2.0):
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


# ---- the handshake ------------------------------------------------------------------------------
def test_a_hello_of_another_version_is_refused_as_incompatible(tcp):
    s = socket.create_connection(tcp.address, timeout=2)
    try:
        s.sendall(struct.pack("<8sH32s", auth.MAGIC, 99, os.urandom(32)))
        proof = auth.recv_exact(s, struct.calcsize("<8sHB32s32s"), time.monotonic() + 2)
        magic, version, status, _, _ = struct.unpack("<8sHB32s32s", proof)
        assert (magic, version, status) == (auth.MAGIC, auth.VERSION, 1)
        assert _closed_by_peer(s)
    finally:
        s.close()
    assert tcp.resolver.calls == 0
    assert tcp.read([b"page"])[0] == [None]


class FakeHolder:
    """A hand-made peer server: authenticates (or not) and answers with ``behave``."""

    def __init__(self, behave, version=auth.VERSION):
        self.behave = behave
        self.version = version
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = ("127.0.0.1", self.listener.getsockname()[1])
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        self.listener.settimeout(0.1)
        while not self.stop:
            try:
                s, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            threading.Thread(target=self._conn, args=(s,), daemon=True).start()

    def _conn(self, s):
        try:
            if self.version != auth.VERSION:
                auth.recv_exact(s, struct.calcsize("<8sH32s"), time.monotonic() + 2)
                s.sendall(struct.pack("<8sHB32s32s", auth.MAGIC, self.version, 0, os.urandom(32), bytes(32)))
                time.sleep(0.5)
                return
            auth.accept_handshake(s, SECRET, timeout=2)
            while True:
                head = auth.recv_exact(s, wire.HEADER_SIZE, time.monotonic() + 5)
                _, length = wire.read_header(head)
                parts = wire.decode_read(auth.recv_exact(s, length, time.monotonic() + 5))
                self.behave(s, parts)
        except Exception:
            pass
        finally:
            s.close()

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.listener.close()


def test_a_peer_speaking_another_version_is_incompatible():
    fake = FakeHolder(None, version=auth.VERSION + 1)
    t = TcpTransport(SECRET)
    try:
        results = t.read(fake.address, [ReadOp(b"k", 0, 10, 1)], [bytearray(10)], 2.0)
        assert isinstance(results[0], PeerIncompatible), results
        assert "protocol" in str(results[0])
    finally:
        t.close()
        fake.close()


# ---- lying peers ------------------------------------------------------------------------------------
def _guarded(size, guard=4096):
    area = bytearray(b"\x5a" * (size + 2 * guard))
    return area, memoryview(area)[guard:guard + size], guard


def _intact(area, size, guard):
    return area[:guard] == b"\x5a" * guard and area[guard + size:] == b"\x5a" * guard


def test_a_peer_claiming_more_bytes_than_asked_fails_the_op_and_writes_nothing():
    def lie(s, parts):
        s.sendall(wire.result_head([(wire.OK, p.part_len + 100) for p in parts]))
        s.sendall(b"\xee" * sum(p.part_len + 100 for p in parts))
    fake = FakeHolder(lie)
    t = TcpTransport(SECRET)
    try:
        area, target, guard = _guarded(5000)
        results = t.read(fake.address, [ReadOp(b"k", 0, 5000, 1)], [target], 2.0)
        assert isinstance(results[0], TransportError) and "protocol" in str(results[0]), results
        assert _intact(area, 5000, guard)
        assert bytes(target) == b"\x5a" * 5000      # nothing written at all
        del target
    finally:
        t.close()
        fake.close()


def test_a_peer_sending_stray_bytes_after_the_answer_is_not_reused():
    def overrun(s, parts):
        s.sendall(wire.result_head([(wire.OK, p.part_len) for p in parts]))
        s.sendall(b"\x11" * sum(p.part_len for p in parts) + b"\xee" * 1000)
    fake = FakeHolder(overrun)
    t = TcpTransport(SECRET)
    try:
        for _ in range(3):
            area, target, guard = _guarded(3000)
            assert t.read(fake.address, [ReadOp(b"k", 0, 3000, 1)], [target], 2.0) == [None]
            assert bytes(target) == b"\x11" * 3000 and _intact(area, 3000, guard)
            del target
            time.sleep(0.05)       # let the stray bytes land in the pooled connection
        assert fake.connections == 3     # each stray-byte link was dropped, never read again
    finally:
        t.close()
        fake.close()


def test_a_peer_closing_mid_answer_fails_the_rest_within_the_timeout():
    def half(s, parts):
        s.sendall(wire.result_head([(wire.OK, p.part_len) for p in parts]))
        s.sendall(b"\x22" * (parts[0].part_len + 10))
        s.close()
    fake = FakeHolder(half)
    t = TcpTransport(SECRET)
    try:
        ops = [ReadOp(b"a", 0, 100, 1), ReadOp(b"b", 0, 100, 1), ReadOp(b"c", 0, 100, 1)]
        bufs = [bytearray(100) for _ in ops]
        results = t.read(fake.address, ops, bufs, 2.0)
        assert results[0] is None and bytes(bufs[0]) == b"\x22" * 100
        assert all(isinstance(r, TransportError) and r.stage == "transfer" for r in results[1:]), results
    finally:
        t.close()
        fake.close()


def test_a_link_closed_under_a_request_is_redialled_once_within_the_call():
    """The pooled link looked alive at checkout, then the peer closed it before answering
    (as a restarting peer does): the read redials once and succeeds."""
    def answer_then_close(s, parts):
        s.sendall(wire.result_head([(wire.OK, p.part_len) for p in parts]))
        s.sendall(b"\x33" * sum(p.part_len for p in parts))
        time.sleep(0.3)               # the reader's next request arrives meanwhile
        raise ConnectionAbortedError  # close with it unread
    fake = FakeHolder(answer_then_close)
    t = TcpTransport(SECRET)
    try:
        buf = bytearray(64)
        assert t.read(fake.address, [ReadOp(b"k", 0, 64, 1)], [buf], 2.0) == [None]
        buf[:] = bytes(64)
        t0 = time.monotonic()
        assert t.read(fake.address, [ReadOp(b"k", 0, 64, 1)], [buf], 2.0) == [None]
        assert bytes(buf) == b"\x33" * 64
        assert time.monotonic() - t0 < 1.0
        assert fake.connections == 2
    finally:
        t.close()
        fake.close()


# ---- hostile readers against a real server ------------------------------------------------------------
def test_a_request_on_an_unauthenticated_link_is_never_served(tcp):
    s = socket.create_connection(tcp.address, timeout=2)
    try:
        s.sendall(wire.read_request([wire.Part(tcp.segment.op(b"page"))]))
        assert _closed_by_peer(s, 5)
    finally:
        s.close()
    assert tcp.resolver.calls == 0


def _garbage(rng, segment):  # noqa: F811
    """One hostile frame: random bytes, a huge length, a wrong type, a truncated or
    corrupted READ."""
    good = wire.read_request([wire.Part(segment.op(b"kb/%d" % rng.randrange(64)))])
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:
        return struct.pack("<IB", rng.choice([0xFFFFFFFF, wire.MAX_READ_PAYLOAD + 1, 1 << 30]), wire.READ)
    if kind == 2:
        return struct.pack("<IB", 8, rng.choice([0, wire.RESULT, 77, 255])) + rng.randbytes(8)
    if kind == 3:
        return good[:rng.randrange(1, len(good))]
    if kind == 4:
        bad = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            bad[rng.randrange(wire.HEADER_SIZE, len(bad))] = rng.randrange(256)
        return bytes(bad)
    n = rng.choice([0, wire.MAX_OPS + 1, 0xFFFFFFFF])
    payload = struct.pack("<I", n) + rng.randbytes(40)
    return struct.pack("<IB", len(payload), wire.READ) + payload


def test_fuzzed_frames_before_and_after_auth_never_stop_the_server(tcp, caplog):
    rng = random.Random(20261130)
    caplog.set_level(logging.WARNING, logger="kvstore.transport.tcp")
    for i in range(300):
        frame = _garbage(rng, tcp.segment)
        if i % 2:
            s = socket.create_connection(tcp.address, timeout=2)
        else:
            s = _authed(tcp.address)
        try:
            s.sendall(frame)
            if i % 3 == 0:
                s.shutdown(socket.SHUT_WR)        # a truncated frame, then EOF
        except OSError:
            pass
        finally:
            s.close()
        if i % 25 == 0:
            results, bufs = tcp.read([b"page", b"kb/7"])
            assert results == [None, None], (i, results)
            assert bytes(bufs[1]) == tcp.segment.expect(b"kb/7")
    time.sleep(0.7)          # truncated frames wait out frame_timeout
    results, bufs = tcp.read([b"big", b"one"])
    assert results == [None, None]
    assert bytes(bufs[0]) == tcp.segment.expect(b"big")
    assert tcp.resolver.settled()
    # a corrupted READ that still decodes names no listed object: served as gone, never from a raw address
    assert tcp.resolver.acquired == tcp.resolver.released
    stats = tcp.server.stats
    assert stats["garbage"] + stats["refused_auth"] > 100, stats
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 6, [r.getMessage() for r in warnings]   # rate-limited, per kind


def test_a_request_over_the_servers_limits_is_refused_and_the_link_stays_up(segment):  # noqa: F811
    p = Peer("tcp", segment, max_ops=4, max_bytes=2 << 20)
    try:
        results, _ = p.read([b"kb/%d" % i for i in range(6)])
        assert all(isinstance(r, TransportError) and "limit" in str(r) for r in results), results
        results, bufs = p.read([b"kb/1", b"kb/2"])
        assert results == [None, None] and bytes(bufs[0]) == segment.expect(b"kb/1")
        assert p.server.stats["connections"] == 1         # the refusal kept the link up
        results, _ = p.read([b"big"])           # 16 MiB, split in 4 MiB parts: still over 2 MiB
        assert isinstance(results[0], TransportError)
        assert p.resolver.calls == 2
    finally:
        p.close()


def test_a_reader_that_vanishes_mid_answer_leaves_no_lease_held(tcp):
    for _ in range(3):
        s = _authed(tcp.address)
        s.sendall(wire.read_request([wire.Part(tcp.segment.op(b"big")), wire.Part(tcp.segment.op(b"kb/1"))]))
        s.recv(100)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # reset
        s.close()
    assert tcp.resolver.settled(5)
    assert tcp.resolver.acquired == tcp.resolver.released == 6
    assert tcp.read([b"page"])[0] == [None]


def test_a_silent_listener_costs_at_most_the_timeout():
    listener = socket.create_server(("127.0.0.1", 0))
    t = TcpTransport(SECRET, connect_timeout=5.0)
    try:
        t0 = time.monotonic()
        results = t.read(listener.getsockname(), [ReadOp(b"k", 0, 10, 1)], [bytearray(10)], 0.5)
        assert isinstance(results[0], PeerUnreachable) and results[0].stage == "connect", results
        assert time.monotonic() - t0 < 1.0
    finally:
        t.close()
        listener.close()


# ---- the fast paths ---------------------------------------------------------------------------------
def test_served_from_a_buffer_when_the_resolver_has_no_file(segment):  # noqa: F811
    p = Peer("tcp", segment, use_buf=True)
    try:
        keys = [b"big", b"tiny"] + [b"kb/%d" % i for i in range(64)] + [b"mb/%d" % i for i in range(4)]
        results, bufs = p.read(keys)
        assert results == [None] * len(keys)
        for k, b in zip(keys, bufs):
            assert bytes(b) == segment.expect(k), k
        assert p.resolver.settled()
    finally:
        p.close()


def test_large_reads_use_several_streams_and_small_ones_one(tcp):
    tcp.read([b"kb/%d" % i for i in range(64)])
    assert tcp.server.stats["connections"] == 1
    results, bufs = tcp.read([b"big"])
    assert results == [None] and bytes(bufs[0]) == tcp.segment.expect(b"big")
    # up to 4 streams (a stream thread that starts late may take a connection another returned)
    assert 2 <= tcp.server.stats["connections"] <= 4
    results, bufs = tcp.read([b"mb/%d" % i for i in range(64)])
    assert results == [None] * 64 and bytes(bufs[63]) == tcp.segment.expect(b"mb/63")
    assert tcp.server.stats["connections"] <= 4      # pooled, not redialled


def test_a_batch_over_max_ops_is_sent_as_several_requests(tcp):
    keys = [b"kb/%d" % (i % 64) for i in range(wire.MAX_OPS + 300)]
    results, bufs = tcp.read(keys)
    assert results == [None] * len(keys)
    assert bytes(bufs[-1]) == tcp.segment.expect(keys[-1])


def test_a_taken_port_is_a_config_error(tcp):
    with pytest.raises(ConfigError, match="in use"):
        TcpServer(tcp.resolver, "127.0.0.1", tcp.address.port, SECRET)


def test_a_short_secret_is_a_config_error(tcp):
    with pytest.raises(ConfigError, match="secret"):
        TcpTransport(b"short")
    with pytest.raises(ConfigError, match="secret"):
        TcpServer(tcp.resolver, "127.0.0.1", 0, b"short")


# ---- the frames themselves ---------------------------------------------------------------------------
def test_wire_round_trip_and_refusals():
    from kvstore.errors import ProtocolError
    parts = [wire.Part(ReadOp(b"a" * 256, 4096, 100, 3), 10, 50), wire.Part(ReadOp(b"k", 0, 7, 1))]
    frame = wire.read_request(parts)
    mtype, length = wire.read_header(frame[:wire.HEADER_SIZE])
    assert (mtype, length) == (wire.READ, len(frame) - wire.HEADER_SIZE)
    back = wire.decode_read(frame[wire.HEADER_SIZE:])
    assert [(p.op, p.part_off, p.part_len) for p in back] == [(p.op, p.part_off, p.part_len) for p in parts]
    payload = frame[wire.HEADER_SIZE:]
    for bad in (payload[:-1], payload + b"x", struct.pack("<I", 0), struct.pack("<I", 0xFFFFFFFF), b"",
                payload[:4] + payload[4:4 + 40] + struct.pack("<H", 0) + payload[4 + 42:]):
        with pytest.raises(ProtocolError):
            wire.decode_read(bad)
    with pytest.raises(ProtocolError):                      # a part outside its object
        wire.read_request([wire.Part(ReadOp(b"k", 0, 10, 1), 5, 6)])
    with pytest.raises(ProtocolError):
        wire.read_header(struct.pack("<IB", 5, 99))
    head = wire.result_head([(wire.OK, 50), (wire.GONE, 3)])
    assert wire.decode_result_head(head, parts) == [(wire.OK, 50), (wire.GONE, 3)]
    for entries in ([(wire.OK, 51), (wire.OK, 7)], [(9, 0), (wire.OK, 7)], [(wire.GONE, wire.MAX_REASON + 1)] * 2):
        with pytest.raises(ProtocolError):
            wire.decode_result_head(wire.result_head(entries), parts)
    with pytest.raises(ProtocolError):                      # a RESULT of another length
        wire.decode_result_head(wire.result_head([(wire.OK, 50)]) + bytes(9), parts)


# ---- small objects copied without a lease (Resolver.peek) ---------------------------------------
class _PeekingResolver:
    """ShmResolver plus peek(): ``verdict`` is what still() answers ("yes", "no"), or
    "gone" to refuse at the peek; counts peeks."""

    def __init__(self, base, verdict):
        self.base, self.verdict, self.peeks = base, verdict, 0

    def resolve(self, op):
        return self.base.resolve(op)

    def peek(self, op):
        self.peeks += 1
        if self.verdict == "gone" or self.base.objects.get(op.key) != (op.offset, op.size, op.incarnation):
            from kvstore.errors import ObjectGoneOnPeer
            raise ObjectGoneOnPeer("not listed")
        return self.base.fd, op.offset, lambda: self.verdict == "yes"


@pytest.mark.parametrize("verdict", ["yes", "no", "gone"])
def test_small_objects_are_copied_without_a_lease_only_while_still_listed(segment, verdict):  # noqa: F811
    """A small whole object the resolver peeks is sent from a copy with no lease; if the
    index changed during the copy (still() False) the server falls back to a leased read,
    so the bytes sent are always the object's; a peek that finds it gone answers GONE."""
    p = Peer("tcp", segment)
    p.server.resolver = resolver = _PeekingResolver(p.resolver, verdict)
    try:
        keys = [b"page", b"tiny", b"one"] + [b"kb/%d" % i for i in range(8)]
        results, bufs = p.read(keys)
        small = [k for k in keys if len(segment.expect(k)) <= 64 << 10]
        assert resolver.peeks == len(small)
        if verdict == "gone":
            assert all(isinstance(r, ObjectGoneOnPeer) for k, r in zip(keys, results) if k in small)
            assert results[keys.index(b"one")] is None        # 1 MiB: leased, not peeked
        else:
            assert results == [None] * len(keys)
            for k, b in zip(keys, bufs):
                assert bytes(b) == segment.expect(k), k
        leased = p.resolver.acquired
        assert leased == (len(keys) if verdict == "no" else len(keys) - len(small))
        assert p.server.stats["copied_unleased"] == (len(small) if verdict == "yes" else 0)
        assert p.resolver.settled()
    finally:
        p.close()
