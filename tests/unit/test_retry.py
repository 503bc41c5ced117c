"""kvstore.retry: Backoff delays, deadline, and retry()."""

import time

import pytest

from kvstore.retry import Backoff, retry


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_delays_grow_to_the_cap():
    b = Backoff(initial=0.01, factor=2, cap=0.05)
    assert [round(b.next_delay(), 3) for _ in range(6)] == [0.01, 0.02, 0.04, 0.05, 0.05, 0.05]
    b.reset()
    assert b.next_delay() == 0.01


def test_deadline_cuts_the_last_delay_and_expires():
    clock = Clock()
    b = Backoff(initial=1.0, cap=8.0, deadline=2.5, clock=clock)
    assert b.remaining() == 2.5 and not b.expired()
    assert b.next_delay() == 1.0
    clock.t += 2.0
    assert b.next_delay() == pytest.approx(0.5)      # 2.0 would run past the deadline
    clock.t += 0.5
    assert b.expired() and b.remaining() == 0.0 and b.next_delay() == 0.0
    assert b.sleep() is False                         # no sleep past the deadline


def test_no_deadline_never_expires():
    b = Backoff()
    assert b.remaining() is None and not b.expired()


def test_sleep_really_sleeps_and_counts():
    b = Backoff(initial=0.01, cap=0.01, deadline=5)
    t0 = time.monotonic()
    assert b.sleep() and b.sleep()
    assert time.monotonic() - t0 >= 0.02 and b.attempts == 2


@pytest.mark.parametrize("kw", [dict(initial=-1), dict(factor=0.5), dict(initial=1, cap=0.5)])
def test_bad_parameters(kw):
    with pytest.raises(ValueError):
        Backoff(**kw)


def test_retry_until_success():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not yet")
        return "ok"
    assert retry(flaky, retry_on=(ConnectionError,), backoff=Backoff(initial=0.001, cap=0.001)) == "ok"
    assert len(calls) == 3


def test_retry_gives_up_at_the_deadline_with_the_last_error():
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="down"):
        retry(lambda: (_ for _ in ()).throw(ConnectionError("down")), retry_on=(ConnectionError,), deadline=0.1)
    assert 0.1 <= time.monotonic() - t0 < 2


def test_retry_gives_up_after_attempts():
    calls = []

    def fail():
        calls.append(1)
        raise TimeoutError("slow")
    with pytest.raises(TimeoutError):
        retry(fail, retry_on=(TimeoutError,), backoff=Backoff(initial=0, cap=0), attempts=4)
    assert len(calls) == 4


def test_retry_does_not_swallow_other_errors():
    calls = []

    def bad():
        calls.append(1)
        raise KeyError("not retried")
    with pytest.raises(KeyError):
        retry(bad, retry_on=(ConnectionError,), deadline=5)
    assert len(calls) == 1
