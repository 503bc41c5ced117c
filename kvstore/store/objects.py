"""What clients ask of the store, applied by the daemon: seal, create, abort, delete, pin,
space grants; and the one order of effects that keeps lock-free readers safe.

Owns: ``Store`` (the daemon's LMDB index, the published table and the slots file seen as
one) and ``Batch`` (one LMDB write transaction and the table changes it implies).

The order of effects, the whole safety argument of the store:
- An object becomes visible only after its record is committed: ``Batch.show`` queues the
  table entry, published after the commit.
- An object stops being visible before anything else happens to it: ``Batch.hide``
  unpublishes it at once, inside the transaction (restored if the transaction aborts).
- An extent is freed only after its record is hidden, a full fence, and a scan of every
  client's hold table that does not find it (kvstore.slots explains the client's half);
  an extent still held goes to ``doomed`` and is freed by a later ``reclaim``.

Space for puts: a client is granted an arena (``grant``) and fills it from the front
without asking; each seal must lie at or after the arena's frontier. An arena's record
is keyed by its frontier (moved with it), so the key always lies in the space the arena
still reserves: objects of its used part may be deleted and their space granted again,
even at the arena's first offset, without shadowing or replacing its record. A client
gives an arena back naming its end (``give_back``). Space the client
skipped (a put that failed after taking space) is freed when a later seal passes it,
and the rest of the arena when the client gives it back or goes away.
Must never: publish an object before its commit, free an extent a hold table names, or
accept a seal outside the space granted to its client.
"""

import enum
import time
from typing import NamedTuple, Optional

from kvstore import record
from kvstore.errors import (AlreadySealed, NotCreator, ObjectNotFound, StoreFull)
from kvstore.keys import user_key
from kvstore.record import Flag, Record, State
from kvstore.slots import fence

from . import allocator
from .policy import Advice, Candidate, ClockPolicy
from .quotas import Quotas, namespace_of
from .schema import ARENA, LE64, U64, pack64

extent_size = allocator.extent_size


class SealResult(enum.Enum):
    SEALED = "sealed"            # recorded and published
    DUPLICATE = "duplicate"      # the same seal again (re-sent after a reconnect): nothing to do
    EXISTS = "exists"            # the key was taken meanwhile: this copy's space goes back
    INVALID = "invalid"          # outside the space granted to the client: ignored


class NoRoom(StoreFull):
    """StoreFull found before anything was changed (no eviction was tried)."""


class Contended(Exception):
    """A victim of an eviction got held while the eviction ran: apply the turn again."""


class Created(NamedTuple):
    """What create() got: the offset reserved, or the state of the object already there."""
    offset: Optional[int]
    existing: Optional[State]


class Batch:
    """One write transaction of the daemon, with the table changes it implies."""

    def __init__(self, store):
        self.store = store
        self.publish = {}
        self.hidden = []
        self._held = None
        self.quota_delta = {}        # namespace -> bytes used (kvstore.store.quotas), at commit
        self.pin_delta = {}
        #: offsets sealed (or refused) since the seal counters last moved (the Store's set,
        #: shared by every batch of one loop turn): their clients may hold them as their
        #: own puts until the counter moves on, so their space is freed on a later turn
        self.sealed_now = store.sealed_now

    def __enter__(self):
        self._write = self.store.env.write()
        self.txn = self._write.__enter__()
        return self

    def __exit__(self, etype, exc, tb):
        try:
            self._write.__exit__(etype, exc, tb)
        except BaseException:
            self._restore()
            raise
        if etype is not None:
            self._restore()
            return False
        if self.store.quotas is not None:
            self.store.quotas.commit(self)
        for key, rec in self.publish.items():
            self.store.publish(key, rec)
        if self.store.observer is not None and (self.publish or self.hidden):
            self.store.observer(self.publish, self.hidden)     # the cluster's announcer
        return False

    def _restore(self):
        """The transaction did not commit: what it hid is still in the index; show it again."""
        if not self.hidden:
            return
        s = self.store
        with s.env.read() as txn:
            for key in self.hidden:
                raw = txn.get(key, db=s.dbs.objects)
                if raw is not None:
                    s.publish(key, record.unpack(raw))

    def hide(self, key):
        self.publish.pop(key, None)
        if self.store.table.unpublish(key):
            self.hidden.append(key)

    def show(self, key, rec):
        self.publish[key] = rec

    def held(self, rescan=False):
        """Offsets held by any client (a set): scanned after a full fence, so every hold
        taken before that point is seen."""
        if self._held is None or rescan:
            fence()
            self._held = set(self.store.held_offsets().tolist())
        return self._held


class Store:
    """The daemon's store: LMDB index (truth), published table (what readers see), slots."""

    def __init__(self, env, table, held_offsets, incarnation=0):
        self.env, self.dbs, self.table = env, env.dbs, table
        self.held_offsets = held_offsets          # () -> sorted uint64 array, from kvstore.slots
        self.policy = ClockPolicy()
        self.incarnation = incarnation
        with env.read() as txn:
            self.segment_size = env.meta_int(txn, "size")
        self.grow_table = None                    # set by the daemon: (needed entries) -> None
        self.doomed_added = False                 # an extent went to doomed: reclaim soon
        self.sealed_now = set()                   # see Batch.sealed_now; the daemon empties it
        #: sizes at least this large found no room in this loop turn (the daemon resets it
        #: each turn): a flood of requests that cannot fit costs one walk per turn
        self.full_at = float("inf")
        self.quotas = None                        # kvstore.store.quotas.Quotas, if configured
        #: (published {key: Record}, hidden [key]) -> None after each commit; the cluster
        #: announces and withdraws locations through it (None on a single host: no cost)
        self.observer = None
        self.default_replicas = 1                 # a put's replicas when it names none (0)
        #: Quotas.version at which the watermark sweep last found no object it may take
        #: (every namespace above its quota by less than one of its extents): it walks
        #: again only after usage, pins or the evictable objects changed
        self._futile_sweep = None

    def set_quotas(self, quotas, keys, recs):
        """Enforce per-namespace quotas from now on (quotas: namespace name -> bytes),
        counting current usage from every record (keys, recs as load_records gives)."""
        if not quotas:
            self.quotas = None
            return
        q = Quotas(quotas, self.segment_size)
        q.rebuild(keys, recs)
        self.quotas = q

    def batch(self):
        return Batch(self)

    def publish(self, key, rec):
        if not self.table.publish(key, rec):
            self.grow_table(self.table.live + 1)
            if not self.table.publish(key, rec):
                raise RuntimeError("the published table has no room after growing")

    # ---- space --------------------------------------------------------------------------
    def _lru_bytes(self, txn, delta):
        """Bytes of the objects in the lru table (evictable unless held)."""
        self.env.set_meta(txn, "lru_bytes", max(0, self.env.meta_int(txn, "lru_bytes") + delta))

    def _free(self, txn, off, ext):
        allocator.free(txn, self.dbs, off, ext)
        self.env.add_used(txn, -ext)

    def _release_extents(self, b, extents):
        """Free extents whose records are already hidden, unless a client holds them
        (those are doomed: freed by a later reclaim)."""
        if not extents:
            return
        held = b.held(rescan=True)
        for off, ext in extents:
            if off in held or off in b.sealed_now:   # its client may read it as its own put
                b.txn.put(pack64(off), LE64.pack(ext), db=self.dbs.doomed)
                self.doomed_added = True
            else:
                self._free(b.txn, off, ext)

    def allocate(self, b, ext, ns=None):
        """An extent of ext bytes for namespace ns, evicting least-recently-used objects
        if needed (with quotas, only those kvstore.store.quotas allows, the asking
        namespace's own first when it is over its quota).

        Victims are taken out of the index and their space tried BEFORE anyone sees them
        go: only once the allocation fits are they unpublished (then a fence and a hold
        scan: a victim a reader took meanwhile makes the turn run again). So a request
        that cannot be satisfied hides nothing from readers."""
        txn = b.txn
        off = allocator.alloc(txn, self.dbs, ext)
        if off is None:
            free = (self.segment_size & ~(allocator.ALIGN - 1)) - self.env.meta_int(txn, "used")
            if ext > free + self.env.meta_int(txn, "lru_bytes") or ext >= self.full_at:
                raise self._full(ext, NoRoom)     # evicting everything would not do
            q = self.quotas
            if q is None:
                filters = [None]
            else:
                filters = [q.victim_filter(b, ns)]
                if q.over_share(b, ns, ext):
                    filters.insert(0, q.victim_filter(b, ns, own_only=True))
                if not q.evictable_anywhere(b, ns):
                    raise q.full_error(ns, ext) if q.over_share(b, ns, ext) else self._full(ext, NoRoom)
            victims = []
            while off is None:
                more = self._take_victims(b, need=ext, allow=filters[0])
                if not more and len(filters) > 1:
                    filters.pop(0)
                    continue
                if not more:
                    if q is None:
                        self.full_at = min(self.full_at, ext)   # the rest of this turn: no walk
                        raise self._full(ext)     # the turn is abandoned: nothing was hidden
                    raise q.full_error(ns, ext) if q.over_share(b, ns, ext) else self._full(ext)
                victims += more
                for _, voff, vext in more:
                    self._free(txn, voff, vext)
                off = allocator.alloc(txn, self.dbs, ext)
            for key, _, _ in victims:
                b.hide(key)
            held = b.held(rescan=True)
            if any(voff in held for _, voff, _ in victims):
                raise Contended()                 # a reader got there first: run it again
        self.env.add_used(txn, ext)
        return off

    @staticmethod
    def _full(ext, cls=StoreFull):
        return cls(f"no room for {ext} bytes: everything left is held, pinned, being created "
                         f"or granted to clients; release or delete objects, or start the daemon "
                         f"with a larger --size")

    def evict(self, b, need=0, target_used=None, max_objects=256):
        """The watermark sweep: evict in CLOCK order until ``need`` bytes were freed (or
        used <= target_used). Victims are unpublished first, then freed once no hold
        table names them. Returns the number of objects evicted."""
        allow, q, allowed = None, self.quotas, [False]
        if q is not None:
            if q.version == self._futile_sweep or not q.evictable_anywhere(b):
                return 0                          # everyone is within their quota
            share = q.victim_filter(b)

            def allow(key, ext):
                ok = share(key, ext)
                allowed[0] = allowed[0] or ok
                return ok
        victims = self._take_victims(b, need, target_used, max_objects, allow)
        if q is not None and not allowed[0]:
            self._futile_sweep = q.version        # no walk again until something changes
        for key, _, _ in victims:
            b.hide(key)
        self._release_extents(b, [(off, ext) for _, off, ext in victims])
        return len(victims)

    def _take_victims(self, b, need=0, target_used=None, max_objects=256, allow=None):
        """Walk the CLOCK order asking the policy; take victims out of the index (their
        records and lru entries, nothing else) until ``need`` bytes (or used <=
        target_used). ``allow(key, extent)`` (quotas) may rule candidates out first.
        Returns [(key, offset, extent)]; the caller hides and frees them."""
        txn, d, table = b.txn, self.dbs, self.table
        held = b.held() | b.sealed_now
        freed, victims = 0, []
        cur = txn.cursor(db=d.lru)
        rewalk = False
        cur.first()
        used = self.env.meta_int(txn, "used")
        while len(victims) < max_objects:
            entry = cur.key()
            if not entry:
                if not rewalk:
                    break
                rewalk = False
                cur.first()
                continue
            key = entry[8:]
            raw = txn.get(key, db=d.objects)
            if raw is None:                       # defensive: an entry without its object
                cur.delete()
                continue
            rec = record.unpack(raw)
            if allow is not None and not allow(key, extent_size(rec.size)):
                cur.next()
                continue
            bucket = table.find(key)
            referenced = bucket is not None and bool(table.marks[bucket])
            advice = self.policy.advise(Candidate(key, rec.size, rec.offset in held, referenced))
            if advice is Advice.SKIP:
                cur.next()
                continue
            cur.delete()
            if advice is Advice.SECOND_CHANCE:
                table.marks[bucket] = 0
                now = time.monotonic_ns()
                rec = rec._replace(stamp=now)
                txn.put(key, record.pack(rec), db=d.objects)
                txn.put(pack64(now) + key, b"", db=d.lru)
                rewalk = True
                continue
            txn.delete(key, db=d.objects)
            ext = extent_size(rec.size)
            self._lru_bytes(txn, -ext)
            if self.quotas is not None:
                self.quotas.credit(b, key, ext)
            victims.append((key, rec.offset, ext))
            freed += ext
            if need and freed >= need:
                break
            if target_used is not None and used - freed <= target_used:
                break
        return victims

    def grant(self, b, cid, want, least, ns=None):
        """Give a client (of namespace prefix ns) an arena of up to ``want`` bytes (at
        least ``least``)."""
        txn = b.txn
        want = extent_size(want)
        least = extent_size(least)
        off = allocator.alloc(txn, self.dbs, want)
        size = want
        if off is None and least < want:
            off = allocator.alloc(txn, self.dbs, least)
            size = least
        if off is None:
            off = self.allocate(b, least, ns)    # evicts; accounts used itself
            size = least
        else:
            self.env.add_used(txn, size)
        txn.put(pack64(off), ARENA.pack(cid, off + size, off), db=self.dbs.arenas)
        return off, size

    def give_back(self, b, cid, start, end=None):
        """A client returns the unused rest of its arena granted at ``start`` and ending
        at ``end`` (everything past the frontier its seals reached). False if it has none
        there. The arena is found by its end (its record is keyed by its frontier, and
        its start may be another arena's by now); without an end (an older client) only
        an arena still keyed at ``start`` is found."""
        txn = b.txn
        if start >= self.segment_size or (end is not None and not start < end <= self.segment_size):
            return False
        if end is not None:
            arena = self._arena_of(txn, cid, end - 1)
            if arena is None or arena[1] != end:
                return False
            start = arena[0]
        raw = txn.get(pack64(start), db=self.dbs.arenas)
        if raw is None:
            return False
        owner, end, frontier = ARENA.unpack(raw)
        if owner != cid:
            return False
        txn.delete(pack64(start), db=self.dbs.arenas)
        if end > frontier:
            self._free(txn, frontier, end - frontier)
        return True

    def _arena_of(self, txn, cid, off):
        """(key, end, frontier) of cid's arena whose unused part contains off, or None
        (the key is its frontier; in an index of an older daemon, where it began)."""
        cur = txn.cursor(db=self.dbs.arenas)
        if cur.set_range(pack64(off + 1)):
            if not cur.prev():
                return None
        elif not cur.last():
            return None
        start = U64.unpack(cur.key())[0]
        owner, end, frontier = ARENA.unpack(cur.value())
        if owner != cid or not start <= off < end:
            return None
        return start, end, frontier

    # ---- objects ------------------------------------------------------------------------
    def seal(self, b, cid, key, off, size, csum, flags=0, replicas=1):
        """Seal a put (space from cid's arena) or a create() of cid. Returns a SealResult."""
        txn, d = b.txn, self.dbs
        ext = extent_size(size)
        if off + ext > self.segment_size:
            return SealResult.INVALID
        b.sealed_now.add(off)
        raw = txn.get(key, db=d.objects)
        if raw is not None:
            rec = record.unpack(raw)
            if rec.offset == off and rec.creator == cid:
                if rec.state == State.SEALED:
                    return SealResult.DUPLICATE          # re-sent after a reconnect
                if rec.size == size:                     # sealing its own create()
                    rec = rec._replace(state=State.SEALED, checksum=csum, stamp=time.monotonic_ns(),
                                       incarnation=self.incarnation)
                    txn.put(key, record.pack(rec), db=d.objects)
                    txn.delete(pack64(cid) + key, db=d.creating)
                    if not rec.pinned:
                        txn.put(pack64(rec.stamp) + key, b"", db=d.lru)
                        self._lru_bytes(txn, ext)
                        if self.quotas is not None:      # evictable now: no longer held fixed
                            self.quotas.repin(b, key, ext, False)
                    b.show(key, rec)
                    return SealResult.SEALED
            self._drop_arena_space(b, cid, off, ext)     # the key exists: the copy goes
            return SealResult.EXISTS
        arena = self._arena_of(txn, cid, off)
        if arena is None or off < arena[2] or off + ext > arena[1]:
            return SealResult.INVALID
        if self.table.find(key) is not None:
            return SealResult.INVALID                    # a digest collision: never in practice
        self._advance(txn, arena, off + ext, gap_end=off)
        if self.quotas is not None:
            flags = self._pin_allowed(b, key, ext, flags)
            self.quotas.charge(b, key, ext, bool(flags & Flag.PINNED))
        stamp = time.monotonic_ns()
        rec = Record(off, size, cid, stamp, csum, State.SEALED, Flag(flags), self.incarnation,
                     replicas or self.default_replicas)
        txn.put(key, record.pack(rec), db=d.objects)
        if not rec.pinned:
            txn.put(pack64(stamp) + key, b"", db=d.lru)
            self._lru_bytes(txn, ext)
        b.show(key, rec)
        return SealResult.SEALED

    def _pin_allowed(self, b, key, ext, flags):
        """A put's pin flag if quotas allow it, else the flags without it (clients of a
        daemon with quotas pin with a PIN request, which can be refused; this only
        guards against a client that did not)."""
        if not flags & Flag.PINNED:
            return flags
        try:
            self.quotas.check_pin(b, namespace_of(key), ext, key)
        except StoreFull:
            return flags & ~Flag.PINNED
        return flags

    def _advance(self, txn, arena, new_frontier, gap_end):
        """Move an arena's frontier past an object; free what the client skipped. The
        record moves with the frontier: its key stays in the space the arena reserves
        (what lies before the frontier is objects' space, freed and granted again
        independently of the arena)."""
        key, end, frontier = arena
        if gap_end > frontier:
            self._free(txn, frontier, gap_end - frontier)
        d = self.dbs
        owner = ARENA.unpack(txn.get(pack64(key), db=d.arenas))[0]
        txn.delete(pack64(key), db=d.arenas)
        if new_frontier < end:
            txn.put(pack64(new_frontier), ARENA.pack(owner, end, new_frontier), db=d.arenas)

    def _drop_arena_space(self, b, cid, off, ext):
        """A rejected seal's extent: the client may hold it (it read its own put), so
        it goes through the hold check like any unpublished extent."""
        arena = self._arena_of(b.txn, cid, off)
        if arena is None or off < arena[2] or off + ext > arena[1]:
            return
        self._advance(b.txn, arena, off + ext, gap_end=off)
        self._release_extents(b, [(off, ext)])

    def create(self, b, cid, key, size, pinned=False):
        """Reserve space for create(). Returns Created(offset, None), or Created(None,
        state of the existing object)."""
        txn, d = b.txn, self.dbs
        raw = txn.get(key, db=d.objects)
        if raw is not None:
            return Created(None, record.unpack(raw).state)
        if self.table.find(key) is not None:
            return Created(None, State.SEALED)
        ext = extent_size(size)
        ns = namespace_of(key)
        if self.quotas is not None:              # unsealed, it cannot be evicted: like a pin
            self.quotas.check_pin(b, ns, ext, key, op="create")
        off = self.allocate(b, ext, ns)
        if self.quotas is not None:
            self.quotas.charge(b, key, ext, True)
        rec = Record(off, size, cid, 0, 0, State.CREATING, Flag.PINNED if pinned else Flag.NONE,
                     self.incarnation)
        txn.put(key, record.pack(rec), db=d.objects)
        txn.put(pack64(cid) + key, b"", db=d.creating)
        b.show(key, rec)
        return Created(off, None)

    def _own_creation(self, txn, cid, key, op):
        raw = txn.get(key, db=self.dbs.objects)
        if raw is None:
            raise ObjectNotFound(f"{op} of {user_key(key)!r}: no such object; create() it first")
        rec = record.unpack(raw)
        if rec.sealed:
            hint = "seal each object once" if op == "seal" else "use delete() instead"
            raise AlreadySealed(f"{op} of {user_key(key)!r}: already sealed; {hint}")
        if rec.creator != cid:
            raise NotCreator(f"{op} of {user_key(key)!r}: another client is creating it; "
                             f"only its creator may {op} it")
        return rec

    def check_seal(self, b, cid, key):
        """Raise what seal() of key by cid would be refused for (create() path)."""
        self._own_creation(b.txn, cid, key, "seal")

    def abort(self, b, cid, key):
        rec = self._own_creation(b.txn, cid, key, "abort")
        b.txn.delete(pack64(cid) + key, db=self.dbs.creating)
        self._drop(b, key, rec)

    def _drop(self, b, key, rec):
        """Remove an object: hidden now, its extent freed now or once unheld."""
        txn = b.txn
        txn.delete(key, db=self.dbs.objects)
        if self.quotas is not None:
            self.quotas.credit(b, key, extent_size(rec.size), rec.pinned or not rec.sealed)
        if rec.sealed and not rec.pinned:
            txn.delete(pack64(rec.stamp) + key, db=self.dbs.lru)
            self._lru_bytes(txn, -extent_size(rec.size))
        b.hide(key)
        self._release_extents(b, [(rec.offset, extent_size(rec.size))])

    def delete(self, b, key):
        """Delete a sealed object. False if there was none."""
        raw = b.txn.get(key, db=self.dbs.objects)
        if raw is None:
            return False
        rec = record.unpack(raw)
        if not rec.sealed:
            return False
        self._drop(b, key, rec)
        return True

    def drop_if_at(self, b, key, off):
        """Drop a sealed object if it still lives at off (found corrupt by a reader)."""
        if off >= self.segment_size:
            return False
        raw = b.txn.get(key, db=self.dbs.objects)
        if raw is None:
            return False
        rec = record.unpack(raw)
        if rec.offset != off or not rec.sealed:
            return False
        self._drop(b, key, rec)
        return True

    def set_pinned(self, b, key, pinned):
        txn, d = b.txn, self.dbs
        raw = txn.get(key, db=d.objects)
        if raw is None:
            raise ObjectNotFound(f"pin of {user_key(key)!r}: no such object")
        rec = record.unpack(raw)
        if rec.pinned == pinned:
            return
        if self.quotas is not None and rec.sealed:   # an unsealed one is counted as held already
            self.quotas.repin(b, key, extent_size(rec.size), pinned)
        rec = rec._replace(flags=(rec.flags | Flag.PINNED) if pinned else (rec.flags & ~Flag.PINNED))
        txn.put(key, record.pack(rec), db=d.objects)
        if rec.sealed:
            if pinned:
                txn.delete(pack64(rec.stamp) + key, db=d.lru)
                self._lru_bytes(txn, -extent_size(rec.size))
            else:
                txn.put(pack64(rec.stamp) + key, b"", db=d.lru)
                self._lru_bytes(txn, extent_size(rec.size))
        b.show(key, rec)

    def keys(self, prefix, after, limit):
        """Up to limit sealed keys starting with prefix, after the key ``after``."""
        out = []
        with self.env.read() as txn:
            cur = txn.cursor(db=self.dbs.objects)
            start = after + b"\x00" if after else prefix
            if cur.set_range(start):
                for k, v in cur:
                    if not k.startswith(prefix) or len(out) >= limit:
                        break
                    if v[40] == State.SEALED:            # the state byte of a packed record
                        out.append(k)
        return out
