"""The TCP peer transport, reader's side: TcpTransport receives objects from peers'
TcpServers (kvstore.transport.tcp_server, re-exported here) straight into the caller's
buffers.

Owns: a pool of authenticated connections per peer (kvstore.cluster.auth.dial_handshake;
TCP_NODELAY; a pooled connection that is readable while idle, i.e. closed by a restarted
peer or holding stray bytes, is dropped at checkout; one that fails before any answer
byte is redialled once within the same deadline), and the reading of a batch: one READ
per batch (frames in kvstore.transport.wire); calls of at least ``split_min`` bytes are
cut into up to ``streams`` contiguous byte ranges (parts of one object included), each
read on its own connection, the first in the calling thread and the rest in a small
thread pool. Each answer's status block arrives first, so the data is scattered
(recvmsg_into) into exact slices of the caller's buffers with no staging copy. The whole
call is bounded by ``timeout``: every socket wait ends by the deadline. ``read`` is
thread-safe: threads share the pool, never a connection.
Must never: write past a buffer (every receive targets an exact slice of one); report
success for a part whose bytes did not all arrive; keep a connection whose stream it could
not follow; set SO_RCVBUF (it disables autotuning); let a worker write into a caller's
buffer after ``read`` returned (a queued range is cancelled, a running one ends by the
deadline).
"""

import concurrent.futures
import os
import select
import socket
import struct
import threading
import time
import weakref

from kvstore.cluster.auth import dial_handshake
from kvstore.errors import (ClientClosed, ConfigError, InvalidKey, ObjectGoneOnPeer,
                            PeerAuthFailed, PeerIncompatible, PeerUnreachable, ProtocolError,
                            TransferTimeout, TransportError)
from kvstore.keys import MAX_KEY_BYTES

from . import wire
from .base import PIECE, PeerAddr, Transport, buffer_views, report_piece
from .tcp_server import TcpServer, check_secret

__all__ = ["TcpServer", "TcpTransport"]


# ---- the reader's side ----------------------------------------------------------------------
class _LinkFailed(Exception):
    """A connection broke during an exchange; ``error`` is what its unfinished parts get,
    ``answered`` whether any byte of the answer had arrived (else a redial may retry)."""

    def __init__(self, error, answered):
        super().__init__(str(error))
        self.error = error
        self.answered = answered


class TcpTransport(Transport):
    """Reads objects from peers' TcpServers. ``streams``: most connections one call uses
    at once (default: the CPUs of this host, at most 4); ``split_min``: a call moving at
    least this many bytes is split across streams, in ranges of at least ``part_min``
    bytes."""

    name = "tcp"

    def __init__(self, secret, streams=None, connect_timeout=1.0, *, handshake_timeout=2.0,
                 split_min=2 << 20, part_min=1 << 20, max_idle=None):
        self.secret = check_secret(secret)
        if streams is None:      # more streams than CPUs only adds contention (measured on 2 CPUs)
            streams = max(1, min(4, os.cpu_count() or 1))
        if streams < 1:
            raise ConfigError(f"streams must be at least 1, not {streams}")
        self.streams = streams
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.split_min = split_min
        self.part_min = max(1, part_min)
        self.max_idle = max_idle if max_idle is not None else 2 * streams
        self._pool = {}
        self._lock = threading.Lock()
        self._executor = None
        self._closed = False
        self._socks = weakref.WeakSet()   # every socket dialed: close() wakes reads blocked on them

    # -- connections
    def _checkout(self, peer):
        with self._lock:
            idle = self._pool.get(peer)
            while idle:
                link = idle.pop()
                try:      # poll, not select: a daemon may hold more than FD_SETSIZE fds
                    poller = select.poll()
                    poller.register(link.sock, select.POLLIN)
                    readable = poller.poll(0)
                except (OSError, ValueError):
                    readable = True
                if not readable:
                    return link, True
                link.sock.close()     # closed by the peer (it restarted) or stray bytes: never reuse
        return None, False

    def _checkin(self, peer, link):
        with self._lock:
            if not self._closed:
                idle = self._pool.setdefault(peer, [])
                if len(idle) < self.max_idle:
                    idle.append(link)
                    return
        link.sock.close()

    def _dial(self, peer, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferTimeout(f"no time left to connect to {peer}", peer, stage="connect")
        try:
            sock = socket.create_connection((peer.host, peer.port), timeout=min(self.connect_timeout, left))
        except ConnectionRefusedError:
            raise PeerUnreachable(f"{peer} refused the connection: is its daemon running, and is "
                                  f"{peer.port} its --peer-port?", peer) from None
        except socket.timeout:
            waited = min(self.connect_timeout, left)
            raise PeerUnreachable(f"connecting to {peer} timed out after {waited:.3g} s: "
                                  f"is the host up and the port reachable?", peer) from None
        except OSError as e:
            raise PeerUnreachable(f"cannot connect to {peer} ({e.strerror or e})", peer) from None
        with self._lock:
            if self._closed:
                sock.close()
                raise PeerUnreachable(f"this transport was closed while connecting to {peer}", peer)
            self._socks.add(sock)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            left = deadline - time.monotonic()
            dial_handshake(sock, self.secret, timeout=max(0.001, min(self.handshake_timeout, left)),
                           peer=str(peer))
        except (PeerAuthFailed, PeerIncompatible) as e:
            sock.close()
            e.peer, e.stage = peer, "connect"
            raise
        except TransportError as e:
            sock.close()
            raise PeerUnreachable(f"{peer} accepted the connection but did not finish the handshake: {e}",
                                  peer) from None
        except OSError as e:
            sock.close()
            raise PeerUnreachable(f"the link to {peer} failed during the handshake ({e})", peer) from None
        sock.settimeout(None)    # blocking: _arm bounds every wait with SO_RCVTIMEO/SO_SNDTIMEO
        return _Link(sock)

    # -- one request on one connection
    @staticmethod
    def _link_error(peer, exc, timeout):
        if isinstance(exc, (socket.timeout, BlockingIOError)):
            return TransferTimeout(f"{peer} did not deliver the bytes within {timeout:g} s", peer)
        if isinstance(exc, ProtocolError):
            return TransportError(f"{peer} broke the peer protocol ({exc}); the link was dropped", peer)
        if exc is None:
            return TransportError(f"{peer} closed the link mid-transfer (did its daemon die?)", peer)
        return TransportError(f"the link to {peer} failed mid-transfer ({getattr(exc, 'strerror', None) or exc})",
                              peer)

    def _recv_exact(self, link, n, deadline):
        buf = bytearray(n)
        self._recv_views(link, [memoryview(buf)], deadline)
        return buf

    def _recv_views(self, link, views, deadline, done=None):
        """Fill views in order; returns None, or raises _Short(index of the first view not
        completely filled, the cause, whether any byte arrived). ``done(j)`` is called as
        soon as views[j] is full (the caller hashes it while the next bytes arrive)."""
        i, off, got_any = 0, 0, False
        nv = len(views)
        sock = link.sock
        while i < nv:
            try:
                _arm(link, deadline)
                if i + 1 == nv or views[i].nbytes - off >= (1 << 20):
                    k = sock.recv_into(views[i][off:])
                else:
                    k = sock.recvmsg_into([views[i][off:]] + views[i + 1:i + 64])[0]
            except (socket.timeout, BlockingIOError) as e:    # SO_RCVTIMEO passed
                if deadline - time.monotonic() > 0:
                    continue         # armed for less than the time left: wait again
                raise _Short(i, e, got_any) from None
            except OSError as e:
                raise _Short(i, e, got_any) from None
            if k == 0:
                raise _Short(i, None, got_any)
            got_any = True
            rest = views[i].nbytes - off
            if k < rest:
                off += k
                continue
            k -= rest
            if done is not None:
                done(i)
            i, off = i + 1, 0
            while k:
                if k >= views[i].nbytes:
                    k -= views[i].nbytes
                    if done is not None:
                        done(i)
                    i += 1
                else:
                    off = k
                    k = 0

    def _exchange(self, link, peer, chunk, views, results, deadline, timeout, on_piece=None):
        """One READ of chunk [(op index, Part)] on link; fills results. Raises _LinkFailed
        when the connection can no longer be used: the chunk's unfinished parts are failed
        already when any byte of the answer had arrived, else left for a retry."""
        parts = [p for _, p in chunk]
        request = wire.read_request(parts)
        try:
            out = memoryview(request)
            while out:                   # send, not sendall: each wait re-armed to the deadline
                _arm(link, deadline)
                out = out[link.sock.send(out):]
        except (socket.timeout, OSError) as e:
            raise _LinkFailed(self._link_error(peer, e, timeout), False) from None
        try:
            head = self._recv_exact(link, wire.result_size(len(parts)), deadline)
            entries = wire.decode_result_head(head, parts)
        except _Short as e:
            err = self._link_error(peer, e.cause, timeout)
            if e.got_any:
                for i, _ in chunk:
                    _fail(results, i, err)
            raise _LinkFailed(err, e.got_any) from None
        except ProtocolError as e:
            err = self._link_error(peer, e, timeout)
            for i, _ in chunk:
                _fail(results, i, err)
            raise _LinkFailed(err, True) from None
        targets, where, parts_at = [], [], []
        for (i, p), (status, _) in zip(chunk, entries):
            if status == wire.OK and p.part_len:
                targets.append(views[i][p.part_off:p.part_off + p.part_len])
                where.append(i)
                parts_at.append(p.part_off)
            elif status == wire.OK and on_piece is not None:     # an empty object: nothing to wait for
                report_piece(on_piece, i, 0, views[i][0:0], results,
                             lambda e: TransportError(f"on_piece failed: {e!r}", peer))
        done = None
        if on_piece is not None:       # each part is one piece (_plan cut them so)
            def done(j):
                report_piece(on_piece, where[j], parts_at[j], targets[j], results,
                             lambda e: TransportError(f"on_piece failed: {e!r}", peer))
        try:
            self._recv_views(link, targets, deadline, done)
            nreason = sum(n for status, n in entries if status != wire.OK)
            text = bytes(self._recv_exact(link, nreason, deadline)) if nreason else b""
        except _Short as e:
            err = self._link_error(peer, e.cause, timeout)
            for j, i in enumerate(where):
                if j >= e.index:
                    _fail(results, i, err)
            for (i, p), (status, _) in zip(chunk, entries):
                if status != wire.OK:
                    _fail(results, i, self._status_error(peer, status, "(reason lost with the link)"))
            raise _LinkFailed(err, True) from None
        at = 0
        for (i, p), (status, n) in zip(chunk, entries):
            if status != wire.OK:
                _fail(results, i, self._status_error(peer, status, text[at:at + n].decode("utf-8", "replace")))
                at += n

    @staticmethod
    def _status_error(peer, status, why):
        if status == wire.GONE:
            return ObjectGoneOnPeer(f"{peer} no longer holds it: {why}", peer)
        if status == wire.REFUSED:
            return TransportError(f"{peer} refused the request: {why}", peer)
        return TransportError(f"{peer} failed to serve it: {why}", peer)

    def _run_group(self, peer, group, views, results, deadline, timeout, on_piece=None):
        """Read a group of parts on one connection, request by request."""
        chunks, chunk, nbytes = [], [], 0
        for item in group:
            if chunk and (len(chunk) >= wire.MAX_OPS or nbytes + item[1].part_len > wire.MAX_BYTES):
                chunks.append(chunk)
                chunk, nbytes = [], 0
            chunk.append(item)
            nbytes += item[1].part_len
        if chunk:
            chunks.append(chunk)
        link = None
        try:
            link, reused = self._checkout(peer)
            if link is None:
                link = self._dial(peer, deadline)
            for c, chunk in enumerate(chunks):
                try:
                    self._exchange(link, peer, chunk, views, results, deadline, timeout, on_piece)
                except _LinkFailed as e:
                    link.sock.close()
                    link = None
                    if c == 0 and reused and not e.answered and not isinstance(e.error, TransferTimeout):
                        reused = False            # a stale pooled link: redial once, same deadline
                        link = self._dial(peer, deadline)
                        try:
                            self._exchange(link, peer, chunk, views, results, deadline, timeout, on_piece)
                            continue
                        except _LinkFailed as e2:
                            link.sock.close()
                            link = None
                            e = e2
                    for later in chunks[c + (1 if e.answered else 0):]:
                        for i, _ in later:
                            _fail(results, i, e.error)
                    return
        except (TransportError, PeerAuthFailed, PeerIncompatible) as e:
            for later in chunks:
                for i, _ in later:
                    _fail(results, i, e)
        finally:
            if link is not None:
                self._checkin(peer, link)

    # -- planning
    def _plan(self, ops, piece=None):
        """Groups of (op index, Part): one per stream used. With ``piece``, every part is
        one piece of its object (at most piece bytes, starting at a multiple of it) and
        the groups are runs of whole pieces of about equal bytes."""
        total = sum(op.size for op in ops)
        k = 1
        if self.streams > 1 and total >= self.split_min:
            k = max(1, min(self.streams, total // self.part_min))
        if piece is not None:
            units = []
            for i, op in enumerate(ops):
                if op.size <= piece:
                    units.append((i, wire.Part(op)))
                else:
                    units += [(i, wire.Part(op, at, min(piece, op.size - at))) for at in range(0, op.size, piece)]
            share = -(-total // k)
            groups, group, nbytes = [], [], 0
            for u in units:
                group.append(u)
                nbytes += u[1].part_len
                if nbytes >= share and len(groups) < k - 1:
                    groups.append(group)
                    group, nbytes = [], 0
            if group:
                groups.append(group)
            return groups
        if k == 1:
            return [[(i, wire.Part(op)) for i, op in enumerate(ops)]]
        share = -(-total // k)
        groups, group, room = [], [], share
        for i, op in enumerate(ops):
            if op.size == 0:
                group.append((i, wire.Part(op, 0, 0)))
                continue
            at = 0
            while at < op.size:
                n = min(op.size - at, room)
                group.append((i, wire.Part(op, at, n)))
                at += n
                room -= n
                if room == 0:
                    groups.append(group)
                    group, room = [], share
        if group:
            groups.append(group)
        return groups

    def read(self, peer, ops, bufs, timeout, on_piece=None):
        """Fill bufs[i] with ops[i]'s bytes from peer; one entry per op: None or its error
        (a TransportError, or PeerAuthFailed/PeerIncompatible from the handshake, each
        with ``peer`` and ``stage``). ``on_piece``: see kvstore.transport.base (each
        piece is reported by the stream that received it, as soon as it is in)."""
        if self._closed:
            raise ClientClosed("this TcpTransport was closed")
        deadline = time.monotonic() + timeout
        if isinstance(peer, str):
            host, _, port = peer.rpartition(":")
            peer = (host.strip("[]"), int(port))
        peer = PeerAddr(*peer)
        ops = list(ops)
        views = buffer_views(ops, bufs)
        for op in ops:
            if not isinstance(op.key, (bytes, bytearray)) or not 1 <= len(op.key) <= MAX_KEY_BYTES:
                raise InvalidKey(f"a ReadOp key is 1 to {MAX_KEY_BYTES} bytes, not {op.key!r:.80}")
        results = [None] * len(ops)
        if not ops:
            return results
        groups = self._plan(ops, PIECE if on_piece is not None else None)
        if len(groups) == 1:
            self._run_group(peer, groups[0], views, results, deadline, timeout, on_piece)
            return results
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(2, 2 * self.streams), thread_name_prefix="kvstore-tcp-stream")
            executor = self._executor
        futures = [(g, executor.submit(self._run_group, peer, g, views, results, deadline, timeout,
                                       on_piece))
                   for g in groups[1:]]
        self._run_group(peer, groups[0], views, results, deadline, timeout, on_piece)
        for g, f in futures:
            try:
                f.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                if f.cancel():
                    err = TransferTimeout(f"no stream to {peer} was free within {timeout:g} s", peer)
                    for i, _ in g:
                        _fail(results, i, err)
                else:
                    f.result()      # running: its sockets time out at the deadline
        return results

    def close(self):
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, {}
            executor, self._executor = self._executor, None
            live = list(self._socks)
        for links in pool.values():
            for link in links:
                link.sock.close()
        for sock in live:             # reads in progress end now, not at their deadline
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if executor is not None:
            executor.shutdown(wait=True)


class _Link:
    """A pooled, authenticated, blocking connection and the kernel timeouts set on it."""

    __slots__ = ("sock", "armed")

    def __init__(self, sock):
        self.sock = sock
        self.armed = None


def _arm(link, deadline, slack=0.005):
    """Make every wait on link end by the deadline (within slack): SO_RCVTIMEO and
    SO_SNDTIMEO, changed (two syscalls) only when they would end later, or much earlier
    (one that ends early fires and is re-armed). No poll before each receive."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("deadline passed")
    cur = link.armed
    if cur is None or cur > left + slack or cur < left - 1.0:
        tv = struct.pack("ll", int(left), int(left % 1 * 1e6) or (0 if int(left) else 1))
        link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        link.armed = left


class _Short(Exception):
    def __init__(self, index, cause, got_any):
        super().__init__(str(cause))
        self.index, self.cause, self.got_any = index, cause, got_any


def _fail(results, i, err):
    if results[i] is None:
        results[i] = err
