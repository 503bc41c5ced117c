"""The client handle: Plasma-like create/seal/get/release/delete on the shared segment.

Owns: the connection to the daemon (hello, segment fd, stats), this process's
mappings of the segment (read-write for objects it creates, read-only for sealed
objects it reads, and on /dev/shm a private copy-on-write one for tensor views), its
local hold counts (a key held twice costs one index hold; a repeated get still checks
the index, so a deleted or replaced object is never served from a stale hold), and
input validation. Index operations run in this process against the shared LMDB index
(see kvstore/index.py), so get, contains and put make no round trip to the daemon.

Views: ``get`` returns read-only memoryviews of the segment. A view stays valid until
its key is released (or the client closes); after that the memory may be reused.
The daemon notices a client's exit or death through its socket and releases what it
held and reclaims what it was creating.
Must never: copy on get, return a writable view of a sealed object, let a bad
argument reach the index, or be used after fork (a child must open its own Client).
"""

import logging
import mmap
import os
import select
import socket
import threading
import time
import weakref

import numpy as np
import xxhash

from kvstore import protocol
from kvstore.errors import (ChecksumMismatch, ClientClosed, GetTimeout, InvalidSize, KVStoreError, NotSealed,
                            ObjectExists, ObjectNotFound, StoreUnavailable, ValueTooLarge)
from kvstore.index import BEING_CREATED, MISS, REFERENCED as _REFERENCED, SEALED, Index
from kvstore.keys import encode_key, namespace_prefix, user_key

from . import buffers, device_copy

log = logging.getLogger("kvstore.client")

DEFAULT_SOCKET = "/tmp/kvstore.sock"
#: Values up to this size are written and sealed inside one index transaction.
ONE_TXN_PUT = 256 << 10
#: Large values are copied and hashed in chunks this size (measured here: 13.8 GB/s
#: against 12.2 for copy-then-hash of 16 MiB; smaller chunks lose to loop overhead).
HASH_CHUNK = 1 << 20

_LIVE = weakref.WeakSet()
_FORK_ORPHANS = []  # LMDB handles inherited by fork children: never closed there
# LMDB allows one handle per environment (file) per process: clients of one store
# share it. Entries are keyed by (index path, segment id): after a daemon restarts with
# a fresh store, clients move to a new entry as they reconnect, each in its own time.
_INDEXES = {}       # (index path, segment id) -> _IndexEntry
_INDEXES_LOCK = threading.Lock()


class _IndexEntry:
    def __init__(self, index, path, segment_id):
        self.index, self.path, self.segment_id = index, path, segment_id
        self.users = weakref.WeakSet()


def _open_index(client, path, map_size, max_readers, segment_id):
    with _INDEXES_LOCK:
        entry = _INDEXES.get((path, segment_id))
        if entry is None:
            same_files = [e for e in _INDEXES.values() if e.path == path]
            try:
                index = Index(path, map_size, create=False, max_readers=max_readers)
            except StoreUnavailable:
                if not same_files:     # "already open": the same files, re-initialised
                    raise
                index = same_files[0].index
            if index.segment_id() != segment_id:
                if not any(e.index is index for e in same_files):
                    index.close()
                raise StoreUnavailable(f"the index at {path} does not describe the daemon's segment; "
                                       f"is a second daemon using that data dir?")
            entry = _INDEXES[(path, segment_id)] = _IndexEntry(index, path, segment_id)
        entry.users.add(client)
        return entry


def _close_index(client, entry):
    with _INDEXES_LOCK:
        entry.users.discard(client)
        if entry.users:
            return
        if _INDEXES.get((entry.path, entry.segment_id)) is entry:
            del _INDEXES[(entry.path, entry.segment_id)]
        if not any(e.index is entry.index for e in _INDEXES.values()):
            entry.index.close()


def _watch(ref):
    """Watchdog thread of one client: sleeps in poll() on its control socket and, when
    the daemon hangs up, retries the connection until it is back or the client closes.
    Holds only a weak reference between polls and attempts, so an unreferenced client
    is still collected (and closed), daemon or no daemon."""
    watched = poller = None
    pause = 0.02
    while True:
        c = ref()
        if c is None or c._closed_why is not None:
            return
        if c._down:
            done = c._reconnect_once()
            del c
            if not done:
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
            continue
        pause = 0.02
        sock = c._sock
        del c
        if sock is not watched:
            poller = select.poll()
            poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            watched = sock
        try:
            events = poller.poll(500)
        except (OSError, ValueError):
            events = []
        c = ref()
        if c is None:
            return
        if events and c._closed_why is None and c._sock is sock:
            c._went_away()
        del c


def _after_fork_in_child():
    for c in list(_LIVE):
        c._orphan_after_fork()
    _FORK_ORPHANS.extend({id(e.index): e.index for e in _INDEXES.values()}.values())
    _INDEXES.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _connect(sock, path, timeout):
    """connect(), retrying while the daemon's accept backlog is full (EAGAIN)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return sock.connect(path)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


#: The checksum recorded at seal and verified by every copy and by recovery.
_checksum = xxhash.xxh3_64_intdigest


def _nbytes(piece):
    """Bytes of a piece of a value or target: a flat memoryview, or a flat uint8 device tensor."""
    return piece.nbytes if type(piece) is memoryview else piece.numel()


def _copy_out_and_hash(src, dsts):
    """Copy src into the dsts one after another and return the checksum of what landed
    in them (not of src, which a reader without a hold may see change between the copy
    and the hash), a cache-sized chunk at a time, each hashed while still in cache."""
    h = xxhash.xxh3_64()
    n, pos = src.nbytes, 0
    for d in dsts:
        take = min(d.nbytes, n - pos)
        for o in range(0, take, HASH_CHUNK):
            e = min(take, o + HASH_CHUNK)
            d[o:e] = src[pos + o:pos + e]
            h.update(d[o:e])
        pos += take
        if pos >= n:
            break
    return h.intdigest()


def _entry_at(entries, off):
    """The local hold entry [offset, size, count] at off, or None."""
    for e in entries:
        if e[0] == off:
            return e
    return None


def _check_size(nbytes):
    if type(nbytes) is not int:
        if isinstance(nbytes, (int, np.integer)) and not isinstance(nbytes, bool):
            nbytes = int(nbytes)
        else:
            raise InvalidSize(f"size must be an int, not {type(nbytes).__name__}")
    if nbytes < 0:
        raise InvalidSize(f"size {nbytes} is negative; give the object's size in bytes")
    return nbytes


class Client:
    """A handle on the local daemon's store. Thread-safe; one per process is enough."""

    def __init__(self, socket_path=DEFAULT_SOCKET, namespace="", timeout=5.0, reconnect_timeout=10.0):
        """Connect to the daemon at socket_path. ``timeout``: seconds for one exchange with
        the daemon. ``reconnect_timeout``: how long a call waits for a daemon that went
        away to come back before raising StoreUnavailable (the client reconnects by
        itself, in the background)."""
        self._closed_why = "the client failed to connect"
        self._socket_path, self._namespace, self._timeout = socket_path, namespace, timeout
        self._ns = namespace_prefix(namespace)     # keys are scoped by namespace in the index
        self.reconnect_timeout = float(reconnect_timeout)
        self._held = {}       # key -> [[offset, size, count, checksum], ...] (2+ only if replaced meanwhile)
        self._creating = {}   # key -> (offset, size)
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._pid = os.getpid()
        self._down = False    # the daemon hung up and the watchdog is reconnecting
        self._down_since = 0.0
        self._generation = 0  # bumped when the client moves to a fresh store
        self._up = threading.Event()
        self._entry, self._cow_fd = None, -1
        sock, body, fd = self._handshake(None)
        try:
            self._attach(body, fd)
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(fd)
        self._sock = sock
        self._closed_why = None
        self._up.set()
        _LIVE.add(self)
        threading.Thread(target=_watch, args=(weakref.ref(self),), daemon=True,
                         name=f"kvstore-watchdog-{self.cid}").start()

    def _handshake(self, resume):
        """Connect and say HELLO; returns (socket, WELCOME body, segment fd)."""
        path = self._socket_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout)
        try:
            _connect(sock, path, self._timeout)
            sock.sendall(protocol.hello(os.getpid(), self._namespace, resume))
            mtype, body, fds = protocol.recv_message(sock, with_fds=1)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise StoreUnavailable(f"no kvstore daemon at {path}; start one with "
                                   f"kvstore-daemon --socket {path}") from None
        except (OSError, KVStoreError) as e:
            sock.close()
            if isinstance(e, KVStoreError):
                raise
            raise StoreUnavailable(f"cannot talk to the daemon at {path}: {e}") from None
        if mtype != protocol.WELCOME or len(fds) != 1:
            sock.close()
            for fd in fds:
                os.close(fd)
            raise StoreUnavailable(f"{path} did not answer like a kvstore daemon")
        return sock, body, fds[0]

    def _attach(self, body, fd):
        """Map the segment and open the index a WELCOME describes: at start, and again
        when the daemon came back with a fresh store. Older mappings stay alive for as
        long as views of them exist."""
        from kvstore.segment import Segment
        size, backing = body["segment_size"], body["backing"]
        seg = Segment(fd, size, backing, "", reused=True)
        rw = seg.map(writable=True)
        ro = seg.map(writable=False)
        cow_fd = os.dup(fd) if backing == "shm" else -1   # see _tensor_view
        try:
            entry = _open_index(self, body["index_path"], body["index_map_size"],
                                body["max_readers"], body["segment_id"])
        except BaseException:
            rw.close()
            ro.close()
            if cow_fd >= 0:
                os.close(cow_fd)
            raise
        old_entry, old_cow = self._entry, self._cow_fd
        self.cid, self.segment_size, self.backing = body["cid"], size, backing
        self.segment_id = body["segment_id"]
        self._rw, self._ro, self._entry, self._index = rw, ro, entry, entry.index
        self._rw_view, self._ro_view = memoryview(rw), memoryview(ro)
        base = np.frombuffer(ro, dtype=np.uint8).ctypes.data
        self._ro_range = (base, base + size)
        base = np.frombuffer(rw, dtype=np.uint8).ctypes.data
        self._rw_range = (base, base + size)
        buffers.register_readonly_range(*self._ro_range)   # kept after close: views may outlive us
        self._cow_fd, self._cow_view = cow_fd, None
        if old_entry is not None and old_entry is not entry:
            _close_index(self, old_entry)
        if old_cow >= 0:
            os.close(old_cow)

    @property
    def connected(self):
        """False while the daemon is away (the client is reconnecting by itself) or after close()."""
        return self._closed_why is None and not self._down

    def _went_away(self):
        self._up.clear()
        self._down = True
        self._down_since = time.monotonic()
        log.warning("kvstore daemon at %s went away; reconnecting", self._socket_path)

    def _reconnect_once(self):
        """One reconnection attempt (the watchdog retries). Same store: the client keeps
        its id, holds and creations. A fresh store: what this client held or was
        creating went with the old one. Returns True once connected (or closed)."""
        try:
            sock, body, fd = self._handshake({"cid": self.cid, "segment_id": self.segment_id})
        except Exception:
            return self._closed_why is not None
        try:
            with self._lock:
                if self._closed_why is not None:
                    sock.close()
                    return True
                if body["cid"] != self.cid or body["segment_id"] != self.segment_id:
                    self._attach(body, fd)
                    self._held.clear()
                    self._creating.clear()
                    self._generation += 1
                    log.warning("the daemon came back with a fresh store (or without this "
                                "client's registration): earlier holds and creations are gone")
                old, self._sock = self._sock, sock
                old.close()
        except Exception as e:               # e.g. the store changed again under us: retry
            sock.close()
            log.warning("reconnecting to %s failed (%s); retrying", self._socket_path, e)
            return False
        finally:
            os.close(fd)
        self._down = False
        self._up.set()
        log.info("reconnected to %s after %.2f s", self._socket_path, time.monotonic() - self._down_since)
        return True

    def _key(self, key):
        """The index key for a caller's key; waits first if the daemon is being reconnected."""
        if self._down:               # the watchdog is reconnecting
            self._await_daemon()
        return self._ns + encode_key(key)

    def _keys(self, keys):
        if self._down:
            self._await_daemon()
        ns = self._ns
        return [ns + encode_key(k) for k in keys]

    def _await_daemon(self):
        if not self._up.wait(self.reconnect_timeout) and self._closed_why is None:
            raise StoreUnavailable(f"the daemon at {self._socket_path} has been unreachable for "
                                   f"{self.reconnect_timeout} s; start it, or give the Client a "
                                   f"longer reconnect_timeout")

    # ---- life -------------------------------------------------------------------------
    def _dead(self):
        raise ClientClosed(f"this client is closed ({self._closed_why}); create a new Client")

    def _orphan_after_fork(self):
        if self._closed_why is None:
            self._closed_why = f"it was created in process {self._pid} before a fork"
            try:
                self._sock.close()       # only the child's copy: the daemon must see the parent's EOF
            except OSError:
                pass


    def close(self):
        """Release every hold, abort unfinished creations, disconnect. Idempotent."""
        with self._lock:
            if self._closed_why is not None:
                return
            self._closed_why = "close() was called"
            self._up.set()                       # callers waiting for the daemon: stop waiting
            try:
                if self._held:
                    self._index.release(self.cid, [(k, e[0]) for k, es in self._held.items() for e in es])
                for k in list(self._creating):
                    try:
                        self._index.abort(self.cid, k)
                    except KVStoreError:
                        pass
            finally:
                self._held.clear()
                self._creating.clear()
                self._sock.close()
                if self._cow_fd >= 0:
                    os.close(self._cow_fd)
                    self._cow_fd = -1
                _close_index(self, self._entry)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if self._closed_why is None and self._pid == os.getpid():
                self.close()
        except Exception:
            pass

    # ---- writing ----------------------------------------------------------------------
    def create(self, key, nbytes, pin=False):
        """Reserve nbytes for key; returns a writable memoryview only this client sees
        until seal(). Raises ObjectExists if the key is sealed or being created."""
        k = self._key(key)
        nbytes = self._check_fits(_check_size(nbytes))
        with self._lock:
            if self._closed_why is not None:
                self._dead()
            off, state, _ = self._index.create(self.cid, k, nbytes, pin)
            if off is None:
                raise ObjectExists(self._exists_msg(k, state, "create"))
            self._creating[k] = (off, nbytes)
            return self._rw_view[off:off + nbytes]

    def seal(self, key):
        """Make a created object immutable and visible to every client."""
        k = self._key(key)
        with self._lock:
            if self._closed_why is not None:
                self._dead()
            off, size = self._creating.get(k, (None, 0))
            # the bytes are private to their creator until seal: hash before the txn
            csum = _checksum(self._ro_view[off:off + size]) if off is not None else 0
            self._index.seal(self.cid, k, csum)
            self._creating.pop(k, None)

    def abort(self, key):
        """Give back an unsealed object's space."""
        k = self._key(key)
        with self._lock:
            if self._closed_why is not None:
                self._dead()
            self._index.abort(self.cid, k)
            self._creating.pop(k, None)

    def put(self, key, value, strict=False, pin=False):
        """Store value under key. Returns True if written, False if the key already
        existed (keys are content hashes: a repeat is normal and is not an error);
        with strict=True an existing key raises ObjectExists instead.

        value: bytes-like, a numpy array, a torch tensor (CPU, or CUDA: copied straight
        into the pinned segment), a pyarrow Buffer, or a list/tuple of these, stored
        one after another as one object."""
        k = self._key(key)
        parts, n, on_device = self._parts(value)
        with self._lock:
            if self._closed_why is not None:
                self._dead()
            if not on_device:
                return self._put_locked(k, parts, n, strict, pin)
            return self._put_device_locked([k], [parts], [n], strict, pin)[0]

    def put_many(self, keys, values, strict=False, pin=False):
        """put() each pair; returns a list of bools (True = written). Copies from CUDA
        tensors are issued together and waited for once."""
        if len(keys) != len(values):
            raise InvalidSize(f"put_many got {len(keys)} keys and {len(values)} values; give one value per key")
        ks = self._keys(keys)
        parts_ns = [self._parts(v) for v in values]
        with self._lock:
            if self._closed_why is not None:
                self._dead()
            out = [None] * len(ks)
            dev = []
            for i, (k, (parts, n, on_device)) in enumerate(zip(ks, parts_ns)):
                if not on_device:
                    out[i] = self._put_locked(k, parts, n, strict, pin)
                else:
                    dev.append(i)
            if dev:
                got = self._put_device_locked([ks[i] for i in dev], [parts_ns[i][0] for i in dev],
                                              [parts_ns[i][1] for i in dev], strict, pin)
                for i, g in zip(dev, got):
                    out[i] = g
            return out

    def _parts(self, value):
        """(pieces, total bytes, any on a device): flat byte memoryviews, and flat uint8
        tensors for device tensors."""
        if type(value) in (list, tuple):
            parts = [self._part(v) for v in value]
        else:
            parts = [self._part(value)]
        if len(parts) == 1 and type(parts[0]) is memoryview:
            return parts, self._check_fits(parts[0].nbytes), False
        on_device = any(type(p) is not memoryview for p in parts)
        n = sum(map(_nbytes, parts))
        return parts, self._check_fits(n), on_device

    @staticmethod
    def _part(v):
        if device_copy.is_device_tensor(v):
            return device_copy.flat_bytes(v)
        return buffers.as_bytes_view(v)

    def _put_locked(self, k, parts, n, strict, pin):
        rw = self._rw_view
        if n <= ONE_TXN_PUT:
            def write(off):
                pos = off
                for p in parts:
                    e = pos + p.nbytes
                    rw[pos:e] = p
                    pos = e
                return _checksum(rw[off:off + n])   # of the bytes as they lie in the segment
            off, state, sealed = self._index.create(self.cid, k, n, pin, sealed_data=write)
        else:
            # Large values are copied outside the index's write lock, then sealed.
            off, state, sealed = self._index.create(self.cid, k, n, pin)
        if off is None:
            if strict:
                raise ObjectExists(self._exists_msg(k, state, "put"))
            return False
        if not sealed:
            self._creating[k] = (off, n)      # close() aborts it if even the abort below fails
            try:
                self._index.seal(self.cid, k, self._copy_and_hash(parts, off))
            except BaseException:
                self._abort_quietly(k)
                raise
            self._creating.pop(k, None)
        return True

    def _put_device_locked(self, ks, partss, ns, strict, pin):
        """Puts with device tensors among their parts: create every object, issue every
        copy (non-blocking from the device into the pinned segment), wait once, then
        hash and seal each. Anything created and not sealed is aborted on error."""
        out = [False] * len(ks)
        made = []
        copies = device_copy.CopyBatch(self._mapping_of)
        try:
            for i, (k, n) in enumerate(zip(ks, ns)):
                off, state, _ = self._index.create(self.cid, k, n, pin)
                if off is None:
                    if strict:
                        raise ObjectExists(self._exists_msg(k, state, "put"))
                    continue
                self._creating[k] = (off, n)
                made.append((i, k, off, n))
            rw, ro = self._rw_view, self._ro_view
            for i, k, off, n in made:
                pos = off
                for p in partss[i]:
                    e = pos + _nbytes(p)
                    if type(p) is memoryview:
                        rw[pos:e] = p
                    else:
                        copies.to_segment(rw[pos:e], p)
                    pos = e
            copies.wait()
            while made:
                i, k, off, n = made[0]
                self._index.seal(self.cid, k, _checksum(ro[off:off + n]))
                self._creating.pop(k, None)
                made.pop(0)
                out[i] = True
        except BaseException:
            copies.wait_quietly()                 # no copy may land in space given back
            for _, k, _, _ in made:
                self._abort_quietly(k)
            raise
        return out

    def _abort_quietly(self, k):
        try:
            self._index.abort(self.cid, k)
            self._creating.pop(k, None)
        except KVStoreError:
            pass

    def _mapping_of(self, view):
        """(base address, size, read_only) of the segment mapping view lies in."""
        addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
        lo, hi = self._ro_range
        if lo <= addr < hi:
            return lo, hi - lo, True
        return self._rw_range[0], self._rw_range[1] - self._rw_range[0], False

    def _copy_and_hash(self, parts, off):
        """Copy the parts into the segment from off and return the checksum of what
        landed there, a cache-sized chunk at a time: each chunk is hashed while still in
        cache, instead of reading the whole value back from memory after the copy."""
        rw, ro = self._rw_view, self._ro_view
        h = xxhash.xxh3_64()
        pos = off
        for src in parts:
            n = src.nbytes
            for o in range(0, n, HASH_CHUNK):
                e = min(n, o + HASH_CHUNK)
                rw[pos + o:pos + e] = src[o:e]
                h.update(ro[pos + o:pos + e])
            pos += n
        return h.intdigest()

    def _check_fits(self, n):
        if n > self.segment_size:
            raise ValueTooLarge(f"{n} bytes can never fit in the {self.segment_size}-byte segment; "
                                f"split the value or start the daemon with a larger --size")
        return n

    @staticmethod
    def _exists_msg(k, state, op):
        what = "is sealed" if state == SEALED else "is being created by a client"
        return f"{op} of {user_key(k)!r}: the key {what}; get() it, or put(strict=False) to accept existing keys"

    # ---- reading ----------------------------------------------------------------------
    def get(self, key, timeout=None):
        """A read-only zero-copy memoryview of the sealed object, held until release().

        None if the key does not exist. If the object is being created, waits for its
        seal: up to timeout seconds (None: as long as its creator lives), then raises
        GetTimeout.
        """
        return self.get_many((key,), timeout)[0]

    def get_many(self, keys, timeout=None):
        """get() for many keys with one index transaction; a list of views or None."""
        ks = self._keys(keys)
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        out = [None] * len(ks)
        todo = list(range(len(ks)))
        pause = 20e-6
        while True:
            waiting = []
            with self._lock:
                if self._closed_why is not None:
                    self._dead()
                held, view, index = self._held, self._ro_view, self._index
                fetch = [i for i in todo if ks[i] not in held]
                local = [i for i in todo if ks[i] in held]
                if local:
                    # Held already: reuse the hold, but only if the key still names the
                    # same sealed extent (it may have been deleted or replaced since).
                    for i, rec in zip(local, index.lookup_many([ks[i] for i in local])):
                        e = _entry_at(held[ks[i]], rec[0]) if rec is not None and rec[5] == SEALED else None
                        if e is None:
                            fetch.append(i)
                        else:
                            e[2] += 1
                            out[i] = view[e[0]:e[0] + e[1]]
                if fetch:
                    got = index.acquire(self.cid, [ks[i] for i in fetch])
                    extra = []
                    for i, r in zip(fetch, got):
                        if r is MISS:
                            continue
                        if r[0] == BEING_CREATED:
                            if r[1] == self.cid:
                                if extra:
                                    index.release(self.cid, extra)
                                self._release_views(ks, out)
                                raise NotSealed(f"get of {user_key(ks[i])!r}: this client is creating it; seal() it first")
                            waiting.append(i)
                            continue
                        off, size, csum = r
                        entries = held.setdefault(ks[i], [])
                        e = _entry_at(entries, off)
                        if e is not None:      # the same key twice in one call
                            e[2] += 1
                            extra.append((ks[i], off))
                        else:
                            entries.append([off, size, 1, csum])
                        out[i] = view[off:off + size]
                    if extra:
                        index.release(self.cid, extra)
            if not waiting:
                return out
            if deadline is not None and time.monotonic() >= deadline:
                self._release_views(ks, out)
                raise GetTimeout(f"get of {user_key(ks[waiting[0]])!r}: still being created after {timeout} s; "
                                 f"retry later or raise the timeout")
            todo = waiting
            time.sleep(pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 2e-3)

    def _release_views(self, ks, out):
        """Undo the holds a failed get_many took (the client lock is held by the caller)."""
        done = []
        for k, v in zip(ks, out):
            if v is not None:
                done += self._unhold_local(k)
        if done:
            self._index.release(self.cid, done)

    def _unhold_local(self, k):
        """Drop one local hold on k; returns [(k, offset)] when an index hold must go."""
        entries = self._held[k]
        e = entries[-1]
        e[2] -= 1
        if e[2]:
            return []
        entries.pop()
        if not entries:
            del self._held[k]
        return [(k, e[0])]

    def read(self, key, out=None, timeout=None):
        """A verified copy of the object: into ``out`` (returns the number of bytes) or,
        without ``out``, as new bytes. None on a miss. ``out``: any writable buffer, a
        numpy array or a torch tensor (CPU or CUDA) of at least the object's size, or a
        list/tuple of these filled one after another. If the object's bytes no longer
        match the checksum recorded at seal, it is dropped (never served again) and
        ChecksumMismatch is raised."""
        return self.read_many((key,), (out,), timeout)[0]

    def read_many(self, keys, outs=None, timeout=None, errors="raise"):
        """read() for many keys: one index transaction for the holds, one wait for the
        device copies. ``errors="return"`` puts the exception of a failed key
        (ChecksumMismatch, InvalidSize...) in its place instead of raising the first
        one; the other keys are read either way."""
        outs = (None,) * len(keys) if outs is None else outs
        if len(outs) != len(keys):
            raise InvalidSize(f"read_many got {len(keys)} keys and {len(outs)} outs; give one out per key")
        results, slow = self._read_optimistic(keys, outs)
        if slow:
            try:
                got = self._read_held([keys[i] for i in slow], [outs[i] for i in slow], timeout)
            except (GetTimeout, NotSealed):
                if errors == "raise" or len(slow) == 1:
                    raise
                got = []                          # one key's wait must not sink the others
                for i in slow:
                    try:
                        got += self._read_held([keys[i]], [outs[i]], timeout)
                    except (GetTimeout, NotSealed) as e:
                        got.append(e)
            for i, r in zip(slow, got):
                results[i] = r
        if errors == "raise":
            for r in results:
                if isinstance(r, Exception):
                    raise r
        return results

    def _read_optimistic(self, keys, outs):
        """Copy sealed objects into CPU targets without taking holds: look the records
        up (one read transaction), copy, and accept a copy whose checksum matches the
        one recorded at seal; the bytes are then exactly the sealed value, whatever
        happened to the extent meanwhile. Anything else (a mismatch, an object being
        created, a device tensor target, bad arguments) is left to the held path, which waits,
        verifies under a hold and reports. Returns (results, indices left over)."""
        ks = self._keys(keys)
        with self._lock:                         # close() or a store switch must not close the
            if self._closed_why is not None:     # index under the lookup
                self._dead()
            index, view, generation = self._index, self._ro_view, self._generation
            recs = index.lookup_many(ks)
        results = [None] * len(ks)
        slow, used = [], []
        for i, rec in enumerate(recs):
            if rec is None:
                continue                         # a miss
            off, size, csum, flags = rec[0], rec[1], rec[4], rec[6]
            out = outs[i]
            if rec[5] != SEALED:
                slow.append(i)
                continue
            src = view[off:off + size]
            if out is None:
                data = bytes(src)
                ok = _checksum(data) == csum
            else:
                try:
                    dsts = self._targets(keys[i], out)
                except KVStoreError:
                    slow.append(i)
                    continue
                ok = (all(type(d) is memoryview for d in dsts) and sum(d.nbytes for d in dsts) >= size
                      and _copy_out_and_hash(src, dsts) == csum)
                data = size
            if not ok:
                slow.append(i)
                continue
            results[i] = data
            if not flags & _REFERENCED:
                used.append((ks[i], off))
        if used:
            with self._lock:                     # counts as a use for eviction, like a release
                if self._closed_why is None and self._generation == generation:
                    index.touch(used)
        return results, slow

    def _read_held(self, keys, outs, timeout):
        """read_many under holds: waits for objects being created, verifies under the
        hold, drops objects that fail their checksum, and returns exceptions in place."""
        views = self.get_many(keys, timeout)
        ks = self._keys(keys)
        results = [None] * len(ks)
        with self._lock:
            # the checksum came with the hold, from the same transaction
            generation, holds = self._generation, []
            for i, v in enumerate(views):
                if v is not None:
                    holds.append((i, self._held_entry(ks[i], v)))
        copies = device_copy.CopyBatch(self._mapping_of)
        try:
            for i, entry in holds:
                if entry is None:                 # the client moved to a fresh store meanwhile
                    results[i] = StoreUnavailable(f"read of {keys[i]!r}: the daemon switched to a fresh "
                                                  f"store during the read; retry")
                    continue
                try:
                    results[i] = self._copy_out(keys[i], views[i], outs[i], entry, copies)
                except KVStoreError as e:
                    if isinstance(e, ChecksumMismatch):
                        self._index.drop_if_at(ks[i], entry[0])
                    results[i] = e
            copies.wait()
        finally:
            copies.wait_quietly()                 # no copy may still run once the holds are gone
            if self._generation == generation:    # else the holds went with the old store
                self.release_many([keys[i] for i, e in holds if e is not None])
        return results

    def _held_entry(self, k, v):
        n = v.nbytes
        addr = np.frombuffer(v, dtype=np.uint8).ctypes.data if n else None
        return next((e for e in self._held.get(k, ()) if not n or self._ro_range[0] + e[0] == addr), None)

    def _copy_out(self, key, v, out, entry, copies):
        """Copy view v into out (None: new bytes), verifying its checksum."""
        n, csum = v.nbytes, entry[3]
        if out is None:
            data = bytes(v)
            if _checksum(data) != csum:
                raise self._corrupt(key)
            return data
        targets = self._targets(key, out)
        room = sum(map(_nbytes, targets))
        if room < n:
            raise InvalidSize(f"read of {key!r}: out has room for {room} bytes, the object has {n}; "
                              f"pass a buffer of at least {n} bytes (size_of() tells)")
        if all(type(t) is memoryview for t in targets):
            if _copy_out_and_hash(v, targets) != csum:
                raise self._corrupt(key)
            return n
        # device targets: verify the source first, then copy without waiting
        if _checksum(v) != csum:
            raise self._corrupt(key)
        pos = 0
        for t in targets:
            if pos >= n:
                break
            take = min(n - pos, _nbytes(t))
            if type(t) is memoryview:
                t[:take] = v[pos:pos + take]
            else:
                copies.from_segment(t[:take], v[pos:pos + take])
            pos += take
        return n

    @classmethod
    def _targets(cls, key, out):
        """out (one target, or a list/tuple of them filled in order) as flat targets."""
        return [cls._target(key, o) for o in (out if type(out) in (list, tuple) else (out,))]

    @staticmethod
    def _target(key, o):
        if device_copy.is_device_tensor(o):
            return device_copy.flat_bytes(o)
        try:
            if device_copy.is_tensor(o):
                o = device_copy.flat_bytes(o).numpy()
            dst = memoryview(o).cast("B")
        except (TypeError, ValueError, RuntimeError) as e:
            raise InvalidSize(f"read of {key!r}: out must be a writable contiguous buffer or tensor ({e})") from None
        if dst.readonly:
            raise InvalidSize(f"read of {key!r}: out is read-only; pass a writable buffer")
        return dst

    @staticmethod
    def _corrupt(key):
        return ChecksumMismatch(f"read of {key!r}: its bytes no longer match the checksum "
                                f"recorded at seal; it was dropped, put it again")

    def get_array(self, key, dtype=np.uint8, shape=None, timeout=None):
        """A read-only numpy array over the object (held until release), or None."""
        v = self.get(key, timeout)
        return None if v is None else self._convert(key, buffers.to_numpy, v, dtype, shape)

    def get_tensor(self, key, dtype=None, shape=None, timeout=None):
        """A torch tensor over the object (held until release); in-place writes raise
        ReadOnlyView. None if the key does not exist."""
        v = self.get(key, timeout)
        if v is None:
            return None
        return self._convert(key, buffers.to_tensor, self._tensor_view(v), dtype, shape)

    def _tensor_view(self, v):
        """The memory a tensor of view v should use. torch has no read-only tensors and
        ReadOnlyTensor cannot see every write (in-place ops nested in others, DLPack), so
        on /dev/shm segments tensors view a private copy-on-write mapping: a stray write
        changes only this process's copy of that page and never faults. (A private
        mapping of hugetlbfs would need a spare huge page per written page, so there
        tensors view the read-only mapping behind the ReadOnlyTensor guard.)"""
        if self._cow_fd < 0 or v.nbytes == 0:
            return v
        with self._lock:
            if self._cow_view is None:
                cow = mmap.mmap(self._cow_fd, self.segment_size, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
                base = np.frombuffer(cow, dtype=np.uint8).ctypes.data
                buffers.register_readonly_range(base, base + self.segment_size)
                self._cow_view = memoryview(cow)
        off = np.frombuffer(v, dtype=np.uint8).ctypes.data - self._ro_range[0]
        return self._cow_view[off:off + v.nbytes]

    def get_buffer(self, key, timeout=None):
        """An immutable pyarrow Buffer over the object (held until release), or None."""
        v = self.get(key, timeout)
        return None if v is None else self._convert(key, lambda view: buffers.to_arrow(view), v)

    def get_buffers(self, keys, timeout=None):
        """get_buffer() for many keys (Plasma's get_buffers)."""
        return [None if v is None else buffers.to_arrow(v) for v in self.get_many(keys, timeout)]

    def _convert(self, key, fn, view, *args):
        try:
            return fn(view, *args)
        except BaseException:
            self.release(key)
            raise

    def release(self, key):
        """Drop one hold taken by get(); at the last one the object may be evicted or,
        if deleted meanwhile, freed."""
        self.release_many((key,))

    def release_many(self, keys):
        """release() each key; raises ObjectNotFound, changing nothing, if any key is
        not held (as many times as it is named)."""
        ks = self._keys(keys)
        with self._lock:
            if self._closed_why is not None:
                self._dead()
            need = {}
            for k in ks:
                need[k] = need.get(k, 0) + 1
            for k, n in need.items():
                have = sum(e[2] for e in self._held.get(k, ()))
                if have < n:
                    what = f"holds it {have} times, not {n}" if have else "does not hold it"
                    raise ObjectNotFound(f"release of {user_key(k)!r}: this client {what} (get() it first)")
            done = []
            for k in ks:
                done += self._unhold_local(k)
            if done:
                self._index.release(self.cid, done)

    def contains(self, key):
        """True if a sealed object exists under key (no hold is taken)."""
        k = self._key(key)
        if self._closed_why is not None:
            self._dead()
        return self._index.contains(k)

    def size_of(self, key):
        """Size in bytes of a sealed object, or None."""
        k = self._key(key)
        if self._closed_why is not None:
            self._dead()
        rec = self._index.lookup(k)
        return rec[1] if rec is not None and rec[5] == SEALED else None

    def keys(self):
        """The keys (bytes) of every sealed object in this client's namespace."""
        if self._down:
            self._await_daemon()
        if self._closed_why is not None:
            self._dead()
        return [user_key(k) for k in self._index.sealed_keys(self._ns)]

    # ---- removing and pinning ---------------------------------------------------------
    def delete(self, key):
        """Delete a sealed object; if clients hold it, its space is freed at the last
        release (it is invisible at once). Returns False if there was no sealed object."""
        k = self._key(key)
        with self._lock:
            if self._closed_why is not None:
                self._dead()
            return self._index.delete(k)

    def pin(self, key):
        """Exclude a sealed or unsealed object from eviction until unpin()."""
        self._set_pinned(key, True)

    def unpin(self, key):
        self._set_pinned(key, False)

    def _set_pinned(self, key, pinned):
        k = self._key(key)
        with self._lock:
            if self._closed_why is not None:
                self._dead()
            self._index.set_pinned(k, pinned)

    # ---- daemon ------------------------------------------------------------------------
    def stats(self):
        """The daemon's view: size, used, objects, clients, backing... (one round trip)."""
        if self._down:               # the watchdog is reconnecting
            self._await_daemon()
        with self._lock:
            if self._closed_why is not None:
                self._dead()
            sock = self._sock
        try:
            with self._stats_lock:               # not the data-path lock: gets and puts go on
                return protocol.request(sock, protocol.encode(protocol.STATS, {}), protocol.STATS_REPLY)
        except (OSError, KVStoreError) as e:
            try:                                 # a late reply would desync the next request:
                sock.shutdown(socket.SHUT_RDWR)  # drop the connection, the watchdog reconnects
            except OSError:
                pass
            if isinstance(e, KVStoreError) and not isinstance(e, StoreUnavailable):
                raise
            raise StoreUnavailable(f"lost the daemon at {self._socket_path}: {e}") from None
