"""kvstore.checksum: the chunked copy-and-hash loops and the checksum they return.

Covers copy_and_hash (parts -> one destination at an offset) and copy_out_and_hash (one
source -> several destinations) for sizes 0, 1, 64, CHUNK-1, CHUNK, CHUNK+1 and
3*CHUNK+7, with one part / one destination and with several (including empty pieces and
a last destination larger than needed): the bytes land where they should, nothing around
them is touched, and the return value equals the checksum of the bytes (see H).
That they hash the DESTINATION is shown two ways: the return value always equals the
checksum of the destination after the call, and with a source that overlaps its
destination (so the bytes that land differ from the source's original bytes) the
return value is the checksum of what landed, not of the original source.
"""

import random

import pytest
import xxhash

from kvstore.checksum import CHUNK, checksum, copy_and_hash, copy_out_and_hash

SIZES = [0, 1, 64, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7]
def H(data):
    """The checksum's definition, written out independently: xxh3-64 up to CHUNK bytes,
    above that xxh3-64 of the concatenated xxh3-64 digests of the CHUNK-sized pieces."""
    data = bytes(data)
    if len(data) <= CHUNK:
        return xxhash.xxh3_64_intdigest(data)
    return xxhash.xxh3_64_intdigest(b"".join(xxhash.xxh3_64_digest(data[o:o + CHUNK])
                                             for o in range(0, len(data), CHUNK)))


def data_of(n, seed=0):
    return random.Random(seed).randbytes(n)


def split(n, pieces, rng, allow_empty=True):
    """Cut points giving ``pieces`` pieces of total n (some may be empty)."""
    if pieces == 1:
        return [n]
    cuts = sorted(rng.randrange(0 if allow_empty else 1, n + 1) for _ in range(pieces - 1))
    bounds = [0, *cuts, n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def test_checksum_is_xxh3_64_up_to_a_chunk_and_two_level_above():
    for n in (0, 1, CHUNK - 1, CHUNK):
        assert checksum(data_of(n)) == xxhash.xxh3_64_intdigest(data_of(n))
    for n in (CHUNK + 1, 3 * CHUNK + 7):
        assert checksum(data_of(n)) == H(data_of(n)) != xxhash.xxh3_64_intdigest(data_of(n))
        assert checksum(memoryview(data_of(n))) == checksum(bytearray(data_of(n)))
    assert checksum(b"") == H(b"")


# ---- copy_and_hash -------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("off", [0, 64, 4093])
def test_copy_and_hash_one_part(n, off):
    src = data_of(n)
    dst = bytearray(b"\xaa" * (off + n + 100))
    got = copy_and_hash([memoryview(src)], memoryview(dst), off)
    assert got == H(src)
    assert dst[off:off + n] == src
    assert dst[:off] == b"\xaa" * off and dst[off + n:] == b"\xaa" * 100
    assert got == H(bytes(dst[off:off + n]))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("pieces", [2, 3, 7])
def test_copy_and_hash_several_parts(n, pieces):
    rng = random.Random(n * 10 + pieces)
    src = data_of(n, seed=pieces)
    lens = split(n, pieces, rng)
    parts, at = [], 0
    for ln in lens:
        parts.append(memoryview(src)[at:at + ln])
        at += ln
    off = 128
    dst = bytearray(off + n + 64)
    got = copy_and_hash(parts, memoryview(dst), off)
    assert got == H(src)
    assert dst[off:off + n] == src
    assert dst[:off] == bytes(off) and dst[off + n:] == bytes(64)


@pytest.mark.parametrize("lens", [[0], [0, 0], [0, 5, 0], [CHUNK, CHUNK], [1, CHUNK, 1], [CHUNK + 1, 0, 3]])
def test_copy_and_hash_awkward_part_lengths(lens):
    bufs = [data_of(n, seed=i) for i, n in enumerate(lens)]
    whole = b"".join(bufs)
    dst = bytearray(len(whole))
    assert copy_and_hash([memoryview(b) for b in bufs], memoryview(dst), 0) == H(whole)
    assert dst == whole


def test_copy_and_hash_from_separate_buffers_and_readonly_sources():
    a, b = data_of(1000, 1), bytearray(data_of(CHUNK + 3, 2))
    dst = bytearray(len(a) + len(b))
    got = copy_and_hash([memoryview(a), memoryview(b).toreadonly()], memoryview(dst), 0)
    assert got == H(a + bytes(b)) and dst == a + b


# ---- copy_out_and_hash ---------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("extra", [0, 17])
def test_copy_out_and_hash_one_destination(n, extra):
    src = data_of(n, seed=3)
    dst = bytearray(b"\x55" * (n + extra))
    got = copy_out_and_hash(memoryview(src), [memoryview(dst)])
    assert got == H(src)
    assert dst[:n] == src and dst[n:] == b"\x55" * extra
    assert got == H(bytes(dst[:n]))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("pieces", [2, 3, 7])
def test_copy_out_and_hash_several_destinations(n, pieces):
    rng = random.Random(n + pieces)
    src = data_of(n, seed=4)
    lens = split(n, pieces, rng)
    lens[-1] += 33                                    # the last one has room to spare
    dsts = [bytearray(b"\x77" * ln) for ln in lens]
    got = copy_out_and_hash(memoryview(src), [memoryview(d) for d in dsts])
    assert got == H(src)
    landed = b"".join(bytes(d) for d in dsts)
    assert landed[:n] == src and landed[n:] == b"\x77" * 33
    assert got == H(landed[:n])


def test_copy_out_and_hash_stops_once_everything_landed():
    src = data_of(100)
    dsts = [bytearray(60), bytearray(60), bytearray(b"\x01" * 10)]
    got = copy_out_and_hash(memoryview(src), [memoryview(d) for d in dsts])
    assert got == H(src)
    assert dsts[0] + dsts[1][:40] == src and dsts[1][40:] == bytes(20) and dsts[2] == b"\x01" * 10


def test_copy_out_and_hash_into_empty_destinations():
    src = data_of(CHUNK + 10)
    dsts = [bytearray(0), bytearray(CHUNK), bytearray(0), bytearray(10)]
    assert copy_out_and_hash(memoryview(src), [memoryview(d) for d in dsts]) == H(src)
    assert b"".join(dsts) == src


def test_copy_out_and_hash_of_nothing():
    assert copy_out_and_hash(memoryview(b""), [memoryview(bytearray(8))]) == H(b"")
    assert copy_out_and_hash(memoryview(b""), [memoryview(bytearray(0)), memoryview(bytearray(0))]) == H(b"")


# ---- the hash is of the destination --------------------------------------------------------
@pytest.mark.parametrize("n, shift", [(CHUNK + 1, 64), (3 * CHUNK + 7, 4096), (2 * CHUNK, CHUNK // 2)])
def test_copy_and_hash_hashes_what_landed_not_the_source(n, shift):
    """The source overlaps its destination, which starts ``shift`` bytes later: each chunk
    copied overwrites the start of the next source chunk, so what lands is NOT the
    source's original bytes. The checksum returned is that of what landed."""
    buf = bytearray(data_of(n + shift, seed=9))
    original = bytes(buf[:n])
    mv = memoryview(buf)
    got = copy_and_hash([mv[:n]], mv, shift)
    landed = bytes(buf[shift:shift + n])
    assert landed != original                         # the copy really did change the bytes
    assert got == H(landed)
    assert got != H(original)


def test_copy_and_hash_with_a_later_part_overwritten_by_an_earlier_one():
    """Two small parts; the first one's destination covers the second part's source."""
    buf = bytearray(data_of(400, seed=10))
    mv = memoryview(buf)
    p1, p2 = mv[0:100], mv[100:200]
    original = bytes(buf[0:200])
    got = copy_and_hash([p1, p2], mv, 150)            # p1 lands on [150, 250): over p2's [150, 200)
    landed = bytes(buf[150:350])
    assert landed != original
    assert got == H(landed) != H(original)


@pytest.mark.parametrize("n, shift", [(CHUNK + 1, 64), (3 * CHUNK + 7, 4096)])
def test_copy_out_and_hash_hashes_what_landed_not_the_source(n, shift):
    buf = bytearray(data_of(n + shift, seed=11))
    original = bytes(buf[:n])
    mv = memoryview(buf)
    got = copy_out_and_hash(mv[:n], [mv[shift:shift + n]])
    landed = bytes(buf[shift:shift + n])
    assert landed != original
    assert got == H(landed) != H(original)


def test_copy_out_and_hash_several_destinations_over_the_source():
    buf = bytearray(data_of(1000, seed=12))
    mv = memoryview(buf)
    original = bytes(buf[:300])
    got = copy_out_and_hash(mv[:300], [mv[200:350], mv[600:750]])  # the first lands on src[200:300)
    landed = bytes(buf[200:350]) + bytes(buf[600:750])
    assert landed != original
    assert got == H(landed) != H(original)
