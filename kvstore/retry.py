"""Waiting and retrying: one backoff object instead of hand-written sleep loops.

Owns: ``Backoff`` (exponential delays, capped, with an optional deadline; in the
style of redis-py's backoff and Retry objects) and ``retry(fn, ...)``, which calls fn
until it succeeds, the deadline passes or the attempts run out. Polling for a
condition is a Backoff loop::

    b = Backoff(deadline=30)
    while not os.path.exists(sock):
        if not b.sleep():
            raise TimeoutError(...)

Must never: sleep past its deadline, swallow an error it was not told to retry (or
the last one when it gives up: that one is raised), or keep global state (each wait
makes its own Backoff).
"""

import time


class Backoff:
    """Delays initial, initial*factor, ... up to cap seconds; ``deadline`` (seconds
    from now, None for none) bounds the whole wait. Not thread-safe: one per wait."""

    def __init__(self, initial=0.02, factor=2.0, cap=0.5, deadline=None, clock=time.monotonic):
        if initial < 0 or factor < 1 or cap < initial:
            raise ValueError(f"Backoff needs 0 <= initial <= cap and factor >= 1, "
                             f"got initial={initial}, factor={factor}, cap={cap}")
        self.initial, self.factor, self.cap = initial, factor, cap
        self._clock = clock
        self._end = None if deadline is None else clock() + deadline
        self._delay = initial
        self.attempts = 0       # sleeps taken so far

    def remaining(self):
        """Seconds left before the deadline (None without one; never negative)."""
        return None if self._end is None else max(0.0, self._end - self._clock())

    def expired(self):
        """True once the deadline has passed."""
        return self._end is not None and self._clock() >= self._end

    def next_delay(self):
        """The next delay (advancing the sequence), cut to the time left; 0 if expired."""
        d = self._delay
        self._delay = min(self.cap, self._delay * self.factor)
        left = self.remaining()
        return d if left is None else min(d, left)

    def sleep(self):
        """Sleep the next delay. False, without sleeping, once the deadline has passed:
        the caller's cue to give up."""
        if self.expired():
            return False
        time.sleep(self.next_delay())
        self.attempts += 1
        return True

    def reset(self):
        """Back to the initial delay (after a success, for a wait that goes on)."""
        self._delay = self.initial


def retry(fn, retry_on=(Exception,), backoff=None, deadline=None, attempts=None):
    """fn() until it returns without raising one of ``retry_on``; its result.

    Between tries sleeps by ``backoff`` (a fresh Backoff(deadline=deadline) if None).
    Gives up, raising the last error, when the backoff's deadline passes or after
    ``attempts`` tries (None: no limit; with neither limit it retries forever)."""
    b = backoff if backoff is not None else Backoff(deadline=deadline)
    tries = 0
    while True:
        tries += 1
        try:
            return fn()
        except retry_on:
            if (attempts is not None and tries >= attempts) or not b.sleep():
                raise
