"""kvstore.store.policy: the CLOCK (second chance) eviction policy.

Covers ClockPolicy.advise (held -> SKIP whatever the mark, referenced -> SECOND_CHANCE,
otherwise EVICT) and ClockPolicy.victims: advice in the candidates' order, stopping right
after the EVICT that brings the evicted sizes to ``need``, walking everything when the
candidates cannot free enough, consuming the candidate iterator lazily, and never
advising EVICT for a held candidate (checked on random candidate lists too).
"""

import itertools
import random

import pytest

from kvstore.store.policy import Advice, Candidate, ClockPolicy


def c(key, size=100, held=False, referenced=False):
    return Candidate(key.encode() if isinstance(key, str) else key, size, held, referenced)


@pytest.mark.parametrize("held, referenced, advice", [
    (True, False, Advice.SKIP), (True, True, Advice.SKIP),
    (False, True, Advice.SECOND_CHANCE), (False, False, Advice.EVICT),
])
def test_advise(held, referenced, advice):
    assert ClockPolicy().advise(c("k", held=held, referenced=referenced)) is advice


def test_victims_of_nothing():
    assert list(ClockPolicy().victims([], 100)) == []


def test_victims_stop_once_need_is_reached():
    cands = [c("a", 40), c("b", 40), c("c", 40), c("d", 40)]
    out = list(ClockPolicy().victims(cands, 80))
    assert [(x.key, a) for x, a in out] == [(b"a", Advice.EVICT), (b"b", Advice.EVICT)]


def test_victims_stop_on_the_evict_that_passes_need():
    cands = [c("a", 30), c("b", 100), c("c", 1)]
    out = list(ClockPolicy().victims(cands, 50))
    assert [x.key for x, _ in out] == [b"a", b"b"]


def test_victims_need_exactly_one_object():
    out = list(ClockPolicy().victims([c("a", 64), c("b", 64)], 64))
    assert [x.key for x, _ in out] == [b"a"]


def test_victims_skip_and_second_chance_do_not_count():
    cands = [c("held", 1000, held=True), c("ref", 1000, referenced=True), c("both", 1000, held=True, referenced=True),
             c("x", 10), c("y", 10), c("z", 10)]
    out = list(ClockPolicy().victims(cands, 20))
    assert [(x.key, a) for x, a in out] == [
        (b"held", Advice.SKIP), (b"ref", Advice.SECOND_CHANCE), (b"both", Advice.SKIP),
        (b"x", Advice.EVICT), (b"y", Advice.EVICT)]


def test_victims_walk_everything_when_not_enough_can_be_freed():
    cands = [c("a", 10), c("h", 500, held=True), c("b", 10), c("r", 500, referenced=True)]
    out = list(ClockPolicy().victims(cands, 10_000))
    assert [(x.key, a) for x, a in out] == [
        (b"a", Advice.EVICT), (b"h", Advice.SKIP), (b"b", Advice.EVICT), (b"r", Advice.SECOND_CHANCE)]


def test_victims_consume_the_candidates_lazily():
    """A walk over a long (here endless) age order stops pulling candidates once done."""
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield c(f"k{i}", 64)

    out = list(ClockPolicy().victims(endless(), 64 * 3))
    assert len(out) == 3 and pulled == [0, 1, 2]


def test_victims_is_a_generator():
    gen = ClockPolicy().victims([c("a", 1)], 1)
    assert next(gen) == (c("a", 1), Advice.EVICT)
    with pytest.raises(StopIteration):
        next(gen)


@pytest.mark.parametrize("seed", range(20))
def test_victims_never_evict_a_held_candidate(seed):
    rng = random.Random(seed)
    cands = [c(f"k{i}", rng.randrange(0, 5000), held=rng.random() < 0.4, referenced=rng.random() < 0.4)
             for i in range(rng.randrange(0, 60))]
    need = rng.randrange(1, 60_000)
    out = list(ClockPolicy().victims(cands, need))
    assert [x for x, _ in out] == cands[:len(out)]                    # age order, no gaps
    freed = 0
    for x, a in out:
        assert a is ClockPolicy().advise(x)
        if x.held:
            assert a is Advice.SKIP
        if a is Advice.EVICT:
            freed += x.size
    evicted = [x for x, a in out if a is Advice.EVICT]
    if len(out) < len(cands):                                         # stopped early: need was reached
        assert freed >= need and out[-1][1] is Advice.EVICT
        assert freed - evicted[-1].size < need                        # and not one EVICT too late
    else:
        assert freed < need or out[-1][1] is Advice.EVICT
