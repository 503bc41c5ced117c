"""kvstore.store.allocator: the free-extent lists kept in the daemon's LMDB index.

Runs against a real LMDB environment in tmp_path (kvstore.store.schema.Env). Covers:
init (one free extent of the aligned segment, in both tables), best-fit allocation
(smallest extent that fits, lowest offset among equals, the rest stays free),
coalescing on free with the previous, the next and both neighbours, alloc returning None
when nothing fits, extent_size rounding (0 bytes -> 64), an aborted transaction leaving
the lists untouched, and a randomized alloc/free sequence (hypothesis) checking after
every step that the free extents plus the allocated ones tile the segment exactly, never
overlap, are fully coalesced, that free_size mirrors free_off, and that alloc is best fit.
"""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.store import allocator as A
from kvstore.store.schema import Env

SEG = 1 << 20


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(str(tmp_path_factory.mktemp("alloc") / "index"), 64 << 20, create=True)
    yield e
    e.close()


@pytest.fixture
def txn(env):
    """A write transaction on an empty free list, aborted afterwards (tests stay independent)."""
    t = env.env.begin(write=True)
    for db in (env.dbs.free_off, env.dbs.free_size):
        t.drop(db, delete=False)
    yield t
    t.abort()


def free_sizes(txn, dbs):
    cur = txn.cursor(db=dbs.free_size)
    return [struct.unpack(">QQ", k)[::-1] for k, _ in cur]        # (offset, length)


def check_lists(txn, dbs):
    """free_size holds exactly the extents of free_off; returns them."""
    by_off = A.free_extents(txn, dbs)
    assert sorted(free_sizes(txn, dbs)) == by_off
    return by_off


# ---- extent_size ---------------------------------------------------------------------------
@pytest.mark.parametrize("nbytes, ext", [(0, 64), (1, 64), (63, 64), (64, 64), (65, 128), (128, 128),
                                         (129, 192), (4096, 4096), (4097, 4160), ((1 << 40) + 1, (1 << 40) + 64)])
def test_extent_size_rounds_up_to_a_cache_line(nbytes, ext):
    assert A.extent_size(nbytes) == ext
    assert ext % A.ALIGN == 0


# ---- init ----------------------------------------------------------------------------------
def test_init_makes_one_free_extent(env, txn):
    A.init(txn, env.dbs, SEG)
    assert check_lists(txn, env.dbs) == [(0, SEG)]


def test_init_rounds_the_segment_down_to_a_cache_line(env, txn):
    A.init(txn, env.dbs, SEG + 63)
    assert check_lists(txn, env.dbs) == [(0, SEG)]


# ---- alloc ---------------------------------------------------------------------------------
def test_alloc_from_a_fresh_segment_takes_the_front(env, txn):
    A.init(txn, env.dbs, SEG)
    assert A.alloc(txn, env.dbs, 128) == 0
    assert A.alloc(txn, env.dbs, 64) == 128
    assert check_lists(txn, env.dbs) == [(192, SEG - 192)]


def test_alloc_of_the_whole_segment_leaves_nothing(env, txn):
    A.init(txn, env.dbs, SEG)
    assert A.alloc(txn, env.dbs, SEG) == 0
    assert check_lists(txn, env.dbs) == []
    assert A.alloc(txn, env.dbs, 64) is None


def test_alloc_returns_none_when_nothing_fits(env, txn):
    A.init(txn, env.dbs, 4096)
    assert A.alloc(txn, env.dbs, 4096 + 64) is None
    assert check_lists(txn, env.dbs) == [(0, 4096)]          # nothing changed
    offs = [A.alloc(txn, env.dbs, 1024) for _ in range(4)]
    assert offs == [0, 1024, 2048, 3072]
    A.free(txn, env.dbs, 0, 1024)
    A.free(txn, env.dbs, 2048, 1024)
    assert A.alloc(txn, env.dbs, 2048) is None               # 2 KiB free, but not in one piece
    assert check_lists(txn, env.dbs) == [(0, 1024), (2048, 1024)]


def test_alloc_on_an_empty_list_returns_none(env, txn):
    assert A.alloc(txn, env.dbs, 64) is None


def test_alloc_is_best_fit(env, txn):
    """Holes of 256, 128, 512 and 128 bytes: 128 goes to the lowest 128-byte hole, 200 to
    the 256-byte one, 300 to the 512-byte one; the tail is never split for them."""
    A.init(txn, env.dbs, 8192)
    layout = [256, 64, 128, 64, 512, 64, 128, 64]
    offs, at = [], 0
    for n in layout:
        assert A.alloc(txn, env.dbs, n) == at
        offs.append(at)
        at += n
    tail = (at, 8192 - at)
    for i in (0, 2, 4, 6):
        A.free(txn, env.dbs, offs[i], layout[i])
    assert check_lists(txn, env.dbs) == [(offs[0], 256), (offs[2], 128), (offs[4], 512), (offs[6], 128), tail]
    assert A.alloc(txn, env.dbs, 128) == offs[2]                     # exact fit, lowest offset
    assert A.alloc(txn, env.dbs, 128) == offs[6]                     # the other exact fit
    assert A.alloc(txn, env.dbs, A.extent_size(200)) == offs[0]      # 256 is the best fit for 256
    assert A.alloc(txn, env.dbs, A.extent_size(300)) == offs[4]      # 512 for 320
    assert check_lists(txn, env.dbs) == [(offs[4] + 320, 192), tail]


def test_alloc_splits_and_keeps_the_rest_free(env, txn):
    A.init(txn, env.dbs, 4096)
    assert A.alloc(txn, env.dbs, 64) == 0
    assert check_lists(txn, env.dbs) == [(64, 4096 - 64)]


# ---- free ----------------------------------------------------------------------------------
def _three(env, txn):
    """Segment of 4 KiB: a[0,1024) b[1024,2048) c[2048,3072), tail [3072,4096) free."""
    A.init(txn, env.dbs, 4096)
    return [A.alloc(txn, env.dbs, 1024) for _ in range(3)]


def test_free_without_free_neighbours_adds_an_extent(env, txn):
    a, b, c = _three(env, txn)
    A.free(txn, env.dbs, b, 1024)
    assert check_lists(txn, env.dbs) == [(1024, 1024), (3072, 1024)]


def test_free_merges_with_the_next_extent(env, txn):
    a, b, c = _three(env, txn)
    A.free(txn, env.dbs, c, 1024)
    assert check_lists(txn, env.dbs) == [(2048, 2048)]


def test_free_merges_with_the_previous_extent(env, txn):
    a, b, c = _three(env, txn)
    A.free(txn, env.dbs, a, 1024)
    A.free(txn, env.dbs, b, 1024)
    assert check_lists(txn, env.dbs) == [(0, 2048), (3072, 1024)]


def test_free_merges_with_both_neighbours(env, txn):
    a, b, c = _three(env, txn)
    A.free(txn, env.dbs, a, 1024)
    A.free(txn, env.dbs, c, 1024)
    assert check_lists(txn, env.dbs) == [(0, 1024), (2048, 2048)]
    A.free(txn, env.dbs, b, 1024)
    assert check_lists(txn, env.dbs) == [(0, 4096)]
    assert A.alloc(txn, env.dbs, 4096) == 0


def test_free_of_the_first_extent_with_nothing_before(env, txn):
    a, b, c = _three(env, txn)
    A.free(txn, env.dbs, a, 1024)
    assert check_lists(txn, env.dbs) == [(0, 1024), (3072, 1024)]


def test_free_of_the_last_extent_with_nothing_after(env, txn):
    A.init(txn, env.dbs, 4096)
    offs = [A.alloc(txn, env.dbs, 1024) for _ in range(4)]
    A.free(txn, env.dbs, offs[3], 1024)
    assert check_lists(txn, env.dbs) == [(3072, 1024)]
    A.free(txn, env.dbs, offs[1], 1024)
    assert check_lists(txn, env.dbs) == [(1024, 1024), (3072, 1024)]


def test_free_does_not_merge_with_a_distant_previous_extent(env, txn):
    A.init(txn, env.dbs, 4096)
    offs = [A.alloc(txn, env.dbs, 512) for _ in range(8)]
    A.free(txn, env.dbs, offs[0], 512)
    A.free(txn, env.dbs, offs[5], 512)
    A.free(txn, env.dbs, offs[2], 512)
    assert check_lists(txn, env.dbs) == [(0, 512), (1024, 512), (2560, 512)]


def test_an_aborted_transaction_leaves_the_lists_untouched(env):
    with env.write() as t:
        for db in (env.dbs.free_off, env.dbs.free_size):
            t.drop(db, delete=False)
        A.init(t, env.dbs, SEG)
    t = env.env.begin(write=True)
    assert A.alloc(t, env.dbs, 4096) == 0
    t.abort()
    with env.read() as t:
        assert A.free_extents(t, env.dbs) == [(0, SEG)]
    with env.write() as t:
        for db in (env.dbs.free_off, env.dbs.free_size):
            t.drop(db, delete=False)


# ---- randomized ----------------------------------------------------------------------------
RSEG = 64 * 1024


def check_tiling(txn, dbs, allocated, seg=RSEG):
    free = check_lists(txn, dbs)
    for (o1, l1), (o2, _) in zip(free, free[1:]):
        assert o1 + l1 < o2, "two free extents touch or overlap: not coalesced"
    pieces = sorted([(o, l, "free") for o, l in free] + [(o, l, "used") for o, l in allocated.items()])
    at = 0
    for off, length, _ in pieces:
        assert off == at, f"gap or overlap at {at}: next piece starts at {off}"
        assert length > 0 and off % A.ALIGN == 0 and length % A.ALIGN == 0
        at += length
    assert at == seg


def best_fit(free, size):
    fits = [(length, off) for off, length in free if length >= size]
    return min(fits)[1] if fits else None


_ops = st.lists(st.tuples(st.booleans(), st.integers(0, 6000), st.integers(0, 1 << 30)), max_size=120)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_ops)
def test_random_alloc_free_tiles_the_segment(env, ops):
    t = env.env.begin(write=True)
    try:
        for db in (env.dbs.free_off, env.dbs.free_size):
            t.drop(db, delete=False)
        A.init(t, env.dbs, RSEG)
        allocated = {}
        for is_alloc, nbytes, pick in ops:
            if is_alloc or not allocated:
                size = A.extent_size(nbytes)
                want = best_fit(A.free_extents(t, env.dbs), size)
                off = A.alloc(t, env.dbs, size)
                assert off == want
                if off is not None:
                    assert off not in allocated
                    allocated[off] = size
            else:
                offs = sorted(allocated)
                off = offs[pick % len(offs)]
                A.free(t, env.dbs, off, allocated.pop(off))
            check_tiling(t, env.dbs, allocated)
        for off in sorted(allocated, key=lambda o: (o * 7919) % 104729):   # free all, in a scrambled order
            A.free(t, env.dbs, off, allocated.pop(off))
        check_tiling(t, env.dbs, allocated)
        assert A.free_extents(t, env.dbs) == [(0, RSEG)]
    finally:
        t.abort()


def test_random_alloc_free_with_a_seed(env):
    """A longer deterministic run (random.Random with fixed seeds)."""
    import random
    for seed in range(3):
        rng = random.Random(seed)
        t = env.env.begin(write=True)
        try:
            for db in (env.dbs.free_off, env.dbs.free_size):
                t.drop(db, delete=False)
            A.init(t, env.dbs, RSEG)
            allocated = {}
            for _ in range(1500):
                if rng.random() < 0.55 or not allocated:
                    size = A.extent_size(rng.choice([0, 1, 64, 100, 1000, 4096, rng.randrange(20000)]))
                    off = A.alloc(t, env.dbs, size)
                    if off is not None:
                        allocated[off] = size
                else:
                    off = rng.choice(list(allocated))
                    A.free(t, env.dbs, off, allocated.pop(off))
                check_tiling(t, env.dbs, allocated)
        finally:
            t.abort()
