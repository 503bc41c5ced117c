"""Client slots: what each client publishes to the daemon without a lock or a message.

Owns: the layout of the slots file (one per store, in /dev/shm, kept across daemon
restarts like the segment) and both sides of its protocols.

1. Holds. Each client slot has a hold table: an array of extent offsets (stored +1,
   0 = empty) that only that client writes. A client takes a hold by writing the
   offset into a free entry, then (after a full fence) re-checking that the published
   table still names that extent for the key; the daemon frees an extent only after
   unpublishing its record, fencing, and finding it in no hold table. Either the
   daemon sees the hold, or the client sees the change and lets go: the hazard-pointer
   protocol, with no lock on either side. A client that freezes while holding keeps
   just what it holds; nobody waits for it.
2. Seals. A put's seal is written into the client's seal ring (a single-producer,
   single-consumer byte ring in its region: the client advances ``tail``, the daemon
   ``head``), so a put makes no system call. The daemon drains every ring on each loop
   turn; it polls while clients are busy, and before it sleeps it sets ``asleep`` in the
   header, fences and looks once more, while a client that wrote a seal fences and rings
   its doorbell (one byte on its socket) only if ``asleep`` is set: no seal waits for a
   daemon that sleeps. A client numbers its seals and stores the last number in
   ``sent[slot]`` once it is in the ring; the daemon stores in
   ``applied[slot]`` the last number it has published. A reader that misses a key while
   some ``sent > applied`` waits for those seals before answering "missing", so a put
   that returned is never missed by a get that starts after it.

3. Refused seals. A seal the daemon could not apply (its index is full) is recorded in
   ``failed[slot]`` (the seal's number); the client raises the error on its next put.
   Once the index is nearly full the daemon sets ``sync_puts`` in the header, and puts
   wait for their verdict, so the put that does not fit is the one that fails.

Layout: a 4 KiB header (``high``, ``sync_puts``, ``asleep``); ``sent``, ``applied`` and
``failed`` (one u64 per slot each, page-aligned); then one region per slot: a 64-byte
head (hold count, cid, ring tail, ring head), ``hold_capacity`` u64 hold entries and the
seal ring of RING_BYTES.
Trust: a client maps the counters (and the whole segment) read-write, so a hostile local
client can mislead others' waits or overwrite objects; the store protects clients from
each other's faults (a pause, a crash, a bug in another process's timing), not from a
hostile process that may open the socket (socket_mode and group decide who may;
kvstore.access gives this file the same mode and group).
Must never: be written by a client outside its own region and its own ``sent`` word,
or let a hold be taken without the fence between writing it and re-checking.
"""

import mmap
import os
import struct
import threading

import numpy as np

from . import access

MAGIC = b"KVSSLOTS"
VERSION = 2
HEADER_SIZE = 4096
REGION_HEAD = 64
#: Bytes of a client's seal ring (about a thousand seals of short keys).
RING_BYTES = 64 << 10
_TAIL_AT, _HEAD_AT = 16, 24      # in a region head: ring tail (client), ring head (daemon)
#: Distinct extents one client may hold at once (views not yet released).
HOLD_CAPACITY = 1 << 16

_HEADER = struct.Struct("<8sIIQQQQQ")   # magic, version, _, nslots, capacity, region, sent_at, applied_at
_HIGH_AT = 64
_SYNC_AT = 72       # nonzero: the index is nearly full, puts wait for their verdict
_ASLEEP_AT = 80     # nonzero: the daemon is about to sleep; ring the doorbell
_U64 = struct.Struct("<Q")

_fence_lock = threading.Lock()


def fence():
    """A full memory barrier: acquiring and releasing a lock executes locked instructions
    (x86-64: a full fence), so the hold written before it is visible to the daemon
    before the published table is read again after it."""
    _fence_lock.acquire()
    _fence_lock.release()


def _page(n):
    return (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


def layout(nslots, capacity=HOLD_CAPACITY):
    """(sent offset, applied offset, regions offset, region size, file size); the failed
    words follow the applied ones."""
    sent_at = HEADER_SIZE
    applied_at = sent_at + _page(8 * nslots)
    regions_at = applied_at + 2 * _page(8 * nslots)
    region = _page(REGION_HEAD + 8 * capacity) + RING_BYTES
    return sent_at, applied_at, regions_at, region, regions_at + nslots * region


def queued_seals(path):
    """The seal bytes still queued in every ring of the slots file at path, read without
    adopting or changing it: [(slot, bytes)] of the slots with a whole, sane ring. For a
    start-up that must replace the store's identity (a rebuilt index) but keep the puts
    that returned before the crash. [] when the file is missing or not ours."""
    try:
        with open(path, "rb") as f:
            hdr = f.read(_HEADER.size)
            if len(hdr) != _HEADER.size or hdr[:8] != MAGIC:
                return []
            _, version, _, nslots, capacity, region, _, _ = _HEADER.unpack(hdr)
            sent_at, applied_at, regions_at, want_region, size = layout(nslots, capacity)
            if version != VERSION or region != want_region or os.fstat(f.fileno()).st_size < size:
                return []
            out = []
            for slot in range(nslots):
                at = regions_at + slot * region
                tail, head = struct.unpack("<QQ", os.pread(f.fileno(), 16, at + _TAIL_AT))
                if tail == head or tail < head or tail - head > RING_BYTES:
                    continue
                ring = os.pread(f.fileno(), RING_BYTES, at + region - RING_BYTES)
                h, t = head % RING_BYTES, tail % RING_BYTES
                out.append((slot, ring[h:t] if h < t else ring[h:] + ring[:t]))
            return out
    except (OSError, struct.error, ValueError):
        return []


class SlotsFile:
    """The daemon's handle: creates or adopts the file, assigns and scrubs slots, reads
    every client's holds and seal counters."""

    def __init__(self, path, nslots, mode=0o600, capacity=HOLD_CAPACITY):
        sent_at, applied_at, regions_at, region, size = layout(nslots, capacity)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            access.apply(fd, mode)       # the group and its bits, set explicitly
            hdr = os.pread(fd, _HEADER.size, 0)
            self.adopted = (len(hdr) == _HEADER.size and hdr[:8] == MAGIC
                            and _HEADER.unpack(hdr)[3:5] == (nslots, capacity)
                            and os.fstat(fd).st_size == size)
            if not self.adopted:
                os.ftruncate(fd, 0)          # sparse: only pages clients touch use memory
                os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.path, self.nslots, self.capacity = fd, path, nslots, capacity
        self.region, self.regions_at = region, regions_at
        _HEADER.pack_into(self.mm, 0, MAGIC, VERSION, 0, nslots, capacity, region, sent_at, applied_at)
        self.sent = np.frombuffer(self.mm, np.uint64, nslots, sent_at)
        self.applied = np.frombuffer(self.mm, np.uint64, nslots, applied_at)
        self.failed = np.frombuffer(self.mm, np.uint64, nslots, applied_at + _page(8 * nslots))

    def describe(self):
        """What a client needs to map its parts (sent with WELCOME)."""
        return {"slots": self.nslots, "hold_capacity": self.capacity, "region": self.region,
                "regions_at": self.regions_at, "sent_at": HEADER_SIZE,
                "applied_at": layout(self.nslots, self.capacity)[1]}

    def set_high(self, high):
        """Slots below ``high`` may be in use (readers scan only those counters)."""
        _U64.pack_into(self.mm, _HIGH_AT, high)

    def set_sync_puts(self, on):
        _U64.pack_into(self.mm, _SYNC_AT, 1 if on else 0)

    def _region_at(self, slot):
        return self.regions_at + slot * self.region

    def set_asleep(self, on):
        _U64.pack_into(self.mm, _ASLEEP_AT, 1 if on else 0)

    def ring_pending(self, slot):
        at = self._region_at(slot)
        return _U64.unpack_from(self.mm, at + _TAIL_AT)[0] != _U64.unpack_from(self.mm, at + _HEAD_AT)[0]

    def drain(self, slot):
        """The bytes of the seals in a slot's ring not taken yet (whole items only: the
        client moves its tail past an item after writing all of it). The caller calls
        ``consumed`` once they are applied."""
        at = self._region_at(slot)
        tail = _U64.unpack_from(self.mm, at + _TAIL_AT)[0]
        head = _U64.unpack_from(self.mm, at + _HEAD_AT)[0]
        if tail == head:
            return b"", head
        if tail < head or tail - head > RING_BYTES:
            return None, tail                 # a corrupt ring: the caller drops the client
        ring_at = at + self.region - RING_BYTES
        h, t = head % RING_BYTES, tail % RING_BYTES
        if h < t or tail - head == 0:
            data = self.mm[ring_at + h:ring_at + t]
        else:
            data = self.mm[ring_at + h:ring_at + RING_BYTES] + self.mm[ring_at:ring_at + t]
        return data, tail

    def consumed(self, slot, tail):
        _U64.pack_into(self.mm, self._region_at(slot) + _HEAD_AT, tail)

    def scrub(self, slot):
        """Empty a slot for its next client: no holds, counters equal."""
        at = self._region_at(slot)
        count = min(_U64.unpack_from(self.mm, at)[0], self.capacity)
        self.mm[at:at + REGION_HEAD + 8 * count] = bytes(REGION_HEAD + 8 * count)   # ring too
        self.sent[slot] = 0
        self.applied[slot] = 0
        self.failed[slot] = 0

    def settle(self, slot):
        """Forget seals a client sent but will never have applied (it is gone)."""
        self.applied[slot] = self.sent[slot]

    def held(self, slots):
        """Sorted unique extent offsets held by the clients in ``slots``."""
        parts = []
        mm, region, cap = self.mm, self.region, self.capacity
        for slot in slots:
            at = self.regions_at + slot * region
            count = min(_U64.unpack_from(mm, at)[0], cap)
            if count:
                parts.append(np.frombuffer(mm, np.uint64, count, at + REGION_HEAD))
        if not parts:
            return np.empty(0, np.uint64)
        arr = np.concatenate(parts)
        arr = arr[arr != 0]
        return np.unique(arr) - np.uint64(1)

    def close(self):
        self.sent = self.applied = self.failed = None
        try:
            self.mm.close()
        except BufferError:
            pass
        os.close(self.fd)


class ClientSlot:
    """A client's mapping of its own region and of the seal counters."""

    def __init__(self, fd, desc, slot):
        self.slot = slot
        self.capacity = desc["hold_capacity"]
        at = desc["regions_at"] + slot * desc["region"]
        self._region = mmap.mmap(fd, desc["region"], offset=at, flags=mmap.MAP_SHARED)
        self.holds = np.frombuffer(self._region, np.uint64, self.capacity, REGION_HEAD)
        self._ring_at = desc["region"] - RING_BYTES
        self._count_arr = np.frombuffer(self._region, np.uint64, 1, 0)
        ctr_len = desc["applied_at"] + 2 * _page(8 * desc["slots"])
        self._ctr = mmap.mmap(fd, ctr_len, flags=mmap.MAP_SHARED)
        self.sent = np.frombuffer(self._ctr, np.uint64, desc["slots"], desc["sent_at"])
        self.applied = np.frombuffer(self._ctr, np.uint64, desc["slots"], desc["applied_at"])
        self.failed = np.frombuffer(self._ctr, np.uint64, desc["slots"],
                                    desc["applied_at"] + _page(8 * desc["slots"]))
        self._sent_bytes = (desc["sent_at"], desc["applied_at"])
        # entries in use are those below count; freed entries are reused first
        self.count = int(self._count_arr[0])
        self._free = [i for i in range(self.count) if self.holds[i] == 0]

    # ---- holds (caller holds the client lock) ---------------------------------------------
    def hold(self, offset):
        """Publish a hold on the extent at offset; returns its entry index."""
        if self._free:
            i = self._free.pop()
            self.holds[i] = offset + 1
            return i
        i = self.count
        if i >= self.capacity:
            from kvstore.errors import TooManyHolds
            raise TooManyHolds(f"this client holds {i} objects at once, the limit; release "
                               f"views you no longer need")
        self.holds[i] = offset + 1
        self.count = i + 1
        self._count_arr[0] = i + 1          # after the entry: the daemon reads count first
        return i

    def unhold(self, i):
        self.holds[i] = 0
        self._free.append(i)

    def clear(self):
        """Drop every hold (close, or the store moved on)."""
        n = self.count
        self.holds[:n] = 0
        self._free = list(range(n))

    # ---- seal counters -----------------------------------------------------------------------
    def note_sent(self, n):
        self.sent[self.slot] = n

    def applied_mine(self):
        return int(self.applied[self.slot])

    # ---- the seal ring --------------------------------------------------------------------
    def ring_room(self):
        tail = _U64.unpack_from(self._region, _TAIL_AT)[0]
        head = _U64.unpack_from(self._region, _HEAD_AT)[0]
        return RING_BYTES - (tail - head)

    def ring_write(self, data):
        """Append whole seal items (the caller checked ring_room); the tail moves after
        every byte is written, so the daemon never reads half an item."""
        tail = _U64.unpack_from(self._region, _TAIL_AT)[0]
        t = tail % RING_BYTES
        n = len(data)
        at = self._ring_at
        first = min(n, RING_BYTES - t)
        self._region[at + t:at + t + first] = data[:first]
        if first < n:
            self._region[at:at + n - first] = data[first:]
        _U64.pack_into(self._region, _TAIL_AT, tail + n)

    def daemon_asleep(self):
        return _U64.unpack_from(self._ctr, _ASLEEP_AT)[0] != 0

    def sync_puts(self):
        """The daemon's index is nearly full: wait for each put's verdict."""
        return _U64.unpack_from(self._ctr, _SYNC_AT)[0] != 0

    def failed_mine(self):
        return int(self.failed[self.slot])

    def in_flight(self):
        """{slot: last seal sent} of every client with seals not yet applied, or {}."""
        hi = _U64.unpack_from(self._ctr, _HIGH_AT)[0] or len(self.sent)
        s, a = self._sent_bytes
        if self._ctr[s:s + 8 * hi] == self._ctr[a:a + 8 * hi]:
            return {}
        sent, applied = self.sent[:hi], self.applied[:hi]
        idx = np.flatnonzero(sent > applied)
        return {int(i): int(sent[i]) for i in idx}

    def caught_up(self, want):
        """Every slot in want has had its seals applied (or was emptied for a new
        client meanwhile: its counters start again from 0)."""
        applied, sent = self.applied, self.sent
        return all(int(applied[s]) >= n or int(sent[s]) < n for s, n in want.items())

    def close(self):
        self.holds = self._count_arr = self.sent = self.applied = self.failed = None
        for m in (self._region, self._ctr):
            try:
                m.close()
            except BufferError:
                pass
