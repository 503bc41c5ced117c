"""Where objects are: rendezvous-hashed homes and the location records they keep.

Owns: the choice of a key's home daemons (``homes``/``homes_many``: highest-random-weight
hashing, the same answer on every daemon that has the same membership, with no
coordination; a key's score on a member is fmix64(xxh3(key) ^ xxh3(member id)), so one
hash per key and one integer mix per member: numpy does the mixing for every member at
once, ~1 ms for 64 keys at 1,000 members), the plan of a batched lookup (``plan``: each key to
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

import functools
from typing import NamedTuple

import numpy as np
import xxhash

#: How many daemons keep the location records of one key.
HOME_COPIES = 2
#: Memberships up to this size are scored in plain Python (numpy costs more there).
_SMALL = 24
_M64 = (1 << 64) - 1
_C1, _C2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53


def _fmix(x):
    """MurmurHash3's 64-bit finalizer (a bijection with full avalanche) on an int."""
    x ^= x >> 33
    x = (x * _C1) & _M64
    x ^= x >> 33
    x = (x * _C2) & _M64
    return x ^ (x >> 33)


def _fmix_np(x):
    """The same on a uint64 array (wrapping multiplies: identical results)."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(_C1)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(_C2)
    return x ^ (x >> np.uint64(33))


@functools.lru_cache(maxsize=65536)
def _seed(member):
    return xxhash.xxh3_64_intdigest(member.encode())


@functools.lru_cache(maxsize=8)
def _seeds(members):
    return np.array([_seed(m) for m in members], dtype=np.uint64)


@functools.lru_cache(maxsize=8)
def _small_seeds(members):
    return [(_seed(m), m) for m in members]


def homes(key, members, k=HOME_COPIES):
    """The k members (ids, e.g. "10.0.0.2:7700") that keep key's location records, best
    first. Adding or removing one member moves only the keys whose top k it enters or
    leaves (about k/N of them)."""
    members = tuple(members)
    if len(members) <= _SMALL:
        h = xxhash.xxh3_64_intdigest(key)
        return [m for _, m in sorted([(_fmix(h ^ s), m) for s, m in _small_seeds(members)], reverse=True)[:k]]
    return homes_many([key], members, k)[0]


def homes_many(keys, members, k=HOME_COPIES):
    """homes() of every key, computed together (one hash per key, the members' scores
    of a block of keys in one numpy pass)."""
    members = tuple(members)
    if not members:
        return [[] for _ in keys]
    hs = [xxhash.xxh3_64_intdigest(key) for key in keys]
    if len(members) <= _SMALL:
        seeds = _small_seeds(members)
        return [[m for _, m in sorted([(_fmix(h ^ s), m) for s, m in seeds], reverse=True)[:k]]
                for h in hs]
    seeds = _seeds(members)
    n = len(members)
    k = min(k, n)
    out = []
    block = max(1, (1 << 20) // n)                     # ~8 MB of scores at a time
    with np.errstate(over="ignore"):
        for lo in range(0, len(hs), block):
            scores = _fmix_np(np.array(hs[lo:lo + block], dtype=np.uint64)[:, None] ^ seeds[None, :])
            top = np.argpartition(scores, n - k, axis=1)[:, n - k:]          # the k best, any order
            best = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(best, axis=1, kind="stable")[:, ::-1]        # best first
            for row in np.take_along_axis(top, order, axis=1).tolist():
                out.append([members[i] for i in row])
    return out


def plan(keys, members, alive=None, k=HOME_COPIES):
    """{home: [keys]} for one batched lookup: each key goes to its best home that
    ``alive(home)`` says is up (all, when alive is None); keys with no live home are
    listed under None (they are misses)."""
    out = {}
    keys = list(keys)
    for key, hs in zip(keys, homes_many(keys, members, k)):
        target = None
        for h in hs:
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
