"""The holder's side of the TCP peer transport: TcpServer sends objects of its segment
to authenticated peers with os.sendfile (kvstore.transport.tcp is the reader's side and
re-exports TcpServer).

Owns: the listening socket, one accept thread and one thread per connection, the cluster
handshake (kvstore.cluster.auth.accept_handshake, bounded by ``handshake_timeout``) before
any request is read, and the answers to READs (frames in kvstore.transport.wire): it
copies the small whole objects its Resolver can ``peek`` (no lease), resolves every other
object once (a read lease; the pieces of one object share it), sends the status block,
then each part's bytes (parts up to SMALL_PART copied with pread and gathered into one
send; larger ones by os.sendfile from ``Served.fd``, under TCP_CORK for answers of
CORK_MIN bytes or more; from ``Served.buf`` when there is no file), and releases each
lease in a ``finally`` once its bytes left. After the handshake a link is blocking and
every wait is bounded by the kernel (SO_RCVTIMEO = ``frame_timeout``, SO_SNDTIMEO =
``send_timeout``; an idle link closes after ``idle_timeout``), so a stalled reader cannot
hold a lease or a thread for ever; ``max_connections`` bounds the threads, and one
address may have at most MAX_HANDSHAKING_PER_HOST of them in their handshake (silent
connections from a host without the secret cannot take every slot). Garbage,
truncated or oversized frames close that connection, logged at WARNING at most once per
WARN_EVERY seconds per kind; a request over ``max_ops``/``max_bytes`` gets a REFUSED
status for each part and the link stays up. Counters in ``stats``.
Must never: read a request on a link whose handshake did not succeed; serve bytes a
Resolver did not grant (a request names an object, never an address); keep a lease past
its answer; let one connection's failure stop the server.
"""

import errno
import logging
import os
import socket
import struct
import threading
import time

from kvstore.cluster.auth import MIN_SECRET, accept_handshake
from kvstore.errors import (ConfigError, ObjectGoneOnPeer, PeerAuthFailed, PeerIncompatible,
                            ProtocolError, TransportError)

from . import wire
from .base import PeerAddr, TransportServer

log = logging.getLogger("kvstore.transport.tcp")

#: Seconds between two WARNING lines of one kind from one server.
WARN_EVERY = 10.0
#: Parts at most this long are gathered and sent together; longer ones go by sendfile.
SMALL_PART = 64 << 10
_GATHER = 256 << 10
#: Answers of at least this many bytes are sent corked (TCP_CORK): full segments.
CORK_MIN = 4 << 20
#: Connections one address may have in their handshake at once: a host without the
#: secret cannot take every one of ``max_connections`` with silent connections.
MAX_HANDSHAKING_PER_HOST = 32


def _timeval(seconds):
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


def check_secret(secret):
    """The cluster secret as bytes; ConfigError when it is too short to be one."""
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
        self.secret = check_secret(secret)
        self.resolver = resolver
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.send_timeout = send_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_ops = min(max_ops, wire.MAX_OPS)
        self.max_bytes = min(max_bytes, wire.MAX_BYTES)
        self.stats = {"connections": 0, "refused_auth": 0, "garbage": 0, "parts": 0, "bytes": 0,
                      "gone": 0, "refused": 0, "failed": 0, "send_failed": 0,
                      "copied_unleased": 0, "leased": 0, "objects_sent": 0,
                      "bytes_sent": 0}
        self._lock = threading.Lock()
        self._conns = set()
        self._handshaking = {}        # address -> its connections still in their handshake
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
                crowd = self._handshaking.get(addr[0], 0) >= MAX_HANDSHAKING_PER_HOST
                full = crowd or len(self._conns) >= self.max_connections or self._closed
                if not full:
                    self._conns.add(sock)
                    self._handshaking[addr[0]] = self._handshaking.get(addr[0], 0) + 1
                    self.stats["connections"] += 1
            if crowd:
                self._warn("crowd", f"peer server {self.address}: {addr[0]} has {MAX_HANDSHAKING_PER_HOST} "
                                    f"connections in their handshake; refused one more from it")
                sock.close()
                continue
            if full:
                self._warn("full", f"peer server {self.address}: {self.max_connections} connections "
                                   f"open; refused one from {addr[0]}:{addr[1]} (raise max_connections)")
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock, f"{addr[0]}:{addr[1]}"),
                             name="kvstore-peer-conn", daemon=True).start()

    def _handshook(self, host):
        with self._lock:
            n = self._handshaking.get(host, 0) - 1
            if n > 0:
                self._handshaking[host] = n
            else:
                self._handshaking.pop(host, None)

    def _serve(self, sock, peer):
        host = peer.rsplit(":", 1)[0]
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
            finally:
                self._handshook(host)
            # blocking from here on, each wait bounded by the kernel (SO_RCVTIMEO/SO_SNDTIMEO):
            # no poll before every receive and send, and sendfile waits for room itself
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.frame_timeout))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.send_timeout))
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
            except (socket.timeout, BlockingIOError):       # SO_RCVTIMEO passed
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
            copied = self._copy_small(parts)   # i -> the bytes, or the exception (no lease)
            granted = self._lease([i for i in range(n) if i not in copied], parts)
            for i, p in enumerate(parts):
                status, why = wire.OK, b""
                try:
                    x = copied[i] if i in copied else granted[i]
                    if isinstance(x, BaseException):
                        raise x
                    if i not in copied:
                        served[i] = x
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
                if s is None:                  # copied without a lease, or failed
                    data = copied.get(i)
                    if data is None or isinstance(data, BaseException):
                        continue
                else:
                    start = s.offset + p.part_off
                    fd = -1 if s.fd is None else s.fd
                    if p.part_len > SMALL_PART:
                        if pending:
                            self._sendall(sock, pending, deadline)
                            pending, pending_bytes = [], 0
                            self._release_all(served, pending_idx)
                        if fd >= 0:
                            self._sendfile(sock, fd, start, p.part_len, deadline)
                        else:
                            self._sendall(sock, [memoryview(s.buf).cast("B")[start:start + p.part_len]],
                                          deadline)
                        self._release(s)
                        served[i] = None
                        continue
                    if fd >= 0:
                        data = os.pread(fd, p.part_len, start)
                        if len(data) != p.part_len:
                            raise OSError(errno.EIO, f"segment file shorter than the object at {start}")
                        self._release(s)
                        served[i] = None
                    else:
                        data = memoryview(s.buf).cast("B")[start:start + p.part_len]
                        pending_idx.append(i)
                pending.append(data)           # small parts: gathered into one send
                pending_bytes += p.part_len
                if pending_bytes >= _GATHER:
                    self._sendall(sock, pending, deadline)
                    pending, pending_bytes = [], 0
                    self._release_all(served, pending_idx)
            pending.extend(reasons)
            self._sendall(sock, pending, deadline)
            if corked:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            self._release_all(served, pending_idx)
            self._count("parts", n)
            self._count("bytes", total)
            ok = [p for p, (status, _) in zip(parts, entries) if status == wire.OK]
            self._count("objects_sent", sum(1 for p in ok if p.part_off == 0))
            self._count("bytes_sent", sum(p.part_len for p in ok))
        except (OSError, TransportError):
            self._count("send_failed")
            raise
        finally:
            for s in served:
                if s is not None:
                    self._release(s)

    def _lease(self, idx, parts):
        """{part index: Served or the exception} for the parts idx: each object resolved
        once (in one resolve_many pass when the resolver has it), its pieces sharing the
        one lease, which ends with the last piece's release."""
        objs = {}
        for i in idx:
            objs.setdefault(parts[i].op, []).append(i)
        ops = list(objs)
        leases = None
        if len(ops) > 1 and hasattr(self.resolver, "resolve_many"):
            got = None
            try:
                got = self.resolver.resolve_many(ops)
                if len(got) != len(ops):
                    raise ValueError(f"resolve_many answered {len(got)} of {len(ops)} objects")
                leases = dict(zip(ops, got))
            except Exception as e:
                for x in (got or ()):
                    if x is not None and not isinstance(x, BaseException):
                        self._release(x)
                self._warn("resolve", f"peer server {self.address}: resolve_many failed: {e!r}")
        out = {}
        for op, at in objs.items():
            try:
                s = leases[op] if leases is not None else self.resolver.resolve(op)
            except Exception as e:                 # noqa: BLE001 (that op's status)
                s = e
            if not isinstance(s, BaseException) and s.size != op.size:
                self._release(s)
                s = ObjectGoneOnPeer(f"the object at that extent is {s.size} bytes, not {op.size}")
            if not isinstance(s, BaseException):
                self._count("leased")
            if isinstance(s, BaseException) or len(at) == 1:
                out.update((i, s) for i in at)
                continue
            left, lock = [len(at)], threading.Lock()

            def release(s=s, left=left, lock=lock):
                with lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    s.release()
            out.update((i, s._replace(release=release)) for i in at)
        return out

    def _copy_small(self, parts):
        """{part index: its bytes, or ObjectGoneOnPeer} for the whole small objects the
        resolver lets us copy without a lease (Resolver.peek); the others are left to
        resolve()."""
        peek = getattr(self.resolver, "peek", None)
        out = {}
        if peek is None:
            return out
        for i, p in enumerate(parts):
            op = p.op
            if op.size > SMALL_PART or p.part_off != 0 or p.part_len != op.size:
                continue
            try:
                got = peek(op)
            except ObjectGoneOnPeer as e:
                out[i] = e
                continue
            except Exception:                          # noqa: BLE001 (resolve() decides)
                continue
            if got is None:
                continue
            fd, offset, still = got
            try:
                data = os.pread(fd, op.size, offset)
            except OSError:
                continue
            if len(data) == op.size and still():
                out[i] = data
                self._count("copied_unleased")
        return out

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
            except (socket.timeout, BlockingIOError):       # SO_SNDTIMEO passed
                continue
            while k:
                if k >= bufs[0].nbytes:
                    k -= bufs[0].nbytes
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][k:]
                    k = 0

    def _sendfile(self, sock, fd, offset, count, deadline):
        """count bytes of fd from offset by sendfile on the blocking socket (the kernel
        waits for room itself); SO_SNDTIMEO bounds each wait, the deadline the whole."""
        out = sock.fileno()
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
