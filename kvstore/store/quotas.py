"""Per-namespace quotas: each namespace's share of the segment, and who may evict whom.

A namespace is a scope for keys (kvstore.keys): two clients that pass the same namespace
see the same objects, and any client may pass any namespace. It is not access control
(the socket's and segment's file permissions are; tenants that must not read each other's
blocks need separate daemons). What a namespace can get is a quota, set per namespace in
the daemon's config (``namespace_quotas``): a guaranteed share of the segment.

The rules, applied by kvstore.store.objects when it must evict to make room:
- A namespace may use free space beyond its quota (it borrows what nobody needs).
- When room must be made for a namespace that is at or over its quota, its own
  least-recently-used objects go first.
- Nobody's puts (nor the watermark sweep) evict another namespace's objects below that
  namespace's quota. Namespaces without a quota have a guaranteed share of 0 and share
  what the quotas leave, in plain LRU order, as before.
- Pinned objects and objects being created (create() not sealed yet) count as used and
  cannot be evicted: "held fixed". A namespace with a quota may hold up to its quota
  fixed; the namespaces without one together may hold up to what the quotas leave. So
  neither pinning nor unsealed creations can take anyone's guaranteed share.
- A namespace that cannot get room under these rules gets QuotaExceeded (a StoreFull).

Usage is counted in extent bytes of sealed and being-created objects; space granted to a
client but not yet sealed (its arena, at most 64 MiB per client) is not counted.

Owns: the quotas, each namespace's used and pinned bytes (in memory; rebuilt from the
index at start-up; changes of a transaction are applied only when it commits) and the
eviction filter. Without quotas configured it costs nothing: the daemon keeps no counts.
Must never: let a victim walk take an object that would leave its namespace below its
quota, unless that namespace is the one asking.
"""

from collections import defaultdict

from kvstore.errors import QuotaExceeded
from kvstore.keys import namespace_prefix

from . import allocator


#: namespaces without a quota that stats() lists at most (those using the most)
REPORT_MOST = 100


def namespace_of(key):
    """The namespace prefix (length byte and name) of an index key."""
    return bytes(key[:1 + key[0]])


def _name(ns):
    return ns[1:].decode("utf-8", "replace")


class Quotas:
    """Quotas (namespace name -> bytes) and each namespace's usage."""

    def __init__(self, quotas, segment_size):
        self.quota = {namespace_prefix(name): int(q) for name, q in quotas.items()}
        self.reserved = sum(self.quota.values())
        self.unreserved = max(0, segment_size - self.reserved)
        self.used = defaultdict(int)         # namespace prefix -> extent bytes (committed)
        self.pinned = defaultdict(int)       # namespace prefix -> pinned extent bytes
        #: bumped by every change of usage or pins (and by ``touch``), committed or not:
        #: a victim walk that found nothing allowed stays futile while it is unchanged
        self.version = 0

    def rebuild(self, keys, recs):
        """Count usage from every record (keys and records as maintenance.load_records)."""
        self.used.clear()
        self.pinned.clear()
        ext = [allocator.extent_size(int(n)) for n in recs["size"]]
        # "pinned" counts every byte that cannot be evicted: pinned and being created
        pinned = ((recs["flags"] & 1).astype(bool) | (recs["state"] != 2)).tolist()
        for key, e, p in zip(keys, ext, pinned):
            ns = namespace_of(key)
            self.used[ns] += e
            if p:
                self.pinned[ns] += e

    # ---- reading, with a transaction's pending changes -----------------------------------
    def used_by(self, b, ns):
        return self.used[ns] + b.quota_delta.get(ns, 0)

    def _pinned_by(self, b, ns):
        return self.pinned[ns] + b.pin_delta.get(ns, 0)

    def excess(self, b, ns):
        """Bytes a namespace uses beyond its guaranteed share (negative: below it)."""
        return self.used_by(b, ns) - self.quota.get(ns, 0)

    # ---- changes (recorded in the batch; applied at commit) ------------------------------
    def charge(self, b, key, ext, pinned=False):
        self.version += 1
        ns = namespace_of(key)
        b.quota_delta[ns] = b.quota_delta.get(ns, 0) + ext
        if pinned:
            b.pin_delta[ns] = b.pin_delta.get(ns, 0) + ext

    def credit(self, b, key, ext, pinned=False):
        self.charge(b, key, -ext, pinned)

    def repin(self, b, key, ext, pinned, check=True):
        self.version += 1
        ns = namespace_of(key)
        if pinned and check:
            self.check_pin(b, ns, ext, key)
        b.pin_delta[ns] = b.pin_delta.get(ns, 0) + (ext if pinned else -ext)

    def check_pin(self, b, ns, ext, key, op="pin"):
        """Raise QuotaExceeded if ext more bytes of ns that cannot be evicted (a pin, or a
        create() not sealed yet) would take a guaranteed share."""
        if ns in self.quota:
            if self._pinned_by(b, ns) + ext > self.quota[ns]:
                raise QuotaExceeded(
                    f"{op} of {key[len(ns):]!r}: namespace {_name(ns)!r} would hold more than its "
                    f"quota of {self.quota[ns]} bytes in pinned and unsealed objects; unpin, seal "
                    f"or delete some of its objects, or raise its quota (namespace_quotas)")
            return
        shared = sum(v for k, v in self.pinned.items() if k not in self.quota)
        shared += sum(v for k, v in b.pin_delta.items() if k not in self.quota)
        if shared + ext > self.unreserved:
            raise QuotaExceeded(
                f"{op} of {key[len(ns):]!r}: namespaces without a quota would hold more than the "
                f"{self.unreserved} bytes the quotas leave in pinned and unsealed objects; unpin, "
                f"seal or delete objects, or give namespace {_name(ns)!r} a quota "
                f"(namespace_quotas)")

    def commit(self, b):
        for ns, d in b.quota_delta.items():
            self.used[ns] += d
        for ns, d in b.pin_delta.items():
            self.pinned[ns] += d
        for ns in b.quota_delta:                 # an empty namespace is forgotten (any
            if not self.used.get(ns) and not self.pinned.get(ns):   # number may come and go)
                self.used.pop(ns, None)
                self.pinned.pop(ns, None)

    # ---- eviction ------------------------------------------------------------------------
    def over_share(self, b, ns, ext):
        """True if ns has a quota and ext more bytes would take it past it."""
        return ns in self.quota and self.used_by(b, ns) + ext > self.quota[ns]

    def victim_filter(self, b, asking=None, own_only=False):
        """A predicate (key, ext) -> bool for a victim walk made for namespace ``asking``
        (None: the watermark sweep). The walk credits each victim it takes to the batch
        (``credit``), so the usage read here already counts earlier victims of the walk."""
        def allow(key, ext):
            ns = namespace_of(key)
            if ns == asking:
                return True
            if own_only:
                return False
            return self.used_by(b, ns) - ext >= self.quota.get(ns, 0)
        return allow

    def evictable_anywhere(self, b, asking=None):
        """False when no namespace (other than ``asking``) is above its quota, so a walk
        for it would find nothing (saves walking a long LRU table for nothing)."""
        if asking is not None and self.used_by(b, asking) > 0:
            return True
        names = set(self.used) | set(b.quota_delta)
        return any(self.excess(b, ns) > 0 for ns in names if ns != asking)

    def full_error(self, ns, ext):
        return QuotaExceeded(
            f"no room for {ext} bytes in namespace {_name(ns)!r}: it is at its quota of "
            f"{self.quota.get(ns, 0)} bytes and the rest of the segment is other namespaces' "
            f"guaranteed share, held or pinned; delete or release some of its objects, or raise "
            f"its quota (namespace_quotas)")

    def report(self):
        """{namespace: {"used", "pinned", "quota"}} for stats(): every namespace with a
        quota and the REPORT_MOST others using the most (a STATS reply has a size limit,
        and any number of namespaces may be in use; ``in_use`` counts them all)."""
        others = sorted((ns for ns, v in self.used.items() if v and ns not in self.quota),
                        key=lambda ns: -self.used[ns])[:REPORT_MOST]
        return {_name(ns): {"used": self.used.get(ns, 0), "pinned": self.pinned.get(ns, 0),
                            "quota": self.quota.get(ns, 0)} for ns in sorted(set(self.quota) | set(others))}

    def in_use(self):
        """How many namespaces have objects."""
        return sum(1 for v in self.used.values() if v)
