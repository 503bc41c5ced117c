"""The per-host daemon: owner of the segment and the index, and of every client's life.

Owns: start-up checks (data dir, one daemon per data dir and per socket, memory),
creating the segment and the index or adopting those a previous daemon left (after a
clean stop or a crash: dead clients cleaned up, every checksum verified, corrupt
objects dropped; a fresh store always gets new index files), the control socket
(hello with the segment fd, resuming reconnecting clients, stats, ping), cleaning up
after clients that disconnect or die (their holds released, their unsealed creations
reclaimed), the watermark eviction sweep, and a clean stop on SIGTERM/SIGINT.
Must never: block on one client (all sockets are non-blocking, one selector loop),
die because of what a client sends, or touch object bytes (clients read and write
them directly in the segment).
"""

import errno
import fcntl
import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import time
import uuid

from kvstore import protocol, segment
from kvstore.errors import DaemonStartError, KVStoreError, ProtocolError
from kvstore.index import SCHEMA, Index
from kvstore.keys import user_key

log = logging.getLogger("kvstore.daemon")

HANDSHAKE_TIMEOUT = 10.0      # seconds a connection may stay without a complete HELLO
MAX_OUTBOX = 1 << 20          # bytes of unread replies before a client is dropped
TICK = 0.01                   # seconds between eviction checks
LIVENESS_EVERY = 1.0          # seconds between checks of registered clients' pids
MAX_HANDSHAKING = 256         # connections beyond max_clients that may be mid-handshake


class _Conn:
    __slots__ = ("sock", "reader", "cid", "pid", "opened", "outbox")

    def __init__(self, sock):
        self.sock, self.reader, self.cid, self.pid = sock, protocol.FrameReader(), None, None
        self.opened, self.outbox = time.monotonic(), bytearray()


def _peer_pid(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


class Daemon:
    def __init__(self, cfg):
        self.cfg = cfg
        self.index_path = os.path.join(cfg.data_dir, "index")
        #: index and segment files admit whoever the socket admits (0600 -> 0600, 0660 -> 0660)
        self.file_mode = int(cfg.socket_mode, 8) & 0o666
        self.segment = self.index = self.listener = self._lock_fd = None
        self.selector = selectors.DefaultSelector()
        self.conns = {}
        self.stopping = False
        self.started = time.monotonic()
        self._paused_accept = 0.0
        self._last_duty_error = 0.0

    # ---- start-up ---------------------------------------------------------------------
    def start(self):
        _raise_fd_limit(self.cfg.max_clients + MAX_HANDSHAKING + 64)
        try:
            self._check_data_dir()
            self._check_socket()
            segment.check_memory(self.cfg, segment.segment_name(self.cfg.data_dir))
            self._open_index()
            self._open_segment()
            self._listen()
        except BaseException:
            self._close_resources()
            raise
        fstype = _fs_type(self.cfg.data_dir)
        if fstype not in ("tmpfs", "ramfs"):
            log.warning("data dir %s is on %s: the index is write-mapped, so kernel writeback adds "
                        "millisecond stalls to gets and puts; it needs to outlive processes, not "
                        "reboots, so a tmpfs dir (e.g. /dev/shm/kvstore-data) serves better",
                        self.cfg.data_dir, fstype)
        log.info("ready: serving on %s (pid %d, %s segment of %d bytes, data dir %s)",
                 self.cfg.socket, os.getpid(), self.segment.backing, self.segment.size,
                 self.cfg.data_dir)

    def _check_data_dir(self):
        d = self.cfg.data_dir
        try:
            os.makedirs(d, exist_ok=True)
            probe = os.path.join(d, f".write-probe-{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.unlink(probe)
        except OSError as e:
            raise DaemonStartError(f"data dir {d} is not writable ({e.strerror}); "
                                   f"choose another --data-dir or fix its permissions") from None
        self._lock_fd = os.open(os.path.join(d, "daemon.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            raise DaemonStartError(f"data dir {d} is in use by another daemon (pid {other or '?'}); "
                                   f"stop it or choose another --data-dir") from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)

    def _check_socket(self):
        path = self.cfg.socket
        if not os.path.exists(path):
            if not os.path.isdir(os.path.dirname(path)):
                raise DaemonStartError(f"socket directory {os.path.dirname(path)} does not exist; create it")
            return
        import stat
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise DaemonStartError(f"{path} exists and is not a socket; choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            log.info("removed stale socket %s left by a dead daemon", path)
            return
        except OSError as e:
            raise DaemonStartError(f"socket {path} exists and does not answer like a dead one "
                                   f"({e.strerror or e}); is a daemon still using it?") from None
        finally:
            probe.close()
        raise DaemonStartError(f"socket {path} belongs to a live daemon; stop it or choose another --socket")

    def _open_index(self):
        map_size = self.cfg.index_map_bytes()
        try:
            os.makedirs(self.index_path, exist_ok=True)
            self.index = Index(self.index_path, map_size, create=True,
                               max_readers=self.cfg.max_clients + 64, mode=self.file_mode)
        except (OSError, KVStoreError) as e:
            raise DaemonStartError(f"cannot open the index in {self.index_path} ({e}); "
                                   f"move it away or run kvstore-daemon --destroy --data-dir "
                                   f"{self.cfg.data_dir}") from None
        map_size = self.index.env.info()["map_size"]
        # Reserve the index's disk space now: with LMDB's writemap a full disk would
        # otherwise surface as SIGBUS at run time instead of a clear error here.
        fd = os.open(os.path.join(self.index_path, "data.mdb"), os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, map_size)
        except OSError as e:
            raise DaemonStartError(f"data dir {self.cfg.data_dir} has no room for the "
                                   f"{map_size}-byte index ({e.strerror}); free space or lower index_map_size") from None
        finally:
            os.close(fd)
        self.index_map_size = map_size

    def _open_segment(self):
        name = segment.segment_name(self.cfg.data_dir)
        desc = self.index.describe()
        if desc is not None:
            schema, size, seg_id, path = desc
            seg = segment.reopen(path, size)
            if schema != SCHEMA:
                log.warning("index schema %d is not this daemon's %d; starting empty", schema, SCHEMA)
                if seg is not None:
                    seg.destroy()
            elif seg is None:
                log.warning("segment %s of the previous daemon is gone (reboot?); starting empty", path)
            elif seg.size < self.cfg.size or seg.size - self.cfg.size >= (2 << 20):
                log.warning("size changed from %d to %d bytes; starting empty", seg.size, self.cfg.size)
                seg.destroy()
            else:
                self.segment = seg
                self.segment_id = seg_id
                self._recover(seg_id)
                return
        self._fresh(segment.create(self.cfg, name, self.file_mode))

    def _fresh(self, seg):
        """Describe an empty store in brand-new index files. Never re-initialise the old
        files in place: clients of the old store that have not reconnected yet would
        then write into the new store with ids it may hand to someone else."""
        self.index.close()
        shutil.rmtree(self.index_path, ignore_errors=True)
        self._open_index()
        self.segment = seg
        self.segment_id = uuid.uuid4().hex
        self.index.init_fresh(seg.size, self.segment_id, seg.path)

    def _recover(self, seg_id):
        """Adopt the segment and index a previous daemon left (clean stop or crash)."""
        t0 = time.monotonic()
        dropped = 0
        for cid in self.index.dead_clients():
            self.index.drop_client(cid)
            dropped += 1
        problems = self.index.check()
        if problems:
            log.error("index of segment %s is inconsistent (%s); starting empty", seg_id, problems[0])
            self._fresh(self.segment)
            return
        corrupt = self._verify_checksums()
        st = self.index.stats()
        log.info("recovered %d objects (%d bytes) from %s in %.3f s, checksums verified; %d still "
                 "being created by live clients; cleaned up after %d dead clients",
                 st["objects"] - st["creating"], st["used"], self.segment.path,
                 time.monotonic() - t0, st["creating"], dropped)
        if corrupt:
            log.warning("dropped %d objects whose bytes no longer matched their checksum: %s",
                        len(corrupt), ", ".join(repr(user_key(k)) for k in corrupt[:5]))

    def _verify_checksums(self):
        """Check every sealed object against the checksum recorded at seal; drop those
        that differ, so they are never served. Returns the keys dropped."""
        import xxhash
        m = self.segment.map(writable=False)
        try:
            view = memoryview(m)
            bad = [(k, off) for k, off, size, csum in self.index.sealed_records()
                   if xxhash.xxh3_64_intdigest(view[off:off + size]) != csum]
            view.release()
        finally:
            m.close()
        return [k for k, off in bad if self.index.drop_if_at(k, off)]

    def _listen(self):
        path = self.cfg.socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(path)
        except OSError as e:
            s.close()
            raise DaemonStartError(f"cannot bind socket {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(path, int(self.cfg.socket_mode, 8))
        s.listen(128)
        s.setblocking(False)
        self.listener = s
        self.selector.register(s, selectors.EVENT_READ, None)

    # ---- the loop ---------------------------------------------------------------------
    def run(self):
        """Start, serve until SIGTERM/SIGINT, stop cleanly."""
        # handlers first: a signal arriving once "ready" is logged must stop us cleanly
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            try:
                self.serve()
            finally:
                self.stop()
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def _on_signal(self, signum, frame):
        log.info("received %s; stopping", signal.Signals(signum).name)
        self.stopping = True

    def serve(self):
        next_liveness = time.monotonic() + LIVENESS_EVERY
        while not self.stopping:
            for key, events in self.selector.select(TICK):
                if key.data is None:
                    self._accept()
                else:
                    self._service(key.data, events)
            now = time.monotonic()
            if self._paused_accept and now >= self._paused_accept:
                self._paused_accept = 0.0
                self.selector.register(self.listener, selectors.EVENT_READ, None)
            self._duty(self._sweep_watermark)
            if now >= next_liveness:
                next_liveness = now + LIVENESS_EVERY
                self._duty(self._check_liveness, now)

    def _duty(self, fn, *args):
        """Run a background duty; a failure is logged (once a minute), never fatal."""
        try:
            fn(*args)
        except Exception as e:
            now = time.monotonic()
            if now - self._last_duty_error > 60:
                self._last_duty_error = now
                log.error("%s failed: %s (the daemon keeps serving)", fn.__name__.strip("_"), e)

    def _accept(self):
        for _ in range(64):       # drain the backlog, a bounded batch per wake-up
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE/ENFILE: out of fds; stop accepting for a moment
                if e.errno in (errno.EMFILE, errno.ENFILE) and not self._paused_accept:
                    log.warning("out of file descriptors; pausing accept for 0.1 s")
                    self.selector.unregister(self.listener)
                    self._paused_accept = time.monotonic() + 0.1
                return
            if len(self.conns) >= self.cfg.max_clients + MAX_HANDSHAKING:
                sock.close()      # a connection flood must not exhaust the daemon's fds
                continue
            sock.setblocking(False)
            conn = _Conn(sock)
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _service(self, conn, events):
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
        if not events & selectors.EVENT_READ or conn.sock.fileno() < 0:
            return
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn, "disconnected")
            return
        try:
            for mtype, body in conn.reader.feed(data):
                self._handle(conn, mtype, body)
        except ProtocolError as e:
            log.warning("dropping connection from pid %s: %s", conn.pid or _safe_peer_pid(conn.sock), e)
            self._send(conn, protocol.error(e))
            self._close(conn, "protocol error")
        except KVStoreError as e:
            self._send(conn, protocol.error(e))
        except OSError as e:            # the peer went away mid-reply (e.g. during send_fds)
            self._close(conn, f"gone mid-reply ({e.strerror or e})")
        except Exception:               # a bug of ours: drop this peer, keep serving the rest
            log.exception("internal error serving pid %s; dropping that connection", conn.pid)
            self._close(conn, "internal error")

    def _handle(self, conn, mtype, body):
        if mtype == protocol.HELLO:
            if conn.cid is not None:
                raise ProtocolError("second HELLO on one connection")
            _, namespace, resume = protocol.read_hello(body)
            if sum(1 for c in self.conns.values() if c.cid is not None) >= self.cfg.max_clients:
                raise ProtocolError(f"the daemon already serves max_clients={self.cfg.max_clients} clients")
            conn.pid = _peer_pid(conn.sock)
            conn.cid = self._resumable(resume, conn.pid)
            if conn.cid is None:
                conn.cid = self.index.register_client(conn.pid, namespace)
            else:
                log.info("client %d (pid %d) reconnected", conn.cid, conn.pid)
            frame = protocol.welcome(conn.cid, self.segment.size, self.segment.backing, self.index_path,
                                     self.index_map_size, self.cfg.max_clients + 64, self.segment_id)
            socket.send_fds(conn.sock, [frame], [self.segment.fd])
            log.debug("client %d (pid %d) connected", conn.cid, conn.pid)
        elif conn.cid is None:
            raise ProtocolError("the first message must be HELLO")
        elif mtype == protocol.PING:
            self._send(conn, protocol.encode(protocol.PONG, {}))
        elif mtype == protocol.STATS:
            st = self.index.stats()
            st.update(backing=self.segment.backing, segment_path=self.segment.path, pid=os.getpid(),
                      connected=sum(1 for c in self.conns.values() if c.cid is not None),
                      uptime=time.monotonic() - self.started)
            self._send(conn, protocol.encode(protocol.STATS_REPLY, st))
        else:
            raise ProtocolError(f"unexpected message type {mtype} from a client")

    def _resumable(self, resume, pid):
        """The cid a reconnecting client may keep: same store, same live process, and
        not connected already. None: it must register anew."""
        if resume is None or resume[1] != self.segment_id:
            return None
        cid = resume[0]
        info = self.index.clients().get(cid)
        if info is None or info["pid"] != pid or any(c.cid == cid for c in self.conns.values()):
            return None
        return cid

    def _send(self, conn, frame):
        if conn.sock.fileno() < 0:
            return
        conn.outbox += frame
        self._flush(conn)
        if len(conn.outbox) > MAX_OUTBOX:
            self._close(conn, "not reading its replies")

    def _flush(self, conn):
        try:
            while conn.outbox:
                n = conn.sock.send(conn.outbox)
                del conn.outbox[:n]
        except BlockingIOError:
            pass
        except OSError:
            conn.outbox.clear()
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbox else 0)
        try:
            self.selector.modify(conn.sock, want, conn)
        except (KeyError, ValueError):
            pass

    def _close(self, conn, why):
        fd = conn.sock.fileno()
        if fd >= 0:
            try:
                self.selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            self.conns.pop(fd, None)
            conn.sock.close()
        if conn.cid is not None:
            holds, creations = self.index.drop_client(conn.cid)
            log.info("client %d (pid %d) %s: released %d holds, reclaimed %d unsealed objects",
                     conn.cid, conn.pid, why, holds, creations)
            conn.cid = None

    # ---- background duties ------------------------------------------------------------
    def _sweep_watermark(self):
        size = self.segment.size
        if self.index.used() <= self.cfg.high_watermark * size:
            return
        target = int(self.cfg.low_watermark * size)
        total, deadline = 0, time.monotonic() + 0.005
        while time.monotonic() < deadline:
            n, used = self.index.evict_to(target)
            total += n
            if n == 0 or used <= target:
                break
        if total:
            log.debug("evicted %d objects; used %d of %d bytes", total, used, size)

    def _check_liveness(self, now):
        for conn in list(self.conns.values()):
            if conn.cid is None and now - conn.opened > HANDSHAKE_TIMEOUT:
                self._close(conn, "no HELLO in time")
        by_cid = {c.cid: c for c in self.conns.values() if c.cid is not None}
        for cid, info in self.index.dead_clients().items():
            conn = by_cid.get(cid)
            if conn is not None:        # its process died but a child inherited the socket
                self._close(conn, "died (its socket lives on in a child)")
                continue
            holds, creations = self.index.drop_client(cid)
            log.info("client %d (pid %d) is gone: released %d holds, reclaimed %d unsealed objects",
                     cid, info["pid"], holds, creations)
        try:
            self.index.env.reader_check()
        except Exception:  # reader_check is advisory; never let it stop the daemon
            pass

    # ---- stop -------------------------------------------------------------------------
    def stop(self):
        for conn in list(self.conns.values()):
            fd = conn.sock.fileno()
            self.conns.pop(fd, None)
            conn.sock.close()
        self._close_resources()
        if self.cfg.discard_on_exit and self.segment is not None:
            destroy_store(self.cfg.data_dir, self.segment.path)
            if self.segment.reserved_pages:
                segment.unreserve_huge_pages(self.segment.reserved_pages)
            log.info("stopped; segment and index discarded (discard_on_exit)")
        else:
            log.info("stopped; %s and the index in %s are kept for the next start",
                     self.segment.path if self.segment else "segment", self.cfg.data_dir)

    def _close_resources(self):
        if self.listener is not None:
            try:
                self.selector.unregister(self.listener)
            except (KeyError, ValueError):
                pass
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.cfg.socket)
            except OSError:
                pass
        if self.index is not None:
            self.index.close()
            self.index = None
        if self.segment is not None:
            self.segment.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _raise_fd_limit(want):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass
        if new < want:
            log.warning("file descriptor limit %d is below the %d that max_clients needs", new, want)


def _fs_type(path):
    """File system type of the mount holding path (longest mount-point prefix)."""
    real, best, kind = os.path.realpath(path), "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def _safe_peer_pid(sock):
    try:
        return _peer_pid(sock)
    except OSError:
        return "?"


def destroy_store(data_dir, segment_path=None):
    """Remove a stopped store's segment and index. Refuses while a daemon uses data_dir."""
    lock = os.path.join(data_dir, "daemon.lock")
    if os.path.exists(lock):
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) and segment_path is None:
                raise DaemonStartError(f"a daemon is running on {data_dir}; stop it first") from None
        finally:
            os.close(fd)
    index_path = os.path.join(data_dir, "index")
    if segment_path is None and os.path.exists(os.path.join(index_path, "data.mdb")):
        try:
            idx = Index(index_path, 1 << 20)
            desc = idx.describe()
            idx.close()
            segment_path = desc[3] if desc else None
        except (KVStoreError, OSError):
            segment_path = None           # an unreadable index: fall back to the default names
    if segment_path:
        segment.remove(segment_path)
    else:
        name = segment.segment_name(data_dir)
        segment.remove("/dev/shm/" + name)
        segment.remove(os.path.join("/dev/hugepages", name + ".seg"))
    shutil.rmtree(index_path, ignore_errors=True)
    try:
        os.unlink(lock)
    except OSError:
        pass
