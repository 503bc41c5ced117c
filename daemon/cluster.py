"""The daemon's part in the cluster: serving its objects to other hosts, finding and
pulling theirs on a local miss, and keeping location records as a home.

Owns (all on background threads, never on the server loop, which only hands over FETCH
requests and commit events and sends the replies it is given back):
- the peer control server on ``peer_port`` (authenticated links, kvstore.cluster.auth;
  messages in kvstore.cluster.peerwire): LOOKUP answered from this daemon's
  LocationTable, ANNOUNCE and WITHDRAW applied to it, INFO (its incarnation and
  transport port, for static peers), DELETE of keys from the local store;
- the transport server (kvstore.transport, TCP now), whose Resolver serves an object
  only if the published table lists it sealed at the extent asked for, in this run, and
  holds it (a read lease: an ordinary client hold, so eviction and reuse wait) until its
  bytes are sent;
- the announcer: what this daemon seals, evicts or deletes (``observe``, called by the
  store after each commit) goes in batches to each key's homes (kvstore.cluster.directory);
  at start (and after registering again) everything held is announced, and when the
  membership changes each record goes to the homes that lack it (new homes, restarted
  ones), so locations rebuild themselves after any restart;
- fetching: a local miss of a client (FETCH) is looked up in this daemon's own table
  when it is one of the key's homes, else on the keys' homes (one request per home, all
  at once), then pulled from a holder straight into a block of this segment created for
  it, verified against the checksum recorded at seal (each piece hashed by the
  transport's receiving thread as it lands, so hashing overlaps the transfer), and sealed as
  an ordinary local replica; a failed holder (connect, transfer, verify) is counted by
  stage, logged once at WARNING, and the next holder is tried. Two FETCHes of one key
  share one transfer. A block is created and sealed through an internal Client of this
  daemon, so a partial block is never visible and its space is reclaimed on failure
  exactly as for a client's aborted create.
Must never: block the server loop; serve anything to an unauthenticated link or an
extent that is not a sealed object of this run; seal bytes whose checksum does not
match; turn a failed transfer into a silent miss (the caller gets the error).
"""

import concurrent.futures
import logging
import queue
import select
import socket
import threading
import time
import weakref
from collections import Counter

from kvstore import checksum, protocol
from kvstore.cluster import peerwire as pw
from kvstore.cluster.auth import accept_handshake, dial_handshake, load_secret, recv_exact
from kvstore.cluster.directory import LocationTable, homes, homes_many
from kvstore.errors import (ChecksumMismatch, ClientClosed, GetTimeout, KVStoreError,
                            ObjectGoneOnPeer, PeerAuthFailed, PeerIncompatible, ProtocolError,
                            TransportError)
from kvstore.netcheck import bind_peer_port, check_advertise
from kvstore.table import SEALED, Busy
from kvstore.transport.base import PeerAddr, ReadOp, Resolver, Served

log = logging.getLogger("kvstore.daemon.cluster")

#: Keys per ANNOUNCE / WITHDRAW message.
ANNOUNCE_BATCH = 4096
#: Seconds between two WARNING lines about one peer and stage.
WARN_EVERY = 10.0
#: Seconds a control request to a peer may take.
CONTROL_TIMEOUT = 2.0
#: Seconds between INFO polls of static peers (their liveness and incarnation).
STATIC_POLL = 1.0
MAX_CONTROL_LINKS = 256
#: Seconds an authenticated control link may stay silent before this side closes it (a
#: dialer's pooled link is redialled on its next request; the member poll every
#: POLL_EVERY keeps a live peer's links busy), so a stalled peer holds a slot that long.
CONTROL_IDLE = 60.0
#: Control links one address may have in their handshake at once: a host without the
#: secret cannot take every slot by opening silent connections (a real peer dials at
#: most a few at once: one per control-pool worker).
MAX_HANDSHAKING_PER_HOST = 32

INFO, INFO_REPLY = pw.INFO, pw.INFO_REPLY
#: Seconds between INFO polls of every member (free space for placement; static peers'
#: liveness and incarnation).
POLL_EVERY = 2.0


class ClusterNode:
    def __init__(self, cfg, socket_path, segment):
        self.cfg = cfg
        self.socket_path = socket_path
        self.segment = segment
        self.secret = load_secret(cfg.cluster_secret_file)
        self.address = check_advertise(cfg.advertise)
        self.listener = bind_peer_port(self.address, cfg.peer_port)
        self.peer_port = self.listener.getsockname()[1]
        self.id = f"{cfg.advertise}:{self.peer_port}"
        self.incarnation = time.time_ns()
        self.locations = LocationTable()
        self.loc_lock = threading.Lock()
        self.counts = Counter()
        self.count_lock = threading.Lock()
        self._warned = {}
        self.events = queue.SimpleQueue()
        self.local = {}                      # key -> (offset, size, checksum): what we hold
        self.members = {}                    # id -> {"address", "tcp_port", "incarnation"}
        self.members_lock = threading.Lock()
        self.links = {}                      # id -> [authenticated control sockets]
        self.links_lock = threading.Lock()
        self._ctl_socks = weakref.WeakSet()  # every control link dialed: close() wakes their waits
        self.inflight = {}                   # key -> Future of its transfer
        self.inflight_lock = threading.Lock()
        self.closing = False
        self._client = None
        self._client_lock = threading.Lock()
        self.transport_server = self.transport = self.membership = None
        self.pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="kvstore-fetch")
        self.control_pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="kvstore-lookup")
        # One holder's batch of a fetch: never on self.pool, whose FETCH workers wait for
        # these (8 FETCHes of keys on two holders would fill it with waiters for good).
        self.pull_pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="kvstore-pull")
        self._threads = []
        self._tls = threading.local()
        self._worker_clients = []
        self.wake_loop = lambda: None         # set by the daemon: its loop looks at rings now
        self.free = {}                       # member id -> free bytes it last reported
        self.free_here = -1
        self._announced_view = None          # {member: incarnation} of the last re-announce
        self._announce_owed = False          # a home missed records since: re-announce all
        self.replicate_q = queue.SimpleQueue()
        self._control_slots = threading.BoundedSemaphore(MAX_CONTROL_LINKS)
        self._handshaking = Counter()        # address -> its control links not yet authenticated

    # ---- start / stop ------------------------------------------------------------------------
    def start(self, records):
        """Serve, join the membership, announce records [(key, offset, size, checksum)].
        Raises DaemonStartError / ClusterUnavailable / ConfigError with a one-line fix."""
        from kvstore.transport import open_server, open_transport
        self.transport_server = open_server("tcp", _SegmentResolver(self), host=self.address, port=0,
                                            secret=self.secret)
        self.transport = open_transport("tcp", secret=self.secret,
                                        connect_timeout=min(1.0, self.cfg.transfer_timeout))
        me = {"address": self.cfg.advertise, "peer_port": self.peer_port, "segment_size": self.segment.size,
              "transports": ["tcp"], "tcp_port": self.transport_server.address.port,
              "incarnation": self.incarnation}
        from kvstore.cluster import membership as mm
        if self.cfg.cluster:
            self.membership = mm.EtcdMembership(self.cfg.cluster[len("etcd://"):].split(","), me,
                                                ttl=self.cfg.member_ttl,
                                                wait_for_etcd=self.cfg.wait_for_cluster,
                                                owns_name=True)     # we hold its peer port
        else:
            self.membership = mm.StaticMembership(self.cfg.peers, me)
        self._spawn(self._accept_loop, "kvstore-peer-accept")
        self.membership.on_change(lambda view, added, removed: self.events.put(("members", view)))
        self.membership.start()
        for key, off, size, csum in records:
            self.local[key] = (off, size, csum)
        self.events.put(("members", self.membership.members()))
        self._spawn(self._announcer, "kvstore-announcer")
        self._spawn(self._poll, "kvstore-member-poll")
        self._spawn(self._replicator, "kvstore-replicator")
        log.info("cluster: member %s (incarnation %d), peer port %d, tcp transport port %d, %s",
                 self.id, self.incarnation, self.peer_port, self.transport_server.address.port,
                 f"etcd {self.cfg.cluster[7:]}" if self.cfg.cluster else f"static peers {', '.join(self.cfg.peers)}")

    def _spawn(self, fn, name):
        t = threading.Thread(target=self._guard, args=(fn,), name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _guard(self, fn):
        try:
            fn()
        except Exception:                              # noqa: BLE001 (logged, never fatal)
            if not self.closing:
                log.exception("cluster thread %s failed", threading.current_thread().name)

    def close(self):
        self.closing = True
        self.events.put(("stop", None))
        self.replicate_q.put(None)
        for closer in (self.membership, self.transport_server, self.transport):
            try:
                if closer is not None:
                    closer.close()
            except Exception:                          # noqa: BLE001
                pass
        try:
            self.listener.close()
        except OSError:
            pass
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.control_pool.shutdown(wait=False, cancel_futures=True)
        self.pull_pool.shutdown(wait=False, cancel_futures=True)
        with self.links_lock:
            for socks in self.links.values():
                for s in socks:
                    s.close()
            self.links.clear()
            busy = list(self._ctl_socks)
        for s in busy:                # requests in flight end now, not at their deadline
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        c, self._client = self._client, None
        with self._client_lock:
            clients, self._worker_clients = self._worker_clients, []
        for c in ([c] if c is not None else []) + clients:
            # not c.close(): its requests would wait for the loop calling us
            conn = c._conn
            conn.closed_why = "the daemon is stopping"   # no reconnect, no "went away"
            conn._reset(conn.sock)       # a cluster thread waiting for a reply gets an error now

    # ---- bookkeeping -------------------------------------------------------------------------
    def count(self, what, n=1):
        with self.count_lock:
            self.counts[what] += n

    def warn(self, peer, stage, message, *args):
        if self.closing:            # a transfer cut short by our own stop is no peer's fault
            return
        now = time.monotonic()
        k = (peer, stage)
        if now - self._warned.get(k, -WARN_EVERY) >= WARN_EVERY:
            self._warned[k] = now
            log.warning(message, *args)

    def stats(self):
        with self.count_lock:
            out = dict(self.counts)
        with self.loc_lock:
            out.update(location_records=self.locations.records, located_keys=len(self.locations.by_key))
        with self.members_lock:
            out["members"] = sorted(self.members)
        out.update(id=self.id, incarnation=self.incarnation, held=len(self.local))
        if self.transport_server is not None:
            out["peer_server"] = dict(self.transport_server.stats)   # what this holder served
            out["served"] = out["peer_server"].get("objects_sent", 0)
            out["served_bytes"] = out["peer_server"].get("bytes_sent", 0)
        return out

    def client(self):
        """The daemon's own Client (creates and seals fetched blocks, holds served ones)."""
        c = self._client
        if c is not None:
            return c
        with self._client_lock:
            if self.closing:             # never a fresh client to a daemon that is going away
                raise ClientClosed("the daemon is stopping")
            if self._client is None:
                from kvstore.client import Client
                c = Client(self.socket_path, timeout=10.0, reconnect_timeout=5.0)
                c._reader.remote = False    # serving a peer must never pull the key from a third
                self._client = c
            return self._client

    def alive(self, mid):
        with self.members_lock:
            return mid in self.members

    def info(self, mid):
        with self.members_lock:
            return self.members.get(mid)

    # ---- membership and announcements --------------------------------------------------------
    def observe(self, published, hidden):
        """Called by the store after each commit (the server loop's thread): cheap."""
        ann = [(k, r.offset, r.size, r.checksum) for k, r in published.items() if r.sealed]
        if ann or hidden:
            self.events.put(("local", (list(hidden), ann)))
        for k, r in published.items():
            if r.sealed and r.replicas > 1:        # a put that asked for copies elsewhere
                self.replicate_q.put((k, r.offset, r.size, r.checksum, r.replicas))

    def _set_members(self, view):
        new = {}
        for mid, rec in view.items():
            if mid == self.id:
                continue
            if rec.get("static"):
                old = self.info(mid)          # static peers: known once INFO answered
                if old is not None:
                    new[mid] = old
                continue
            if "tcp_port" in rec and "incarnation" in rec:
                new[mid] = {"address": rec.get("address"), "tcp_port": int(rec["tcp_port"]),
                            "incarnation": int(rec["incarnation"])}
        return self._apply_members(new)

    def _apply_members(self, new):
        with self.members_lock:
            changed = new != self.members
            self.members = new
        if changed:
            keep = {mid: m["incarnation"] for mid, m in new.items()}
            keep[self.id] = self.incarnation
            with self.loc_lock:
                self.locations.retain(keep)
        return changed

    def _poll(self):
        """Every member's INFO (free bytes, for placement); for static peers also their
        liveness and incarnation (etcd tells those for the others)."""
        static = not self.cfg.cluster
        regs = None
        while not self.closing:
            try:
                self.free_here = self._free_bytes()
            except Exception:                          # noqa: BLE001 (next time)
                pass
            # registered again (cut off past our lease: the others dropped our records, and
            # our own view may never have changed): announce everything again
            now_regs = self.membership.status().get("registrations")
            if regs is not None and now_regs != regs:
                self.events.put(("reannounce", None))
            regs = now_regs
            new = {}
            for mid in self.membership.members():
                if mid == self.id:
                    continue
                try:
                    body = self.request(mid, pw.info(), INFO_REPLY, timeout=1.0)
                    if static:
                        new[mid] = {"address": body["address"], "tcp_port": int(body["tcp_port"]),
                                    "incarnation": int(body["incarnation"])}
                    self.free[mid] = int(body.get("free", -1))
                except (KVStoreError, KeyError, ValueError, TypeError, OSError):
                    self.free.pop(mid, None)
            if static and self._apply_members(new):
                self.events.put(("reannounce", None))
            time.sleep(STATIC_POLL if static else POLL_EVERY)

    def _free_bytes(self):
        st = self.client().stats()
        return int(st["size"]) - int(st["used"])

    # ---- replicas ----------------------------------------------------------------------------
    def place(self, key, size, count):
        """Up to count members (not this one) for replicas of key: in the key's
        rendezvous order (an even spread, the same choice on every daemon), skipping
        members whose last reported free space cannot take it."""
        with self.members_lock:
            ids = list(self.members)
        out = []
        for mid in homes(key, ids, len(ids)):
            free = self.free.get(mid)
            if free is not None and 0 <= free < size:
                continue
            out.append(mid)
            if len(out) == count:
                break
        return out

    def replicate_keys(self, keys, copies):
        """From the server loop (no I/O): queue copies of keys sealed here for placement
        on other hosts, as a put asking for ``copies`` does (a repeat put that waits for
        its copies). [bool] per key: sealed here and queued."""
        table = self.client()._conn.att.table
        out = []
        for k in keys:
            try:
                e = table.lookup(k)
            except Busy:
                e = None
            if e is None or e.state != SEALED:
                out.append(False)
                continue
            self.replicate_q.put((k, e.offset, e.size, e.checksum, copies))
            out.append(True)
        return out

    def _replicator(self):
        while not self.closing:
            item = self.replicate_q.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < ANNOUNCE_BATCH:
                try:
                    nxt = self.replicate_q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    return
                batch.append(nxt)
            by_target = {}
            for key, off, size, csum, n in batch:
                targets = self.place(key, size, n - 1)
                if len(targets) < n - 1:
                    self.count("replicas_short", n - 1 - len(targets))
                    self.warn("*", "place", "cluster: %r wants %d copies but only %d other members "
                              "can take it; it has %d", key[:64], n, len(targets), len(targets) + 1)
                for t in targets:
                    by_target.setdefault(t, []).append((key, off, size, csum))
            for t, items in by_target.items():
                try:
                    self.request(t, pw.replicate(self.id, self.incarnation, items), pw.OK)
                    self.count("replicas_placed", len(items))
                except KVStoreError as e:
                    self.count("replicate_failures")
                    self.warn(t, "replicate", "cluster: could not ask %s to keep %d replicas (%s)",
                              t, len(items), e)

    def _replicate_here(self, keys, found):
        try:
            res, _ = self._pull_all(keys, found, [], time.monotonic() + max(2.0, self.cfg.transfer_timeout))
            self.count("replicas_kept", sum(1 for r in res.values() if r[0] == protocol.FETCH_LOCAL))
        except Exception:                              # noqa: BLE001
            log.exception("cluster: keeping replicas failed")

    def _announcer(self):
        while not self.closing:
            kind, body = self.events.get()
            if kind == "stop":
                return
            full = moved = False
            latest = {}                     # key -> its last event: None (gone) or its record
            while True:                     # take everything queued: batches, not messages
                if kind == "members":
                    moved |= self._set_members(body)    # a changed membership moves homes
                elif kind == "reannounce":
                    full = True
                elif kind == "local":
                    hidden, ann = body
                    for k in hidden:
                        self.local.pop(k, None)
                        latest[k] = None
                    for k, off, size, csum in ann:
                        self.local[k] = (off, size, csum)
                        latest[k] = (k, off, size, csum)
                elif kind == "stop":
                    return
                try:
                    kind, body = self.events.get_nowait()
                except queue.Empty:
                    break
            # only each key's last event counts: a put then a delete in one batch must end
            # withdrawn (withdraws go first, so an announce sent for it would outlive it)
            withdraw = [k for k, it in latest.items() if it is None]
            announce = [it for it in latest.values() if it is not None]
            view = self._view()
            old = self._announced_view
            if moved and (old is None or self._announce_owed):
                full = True                 # never announced, or a home missed some records
            encode = lambda items: pw.announce(self.id, self.incarnation, items)   # noqa: E731
            local = lambda items: self._announce_local(self.id, self.incarnation, items)   # noqa: E731
            if withdraw:
                self._send_by_home(withdraw, lambda ks: pw.withdraw(self.id, self.incarnation, ks),
                                   lambda ks: self._withdraw_local(ks), key=lambda k: k)
            if full:
                self._announce_owed = False
                self._announced_view = view
                self.count("reannounced_all")
                self._send_by_home([(k, *v) for k, v in self.local.items()], encode, local, key=lambda it: it[0])
                continue
            if announce:
                self._send_by_home(announce, encode, local, key=lambda it: it[0])
            if moved:
                self._announced_view = view
                self._announce_moved(old, view, encode, local)

    def _view(self):
        """{member id: incarnation}, this daemon included: what the homes are computed from."""
        with self.members_lock:
            view = {mid: m["incarnation"] for mid, m in self.members.items()}
        view[self.id] = self.incarnation
        return view

    def _announce_moved(self, old, new, encode, local):
        """After a membership change, send each held record only to the homes that lack
        it: members that became one of its homes, and homes that are new runs (their
        table started empty). About HOME_COPIES/N of the records, not all of them."""
        fresh = {mid for mid, inc in new.items() if old.get(mid) != inc}
        items = [(k, *v) for k, v in self.local.items()]
        if not items:
            return
        keys = [it[0] for it in items]
        before = homes_many(keys, list(old)) if old else [[] for _ in keys]
        after = homes_many(keys, list(new))
        by_home = {}
        for it, was, now in zip(items, before, after):
            for h in now:
                if h in fresh or h not in was:
                    by_home.setdefault(h, []).append(it)
        self.count("reannounced_moved", sum(len(g) for g in by_home.values()))
        self._send_groups(by_home, encode, local)

    def _announce_local(self, holder, inc, items):
        with self.loc_lock:
            return self.locations.announce(holder, inc, items)

    def _withdraw_local(self, keys):
        with self.loc_lock:
            self.locations.withdraw(self.id, self.incarnation, keys)

    def _send_by_home(self, items, encode, local, key):
        with self.members_lock:
            ids = list(self.members) + [self.id]
        by_home = {}
        for it, hs in zip(items, homes_many([key(it) for it in items], ids)):
            for h in hs:
                by_home.setdefault(h, []).append(it)
        self._send_groups(by_home, encode, local)

    def _send_groups(self, by_home, encode, local):
        for h, group in by_home.items():
            for i in range(0, len(group), ANNOUNCE_BATCH):
                part = group[i:i + ANNOUNCE_BATCH]
                if h == self.id:
                    local(part)
                    continue
                try:
                    self.request(h, encode(part), pw.OK)
                    self.count("announced", len(part))
                except KVStoreError as e:
                    self.count("announce_failures")
                    self._announce_owed = True      # the next membership change sends everything
                    self.warn(h, "announce", "cluster: could not send %d location records to home %s "
                              "(%s); they are sent again when the membership changes", len(part), h, e)

    # ---- control links (the dialing side) ----------------------------------------------------
    def request(self, mid, frame, expect, timeout=CONTROL_TIMEOUT):
        """One request/reply with peer mid over a pooled authenticated link."""
        host, port = mid.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        for attempt in (0, 1):
            sock = self._checkout(mid) if attempt == 0 else None    # a retry dials afresh
            fresh = sock is None
            if fresh:
                sock = self._dial(host, int(port), mid, deadline)
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.sendall(frame)
                n, mtype = pw.read_header(recv_exact(sock, pw.HEADER.size, deadline, mid))
                payload = recv_exact(sock, n, deadline, mid) if n else b""
            except (OSError, TransportError, ProtocolError) as e:
                sock.close()
                if not fresh and attempt == 0 and time.monotonic() < deadline:
                    continue                  # a pooled link the peer closed: dial again
                raise TransportError(f"control link to {mid} failed ({e})", mid, "lookup") from None
            if mtype == pw.ERROR:
                self._checkin(mid, sock)
                code, msg = pw.read_error(payload)
                raise TransportError(f"{mid} refused: {msg}", mid, "lookup")
            if mtype != expect:
                sock.close()
                raise TransportError(f"{mid} answered {pw.NAMES.get(mtype)} to a request for "
                                     f"{pw.NAMES.get(expect)}", mid, "lookup")
            body = pw.decode(mtype, payload)
            self._checkin(mid, sock)
            return body

    def _dial(self, host, port, mid, deadline):
        try:
            sock = socket.create_connection((host, port), timeout=max(0.001, min(1.0, deadline - time.monotonic())))
        except OSError as e:
            self.count("connect_failures")
            raise TransportError(f"cannot reach {mid} ({e.strerror or e})", mid, "connect") from None
        with self.links_lock:
            if self.closing:
                sock.close()
                raise TransportError(f"not dialing {mid}: this daemon is stopping", mid, "connect")
            self._ctl_socks.add(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            dial_handshake(sock, self.secret, max(0.001, deadline - time.monotonic()), mid)
        except (PeerAuthFailed, PeerIncompatible) as e:
            sock.close()
            self.count("auth_failures")
            self.warn(mid, "auth", "cluster: %s", e)
            raise TransportError(str(e), mid, "connect") from None
        except TransportError:
            sock.close()
            raise
        return sock

    def _checkout(self, mid):
        """A pooled link to mid that is still open: one readable while idle (the peer
        closed it: it restarted, or CONTROL_IDLE passed; or stray bytes) is dropped."""
        while True:
            with self.links_lock:
                socks = self.links.get(mid)
                sock = socks.pop() if socks else None
            if sock is None:
                return None
            try:          # poll, not select: a daemon may hold more than FD_SETSIZE fds
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                stale = bool(poller.poll(0))
            except (OSError, ValueError):
                stale = True
            if not stale:
                return sock
            sock.close()

    def _checkin(self, mid, sock):
        with self.links_lock:
            socks = self.links.setdefault(mid, [])
            if len(socks) < 8 and not self.closing:
                socks.append(sock)
                return
        sock.close()

    # ---- control server (the accepting side) --------------------------------------------------
    def _accept_loop(self):
        self.listener.settimeout(0.5)
        while not self.closing:
            try:
                sock, addr = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self.closing:
                    return
                time.sleep(0.05)
                continue
            with self.links_lock:
                crowd = self._handshaking[addr[0]] >= MAX_HANDSHAKING_PER_HOST
                if not crowd:
                    self._handshaking[addr[0]] += 1
            if crowd:
                sock.close()
                self.warn(addr[0], "links", "cluster: %s has %d control links in their handshake; "
                          "refusing more from it", addr[0], MAX_HANDSHAKING_PER_HOST)
                continue
            if not self._control_slots.acquire(blocking=False):
                self._handshook(addr[0])
                sock.close()
                self.warn("*", "links", "cluster: over %d peer control links; refusing more", MAX_CONTROL_LINKS)
                continue
            threading.Thread(target=self._serve_link, args=(sock, f"{addr[0]}:{addr[1]}"),
                             name="kvstore-peer-link", daemon=True).start()

    def _handshook(self, host):
        with self.links_lock:
            self._handshaking[host] -= 1
            if self._handshaking[host] <= 0:
                del self._handshaking[host]

    def _serve_link(self, sock, peer):
        host = peer.rsplit(":", 1)[0]
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                accept_handshake(sock, self.secret, 2.0, peer)
            except (PeerAuthFailed, PeerIncompatible) as e:
                self.count("auth_refused")
                self.warn(host, "auth", "cluster: refused peer %s: %s", peer, e)
                return
            except TransportError:
                return
            finally:
                self._handshook(host)
            while not self.closing:
                sock.settimeout(CONTROL_IDLE)
                try:
                    head = sock.recv(pw.HEADER.size, socket.MSG_WAITALL)
                except OSError:
                    return
                if len(head) < pw.HEADER.size:
                    return
                mtype = None
                try:
                    n, mtype = pw.read_header(head)
                    payload = recv_exact(sock, n, time.monotonic() + 10.0, peer) if n else b""
                    reply = self._handle(mtype, payload)
                except (ProtocolError, TransportError) as e:
                    self.count("bad_peer_frames")
                    self.warn(peer.rsplit(":", 1)[0], "frame", "cluster: closing the link from %s: %s", peer, e)
                    try:
                        sock.sendall(pw.error(ProtocolError.code, str(e)))
                    except OSError:
                        pass
                    return
                except OSError:
                    return
                except Exception as e:         # noqa: BLE001 (our bug: the peer still hears)
                    self.count("control_failures")
                    log.exception("cluster: handling %s from %s failed", pw.NAMES.get(mtype, mtype), peer)
                    reply = pw.error(getattr(e, "code", 1), f"{type(e).__name__}: {e}"[:400])
                sock.sendall(reply)
        except OSError:
            return
        finally:
            sock.close()
            self._control_slots.release()

    def _handle(self, mtype, payload):
        if mtype == pw.LOOKUP:
            keys = pw.read_lookup(payload)
            with self.loc_lock:
                found = self.locations.lookup(keys)
            self.count("lookups_served")
            return pw.locations(found)
        if mtype == pw.ANNOUNCE:
            holder, inc, items = pw.read_announce(payload)
            m = self.info(holder)
            if m is not None and m["incarnation"] > inc:
                return pw.ok(0)               # a late message of a run that has ended
            return pw.ok(self._announce_local(holder, inc, items))
        if mtype == pw.WITHDRAW:
            holder, inc, keys = pw.read_withdraw(payload)
            with self.loc_lock:
                self.locations.withdraw(holder, inc, keys)
            return pw.ok(len(keys))
        if mtype == INFO:
            return pw.info_reply({"address": self.cfg.advertise, "tcp_port": self.transport_server.address.port,
                                  "incarnation": self.incarnation, "free": self.free_here, "version": 1})
        if mtype == pw.REPLICATE:
            holder, inc, items = pw.read_replicate(payload)
            m = self.info(holder)
            if m is None or m["incarnation"] != inc:
                return pw.ok(0)
            self.count("replicas_requested", len(items))
            items = [it for it, here in zip(items, self._sealed_here([it[0] for it in items])) if not here]
            found = {k: [(holder, inc, off, size, csum)] for k, off, size, csum in items}
            if items:
                self.pool.submit(self._replicate_here, [k for k, _, _, _ in items], found)
            return pw.ok(len(items))
        if mtype == pw.DELETE:
            return pw.ok(sum(self._delete_local(pw.read_delete(payload))))
        if mtype == pw.VERIFY:
            return pw.ok(self._verify_local(pw.read_verify(payload)))
        raise ProtocolError(f"unexpected {pw.NAMES.get(mtype, mtype)} on a control link")

    # ---- finding and pulling -----------------------------------------------------------------
    def lookup(self, keys, deadline, unasked=None, every_home=False):
        """{key: [(holder, incarnation, offset, size, checksum)]} from the keys' homes.
        A key this daemon is a home of is looked up in its own table first (no round
        trip: with two hosts, every key); one it has no record of here, and every other
        key, goes to its first live remote home, one request per home, all sent together,
        so a batch costs one round trip at most whatever the cluster size. A home that
        fails is replaced by the next home of its keys (one more round, only then).
        Errors: (stage, peer, exc) list. ``unasked`` (a set) gets the keys no home of
        theirs answered for (this daemon's own "no record" counts as an answer only when
        no remote home of the key could be asked). ``every_home``: ask every live home of
        each key in the one round and merge their holders (a delete must find every copy,
        even one a home missed the announcement of)."""
        with self.members_lock:
            ids = list(self.members) + [self.id]
        dead = set()
        found, errors = {}, []
        keys = list(dict.fromkeys(keys))
        cands, answered_here = {}, set()
        mine = []
        for k, hs in zip(keys, homes_many(keys, ids)):
            if self.id in hs:
                hs.remove(self.id)
                mine.append(k)
            cands[k] = hs
        if mine:
            with self.loc_lock:
                got = self.locations.lookup(mine)
            for k in mine:
                locs = got.get(k)
                if locs:
                    found[k] = [tuple(loc) for loc in locs]
                    if not every_home:
                        cands[k] = []              # answered: no remote round for it
                answered_here.add(k)               # a miss here; its other home may know
        if every_home:
            self._ask_every_home(keys, cands, deadline, found, errors)
            if unasked is not None:
                unasked.update(k for k in keys if k not in answered_here and cands[k] is None)
            return found, errors
        todo = [k for k in keys if cands[k]]
        for _ in range(3):
            groups = {}
            for k in todo:
                hs = cands[k]
                while hs and hs[0] in dead:
                    hs.pop(0)
                if hs:
                    groups.setdefault(hs.pop(0), []).append(k)
                elif k not in answered_here and unasked is not None:
                    unasked.add(k)
            todo = []
            futures = {}
            for home, group in groups.items():
                # a home that does not answer (stopped, cut) costs transfer_timeout, not the
                # whole deadline: its keys still get their next home in the next round
                t = max(0.001, min(self.cfg.transfer_timeout, deadline - time.monotonic()))
                if len(groups) == 1:               # one home to ask: no thread hop
                    fut = concurrent.futures.Future()
                    try:
                        fut.set_result(self.request(home, pw.lookup(group), pw.LOCATIONS, t))
                    except Exception as e:             # noqa: BLE001 (handled below)
                        fut.set_exception(e)
                else:
                    fut = self.control_pool.submit(self.request, home, pw.lookup(group), pw.LOCATIONS, t)
                futures[fut] = (home, group)
            if futures:
                self.count("lookup_rounds")
                self.count("lookup_messages", len(futures))
            for fut, (home, group) in futures.items():
                try:
                    got = fut.result()
                    for k, locs in got.items():
                        found[k] = found.get(k, []) + [tuple(loc) for loc in locs]
                except Exception as e:                 # noqa: BLE001
                    self.count("lookup_failures")
                    errors.append(("lookup", home, e))
                    self.warn(home, "lookup", "cluster: lookup on home %s failed (%s); asking the "
                              "next home of its keys", home, e)
                    dead.add(home)
                    todo += group
            if not todo or time.monotonic() >= deadline:
                break
        if unasked is not None:
            unasked.update(k for k in todo if k not in answered_here)
        return found, errors

    def _ask_every_home(self, keys, cands, deadline, found, errors):
        """One round: every remote home of every key, all at once; holders merged into
        found. A key none of whose remote homes answered gets cands[k] = None."""
        groups = {}
        for k in keys:
            for h in cands[k]:
                groups.setdefault(h, []).append(k)
        t = max(0.001, min(self.cfg.transfer_timeout, deadline - time.monotonic()))
        futures = {self.control_pool.submit(self.request, h, pw.lookup(g), pw.LOCATIONS, t): (h, g)
                   for h, g in groups.items()}
        if futures:
            self.count("lookup_rounds")
            self.count("lookup_messages", len(futures))
        answered = set()
        for fut, (home, group) in futures.items():
            try:
                for k, locs in fut.result().items():
                    have = set(found.get(k, ()))
                    found[k] = list(have | {tuple(loc) for loc in locs})
                answered.update(group)
            except Exception as e:                     # noqa: BLE001
                self.count("lookup_failures")
                errors.append(("lookup", home, e))
                self.warn(home, "lookup", "cluster: lookup on home %s failed (%s)", home, e)
        for k in keys:
            if cands[k] and k not in answered:
                cands[k] = None

    def locate_async(self, keys, timeout, post):
        """LOCATE: on how many members each key is sealed (one lookup round for the batch)."""
        def work():
            try:
                unasked = set()
                found, errors = self.lookup(keys, time.monotonic() + timeout, unasked)
                self.count("locates")
                if unasked:                            # "nowhere" would be a silent failure
                    peer = errors[-1][1] if errors else "*"
                    post(protocol.error(TransportError(
                        f"no home of {len(unasked)} key(s) answered the lookup (last: {peer}, "
                        f"{errors[-1][2] if errors else 'no live home'}); check those daemons and "
                        f"their links, then retry", peer, "lookup")))
                    return
                here = self._sealed_here(keys)     # held here, maybe not announced yet
                counts = []                        # hosts holding each key now
                for k, mine in zip(keys, here):
                    holders = {loc[0] for loc in found.get(k, ()) if self._current(loc)}
                    if mine:
                        holders.add(self.id)
                    counts.append(len(holders))
                post(protocol.located(counts))
            except Exception as e:                     # noqa: BLE001 (the caller must hear)
                log.exception("cluster: locate failed")
                post(protocol.error(e if isinstance(e, KVStoreError) else KVStoreError(str(e))))
        self.pool.submit(work)

    def delete_async(self, keys, timeout, post):
        """DELETE_ALL: delete keys on every member that holds them (this one included);
        flags say which keys were deleted somewhere."""
        def work():
            try:
                deadline = time.monotonic() + timeout
                unasked = set()
                found, errors = self.lookup(keys, deadline, unasked, every_home=True)
                by_holder = {}
                for k in keys:
                    for loc in found.get(k, ()):
                        by_holder.setdefault(loc[0], []).append(k)
                deleted = set()
                mine = self._delete_local(keys)
                deleted.update(k for k, d in zip(keys, mine) if d)
                futs = {self.control_pool.submit(self.request, h, pw.delete(ks), pw.OK,
                                                 max(0.001, deadline - time.monotonic())): (h, ks)
                        for h, ks in by_holder.items() if h != self.id}
                failed = []
                for fut, (h, ks) in futs.items():
                    try:
                        if fut.result():
                            deleted.update(ks)
                    except Exception as e:             # noqa: BLE001
                        failed.append((h, e))
                if unasked and not failed:         # their holders are unknown: copies may remain
                    peer = errors[-1][1] if errors else "*"
                    failed.append((peer, f"no home of {len(unasked)} key(s) answered the lookup"))
                if failed:
                    h, e = failed[0]
                    post(protocol.error(TransportError(f"delete on {h} failed ({e}); its copies may "
                                                       f"remain: retry the delete", h, "connect")))
                    return
                post(protocol.located([k in deleted for k in keys]))
            except Exception as e:                     # noqa: BLE001
                log.exception("cluster: delete failed")
                post(protocol.error(e if isinstance(e, KVStoreError) else KVStoreError(str(e))))
        self.pool.submit(work)

    def _sealed_here(self, keys):
        """[bool] per key: sealed in this daemon's store now (its published table, which
        the loop updates at commit; the announcer's view may lag behind)."""
        table = self.client()._conn.att.table
        out = []
        for k in keys:
            try:
                e = table.lookup(k)
                out.append(e is not None and e.state == SEALED)
            except Busy:
                out.append(k in self.local)
        return out

    def _verify_local(self, keys):
        """A peer found these keys' bytes corrupt: read each here, verified (the reader
        drops an object whose bytes fail its checksum, and the drop withdraws its
        location records); returns how many were dropped. A peer cannot make us drop a
        good object: we check ourselves."""
        c = self.client()
        r = c._reader
        dropped = 0
        for k in keys:
            try:
                res = r._read_held([k], [k], [None], 0, c._lock)
            except KVStoreError:
                continue
            if res and isinstance(res[0], ChecksumMismatch):
                dropped += 1
        self.count("verify_requests", len(keys))
        if dropped:
            self.count("dropped_corrupt", dropped)
            log.warning("cluster: %d object(s) here failed their checksum when a peer read them; "
                        "dropped (check this host's memory)", dropped)
        return dropped

    def _delete_local(self, keys):
        c = self.client()
        out = []
        for k in keys:
            try:
                out.append(protocol.read_done(c._conn.request(protocol.keyed(protocol.DELETE, k), protocol.DONE)))
            except KVStoreError:
                out.append(False)
        return out

    def _current(self, loc):
        if loc[0] == self.id:
            return loc[1] == self.incarnation
        m = self.info(loc[0])
        return m is not None and m["incarnation"] == loc[1]

    def fetch_async(self, keys, timeout, reply):
        """FETCH from the server loop: answer ``reply(results, after, done)`` later,
        results [(status, code, msg)] per key, after [(slot, seal number)] the loop must
        have applied before the reply may go (so the asker finds the pulled blocks
        sealed), done (or None) to call once it went: until then a FETCH of the same keys
        shares this one's outcome instead of pulling them again."""
        self.pool.submit(self._fetch_and_reply, keys, timeout, reply)

    def _fetch_and_reply(self, keys, timeout, reply):
        done = None
        try:
            results, after, done = self.fetch(keys, timeout)
        except Exception as e:                         # noqa: BLE001 (the caller must hear)
            if not self.closing:
                log.exception("cluster: fetch failed")
            results = [(protocol.FETCH_FAILED, getattr(e, "code", 1), f"{type(e).__name__}: {e}")] * len(keys)
            after = []
        reply(results, after, done)

    def fetch(self, keys, timeout):
        """Pull keys (local misses) from their holders. Returns ([(status, code, msg)],
        [(slot, seal number)] of the seals that make the pulled blocks visible, a
        callable (or None) that ends the sharing of the pulled keys' outcome: a key
        pulled and sealed stays "in flight" until its reply went, i.e. until the loop
        applied its seal, so a FETCH arriving in between waits for that seal instead of
        pulling the key a second time)."""
        deadline = time.monotonic() + timeout
        self.count("fetch_requests")
        mine, shared, settle = [], {}, []
        with self.inflight_lock:
            for k in keys:
                f = self.inflight.get(k)
                if f is None:
                    f = self.inflight[k] = concurrent.futures.Future()
                    mine.append(k)
                shared[k] = f
        if mine:
            try:
                t0 = time.perf_counter()
                found, lookup_errors = self.lookup(mine, deadline)
                t1 = time.perf_counter()
                # no wake per seal: the reply posted after this wakes the loop once, and
                # the loop applies the seals before it delivers the reply
                results, afters = self._pull_all(mine, found, lookup_errors, deadline, wake=False)
                self.count("lookup_us", int((t1 - t0) * 1e6))      # time spent, for operators
                self.count("pull_us", int((time.perf_counter() - t1) * 1e6))
                for k in mine:
                    shared[k].set_result((*results[k], afters.get(k)))
            finally:
                with self.inflight_lock:
                    for k in mine:
                        f = self.inflight.get(k)
                        if f is None:
                            continue
                        if not f.done():
                            f.set_result((protocol.FETCH_FAILED, 1, "the fetch was abandoned", None))
                        if f.result()[3] is not None:  # sealed: shared until the seal is applied
                            settle.append((k, f))
                        else:
                            del self.inflight[k]
        out, after = [], set()
        for k in keys:
            try:
                status, code, msg, a = shared[k].result(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
            except concurrent.futures.TimeoutError:
                out.append((protocol.FETCH_FAILED, 52, "another request's transfer of this key "
                                                       "did not finish in time"))
                continue
            out.append((status, code, msg))
            if a is not None:
                after.add(a)

        def done():
            with self.inflight_lock:
                for k, f in settle:
                    if self.inflight.get(k) is f:
                        del self.inflight[k]
        return out, sorted(after), (done if settle else None)

    def _pull_all(self, keys, found, lookup_errors, deadline, wake=True):
        """Pull keys in rounds: each round reads, per holder, every key that holder is
        the next candidate for in one batched transport read; a holder that failed to
        connect or deliver is skipped for the rest of this fetch; a key whose holder
        failed goes to its next holder in the next round. Returns ({key: (status, code,
        msg)}, {key: (slot, seal number) that makes it visible})."""
        cands = {}
        for k in keys:
            locs = []
            for holder, inc, off, size, csum in found.get(k, ()):
                m = self.info(holder)
                if holder != self.id and m is not None and m["incarnation"] == inc:
                    locs.append((holder, inc, off, size, csum))
            cands[k] = locs
        errors = {k: [] for k in keys}
        done, afters, bad_holders = {}, {}, set()
        while time.monotonic() < deadline:
            by_holder = {}
            for k in keys:
                if k in done:
                    continue
                while cands[k] and cands[k][0][0] in bad_holders:
                    cands[k].pop(0)
                if cands[k]:
                    by_holder.setdefault(cands[k][0][0], []).append((k, cands[k].pop(0)))
            if not by_holder:
                break
            t = min(self.cfg.transfer_timeout, max(0.001, deadline - time.monotonic()))
            futs = {self.pull_pool.submit(self._pull_batch, holder, items, t, wake): holder
                    for holder, items in by_holder.items()} if len(by_holder) > 1 else None
            outcomes = ({h: f.result() for f, h in futs.items()} if futs else
                        {h: self._pull_batch(h, items, t, wake) for h, items in by_holder.items()})
            for holder, (got, after) in outcomes.items():
                for k, e in got.items():
                    if e is None:
                        done[k] = (protocol.FETCH_LOCAL, 0, "")
                        if after is not None:
                            afters[k] = after
                        continue
                    stage = "verify" if isinstance(e, ChecksumMismatch) else getattr(e, "stage", "transfer")
                    errors[k].append((stage, holder, e))
                    if isinstance(e, TransportError) and not isinstance(e, ObjectGoneOnPeer):
                        bad_holders.add(holder)           # down or cut: not for the next keys
        out = {}
        for k in keys:
            if k in done:
                out[k] = done[k]
                continue
            real = [x for x in errors[k] if not isinstance(x[2], ObjectGoneOnPeer)]
            if real:
                stage, peer, e = real[0]
                out[k] = (protocol.FETCH_FAILED, getattr(e, "code", 50),
                          f"{stage} from {peer} failed: {e} (tried {len(errors[k])} holder(s))")
            elif not errors[k] and lookup_errors and not found.get(k):
                stage, peer, e = lookup_errors[0]
                out[k] = (protocol.FETCH_FAILED, getattr(e, "code", 50), f"lookup on {peer} failed: {e}")
            elif not errors[k] and cands[k] == [] and found.get(k) and time.monotonic() >= deadline:
                out[k] = (protocol.FETCH_FAILED, 52, "the fetch ran out of time before its holders were tried")
            else:
                self.count("misses")
                out[k] = (protocol.FETCH_MISS, 0, "")    # no holder, or every holder lost it
        return out, afters

    def worker_client(self):
        """This thread's own Client of the daemon: pulled blocks are reserved in its arena
        and sealed through its seal ring (a put without the copy: no round trip per
        block). One per thread, because an arena's seals must come in the order its
        extents were reserved."""
        c = getattr(self._tls, "client", None)
        if c is None or c._conn.closed_why is not None:
            if self.closing:
                raise TransportError("the daemon is stopping", self.id, "transfer")
            from kvstore.client import Client
            c = Client(self.socket_path, timeout=10.0, reconnect_timeout=5.0)
            c._reader.remote = False          # never pulls from other hosts itself
            self._tls.client = c
            with self._client_lock:
                self._worker_clients.append(c)
        return c

    def _pull_batch(self, holder, items, timeout, wake=True):
        """Read items [(key, location)] from one holder in one transport read, straight
        into extents reserved for them in this thread's client's arena; verify each, seal
        the good ones (in reservation order) and give the rest back. Returns ({key: None
        or the error}, (slot, seal number) of the last seal, or None)."""
        m = self.info(holder)
        out = {}
        if m is None:
            return {k: TransportError(f"{holder} left the cluster", holder, "connect") for k, _ in items}, None
        peer = PeerAddr(m["address"], m["tcp_port"])
        c = self.worker_client()
        w = c._writer
        att = c._conn.att
        made, ops, bufs = [], [], []
        with c._lock:
            for k, (_, inc, off, size, csum) in items:
                try:
                    at = w.reserve(size)
                except KVStoreError as e:
                    out[k] = e
                    continue
                made.append((k, at, size, csum))
                ops.append(ReadOp(k, off, size, inc))
                bufs.append(att.rw[at:at + size])
        if not ops:
            return out, None
        digests = [{} for _ in ops]             # op -> {piece offset: digest}, filled as bytes land

        def on_piece(i, off, view):             # in the receiving stream's thread
            digests[i][off] = checksum.piece_digest(view, ops[i].size)
        t0 = time.perf_counter()
        try:
            results = self.transport.read(peer, ops, bufs, timeout, on_piece=on_piece)
        except TransportError as e:
            results = [e] * len(ops)
        self.count("transfer_us", int((time.perf_counter() - t0) * 1e6))
        good, bad = [], []
        for (k, at, size, csum), buf, res, dg in zip(made, bufs, results, digests):
            try:
                if res is not None:
                    raise res
                if checksum.from_pieces(dg, size, buf) != csum:
                    raise ChecksumMismatch(f"the bytes of {k[:64]!r} from {holder} do not match "
                                           f"the checksum recorded at seal")
                good.append((k, at, size, csum))
                out[k] = None
            except (TransportError, ChecksumMismatch) as e:
                bad.append((at, size))
                out[k] = e
                stage = "verify" if isinstance(e, ChecksumMismatch) else getattr(e, "stage", "transfer")
                if isinstance(e, ObjectGoneOnPeer):
                    self.count("gone_on_holder")
                else:
                    self.count(f"{stage}_failures")
                    self.warn(holder, stage, "cluster: %s of %r from %s failed (%s); trying the next "
                              "holder. Check the link to %s and that its daemon runs", stage, k[:64],
                              holder, e, holder)
        del bufs
        corrupt = [k for k, e in out.items() if isinstance(e, ChecksumMismatch)]
        if corrupt:                                   # the holder checks them and drops bad ones
            self.control_pool.submit(self._ask_verify, holder, corrupt)
        after = None
        with c._lock:
            try:
                if good:
                    after = (att.slot_no, w.seal_reserved(good))
                    self.count("fetched", len(good))
                    self.count("fetched_bytes", sum(g[2] for g in good))
            except KVStoreError as e:                 # the daemon went away: nothing sealed
                for k, *_ in good:
                    out[k] = e
                after = None
            for at, size in reversed(bad):
                try:
                    w.unreserve(at, size)
                except KVStoreError:
                    pass
        if after is not None and wake:
            self.wake_loop()                          # apply the seals now, not at the next poll
        return out, after

    def _ask_verify(self, holder, keys):
        try:
            self.request(holder, pw.verify(keys), pw.OK, timeout=max(CONTROL_TIMEOUT, 10.0))
        except KVStoreError as e:
            self.warn(holder, "verify", "cluster: could not ask %s to check %d object(s) that "
                      "failed their checksum (%s)", holder, len(keys), e)


class _SegmentResolver(Resolver):
    """Serve an object only if it is sealed at the extent asked for, in this run; hold it
    (a client hold of the daemon's own Client) until released, or, for a small object
    copied at once, check before and after the copy that it stayed listed (peek)."""

    def __init__(self, node):
        self.node = node

    def resolve(self, op):
        return self._check(op, *self._hold([op])[0])

    def peek(self, op):
        """A small object the server copies at once, without a hold: (segment fd, offset,
        still), still() True only if the published table's bucket for it did not change
        from this lookup until after the copy (the daemon unpublishes an object before
        its extent can be freed or reused, so the copied bytes are the object's). None
        (the server holds it instead) for hugetlbfs segments (no pread) or a table mid-update."""
        node = self.node
        if op.incarnation != node.incarnation:
            raise ObjectGoneOnPeer(f"{node.id} restarted since that location was announced", node.id)
        if node.segment.backing == "hugetlbfs":
            return None
        table = node.client()._conn.att.table
        try:
            e = table.lookup(op.key)
        except Busy:
            return None
        if e is None or e.state != SEALED:
            raise ObjectGoneOnPeer(f"{node.id} no longer holds {op.key[:64]!r}", node.id)
        if e.offset != op.offset or e.size != op.size:
            raise ObjectGoneOnPeer(f"{node.id} holds {op.key[:64]!r} elsewhere now", node.id)
        table.mark(e.bucket)                       # a use, for the eviction sweep

        return node.segment.fd, op.offset, lambda: table.unchanged(e)

    def resolve_many(self, ops):
        """Every op of one READ at once: one get for all their keys (64 small objects cost
        one pass, not 64). [Served or the exception of that op]."""
        out = []
        for op, (view, h) in zip(ops, self._hold(ops)):
            try:
                out.append(self._check(op, view, h))
            except ObjectGoneOnPeer as e:
                out.append(e)
        return out

    def _hold(self, ops):
        """[(view or None, its Held or None)] per op, from one get_many (one per op when
        a key repeats or an object is being created)."""
        node = self.node
        c = node.client()
        r = c._reader
        keys = [op.key for op in ops]
        views = None
        if len(set(keys)) == len(keys):
            try:
                views = r.get_many(keys, 0, c._lock)
            except (GetTimeout, KVStoreError):
                views = None
        if views is None:
            views = []
            for k in keys:
                try:
                    views.append(r.get_many([k], 0, c._lock)[0])
                except (GetTimeout, KVStoreError):
                    views.append(None)
        out = []
        with c._lock:                   # the hold THIS get took, not any hold on the key
            for k, v in zip(keys, views):
                out.append((v, r.held_entry(k, v) if v is not None else None))
        return out

    def _check(self, op, view, h):
        node = self.node
        c = node.client()
        r = c._reader
        if view is None:
            raise ObjectGoneOnPeer(f"{node.id} no longer holds {op.key[:64]!r}", node.id)
        if op.incarnation != node.incarnation or len(view) != op.size or h is None or h.offset != op.offset:
            self._let_go(r, c, op.key, view, h)
            if op.incarnation != node.incarnation:
                raise ObjectGoneOnPeer(f"{node.id} restarted since that location was announced", node.id)
            raise ObjectGoneOnPeer(f"{node.id} holds {op.key[:64]!r} elsewhere now", node.id)
        fd = node.segment.fd if node.segment.backing != "hugetlbfs" else -1
        return Served(fd, op.offset, op.size, lambda: self._let_go(r, c, op.key, view, h), view)

    @staticmethod
    def _let_go(r, c, key, view, h):
        try:
            view.release()
        except Exception:                              # noqa: BLE001
            pass
        try:
            if h is not None:
                r.release_held(key, h, c._lock)       # exactly this read's hold
            else:
                r.release_many([key], c._lock)
        except KVStoreError:
            pass
