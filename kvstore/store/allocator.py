"""Free-space allocator of the segment, kept inside the LMDB index.

Owns: the free-extent lists (``free_off``: offset -> length, for coalescing;
``free_size``: (length, offset) -> '', for best fit) and the alignment of every
allocation. Each function runs inside a write transaction the caller holds, so an
allocation and the object record that uses it commit together or not at all.
Must never: hand out overlapping extents, or free an extent that a reader may still
map (callers free only extents nobody holds).
"""

import struct

#: Every extent starts and ends on a cache line.
ALIGN = 64

_OFF = struct.Struct(">Q")       # big-endian so LMDB's byte order is numeric order
_SIZE_OFF = struct.Struct(">QQ")
_LEN = struct.Struct("<Q")


def extent_size(nbytes):
    """Bytes an object of nbytes occupies (zero-byte objects still take one line)."""
    return max(ALIGN, (nbytes + ALIGN - 1) & ~(ALIGN - 1))


def init(txn, dbs, segment_size):
    """Make the whole segment one free extent (fresh store)."""
    usable = segment_size & ~(ALIGN - 1)
    txn.put(_OFF.pack(0), _LEN.pack(usable), db=dbs.free_off)
    txn.put(_SIZE_OFF.pack(usable, 0), b"", db=dbs.free_size)


def alloc(txn, dbs, size):
    """Best-fit an extent of ``size`` (already extent_size-rounded); None when none fits."""
    cur = txn.cursor(db=dbs.free_size)
    if not cur.set_range(_SIZE_OFF.pack(size, 0)):
        return None
    have, off = _SIZE_OFF.unpack(cur.key())
    cur.delete()
    txn.delete(_OFF.pack(off), db=dbs.free_off)
    if have > size:
        rest_off, rest = off + size, have - size
        txn.put(_SIZE_OFF.pack(rest, rest_off), b"", db=dbs.free_size)
        txn.put(_OFF.pack(rest_off), _LEN.pack(rest), db=dbs.free_off)
    return off


def free(txn, dbs, off, size):
    """Return an extent, merging it with free neighbours on both sides."""
    free_off, free_size = dbs.free_off, dbs.free_size
    nxt = _OFF.pack(off + size)
    nlen = txn.get(nxt, db=free_off)
    if nlen is not None:
        (n,) = _LEN.unpack(nlen)
        txn.delete(nxt, db=free_off)
        txn.delete(_SIZE_OFF.pack(n, off + size), db=free_size)
        size += n
    cur = txn.cursor(db=free_off)
    found = cur.prev() if cur.set_range(_OFF.pack(off)) else cur.last()
    if found:
        (poff,) = _OFF.unpack(cur.key())
        (plen,) = _LEN.unpack(cur.value())
        if poff + plen == off:
            cur.delete()
            txn.delete(_SIZE_OFF.pack(plen, poff), db=free_size)
            off, size = poff, size + plen
    txn.put(_OFF.pack(off), _LEN.pack(size), db=free_off)
    txn.put(_SIZE_OFF.pack(size, off), b"", db=free_size)


def free_extents(txn, dbs):
    """[(offset, length)] of every free extent, in offset order (for checks and stats)."""
    return [(_OFF.unpack(k)[0], _LEN.unpack(v)[0]) for k, v in txn.cursor(db=dbs.free_off)]
