"""The client's read path: get (zero-copy, held), release, read (verified copies), contains.

Owns: looking keys up in the published table (no lock, no message), taking and dropping
holds in this client's slot (kvstore.slots: write the hold, fence, re-check the bucket;
a hold that lost the race is let go and the key looked up again), the local hold
counts (a key held twice costs one published hold; a repeated get still looks the key
up, so a deleted or replaced object is never served from an old hold), waiting for
objects being created, "settling" a miss (a miss while some client's seals are in
flight waits for them, then looks again), and verified copies without holds.
Must never: return a view without a published, re-checked hold; copy on get; or call a
key missing while a seal that was sent before the call is still in flight.
"""

import time

import numpy as np

from kvstore import protocol
from kvstore.checksum import checksum, copy_out_and_hash
from kvstore.errors import (from_code, ChecksumMismatch, GetTimeout, InvalidSize, KVStoreError, NotSealed,
                            ObjectNotFound, StoreUnavailable)
from kvstore.keys import user_key
from kvstore.retry import Backoff
from kvstore.slots import fence
from kvstore.table import SEALED, Busy, Entry

from . import device_copy
from .safecopy import CallerMemory, scatter
from .writer import mapping_of, nbytes

#: How long a miss waits for other clients' in-flight seals at most (they are applied
#: within one daemon loop turn; this only bounds a daemon that stopped applying).
SETTLE_WAIT = 1.0


class Reconnecting(Exception):
    """Raised under the client lock when a lookup needs the daemon back: the caller
    releases the lock (the watchdog needs it to reconnect), waits, and tries again."""


class Held:
    """One published hold: offset, size, count, checksum, table bucket and its sequence
    when held, and the hold entry in this client's slot."""
    __slots__ = ("offset", "size", "count", "checksum", "bucket", "seq", "entry", "table")

    def __init__(self, offset, size, checksum, bucket, seq, entry, table):
        self.offset, self.size, self.count, self.checksum = offset, size, 1, checksum
        self.bucket, self.seq, self.entry, self.table = bucket, seq, entry, table


class Reader:
    def __init__(self, conn, writer):
        self.conn, self.writer = conn, writer
        self.held = {}        # key -> [Held, ...] (2+ only if the key was replaced meanwhile)
        self.remote = True    # False: a local miss stays a miss (the daemon's own client)
        conn.on_fresh_store.append(self._fresh_store)

    def _fresh_store(self, old_att):
        self.held.clear()     # those holds were in the old store's slots

    # ---- lookups ----------------------------------------------------------------------------
    def lookup(self, k):
        """The published Entry of k, or this client's own in-flight seal as a SEALED entry
        (bucket -1), or None. Re-attaches to the current table if ours was retired."""
        try:
            e = self.conn.att.table.lookup(k)
        except Busy:
            e = self._lookup_busy(k)
        if e is not None and e.state == SEALED:
            return e
        if self.writer.pending:
            p = self.writer.in_flight(k)
            if p is not None:
                return Entry(-1, p[3], SEALED, 0, p[0], p[1], p[2], self.conn.att.cid)
        return e

    def _lookup_busy(self, k):
        """A bucket on the way stayed mid-update, or our table was retired: move to the
        current table, or wait (bounded) for the daemon to finish its write."""
        backoff = Backoff(initial=0.0005, cap=0.05, deadline=self.conn.reconnect_timeout)
        while True:
            att = self.conn.att
            if att.table.retired() and not self.conn.down:
                try:
                    self.conn.refresh_table()
                except StoreUnavailable:
                    pass
            try:
                return self.conn.att.table.lookup(k)
            except Busy:
                pass
            if self.conn.down:                    # the daemon went away: the caller lets go
                raise Reconnecting()              # of the client lock and waits for it
            if not backoff.sleep():
                raise StoreUnavailable(f"the daemon at {self.conn.socket_path} left its table "
                                       f"mid-update for {self.conn.reconnect_timeout} s; restart it")

    def settle(self):
        """A miss while seals are in flight: wait until those are applied (bounded), so
        a put that returned before we were called is seen. Returns True if it waited."""
        want = self.conn.att.slot.in_flight()
        if not want:
            return False
        slot = self.conn.att.slot
        backoff = Backoff(initial=20e-6, cap=1e-3, deadline=SETTLE_WAIT)
        while not slot.caught_up(want) and not backoff.expired():
            backoff.sleep()
        return True

    def contains(self, k):
        e = self.lookup(k)
        if e is None or e.state != SEALED:
            self.settle()
            e = self.lookup(k)
        return e is not None and e.state == SEALED

    def size_of(self, k):
        e = self.lookup(k)
        if e is None or e.state != SEALED:
            self.settle()
            e = self.lookup(k)
        return e.size if e is not None and e.state == SEALED else None

    # ---- across hosts ------------------------------------------------------------------------
    def fetch(self, ks, idx):
        """Cluster only: ask the daemon to pull keys ks[i] (i in idx, local misses) from
        other hosts. Returns (indices now local, {index: the typed error of a key every
        holder failed for}); a key no host has is in neither (a plain miss). Several
        requests when the keys do not fit one message."""
        if not idx or not self.conn.att.cluster or not self.remote:
            return [], {}
        timeout = max(0.1, self.conn.timeout - 0.5)     # answered before our socket gives up
        local, failed = [], {}
        keys = [ks[i] for i in idx]
        for a, b in protocol.key_batches(keys):
            body = self.conn.request(protocol.fetch(keys[a:b], timeout), protocol.FETCHED)
            for x, (status, code, msg) in zip(idx[a:b], protocol.read_fetched(body)):
                if status == protocol.FETCH_LOCAL:
                    local.append(x)
                elif status == protocol.FETCH_FAILED:
                    failed[x] = from_code(code, f"get of {user_key(ks[x])!r} from another host: {msg}")
        return local, failed

    # ---- get / release ---------------------------------------------------------------------
    def get_many(self, ks, timeout, lock):
        """Views (held) of each key, None for misses; waits for objects being created."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        out = [None] * len(ks)
        todo = list(range(len(ks)))
        settled = fetched = False
        backoff = Backoff(initial=20e-6, cap=2e-3)
        while True:
            waiting, missed = [], []
            try:
                with lock:
                    self.conn.check_open()
                    retry = self._get_pass(ks, todo, out, waiting, missed)
            except Reconnecting:
                with lock:
                    self._release_views(ks, out)
                out = [None] * len(ks)
                todo = list(range(len(ks)))
                self.conn.ready()
                continue
            if retry:
                todo = retry + waiting + missed
                continue
            if missed and not settled:
                settled = True
                self.settle()
                todo = missed + waiting
                continue
            if missed and not fetched and self.conn.att.cluster:
                fetched = True                    # once per call: a miss everywhere is a miss
                try:
                    local, failed = self.fetch(ks, missed)
                except BaseException:
                    with lock:
                        self._release_views(ks, out)
                    raise
                if failed:
                    with lock:
                        self._release_views(ks, out)
                    raise next(iter(failed.values()))
                if local:
                    todo = local + waiting
                    continue
            if not waiting:
                return out
            if deadline is not None and time.monotonic() >= deadline:
                with lock:
                    self._release_views(ks, out)
                raise GetTimeout(f"get of {user_key(ks[waiting[0]])!r}: still being created after "
                                 f"{timeout} s; retry later or raise the timeout")
            todo = waiting
            if deadline is None:
                backoff.sleep()
            else:
                time.sleep(min(backoff.next_delay(), max(0.0, deadline - time.monotonic())))

    def _get_pass(self, ks, todo, out, waiting, missed):
        """One look at keys todo (the client lock is held). Returns keys to look at again
        at once (a hold that lost a race with the daemon)."""
        att = self.conn.att
        table, slot, ro, me = att.table, att.slot, att.ro, att.cid
        held = self.held
        lookup = self.lookup
        fresh = []
        for i in todo:
            k = ks[i]
            e = lookup(k)
            if e is None:
                missed.append(i)
                continue
            if e.state != SEALED:
                if e.creator == me:
                    self._release_views(ks, out)
                    raise NotSealed(f"get of {user_key(k)!r}: this client is creating it; seal() it first")
                waiting.append(i)
                continue
            hs = held.get(k)
            if hs is not None:
                h = _at(hs, e.offset)
                if h is not None:
                    h.count += 1
                    out[i] = ro[h.offset:h.offset + h.size]
                    continue
            fresh.append((i, k, e, slot.hold(e.offset)))
        if not fresh:
            return None
        fence()                                  # our holds are visible before we re-check
        if att.table is not table:               # moved to a new table during the pass
            for i, k, e, entry in fresh:
                slot.unhold(entry)
            return [i for i, _, _, _ in fresh]
        retry = None
        for i, k, e, entry in fresh:
            if e.bucket >= 0:
                ok = table.unchanged(e)
            else:                                # our own in-flight seal
                ok = self.writer.in_flight(k) is not None or self._same_published(table, k, e)
            if not ok:
                slot.unhold(entry)
                if retry is None:
                    retry = []
                retry.append(i)
                continue
            hs = held.get(k)
            h = None if hs is None else _at(hs, e.offset)
            if h is not None:                    # the same key twice in one call
                h.count += 1
                slot.unhold(entry)
            else:
                held.setdefault(k, []).append(Held(e.offset, e.size, e.checksum, e.bucket, e.seq, entry, table))
            out[i] = ro[e.offset:e.offset + e.size]
        return retry

    @staticmethod
    def _same_published(table, k, e):
        try:
            p = table.lookup(k)
        except Busy:
            return False                  # look again from the start
        return p is not None and p.state == SEALED and p.offset == e.offset

    def release_many(self, ks, lock):
        with lock:
            self.conn.check_open()
            need = {}
            for k in ks:
                need[k] = need.get(k, 0) + 1
            held = self.held
            for k, n in need.items():
                have = sum(h.count for h in held.get(k, ()))
                if have < n:
                    what = f"holds it {have} times, not {n}" if have else "does not hold it"
                    raise ObjectNotFound(f"release of {user_key(k)!r}: this client {what} (get() it first)")
            att = self.conn.att
            slot, table = att.slot, att.table
            gone = False
            for k in ks:
                hs = held[k]
                h = hs[-1]
                h.count -= 1
                if h.count:
                    continue
                hs.pop()
                if not hs:
                    del held[k]
                slot.unhold(h.entry)
                if h.bucket >= 0:
                    same = h.table is table       # buckets are of the table the hold came from
                    if same:
                        table.mark(h.bucket)      # a use, for the CLOCK sweep
                    if not gone and not (same and table.same_seq(h.bucket, h.seq)):
                        try:
                            e = self.lookup(k)    # deleted or replaced while we held it?
                        except Reconnecting:
                            continue              # the next daemon reclaims it on its own
                        gone = e is None or e.offset != h.offset
        if gone:
            # its extent waits for the last holder: tell the daemon now, so the space is
            # free when release() returns (it would otherwise be freed on its next turn)
            fence()
            try:
                self.conn.request(protocol.reclaim(), protocol.DONE)
            except KVStoreError:
                pass

    def release_held(self, k, h, lock):
        """Drop one count of exactly the hold h of key k (the daemon's resolver: the hold
        its own get took, while other reads of the same key may hold other extents).
        An extent freed meanwhile is reclaimed by the daemon on its next turn."""
        with lock:
            hs = self.held.get(k) or []
            if not any(x is h for x in hs):
                raise ObjectNotFound(f"release of {user_key(k)!r}: this client does not hold that extent")
            h.count -= 1
            if h.count:
                return
            hs[:] = [x for x in hs if x is not h]
            if not hs:
                del self.held[k]
            self.conn.att.slot.unhold(h.entry)

    def _release_views(self, ks, out):
        """Undo the holds a failed get_many took (the caller holds the lock)."""
        att = self.conn.att
        for k, v in zip(ks, out):
            if v is None:
                continue
            hs = self.held.get(k)
            if not hs:
                continue
            h = hs[-1]
            h.count -= 1
            if not h.count:
                hs.pop()
                if not hs:
                    del self.held[k]
                att.slot.unhold(h.entry)

    def release_all(self):
        """Drop every hold (close)."""
        self.conn.att.slot.clear()
        self.held.clear()

    def held_entry(self, k, view):
        """The Held behind a view this client got for k."""
        n = view.nbytes
        addr = np.frombuffer(view, dtype=np.uint8).ctypes.data if n else None
        lo = self.conn.att.ro_range[0]
        return next((h for h in self.held.get(k, ()) if not n or lo + h.offset == addr), None)

    # ---- verified copies ----------------------------------------------------------------------
    def read_many(self, keys, ks, outs, timeout, errors, lock):
        outs = (None,) * len(ks) if outs is None else outs
        if len(outs) != len(ks):
            raise InvalidSize(f"read_many got {len(ks)} keys and {len(outs)} outs; give one out per key")
        while True:
            try:
                with lock:
                    self.conn.check_open()
                    results, slow, missed = self._read_optimistic(keys, ks, outs)
                break
            except Reconnecting:
                self.conn.ready()
        if missed and self.settle():
            slow += missed                        # seals were in flight: look again, held
        elif missed and self.conn.att.cluster:    # pulled from another host, then read held
            local, failed = self.fetch(ks, missed)
            slow += local
            for i, e in failed.items():
                results[i] = e
        if slow:
            slow.sort()
            try:
                got = self._read_held([keys[i] for i in slow], [ks[i] for i in slow],
                                      [outs[i] for i in slow], timeout, lock)
            except (GetTimeout, NotSealed):
                if errors == "raise" or len(slow) == 1:
                    raise
                got = []                          # one key's wait must not sink the others
                for i in slow:
                    try:
                        got += self._read_held([keys[i]], [ks[i]], [outs[i]], timeout, lock)
                    except (GetTimeout, NotSealed) as e:
                        got.append(e)
            for i, r in zip(slow, got):
                results[i] = r
        if errors == "raise":
            for r in results:
                if isinstance(r, Exception):
                    raise r
        return results

    def _read_optimistic(self, keys, ks, outs):
        """Copy sealed objects into CPU targets without holds: look up, copy, and accept a
        copy whose checksum matches the one recorded at seal; the bytes are then exactly
        the sealed value, whatever happened to the extent meanwhile. Anything else (a
        mismatch, an object being created, a device target, bad arguments) is left to
        the held path, which waits, verifies under a hold and reports.
        Returns (results, indices for the held path, indices that missed)."""
        att = self.conn.att
        view, table = att.ro, att.table
        results = [None] * len(ks)
        slow, missed = [], []
        for i, k in enumerate(ks):
            e = self.lookup(k)
            if e is None:
                missed.append(i)
                continue
            if e.state != SEALED:
                slow.append(i)
                continue
            off, size = e.offset, e.size
            out = outs[i]
            src = view[off:off + size]
            if out is None:
                data = bytes(src)
                ok = checksum(data) == e.checksum
            else:
                try:
                    dsts = targets(keys[i], out)
                except KVStoreError:
                    slow.append(i)
                    continue
                if type(dsts[0]) is CallerMemory:
                    ok = self._read_to_caller(k, e, src, dsts, table)
                    if isinstance(ok, KVStoreError):
                        results[i] = ok           # a stale pointer: reported, not retried
                        continue
                else:
                    ok = (all(type(d) is memoryview for d in dsts) and sum(d.nbytes for d in dsts) >= size
                          and copy_out_and_hash(src, dsts) == e.checksum)
                data = size
            if not ok:
                slow.append(i)
                continue
            results[i] = data
            if e.bucket >= 0:
                table.mark(e.bucket)              # counts as a use, like a release
        return results, slow, missed

    def _read_to_caller(self, k, e, src, dsts, table):
        """The optimistic read into caller memory named by address (the Mooncake facade):
        the kernel copies (safecopy) and the landed bytes are never read back, so the
        source is hashed as it is copied, and the copy counts only if the entry is still
        the one looked up (the re-check of _get_pass): an object that stays published,
        or stays this client's own seal in flight, keeps its extent, so what was copied
        is the sealed object. Returns whether it counts, or the copy's error."""
        if not all(type(d) is CallerMemory for d in dsts) or sum(d.nbytes for d in dsts) < e.size:
            return False
        try:
            if len(dsts) == 1:
                csum = dsts[0].write_hashed(src, self.conn.att.ro_range[0] + e.offset)  # hashed as copied
            else:
                scatter(self.conn.att.ro_range[0] + e.offset, e.size, dsts)
                csum = checksum(src)
        except KVStoreError as x:
            return x
        if csum != e.checksum:
            return False
        fence()
        if e.bucket >= 0:
            return table.unchanged(e)
        return self.writer.in_flight(k) is not None or self._same_published(table, k, e)

    def _read_held(self, keys, ks, outs, timeout, lock):
        """read_many under holds: waits for objects being created, verifies under the
        hold, drops objects that fail their checksum, and returns exceptions in place."""
        views = self.get_many(ks, timeout, lock)
        results = [None] * len(ks)
        with lock:
            generation, holds = self.conn.generation, []
            for i, v in enumerate(views):
                if v is not None:
                    holds.append((i, self.held_entry(ks[i], v)))
        att = self.conn.att
        copies = device_copy.CopyBatch(lambda v: mapping_of(att, v))
        try:
            for i, h in holds:
                if h is None:                     # the client moved to a fresh store meanwhile
                    results[i] = StoreUnavailable(f"read of {keys[i]!r}: the daemon switched to a fresh "
                                                  f"store during the read; retry")
                    continue
                try:
                    results[i] = self._copy_out(keys[i], views[i], outs[i], h.checksum, copies)
                except KVStoreError as e:
                    if isinstance(e, ChecksumMismatch):
                        self.drop_corrupt(ks[i], h.offset)
                    results[i] = e
            copies.wait()
        finally:
            copies.wait_quietly()                 # no copy may still run once the holds are gone
            if self.conn.generation == generation:  # else the holds went with the old store
                self.release_many([ks[i] for i, h in holds if h is not None], lock)
        return results

    def drop_corrupt(self, k, offset):
        try:
            self.conn.request(protocol.keyed(protocol.DROP, k, offset=offset), protocol.DONE)
        except KVStoreError:
            pass

    def _copy_out(self, key, v, out, csum, copies):
        """Copy view v into out (None: new bytes), verifying its checksum."""
        n = v.nbytes
        if out is None:
            data = bytes(v)
            if checksum(data) != csum:
                raise corrupt(key)
            return data
        ts = targets(key, out)
        room = sum(map(nbytes, ts))
        if room < n:
            raise InvalidSize(f"read of {key!r}: out has room for {room} bytes, the object has {n}; "
                              f"pass a buffer of at least {n} bytes (size_of() tells)")
        if all(type(t) is memoryview for t in ts):
            if copy_out_and_hash(v, ts) != csum:
                raise corrupt(key)
            return n
        # device targets: verify the source first, then copy without waiting
        if checksum(v) != csum:
            raise corrupt(key)
        pos = 0
        for t in ts:
            if pos >= n:
                break
            take = min(n - pos, nbytes(t))
            if type(t) is memoryview:
                t[:take] = v[pos:pos + take]
            elif type(t) is CallerMemory:         # the Mooncake facade's pointers
                t[:take].write_from(v[pos:pos + take])
            else:
                copies.from_segment(t[:take], v[pos:pos + take])
            pos += take
        return n


def _at(hs, off):
    for h in hs:
        if h.offset == off:
            return h
    return None


def targets(key, out):
    """out (one target, or a list/tuple of them filled in order) as flat targets."""
    return [_target(key, o) for o in (out if type(out) in (list, tuple) else (out,))]


def _target(key, o):
    if type(o) is CallerMemory:                   # copied by the kernel, like a device's memory
        return o
    if device_copy.is_device_tensor(o):
        return device_copy.flat_bytes(o)
    try:
        if device_copy.is_tensor(o):
            o = device_copy.flat_bytes(o).numpy()
        dst = memoryview(o).cast("B")
    except (TypeError, ValueError, RuntimeError) as e:
        raise InvalidSize(f"read of {key!r}: out must be a writable contiguous buffer or tensor ({e})") from None
    if dst.readonly:
        raise InvalidSize(f"read of {key!r}: out is read-only; pass a writable buffer")
    return dst


def corrupt(key):
    return ChecksumMismatch(f"read of {key!r}: its bytes no longer match the checksum "
                            f"recorded at seal; it was dropped, put it again")
