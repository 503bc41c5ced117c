"""Rendezvous homes, the batched lookup plan and the soft-state location table (issue
10, item 3): pure parts, no I/O."""

import random
from collections import Counter

import pytest

from kvstore.cluster import directory
from kvstore.cluster.directory import HOME_COPIES, LocationTable, homes, homes_many, plan

MEMBERS = [f"10.250.0.{i}:7700" for i in range(1, 9)]


def keys(n, seed=1):
    rnd = random.Random(seed)
    return [rnd.randbytes(16) for _ in range(n)]


def test_every_daemon_computes_the_same_homes_in_any_member_order():
    for k in keys(200):
        a = homes(k, MEMBERS)
        b = homes(k, list(reversed(MEMBERS)))
        assert a == b and len(a) == HOME_COPIES and len(set(a)) == HOME_COPIES


def test_homes_spread_evenly():
    first = Counter(homes(k, MEMBERS)[0] for k in keys(16000))
    assert set(first) == set(MEMBERS)
    assert max(first.values()) < 1.25 * 16000 / len(MEMBERS)     # within 25% of even


def test_a_member_leaving_moves_only_its_own_keys():
    ks = keys(5000)
    before = {k: homes(k, MEMBERS) for k in ks}
    gone = MEMBERS[3]
    after = {k: homes(k, [m for m in MEMBERS if m != gone]) for k in ks}
    moved = [k for k in ks if before[k] != after[k]]
    assert all(gone in before[k] for k in moved)                  # nothing else moves
    for k in moved:                                               # the other home stays
        assert [m for m in before[k] if m != gone][0] in after[k]


MANY = [f"10.{i // 250}.{i % 250}.7:7700" for i in range(1000)]


def _reference_homes(key, members, k=HOME_COPIES):
    """The definition, spelled out slowly: highest fmix64(xxh3(key) ^ xxh3(id)) first."""
    import xxhash
    h = xxhash.xxh3_64_intdigest(key)
    return sorted(members, key=lambda m: (directory._fmix(h ^ xxhash.xxh3_64_intdigest(m.encode())), m),
                  reverse=True)[:k]


@pytest.mark.parametrize("n", [1, 3, 24, 25, 200, 1000])
def test_the_fast_paths_give_the_defined_homes(n):
    """Small memberships are scored in Python, large ones with numpy, keys in blocks:
    every path must name exactly the homes the definition gives (daemons must agree)."""
    members = MANY[:n]
    ks = keys(300, seed=n)
    got = homes_many(ks, members)
    assert got == [_reference_homes(k, members) for k in ks]
    assert [homes(k, list(reversed(members))) for k in ks[:50]] == got[:50]
    full = homes(ks[0], members, n)                    # placement asks for every member
    assert full == _reference_homes(ks[0], members, n) and sorted(full) == sorted(members)


def test_homes_among_1000_members_spread_and_move_like_rendezvous():
    ks = keys(20000, seed=7)
    first = Counter(h[0] for h in homes_many(ks, MANY))
    assert len(first) > 950 and max(first.values()) < 60      # 20 per member on average
    gone = MANY[17]
    before = homes_many(ks, MANY)
    after = homes_many(ks, [m for m in MANY if m != gone])
    moved = [i for i in range(len(ks)) if before[i] != after[i]]
    assert moved and all(gone in before[i] for i in moved)


def test_plan_sends_one_request_per_home_and_skips_dead_homes():
    ks = keys(1000)
    p = plan(ks, MEMBERS)
    assert None not in p and sum(map(len, p.values())) == 1000 and len(p) <= len(MEMBERS)
    dead = {MEMBERS[0], MEMBERS[1]}
    p = plan(ks, MEMBERS, alive=lambda m: m not in dead)
    assert not dead & set(p)
    for home, group in p.items():
        for k in group:
            live = [h for h in homes(k, MEMBERS) if h not in dead]
            assert home == (live[0] if live else None)
    # a key whose every home is dead is a miss, not an error
    p = plan(ks, MEMBERS, alive=lambda m: False)
    assert list(p) == [None]


def test_location_table_announce_lookup_withdraw():
    t = LocationTable()
    assert t.announce("a", 1, [(b"k1", 0, 10, 7), (b"k2", 4096, 20, 8)]) == 2
    assert t.announce("b", 5, [(b"k1", 8192, 10, 7)]) == 1
    got = t.lookup([b"k1", b"k2", b"zz"])
    assert {l.holder for l in got[b"k1"]} == {"a", "b"} and b"zz" not in got
    assert got[b"k2"][0].offset == 4096 and t.records == 3
    t.withdraw("a", 1, [b"k1"])
    assert [l.holder for l in t.lookup([b"k1"])[b"k1"]] == ["b"] and t.records == 2
    t.withdraw("b", 4, [b"k1"])                 # an older run's message: ignored
    assert t.lookup([b"k1"])


def test_a_new_incarnation_voids_the_old_records_and_an_old_one_is_ignored():
    t = LocationTable()
    t.announce("a", 1, [(b"k1", 0, 10, 7), (b"k2", 64, 10, 7)])
    t.announce("a", 2, [(b"k2", 128, 10, 9)])          # restarted: re-announces what it has
    got = t.lookup([b"k1", b"k2"])
    assert b"k1" not in got and got[b"k2"][0].offset == 128 and t.records == 1
    assert t.announce("a", 1, [(b"k3", 0, 1, 1)]) == 0 # a late message of the old run
    assert not t.lookup([b"k3"])


def test_retain_drops_holders_that_left_or_restarted():
    t = LocationTable()
    t.announce("a", 1, [(b"k", 0, 1, 1)])
    t.announce("b", 1, [(b"k", 64, 1, 1)])
    t.announce("c", 3, [(b"j", 0, 1, 1)])
    t.retain({"a": 1, "c": 4})                  # b left; c is a new run
    assert [l.holder for l in t.lookup([b"k"])[b"k"]] == ["a"] and not t.lookup([b"j"])
    assert t.records == 1 and set(t.by_holder) == {"a"}


def test_the_table_is_bounded():
    t = LocationTable(max_records=100)
    assert t.announce("a", 1, [(bytes([i, j]), 0, 1, 1) for i in range(10) for j in range(20)]) == 100
    assert t.records == 100 and t.refused == 100
    t.drop_holder("a")
    assert t.records == 0 and not t.by_key
