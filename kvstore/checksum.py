"""The object checksum and the copies that compute it on the way.

Owns: the checksum recorded at seal and verified by every copy out and by recovery, and
the copy-and-hash loops: into the segment (a put) and out of it (a verified read).
They copy a chunk and hash it while it is still in cache, instead of reading the whole
value back from memory after the copy, and they hash the bytes where they LANDED, never
the source (a reader without a hold may see the source change between the copy and the
hash).

The checksum is xxh3-64 of the object for objects up to CHUNK bytes; for larger ones it
is xxh3-64 of the concatenated xxh3-64 digests of its CHUNK-sized pieces (a two-level
hash). The pieces are independent, so a large copy is split between two threads
(numpy's copy and xxhash both release the GIL): one core alone cannot copy into cold
memory at memcpy speed and hash as well.
Must never: hash anything but the destination of a copy, or compute the checksum of one
object two different ways.
"""

import os
import threading

import numpy as np
import xxhash

#: Piece of the two-level hash and of a copy-and-hash (1 MiB: measured here, smaller
#: pieces lose to loop overhead, larger ones fall out of the cache before they are hashed).
CHUNK = 1 << 20
#: Copies at least this large are split between two threads.
PARALLEL = 4 * CHUNK

_h64 = xxhash.xxh3_64_intdigest
_d64 = xxhash.xxh3_64_digest


def checksum(data):
    """The checksum of an object's bytes (any buffer)."""
    n = memoryview(data).nbytes if not isinstance(data, (bytes, bytearray)) else len(data)
    if n <= CHUNK:
        return _h64(data)
    mv = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
    return _h64(b"".join(_d64(mv[o:o + CHUNK]) for o in range(0, n, CHUNK)))


def piece_digest(view, size):
    """What the checksum needs of one landed piece (CHUNK bytes at a multiple of CHUNK) of
    an object of ``size`` bytes: the whole checksum when the object is one piece, else
    the piece's digest (see from_pieces)."""
    return _h64(view) if size <= CHUNK else _d64(view)


def from_pieces(digests, size, data):
    """The checksum of an object from {piece offset: piece_digest}, hashing ``data``
    (the whole object) for any piece missing."""
    if size <= CHUNK:
        got = digests.get(0)
        return got if got is not None else _h64(data)
    mv = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
    return _h64(b"".join(digests.get(o) or _d64(mv[o:o + CHUNK]) for o in range(0, size, CHUNK)))


# ---- a second thread for large copies ---------------------------------------------------------
_pool = None
_pool_pid = 0
_pool_lock = threading.Lock()


def helper_thread():
    """The one-thread executor that does the second half of large copies (this module's and
    client/safecopy's), made anew in a forked child: the parent's thread is not there."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        with _pool_lock:
            if _pool is None or _pool_pid != os.getpid():
                from concurrent.futures import ThreadPoolExecutor
                _pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-copy")
                _pool_pid = os.getpid()
    return _pool


def _as_array(buf):
    return np.frombuffer(buf, dtype=np.uint8)


def _copy_pieces(dst, src, lo, hi, out):
    """Copy src[lo:hi] to dst[lo:hi] piece by piece (numpy arrays, GIL released) and
    store each landed piece's digest in out."""
    for o in range(lo, hi, CHUNK):
        e = min(hi, o + CHUNK)
        d = dst[o:e]
        np.copyto(d, src[o:e])
        out[o // CHUNK] = _d64(d)


def _copy_one(dst, src, n):
    """Copy n bytes between two flat uint8 arrays; returns the checksum of what landed."""
    if n <= CHUNK:
        np.copyto(dst[:n], src[:n])
        return _h64(dst[:n])
    pieces = (n + CHUNK - 1) // CHUNK
    out = [None] * pieces
    if n >= PARALLEL:
        mid = (pieces // 2) * CHUNK
        fut = helper_thread().submit(_copy_pieces, dst, src, mid, n, out)
        try:
            _copy_pieces(dst, src, 0, mid, out)
        finally:
            fut.result()
    else:
        _copy_pieces(dst, src, 0, n, out)
    return _h64(b"".join(out))


def copy_and_hash(parts, dst, off):
    """Copy the flat memoryviews ``parts`` one after another into ``dst`` (a memoryview of
    the segment) from ``off``; returns the checksum of what landed there."""
    if len(parts) == 1:
        src = parts[0]
        n = src.nbytes
        if n <= CHUNK:
            dst[off:off + n] = src
            return _h64(dst[off:off + n])
        return _copy_one(_as_array(dst[off:off + n]), _as_array(src), n)
    pos = off
    for src in parts:                       # a gather: copy, then hash what landed
        n = src.nbytes
        if n:
            np.copyto(_as_array(dst[pos:pos + n]), _as_array(src))
        pos += n
    return checksum(dst[off:pos])


def copy_out_and_hash(src, dsts):
    """Copy src (a memoryview of the segment) into the flat memoryviews dsts one after
    another; returns the checksum of what landed in them."""
    n = src.nbytes
    if len(dsts) == 1 and dsts[0].nbytes >= n:
        d = dsts[0]
        if n <= CHUNK:
            d[:n] = src
            return _h64(d[:n])
        return _copy_one(_as_array(d), _as_array(src), n)
    pos = 0                                 # a scatter: copy, then hash the object's pieces
    landed = []
    for d in dsts:
        take = min(d.nbytes, n - pos)
        if take:
            d[:take] = src[pos:pos + take]
            landed.append(d[:take])
        pos += take
        if pos >= n:
            break
    if n <= CHUNK:
        h = xxhash.xxh3_64()
        for piece in landed:
            h.update(piece)
        return h.intdigest()
    digests, h, filled = [], xxhash.xxh3_64(), 0
    for piece in landed:
        at = 0
        while at < piece.nbytes:
            take = min(CHUNK - filled, piece.nbytes - at)
            h.update(piece[at:at + take])
            filled += take
            at += take
            if filled == CHUNK:
                digests.append(h.digest())
                h, filled = xxhash.xxh3_64(), 0
    if filled:
        digests.append(h.digest())
    return _h64(b"".join(digests))
