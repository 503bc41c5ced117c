"""Cluster membership: which daemons exist, kept in etcd as one leased key per daemon.

Owns: this daemon's registration and the last known view of everyone's.

- One key per daemon, ``kvstore/members/<advertise>:<peer_port>``, whose value is JSON:
  address, peer_port, segment_size, transports, version (peer protocol), incarnation
  (new on every start), started_at, pid, hostname. The key is attached to a lease with a
  TTL of a few seconds (default 3 s); when the daemon dies its keepalives stop, etcd
  deletes the key at the lease's expiry, and every other daemon's view drops it.
- Registration is one etcd transaction: "create the key if it does not exist". If it
  exists under another incarnation, another daemon holds that address and port; if that
  daemon is dead, its lease expires within its TTL, so ``start()`` waits up to that TTL
  (+1 s) for the key to go and then refuses with DaemonStartError (a live daemon
  refreshes its lease forever; a crashed one that is being restarted does not).
- One background thread, every TTL/3: a lease keepalive, then a membership check that
  costs one tiny request (a count-only range whose header carries etcd's revision; the
  full list is read only when the revision moved). Polling, not a watch stream: it is
  bounded (every call has a short timeout), needs nothing but urllib, and at 1,000
  daemons with TTL 3 s costs etcd about 2,000 small requests/s, independent of blocks.
  A change is seen within TTL/3 of etcd applying it; a dead daemon leaves every view
  within TTL + TTL/3 (+ etcd's 0.5 s expiry tick).
- etcd unreachable: the last known view stays (lookups continue on it), one WARNING is
  logged, and the thread keeps trying every TTL/3, failing over between endpoints. When
  etcd answers again the daemon's lease is kept alive as before; if the lease is gone
  (etcd lost its data, or we were cut off longer than the TTL) or our key is missing, the
  daemon re-registers by itself, under the same incarnation.
- ``StaticMembership`` has the same API for ``--peers`` (no etcd): the members are the
  given list; liveness is the transport's business.

etcd is reached through its v3 JSON gateway over plain HTTP (etcd 3.4: /v3/kv/range,
/v3/kv/txn, /v3/lease/grant, /v3/lease/keepalive, /v3/lease/revoke; base64 keys), with
proxies ignored (the cluster network is local by definition).

Must never: block without a deadline (every HTTP call has ``timeout``, default
min(1 s, TTL/3)); let an exception escape the background thread or a callback; write
anything to etcd but this daemon's own key and lease (etcd holds membership only, never
one key per block); forget the last known view because etcd is down.

API::

    m = EtcdMembership(["10.0.0.9:2379", "10.0.0.8:2379"], me={"address": "10.0.0.1",
                       "peer_port": 7000, "segment_size": 1 << 30, "transports": ["tcp"]})
    m.on_change(lambda members, added, removed: ...)
    m.start()            # ClusterUnavailable / DaemonStartError with a one-line fix
    m.members()          # {"10.0.0.1:7000": {...}, ...}, this daemon included
    m.status()           # etcd reachable?, registered?, lease, member count
    m.close()            # revokes the lease: the others drop us at once
"""

import base64
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPException

from kvstore.errors import ClusterUnavailable, ConfigError, DaemonStartError

log = logging.getLogger("kvstore.cluster.membership")

PREFIX = "kvstore/members/"
DEFAULT_TTL = 3.0
#: Peer-protocol version announced when ``me`` does not say (the handshake's).
try:
    from kvstore.cluster.auth import VERSION as PROTOCOL_VERSION
except ImportError:  # pragma: no cover
    PROTOCOL_VERSION = 1
_MAX_BODY = 64 << 20


def _b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s):
    return base64.b64decode(s or "")


def _prefix_end(prefix):
    b = bytearray(prefix.encode())
    b[-1] += 1
    return bytes(b)


def parse_hostport(spec, what="endpoint"):
    """'host:port' or '[v6]:port' -> (host, port); ConfigError naming ``what`` if bad."""
    s = str(spec).strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = s.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} {spec!r} is not HOST:PORT (e.g. 10.0.0.9:2379)")
    return host, int(port)


def _join(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoints(spec):
    """etcd endpoints from 'etcd://h:p,h:p', 'h:p,h:p', 'http://h:p' or a list ->
    ['h:p', ...]. ConfigError when empty or malformed."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or ())
    out = []
    for it in items:
        it = str(it).strip()
        for scheme in ("etcd://", "http://"):
            if it.startswith(scheme):
                it = it[len(scheme):]
        it = it.rstrip("/")
        if it:
            out.append(_join(*parse_hostport(it, "etcd endpoint")))
    if not out:
        raise ConfigError("--cluster needs at least one etcd endpoint: etcd://HOST:PORT[,HOST:PORT]")
    return out


def member_record(me):
    """The JSON record this daemon publishes: ``me`` checked, defaults filled in."""
    if not isinstance(me, dict):
        raise ConfigError("membership: me must be a dict with address and peer_port")
    rec = dict(me)
    addr = rec.get("address")
    if not isinstance(addr, str) or not addr:
        raise ConfigError("membership: me['address'] (the --advertise address) is missing")
    port = rec.get("peer_port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"membership: peer_port {port!r} must be 1-65535 (the port actually bound)")
    rec.setdefault("segment_size", 0)
    rec.setdefault("transports", ["tcp"])
    rec.setdefault("version", PROTOCOL_VERSION)
    rec.setdefault("incarnation", time.time_ns())
    rec.setdefault("started_at", time.time())
    rec.setdefault("pid", os.getpid())
    rec.setdefault("hostname", socket.gethostname())
    return rec


def member_name(rec):
    return _join(rec["address"], rec["peer_port"])


def _diff(old, new):
    added = {k for k, v in new.items() if k not in old or old[k].get("incarnation") != v.get("incarnation")}
    removed = {k for k, v in old.items() if k not in new or new[k].get("incarnation") != v.get("incarnation")}
    return added, removed


class _Unreachable(Exception):
    """No endpoint answered (connection refused, timeout, 5xx)."""


class _EtcdError(Exception):
    """etcd answered with an error."""


class _Etcd:
    """POST JSON to the v3 gateway of the first endpoint that answers."""

    def __init__(self, endpoints, timeout):
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.current = 0
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, path, body):
        reasons = []
        n = len(self.endpoints)
        for i in range(n):
            idx = (self.current + i) % n
            ep = self.endpoints[idx]
            req = urllib.request.Request(f"http://{ep}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            try:
                with self._opener.open(req, timeout=self.timeout) as r:
                    raw = r.read(_MAX_BODY)
            except urllib.error.HTTPError as e:
                try:
                    msg = json.loads(e.read(65536) or b"{}")
                    msg = msg.get("error") or msg.get("message") or msg
                except (ValueError, OSError):
                    msg = e.reason
                if e.code >= 500:       # no leader, shutting down: try the next one
                    reasons.append(f"{ep}: HTTP {e.code} {msg}")
                    continue
                self.current = idx
                raise _EtcdError(f"{ep}{path}: {msg}") from None
            except (OSError, HTTPException, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                reasons.append(f"{ep}: {reason}")
                continue
            self.current = idx
            # a streamed answer (keepalive) is one JSON object per line: take the first
            line = raw.strip().split(b"\n", 1)[0] if raw.strip() else b"{}"
            try:
                out = json.loads(line)
            except ValueError:
                raise _EtcdError(f"{ep}{path}: answer is not JSON: {raw[:200]!r}") from None
            if isinstance(out, dict) and "error" in out and "result" not in out:
                raise _EtcdError(f"{ep}{path}: {out['error']}")
            return out
        raise _Unreachable("; ".join(reasons))

    # -- the few calls we need --------------------------------------------------------------
    def grant(self, ttl):
        r = self.call("/v3/lease/grant", {"TTL": ttl})
        if not r.get("ID"):
            raise _EtcdError(f"lease grant failed: {r}")
        return int(r["ID"]), int(r.get("TTL", ttl))

    def keepalive(self, lease):
        """Remaining TTL after the refresh; 0 when the lease no longer exists."""
        r = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int((r.get("result") or r).get("TTL") or 0)

    def revoke(self, lease):
        self.call("/v3/lease/revoke", {"ID": str(lease)})

    def timetolive(self, lease):
        r = self.call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(r.get("TTL") or -1), int(r.get("grantedTTL") or 0)

    def create(self, key, value, lease):
        """Put key only if absent. Returns None on success, else the existing kv."""
        k = _b64(key)
        r = self.call("/v3/kv/txn", {
            "compare": [{"key": k, "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": {"key": k, "value": _b64(value), "lease": str(lease)}}],
            "failure": [{"request_range": {"key": k}}]})
        if r.get("succeeded"):
            return None
        kvs = (r.get("responses") or [{}])[0].get("response_range", {}).get("kvs") or []
        return kvs[0] if kvs else {}

    def put(self, key, value, lease):
        self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": str(lease)})

    def range_prefix(self, prefix, count_only=False):
        body = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        if count_only:
            body["count_only"] = True
        return self.call("/v3/kv/range", body)


def _token(r):
    h = r.get("header") or {}
    return (h.get("cluster_id"), h.get("member_id"), h.get("raft_term"), h.get("revision"))


class EtcdMembership:
    """Membership in etcd (see the module docstring). ``wait_for_etcd``: False (refuse
    at once when etcd is unreachable), True (wait as long as it takes) or seconds.
    ``owns_name``: the caller holds a listening socket on me's address and peer port, so
    a key already registered under that name is a dead earlier run's: it is replaced at
    once instead of waiting for its lease to expire (a restart after a SIGKILL rejoins
    in milliseconds, not a TTL)."""

    def __init__(self, endpoints, me, ttl=DEFAULT_TTL, wait_for_etcd=False, prefix=PREFIX,
                 timeout=None, owns_name=False):
        self.owns_name = owns_name
        if not (isinstance(ttl, (int, float)) and 1 <= ttl <= 3600):
            raise ConfigError(f"membership TTL {ttl!r} must be 1-3600 seconds")
        self.endpoints = parse_endpoints(endpoints)
        self.me = member_record(me)
        self.name = member_name(self.me)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.key = self.prefix + self.name
        self.ttl = float(ttl)
        self.period = self.ttl / 3
        self.wait_for_etcd = wait_for_etcd
        self._etcd = _Etcd(self.endpoints, timeout or min(1.0, self.period))
        self._value = json.dumps(self.me, sort_keys=True)
        self._lease = None
        self._view = {}
        self._token = None
        self._callbacks = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._down_since = None
        self._last_ok = None
        self._conflict = None
        self._registrations = 0

    # -- public -------------------------------------------------------------------------------
    def start(self):
        """Register (waiting for etcd if told to) and start the keepalive thread."""
        deadline = None
        if self.wait_for_etcd not in (False, True, None):
            deadline = time.monotonic() + float(self.wait_for_etcd)
        warned = False
        while True:
            try:
                self._register(initial=True)
                self._refresh(force=True)
                break
            except _Unreachable as e:
                eps = ",".join(self.endpoints)
                if not self.wait_for_etcd:
                    raise ClusterUnavailable(
                        f"etcd unreachable at {eps} ({e}): start etcd there, fix --cluster, "
                        f"or pass --wait-for-cluster to wait for it") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise ClusterUnavailable(
                        f"etcd still unreachable at {eps} after waiting {self.wait_for_etcd} s "
                        f"({e}): start etcd there or fix --cluster") from None
                if not warned:
                    log.warning("etcd unreachable at %s (%s): waiting for it", eps, e)
                    warned = True
                if self._stop.wait(min(0.5, self.period)):
                    raise ClusterUnavailable("membership closed while waiting for etcd") from None
            except _EtcdError as e:
                raise ClusterUnavailable(f"etcd at {self._endpoint()} refused the registration: {e}") from None
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="kvstore-membership", daemon=True)
        self._thread.start()
        log.info("registered in etcd as %s (incarnation %s, lease TTL %.0f s); %d members",
                 self.name, self.me["incarnation"], self.ttl, len(self._view))
        return self

    def members(self):
        """The last known membership: {"addr:port": record}, this daemon included. Kept
        while etcd is unreachable."""
        with self._lock:
            return {k: dict(v) for k, v in self._view.items()}

    def on_change(self, callback):
        """callback(members, added, removed) on every change of the view (added/removed:
        sets of names; a member that restarted, new incarnation, is in both). Called from
        the membership thread; exceptions are logged, never raised."""
        self._callbacks.append(callback)

    def status(self):
        now = time.monotonic()
        return {"backend": "etcd", "endpoint": self._endpoint(), "name": self.name,
                "etcd_reachable": self._down_since is None,
                "etcd_down_s": round(now - self._down_since, 3) if self._down_since else 0.0,
                "registered": self._lease is not None and
                (self._view.get(self.name) or {}).get("incarnation") == self.me["incarnation"],
                "lease": self._lease, "members": len(self._view),
                "registrations": self._registrations, "conflict": self._conflict}

    def close(self):
        """Stop the thread and revoke the lease (the others drop us at once). Idempotent."""
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(self._etcd.timeout * 4 + 1)
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                self._etcd.revoke(lease)
            except (_Unreachable, _EtcdError) as e:
                log.info("could not revoke the membership lease (%s); it expires in %.0f s", e, self.ttl)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- internals ----------------------------------------------------------------------------
    def _endpoint(self):
        return self._etcd.endpoints[self._etcd.current]

    def _register(self, initial, lease=None):
        """Create our key under a (new) lease. initial: wait up to the holder's TTL for a
        dead predecessor's key to expire, then raise DaemonStartError. Later: return
        False while someone else holds the name."""
        new_lease = lease is None
        if new_lease:
            lease, _ = self._etcd.grant(max(1, math.ceil(self.ttl)))
        try:
            deadline = None
            while True:
                held = self._etcd.create(self.key, self._value, lease)
                if held is None:
                    break
                try:
                    rec = json.loads(_unb64(held.get("value")))
                except ValueError:
                    rec = {}
                if rec.get("incarnation") == self.me["incarnation"]:
                    self._etcd.put(self.key, self._value, lease)      # ours, old lease
                    break
                if initial and self.owns_name:
                    # the caller holds a listening socket on this very address and port
                    # (a local address): no live daemon can be serving it, so the key is
                    # a dead run's (a SIGKILL, then a restart): take it over at once
                    self._etcd.put(self.key, self._value, lease)
                    log.info("replaced the registration of an earlier run of %s (incarnation %s, "
                             "pid %s), which is gone", self.name, rec.get("incarnation"), rec.get("pid"))
                    break
                if not initial:
                    if self._conflict != rec.get("incarnation"):
                        log.error("another daemon (pid %s on %s, incarnation %s) registered as %s "
                                  "while this one was away; this daemon stays out of the "
                                  "membership until that one leaves. Give each daemon its own "
                                  "--advertise/--peer-port", rec.get("pid"), rec.get("hostname"),
                                  rec.get("incarnation"), self.name)
                        self._conflict = rec.get("incarnation")
                    if new_lease:
                        self._revoke_quietly(lease)
                    return False
                if deadline is None:
                    granted = 0
                    if held.get("lease"):
                        _, granted = self._etcd.timetolive(int(held["lease"]))
                    deadline = time.monotonic() + (granted or self.ttl) + 1.0
                if time.monotonic() > deadline:
                    raise DaemonStartError(
                        f"another live daemon is registered as {self.name} (pid {rec.get('pid')} "
                        f"on {rec.get('hostname')}, started {time.ctime(rec.get('started_at') or 0)}): "
                        f"stop it, or give this one another --advertise address or --peer-port")
                if self._stop.wait(0.2):
                    raise ClusterUnavailable("membership closed during registration")
                if self._etcd.keepalive(lease) <= 0:       # ours must outlive the wait
                    lease, _ = self._etcd.grant(max(1, math.ceil(self.ttl)))
                    new_lease = True
        except BaseException:
            if new_lease:
                self._revoke_quietly(lease)
            raise
        if self._lease is not None and self._lease != lease:
            self._revoke_quietly(self._lease)
        self._lease = lease
        self._conflict = None
        self._registrations += 1
        self._token = None          # read the full view next time
        return True

    def _revoke_quietly(self, lease):
        try:
            self._etcd.revoke(lease)
        except (_Unreachable, _EtcdError):
            pass

    def _refresh(self, force=False):
        if not force and self._token is not None:
            if _token(self._etcd.range_prefix(self.prefix, count_only=True)) == self._token:
                return
        r = self._etcd.range_prefix(self.prefix)
        view = {}
        for kv in r.get("kvs") or []:
            name = _unb64(kv.get("key")).decode(errors="replace")[len(self.prefix):]
            try:
                rec = json.loads(_unb64(kv.get("value")))
            except ValueError:
                log.debug("membership: unreadable record under %s ignored", name)
                continue
            if isinstance(rec, dict):
                view[name] = rec
        self._token = _token(r)
        with self._lock:
            old, self._view = self._view, view
        added, removed = _diff(old, view)
        if added or removed:
            log.info("membership: %d members (+%s -%s)", len(view), sorted(added) or "", sorted(removed) or "")
            for cb in list(self._callbacks):
                try:
                    cb({k: dict(v) for k, v in view.items()}, added, removed)
                except Exception:
                    log.exception("membership on_change callback failed")

    def _tick(self):
        if self._lease is None:
            self._register(initial=False)
        elif self._etcd.keepalive(self._lease) <= 0:
            log.warning("membership lease of %s is gone (etcd lost it, or was unreachable for "
                        "longer than %.0f s): registering again", self.name, self.ttl)
            self._lease = None
            self._register(initial=False)
        self._refresh()
        mine = self._view.get(self.name)
        if self._lease is not None and (mine is None or mine.get("incarnation") != self.me["incarnation"]):
            log.warning("membership key of %s vanished from etcd: registering again", self.name)
            self._register(initial=False, lease=self._lease)
            self._refresh(force=True)

    def _run(self):
        while not self._stop.wait(self.period):
            try:
                self._tick()
                self._last_ok = time.monotonic()
                if self._down_since is not None:
                    log.info("etcd reachable again at %s after %.1f s; %d members",
                                self._endpoint(), time.monotonic() - self._down_since, len(self._view))
                    self._down_since = None
            except _Unreachable as e:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("etcd unreachable (%s): serving on the last known membership "
                                "(%d members); retrying every %.1f s", e, len(self._view), self.period)
            except Exception as e:     # never let the thread die
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("membership: %s: %s; retrying every %.1f s", type(e).__name__, e, self.period)
                self._token = None


class StaticMembership:
    """``--peers`` without etcd: the members are the given list (plus this daemon).
    Liveness is not known here; the transport finds out. Same API as EtcdMembership."""

    def __init__(self, peers, me):
        self.me = member_record(me)
        self.name = member_name(self.me)
        items = peers.split(",") if isinstance(peers, str) else list(peers or ())
        self._view = {}
        for p in items:
            if str(p).strip():
                host, port = parse_hostport(p, "--peers entry")
                self._view[_join(host, port)] = {"address": host, "peer_port": port, "static": True}
        self._view[self.name] = dict(self.me)
        self._callbacks = []
        self._started = False

    def start(self):
        if not self._started:
            self._started = True
            view = self.members()
            for cb in self._callbacks:
                try:
                    cb(view, set(view), set())
                except Exception:
                    log.exception("membership on_change callback failed")
        return self

    def members(self):
        return {k: dict(v) for k, v in self._view.items()}

    def on_change(self, callback):
        self._callbacks.append(callback)

    def status(self):
        return {"backend": "static", "name": self.name, "etcd_reachable": None,
                "registered": True, "members": len(self._view)}

    def close(self):
        self._started = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
