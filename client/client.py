"""The client handle: Plasma-like create/seal/get/release/delete on the shared segment.

Owns: the public API and its argument checks, nothing else. Its parts each own one
concern: client/connection.py (socket, handshake, mappings, watchdog, reconnection,
fork, and the one guard every call passes: closed or reconnecting), client/writer.py
(puts, arena space, seals), client/reader.py (lookups, holds, verified copies),
client/views.py (typed views). One lock guards this client's local state; other
processes never wait on it, and it never waits on them.

Views: ``get`` returns read-only memoryviews of the segment. A view stays valid until
its key is released (or the client closes); after that the memory may be reused.
The daemon notices a client's exit or death through its socket and releases what it
held and reclaims what it was creating.
Must never: copy on get, return a writable view of a sealed object, let a bad argument
reach the daemon, or be used after fork (a child must open its own Client).
"""

import threading
import time

import numpy as np

from kvstore import protocol
from kvstore import defaults
from kvstore.errors import InvalidSize, ReplicasShort
from kvstore.keys import encode_key, namespace_prefix, user_key
from kvstore.table import Busy

from . import buffers, views
from .connection import Connection
from .reader import Reader, Reconnecting
from .writer import Writer, check_size

#: Keys per KEYS request.
_KEYS_PAGE = 512


class Client:
    """A handle on the local daemon's store. Thread-safe; one per process is enough."""

    def __init__(self, socket_path=None, namespace="", timeout=5.0, reconnect_timeout=10.0,
                 fail_fast=False):
        """Connect to the daemon at socket_path (None: $KVSTORE_SOCKET, else
        /tmp/kvstore.sock). ``timeout``: seconds for one exchange with the daemon.

        ``reconnect_timeout``: when the daemon goes away the client reconnects by
        itself, in the background; calls made meanwhile wait for it until
        ``reconnect_timeout`` seconds after the outage began, then raise
        StoreUnavailable, and from then on raise it at once until the daemon is back
        (so a long outage costs one wait, not one per call). A Client created while
        the daemon is restarting (its socket path exists) waits as long for it; a
        socket path that does not exist raises StoreUnavailable at once.
        ``fail_fast=True``: calls never wait for a daemon that is away, they raise
        StoreUnavailable at once (for callers that treat the store as a cache, such as
        the engine adapters)."""
        self._ns = namespace_prefix(namespace)     # keys are scoped by namespace
        self._namespace = namespace
        self._lock = threading.Lock()
        self._conn = Connection(self, defaults.socket_path(socket_path), namespace, timeout,
                                reconnect_timeout, fail_fast)
        self._conn.lock = self._lock
        self._writer = Writer(self._conn)
        self._reader = Reader(self._conn, self._writer)

    # ---- identity and state ---------------------------------------------------------------
    @property
    def cid(self):
        return self._conn.att.cid

    @property
    def segment_size(self):
        return self._conn.att.size

    @property
    def backing(self):
        return self._conn.att.backing

    @property
    def segment_id(self):
        return self._conn.att.segment_id

    @property
    def reconnect_timeout(self):
        return self._conn.reconnect_timeout

    @reconnect_timeout.setter
    def reconnect_timeout(self, value):
        self._conn.reconnect_timeout = float(value)

    @property
    def connected(self):
        """False while the daemon is away (the client is reconnecting by itself) or after close()."""
        return self._conn.closed_why is None and not self._conn.down

    @property
    def _down(self):
        return self._conn.down

    @property
    def _ro_range(self):
        return self._conn.att.ro_range

    @property
    def _socket_path(self):
        return self._conn.socket_path

    def _key(self, key):
        self._conn.ready()
        return self._ns + encode_key(key)

    def _keys(self, keys):
        self._conn.ready()
        ns = self._ns
        return [ns + encode_key(k) for k in keys]

    # ---- life -------------------------------------------------------------------------
    def close(self):
        """Release every hold, abort unfinished creations, give unused space back,
        disconnect. Idempotent."""
        conn = self._conn
        if conn.closed_why is not None:
            return
        with self._lock:
            if conn.closed_why is not None:
                return
            try:
                self._reader.release_all()
                if not conn.down:
                    self._writer.abort_all_quietly()
                    self._writer.give_back_quietly()
            finally:
                conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            conn = self.__dict__.get("_conn")
            if conn is not None and conn.closed_why is None and conn.pid == __import__("os").getpid():
                self.close()
        except Exception:
            pass

    # ---- writing ----------------------------------------------------------------------
    def create(self, key, nbytes, pin=False):
        """Reserve nbytes for key; returns a writable memoryview only this client sees
        until seal(). Raises ObjectExists if the key is sealed or being created."""
        k = self._key(key)
        nbytes = self._writer.check_fits(check_size(nbytes))
        with self._lock:
            self._conn.check_open()
            return self._writer.create(k, nbytes, pin)

    def seal(self, key):
        """Make a created object immutable and visible to every client."""
        k = self._key(key)
        self._locked(self._writer.seal, k, self._reader.lookup)

    def abort(self, key):
        """Give back an unsealed object's space."""
        k = self._key(key)
        with self._lock:
            self._conn.check_open()
            self._writer.abort(k)

    def put(self, key, value, strict=False, pin=False, replicas=None, wait=False):
        """Store value under key. Returns True if written, False if the key already
        existed (keys are content hashes: a repeat is normal and is not an error);
        with strict=True an existing key raises ObjectExists instead. ``replicas``: in a
        cluster, copies on distinct hosts (placed in the background, off this call's
        latency; None: the daemon's --replicas). ``wait``: True (up to this client's
        timeout) or seconds: return only once that many hosts hold the object, else
        raise ReplicasShort naming how many do (the copies made are kept); a repeat put
        of an existing key then asks for its missing copies too (without ``wait`` a
        repeat places none). Outside a cluster, waiting for more than one copy raises
        ReplicasShort at once.

        value: bytes-like, a numpy array, a torch tensor (CPU, or CUDA: copied straight
        into the pinned segment), a pyarrow Buffer, or a list/tuple of these, stored
        one after another as one object."""
        k = self._key(key)
        parts = self._writer.parts(value)
        n, wait = _replicas(replicas), self._wait_seconds(wait)
        out = self._locked(self._writer.put_many, [k], [parts], strict, pin, self._state_of, {}, n)[0]
        if wait:
            self._wait_copies([k], n, wait, [] if out else [k])
        return out

    def put_many(self, keys, values, strict=False, pin=False, replicas=None, wait=False):
        """put() each pair; returns a list of bools (True = written). The seals go out
        in one message; copies from CUDA tensors are issued together and waited for once.
        ``wait``: as for put, for every key."""
        if len(keys) != len(values):
            raise InvalidSize(f"put_many got {len(keys)} keys and {len(values)} values; give one value per key")
        ks = self._keys(keys)
        partss = [self._writer.parts(v) for v in values]
        n, wait = _replicas(replicas), self._wait_seconds(wait)
        # ``done`` survives a retry: keys this call already wrote stay True, not "existing"
        out = self._locked(self._writer.put_many, ks, partss, strict, pin, self._state_of, {}, n)
        if wait:
            self._wait_copies(ks, n, wait, [k for k, wrote in zip(ks, out) if not wrote])
        return out

    def copies(self, keys):
        """[int] per key: how many hosts hold it sealed, this one included (0: nowhere).
        One lookup round for the batch; outside a cluster, 1 or 0."""
        ks = self._keys(keys)
        if not self._conn.att.cluster:
            return [1 if self.contains(k) else 0 for k in keys]
        self._reader.settle()
        return self._across(protocol.LOCATE, ks, counts=True)

    def _wait_seconds(self, wait):
        """put's ``wait`` as seconds (0: do not wait), checked before anything is written."""
        if wait is False or wait is None:
            return 0
        if wait is True:
            return self._conn.timeout
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 < wait < 1e6:
            raise InvalidSize(f"wait={wait!r}: give True (this client's timeout) or the seconds to "
                              f"wait for the copies")
        return float(wait)

    def _wait_copies(self, ks, n, wait, repeats):
        """Until every key of ks is held by n hosts (0: the daemon's --replicas), polling
        the lookup, for ``wait`` seconds. ``repeats``: keys the put found existing (it
        sealed nothing, so nothing asked for their copies): their missing copies are
        asked for now. Outside a cluster more than one copy is ReplicasShort at once."""
        if n == 0:
            n = int(self._conn.att.default_replicas or 1)
        if n <= 1:
            return
        if not self._conn.att.cluster:
            raise ReplicasShort(f"{len(ks)} object(s) are stored on this host only: {n} copies on "
                                f"distinct hosts need a cluster (start the daemon with --cluster or "
                                f"--peers)", copies=1, wanted=n)
        if repeats:
            self._reader.settle()
            for a, b in protocol.key_batches(repeats):
                self._conn.request(protocol.replicate_keys(repeats[a:b], n), protocol.LOCATED)
        deadline = time.monotonic() + wait
        pause = 0.002
        while True:
            have = self._across(protocol.LOCATE, ks, counts=True)
            short = [(k, c) for k, c in zip(ks, have) if c < n]
            if not short:
                return
            if time.monotonic() + pause > deadline:
                k, c = min(short, key=lambda x: x[1])
                raise ReplicasShort(
                    f"{len(short)} of {len(ks)} object(s) are on fewer than the {n} hosts asked for "
                    f"after {wait:g} s (e.g. {user_key(k)!r:.80} on {c}); they are stored and the "
                    f"copies made are kept. Other hosts may lack free space or be fewer than {n}: "
                    f"see replicas_short in the daemon's stats", copies=c, wanted=n)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _locked(self, fn, *args):
        """fn(*args) under the client lock; if a lookup needs the daemon back, the lock
        is let go while waiting for it (the watchdog takes it to reconnect), then again."""
        while True:
            try:
                with self._lock:
                    self._conn.check_open()
                    return fn(*args)
            except Reconnecting:
                self._conn.ready()

    def _state_of(self, k):
        e = self._reader.lookup(k)
        return None if e is None else e.state

    # ---- reading ----------------------------------------------------------------------
    def get(self, key, timeout=None):
        """A read-only zero-copy memoryview of the sealed object, held until release().

        None if the key does not exist. If the object is being created, waits for its
        seal: up to timeout seconds (None: as long as its creator lives), then raises
        GetTimeout.
        """
        return self._reader.get_many([self._key(key)], timeout, self._lock)[0]

    def get_many(self, keys, timeout=None):
        """get() for many keys; a list of views or None."""
        return self._reader.get_many(self._keys(keys), timeout, self._lock)

    def release(self, key):
        """Drop one hold taken by get(); at the last one the object may be evicted or,
        if deleted meanwhile, freed. Works while the daemon is away (holds are this
        client's own): it never waits for it."""
        self._reader.release_many([self._ns + encode_key(key)], self._lock)

    def release_many(self, keys):
        """release() each key; raises ObjectNotFound, changing nothing, if any key is
        not held (as many times as it is named)."""
        ns = self._ns
        self._reader.release_many([ns + encode_key(k) for k in keys], self._lock)

    def read(self, key, out=None, timeout=None):
        """A verified copy of the object: into ``out`` (returns the number of bytes) or,
        without ``out``, as new bytes. None on a miss. ``out``: any writable buffer, a
        numpy array or a torch tensor (CPU or CUDA) of at least the object's size, or a
        list/tuple of these filled one after another. If the object's bytes no longer
        match the checksum recorded at seal, it is dropped (never served again) and
        ChecksumMismatch is raised."""
        return self.read_many((key,), (out,), timeout)[0]

    def read_many(self, keys, outs=None, timeout=None, errors="raise"):
        """read() for many keys, one wait for the device copies. ``errors="return"`` puts
        the exception of a failed key (ChecksumMismatch, InvalidSize...) in its place
        instead of raising the first one; the other keys are read either way."""
        ks = self._keys(keys)
        return self._reader.read_many(keys, ks, outs, timeout, errors, self._lock)

    def contains(self, key):
        """True if a sealed object exists under key (no hold is taken)."""
        conn = self._conn
        if conn.down or conn.closed_why is not None:
            conn.ready()
        k = self._ns + encode_key(key)
        try:
            if conn.att.table.sealed(k):
                return True
        except Busy:
            pass
        while True:
            try:
                return self._reader.contains(k)   # own puts in flight, settling a miss
            except Reconnecting:
                conn.ready()

    def size_of(self, key):
        """Size in bytes of a sealed object, or None."""
        k = self._key(key)
        while True:
            try:
                return self._reader.size_of(k)
            except Reconnecting:
                self._conn.ready()

    def keys(self):
        """The keys (bytes) of every sealed object in this client's namespace."""
        self._conn.ready()
        self._reader.settle()
        out, after = [], b""
        while True:
            body = self._conn.request(protocol.keys(self._ns, after, _KEYS_PAGE), protocol.KEYS_REPLY)
            found, more = protocol.read_keys_reply(body)
            out += [user_key(k) for k in found]
            if not more or not found:
                return out
            after = found[-1]

    def get_array(self, key, dtype=np.uint8, shape=None, timeout=None):
        """A read-only numpy array over the object (held until release), or None. Like
        get_tensor's, its pages are this view's own copy-on-write mapping (client/views.py)."""
        v = self.get(key, timeout)
        return None if v is None else views.convert(self.release, key, views.array, v, self._conn,
                                                    self._lock, dtype, shape)

    def get_tensor(self, key, dtype=None, shape=None, timeout=None):
        """A torch tensor over the object (held until release); in-place writes raise
        ReadOnlyView. None if the key does not exist. A write that gets past that guard
        lands in this tensor's own copy-on-write pages only (client/views.py), never in
        the object. MissingExtra if torch is not installed."""
        buffers.require("torch", "get_tensor")
        v = self.get(key, timeout)
        if v is None:
            return None
        return views.convert(self.release, key, views.tensor, v, self._conn, self._lock, dtype, shape)

    def get_buffer(self, key, timeout=None):
        """An immutable pyarrow Buffer over the object (held until release), or None."""
        buffers.require("pyarrow", "get_buffer")
        v = self.get(key, timeout)
        return None if v is None else views.convert(self.release, key, views.arrow, v, self._conn, self._lock)

    def get_buffers(self, keys, timeout=None):
        """get_buffer() for many keys (Plasma's get_buffers)."""
        buffers.require("pyarrow", "get_buffers")
        vs = self.get_many(keys, timeout)
        return views.convert_many(self.release, keys, views.arrow, vs, self._conn, self._lock)

    # ---- removing and pinning ---------------------------------------------------------
    # ---- across hosts (single host: the local answers) ----------------------------------
    def contains_anywhere(self, keys):
        """[bool] per key: sealed here or on any host of the cluster. Keys found here cost
        nothing more; the rest are looked up on their homes in one round for the batch.
        Raises a TransportError when no home of some key could be asked."""
        ks = self._keys(keys)
        out = [self.contains(k) for k in keys]
        missing = [i for i, x in enumerate(out) if not x]
        if missing and self._conn.att.cluster:
            got = self._across(protocol.LOCATE, [ks[i] for i in missing])
            for i, x in zip(missing, got):
                out[i] = x
        return out

    def delete_everywhere(self, keys):
        """Delete keys here and on every host that holds a copy. [bool] per key: deleted
        somewhere. A host that could not be asked raises a TransportError (its copy may
        remain: retry)."""
        ks = self._keys(keys)
        if not self._conn.att.cluster:
            return [self.delete(k) for k in keys]
        self._reader.settle()
        return self._across(protocol.DELETE_ALL, ks)

    def _across(self, mtype, ks, counts=False):
        timeout = max(0.1, self._conn.timeout - 0.5)
        read = protocol.read_copies if counts else protocol.read_located
        out = []
        for a, b in protocol.key_batches(ks):
            body = self._conn.request(protocol.key_list(mtype, ks[a:b], timeout), protocol.LOCATED)
            out += read(body, b - a)
        return out

    def delete(self, key):
        """Delete a sealed object; if clients hold it, its space is freed at the last
        release (it is invisible at once). Returns False if there was no sealed object."""
        k = self._key(key)
        self._reader.settle()        # a put that returned before this call is deleted too
        body = self._conn.request(protocol.keyed(protocol.DELETE, k), protocol.DONE)
        return protocol.read_done(body)

    def pin(self, key):
        """Exclude a sealed or unsealed object from eviction until unpin()."""
        self._set_pinned(key, True)

    def unpin(self, key):
        self._set_pinned(key, False)

    def _set_pinned(self, key, pinned):
        k = self._key(key)
        self._reader.settle()
        self._conn.request(protocol.keyed(protocol.PIN, k, flag=1 if pinned else 0), protocol.DONE)

    # ---- daemon ------------------------------------------------------------------------
    def stats(self):
        """The daemon's view: size, used, objects, clients, backing... (one round trip)."""
        self._conn.ready()
        return self._conn.request(protocol.encode(protocol.STATS, {}), protocol.STATS_REPLY)

    def verify(self):
        """Ask the daemon to check the store's consistency: every extent accounted for
        exactly once, and the published table equal to the index. Returns the problems
        found (an empty list when consistent)."""
        self._conn.ready()
        self._reader.settle()
        return self._conn.request(protocol.encode(protocol.CHECK, {}), protocol.CHECK_REPLY)["problems"]


def _replicas(n):
    """0 (the daemon's default) for None, else a count of 1-64 copies."""
    if n is None:
        return 0
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
        raise InvalidSize(f"replicas={n!r}: give a whole number of copies from 1 to 64, or None "
                          f"for the daemon's --replicas")
    return n
