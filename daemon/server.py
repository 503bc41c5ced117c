"""The per-host daemon: the only writer of the store, and the keeper of every client's life.

Owns: the control socket (one selector loop, every socket non-blocking), the handshake
(HELLO -> WELCOME with the fds of the segment, the published table and the slots file;
a reconnecting client resumes its id and slot), applying what clients send in batches
(every message read in one loop turn is applied in ONE LMDB write transaction, then the
table changes are published, then the seal counters, then the replies go out: see
kvstore.store.objects for why in that order), and the background duties: reclaiming
doomed extents once unheld, the watermark sweep, growing the published table, dropping
clients that hang up or die (their holds, creations and unused arena space), and
settling seal counters a client left ahead of what it sent.

Why one writer: no client ever takes a lock another process waits on, so a client that
is stopped, slow, killed or hostile costs the others nothing but its own holds. The
daemon never waits on a client either: it reads what arrived, answers what it can, and
drops a client that will not read its replies.
Must never: block on one client, die because of what a client sends, touch object
bytes (clients write and read them directly in the segment), or free an extent a hold
table names.
"""

import collections
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import time

import lmdb
import numpy as np

from kvstore import access, protocol, segment, table as table_mod
from kvstore.config import check_group
from kvstore.errors import (DaemonStartError, IndexFull, KVStoreError, ProtocolError, SegmentGone,
                            StoreFull, TransportError, ValueTooLarge)
from kvstore.keys import namespace_prefix
from kvstore.record import State
from kvstore.slots import fence
from kvstore.store import maintenance
from kvstore.store.objects import Contended, NoRoom, SealResult, Store

from . import startup
from .ratelimit import LogLimiter

log = logging.getLogger("kvstore.daemon")

HANDSHAKE_TIMEOUT = 10.0      # seconds a connection may stay without a complete HELLO
MAX_OUTBOX = 1 << 20          # bytes of unread replies before a client is dropped
#: Seconds a FETCH reply may wait for the seals of its pulled blocks before it fails.
POSTED_WAIT = 30.0
IDLE_TICK = 0.05              # seconds between duty checks when nothing is pending
POLL_TICK = 0.0002            # seconds between looks at the seal rings while clients put
POLL_MAX = 0.002              # ... doubling up to this while the looks find nothing
ACTIVE_FOR = 0.02            # ... for this long after the last seal seen
BUSY_TICK = 0.005             # ... while doomed extents wait or usage is over the watermark
SWEEP_EVERY = 0.01            # seconds between watermark checks
LIVENESS_EVERY = 1.0          # seconds between checks of registered clients' pids
RESUME_GRACE = 60             # seconds a live client that lost its connection may resume in
MAX_HANDSHAKING = 256         # connections beyond max_clients that may be mid-handshake
RECV_BYTES = 256 << 10        # most bytes read from one client per loop turn (fairness)
KEYS_PAGE = 512               # keys per KEYS reply
SYNC_PUTS_AT = 0.9            # index map fill at which puts wait for their verdict
TURN_BUDGET = 64              # work units of one client's requests applied per loop turn
MAX_RERUNS = 4               # re-runs of one turn after failed requests, then one by one
SEGMENT_CHECK_EVERY = 2.0     # seconds between checks that the segment file is intact
_NOT_BACK = f"did not come back within {RESUME_GRACE} s"


class _Conn:
    __slots__ = ("sock", "reader", "cid", "pid", "slot", "opened", "outbox", "closing", "bye",
                 "queue", "eof", "ns")

    def __init__(self, sock):
        self.sock, self.reader = sock, protocol.FrameReader()
        self.cid = self.pid = None
        self.ns = b"\x00"             # namespace prefix (kvstore.keys), set at HELLO
        self.slot = -1
        self.opened, self.outbox, self.closing, self.bye = time.monotonic(), bytearray(), None, False
        self.queue = collections.deque()   # requests read, not yet applied (over budget)
        self.eof = None                    # why it hung up, once its queue is done


def _peer_pid(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


class Daemon:
    def __init__(self, cfg):
        self.cfg = cfg
        #: index, segment, table and slots files admit whoever the socket admits
        self.file_mode = access.Access(int(cfg.socket_mode, 8) & 0o666, cfg.group_id())
        self.opened = self.store = self.listener = self._lock_fd = None
        self.selector = selectors.DefaultSelector()
        self.conns = {}
        self.slot_of = {}             # cid -> slot of every registered client
        self.kept = {}                # cid -> (deadline, pid): lost its connection, may resume
        self._carried = []
        self.stopping = False
        self.stop_signal = None           # set by SIGTERM/SIGINT; logged once the loop ends
        self.cluster = None               # daemon.cluster.ClusterNode when cluster or peers is set
        self.started = time.monotonic()
        self._paused_accept = 0.0
        self._limited = LogLimiter(log)   # bad-connection lines: a burst, then counted
        self.segment_trouble = None       # (kind, text) once the segment file was tampered with
        self.nslots = cfg.max_clients + MAX_HANDSHAKING

    # ---- start-up ---------------------------------------------------------------------
    def start(self):
        _raise_fd_limit(self.cfg.max_clients + MAX_HANDSHAKING + 64)
        try:
            check_group(self.cfg)     # before anything is created
            self._lock_fd = startup.check_data_dir(self.cfg)
            startup.check_socket(self.cfg.socket)
            segment.check_memory(self.cfg, segment.segment_name(self.cfg.data_dir))
            o = self.opened = startup.open_store(self.cfg, self.file_mode, self.nslots)
            self.segment, self.slots, self.segment_id = o.segment, o.slots, o.segment_id
            access.apply(self.segment.fd, self.file_mode)   # an adopted one too: this run's group
            self.slot_of = {cid: info.get("slot", -1) for cid, info in maintenance.clients(o.env).items()}
            self.store = Store(o.env, o.table, self._held, o.incarnation)
            self.store.grow_table = self._grow_table
            self.store.default_replicas = self.cfg.replicas
            if self.cfg.namespace_quotas:
                self.store.set_quotas(self.cfg.namespace_quotas,
                                      *(o.records or maintenance.load_records(o.env)))
                log.info("namespace quotas: %s", ", ".join(
                    f"{n or '(default)'}={q}" for n, q in self.cfg.namespace_quotas.items()))
            loaded = o.records if self.cfg.clustered else None   # the cluster announces them
            o.records = None                      # a million keys need not outlive start-up
            self.store.doomed_added = True        # reclaim what the last run left, if anything
            self._psize = o.env.env.stat()["psize"]
            self._sync_puts = None
            self._check_index_fill()
            self._update_high()
            self._listen()
            if self.cfg.clustered:
                self._start_cluster(loaded)
            loaded = None
        except BaseException:
            self._close_resources()
            raise
        startup.warn_if_not_tmpfs(self.cfg)
        log.info("ready: serving on %s (pid %d, %s segment of %d bytes, data dir %s, incarnation %d)",
                 self.cfg.socket, os.getpid(), self.segment.backing, self.segment.size,
                 self.cfg.data_dir, self.store.incarnation)

    def _start_cluster(self, loaded=None):
        """Join the cluster (daemon/cluster.py): its threads serve peers and pull local
        misses; this loop only hands them FETCHes and commits, and sends their replies."""
        from .cluster import ClusterNode
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._posted = collections.deque()
        self.selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self.cluster = ClusterNode(self.cfg, self.cfg.socket, self.segment)
        keys, recs = loaded or maintenance.load_records(self.store.env)   # recovery's, if it read them
        sealed = np.flatnonzero(recs["state"] == State.SEALED) if len(recs) else []
        records = [(keys[i], int(recs["offset"][i]), int(recs["size"][i]), int(recs["checksum"][i]))
                   for i in sealed]
        self.cluster.wake_loop = self._wake
        self.cluster.start(records)
        self.store.observer = self.cluster.observe

    def _wake(self):
        """From a cluster thread: make the loop take a turn now (its seals, its replies)."""
        try:
            self._wake_w.send(b"w")
        except (BlockingIOError, OSError):
            pass                               # already woken (its buffer is full) or closing

    def _post(self, conn, frame, after=(), done=None):
        """From a cluster thread: send frame to conn once every (slot, seal number) in
        after is applied (the blocks a FETCH pulled are then visible to the asker), then
        call done() (in this loop's thread). A reply whose seals are not applied within
        POSTED_WAIT seconds (the pulling client's seals were lost) becomes an error."""
        self._posted.append((conn, frame, tuple(after), done, time.monotonic() + POSTED_WAIT))
        self._wake()

    def _drain_wake(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _deliver_posted(self):
        """At the end of a turn: the posted replies whose seals are applied."""
        applied = self.slots.applied
        waiting = []
        now = time.monotonic()
        while self._posted:
            item = self._posted.popleft()
            conn, frame, after, done, give_up = item
            if any(int(applied[slot]) < seq for slot, seq in after):
                if now < give_up:
                    waiting.append(item)
                    continue
                log.warning("a pulled block was not sealed within %g s; the FETCH fails", POSTED_WAIT)
                frame = protocol.error(TransportError(
                    "the block pulled from another host was not sealed here in time (the daemon's "
                    "internal client lost its seals); retry the get", None, "transfer"))
            fd = conn.sock.fileno() if conn.sock is not None else -1
            if fd >= 0 and self.conns.get(fd) is conn:
                self._send(conn, frame)
            if done is not None:
                done()
        self._posted.extend(waiting)
        return bool(waiting)

    def _held(self):
        return self.slots.held([s for s in self.slot_of.values() if s >= 0])

    def _update_high(self):
        used = [s for s in self.slot_of.values() if s >= 0]
        self.slots.set_high(max(used) + 1 if used else 0)

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
        sock_mode = access.Access(int(self.cfg.socket_mode, 8), self.file_mode.gid)
        try:
            access.apply_path(path, sock_mode)
        except OSError as e:
            s.close()
            raise DaemonStartError(f"cannot give socket {path} its mode and group: {e.strerror}") from None
        if self.file_mode.gid is not None:
            blocked = access.searchable_by(path, self.file_mode.gid)
            if blocked:
                log.warning("members of group %s cannot reach the socket: directory %s is not "
                            "searchable by them (chmod o+x or chgrp it, or choose another --socket)",
                            self.cfg.group, blocked)
        s.listen(128)
        s.setblocking(False)
        self.listener = s
        self.selector.register(s, selectors.EVENT_READ, None)

    def _grow_table(self, entries):
        """Move readers to a larger table: build it complete, then retire the old one."""
        old = self.store.table
        live = old.entries()
        name = segment.segment_name(self.cfg.data_dir)
        gen = old.generation + 1
        cap = table_mod.capacity_for(max(entries, len(live)))
        new = table_mod.TableWriter(startup.shm_path(name, f"table-{self.store.incarnation}-{gen}"), cap, gen)
        new.set_mode(self.file_mode)
        new.fill(live["dlo"], live["dhi"], live["state"], live["flags"], live["offset"], live["size"],
                 live["checksum"], live["creator"])
        self.store.table = self.opened.table = new
        old.retire()
        old.close(unlink=True)
        maintenance.set_meta(self.store.env, table_path=new.path)
        log.info("published table grown to %d buckets (%d objects)", cap, len(live))

    # ---- the loop ---------------------------------------------------------------------
    def run(self):
        """Start, serve until SIGTERM/SIGINT, stop cleanly."""
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            try:
                self.serve()
            finally:
                if self.stop_signal is not None:
                    log.info("received %s; stopping", signal.Signals(self.stop_signal).name)
                self.stop()
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def _on_signal(self, signum, frame):
        # Only set flags: a handler that logs can land inside a log write of the loop
        # itself, and a reentrant write to stderr raises before the flag is set, so the
        # daemon would never stop (seen: a SIGTERM right as a client's departure was logged).
        self.stop_signal = signum
        self.stopping = True

    def serve(self):
        next_liveness = time.monotonic() + LIVENESS_EVERY
        next_segment_check = time.monotonic() + SEGMENT_CHECK_EVERY
        next_sweep = 0.0
        active_until = 0.0
        poll = POLL_TICK
        backlog = False
        slots = self.slots
        while not self.stopping:
            now = time.monotonic()
            if backlog:
                timeout = 0                      # requests left over from the last turn
            elif now < active_until:
                timeout = poll                   # clients are putting: poll their rings
            elif self.store.doomed_added:
                timeout = BUSY_TICK
            else:
                slots.set_asleep(True)           # about to sleep: clients ring the doorbell
                fence()
                timeout = 0 if self._rings_waiting() else IDLE_TICK
            events = self.selector.select(timeout)
            slots.set_asleep(False)
            batch, closing = [], []
            for key, ev in events:
                if key.data is None:
                    self._accept()
                elif key.data is _WAKE:
                    self._drain_wake()
                else:
                    self._service(key.data, ev, batch, closing)
            backlog = self._take_requests(batch, closing)
            self.store.full_at = float("inf")
            batch, tails = self._with_rings(batch)
            if tails:                            # seals keep coming: look again soon
                active_until = time.monotonic() + ACTIVE_FOR
                poll = POLL_TICK
            else:                                # a quiet look: look less often
                poll = min(poll * 2, POLL_MAX)
            if batch:
                self._apply(batch)
            for slot, tail in tails.items():
                slots.consumed(slot, tail)
            if self.cluster is not None and self._posted and self._deliver_posted():
                active_until = time.monotonic() + ACTIVE_FOR   # a reply waits for a seal: poll
                poll = POLL_TICK
            for conn in closing:
                self._close(conn, conn.closing)
            now = time.monotonic()
            if self._paused_accept and now >= self._paused_accept:
                self._paused_accept = 0.0
                self.selector.register(self.listener, selectors.EVENT_READ, None)
            if self.store.doomed_added:
                self._duty(self._reclaim)
            if now >= next_sweep:
                next_sweep = now + SWEEP_EVERY
                self._duty(self._sweep_watermark)
            if now >= next_segment_check:
                next_segment_check = now + SEGMENT_CHECK_EVERY
                self._duty(self._check_segment)
            if now >= next_liveness:
                next_liveness = now + LIVENESS_EVERY
                self._limited.flush()
                self._duty(self._check_liveness, now)

    def _rings_waiting(self):
        """Whether some client has seals the daemon has not applied (sent > applied)."""
        sent, applied = self.slots.sent, self.slots.applied
        return bool((sent > applied).any())

    def _with_rings(self, batch):
        """This turn's requests with each client's seal ring put first: a client writes
        its seals into its ring before anything it sends later (a RETURN of the arena
        they lie in, a DELETE), so its ring is read after its socket and applied before.
        Rings of registered clients that are not connected (a daemon restarted while a
        client was stopped) are drained too. A client whose ``sent`` is ahead of an
        empty ring (it raised its own counter) is levelled at once, so no reader waits
        for seals that never come. Returns (batch, {slot: ring tail to consume})."""
        sent, applied = self.slots.sent, self.slots.applied
        ringing = set(np.flatnonzero(sent > applied).tolist())
        ringing.update(c.slot for c, _, _ in batch if c.slot >= 0)
        if not ringing:
            return batch, {}
        tails, first, seen = {}, [], set()
        by_slot = {c.slot: c for c in self.conns.values() if c.cid is not None and not c.closing}
        for cid, slot in list(self.slot_of.items()):   # _close may drop a client
            if slot not in ringing:
                continue
            conn = by_slot.get(slot) or _Ghost(cid, slot)
            claimed = int(sent[slot])             # read before the ring (see slots.py)
            data, tail = self.slots.drain(slot)
            seen.add(slot)
            if data is None:
                if conn.sock is not None:
                    conn.closing = "corrupt seal ring"
                    self._close(conn, conn.closing)
                else:
                    self.slots.consumed(slot, tail)
                continue
            if data:
                first.append((conn, protocol.SEAL, data))
                tails[slot] = tail
            elif claimed > int(applied[slot]):
                applied[slot] = claimed           # nothing in its ring: nothing to wait for
        for slot in ringing - seen:               # not a registered client's slot
            if int(sent[slot]) > int(applied[slot]):
                applied[slot] = sent[slot]
        return first + batch, tails

    def _warn(self, kind, msg, *args):
        """A warning, rate-limited per kind (daemon/ratelimit.py: a few per 10 s, then
        one line with the count suppressed), so a flood of bad connections cannot flood
        the log."""
        self._limited(kind, logging.WARNING, msg, *args)

    def _check_segment(self):
        """Whether the segment's file is still what clients map (fstat and stat only: the
        daemon never touches the segment's memory, so a truncated file cannot SIGBUS it).
        Logs each new finding once at ERROR with what to do. Truncated: new clients are
        refused (SegmentGone) and no space is granted any more, since every write or read
        of the cut-off part raises SIGBUS in the client; the objects are lost and only a
        restart (a new, empty segment) helps. Unlinked or replaced: the open file still
        works, so everyone keeps being served, but the next start cannot adopt it."""
        if self.segment_trouble is not None and self.segment_trouble[0] == "truncated":
            return self.segment_trouble
        found = segment.watch(self.segment)
        if found is None or found == self.segment_trouble:
            return self.segment_trouble
        self.segment_trouble = found
        kind, what = found
        n = maintenance.stats(self.store.env)["objects"]
        if kind == "truncated":
            log.error("the segment %s %s by another process while the daemon runs: its %d objects "
                      "are lost, and clients touching the cut-off part get SIGBUS. New clients are "
                      "refused (SegmentGone) and no new space is granted. Restart the daemon: it "
                      "starts a new, empty segment", self.segment.path, what, n)
        else:
            log.error("the segment %s %s while the daemon runs (a clean-up of %s?). The daemon and "
                      "its clients keep using the open file, so nothing is lost yet, but the next "
                      "start cannot adopt it and begins empty (its %d objects are lost then); its "
                      "memory stays in use until then. Restart the daemon when losing them is "
                      "acceptable, and keep other processes away from the segment file",
                      self.segment.path, what, os.path.dirname(self.segment.path), n)
        return found

    def _refuse_if_truncated(self):
        if self._check_segment() is not None and self.segment_trouble[0] == "truncated":
            raise SegmentGone(f"the store's segment {self.segment.path} "
                              f"{self.segment_trouble[1]} by another process; its objects are "
                              f"lost. Restart the daemon (it starts a new, empty segment)")

    def _duty(self, fn, *args):
        """Run a background duty; a failure is logged (rate-limited), never fatal."""
        try:
            fn(*args)
        except Exception as e:
            self._warn("duty-" + fn.__name__, "%s failed: %s (the daemon keeps serving)",
                       fn.__name__.strip("_"), e)

    def _accept(self):
        for _ in range(64):       # drain the backlog, a bounded batch per wake-up
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE/ENFILE: out of fds; stop accepting for a moment
                if e.errno in (errno.EMFILE, errno.ENFILE) and not self._paused_accept:
                    self._warn("fds", "out of file descriptors; pausing accept for 0.1 s")
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

    def _service(self, conn, events, batch, closing):
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
        if not events & selectors.EVENT_READ or conn.sock.fileno() < 0 or conn.closing:
            return
        if conn.queue or conn.eof:
            return                      # over its budget: read more once its queue is done
        try:
            data = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        try:
            for mtype, body in conn.reader.feed(data):
                if mtype == protocol.HELLO:
                    self._hello(conn, body)
                elif conn.cid is None:
                    raise ProtocolError("the first message must be HELLO")
                elif mtype not in protocol.CLIENT_TYPES:
                    raise ProtocolError(f"unexpected message type {mtype} from a client")
                else:
                    conn.queue.append((mtype, body))
        except ProtocolError as e:
            self._warn("protocol", "dropping connection from pid %s: %s",
                       conn.pid or _safe_peer_pid(conn.sock), e)
            self._send(conn, protocol.error(e))
            conn.closing = "protocol error"
            closing.append(conn)
            return
        except KVStoreError as e:
            self._send(conn, protocol.error(e))
            if conn.cid is None:        # a refused HELLO: the connection has no more use
                conn.closing = "refused"
                closing.append(conn)
                return
        except OSError as e:            # the peer went away mid-reply (e.g. during send_fds)
            conn.closing = f"gone mid-reply ({e.strerror or e})"
            closing.append(conn)
            return
        if not data:
            conn.eof = "disconnected"       # closed once what it sent before is applied

    def _take_requests(self, batch, closing):
        """Each client's queued requests, up to its budget for this turn (expensive ones
        cost more), so one client cannot hold a turn with a flood of work. Returns
        whether some client still has requests waiting."""
        waiting = False
        for conn in list(self.conns.values()):
            q = conn.queue
            budget = TURN_BUDGET
            while q and budget > 0:
                mtype, body = q.popleft()
                budget -= _COST.get(mtype, 1)
                batch.append((conn, mtype, body))
            if q:
                waiting = True
            elif conn.eof and not conn.closing:
                conn.closing = conn.eof
                closing.append(conn)
        return waiting

    # ---- handshake ----------------------------------------------------------------------
    def _hello(self, conn, body):
        if conn.cid is not None:
            raise ProtocolError("second HELLO on one connection")
        _, namespace, resume = protocol.read_hello(body)
        self._refuse_if_truncated()     # a fresh fstat: no client maps a truncated file
        if sum(1 for c in self.conns.values() if c.cid is not None) >= self.cfg.max_clients:
            raise ProtocolError(f"the daemon already serves max_clients={self.cfg.max_clients} clients")
        conn.pid = _peer_pid(conn.sock)
        self._carried = []
        cid = self._resumable(resume, conn.pid)
        conn.queue.extend(self._carried)
        self._carried = []
        self.kept.pop(cid, None)
        if cid is None:
            slot = self._free_slot()
            if slot is None:
                raise ProtocolError("no free client slot; too many registered clients")
            self.slots.scrub(slot)
            cid = maintenance.register_client(self.store.env, conn.pid, namespace, slot)
            self.slot_of[cid] = slot
            self._update_high()
        else:
            self._limited("reconnected", logging.INFO, "client %d (pid %d) reconnected", cid, conn.pid)
        conn.cid, conn.slot = cid, self.slot_of[cid]
        conn.ns = namespace_prefix(namespace)
        t = self.store.table
        frame = protocol.welcome(cid=cid, slot=conn.slot, segment_size=self.segment.size,
                                 backing=self.segment.backing, segment_id=self.segment_id,
                                 slots=self.slots.describe(), incarnation=self.store.incarnation,
                                 table_generation=t.generation,
                                 quotas=self.store.quotas is not None,
                                 cluster=self.cluster is not None,
                                 replicas=self.cfg.replicas if self.cluster is not None else 1)
        socket.send_fds(conn.sock, [frame], [self.segment.fd, t.fd, self.slots.fd])
        log.debug("client %d (pid %d) connected", cid, conn.pid)

    def _free_slot(self):
        used = set(self.slot_of.values())
        for s in range(self.slots.nslots):
            if s not in used:
                return s
        return None

    def _resumable(self, resume, pid):
        """The cid a reconnecting client may keep: same store, same live process, not
        connected already. None: it must register anew."""
        if resume is None or resume[1] != self.segment_id:
            return None
        cid = resume[0]
        info = maintenance.clients(self.store.env).get(cid)
        if info is None or info["pid"] != pid:
            return None
        for old in [c for c in self.conns.values() if c.cid == cid]:
            # the same process again: its old connection (reset on a timeout) is over;
            # what it queued goes first on the new one (applied in a normal turn, after
            # its seal ring), and the registration carries over
            if old.queue:
                self._carried = list(old.queue)
                old.queue.clear()
            old.cid = None
            self._close(old, "superseded by its own reconnection")
        return cid

    # ---- applying requests -----------------------------------------------------------------
    def _apply(self, batch):
        """Apply one loop turn's requests in one transaction; then publish, then the seal
        counters, then the replies (kvstore.store.objects explains the order). A request
        that fails may have changed the transaction half-way (an eviction before a
        StoreFull): the transaction is then abandoned and the turn applied again without
        it, so a refused request changes nothing. If the commit itself fails (the index
        is full), each request is applied on its own, so as many as fit get in; a seal
        that does not is recorded in its client's ``failed`` word."""
        failed = {}
        got = self._apply_together(batch, failed)
        if got is None:
            got = ([], [], {})
            batch = _one_seal_each(batch)     # so the seals that fit get in
            for i, item in enumerate(batch):
                if i in failed:
                    continue
                one = self._apply_together([item], {})
                if one is None:           # this one alone does not fit
                    conn, mtype, body = item
                    if mtype == protocol.SEAL:
                        seq = _last_seq(body)
                        _merge(got, ([], [], {conn.slot: seq}))
                        self.slots.failed[conn.slot] = seq
                    elif mtype != protocol.RETURN:
                        failed[i] = protocol.error(IndexFull(
                            "the index is full; restart the daemon with a larger --index-map-size"))
                    continue
                _merge(got, one)
            self._warn("commit", "the index is full: some requests were refused; restart the "
                       "daemon with a larger --index-map-size")
        replies, after, applied = got
        self._check_index_fill()
        fence()
        for slot, seq in applied.items():
            self.slots.applied[slot] = max(int(self.slots.applied[slot]), seq)
        self.store.sealed_now = set()     # their clients now read them through the table
        for i, reply in failed.items():
            replies.append((batch[i][0], reply))
        for conn, reply in replies:
            self._send(conn, reply)
        for conn, mtype, body in after:
            self._after(conn, mtype, body)
        for conn, _, _ in batch:
            if conn.closing == "protocol error" and conn.sock is not None and conn.sock.fileno() >= 0:
                self._close(conn, conn.closing)

    def _check_index_fill(self):
        """With less than 10% of the index map (or a turn's worth, 2 MiB) left, clients wait
        for each put's verdict (slots.py), so the put that does not fit is the one refused."""
        info = self.store.env.env.info()
        left = info["map_size"] - (info["last_pgno"] + 1) * self._psize
        # one turn can bring a ring's worth of seals (~1 MiB of index): keep that much room
        full = left <= max((1 - SYNC_PUTS_AT) * info["map_size"], 2 << 20)
        if full != self._sync_puts:
            self._sync_puts = full
            self.slots.set_sync_puts(full)
            if full:
                self._warn("fill", "the index is over %d%% of its map; puts now wait for the "
                           "daemon (restart it with a larger --index-map-size)", int(SYNC_PUTS_AT * 100))

    def _apply_together(self, batch, failed):
        """(replies, read-only requests, seal counters) of batch applied in one
        transaction, or None if its commit failed (IndexFull). A request that fails
        before changing anything (most refusals) is just answered with its error; one
        that may have changed the transaction half-way (StoreFull after evicting, an
        internal error) makes the turn run again without it, at most MAX_RERUNS times,
        then each request in a transaction of its own."""
        got = self._apply_rerun(batch, failed, MAX_RERUNS)
        if got is not _Retry:
            return got
        merged = ([], [], {})
        for i, item in enumerate(batch):
            if i in failed:
                continue
            one = {}
            got = self._apply_rerun([item], one, 1 + MAX_RERUNS)
            if got is _Retry:
                failed[i] = protocol.error(StoreFull("the store is too busy to make room now; retry"))
                continue
            if one:
                failed[i] = one[0]
            if got is None:
                return None
            _merge(merged, got)
        return merged

    def _apply_rerun(self, batch, failed, attempts):
        """_apply_once up to ``attempts`` times while it asks to run again; _Retry if it
        still does."""
        for _ in range(attempts):
            got = self._apply_once(batch, failed)
            if got is not _Retry:
                return got
        return _Retry

    def _apply_once(self, batch, failed):
        replies, after, applied = [], [], {}
        try:
            with self.store.batch() as b:
                for i, (conn, mtype, body) in enumerate(batch):
                    if conn.cid is None or i in failed:
                        continue
                    try:
                        reply = self._request(b, conn, mtype, body, applied)
                    except Contended:
                        raise _Retry() from None           # the same turn again, this one too
                    except NoRoom as e:
                        failed[i] = protocol.error(e)      # refused before changing anything
                        continue
                    except StoreFull as e:
                        failed[i] = protocol.error(e)      # it may have evicted before failing
                        raise _Retry() from None
                    except (IndexFull, lmdb.Error):
                        raise                              # the whole turn did not fit
                    except KVStoreError as e:
                        if isinstance(e, ProtocolError):
                            conn.closing = "protocol error"
                        failed[i] = protocol.error(e)      # refused before changing anything
                        continue
                    except Exception as e:                 # a bug of ours: refuse this one only
                        self._warn("internal", "internal error applying %s from client %s: %r",
                                   protocol.NAMES.get(mtype, mtype), conn.cid, e)
                        failed[i] = protocol.error(KVStoreError(
                            f"internal error in the daemon ({type(e).__name__}); the request "
                            f"was refused and nothing changed"))
                        raise _Retry() from None
                    if reply is _AFTER:
                        after.append((conn, mtype, body))
                    elif reply is not None:
                        replies.append((conn, reply))
        except _Retry:
            return _Retry
        except IndexFull:
            return None
        return replies, after, applied

    def _request(self, b, conn, mtype, body, applied):
        store, cid = self.store, conn.cid
        if mtype == protocol.SEAL:
            top = 0
            for seq, key, off, size, csum, flags, replicas in protocol.read_seal(body):
                res = store.seal(b, cid, key, off, size, csum, flags, replicas)
                if res == SealResult.INVALID:
                    self._warn("seal", "client %d (pid %s) sealed %r outside the space granted "
                               "to it; ignored", cid, conn.pid, key)
                top = max(top, seq)
            applied[conn.slot] = max(applied.get(conn.slot, 0), top)
            return None
        if mtype in (protocol.GRANT, protocol.CREATE):
            self._refuse_if_truncated()      # space there would only be written into SIGBUS
        if mtype == protocol.GRANT:
            want, least = protocol.read_grant(body)
            self._check_fits(least)
            off, size = store.grant(b, cid, max(least, min(want, self.segment.size)), least, conn.ns)
            return protocol.granted(off, size)
        if mtype == protocol.RETURN:
            store.give_back(b, cid, protocol.read_give_back(body), protocol.read_give_back_end(body))
            return None
        if mtype == protocol.CREATE:
            key, size, pinned = protocol.read_create(body)
            self._check_fits(size)
            got = store.create(b, cid, key, size, pinned)
            if got.offset is not None:
                return protocol.created(0, got.offset)
            return protocol.created(int(got.existing), 0)
        if mtype == protocol.DOORBELL:
            return None                  # its ring is read every turn anyway
        if mtype == protocol.BYE:
            conn.bye = True              # closing on purpose: forget it at its hang-up
            return None
        if mtype == protocol.RECLAIM:
            maintenance.reclaim(store, b)
            return protocol.done(True)
        if mtype in (protocol.ABORT, protocol.DELETE, protocol.PIN, protocol.DROP):
            key, flag, off = protocol.read_keyed(body, protocol.NAMES[mtype])
            if mtype == protocol.ABORT:
                store.abort(b, cid, key)
                return protocol.done(True)
            if mtype == protocol.DELETE:
                return protocol.done(store.delete(b, key))
            if mtype == protocol.PIN:
                store.set_pinned(b, key, bool(flag))
                return protocol.done(True)
            return protocol.done(store.drop_if_at(b, key, off))
        return _AFTER                    # read-only requests: answered after the commit

    def _check_fits(self, n):
        if n > self.segment.size:
            raise ValueTooLarge(f"{n} bytes can never fit in the {self.segment.size}-byte segment; "
                                f"split the value or start the daemon with a larger --size")

    def _after(self, conn, mtype, body):
        try:
            if mtype == protocol.PING:
                self._send(conn, protocol.encode(protocol.PONG, {}))
            elif mtype == protocol.STATS:
                self._send(conn, protocol.encode(protocol.STATS_REPLY, self._stats()))
            elif mtype == protocol.CHECK:
                problems = maintenance.check(self.store)
                self._send(conn, protocol.encode(protocol.CHECK_REPLY, {"problems": problems[:50]}))
            elif mtype == protocol.KEYS:
                prefix, after, limit = protocol.read_keys(body)
                n = min(max(limit, 1), KEYS_PAGE)
                found = self.store.keys(prefix, after, n + 1)
                more = len(found) > n
                found, size = found[:n], 1
                for i, k in enumerate(found):     # a page fits one message too (512 long
                    size += 2 + len(k)            # keys do not): the client asks for more
                    if size > protocol.MAX_PAYLOAD:
                        found, more = found[:i], True
                        break
                self._send(conn, protocol.keys_reply(found, more))
            elif mtype == protocol.FETCH:
                timeout, keys = protocol.read_fetch(body)
                if self.cluster is None:
                    self._send(conn, protocol.fetched([(protocol.FETCH_MISS, 0, "")] * len(keys)))
                else:
                    self.cluster.fetch_async(keys, timeout, lambda results, after, done=None:
                                             self._post(conn, protocol.fetched(results), after, done))
            elif mtype == protocol.REPLICATE_KEYS:
                copies, keys = protocol.read_replicate_keys(body)
                if self.cluster is None:
                    self._send(conn, protocol.located([False] * len(keys)))
                else:
                    self._send(conn, protocol.located(self.cluster.replicate_keys(keys, copies)))
            elif mtype in (protocol.LOCATE, protocol.DELETE_ALL):
                timeout, keys = protocol.read_key_list(body)
                if self.cluster is None:
                    if mtype == protocol.LOCATE:
                        self._send(conn, protocol.located([self.store.table.find(k) is not None
                                                           for k in keys]))
                    else:
                        self._send(conn, protocol.located([False] * len(keys)))
                else:
                    work = self.cluster.locate_async if mtype == protocol.LOCATE else self.cluster.delete_async
                    work(keys, timeout, lambda frame: self._post(conn, frame))
            elif mtype == protocol.TABLE:
                t = self.store.table
                frame = protocol.encode(protocol.TABLE_REPLY, {"table_generation": t.generation})
                if conn.outbox:                  # the fd must ride on the reply's first byte
                    self._close(conn, "not reading its replies")
                    return
                try:
                    n = socket.send_fds(conn.sock, [frame], [t.fd])
                except BlockingIOError:
                    self._close(conn, "not reading its replies")
                    return
                if n < len(frame):
                    self._send(conn, frame[n:])
        except KVStoreError as e:
            self._send(conn, protocol.error(e))
        except OSError as e:
            conn.closing = f"gone mid-reply ({e.strerror or e})"
            self._close(conn, conn.closing)

    def _stats(self):
        st = maintenance.stats(self.store.env)
        st.update(backing=self.segment.backing, segment_path=self.segment.path, pid=os.getpid(),
                  connected=sum(1 for c in self.conns.values() if c.cid is not None),
                  held_extents=int(len(self._held())), uptime=time.monotonic() - self.started,
                  incarnation=self.store.incarnation, table_buckets=self.store.table.capacity,
                  table_live=self.store.table.live)
        st["segment_problem"] = self.segment_trouble and self.segment_trouble[1]
        if self.cluster is not None:
            st["cluster"] = self.cluster.stats()
        if self.store.quotas is not None:
            st["namespaces"] = self.store.quotas.report()
            st["namespaces_in_use"] = self.store.quotas.in_use()
        return st

    def _send(self, conn, frame):
        if conn.sock is None or conn.sock.fileno() < 0:
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
            cid, conn.cid = conn.cid, None
            if why == "disconnected" and not conn.bye and _alive(conn.pid, cid, self.store.env):
                # lost without BYE (a timeout reset): it reconnects by itself and resumes
                # with its id, slot and holds, within RESUME_GRACE (else it is forgotten)
                self.kept[cid] = (time.monotonic() + RESUME_GRACE, conn.pid)
                # rate-limited: a live process may open and drop connections in a loop
                self._limited("kept", logging.INFO, "client %d (pid %s) lost its connection; kept "
                              "%d s for it to resume", cid, conn.pid, RESUME_GRACE)
                return
            self._drop_client(cid, conn.pid, why)

    def _drop_client(self, cid, pid, why):
        """Forget a client that hung up or died: its holds, its creations, the unused
        space of its arenas, its slot."""
        slot = self.slot_of.get(cid, -1)
        if 0 <= slot < self.slots.nslots and why != "corrupt seal ring":
            data, tail = self.slots.drain(slot)
            if data:                          # seals it wrote before it went: they count
                self._apply([(_Ghost(cid, slot), protocol.SEAL, data)])
                self.slots.consumed(slot, tail)
        self.slot_of.pop(cid, None)
        if 0 <= slot < self.slots.nslots:
            self.slots.scrub(slot)            # its holds go first: nothing it held is in use now
        with self.store.batch() as b:
            creations, freed = maintenance.drop_client(self.store, b, cid)
        self._update_high()
        self.store.doomed_added = True
        line = ("client %d (pid %s) %s: reclaimed %d unsealed objects and %d bytes of unused space",
                cid, pid, why, creations, freed)
        # rate-limited per kind (why, less its detail): a process that opens and drops
        # connections in a loop must not write a line per connection
        self._limited("drop-" + why.split(" (", 1)[0], logging.INFO, *line)

    # ---- background duties ------------------------------------------------------------
    def _reclaim(self):
        with self.store.batch() as b:
            maintenance.reclaim(self.store, b)
        self.store.doomed_added = maintenance.doomed_count(self.store.env) > 0

    def _over_watermark(self):
        return maintenance.used(self.store.env) > self.cfg.high_watermark * self.segment.size

    def _sweep_watermark(self):
        size = self.segment.size
        if not self._over_watermark():
            return
        target = int(self.cfg.low_watermark * size)
        with self.store.batch() as b:
            n = self.store.evict(b, target_used=target)
        if n:
            log.debug("evicted %d objects toward %d of %d bytes", n, target, size)

    def _check_liveness(self, now):
        for conn in list(self.conns.values()):
            if conn.cid is None and now - conn.opened > HANDSHAKE_TIMEOUT:
                self._close(conn, "no HELLO in time")
        by_cid = {c.cid: c for c in self.conns.values() if c.cid is not None}
        for cid, (deadline, pid) in list(self.kept.items()):
            if cid in by_cid:
                del self.kept[cid]
            elif now > deadline:
                del self.kept[cid]
                self._drop_client(cid, pid, _NOT_BACK)
        for cid, info in maintenance.dead_clients(self.store.env).items():
            conn = by_cid.get(cid)
            if conn is not None:        # its process died but a child inherited the socket
                self._close(conn, "died (its socket lives on in a child)")
            else:
                self._drop_client(cid, info["pid"], "is gone")

    # ---- stop -------------------------------------------------------------------------
    def stop(self):
        if self.cluster is not None:          # first: its own client must not see us go
            self.store.observer = None
            self.cluster.close()
            self.cluster = None
        for conn in list(self.conns.values()):
            fd = conn.sock.fileno()
            self.conns.pop(fd, None)
            conn.sock.close()
        seg_path = self.segment.path if getattr(self, "segment", None) else "segment"
        discard = self.cfg.discard_on_exit and self.opened is not None and self.opened.segment is not None
        reserved = self.opened.segment.reserved_pages if discard else 0
        self._close_resources()
        self._limited.flush(force=True)       # every suppressed line is counted somewhere
        if discard:
            startup.remove_files(self.cfg, None)
            if reserved:
                segment.unreserve_huge_pages(reserved)
            log.info("stopped; segment and index discarded (discard_on_exit)")
        elif self.segment_trouble is not None:
            log.error("stopped; the segment %s %s, so the next start begins empty",
                      seg_path, self.segment_trouble[1])
        else:
            log.info("stopped; %s and the index in %s are kept for the next start",
                     seg_path, self.cfg.data_dir)

    def _close_resources(self):
        if self.cluster is not None:
            self.store.observer = None
            self.cluster.close()
            self.cluster = None
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
        if self.opened is not None:
            self.opened.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


_AFTER = object()
_WAKE = object()                 # selector data of the socket cluster threads wake the loop with


#: Work units of a request (others cost 1): whole-store walks, and requests that may evict.
_COST = {protocol.CHECK: TURN_BUDGET, protocol.KEYS: 16, protocol.STATS: 4, protocol.CREATE: 4,
         protocol.GRANT: 4, protocol.TABLE: 8}


def _merge(into, got):
    """Add one application's (replies, read-only requests, seal counters) to ``into``."""
    into[0].extend(got[0])
    into[1].extend(got[1])
    for slot, seq in got[2].items():
        into[2][slot] = max(into[2].get(slot, 0), seq)


def _one_seal_each(batch):
    """batch with every SEAL message split into one message per seal."""
    out = []
    for conn, mtype, body in batch:
        if mtype != protocol.SEAL:
            out.append((conn, mtype, body))
            continue
        try:
            items = protocol.read_seal(body)
        except ProtocolError:
            out.append((conn, mtype, body))
            continue
        out += [(conn, mtype, protocol.seal_item(*it[:2], *it[2:])) for it in items]
    return out


class _Ghost:
    """Stands for a registered client that is not connected (its ring is still drained)."""
    __slots__ = ("cid", "pid", "slot", "closing", "sock")

    def __init__(self, cid, slot):
        self.cid, self.slot, self.pid, self.closing, self.sock = cid, slot, "?", None, None


class _Retry(Exception):
    """Abandon this turn's transaction and apply the turn again (a request failed)."""


def _last_seq(body):
    try:
        return max(item[0] for item in protocol.read_seal(body))
    except ProtocolError:
        return 0


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


def _alive(pid, cid, env):
    """Whether the process of a registered client still runs (pid not reused)."""
    info = maintenance.clients(env).get(cid)
    return info is not None and maintenance.pid_start_time(pid) == info.get("start")


def _safe_peer_pid(sock):
    try:
        return _peer_pid(sock)
    except OSError:
        return "?"


def destroy_store(cfg):
    """Remove a stopped store (``kvstore-daemon --destroy``)."""
    startup.destroy_store(cfg)
