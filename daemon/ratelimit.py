"""Rate-limited log lines: what a flood of bad connections may cost the log.

Owns: ``LogLimiter``: at most ``burst`` lines of one kind per ``window`` seconds; the
lines past that are counted, and when the window ends (``flush``, which the daemon
calls about once a second, or the next line of that kind) one line says how many were
suppressed, with the last of them as an example.
Must never: drop a count silently (every suppressed line is in some "suppressed N"
line, at the latest when the daemon stops), or cost more than a dict lookup per line.
"""

import time

WINDOW = 10.0       # seconds of one rate-limit window
BURST = 5           # lines of one kind logged per window before the rest are counted


class _Kind:
    __slots__ = ("start", "logged", "suppressed", "level", "last")

    def __init__(self, start):
        self.start, self.logged, self.suppressed, self.level, self.last = start, 0, 0, 0, ""


class LogLimiter:
    def __init__(self, logger, window=WINDOW, burst=BURST, clock=time.monotonic):
        self.log, self.window, self.burst, self.clock = logger, window, burst, clock
        self._kinds = {}

    def __call__(self, kind, level, msg, *args):
        """Log msg % args at level, unless ``burst`` lines of this kind were logged in
        the current window (then count it)."""
        now = self.clock()
        k = self._kinds.get(kind)
        if k is not None and now - k.start >= self.window:
            self._close(kind, k)
            k = None
        if k is None:
            k = self._kinds[kind] = _Kind(now)
        if k.logged < self.burst:
            k.logged += 1
            self.log.log(level, msg, *args)
            return True
        k.suppressed += 1
        k.level = max(k.level, level)
        k.last = (msg, args)
        return False

    def flush(self, force=False):
        """Close the windows that ended (all of them with force=True): one line for
        each that suppressed something."""
        now = self.clock()
        for kind, k in list(self._kinds.items()):
            if force or now - k.start >= self.window:
                self._close(kind, k)

    def _close(self, kind, k):
        del self._kinds[kind]
        if not k.suppressed:
            return
        msg, args = k.last
        try:
            example = msg % args
        except (TypeError, ValueError):
            example = msg
        if len(example) > 200:
            example = example[:200] + "..."
        self.log.log(k.level, "suppressed %d more %r messages in the last %.0f s (rate limit: %d "
                     "per %.0f s); the last: %s", k.suppressed, kind,
                     max(self.clock() - k.start, 0.0), self.burst, self.window, example)
