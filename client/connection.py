"""A client's link to its daemon: the socket, the handshake, the mappings of one store,
the watchdog that reconnects, fork handling, and the one guard every call passes.

Owns: ``Attachment`` (this process's mappings of one store: the segment read-write for
its own puts, read-only for sealed objects, an fd that tensor views map privately
(client/views.py); the published table; its own slot of holds and seal counters) and
``Connection`` (handshake, request/reply and one-way sends under one lock, the watchdog
thread, reconnection keeping the client's id and slot, or moving to a fresh store).
Outages: a first connect to a socket path that exists waits up to ``reconnect_timeout``
for a restarting daemon (one that does not exist fails at once); while the daemon is
away, calls wait until ``reconnect_timeout`` after the outage began and then fail at
once (``fail_fast``: at once from the start) until the watchdog is back. A segment file
smaller than the daemon says (truncated behind its back) is SegmentGone, never mapped.
Must never: let a call hang (every wait is bounded by ``timeout`` or
``reconnect_timeout``), wait more than once per outage, map a truncated segment, or
let a forked child use its parent's connection.
"""

import logging
import os
import select
import socket
import stat
import threading
import time
import weakref

import numpy as np

from kvstore import protocol
from kvstore.errors import ClientClosed, KVStoreError, SegmentGone, StoreUnavailable
from kvstore.retry import Backoff
from kvstore.slots import ClientSlot
from kvstore.table import TableReader

from . import buffers

log = logging.getLogger("kvstore.client")

_LIVE = weakref.WeakSet()


def _after_fork_in_child():
    for c in list(_LIVE):
        c.orphan_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def connect(sock, path, timeout):
    """connect(), retrying while the daemon's accept backlog is full (EAGAIN)."""
    backoff = Backoff(initial=0.002, cap=0.05, deadline=timeout)
    while True:
        try:
            return sock.connect(path)
        except BlockingIOError:
            if not backoff.sleep():
                raise


def _check_segment_file(fd, size):
    """Raise SegmentGone if the segment file behind fd is smaller than the daemon says:
    truncated behind the store's back (mapping it would fail, and reading past its end
    kills the process with SIGBUS)."""
    try:
        have = os.fstat(fd).st_size
    except OSError:
        have = -1
    if have >= size:
        return
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        path = "the store's shared-memory segment"
    raise SegmentGone(f"{path} holds {max(have, 0)} bytes but the store's segment is {size}: it was "
                      f"truncated behind the daemon's back, and the objects in it are lost; restart "
                      f"the daemon (it starts with a fresh segment), then create a new Client")


class Attachment:
    """This process's mappings of one store, from one WELCOME."""

    def __init__(self, body, seg_fd, table_fd, slots_fd):
        from kvstore.segment import Segment
        self.cid, self.slot_no = body["cid"], body["slot"]
        self.segment_id, self.incarnation = body["segment_id"], body.get("incarnation", 0)
        self.size, self.backing = body["segment_size"], body["backing"]
        self.quotas = bool(body.get("quotas", False))   # pins go by PIN request (writer.put_many)
        self.cluster = bool(body.get("cluster", False))  # local misses are FETCHed from other hosts
        self.default_replicas = int(body.get("replicas", 1) or 1)   # the daemon's --replicas
        _check_segment_file(seg_fd, self.size)
        seg = Segment(seg_fd, self.size, self.backing, "", reused=True)
        try:
            self.rw_map = seg.map(writable=True)
            self.ro_map = seg.map(writable=False)
        except ValueError:          # truncated between the check and the mapping
            _check_segment_file(seg_fd, self.size)
            raise
        self.rw, self.ro = memoryview(self.rw_map), memoryview(self.ro_map)
        base = np.frombuffer(self.ro_map, dtype=np.uint8).ctypes.data
        self.ro_range = (base, base + self.size)
        base = np.frombuffer(self.rw_map, dtype=np.uint8).ctypes.data
        self.rw_range = (base, base + self.size)
        buffers.register_readonly_range(*self.ro_range)   # kept after close: views may outlive us
        self.cow_fd = os.dup(seg_fd)       # tensor views map their pages privately (client/views.py)
        self.table = TableReader(table_fd)
        self.slot = ClientSlot(slots_fd, body["slots"], self.slot_no)

    def new_table(self, fd):
        # the old table is not closed: a lookup in flight may still read it (it is
        # retired, so it re-checks and retries); it is unmapped when unreferenced
        self.table = TableReader(fd)

    def close(self):
        self.slot.close()
        self.table.close()
        if self.cow_fd >= 0:
            os.close(self.cow_fd)
            self.cow_fd = -1
        cache = self.__dict__.get("view_cache")    # released view mappings (client/mapcache.py)
        if cache is not None:
            cache.close()
        # Unmap the segment now unless views handed out still point into it (then it is
        # unmapped when the last of them goes).
        for view in (self.rw, self.ro):
            view.release()
        for m in (self.rw_map, self.ro_map):
            try:
                m.close()
            except BufferError:
                pass


class Connection:
    """The socket to the daemon and the store it attached us to."""

    def __init__(self, owner, socket_path, namespace, timeout, reconnect_timeout, fail_fast=False):
        self.socket_path, self.namespace, self.timeout = socket_path, namespace, timeout
        self.reconnect_timeout = float(reconnect_timeout)
        self.fail_fast = bool(fail_fast)
        self.closed_why = "the client failed to connect"
        self.pid = os.getpid()
        self.down = False              # the daemon hung up and the watchdog is reconnecting
        self.down_since = 0.0
        self._retry_warned = False
        self.generation = 0            # bumped when the client moves to a fresh store
        self.up = threading.Event()
        self.io_lock = threading.Lock()   # one request/reply (or one-way send) at a time
        self.on_fresh_store = []          # callbacks (old attachment) when the store changed
        self.on_resume = []               # callbacks () after reconnecting to the same store
        self.lock = None                  # the client's data lock (set by the owner)
        sock, body, fds = self._handshake(None)
        try:
            self.att = Attachment(body, *fds)
        except BaseException:
            sock.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self.sock = sock
        self.closed_why = None
        self.up.set()
        self._owner = weakref.ref(owner)
        _LIVE.add(self)
        threading.Thread(target=_watch, args=(weakref.ref(self),), daemon=True,
                         name=f"kvstore-watchdog-{self.att.cid}").start()

    # ---- the one guard ------------------------------------------------------------------
    def ready(self):
        """Every public call passes here: raises ClientClosed after close() or fork.
        While the daemon is away (the watchdog reconnects in the background) a call
        waits for it until ``reconnect_timeout`` after the outage began, then raises
        StoreUnavailable; once that is past, every call raises at once until the
        watchdog is back (a long outage costs callers one wait, not one per call).
        With ``fail_fast`` a call never waits: it raises at once while the daemon is away."""
        if self.down:
            left = 0.0 if self.fail_fast else self.down_since + self.reconnect_timeout - time.monotonic()
            if not (left > 0 and self.up.wait(left)) and self.down and self.closed_why is None:
                away = time.monotonic() - self.down_since
                raise StoreUnavailable(
                    f"the daemon at {self.socket_path} has been unreachable for {away:.1f} s; this "
                    f"client keeps reconnecting in the background, and until it is back calls fail "
                    f"at once. Start the daemon, or give the Client a longer reconnect_timeout")
        if self.closed_why is not None:
            raise ClientClosed(f"this client is closed ({self.closed_why}); create a new Client")

    def check_open(self):
        if self.closed_why is not None:
            raise ClientClosed(f"this client is closed ({self.closed_why}); create a new Client")

    # ---- handshake -------------------------------------------------------------------------
    def _handshake(self, resume):
        """Connect and say HELLO; returns (socket, WELCOME body, [segment, table, slots fds]).

        A first connect (``resume`` None) to a socket path that exists keeps trying for up
        to ``reconnect_timeout`` seconds while the daemon is restarting (a stale socket
        refusing, the socket briefly gone while the new daemon replaces it, a connection
        dropped mid-handshake). A socket path that does not exist fails at once: nothing
        says a daemon will ever come there. A resume (the watchdog) tries once."""
        path = self.socket_path
        first = resume is None
        if first:
            try:
                is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
            except FileNotFoundError:
                raise StoreUnavailable(f"no kvstore daemon at {path}: the socket does not exist; start "
                                       f"one with kvstore-daemon --socket {path}, or give the Client "
                                       f"the daemon's socket (socket_path, or $KVSTORE_SOCKET)") from None
            except OSError as e:
                raise StoreUnavailable(f"cannot reach the daemon's socket {path}: {e.strerror}") from None
            if not is_socket:
                raise StoreUnavailable(f"{path} is not a socket, so no kvstore daemon listens there; "
                                       f"give the Client the daemon's --socket path")
        backoff = Backoff(initial=0.02, cap=0.25, deadline=self.reconnect_timeout if first else None)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                connect(sock, path, self.timeout)
                sock.sendall(protocol.hello(os.getpid(), self.namespace,
                                            None if resume is None else
                                            {"cid": resume[0], "segment_id": resume[1]}))
                mtype, body, fds = protocol.recv_message(sock, with_fds=3)
                break
            except (FileNotFoundError, ConnectionError, BlockingIOError, StoreUnavailable) as e:
                # refused, reset, broken pipe, or closed by a daemon going down: restarting
                sock.close()
                if isinstance(e, KVStoreError) and type(e) is not StoreUnavailable:
                    raise                     # SegmentGone and other typed refusals
                if first and not backoff.expired():
                    backoff.sleep()
                    continue
                if isinstance(e, BlockingIOError):
                    raise StoreUnavailable(f"the daemon at {path} is not accepting connections") from None
                waited = f" for {self.reconnect_timeout} s" if first else ""
                raise StoreUnavailable(f"no kvstore daemon answers at {path}{waited} ({e}); start one "
                                       f"with kvstore-daemon --socket {path}") from None
            except (OSError, KVStoreError) as e:
                sock.close()
                if isinstance(e, KVStoreError):
                    raise
                raise StoreUnavailable(f"cannot talk to the daemon at {path}: {e}") from None
        if mtype != protocol.WELCOME or len(fds) != 3:
            sock.close()
            for fd in fds:
                os.close(fd)
            raise StoreUnavailable(f"{path} did not answer like a kvstore daemon of this version")
        return sock, body, fds

    # ---- talking ------------------------------------------------------------------------------
    def request(self, frame, expect, with_fds=0):
        """One request/reply exchange. A lost or late reply resets the connection (the
        watchdog reconnects): a late reply would otherwise answer the next request."""
        with self.io_lock:
            self.check_open()
            sock = self.sock
            try:
                return protocol.request(sock, frame, expect, with_fds)
            except (OSError, KVStoreError) as e:
                if isinstance(e, KVStoreError) and not isinstance(e, StoreUnavailable) \
                        and not isinstance(e, protocol.ProtocolError):
                    raise                      # a typed refusal: the exchange completed
                self._reset(sock)
                raise StoreUnavailable(f"lost the daemon at {self.socket_path}: {e}") from None

    def send(self, frame):
        """A one-way message (seals, returns)."""
        with self.io_lock:
            self.check_open()
            sock = self.sock
            try:
                sock.sendall(frame)
            except OSError as e:
                self._reset(sock)
                raise StoreUnavailable(f"lost the daemon at {self.socket_path}: {e}") from None

    def _reset(self, sock):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def refresh_table(self):
        """Map the daemon's current published table (ours was retired)."""
        body, fds = self.request(protocol.encode(protocol.TABLE, {}), protocol.TABLE_REPLY, with_fds=1)
        try:
            if fds:
                self.att.new_table(fds[0])
        finally:
            for fd in fds:
                os.close(fd)

    # ---- reconnection --------------------------------------------------------------------------
    def went_away(self):
        self.up.clear()
        self.down = True
        self.down_since = time.monotonic()
        self._retry_warned = False
        log.warning("kvstore daemon at %s went away; reconnecting", self.socket_path)

    def reconnect_once(self):
        """One reconnection attempt (the watchdog retries). Same store: the client keeps
        its id, slot and holds, and re-sends seals not yet applied. A fresh store: what
        it held, was creating or had in flight went with the old one. True once done."""
        att = self.att
        try:
            sock, body, fds = self._handshake((att.cid, att.segment_id))
        except Exception:
            return self.closed_why is not None
        try:
            with self.lock, self.io_lock:
                if self.closed_why is not None:
                    sock.close()
                    return True
                old_sock, self.sock = self.sock, sock
                old_sock.close()
                if body["cid"] != att.cid or body["segment_id"] != att.segment_id:
                    self.att = Attachment(body, *fds)
                    self.generation += 1
                    for cb in self.on_fresh_store:
                        cb(att)
                    att.close()
                    log.warning("the daemon came back with a fresh store (or without this "
                                "client's registration): earlier holds and creations are gone")
                else:
                    att.new_table(fds[1])
                    att.quotas = bool(body.get("quotas", False))   # the restarted daemon's
                    att.cluster = bool(body.get("cluster", False))
                    att.default_replicas = int(body.get("replicas", 1) or 1)
            if body["cid"] == att.cid and body["segment_id"] == att.segment_id:
                for cb in self.on_resume:
                    cb()
        except Exception as e:               # e.g. the store changed again under us: retry
            sock.close()
            if not self._retry_warned:        # once per outage, not once per attempt
                self._retry_warned = True
                log.log(logging.ERROR if isinstance(e, SegmentGone) else logging.WARNING,
                        "reconnecting to %s failed (%s); retrying", self.socket_path, e)
            return False
        finally:
            for fd in fds:
                os.close(fd)
        self.down = False
        self.up.set()
        log.info("reconnected to %s after %.2f s", self.socket_path, time.monotonic() - self.down_since)
        return True

    # ---- end of life ---------------------------------------------------------------------------
    def orphan_after_fork(self):
        if self.closed_why is None:
            self.closed_why = f"it was created in process {self.pid} before a fork"
            try:
                self.sock.close()       # only the child's copy: the daemon must see the parent's EOF
            except OSError:
                pass

    def close(self):
        """Disconnect (the caller gave its holds and arena back first). Idempotent."""
        if self.closed_why is not None:
            return
        self.closed_why = "close() was called"
        self.up.set()                   # callers waiting for the daemon: stop waiting
        with self.io_lock:
            if not self.down:
                try:
                    self.sock.settimeout(min(self.timeout, 1.0))
                    self.sock.sendall(protocol.bye())
                except OSError:
                    pass
            self.sock.close()
        self.att.close()
        self.on_fresh_store.clear()     # no cycles through the writer and reader
        self.on_resume.clear()


def _watch(ref):
    """Watchdog thread of one client: sleeps in poll() on its control socket and, when
    the daemon hangs up, retries the connection until it is back or the client closes.
    Holds only a weak reference between polls and attempts, so an unreferenced client
    is still collected (and closed), daemon or no daemon."""
    watched = poller = None
    backoff = Backoff(initial=0.02, cap=0.5)
    while True:
        c = ref()
        if c is None or c.closed_why is not None:
            return
        if c.down:
            done = c.reconnect_once()
            del c
            if not done:
                backoff.sleep()
            continue
        backoff.reset()
        sock = c.sock
        del c
        if sock is not watched:
            poller = select.poll()
            poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            watched = sock
        try:
            events = poller.poll(500)
        except (OSError, ValueError):
            events = []
        c = ref()
        if c is None:
            return
        if events and c.closed_why is None and c.sock is sock:
            c.went_away()
        del c
