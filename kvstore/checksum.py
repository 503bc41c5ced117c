"""The object checksum and the copies that compute it on the way.

Owns: the checksum recorded at seal and verified by every copy out and by recovery
(xxh3-64), and the two chunked copy-and-hash loops: into the segment (a put) and out
of it (a verified read). Each copies a cache-sized chunk and hashes it while it is
still in cache, instead of reading the whole value back from memory after the copy;
each hashes the bytes where they LANDED, never the source (a reader without a hold may
see the source change between the copy and the hash).
Must never: hash anything but the destination of a copy.
"""

import xxhash

#: Chunk of a copy-and-hash (measured here: 13.8 GB/s against 12.2 for copy-then-hash of
#: 16 MiB; smaller chunks lose to loop overhead).
CHUNK = 1 << 20

checksum = xxhash.xxh3_64_intdigest


def copy_and_hash(parts, dst, off):
    """Copy the flat memoryviews ``parts`` one after another into ``dst`` from ``off``;
    returns the checksum of what landed there."""
    if len(parts) == 1:
        src = parts[0]
        n = src.nbytes
        if n <= CHUNK:
            dst[off:off + n] = src
            return checksum(dst[off:off + n])
    h = xxhash.xxh3_64()
    pos = off
    for src in parts:
        n = src.nbytes
        for o in range(0, n, CHUNK):
            e = min(n, o + CHUNK)
            dst[pos + o:pos + e] = src[o:e]
            h.update(dst[pos + o:pos + e])
        pos += n
    return h.intdigest()


def copy_out_and_hash(src, dsts):
    """Copy src into the flat memoryviews dsts one after another; returns the checksum of
    what landed in them."""
    n, pos = src.nbytes, 0
    if len(dsts) == 1 and n <= CHUNK and dsts[0].nbytes >= n:
        d = dsts[0]
        d[:n] = src
        return checksum(d[:n])
    h = xxhash.xxh3_64()
    for d in dsts:
        take = min(d.nbytes, n - pos)
        for o in range(0, take, CHUNK):
            e = min(take, o + CHUNK)
            d[o:e] = src[pos + o:pos + e]
            h.update(d[o:e])
        pos += take
        if pos >= n:
            break
    return h.intdigest()
