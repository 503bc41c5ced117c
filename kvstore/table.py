"""The published table: the lock-free lookup index every client reads.

Owns: the layout of the table file (one per daemon run, in /dev/shm) and both sides of
its protocol: ``TableReader`` (clients: look a key up without a lock, a write or a
system call) and ``TableWriter`` (the daemon, its only writer: publish, unpublish,
build from the records of its LMDB index, grow, retire).

Why it exists: the daemon's LMDB index is the truth, but LMDB's readers pin pages and
its writers take a cross-process lock, so a client stopped inside either can stall or
fill the index for everyone. Clients read this table instead: a frozen reader holds
nothing and blocks nobody, because the daemon never waits for readers.

Layout: a 4 KiB header, then ``nbuckets`` 64-byte buckets (an open-addressing hash
table with linear probing and no wrap-around: ``capacity`` home buckets plus an
overflow run), then one "referenced" mark byte per bucket (page-aligned; the only
part clients write: a use of an object sets its mark, the daemon's CLOCK sweep clears
it). A bucket holds a seqlock word, the entry's state, the xxh3-128 digest of the
namespaced key (the daemon refuses to publish two keys with one digest, so a digest
names one key), and the object's offset, size, checksum and creator.

Seqlock: the daemon makes a bucket's sequence odd, writes the fields, makes it even
again, each as a separate store. A reader unpacks the bucket and re-reads the sequence;
it accepts the fields only if both reads agree and are even. Correct on x86-64's
total store order (stores become visible in program order, loads are not reordered
with loads); other memory models would need explicit barriers.

Retirement: when the daemon moves to a new table (growth, or a restart) it sets
``retired`` in the old header and makes every bucket's sequence odd, so a reader of
the old table sees "busy", reads the header, and moves to the current table.

Must never: be written by anyone but the daemon (clients map the buckets read-only),
make a half-written entry readable, or wrap a probe run around the end.
"""

import mmap
import os
import struct
from typing import NamedTuple

import numpy as np
import xxhash

from . import access
from .record import State

MAGIC = b"KVSTABLE"
VERSION = 1
HEADER_SIZE = 4096
BUCKET_SIZE = 64
OVERFLOW = 1024                         # buckets past the last home bucket
#: Grow when live entries plus tombstones pass this fraction of the home buckets.
MAX_LOAD = 0.7

# bucket states (EMPTY ends a probe run; TOMBSTONE does not)
EMPTY, TOMBSTONE = 0, 3
CREATING, SEALED = int(State.CREATING), int(State.SEALED)

_M64 = (1 << 64) - 1
#: Header fields: magic, version, bucket size, capacity, nbuckets, generation, retired, live, used
_HEADER = struct.Struct("<8sIIQQQIxxxxQQ")
_RETIRED_AT = 40
_RETIRED = struct.Struct("<I")
_LIVE_AT = 48
_COUNTS = struct.Struct("<QQ")
# seq, state, flags, pad, digest lo, digest hi, offset, size, checksum, creator, spare
_BUCKET = struct.Struct("<IBBHQQQQQQQ")
_FIELDS = struct.Struct("<BBHQQQQQQQ")   # the bucket after its sequence word
_SEQ = struct.Struct("<I")
_HEAD = struct.Struct("<IBBHQQ")          # a bucket up to its digest
_new = tuple.__new__                     # a NamedTuple without its Python-level __new__

BUCKET_DTYPE = np.dtype([("seq", "<u4"), ("state", "u1"), ("flags", "u1"), ("pad", "<u2"),
                         ("dlo", "<u8"), ("dhi", "<u8"), ("offset", "<u8"), ("size", "<u8"),
                         ("checksum", "<u8"), ("creator", "<u8"), ("spare", "<u8")])
assert BUCKET_DTYPE.itemsize == BUCKET_SIZE

digest = xxhash.xxh3_128_intdigest


class Entry(NamedTuple):
    """What a reader found for a key: a consistent snapshot of one bucket."""
    bucket: int
    seq: int
    state: int            # CREATING or SEALED
    flags: int
    offset: int
    size: int
    checksum: int
    creator: int


class Busy(Exception):
    """A bucket stayed mid-update (the daemon died while writing it) or the table was
    retired: the caller re-attaches to the current table and retries."""


def _page(n):
    return (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


def layout(capacity):
    """(nbuckets, marks offset, file size) for a table of ``capacity`` home buckets."""
    nbuckets = capacity + OVERFLOW
    marks_at = _page(HEADER_SIZE + nbuckets * BUCKET_SIZE)
    return nbuckets, marks_at, marks_at + _page(nbuckets)


def capacity_for(entries):
    """Home buckets for a table holding ``entries`` at most half full (a power of two)."""
    want = max(4096, 2 * entries)
    return 1 << (want - 1).bit_length()


# ---- clients -----------------------------------------------------------------------------
class TableReader:
    """A client's read-only view of one table file (plus its writable marks)."""

    def __init__(self, fd):
        hdr = os.pread(fd, _HEADER.size, 0)
        magic, version, bsize, capacity, nbuckets, self.generation, _, _, _ = _HEADER.unpack(hdr)
        if magic != MAGIC or version != VERSION or bsize != BUCKET_SIZE:
            raise ValueError("not a kvstore table file of this version")
        nb, marks_at, size = layout(capacity)
        self.capacity, self.nbuckets, self.mask = capacity, nbuckets, capacity - 1
        self._mm = mmap.mmap(fd, marks_at, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
        self._marks = mmap.mmap(fd, size - marks_at, offset=marks_at,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, flags=mmap.MAP_SHARED)
        self._end = HEADER_SIZE + nbuckets * BUCKET_SIZE

    def retired(self):
        return _RETIRED.unpack_from(self._mm, _RETIRED_AT)[0] != 0

    def lookup(self, key, spins=2000):
        """The Entry of key (CREATING or SEALED), or None. Raises Busy if a bucket on
        the way stays mid-update for ``spins`` re-reads, or the table is retired."""
        h = digest(key)
        lo, hi = h & _M64, h >> 64
        mm, unpack, seq_of = self._mm, _BUCKET.unpack_from, _SEQ.unpack_from
        p = HEADER_SIZE + ((lo & self.mask) << 6)
        end = self._end
        while p < end:
            r = unpack(mm, p)
            seq = r[0]
            if seq & 1:
                spins -= 1
                if spins <= 0 or self.retired():
                    raise Busy()
                continue
            state = r[1]
            if state == EMPTY:
                return None
            if r[4] == lo and r[5] == hi and state != TOMBSTONE:
                if seq_of(mm, p)[0] != seq:
                    continue                     # changed under us: read it again
                return _new(Entry, ((p - HEADER_SIZE) >> 6, seq, state, r[2], r[6], r[7], r[8], r[9]))
            p += BUCKET_SIZE
        return None

    def sealed(self, key, spins=2000):
        """Whether key names a sealed object (lookup() without building an Entry)."""
        h = digest(key)
        lo, hi = h & _M64, h >> 64
        mm, unpack = self._mm, _HEAD.unpack_from
        p = HEADER_SIZE + ((lo & self.mask) << 6)
        end = self._end
        while p < end:
            seq, state, _, _, dlo, dhi = unpack(mm, p)
            if seq & 1:
                spins -= 1
                if spins <= 0 or self.retired():
                    raise Busy()
                continue
            if state == EMPTY:
                return False
            if dlo == lo and dhi == hi and state != TOMBSTONE:
                if _SEQ.unpack_from(mm, p)[0] != seq:
                    continue
                return state == SEALED
            p += BUCKET_SIZE
        return False

    def unchanged(self, entry):
        """True if the entry's bucket has not changed since the lookup (and the table is
        still current): the seqlock re-check that makes a hold safe."""
        return (_SEQ.unpack_from(self._mm, HEADER_SIZE + (entry.bucket << 6))[0] == entry.seq
                and not self.retired())

    def same_seq(self, bucket, seq):
        return _SEQ.unpack_from(self._mm, HEADER_SIZE + (bucket << 6))[0] == seq

    def mark(self, bucket):
        """Record a use of the object in ``bucket`` for the CLOCK sweep."""
        self._marks[bucket] = 1

    def close(self):
        for m in (self._mm, self._marks):
            try:
                m.close()
            except BufferError:      # a caller still has a view: the GC closes it later
                pass


# ---- the daemon ----------------------------------------------------------------------------
class TableWriter:
    """The daemon's handle on the current table: the only writer."""

    def __init__(self, path, capacity, generation):
        nbuckets, marks_at, size = layout(capacity)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.path = fd, path
        self.capacity, self.nbuckets, self.mask, self.generation = capacity, nbuckets, capacity - 1, generation
        self.marks_at = marks_at
        _HEADER.pack_into(self.mm, 0, MAGIC, VERSION, BUCKET_SIZE, capacity, nbuckets, generation, 0, 0, 0)
        self.buckets = np.frombuffer(self.mm, BUCKET_DTYPE, nbuckets, HEADER_SIZE)
        self.marks = np.frombuffer(self.mm, np.uint8, nbuckets, marks_at)
        self.live = self.used = 0

    def set_mode(self, mode):
        """The file's mode, and its group when mode is a kvstore.access.Access with one
        (clients write the marks area through the fd they are handed)."""
        access.apply(self.fd, mode)

    def _counts(self):
        _COUNTS.pack_into(self.mm, _LIVE_AT, self.live, self.used)

    def find(self, key):
        """Bucket index of key's live entry, or None (no seqlock: only we write)."""
        return self._find(*_split(digest(key)))[0]

    def _find(self, lo, hi):
        """(bucket of the live entry or None, first reusable bucket on the way or None)."""
        mm, unpack = self.mm, _BUCKET.unpack_from
        b = lo & self.mask
        free = None
        while b < self.nbuckets:
            r = unpack(mm, HEADER_SIZE + (b << 6))
            state = r[1]
            if state == EMPTY:
                return None, (b if free is None else free)
            if state == TOMBSTONE:
                if free is None:
                    free = b
            elif r[4] == lo and r[5] == hi:
                return b, free
            b += 1
        return None, free

    def _write(self, b, state, flags, lo, hi, offset, size, checksum, creator):
        mm, p = self.mm, HEADER_SIZE + (b << 6)
        seq = _SEQ.unpack_from(mm, p)[0]
        _SEQ.pack_into(mm, p, seq + 1)                      # odd: readers wait
        _FIELDS.pack_into(mm, p + 4, state, flags, 0, lo, hi, offset, size, checksum, creator, 0)
        _SEQ.pack_into(mm, p, seq + 2)                      # even: readable again

    def publish(self, key, rec):
        """Make key -> rec visible (insert, or update in place). Returns False when the
        table must grow first (no free bucket in the probe run, or too loaded); raises
        KeyError if another key has the same digest (never seen in practice)."""
        lo, hi = _split(digest(key))
        b, free = self._find(lo, hi)
        if b is None:
            if free is None or self.used + 1 > MAX_LOAD * self.capacity:
                return False
            if self.buckets["state"][free] == EMPTY:
                self.used += 1
            self.live += 1
            b = free
            self.marks[b] = 0
        self._write(b, int(rec.state), int(rec.flags), lo, hi, rec.offset, rec.size, rec.checksum, rec.creator)
        self._counts()
        return True

    def unpublish(self, key):
        """Hide key's entry (a tombstone keeps probe runs intact). False if absent."""
        lo, hi = _split(digest(key))
        b, _ = self._find(lo, hi)
        if b is None:
            return False
        self._write(b, TOMBSTONE, 0, 0, 0, 0, 0, 0, 0)
        self.live -= 1
        self._counts()
        return True

    def take_mark(self, key):
        """Whether key's object was used since the last call (and clear the mark)."""
        b = self.find(key)
        if b is None or not self.marks[b]:
            return False
        self.marks[b] = 0
        return True

    def fill(self, dlo, dhi, state, flags, offset, size, checksum, creator):
        """Place entries into this EMPTY table at once (vectorised linear probing: sorted by
        home bucket, each entry lands at max(home, previous position + 1)). Returns
        False if they do not fit before the end."""
        n = len(dlo)
        if n == 0:
            return True
        home = (dlo & np.uint64(self.mask)).astype(np.int64)
        order = np.argsort(home, kind="stable")
        idx = np.arange(n, dtype=np.int64)
        pos = np.maximum.accumulate(home[order] - idx) + idx
        if pos[-1] >= self.nbuckets or n > MAX_LOAD * self.capacity:
            return False
        rows = np.zeros(n, BUCKET_DTYPE)          # built contiguous, then placed in one pass
        for name, col in (("state", state), ("flags", flags), ("dlo", dlo), ("dhi", dhi),
                          ("offset", offset), ("size", size), ("checksum", checksum), ("creator", creator)):
            rows[name] = np.asarray(col)[order]
        rows["seq"] = 2
        self.buckets[pos] = rows
        self.live = self.used = n
        self._counts()
        return True

    def entries(self):
        """The live entries as a structured array (for a rebuild into a larger table)."""
        st = self.buckets["state"]
        return self.buckets[(st == CREATING) | (st == SEALED)].copy()

    def retire(self):
        """Hand readers over to a newer table: flag the header, then make every bucket
        look mid-update so a reader anywhere in a probe run checks the header."""
        _RETIRED.pack_into(self.mm, _RETIRED_AT, 1)
        self.buckets["seq"] |= 1

    def close(self, unlink=False):
        self.buckets = self.marks = None
        try:
            self.mm.close()
        except BufferError:
            pass
        os.close(self.fd)
        if unlink:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _split(h):
    return h & _M64, h >> 64


def digests(keys):
    """(lo, hi) uint64 arrays of the digests of keys (for fill). The canonical 16-byte
    digest is the 128-bit value big-endian: high half first."""
    if not keys:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    both = np.frombuffer(b"".join(map(xxhash.xxh3_128_digest, keys)), dtype=">u8").reshape(-1, 2)
    return both[:, 1].astype(np.uint64), both[:, 0].astype(np.uint64)


def retire_file(path):
    """Retire the table a previous daemon run left at path (if any) and remove it.
    Clients of that run that have not reconnected yet see it retired and wait."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        hdr = os.pread(fd, _HEADER.size, 0)
        if len(hdr) == _HEADER.size and hdr[:8] == MAGIC:
            capacity = _HEADER.unpack(hdr)[3]
            nbuckets, marks_at, size = layout(capacity)
            if os.fstat(fd).st_size >= size:
                mm = mmap.mmap(fd, marks_at, flags=mmap.MAP_SHARED)
                _RETIRED.pack_into(mm, _RETIRED_AT, 1)
                arr = np.frombuffer(mm, BUCKET_DTYPE, nbuckets, HEADER_SIZE)
                arr["seq"] |= 1
                del arr
                mm.close()
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
