"""The client's write path: put, put_many, create, seal, abort.

Owns: this client's arena (space the daemon granted it, filled from the front with no
round trip), copying and hashing values into the segment, numbering seals and sending
them (one-way, many per frame), and ``pending``: seals sent and not yet applied, which
this client already reads as its own (read-your-writes).

A put returns once the bytes are in the segment and the seal is on the daemon's socket;
the daemon publishes it within its next loop turn. Readers in other processes that would
miss the key meanwhile wait for it (kvstore.slots, seal counters), so a put that
returned is never missed by a get that starts after it. ``put(strict=True)`` also waits
for the daemon's verdict: if two clients put one key at the same moment, one copy is
kept and the other client gets ObjectExists (without strict both return True; keys are
content hashes, so both copies hold the same bytes).
Must never: write outside space granted to this client, send a seal for bytes not yet
completely written, or report a put done before its seal is on the socket.
"""

import numpy as np

from kvstore import protocol
from kvstore.checksum import checksum, copy_and_hash
from kvstore.errors import (AlreadySealed, InvalidSize, NotCreator, ObjectExists, ObjectNotFound,
                            StoreUnavailable, ValueTooLarge)
from kvstore.keys import user_key
from kvstore.record import State
from kvstore.retry import Backoff
from kvstore.slots import fence
from kvstore.store.allocator import extent_size
from kvstore.table import SEALED

from . import buffers, device_copy
from .safecopy import CallerMemory

#: First arena a client asks for, and the largest (it doubles while puts keep coming).
ARENA_FIRST = 1 << 20
ARENA_MAX = 64 << 20
#: Values at least this large get space of their own instead of arena space.
OWN_SPACE = ARENA_MAX // 2


def nbytes(piece):
    """Bytes of a piece of a value or target: a flat memoryview, or a flat uint8 device tensor."""
    return piece.nbytes if type(piece) is memoryview else piece.numel()


def check_size(n):
    if type(n) is not int:
        if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
            n = int(n)
        else:
            raise InvalidSize(f"size must be an int, not {type(n).__name__}")
    if n < 0:
        raise InvalidSize(f"size {n} is negative; give the object's size in bytes")
    return n


def exists_msg(k, state, op):
    what = "is sealed" if state == SEALED else "is being created by a client"
    return f"{op} of {user_key(k)!r}: the key {what}; get() it, or put(strict=False) to accept existing keys"


class Writer:
    def __init__(self, conn):
        self.conn = conn
        self.pending = {}            # key -> (offset, size, checksum, seq)
        self.creating = {}           # key -> (offset, size): create()d, not sealed
        self.seq = 0                 # last seal number sent
        self._failed_seen = conn.att.slot.failed_mine()
        self._arena = None           # [start, next free, end]
        self._outbox = []            # encoded seals of this put_many not yet in the ring
        self._retired = []           # arenas to give back once their seals are sent
        self._chunk = ARENA_FIRST
        conn.on_fresh_store.append(self._fresh_store)
        conn.on_resume.append(self._resend)

    # ---- space --------------------------------------------------------------------------
    def _take(self, n):
        """Offset of an extent for n bytes: arena space, or space of its own."""
        ext = extent_size(n)
        a = self._arena
        if a is not None and a[1] + ext <= a[2]:
            off = a[1]
            a[1] += ext
            return off
        if ext >= OWN_SPACE:
            off, size = self._grant(ext, ext)
            return off
        self._retire_arena()
        want = max(self._chunk, 2 * ext)
        self._chunk = min(self._chunk * 2, ARENA_MAX, max(ARENA_FIRST, self.conn.att.size // 16))
        off, size = self._grant(want, ext)
        self._arena = [off, off + ext, off + size]
        return off

    def _grant(self, want, least):
        body = self.conn.request(protocol.grant(want, least), protocol.GRANTED)
        return protocol.read_granted(body)

    def _untake(self, off, n):
        """Give back the last extent taken (a put that failed before its seal)."""
        a = self._arena
        if a is not None and a[1] == off + extent_size(n):
            a[1] = off
        elif any(s <= off < e for s, e in self._retired):
            pass        # a retired arena's: its RETURN, after the seals before it, frees it
        elif a is None or not a[0] <= off < a[2]:      # space of its own
            try:
                self.conn.send(protocol.give_back(off, off + extent_size(n)))
            except StoreUnavailable:
                pass

    def _give_back(self):
        self._retire_arena()
        self.flush()

    def _retire_arena(self):
        """Stop taking space from the current arena; its unused rest goes back to the
        daemon at the next flush, AFTER the seals of the values taken from it (the daemon
        frees from the last seal it has seen to the arena's end)."""
        a, self._arena = self._arena, None
        if a is not None and a[1] < a[2]:
            self._retired.append((a[0], a[2]))

    def flush(self):
        """Put the seals prepared so far into the ring, then give back retired arenas."""
        if self._outbox:
            items, self._outbox = self._outbox, []
            self._send_seals(items, self.seq)
        while self._retired:
            self.conn.send(protocol.give_back(*self._retired[0]))
            self._retired.pop(0)

    def give_back_quietly(self):
        try:
            self._give_back()
        except Exception:
            pass

    # ---- seals -----------------------------------------------------------------------------
    def _send_seals(self, items, last):
        """Put encoded seal items into this client's seal ring (no system call), then
        publish the count; ring the doorbell only if the daemon is going to sleep. A full
        ring waits (bounded) for the daemon to drain it."""
        slot = self.conn.att.slot
        i, n = 0, len(items)
        backoff = None
        while i < n:
            room = slot.ring_room()
            j, size = i, 0
            while j < n and size + len(items[j]) <= room:
                size += len(items[j])
                j += 1
            if j == i:                            # full: wake the daemon and wait for room
                self.conn.send(protocol.doorbell())
                if backoff is None:
                    backoff = Backoff(initial=20e-6, cap=2e-3, deadline=self.conn.timeout)
                if not backoff.sleep():
                    raise StoreUnavailable(f"the daemon at {self.conn.socket_path} did not take "
                                           f"this client's seals within {self.conn.timeout} s")
                self.conn.ready()
                continue
            slot.ring_write(b"".join(items[i:j]))
            i = j
        slot.note_sent(last)
        fence()
        if slot.daemon_asleep():
            self.conn.send(protocol.doorbell())

    def _check_failed(self):
        """Raise the error of a seal the daemon could not apply since the last check."""
        failed = self.conn.att.slot.failed_mine()
        if failed > self._failed_seen:
            self._failed_seen = failed
            lost = [k for k, p in self.pending.items() if p[3] <= failed and self.conn.att.table.lookup(k) is None]
            for k in lost:
                del self.pending[k]
            from kvstore.errors import IndexFull
            raise IndexFull(f"the daemon could not record {len(lost) or 'some'} earlier put(s) of this "
                            f"client: the index is full; restart the daemon with a larger --index-map-size "
                            f"(index_map_size in its config file)")

    def in_flight(self, k):
        """This client's own seal of k, if the daemon has not applied it yet."""
        p = self.pending.get(k)
        if p is None:
            return None
        if p[3] <= self.conn.att.slot.applied_mine():
            del self.pending[k]
            return None
        return p

    def prune(self):
        if self.pending:
            applied = self.conn.att.slot.applied_mine()
            if self.seq <= applied:
                self.pending.clear()
            elif len(self.pending) > 256:
                for k in [k for k, p in self.pending.items() if p[3] <= applied]:
                    del self.pending[k]

    def wait_applied(self, seq):
        """Wait until the daemon has applied our seals up to seq."""
        slot = self.conn.att.slot
        backoff = Backoff(initial=20e-6, cap=2e-3, deadline=self.conn.timeout)
        while slot.applied_mine() < seq:
            if backoff.expired():
                raise StoreUnavailable(f"the daemon at {self.conn.socket_path} did not apply a "
                                       f"seal within {self.conn.timeout} s")
            self.conn.ready()
            backoff.sleep()

    def _resend(self):
        """After reconnecting to the same store: nothing to re-send (seals wait in the
        ring, which outlives the daemon), but a daemon that restarted sleeps: wake it."""
        try:
            self.conn.send(protocol.doorbell())
        except StoreUnavailable:
            pass

    def _fresh_store(self, old_att):
        self.pending.clear()
        self.creating.clear()
        self._arena = None
        self._outbox, self._retired = [], []
        self.seq = 0
        self._failed_seen = 0

    # ---- put ---------------------------------------------------------------------------------
    def parts(self, value):
        """(pieces, total bytes, any on a device): flat byte memoryviews, and flat uint8
        tensors for device tensors."""
        if type(value) in (list, tuple):
            ps = [_part(v) for v in value]
        else:
            ps = [_part(value)]
        if len(ps) == 1 and type(ps[0]) is memoryview:
            return ps, self.check_fits(ps[0].nbytes), False
        return ps, self.check_fits(sum(map(nbytes, ps))), any(type(p) is not memoryview for p in ps)

    def check_fits(self, n):
        size = self.conn.att.size
        if n > size:
            raise ValueTooLarge(f"{n} bytes can never fit in the {size}-byte segment; "
                                f"split the value or start the daemon with a larger --size")
        return n

    def _existing(self, k):
        """State of an existing object under k (SEALED, CREATING), or None."""
        if self.in_flight(k) is not None:
            return SEALED
        e = self.conn.att.table.lookup(k)
        return None if e is None else e.state

    def put_many(self, ks, partss, strict, pin, lookup_state, done=None, replicas=0):
        """Store each value (parts, n, on_device). Returns [bool]; the caller holds the lock.
        ``done`` (index -> offset) carries the keys an interrupted earlier try of this same
        call already wrote: they count as written, not as existing. ``replicas``: copies
        on distinct hosts the cluster should keep (0: the daemon's default)."""
        done = {} if done is None else done
        # with namespace quotas a pin can be refused: it goes by PIN request after the seal
        pin_later = pin and self.conn.att.quotas
        flags = 1 if pin and not pin_later else 0
        self._check_failed()
        out = [False] * len(ks)
        mine, dev = [], []
        rw = self.conn.att.rw
        try:
            for i, (k, (parts, n, on_device)) in enumerate(zip(ks, partss)):
                if i in done:
                    out[i] = True
                    mine.append(i)
                    continue
                state = lookup_state(k)
                if state is not None or k in self.creating:
                    if strict:
                        raise ObjectExists(exists_msg(k, state or State.CREATING, "put"))
                    continue
                if on_device:
                    dev.append(i)
                    continue
                off = self._take(n)
                try:
                    csum = copy_and_hash(parts, rw, off)
                except BaseException:
                    self._untake(off, n)
                    raise
                self.seq += 1
                self._outbox.append(protocol.seal_item(self.seq, k, off, n, csum, flags, replicas))
                self.pending[k] = (off, n, csum, self.seq)
                mine.append(i)
                out[i] = True
                done[i] = off
            if dev:
                self._put_device(ks, partss, dev, flags, mine, out, done, replicas)
        finally:
            self.flush()
        if mine and self.conn.att.slot.sync_puts():
            self.wait_applied(self.seq)           # the index is nearly full: hear the verdict
            self._check_failed()
        if strict and mine:
            self.wait_applied(self.seq)
            table = self.conn.att.table
            for i in mine:
                e = table.lookup(ks[i])
                if e is None or e.offset != done[i]:
                    raise ObjectExists(exists_msg(ks[i], SEALED, "put"))
        if pin_later and mine:
            self.wait_applied(self.seq)
            for i in mine:
                self.conn.request(protocol.keyed(protocol.PIN, ks[i], flag=1), protocol.DONE)
        return out

    def _put_device(self, ks, partss, dev, flags, mine, out, done, replicas=0):
        """Device tensors: take space for each, issue every copy (non-blocking from the
        device into the pinned segment), wait once, then hash and seal each."""
        att = self.conn.att
        copies = device_copy.CopyBatch(lambda v: mapping_of(att, v))
        taken, hashed = [], {}
        try:
            for i in dev:
                parts, n, _ = partss[i]
                off = self._take(n)
                taken.append((i, off, n))
                pos = off
                for p in parts:
                    e = pos + nbytes(p)
                    if type(p) is memoryview:
                        att.rw[pos:e] = p
                    elif type(p) is CallerMemory:     # the Mooncake facade's pointers
                        if len(parts) == 1:
                            hashed[i] = p.read_into_hashed(att.rw[pos:e])
                        else:
                            p.read_into(att.rw[pos:e])
                    else:
                        copies.to_segment(att.rw[pos:e], p)
                    pos = e
            copies.wait()
        except BaseException:
            copies.wait_quietly()                 # no copy may land in space given back
            for i, off, n in reversed(taken):
                self._untake(off, n)
            raise
        for i, off, n in taken:
            csum = hashed[i] if i in hashed else checksum(att.rw[off:off + n])  # rw: mapped already
            self.seq += 1
            self._outbox.append(protocol.seal_item(self.seq, ks[i], off, n, csum, flags, replicas))
            self.pending[ks[i]] = (off, n, csum, self.seq)
            mine.append(i)
            out[i] = True
            done[i] = off

    # ---- reserved blocks (the daemon's own client: bytes that arrive from another host) --------
    def reserve(self, n):
        """An extent for n bytes from this client's arena (as a put takes one), to be
        filled by someone else (a transport) and then sealed with ``seal_reserved`` or
        given back with ``unreserve``. Invisible to everyone until sealed."""
        return self._take(n)

    def unreserve(self, off, n):
        """Give back a reserved extent that will never be sealed (a failed transfer): the
        last one returns to the arena at once; an earlier one is a gap the daemon frees
        when a later seal of this arena, or its retirement, reaches past it."""
        self._untake(off, n)

    def seal_reserved(self, items):
        """Seal reserved extents [(key, offset, size, checksum)] (in the order they were
        reserved: the daemon frees the gaps an arena's seals skip). Returns the seal
        number the daemon must have applied for all of them to be visible."""
        for k, off, n, csum in items:
            self.seq += 1
            self._outbox.append(protocol.seal_item(self.seq, k, off, n, csum, 0, 1))   # a replica: 1
            self.pending[k] = (off, n, csum, self.seq)
        self.flush()
        return self.seq

    # ---- create / seal / abort --------------------------------------------------------------
    def create(self, k, n, pin):
        body = self.conn.request(protocol.create(k, n, pin), protocol.CREATED)
        status, off = protocol.read_created(body)
        if status:
            raise ObjectExists(exists_msg(k, status, "create"))
        self.creating[k] = (off, n)
        return self.conn.att.rw[off:off + n]

    def seal(self, k, lookup):
        got = self.creating.get(k)
        if got is None:
            e = lookup(k)
            if e is None and self.in_flight(k) is None:
                raise ObjectNotFound(f"seal of {user_key(k)!r}: no such object; create() it first")
            if e is None or e.state == SEALED:
                raise AlreadySealed(f"seal of {user_key(k)!r}: already sealed; seal each object once")
            raise NotCreator(f"seal of {user_key(k)!r}: another client is creating it; "
                             f"only its creator may seal it")
        off, n = got
        # the bytes are private to their creator until seal: hash them now
        csum = checksum(self.conn.att.ro[off:off + n])
        self.seq += 1
        self.pending[k] = (off, n, csum, self.seq)
        del self.creating[k]
        self._send_seals([protocol.seal_item(self.seq, k, off, n, csum)], self.seq)

    def abort(self, k):
        self.conn.request(protocol.keyed(protocol.ABORT, k), protocol.DONE)
        self.creating.pop(k, None)

    def abort_all_quietly(self):
        for k in list(self.creating):
            try:
                self.abort(k)
            except Exception:
                pass


def _part(v):
    if type(v) is CallerMemory:                   # copied by the kernel, like a device's memory
        return v
    if device_copy.is_device_tensor(v):
        return device_copy.flat_bytes(v)
    return buffers.as_bytes_view(v)


def mapping_of(att, view):
    """(base address, size, read_only) of the segment mapping view lies in."""
    addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
    lo, hi = att.ro_range
    if lo <= addr < hi:
        return lo, hi - lo, True
    return att.rw_range[0], att.rw_range[1] - att.rw_range[0], False
