"""kvstore.table: the published table (TableWriter, the daemon; TableReader, clients).

A TableWriter in tmp_path (capacity 4096, generation 1) and a TableReader on an os.open
fd of the same file. Covers: publish then lookup returns the same fields (offset, size,
checksum, state, flags, creator), for CREATING and SEALED entries and u64 edge values;
unpublish -> None; re-publish after unpublish reuses the tombstone; update in place keeps
one live entry; 2000 keys all found and absent keys not found; fill() (vectorised build
from kvstore.table.digests) gives the same lookups as publishing one by one; fill()
refuses runs past the end (no wrap-around) and too many entries; publish returns False
past MAX_LOAD and when a probe run reaches the end; retire() makes lookups raise Busy;
unchanged(entry) holds until the entry's bucket is rewritten; the marks (reader.mark ->
writer.marks, take_mark reads and clears, a new entry starts unmarked); the header
counters; retire_file() retires a previous run's table and removes the file.
"""

import os

import numpy as np
import pytest

from kvstore import table as T
from kvstore.record import Flag, Record, State

CAP = 4096
U64_MAX = 2 ** 64 - 1


def rec(offset=0, size=10, checksum=123, state=State.SEALED, flags=Flag.NONE, creator=7):
    return Record(offset, size, creator, 0, checksum, state, flags)


def same(entry, r):
    """The entry carries the record's published fields."""
    return (entry is not None and entry.offset == r.offset and entry.size == r.size
            and entry.checksum == r.checksum and entry.state == int(r.state)
            and entry.flags == int(r.flags) and entry.creator == r.creator)


class Pair:
    def __init__(self, path, capacity=CAP, generation=1):
        self.path = str(path)
        self.w = T.TableWriter(self.path, capacity, generation)
        self.fd = os.open(self.path, os.O_RDWR)
        self.r = T.TableReader(self.fd)

    def close(self):
        self.r.close()
        os.close(self.fd)
        self.w.close()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path / "table")
    yield p
    p.close()


def home(key, capacity=CAP):
    return T.digest(key) & (capacity - 1)


def keys_with_home(bucket, n, capacity=CAP, start=0):
    out, i = [], start
    while len(out) < n:
        k = b"h%d" % i
        if home(k, capacity) == bucket:
            out.append(k)
        i += 1
    return out


# ---- layout / header -----------------------------------------------------------------------
def test_reader_sees_the_writers_geometry(pair):
    assert pair.r.capacity == CAP and pair.r.nbuckets == CAP + T.OVERFLOW
    assert pair.r.generation == 1
    assert not pair.r.retired()
    nbuckets, marks_at, size = T.layout(CAP)
    assert os.path.getsize(pair.path) == size
    assert marks_at % 4096 == 0 and marks_at >= T.HEADER_SIZE + nbuckets * T.BUCKET_SIZE


def test_reader_refuses_a_file_that_is_not_a_table(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"\x00" * 8192)
    fd = os.open(p, os.O_RDWR)
    try:
        with pytest.raises(ValueError):
            T.TableReader(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("entries, capacity", [(0, 4096), (2000, 4096), (3000, 8192), (10 ** 6, 1 << 21)])
def test_capacity_for_is_a_power_of_two_with_room(entries, capacity):
    """At most half full once built, so it can take more before it must grow."""
    got = T.capacity_for(entries)
    assert got == capacity and got & (got - 1) == 0
    assert entries <= got / 2


# ---- publish / lookup / unpublish ----------------------------------------------------------
def test_lookup_in_an_empty_table(pair):
    assert pair.r.lookup(b"nothing") is None


@pytest.mark.parametrize("r", [
    rec(), rec(offset=0, size=0, checksum=0, creator=0),
    rec(offset=U64_MAX, size=U64_MAX, checksum=U64_MAX, creator=U64_MAX),
    rec(state=State.CREATING, checksum=0), rec(flags=Flag.PINNED), rec(state=State.CREATING, flags=Flag.PINNED),
])
def test_publish_then_lookup_finds_the_same_fields(pair, r):
    assert pair.w.publish(b"key", r) is True
    e = pair.r.lookup(b"key")
    assert same(e, r)
    assert e.state in (T.CREATING, T.SEALED)
    assert e.seq % 2 == 0 and e.seq > 0
    assert e.bucket == pair.w.find(b"key")
    assert pair.r.lookup(b"other") is None


def test_unpublish_hides_the_entry(pair):
    pair.w.publish(b"k", rec())
    assert pair.w.unpublish(b"k") is True
    assert pair.r.lookup(b"k") is None
    assert pair.w.find(b"k") is None
    assert pair.w.unpublish(b"k") is False
    assert pair.w.unpublish(b"never") is False
    assert (pair.w.live, pair.w.used) == (0, 1)          # the tombstone still counts as used


def test_republish_after_unpublish_reuses_the_tombstone(pair):
    pair.w.publish(b"k", rec(offset=64))
    b = pair.r.lookup(b"k").bucket
    pair.w.unpublish(b"k")
    assert pair.w.buckets["state"][b] == T.TOMBSTONE
    assert pair.w.publish(b"k", rec(offset=128)) is True
    e = pair.r.lookup(b"k")
    assert e.bucket == b and e.offset == 128
    assert (pair.w.live, pair.w.used) == (1, 1)


def test_a_tombstone_does_not_end_a_probe_run(pair):
    """Three keys with one home bucket: removing the first keeps the others reachable,
    and a new key with that home fills the tombstone."""
    a, b, c, d = keys_with_home(100, 4)
    for i, k in enumerate((a, b, c)):
        pair.w.publish(k, rec(offset=64 * i))
    assert [pair.r.lookup(k).bucket for k in (a, b, c)] == [100, 101, 102]
    pair.w.unpublish(a)
    assert pair.r.lookup(a) is None
    assert pair.r.lookup(b).offset == 64 and pair.r.lookup(c).offset == 128
    pair.w.publish(d, rec(offset=999 * 64))
    assert pair.r.lookup(d).bucket == 100
    pair.w.publish(a, rec(offset=4096))
    assert pair.r.lookup(a).bucket == 103
    assert (pair.w.live, pair.w.used) == (4, 4)


def test_update_in_place_keeps_one_live_entry(pair):
    pair.w.publish(b"k", rec(state=State.CREATING, checksum=0, offset=64))
    first = pair.r.lookup(b"k")
    pair.w.publish(b"k", rec(state=State.SEALED, checksum=42, offset=64, flags=Flag.PINNED))
    e = pair.r.lookup(b"k")
    assert e.bucket == first.bucket and e.seq > first.seq
    assert e.state == T.SEALED and e.checksum == 42 and e.flags == int(Flag.PINNED)
    assert (pair.w.live, pair.w.used) == (1, 1)
    assert len(pair.w.entries()) == 1


def test_update_in_place_past_an_earlier_tombstone_keeps_one_entry(pair):
    a, b = keys_with_home(200, 2)
    pair.w.publish(a, rec())
    pair.w.publish(b, rec(offset=64))
    pair.w.unpublish(a)
    pair.w.publish(b, rec(offset=128))                  # updates b where it is, not in a's tombstone
    assert pair.r.lookup(b).bucket == 201 and pair.r.lookup(b).offset == 128
    assert len(pair.w.entries()) == 1 and pair.w.live == 1


def test_many_keys_all_found_and_absent_keys_not(pair):
    keys = [b"key-%d" % i for i in range(2000)]
    recs = {k: rec(offset=64 * i, size=i, checksum=i * 31, creator=i % 5) for i, k in enumerate(keys)}
    for k in keys:
        assert pair.w.publish(k, recs[k])
    for k in keys:
        assert same(pair.r.lookup(k), recs[k])
    for i in range(2000):
        assert pair.r.lookup(b"absent-%d" % i) is None
    assert (pair.w.live, pair.w.used) == (2000, 2000)
    assert len(pair.w.entries()) == 2000
    for k in keys[::2]:
        pair.w.unpublish(k)
    for i, k in enumerate(keys):
        assert (pair.r.lookup(k) is None) == (i % 2 == 0)


def test_header_counters_follow_live_and_used(pair):
    import struct
    for i in range(10):
        pair.w.publish(b"k%d" % i, rec())
    pair.w.unpublish(b"k3")
    with open(pair.path, "rb") as f:
        f.seek(48)
        assert struct.unpack("<QQ", f.read(16)) == (9, 10)


def test_publish_returns_false_past_max_load(pair):
    limit = int(T.MAX_LOAD * CAP)
    for i in range(limit):
        assert pair.w.publish(b"k%d" % i, rec(offset=i)) is True, i
    assert pair.w.publish(b"one-more", rec()) is False
    assert pair.r.lookup(b"one-more") is None
    assert (pair.w.live, pair.w.used) == (limit, limit)
    assert pair.w.publish(b"k5", rec(offset=999)) is True          # updates still work
    assert pair.r.lookup(b"k5").offset == 999


def test_publish_returns_false_when_the_probe_run_reaches_the_end(pair):
    """No wrap-around: with every bucket from the last home bucket to the end taken, a key
    whose home is the last home bucket cannot be placed (nor found)."""
    n = T.OVERFLOW + 1
    w = pair.w
    ok = w.fill(np.full(n, CAP - 1, np.uint64), np.arange(n, dtype=np.uint64) + 1,
                np.full(n, T.SEALED, np.uint8), np.zeros(n, np.uint8), np.zeros(n, np.uint64),
                np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.zeros(n, np.uint64))
    assert ok
    assert (w.buckets["state"][CAP - 1:] == T.SEALED).all()
    (k,) = keys_with_home(CAP - 1, 1)
    assert pair.r.lookup(k) is None                  # walks to the end, does not wrap
    assert w.publish(k, rec()) is False
    (k2,) = keys_with_home(5, 1)
    assert w.publish(k2, rec(offset=64)) is True and pair.r.lookup(k2).offset == 64


# ---- fill ----------------------------------------------------------------------------------
def test_fill_gives_the_same_lookups_as_publishing(tmp_path):
    keys = [b"fill-%d" % i for i in range(2500)]
    n = len(keys)
    rng = np.random.default_rng(3)
    offset = rng.integers(0, 2 ** 63, n, dtype=np.uint64) & ~np.uint64(63)
    size = rng.integers(0, 2 ** 40, n, dtype=np.uint64)
    checksum = rng.integers(0, 2 ** 63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    creator = rng.integers(0, 100, n, dtype=np.uint64)
    state = np.where(np.arange(n) % 7 == 0, T.CREATING, T.SEALED).astype(np.uint8)
    flags = (np.arange(n) % 3 == 0).astype(np.uint8)

    one = Pair(tmp_path / "one")
    vec = Pair(tmp_path / "vec")
    try:
        for i, k in enumerate(keys):
            r = Record(int(offset[i]), int(size[i]), int(creator[i]), 0, int(checksum[i]),
                       State(int(state[i])), Flag(int(flags[i])))
            assert one.w.publish(k, r)
        dlo, dhi = T.digests(keys)
        assert dlo.dtype == np.uint64 and dhi.dtype == np.uint64
        assert int(dlo[0]) | (int(dhi[0]) << 64) == T.digest(keys[0])
        assert vec.w.fill(dlo, dhi, state, flags, offset, size, checksum, creator) is True
        assert (vec.w.live, vec.w.used) == (n, n)
        for i, k in enumerate(keys):
            a, b = one.r.lookup(k), vec.r.lookup(k)
            assert a is not None and b is not None
            assert a._replace(bucket=0, seq=0) == b._replace(bucket=0, seq=0)
            assert b.offset == int(offset[i]) and b.checksum == int(checksum[i]) and b.state == int(state[i])
        for i in range(1000):
            assert vec.r.lookup(b"absent-%d" % i) is None
        # a filled table takes further publishes like any other
        assert vec.w.publish(b"late", rec(offset=64)) and vec.r.lookup(b"late").offset == 64
        vec.w.unpublish(keys[0])
        assert vec.r.lookup(keys[0]) is None and same(vec.r.lookup(keys[1]), one_rec(one, keys[1]))
    finally:
        one.close()
        vec.close()


def one_rec(p, k):
    e = p.r.lookup(k)
    return Record(e.offset, e.size, e.creator, 0, e.checksum, State(e.state), Flag(e.flags))


def test_fill_of_nothing(pair):
    z = np.zeros(0, np.uint64)
    assert pair.w.fill(z, z, z, z, z, z, z, z) is True
    assert pair.r.lookup(b"x") is None


def test_fill_places_colliding_homes_in_a_run(pair):
    n = 5
    dlo = np.array([10, 10, 11, 10, 12], np.uint64)
    dhi = np.arange(n, dtype=np.uint64) + 100
    col = np.arange(n, dtype=np.uint64)
    assert pair.w.fill(dlo, dhi, np.full(n, T.SEALED, np.uint8), np.zeros(n, np.uint8), col, col, col, col)
    b = pair.w.buckets
    assert list(b["state"][10:15]) == [T.SEALED] * 5 and b["state"][15] == T.EMPTY
    assert list(b["dhi"][10:15]) == [100, 101, 103, 102, 104]     # stable: homes 10,10,10 then 11, 12
    assert (b["seq"][10:15] == 2).all()


def test_fill_refuses_a_run_past_the_end(pair):
    n = T.OVERFLOW + 2
    z = np.zeros(n, np.uint64)
    ok = pair.w.fill(np.full(n, CAP - 1, np.uint64), np.arange(n, dtype=np.uint64), np.full(n, T.SEALED, np.uint8),
                     np.zeros(n, np.uint8), z, z, z, z)
    assert ok is False
    assert (pair.w.buckets["state"] == T.EMPTY).all() and pair.w.live == 0


def test_fill_refuses_more_than_max_load(pair):
    n = int(T.MAX_LOAD * CAP) + 1
    z = np.zeros(n, np.uint64)
    dlo = np.arange(n, dtype=np.uint64)
    assert pair.w.fill(dlo, dlo, np.full(n, T.SEALED, np.uint8), np.zeros(n, np.uint8), z, z, z, z) is False
    assert pair.w.live == 0


def test_entries_round_trip_through_fill(tmp_path):
    """What a rebuild into a larger table does: entries() of one, fill() of the next."""
    small = Pair(tmp_path / "small")
    big = Pair(tmp_path / "big", capacity=2 * CAP, generation=2)
    try:
        keys = [b"e%d" % i for i in range(1500)]
        for i, k in enumerate(keys):
            small.w.publish(k, rec(offset=64 * i, size=i, checksum=i + 1, creator=3))
        for k in keys[:100]:
            small.w.unpublish(k)
        e = small.w.entries()
        assert len(e) == 1400
        assert big.w.fill(e["dlo"], e["dhi"], e["state"], e["flags"], e["offset"], e["size"], e["checksum"],
                          e["creator"])
        assert big.r.generation == 2
        for i, k in enumerate(keys):
            got = big.r.lookup(k)
            if i < 100:
                assert got is None
            else:
                assert got.offset == 64 * i and got.size == i and got.checksum == i + 1
    finally:
        small.close()
        big.close()


# ---- seqlock / retirement ------------------------------------------------------------------
def test_unchanged_until_the_bucket_is_rewritten(pair):
    a, b = keys_with_home(300, 1)[0], keys_with_home(900, 1)[0]
    pair.w.publish(a, rec())
    e = pair.r.lookup(a)
    assert pair.r.unchanged(e)
    pair.w.publish(b, rec())                          # another bucket: no effect
    pair.w.unpublish(b)
    assert pair.r.unchanged(e)
    pair.w.publish(a, rec(offset=64))                 # same bucket rewritten (update in place)
    assert not pair.r.unchanged(e)
    e2 = pair.r.lookup(a)
    assert pair.r.unchanged(e2)
    pair.w.unpublish(a)
    assert not pair.r.unchanged(e2)


def test_unchanged_is_false_after_unpublish_and_republish_of_the_same_fields(pair):
    pair.w.publish(b"k", rec())
    e = pair.r.lookup(b"k")
    pair.w.unpublish(b"k")
    pair.w.publish(b"k", rec())
    e2 = pair.r.lookup(b"k")
    assert e2.bucket == e.bucket and e2._replace(seq=0) == e._replace(seq=0)
    assert not pair.r.unchanged(e)                    # an ABA change is still seen


def test_a_bucket_left_mid_update_raises_busy(pair):
    pair.w.publish(b"k", rec())
    b = pair.w.find(b"k")
    pair.w.buckets["seq"][b] |= 1                     # as if the daemon died inside _write
    with pytest.raises(T.Busy):
        pair.r.lookup(b"k", spins=50)


def test_retire_makes_lookups_raise_busy(pair):
    for i in range(50):
        pair.w.publish(b"k%d" % i, rec())
    e = pair.r.lookup(b"k1")
    pair.w.retire()
    assert pair.r.retired()
    for k in (b"k1", b"k2", b"absent"):
        with pytest.raises(T.Busy):
            pair.r.lookup(k)
    assert not pair.r.unchanged(e)


def test_retire_of_an_empty_table(pair):
    pair.w.retire()
    with pytest.raises(T.Busy):
        pair.r.lookup(b"anything")


# ---- marks ---------------------------------------------------------------------------------
def test_marks(pair):
    pair.w.publish(b"k", rec())
    pair.w.publish(b"j", rec())
    e = pair.r.lookup(b"k")
    assert pair.w.marks[e.bucket] == 0
    assert pair.w.take_mark(b"k") is False
    pair.r.mark(e.bucket)
    assert pair.w.marks[e.bucket] == 1
    assert pair.w.take_mark(b"j") is False            # only k's bucket was marked
    assert pair.w.take_mark(b"k") is True
    assert pair.w.marks[e.bucket] == 0
    assert pair.w.take_mark(b"k") is False
    assert pair.w.take_mark(b"absent") is False


def test_a_new_entry_starts_unmarked(pair):
    pair.w.publish(b"k", rec())
    b = pair.r.lookup(b"k").bucket
    pair.r.mark(b)
    pair.w.unpublish(b"k")
    pair.w.publish(b"k", rec())                       # reuses the marked tombstone
    assert pair.r.lookup(b"k").bucket == b
    assert pair.w.take_mark(b"k") is False


def test_marks_of_the_last_bucket(pair):
    last = pair.w.nbuckets - 1
    pair.r.mark(last)
    assert pair.w.marks[last] == 1


# ---- retire_file ---------------------------------------------------------------------------
def test_retire_file_retires_and_removes(tmp_path):
    p = Pair(tmp_path / "old")
    try:
        p.w.publish(b"k", rec())
        assert p.r.lookup(b"k") is not None
        T.retire_file(p.path)
        assert not os.path.exists(p.path)
        assert p.r.retired()                          # a reader still mapping it moves on
        with pytest.raises(T.Busy):
            p.r.lookup(b"k")
    finally:
        p.close()


def test_retire_file_of_a_missing_path_does_nothing(tmp_path):
    T.retire_file(str(tmp_path / "missing"))


def test_retire_file_removes_a_file_that_is_not_a_table(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"junk")
    T.retire_file(str(p))
    assert not p.exists()


def test_writer_close_unlink(tmp_path):
    path = str(tmp_path / "t")
    w = T.TableWriter(path, CAP, 3)
    w.close(unlink=True)
    assert not os.path.exists(path)
