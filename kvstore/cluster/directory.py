"""Where objects are: rendezvous-hashed homes and the location records they keep.

Owns: the choice of a key's home daemons (``homes``: highest-random-weight hashing of
the key against every member's id, the same answer on every daemon that has the same
membership, with no coordination), the plan of a batched lookup (``plan``: each key to
its first live home, one request per home, all sent at once, so a batch costs one round
trip whatever the cluster size), and the soft-state table a home keeps
(``LocationTable``: key -> the holders that announced it, with the extent, checksum and
the holder's incarnation).

Why this design (docs/cluster.md has the arithmetic at 1,000 hosts and 100 million
blocks): etcd holds membership only, one key per daemon; locations live spread over the
daemons themselves, each key's records on ``HOME_COPIES`` homes, so losing a daemon
loses no location another home does not also have, and no process sees every lookup.
Records are soft state: written by holders asynchronously in batches (ANNOUNCE),
removed when the holder evicts or deletes (WITHDRAW), dropped wholesale when a
holder's incarnation changes or it leaves the membership, and rebuilt by holders
re-announcing what they hold (after their restart, or when a home joins or comes
back). A record can therefore be stale for a moment; the holder re-checks every read
against its own index and the reader verifies the checksum, so a stale record costs a
retry on the next holder, never wrong bytes.
Must never: do I/O (callers send and receive); keep a record of a holder incarnation
older than the one last announced for it; grow without bound (``max_records``).
"""

from typing import NamedTuple

import xxhash

#: How many daemons keep the location records of one key.
HOME_COPIES = 2


def _score(member, key):
    return xxhash.xxh3_64_intdigest(key, seed=xxhash.xxh3_64_intdigest(member.encode()))


def homes(key, members, k=HOME_COPIES):
    """The k members (ids, e.g. "10.0.0.2:7700") that keep key's location records, best
    first. Adding or removing one member moves only the keys whose top k it enters or
    leaves (about k/N of them)."""
    return sorted(members, key=lambda m: _score(m, key), reverse=True)[:k]


def plan(keys, members, alive=None, k=HOME_COPIES):
    """{home: [keys]} for one batched lookup: each key goes to its best home that
    ``alive(home)`` says is up (all, when alive is None); keys with no live home are
    listed under None (they are misses)."""
    out = {}
    ids = list(members)
    for key in keys:
        target = None
        for h in homes(key, ids, k):
            if alive is None or alive(h):
                target = h
                break
        out.setdefault(target, []).append(key)
    return out


class Location(NamedTuple):
    """One holder's copy of an object, as its ANNOUNCE described it."""
    holder: str           # member id of the holding daemon
    incarnation: int      # the holder's run; a newer run voids the records of older ones
    offset: int           # extent in the holder's segment (checked again by the holder)
    size: int
    checksum: int         # recorded at seal; the reader verifies what arrives


class LocationTable:
    """The records one home keeps. Not thread-safe: its owner serialises calls."""

    def __init__(self, max_records=10_000_000):
        self.by_key = {}                 # key -> {holder: Location}
        self.by_holder = {}              # holder -> (incarnation, set of keys)
        self.max_records = max_records
        self.records = 0
        self.refused = 0                 # announcements dropped because the table was full

    def announce(self, holder, incarnation, items):
        """Record (key, offset, size, checksum) items of holder's run ``incarnation``.
        A newer incarnation first drops every record of the older run; an older one is
        ignored (a late message of a run that has ended). Returns how many were kept."""
        inc_keys = self.by_holder.get(holder)
        if inc_keys is not None and inc_keys[0] > incarnation:
            return 0
        if inc_keys is not None and inc_keys[0] < incarnation:
            self.drop_holder(holder)
            inc_keys = None
        if inc_keys is None:
            inc_keys = self.by_holder[holder] = (incarnation, set())
        keys = inc_keys[1]
        kept = 0
        for key, offset, size, checksum in items:
            per = self.by_key.get(key)
            if per is None:
                if self.records >= self.max_records:
                    self.refused += 1
                    continue
                per = self.by_key[key] = {}
            if holder not in per:
                if self.records >= self.max_records:
                    self.refused += 1
                    continue
                self.records += 1
            per[holder] = Location(holder, incarnation, offset, size, checksum)
            keys.add(key)
            kept += 1
        return kept

    def withdraw(self, holder, incarnation, keys):
        """The holder no longer has these keys (evicted, deleted)."""
        inc_keys = self.by_holder.get(holder)
        if inc_keys is None or inc_keys[0] != incarnation:
            return
        for key in keys:
            per = self.by_key.get(key)
            if per is not None and per.pop(holder, None) is not None:
                self.records -= 1
                inc_keys[1].discard(key)
                if not per:
                    del self.by_key[key]

    def drop_holder(self, holder):
        """Forget every record of holder (it left the membership or restarted)."""
        inc_keys = self.by_holder.pop(holder, None)
        if inc_keys is None:
            return 0
        for key in inc_keys[1]:
            per = self.by_key.get(key)
            if per is not None and per.pop(holder, None) is not None:
                self.records -= 1
                if not per:
                    del self.by_key[key]
        return len(inc_keys[1])

    def retain(self, members):
        """Keep only the records of holders in members {id: incarnation}: a holder that
        left, or came back as a new run, loses its old records here."""
        for holder, (inc, _) in list(self.by_holder.items()):
            if members.get(holder) != inc:
                self.drop_holder(holder)

    def lookup(self, keys):
        """{key: [Location, ...]} for the keys with at least one holder."""
        out = {}
        for key in keys:
            per = self.by_key.get(key)
            if per:
                out[key] = list(per.values())
        return out
