"""The TCP peer transport: a holder's TcpServer sends objects of its segment with
os.sendfile; a reader's TcpTransport receives them straight into the caller's buffers.

Owns: both ends of the peer link over TCP (frames in kvstore.transport.wire). The server
accepts in a thread, gives each connection a thread, runs the cluster handshake
(kvstore.cluster.auth.accept_handshake, bounded by ``handshake_timeout``) before it reads
any request, then answers READs: it resolves every part through its Resolver (a read lease
each), sends the status block, then each part's bytes (small ones gathered into one send,
large ones with os.sendfile from ``Served.fd`` on the socket made blocking for the
while, under TCP_CORK for answers of CORK_MIN bytes or more, or from ``Served.buf`` when
there is no file), and releases each lease in a ``finally`` once its bytes left. Every
wait is bounded (``frame_timeout`` for frames, SO_SNDTIMEO and ``send_timeout`` for
answers, ``idle_timeout`` for an idle link), so a stalled reader cannot hold a lease or
a thread for ever; ``max_connections`` bounds the threads. Garbage, truncated or
oversized frames close that connection, logged at WARNING at most once per
``WARN_EVERY`` seconds per kind; a request over ``max_ops``/``max_bytes`` gets a REFUSED
status for each part and the link stays up.

The reader keeps a pool of authenticated connections per peer (a pooled connection that
is readable while idle, i.e. closed by a restarted peer or holding stray bytes, is dropped
at checkout; one that fails before any answer byte is redialled once within the same
deadline). A batch is sent as one READ; batches or objects of at least ``split_min``
bytes are cut into up to ``streams`` contiguous byte ranges (parts of one object
included), each read on its own connection, the first in the calling thread and the rest
in a small thread pool. The whole call is bounded by ``timeout``: every socket operation
gets the time left. ``read`` is thread-safe: threads share the pool, never a connection.

Must never: read a request on a link whose handshake did not succeed; write past a
buffer (every receive targets an exact slice of one); report success for a part whose
bytes did not all arrive; keep a connection whose stream it could not follow; set
SO_RCVBUF (it disables autotuning); let a worker write into a caller's buffer after
``read`` returned (a queued part is cancelled, a running one ends by the deadline).
"""

import concurrent.futures
import errno
import logging
import os
import select
import socket
import struct
import threading
import time

from kvstore.cluster.auth import MIN_SECRET, accept_handshake, dial_handshake
from kvstore.keys import MAX_KEY_BYTES
from kvstore.errors import (ClientClosed, ConfigError, InvalidKey, InvalidSize, ObjectGoneOnPeer,
                            PeerAuthFailed,
                            PeerIncompatible, PeerUnreachable, ProtocolError, TransferTimeout,
                            TransportError)

from . import wire
from .base import PeerAddr, Transport, TransportServer

log = logging.getLogger("kvstore.transport.tcp")

#: Seconds between two WARNING lines of one kind from one server.
WARN_EVERY = 10.0
#: Parts at most this long are gathered and sent together; longer ones go by sendfile.
SMALL_PART = 64 << 10
_GATHER = 256 << 10
#: Answers of at least this many bytes are sent corked (TCP_CORK): full segments.
CORK_MIN = 4 << 20


def _check_secret(secret):
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET:
        raise ConfigError(f"cluster secret: at least {MIN_SECRET} bytes are needed (read it with "
                          f"kvstore.cluster.auth.load_secret from --cluster-secret-file)")
    return bytes(secret)


# ---- the holder's side ----------------------------------------------------------------------
class TcpServer(TransportServer):
    """Serves ReadOps of one segment over TCP to authenticated peers until closed."""

    name = "tcp"

    def __init__(self, resolver, host="127.0.0.1", port=0, secret=None, *, handshake_timeout=2.0,
                 frame_timeout=5.0, send_timeout=10.0, idle_timeout=600.0, max_connections=256,
                 max_ops=wire.MAX_OPS, max_bytes=wire.MAX_BYTES, backlog=128):
        self.secret = _check_secret(secret)
        self.resolver = resolver
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.send_timeout = send_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_ops = min(max_ops, wire.MAX_OPS)
        self.max_bytes = min(max_bytes, wire.MAX_BYTES)
        self.stats = {"connections": 0, "refused_auth": 0, "garbage": 0, "parts": 0, "bytes": 0,
                      "gone": 0, "refused": 0, "failed": 0, "send_failed": 0}
        self._lock = threading.Lock()
        self._conns = set()
        self._closed = False
        self._warned = {}
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ls = socket.socket(family, socket.SOCK_STREAM)
        try:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((host, port))
            ls.listen(backlog)
        except OSError as e:
            ls.close()
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"peer port {host}:{port} is already in use; stop what holds it "
                                  f"or pass another --peer-port (0 picks a free one)") from None
            raise ConfigError(f"cannot listen for peers on {host}:{port} ({e.strerror or e}); "
                              f"check --advertise/--peer-port") from None
        self._listener = ls
        self.address = PeerAddr(host, ls.getsockname()[1])
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"kvstore-peer-accept-{self.address.port}")
        self._thread.start()

    # -- logging and counting
    def _count(self, what, n=1):
        with self._lock:
            self.stats[what] += n

    def _warn(self, kind, message):
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._warned.get(kind, (None, 0))
            if last is not None and now - last < WARN_EVERY:
                self._warned[kind] = (last, suppressed + 1)
                return
            self._warned[kind] = (now, 0)
        more = f" ({suppressed} more like it since the last line)" if suppressed else ""
        log.warning("%s%s", message, more)

    # -- accepting
    def _accept_loop(self):
        while not self._closed:
            try:
                sock, addr = self._listener.accept()
            except OSError as e:
                if self._closed:
                    return
                self._warn("accept", f"peer server {self.address}: accept failed ({e.strerror or e}); "
                                     f"out of file descriptors? raise the daemon's limit (ulimit -n)")
                time.sleep(0.01)
                continue
            with self._lock:
                full = len(self._conns) >= self.max_connections or self._closed
                if not full:
                    self._conns.add(sock)
                    self.stats["connections"] += 1
            if full:
                self._warn("full", f"peer server {self.address}: {self.max_connections} connections "
                                   f"open; refused one from {addr[0]}:{addr[1]} (raise max_connections)")
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock, f"{addr[0]}:{addr[1]}"),
                             name="kvstore-peer-conn", daemon=True).start()

    def _serve(self, sock, peer):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                accept_handshake(sock, self.secret, timeout=self.handshake_timeout, peer=peer)
            except (PeerAuthFailed, PeerIncompatible) as e:
                self._count("refused_auth")
                self._warn("auth", f"peer server {self.address}: refused {peer}: {e}")
                return
            except TransportError as e:
                self._count("refused_auth")
                self._warn("auth", f"peer server {self.address}: handshake with {peer} did not finish "
                                   f"({e}); nothing is served to it (a peer with another secret looks like this)")
                return
            sock.settimeout(self.frame_timeout)     # once: every later wait is bounded by it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,   # for blocking sendfile
                            struct.pack("ll", int(self.send_timeout), int(self.send_timeout % 1 * 1e6)))
            for payload in self._frames(sock):
                self._answer(sock, wire.decode_read(payload), peer)
        except ProtocolError as e:
            self._count("garbage")
            self._warn("garbage", f"peer server {self.address}: closed the link from {peer}: {e}")
        except (OSError, TransportError) as e:
            log.debug("peer server %s: link from %s ended: %s", self.address, peer, e)
        except Exception:  # never let one connection take the server down
            self._warn("bug", f"peer server {self.address}: unexpected failure on the link from {peer}")
            log.debug("details", exc_info=True)
        finally:
            with self._lock:
                self._conns.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _frames(self, sock):
        """The payloads of the READ frames arriving on sock, until it closes cleanly at a
        frame boundary or stays idle for idle_timeout. ProtocolError for anything else;
        a length is checked before anything is allocated for it."""
        buf = bytearray(64 << 10)
        view = memoryview(buf)
        have = 0
        idle_since = time.monotonic()
        while not self._closed:
            need = wire.HEADER_SIZE
            if have >= wire.HEADER_SIZE:
                mtype, length = wire.read_header(buf[:wire.HEADER_SIZE])
                if mtype != wire.READ or length > wire.MAX_READ_PAYLOAD:
                    raise ProtocolError(f"{wire.NAMES[mtype]} frame of {length} bytes "
                                        f"(only READ of at most {wire.MAX_READ_PAYLOAD})")
                need += length
                if have >= need:
                    yield view[wire.HEADER_SIZE:need]
                    buf[:have - need] = buf[need:have]
                    have -= need
                    idle_since = time.monotonic()
                    continue
                if need > len(buf):          # a new buffer: a yielded view may still hold the old
                    bigger = bytearray(need)
                    bigger[:have] = buf[:have]
                    buf, view = bigger, memoryview(bigger)
            try:
                k = sock.recv_into(view[have:])
            except socket.timeout:
                waited = time.monotonic() - idle_since
                if have == 0 and waited < self.idle_timeout:
                    continue
                if have == 0:
                    return               # idle too long: close quietly
                raise ProtocolError(f"frame truncated ({have} of {need} bytes within "
                                    f"{self.frame_timeout:g} s)") from None
            if k == 0:
                if have == 0:
                    return
                raise ProtocolError(f"frame truncated ({have} of {need} bytes, then the link closed)")
            if have == 0:
                idle_since = time.monotonic()
            have += k

    # -- answering
    def _answer(self, sock, parts, peer):
        n = len(parts)
        total = sum(p.part_len for p in parts)
        if n > self.max_ops or total > self.max_bytes:
            why = wire.reason(f"a request of {n} parts and {total} bytes exceeds this holder's limit "
                              f"({self.max_ops} parts, {self.max_bytes} bytes): split it")
            self._count("refused", n)
            self._sendall(sock, [wire.result_head([(wire.REFUSED, len(why))] * n)] + [why] * n,
                          time.monotonic() + self.send_timeout)
            return
        served = [None] * n
        try:
            entries, reasons = [], []
            for i, p in enumerate(parts):
                status, why = wire.OK, b""
                try:
                    s = self.resolver.resolve(p.op)
                    if s.size != p.op.size:
                        self._release(s)
                        raise ObjectGoneOnPeer(f"the object at that extent is {s.size} bytes, not {p.op.size}")
                    served[i] = s
                except ObjectGoneOnPeer as e:
                    status, why = wire.GONE, wire.reason(e)
                    self._count("gone")
                except Exception as e:
                    status, why = wire.FAILED, wire.reason(f"the holder could not resolve it ({type(e).__name__})")
                    self._count("failed")
                    self._warn("resolve", f"peer server {self.address}: resolving {p.op.key!r} failed: {e!r}")
                entries.append((status, p.part_len if status == wire.OK else len(why)))
                if why:
                    reasons.append(why)
            deadline = time.monotonic() + self.send_timeout
            corked = total >= CORK_MIN      # full segments for sendfile, flushed at the end
            if corked:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            pending, pending_bytes, pending_idx = [wire.result_head(entries)], 0, []
            for i, p in enumerate(parts):
                s = served[i]
                if s is None:
                    continue
                start = s.offset + p.part_off
                fd = -1 if s.fd is None else s.fd
                if p.part_len <= SMALL_PART:
                    if fd >= 0:
                        data = os.pread(fd, p.part_len, start)
                        if len(data) != p.part_len:
                            raise OSError(errno.EIO, f"segment file shorter than the object at {start}")
                        self._release(s)
                        served[i] = None
                    else:
                        data = memoryview(s.buf).cast("B")[start:start + p.part_len]
                        pending_idx.append(i)
                    pending.append(data)
                    pending_bytes += p.part_len
                    if pending_bytes >= _GATHER:
                        self._sendall(sock, pending, deadline)
                        pending, pending_bytes = [], 0
                        self._release_all(served, pending_idx)
                    continue
                if pending:
                    self._sendall(sock, pending, deadline)
                    pending, pending_bytes = [], 0
                    self._release_all(served, pending_idx)
                if fd >= 0:
                    self._sendfile(sock, fd, start, p.part_len, deadline)
                else:
                    self._sendall(sock, [memoryview(s.buf).cast("B")[start:start + p.part_len]], deadline)
                self._release(s)
                served[i] = None
            pending.extend(reasons)
            self._sendall(sock, pending, deadline)
            if corked:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            self._release_all(served, pending_idx)
            self._count("parts", n)
            self._count("bytes", total)
        except (OSError, TransportError):
            self._count("send_failed")
            raise
        finally:
            for s in served:
                if s is not None:
                    self._release(s)

    def _release(self, s):
        try:
            s.release()
        except Exception as e:
            self._warn("release", f"peer server {self.address}: releasing a read lease failed: {e!r}")

    def _release_all(self, served, idx):
        for i in idx:
            if served[i] is not None:
                self._release(served[i])
                served[i] = None
        idx.clear()

    def _sendall(self, sock, bufs, deadline):
        """Send bufs in order (the socket's own timeout, frame_timeout, bounds each wait)."""
        if len(bufs) == 1 or sum(len(b) for b in bufs) <= 8192:
            bufs = [memoryview(b"".join(bufs))]
        else:
            bufs = [memoryview(b).cast("B") for b in bufs]
        bufs = [b for b in bufs if b.nbytes]
        while bufs:
            if time.monotonic() > deadline:
                raise TransportError("the reader did not take the bytes within send_timeout")
            try:
                k = sock.sendmsg(bufs[:512])
            except socket.timeout:
                continue
            while k:
                if k >= bufs[0].nbytes:
                    k -= bufs[0].nbytes
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][k:]
                    k = 0

    def _sendfile(self, sock, fd, offset, count, deadline):
        """count bytes of fd from offset, by sendfile on the socket made blocking for the
        while (the kernel then waits for room itself, far fewer wakeups than poll and
        retry); SO_SNDTIMEO, set on the link, bounds each wait."""
        out = sock.fileno()
        sock.settimeout(None)
        try:
            while count:
                try:
                    k = os.sendfile(out, fd, offset, count)
                except BlockingIOError:       # SO_SNDTIMEO passed with nothing sent
                    k = None
                if k == 0:
                    raise OSError(errno.EIO, f"segment file ends before offset {offset}")
                if k:
                    offset += k
                    count -= k
                if count and time.monotonic() > deadline:
                    raise TransportError("the reader did not take the bytes within send_timeout")
        finally:
            sock.settimeout(self.frame_timeout)

    def close(self):
        """Stop accepting and end every connection (their threads exit on their own)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        for s in [self._listener] + conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._listener.close()
        self._thread.join(timeout=2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
        self.secret = _check_secret(secret)
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

    # -- connections
    def _checkout(self, peer):
        with self._lock:
            idle = self._pool.get(peer)
            while idle:
                sock = idle.pop()
                try:      # poll, not select: a daemon may hold more than FD_SETSIZE fds
                    poller = select.poll()
                    poller.register(sock, select.POLLIN)
                    readable = poller.poll(0)
                except (OSError, ValueError):
                    readable = True
                if not readable:
                    return sock, True
                sock.close()     # closed by the peer (it restarted) or stray bytes: never reuse
        return None, False

    def _checkin(self, peer, sock):
        with self._lock:
            if not self._closed:
                idle = self._pool.setdefault(peer, [])
                if len(idle) < self.max_idle:
                    idle.append(sock)
                    return
        sock.close()

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
        return sock

    # -- one request on one connection
    @staticmethod
    def _link_error(peer, exc, timeout):
        if isinstance(exc, socket.timeout):
            return TransferTimeout(f"{peer} did not deliver the bytes within {timeout:g} s", peer)
        if isinstance(exc, ProtocolError):
            return TransportError(f"{peer} broke the peer protocol ({exc}); the link was dropped", peer)
        if exc is None:
            return TransportError(f"{peer} closed the link mid-transfer (did its daemon die?)", peer)
        return TransportError(f"the link to {peer} failed mid-transfer ({getattr(exc, 'strerror', None) or exc})",
                              peer)

    def _recv_exact(self, sock, n, deadline):
        buf = bytearray(n)
        self._recv_views(sock, [memoryview(buf)], deadline)
        return buf

    def _recv_views(self, sock, views, deadline):
        """Fill views in order; returns None, or raises _Short(index of the first view not
        completely filled, the cause, whether any byte arrived)."""
        i, off, got_any = 0, 0, False
        nv = len(views)
        while i < nv:
            try:
                _arm(sock, deadline)
                if i + 1 == nv or views[i].nbytes - off >= (1 << 20):
                    k = sock.recv_into(views[i][off:])
                else:
                    k = sock.recvmsg_into([views[i][off:]] + views[i + 1:i + 64])[0]
            except socket.timeout as e:
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
            i, off = i + 1, 0
            while k:
                if k >= views[i].nbytes:
                    k -= views[i].nbytes
                    i += 1
                else:
                    off = k
                    k = 0

    def _exchange(self, sock, peer, chunk, views, results, deadline, timeout):
        """One READ of chunk [(op index, Part)] on sock; fills results. Raises _LinkFailed
        when the connection can no longer be used: the chunk's unfinished parts are failed
        already when any byte of the answer had arrived, else left for a retry."""
        parts = [p for _, p in chunk]
        request = wire.read_request(parts)
        try:
            _arm(sock, deadline)
            sock.sendall(request)
        except (socket.timeout, OSError) as e:
            raise _LinkFailed(self._link_error(peer, e, timeout), False) from None
        try:
            head = self._recv_exact(sock, wire.result_size(len(parts)), deadline)
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
        targets, where = [], []
        for (i, p), (status, _) in zip(chunk, entries):
            if status == wire.OK and p.part_len:
                targets.append(views[i][p.part_off:p.part_off + p.part_len])
                where.append(i)
        try:
            self._recv_views(sock, targets, deadline)
            nreason = sum(n for status, n in entries if status != wire.OK)
            text = bytes(self._recv_exact(sock, nreason, deadline)) if nreason else b""
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

    def _run_group(self, peer, group, views, results, deadline, timeout):
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
        sock = None
        try:
            sock, reused = self._checkout(peer)
            if sock is None:
                sock = self._dial(peer, deadline)
            for c, chunk in enumerate(chunks):
                try:
                    self._exchange(sock, peer, chunk, views, results, deadline, timeout)
                except _LinkFailed as e:
                    sock.close()
                    sock = None
                    if c == 0 and reused and not e.answered and not isinstance(e.error, TransferTimeout):
                        reused = False            # a stale pooled link: redial once, same deadline
                        sock = self._dial(peer, deadline)
                        try:
                            self._exchange(sock, peer, chunk, views, results, deadline, timeout)
                            continue
                        except _LinkFailed as e2:
                            sock.close()
                            sock = None
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
            if sock is not None:
                self._checkin(peer, sock)

    # -- planning
    def _plan(self, ops):
        """Groups of (op index, Part): one per stream used."""
        total = sum(op.size for op in ops)
        k = 1
        if self.streams > 1 and total >= self.split_min:
            k = max(1, min(self.streams, total // self.part_min))
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

    def read(self, peer, ops, bufs, timeout):
        """Fill bufs[i] with ops[i]'s bytes from peer; one entry per op: None or its error
        (a TransportError, or PeerAuthFailed/PeerIncompatible from the handshake, each
        with ``peer`` and ``stage``). See kvstore.transport.base for the contract."""
        if self._closed:
            raise ClientClosed("this TcpTransport was closed")
        deadline = time.monotonic() + timeout
        if isinstance(peer, str):
            host, _, port = peer.rpartition(":")
            peer = (host.strip("[]"), int(port))
        peer = PeerAddr(*peer)
        ops = list(ops)
        if len(bufs) != len(ops):
            raise InvalidSize(f"read got {len(ops)} ops but {len(bufs)} buffers")
        views = []
        for op, b in zip(ops, bufs):
            v = memoryview(b)
            if v.readonly:
                raise InvalidSize(f"the buffer for {op.key!r} is read-only")
            v = v.cast("B") if v.format != "B" or v.ndim != 1 else v
            if v.nbytes != op.size:
                raise InvalidSize(f"the buffer for {op.key!r} holds {v.nbytes} bytes, the op {op.size}")
            if not isinstance(op.key, (bytes, bytearray)) or not 1 <= len(op.key) <= MAX_KEY_BYTES:
                raise InvalidKey(f"a ReadOp key is 1 to {MAX_KEY_BYTES} bytes, not {op.key!r:.80}")
            views.append(v)
        results = [None] * len(ops)
        if not ops:
            return results
        groups = self._plan(ops)
        if len(groups) == 1:
            self._run_group(peer, groups[0], views, results, deadline, timeout)
            return results
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(2, 2 * self.streams), thread_name_prefix="kvstore-tcp-stream")
            executor = self._executor
        futures = [(g, executor.submit(self._run_group, peer, g, views, results, deadline, timeout))
                   for g in groups[1:]]
        self._run_group(peer, groups[0], views, results, deadline, timeout)
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
        for socks in pool.values():
            for s in socks:
                s.close()
        if executor is not None:
            executor.shutdown(wait=True)


def _arm(sock, deadline, slack=0.005):
    """Make sock's timeout end by the deadline (within slack), changing it (a syscall)
    only when it would end later; an earlier one is re-armed when it fires."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("deadline passed")
    cur = sock.gettimeout()
    if cur is None or cur > left + slack or cur < left - 1.0:
        sock.settimeout(left)


class _Short(Exception):
    def __init__(self, index, cause, got_any):
        super().__init__(str(cause))
        self.index, self.cause, self.got_any = index, cause, got_any


def _fail(results, i, err):
    if results[i] is None:
        results[i] = err
