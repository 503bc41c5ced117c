"""An engine adapter's way to the store, through outages: the engine never waits on it.

Owns: ``StoreLink``, which gives an adapter its kvstore ``Client`` and keeps the engine
serving while the daemon is absent or down. It connects at once if it can; if the
daemon is absent (at start-up, or after the adapter forked) it keeps connecting in a
background thread, and until then ``client()`` raises StoreUnavailable at once. Once
connected, the Client's own watchdog reconnects after an outage, and the Client's
``reconnect_timeout`` bounds how long calls wait for it per outage (the adapters'
default is short; 0 = never wait). ``failed(e)`` is where an adapter reports an error
of a store call: an outage (StoreUnavailable, SegmentGone, ClientClosed) is logged ONE
WARNING per outage, and an INFO when the store is back, with how many calls failed
meanwhile; ``outage_error`` tells the adapter which errors those are (an adapter treats
them as a miss or a skipped save).
``options(extra, prefix)`` reads the Client options every adapter accepts from its
engine's extra config: ``timeout`` and ``reconnect_timeout``.
Must never: block an engine call on a daemon that is known to be away (beyond the
Client's per-outage ``reconnect_timeout``), log once per failed call during an outage,
hide an outage (the WARNING, the counters), or use a Client created before a fork (nor
a lock a parent's thread held at the fork: a forked child gets fresh ones).
"""

import logging
import os
import threading
import time
import weakref

from kvstore.client import Client
from kvstore.errors import ClientClosed, ConfigError, StoreUnavailable
from kvstore.retry import Backoff

#: Defaults of the Client options for engines: one exchange may take ``timeout``
#: seconds (a hung daemon); a daemon that went away is waited for at most
#: ``reconnect_timeout`` seconds per outage, then calls fail at once (misses).
ENGINE_TIMEOUT = 5.0
ENGINE_RECONNECT_TIMEOUT = 1.0

#: Errors that mean "the store is unreachable" rather than "this call went wrong".
OUTAGE_ERRORS = (StoreUnavailable, ClientClosed)


_LINKS = weakref.WeakSet()


def _after_fork_in_child():
    """A lock a parent's thread held at the fork (connecting under it) stays held for
    ever in the child, where that thread does not exist: each link gets a fresh one."""
    for link in list(_LINKS):
        link._lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def outage_error(e):
    return isinstance(e, OUTAGE_ERRORS)


def options(extra, prefix=""):
    """{"timeout": s, "reconnect_timeout": s} from an adapter's extra config (keys
    ``prefix + name``), defaults for engines where absent; ConfigError if not numbers."""
    out = {"timeout": ENGINE_TIMEOUT, "reconnect_timeout": ENGINE_RECONNECT_TIMEOUT}
    for name in out:
        v = extra.get(prefix + name)
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = -1.0
        if not v >= 0 or (name == "timeout" and v == 0):
            raise ConfigError(f"{prefix}{name} must be a number of seconds "
                              f"({'> 0' if name == 'timeout' else '>= 0'}), got {extra.get(prefix + name)!r}")
        out[name] = v
    return out


class StoreLink:
    """A lazily connected, outage-tolerant Client for one adapter. Thread-safe."""

    #: seconds between background connection attempts (growing to the cap)
    RETRY_INITIAL, RETRY_CAP = 0.1, 2.0

    def __init__(self, socket, namespace="", timeout=ENGINE_TIMEOUT,
                 reconnect_timeout=ENGINE_RECONNECT_TIMEOUT, logger=None, name="kvstore"):
        self.socket, self.namespace = socket, namespace
        self.timeout, self.reconnect_timeout = float(timeout), float(reconnect_timeout)
        self.log = logger or logging.getLogger("kvstore.adapters")
        self.name = name
        self._client = None
        self._lock = threading.RLock()     # _note/_back may run under it
        self._pid = os.getpid()
        self._closed = False
        self._connecting = False          # a background thread is trying
        self._outage_since = None         # monotonic time of the first failure of this outage
        self._failed_calls = 0            # in this outage
        self.outages = 0                  # outages seen so far
        self.failed_calls = 0             # store calls failed by outages, in total
        _LINKS.add(self)

    # ---- the client --------------------------------------------------------------------
    def start(self):
        """Connect now if the daemon is there, else keep trying in the background (one
        WARNING). Never raises for an absent daemon."""
        try:
            self.client()
        except OUTAGE_ERRORS:
            pass
        return self

    def client(self):
        """The connected Client; StoreUnavailable at once while there is none (absent
        daemon: a background thread keeps trying)."""
        c = self._client
        if c is not None and self._pid == os.getpid():
            if c._conn.closed_why is None:
                if self._outage_since is not None and c.connected:
                    self._back()
                return c
        with self._lock:
            if self._pid != os.getpid():            # forked: the parent's client is not ours
                self._pid, self._client, self._connecting = os.getpid(), None, False
            c = self._client
            if c is not None and c._conn.closed_why is None:
                return c
            if self._closed:
                raise ClientClosed(f"the {self.name} adapter was shut down")
            self._client = None
            if not self._connecting:
                try:
                    self._client = self._connect()
                except OUTAGE_ERRORS as e:
                    self._note(e)
                    self._connecting = True
                    threading.Thread(target=_keep_connecting, args=(weakref.ref(self),), daemon=True,
                                     name=f"{self.name}-connect").start()
                    raise
                self._back()
                return self._client
        e = StoreUnavailable(f"no kvstore daemon at {self.socket} yet; connecting in the background")
        self._note(e)
        raise e

    def _connect(self):
        return Client(self.socket, namespace=self.namespace, timeout=self.timeout,
                      reconnect_timeout=self.reconnect_timeout)

    def _attempt(self):
        """One background attempt; True when done (connected, or closed)."""
        if self._closed or self._pid != os.getpid():
            return True
        try:
            c = self._connect()
        except OUTAGE_ERRORS:
            return False
        except Exception as e:                  # e.g. a daemon of another version: keep trying
            self.log.debug("%s: connecting to %s failed: %s", self.name, self.socket, e)
            return False
        with self._lock:
            if self._closed or self._pid != os.getpid():
                c.close()
                return True
            self._client, self._connecting = c, False
        self._back()
        return True

    # ---- outages -----------------------------------------------------------------------
    def failed(self, e):
        """An adapter's store call raised e. True if e is an outage (logged here, once per
        outage; the caller treats the call as a miss or a skipped save and logs nothing);
        False for other errors (the caller logs them)."""
        if not outage_error(e):
            return False
        self._note(e)
        return True

    def _note(self, e):
        with self._lock:
            self.failed_calls += 1
            self._failed_calls += 1
            if self._outage_since is not None:
                return
            self._outage_since = time.monotonic()
            self.outages += 1
        self.log.warning("%s: the store at %s is unavailable (%s); the engine goes on without it "
                         "(lookups miss, saves are skipped) and reconnects in the background",
                         self.name, self.socket, e)

    def _back(self):
        with self._lock:
            since, n = self._outage_since, self._failed_calls
            self._outage_since, self._failed_calls = None, 0
        if since is not None:
            self.log.info("%s: the store at %s is back after %.1f s (%d store calls failed meanwhile)",
                          self.name, self.socket, time.monotonic() - since, n)

    @property
    def connected(self):
        """True while this link has a Client connected to the daemon (never raises)."""
        c = self._client
        return c is not None and self._pid == os.getpid() and c.connected

    @property
    def down(self):
        """True while an outage is noted and not yet over."""
        return self._outage_since is not None

    def close(self):
        with self._lock:
            self._closed = True
            c, self._client = self._client, None
        if c is not None and self._pid == os.getpid():
            c.close()


def _keep_connecting(ref):
    """Background connection attempts of one StoreLink until it connects or closes; holds
    only a weak reference between attempts (an unreferenced link is collected)."""
    backoff = Backoff(initial=StoreLink.RETRY_INITIAL, cap=StoreLink.RETRY_CAP)
    while True:
        backoff.sleep()
        link = ref()
        if link is None or link._attempt():
            return
        del link
