"""The peer-transport contract (kvstore.transport.base), run against every implementation.

A real Resolver serves a real segment file in /dev/shm (a dict key -> extent and
incarnation, with read leases counted); the TCP server runs in this process for the plain
cases and in a separate process for the kill and restart cases. Run as a script
(``python tests/test_transport_contract.py serve ...``) this file is that server process.
"""

import json
import mmap
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from kvstore.errors import (InvalidSize, ObjectGoneOnPeer, PeerAuthFailed, PeerUnreachable,
                            TransferTimeout, TransportError)
from kvstore.transport import open_server, open_transport
from kvstore import checksum
from kvstore.transport.base import PIECE, PeerAddr, ReadOp, Resolver, Served, pieces_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = b"contract-test-secret-0123456789ab"
OTHER_SECRET = b"another-secret-entirely-987654321"
KINDS = ["loopback", "tcp"]
INCARNATION = 7
MiB = 1 << 20


# ---- a tiny real segment and its resolver -----------------------------------------------------
def shm_path(tag):
    return f"/dev/shm/kvstore-test-transport-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Segment:
    """A file in /dev/shm holding objects at 4 KiB-aligned offsets."""

    def __init__(self, path, layout, seed=1, fill=None):
        self.path = path
        self.objects = {}
        at = 4096          # nothing at offset 0, so offset 0 is always a wrong extent
        for key, size in layout:
            self.objects[key] = (at, size, INCARNATION)
            at += -(-size // 4096) * 4096
        self.size = at
        rng = random.Random(seed)
        with open(path, "wb") as f:
            f.truncate(self.size)
            for key, (off, size, _) in self.objects.items():
                f.seek(off)
                f.write(bytes([fill]) * size if fill is not None else rng.randbytes(size))

    def op(self, key, **change):
        off, size, inc = self.objects[key]
        return ReadOp(key, off, size, inc)._replace(**change)

    def expect(self, key):
        off, size, _ = self.objects[key]
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), size, off)

    def table(self):
        return {k.hex(): list(v) for k, v in self.objects.items()}

    def remove(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ShmResolver(Resolver):
    """Resolves ops against the segment's table; counts calls and read leases."""

    def __init__(self, path, objects, use_buf=False):
        self.fd = os.open(path, os.O_RDONLY)
        self.objects = objects
        self.map = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ) if use_buf else None
        self.lock = threading.Lock()
        self.calls = self.acquired = self.released = self.active = 0

    def resolve(self, op):
        with self.lock:
            self.calls += 1
        if self.objects.get(op.key) != (op.offset, op.size, op.incarnation):
            raise ObjectGoneOnPeer(f"no sealed object {op.key!r} at {op.offset}+{op.size} in incarnation "
                                   f"{op.incarnation}")
        with self.lock:
            self.acquired += 1
            self.active += 1
        done = []

        def release():
            with self.lock:
                assert not done, "a lease released twice"
                done.append(1)
                self.released += 1
                self.active -= 1
        if self.map is not None:
            return Served(-1, op.offset, op.size, release, self.map)
        return Served(self.fd, op.offset, op.size, release)

    def settled(self, timeout=5.0):
        """True once every lease handed out was released (the server may finish after the reader)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if self.active == 0 and self.acquired == self.released:
                    return True
            time.sleep(0.01)
        return False

    def close(self):
        if self.map is not None:
            self.map.close()
        os.close(self.fd)


LAYOUT = ([(b"tiny", 1), (b"page", 4096), (b"one", MiB), (b"big", 16 * MiB), (b"plus1", MiB + 1),
           (b"odd", 5 * MiB + 12345)]
          + [(b"mb/%d" % i, MiB) for i in range(64)] + [(b"kb/%d" % i, 4096) for i in range(64)])


@pytest.fixture(scope="module")
def segment():
    seg = Segment(shm_path("seg"), LAYOUT)
    yield seg
    seg.remove()


class Peer:
    def __init__(self, kind, segment, secret=SECRET, reader_secret=SECRET, use_buf=None, **server_kw):
        self.kind = kind
        self.segment = segment
        self.resolver = ShmResolver(segment.path, segment.objects,
                                    use_buf=(kind == "loopback") if use_buf is None else use_buf)
        kw = {"host": "127.0.0.1"} if kind == "tcp" else {}
        kw.update(server_kw)
        self.server = open_server(kind, self.resolver, secret=secret, **kw)
        self.transport = open_transport(kind, secret=reader_secret)

    @property
    def address(self):
        return self.server.address

    def read(self, keys_or_ops, timeout=5.0, bufs=None):
        ops = [k if isinstance(k, ReadOp) else self.segment.op(k) for k in keys_or_ops]
        bufs = bufs if bufs is not None else [bytearray(op.size) for op in ops]
        return self.transport.read(self.address, ops, bufs, timeout), bufs

    def close(self):
        self.transport.close()
        self.server.close()
        self.resolver.close()


@pytest.fixture(params=KINDS)
def peer(request, segment):
    p = Peer(request.param, segment)
    yield p
    p.close()


# ---- a TCP server in its own process (for SIGKILL, SIGSTOP and restarts) ---------------------
class ServerProcess:
    def __init__(self, segment, port=0, secret=SECRET):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "serve", segment.path, str(port), secret.hex(),
             json.dumps(segment.table())], stdout=subprocess.PIPE, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))))
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            self.kill()
            raise RuntimeError(f"the server process did not start (said {line!r})")
        self.address = PeerAddr("127.0.0.1", int(line))

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(10)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


def _serve_main(path, port, secret_hex, table):
    from kvstore.transport.tcp import TcpServer
    objects = {bytes.fromhex(k): tuple(v) for k, v in json.loads(table).items()}
    resolver = ShmResolver(path, objects)
    server = TcpServer(resolver, "127.0.0.1", int(port), bytes.fromhex(secret_hex))
    print(server.address.port, flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        time.sleep(3600)


# ---- byte-exact reads ----------------------------------------------------------------------------
@pytest.mark.parametrize("key", [b"tiny", b"page", b"one", b"big"], ids=["1B", "4KiB", "1MiB", "16MiB"])
def test_single_read_is_byte_exact(peer, key):
    results, bufs = peer.read([key])
    assert results == [None]
    assert bytes(bufs[0]) == peer.segment.expect(key)
    assert peer.resolver.settled()
    assert peer.resolver.acquired == peer.resolver.released >= 1


def test_batch_64_x_1MiB_is_byte_exact(peer):
    keys = [b"mb/%d" % i for i in range(64)]
    results, bufs = peer.read(keys)
    assert results == [None] * 64
    for k, b in zip(keys, bufs):
        assert bytes(b) == peer.segment.expect(k), k
    assert peer.resolver.settled()


def test_batch_of_mixed_sizes_is_byte_exact(peer):
    keys = [b"kb/%d" % i for i in range(64)] + [b"tiny", b"big", b"page", b"one"]
    random.Random(3).shuffle(keys)
    results, bufs = peer.read(keys)
    assert results == [None] * len(keys)
    for k, b in zip(keys, bufs):
        assert bytes(b) == peer.segment.expect(k), k


def _read_with_pieces(peer, keys, fail_on=None):
    seen, lock = [], threading.Lock()

    def on_piece(i, off, view):
        if keys[i] == fail_on:
            raise RuntimeError("the caller's hash failed")
        with lock:
            seen.append((i, off, bytes(view), threading.get_ident()))
    ops = [peer.segment.op(k) for k in keys]
    bufs = [bytearray(op.size) for op in ops]
    results = peer.transport.read(peer.address, ops, bufs, 5.0, on_piece=on_piece)
    return results, bufs, seen


def test_on_piece_reports_every_piece_once_as_it_lands(peer):
    """read(..., on_piece=f): f sees each op's pieces (PIECE bytes at multiples of PIECE
    within the object, one piece for a small object) once each, with the bytes that
    landed, and the two-level checksum built from them equals the checksum of the object."""
    keys = [b"big", b"tiny", b"odd", b"plus1", b"one"] + [b"kb/%d" % i for i in range(8)] + [b"mb/%d" % i for i in range(8)]
    results, bufs, seen = _read_with_pieces(peer, keys)
    assert results == [None] * len(keys)
    for i, k in enumerate(keys):
        want = peer.segment.expect(k)
        assert bytes(bufs[i]) == want
        got = sorted((off, data) for j, off, data, _ in seen if j == i)
        assert [(off, len(d)) for off, d in got] == pieces_of(len(want)), k
        assert b"".join(d for _, d in got) == want
        if len(want) <= PIECE:
            digest = checksum._h64(got[0][1])
        else:
            digest = checksum._h64(b"".join(checksum._d64(d) for _, d in got))
        assert digest == checksum.checksum(want), k
    assert peer.resolver.settled()


def test_on_piece_failing_fails_only_its_op(peer):
    keys = [b"page", b"one", b"big", b"kb/1"]
    results, bufs, seen = _read_with_pieces(peer, keys, fail_on=b"one")
    assert isinstance(results[1], TransportError) and "on_piece" in str(results[1])
    assert [results[i] for i in (0, 2, 3)] == [None] * 3
    assert bytes(bufs[2]) == peer.segment.expect(b"big")
    assert peer.transport.read(peer.address, [peer.segment.op(b"page")], [bytearray(4096)], 5.0) == [None]
    assert peer.resolver.settled()


def test_reads_into_slices_of_one_mmap(peer):
    """The daemon reads into slices of its segment: a memoryview of an mmap, not bytearrays."""
    keys = [b"page", b"one", b"kb/1"]
    ops = [peer.segment.op(k) for k in keys]
    area = mmap.mmap(-1, 4 * MiB)
    try:
        view = memoryview(area)
        bufs, at = [], 4096
        for op in ops:
            bufs.append(view[at:at + op.size])
            at += op.size + 4096
        results = peer.read(ops, bufs=bufs)[0]
        assert results == [None] * 3
        for k, b in zip(keys, bufs):
            assert bytes(b) == peer.segment.expect(k)
        assert bytes(view[:4096]) == bytes(4096)
        del bufs, b, view
    finally:
        area.close()


# ---- errors per op ---------------------------------------------------------------------------------
def test_gone_objects_fail_alone_and_the_rest_of_the_batch_succeeds(peer):
    seg = peer.segment
    ops = [seg.op(b"page"),
           ReadOp(b"no-such-key", seg.objects[b"page"][0], 4096, INCARNATION),   # wrong key
           seg.op(b"one"),
           seg.op(b"kb/3", offset=seg.objects[b"kb/3"][0] + 4096),                # wrong offset
           seg.op(b"kb/4", incarnation=INCARNATION + 1),                          # wrong incarnation
           seg.op(b"big")]
    results, bufs = peer.read(ops)
    for i in (1, 3, 4):
        assert isinstance(results[i], ObjectGoneOnPeer), results[i]
        assert results[i].peer == peer.address
    for i, k in ((0, b"page"), (2, b"one"), (5, b"big")):
        assert results[i] is None
        assert bytes(bufs[i]) == seg.expect(k)
    assert peer.resolver.settled()
    assert peer.resolver.acquired == peer.resolver.released >= 3   # a split read leases per stream
    # the link stays usable after gone objects
    results, bufs = peer.read([b"kb/5"])
    assert results == [None] and bytes(bufs[0]) == seg.expect(b"kb/5")


def test_leases_are_released_after_each_op_and_on_errors(peer):
    keys = [b"kb/%d" % i for i in range(10)]
    ops = [peer.segment.op(k) for k in keys] + [peer.segment.op(b"kb/1", incarnation=1)]
    for _ in range(3):
        results, _ = peer.read(ops)
        assert results[:10] == [None] * 10 and isinstance(results[10], ObjectGoneOnPeer)
        assert peer.resolver.settled()
    assert peer.resolver.acquired == peer.resolver.released == 30
    assert peer.resolver.calls == 33


def test_wrong_buffer_size_is_refused_before_anything_is_sent(peer):
    with pytest.raises(InvalidSize):
        peer.transport.read(peer.address, [peer.segment.op(b"page")], [bytearray(4095)], 1.0)
    with pytest.raises(InvalidSize):
        peer.transport.read(peer.address, [peer.segment.op(b"page")], [bytes(4096)], 1.0)
    assert peer.resolver.calls == 0


# ---- authentication ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["reader", "server"])
def test_a_wrong_secret_on_either_side_reads_nothing(segment, kind, side):
    kw = {"reader_secret": OTHER_SECRET} if side == "reader" else {"secret": OTHER_SECRET}
    p = Peer(kind, segment, **kw)
    try:
        t0 = time.monotonic()
        results, bufs = p.read([b"page", b"one"], timeout=3.0)
        assert all(isinstance(r, PeerAuthFailed) for r in results), results
        assert time.monotonic() - t0 < 3.5
        assert bytes(bufs[0]) == bytes(4096)
        assert p.resolver.calls == 0
    finally:
        p.close()


# ---- unreachable, dead and restarted peers ----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_peer_nobody_serves_is_unreachable_quickly(segment, kind):
    p = Peer(kind, segment)
    address = p.address
    p.server.close()
    try:
        t0 = time.monotonic()
        results = p.transport.read(address, [segment.op(b"page")], [bytearray(4096)], 2.0)
        assert isinstance(results[0], PeerUnreachable), results
        assert results[0].stage == "connect"
        assert time.monotonic() - t0 < 2.5
    finally:
        p.transport.close()
        p.resolver.close()


def _mid_transfer(segment, sig):
    """Start a 256 MiB read from a server process, send it sig once bytes arrive; returns
    (result, elapsed, timeout)."""
    big = Segment(shm_path("huge"), [(b"huge", 256 * MiB)], fill=0xAB)
    server = transport = None
    try:
        server = ServerProcess(big)
        transport = open_transport("tcp", secret=SECRET)
        buf = bytearray(256 * MiB)
        timeout = 2.0
        out = {}

        def reader():
            t0 = time.monotonic()
            out["results"] = transport.read(server.address, [big.op(b"huge")], [buf], timeout)
            out["elapsed"] = time.monotonic() - t0
        t = threading.Thread(target=reader)
        t.start()
        end = time.monotonic() + 5
        # wait for the first bytes of every stream's range (the read is split across streams)
        marks = [p.part_off for g in transport._plan([big.op(b"huge")]) for _, p in g[:1]]
        while time.monotonic() < end and not all(buf[i] for i in marks) and t.is_alive():
            time.sleep(0.0005)
        server.kill(sig)
        t.join(timeout + 5)
        assert not t.is_alive(), "read hung past its timeout"
        if out["results"] == [None]:
            pytest.skip("the whole 256 MiB arrived before the signal (machine too fast for this probe)")
        return out["results"][0], out["elapsed"], timeout
    finally:
        if server is not None:
            server.close()
        if transport is not None:
            transport.close()
        big.remove()


def test_server_sigkilled_mid_transfer_fails_within_the_timeout(segment):
    err, elapsed, timeout = _mid_transfer(segment, signal.SIGKILL)
    assert isinstance(err, TransportError), err
    assert err.stage == "transfer"
    assert elapsed < timeout + 0.5


def test_server_stopped_mid_transfer_times_out_without_hanging(segment):
    err, elapsed, timeout = _mid_transfer(segment, signal.SIGSTOP)
    assert isinstance(err, TransferTimeout), err
    assert err.stage == "transfer"
    assert timeout - 0.2 < elapsed < timeout + 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_a_server_restarted_on_the_same_port_is_read_by_the_same_transport(segment, kind):
    transport = open_transport(kind, secret=SECRET, streams=2)
    server = resolver = None
    try:
        if kind == "tcp":
            server = ServerProcess(segment)
        else:
            resolver = ShmResolver(segment.path, segment.objects, use_buf=True)
            server = open_server(kind, resolver, secret=SECRET)
        address = server.address
        for k in (b"page", b"big"):      # pools one connection, or several for the split read
            results = transport.read(address, [segment.op(k)], [bytearray(segment.objects[k][1])], 5.0)
            assert results == [None]
        if kind == "tcp":
            server.kill()
            server.close()
            server = ServerProcess(segment, port=address.port)
        else:
            server.close()
            server = open_server(kind, resolver, secret=SECRET, port=address.port)
        assert server.address == address
        for k in (b"page", b"big", b"one"):
            buf = bytearray(segment.objects[k][1])
            results = transport.read(address, [segment.op(k)], [buf], 5.0)
            assert results == [None], results
            assert bytes(buf) == segment.expect(k)
    finally:
        transport.close()
        if server is not None:
            server.close()
        if resolver is not None:
            resolver.close()


# ---- concurrency --------------------------------------------------------------------------------------
def test_read_from_many_threads_at_once(peer):
    keys = [b"kb/%d" % i for i in range(64)] + [b"mb/%d" % i for i in range(8)] + [b"big"]
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(10):
            batch = rng.sample(keys, rng.randint(1, 6))
            results, bufs = peer.read(batch, timeout=10.0)
            for k, r, b in zip(batch, results, bufs):
                if r is not None or bytes(b) != peer.segment.expect(k):
                    errors.append((k, r))
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert peer.resolver.settled()


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "serve":
    _serve_main(*sys.argv[2:])
