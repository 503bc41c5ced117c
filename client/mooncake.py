"""A Mooncake-compatible facade: ``MooncakeDistributedStore`` over the local kvstore daemon.

Code written against Mooncake's store (``from mooncake.store import
MooncakeDistributedStore``) runs against kvstore by changing that one import to
``from kvstore.client.mooncake import MooncakeDistributedStore``.

Owns: Mooncake's method names, argument orders and return codes (0 or a count on
success, the negative codes of ``ErrorCode`` on failure), mapped onto one
kvstore.client.Client; the buffers registered with ``register_buffer``; and reading
Mooncake's configuration (``setup`` arguments, a dict, a mooncake.json file,
``MOONCAKE_CONFIG_PATH``).

How Mooncake's setup maps onto a local daemon:
- ``master_server_addr`` names the daemon's socket when it is a path, ``unix:PATH`` or
  ``kvstore:PATH``. A Mooncake master address (``host:port``) means "the local daemon":
  the socket from ``KVSTORE_SOCKET`` or /tmp/kvstore.sock (kvstore.defaults.socket_path),
  and the log says so.
- ``local_hostname``, ``metadata_server``, ``protocol`` and ``rdma_devices`` are
  validated as strings and otherwise unused: there is one host and no transfer engine.
- ``global_segment_size`` and ``local_buffer_size`` are the daemon's business (its
  ``--size``); they are validated as non-negative sizes: ints, or strings read by
  kvstore.sizes as Mooncake reads them ("4GB" is 4 GiB: every unit is a power of
  1024, the same rule as the daemon's --size). No local staging buffer is
  needed: put_from and get_into copy once, between the caller's buffer and the segment.
- setup connects at once, so a wrong address fails at setup with -900 and a log line
  naming the socket, not at the first put.

Semantics kept from Mooncake: a put of an existing key returns 0 and keeps the first
value (and logs nothing); get of a missing key returns b''; get_into returns the bytes
read, -704 for a missing key; is_exist returns 1, 0 or a negative code. Data methods
never raise on bad input: they return -600 and keep the typed kvstore error in
``last_error`` (and log it at warning). Pointers passed to put_from/get_into must lie
inside a registered buffer, as with Mooncake's transfer engine; ``register_buffer``
checks in /proc/self/maps that the whole range is mapped read-write in this process
and that it overlaps no mapping of the store's segment (the client's read-write,
read-only and copy-on-write mappings, or any other mapping of the segment's file):
get_into there would overwrite other sealed objects in place. Every copy checks that
its range still overlaps none of the client's segment mappings, and is done by the
kernel (client/safecopy.py: process_vm_readv/writev on our own pid), so a buffer
freed, re-protected, replaced by a read-only mapping or cut short by a truncated file
after registration, even during the copy, is a -600 and never a SIGSEGV or SIGBUS.
The copies hash as they go, like the store's own: put_from seals the checksum of what
landed in the segment; get_into hashes the object's bytes as they are copied and counts
the copy only if the object stayed published meanwhile (client/reader.py), else it
copies again under a hold. (A freed heap chunk that malloc keeps mapped is still
writable memory: no check can tell it from a live buffer, as with Mooncake itself.)
Must never: copy more than once between a registered buffer and the segment, touch a
registered buffer's memory other than through client/safecopy.py, accept a
buffer in the segment, log an existing key or a miss as an error, or let a failed
transfer look like a success.
"""

import bisect
import functools
import json
import logging
import operator
import os
import re
import threading

from kvstore.defaults import DEFAULT_SOCKET, socket_path  # noqa: F401  (DEFAULT_SOCKET: old callers)
from kvstore.errors import (ChecksumMismatch, ConfigError, GetTimeout, InvalidKey, InvalidKeyType, InvalidSize,
                            InvalidValue, KVStoreError, ObjectExists, StoreFull, StoreUnavailable, ValueTooLarge)
from kvstore.sizes import parse_size

from . import buffers
from .safecopy import CallerMemory, address_of

log = logging.getLogger("kvstore.mooncake")


class ErrorCode:
    """Mooncake's error codes (the subset kvstore can produce, plus the lease codes)."""
    OK = 0
    NO_AVAILABLE_HANDLE = -200       # out of space
    INVALID_PARAMS = -600
    OBJECT_NOT_FOUND = -704
    OBJECT_ALREADY_EXISTS = -705
    OBJECT_HAS_LEASE = -706
    LEASE_EXPIRED = -707
    TRANSFER_FAIL = -800
    CHECKSUM_MISMATCH = -801
    RPC_FAIL = -900


def _code_of(e):
    if isinstance(e, GetTimeout):              # still being written: not there yet
        return ErrorCode.OBJECT_NOT_FOUND
    if isinstance(e, StoreFull):
        return ErrorCode.NO_AVAILABLE_HANDLE
    if isinstance(e, ChecksumMismatch):
        return ErrorCode.CHECKSUM_MISMATCH
    if isinstance(e, ObjectExists):
        return ErrorCode.OBJECT_ALREADY_EXISTS
    if isinstance(e, StoreUnavailable):
        return ErrorCode.RPC_FAIL
    if isinstance(e, (InvalidKey, InvalidKeyType, InvalidSize, InvalidValue, ValueTooLarge, TypeError, ValueError)):
        return ErrorCode.INVALID_PARAMS
    return ErrorCode.TRANSFER_FAIL


class ReplicateConfig:
    """Mooncake's replication options. One host has one replica; ``with_hard_pin``
    pins the object (never evicted until removed); the other fields are accepted."""

    def __init__(self, replica_num=1, with_soft_pin=False, with_hard_pin=False, preferred_segment="",
                 soft_pin_action=None, preferred_segments=None):
        self.replica_num, self.with_soft_pin, self.with_hard_pin = replica_num, with_soft_pin, with_hard_pin
        self.preferred_segment, self.soft_pin_action = preferred_segment, soft_pin_action
        self.preferred_segments = list(preferred_segments or [])


def load_config(path=None):
    """A mooncake.json-style config as a dict: from path, else from MOONCAKE_CONFIG_PATH.
    Raises InvalidValue naming the file and what is wrong."""
    path = path or os.environ.get("MOONCAKE_CONFIG_PATH")
    if not path:
        raise InvalidValue("no config file: pass a path or set MOONCAKE_CONFIG_PATH to a mooncake.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise InvalidValue(f"cannot read the Mooncake config {path}: {e.strerror}") from None
    except ValueError as e:
        raise InvalidValue(f"the Mooncake config {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise InvalidValue(f"the Mooncake config {path} must be a JSON object")
    return cfg


def daemon_socket(master_server_addr):
    """The daemon socket a Mooncake master address names (see the module docstring)."""
    addr = (master_server_addr or "").strip()
    for scheme in ("kvstore://", "kvstore:", "unix://", "unix:"):
        if addr.startswith(scheme):
            return addr[len(scheme):]
    if addr.startswith("/") or addr.startswith("."):
        return addr
    sock = socket_path()
    if addr:
        log.info("master_server_address %r is a Mooncake master address; kvstore uses the local "
                 "daemon at %s (name a socket path there to choose another)", addr, sock)
    return sock


def _size_field(name, v):
    """Mooncake sizes are ints, or strings such as "4GB" in its JSON (4 GiB); >= 0.
    kvstore.sizes reads them; its ConfigError becomes this facade's InvalidValue."""
    try:
        return parse_size(v, name, minimum=0)
    except ConfigError as e:
        raise InvalidValue(str(e)) from None


def _maps():
    """This process's mappings from /proc/self/maps: (lo, hi, perms, (dev, inode)) each."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi, fields[1], (fields[3], int(fields[4]))))
    return out


def _mapped_rw(maps, ptr, size):
    """True if [ptr, ptr+size) lies in read-write mappings of this process."""
    end, pos = ptr + size, ptr
    for lo, hi, perms, _ in sorted(maps):
        if perms.startswith("rw") and lo <= pos < hi:
            pos = hi
            if pos >= end:
                return True
    return False


def _segment_ranges(c):
    """[lo, hi) of the client's own mappings of the segment in this process: the
    read-write mapping of its puts and the read-only one of sealed objects (the private
    mappings of tensor views are checked by _tensor_mapping)."""
    att = c._conn.att
    cow = getattr(att, "cow_view", None)          # one process-wide copy-on-write mapping
    if cow is None:
        return att.rw_range, att.ro_range
    lo = address_of(cow)
    return att.rw_range, att.ro_range, (lo, lo + cow.nbytes)


def _overlap(ranges, ptr, size):
    end = ptr + max(size, 1)
    for lo, hi in ranges:
        if ptr < hi and lo < end:
            return lo, hi
    return None


def _tensor_mapping(ptr, size):
    """The private mapping of a live tensor view (client/views.py, registered with
    client/buffers.py) that [ptr, ptr+size) overlaps, or None."""
    starts = getattr(buffers, "_VIEW_STARTS", None)
    if not starts:
        return None
    i = bisect.bisect_left(starts, ptr + max(size, 1)) - 1    # the last mapping starting before the end
    if i < 0:
        return None
    lo = starts[i]
    got = buffers._VIEW_RANGES.get(lo)
    return (lo, got[0]) if got is not None and got[0] > ptr else None


def _other_clients_ranges(c):
    """[lo, hi) of the segment mappings of every other open Client of this process (an
    engine connector next to the facade, a second facade): a buffer freed after
    register_buffer may have been reused by one of them, and its read-write mapping
    would let a copy change sealed objects in place."""
    from . import connection
    out = []
    for conn in list(connection._LIVE):
        att = conn.__dict__.get("att")
        if conn is c._conn or att is None or conn.closed_why is not None:
            continue
        out += [att.rw_range, att.ro_range]
    return out


def _in_segment(c, ptr, size):
    return (_overlap(_segment_ranges(c), ptr, size) or _tensor_mapping(ptr, size)
            or _overlap(_other_clients_ranges(c), ptr, size))


def _segment_files(maps, c):
    """The (device, inode) of the files behind the client's segment mappings."""
    marks = {r[0] for r in _segment_ranges(c)}
    return {ident for lo, hi, perms, ident in maps if lo in marks and ident[1] != 0}


def _as_int(name, v):
    """An int argument (Python or numpy int, as pybind accepts), never a bool or float."""
    if isinstance(v, bool):
        raise InvalidValue(f"{name} must be an int, not a bool")
    try:
        return operator.index(v)
    except TypeError:
        raise InvalidValue(f"{name} must be an int, not {type(v).__name__}") from None


def _guard(on_error):
    """Mooncake's methods return codes: any exception a call raises (bad argument types
    included) becomes a code, with the typed error in last_error and the log.
    on_error(code, args) builds the return value (a code, b'', or a list of codes)."""
    def wrap(fn):
        @functools.wraps(fn)
        def guarded(self, *args, **kw):
            try:
                return fn(self, *args, **kw)
            except Exception as e:
                if not isinstance(e, KVStoreError):
                    e = InvalidValue(f"{fn.__name__}: {type(e).__name__}: {e}")
                return on_error(self._fail(e, fn.__name__), args)
        return guarded
    return wrap


def _per_key(code, args):
    try:
        return [code] * len(args[0])
    except Exception:
        return code


_code = _guard(lambda code, args: code)
_codes = _guard(_per_key)
_bytes = _guard(lambda code, args: b"")
_bytes_list = _guard(lambda code, args: _per_key(b"", args))


def _same_lengths(keys, ptrs, sizes):
    if not len(keys) == len(ptrs) == len(sizes):
        raise InvalidSize("keys, pointers and sizes must have the same length")


class _Buffer:
    __slots__ = ("ptr", "size")

    def __init__(self, ptr, size):
        self.ptr, self.size = ptr, size


class MooncakeDistributedStore:
    """Mooncake's store API on the local kvstore daemon (see the module docstring)."""

    def __init__(self):
        self._client = None
        # registered buffers: an immutable (starts, buffers) pair sorted by ptr, replaced
        # whole under the lock, so a lookup never sees the two halves out of step
        self._registry = ((), ())
        self._lock = threading.Lock()
        self.last_error = None    # the typed kvstore error behind the last negative code

    # ---- setup -------------------------------------------------------------------------
    @_code
    def setup(self, local_hostname=None, metadata_server=None, global_segment_size=3355443200,
              local_buffer_size=1073741824, protocol="tcp", rdma_devices="", master_server_addr="",
              *rest, **kw):
        """Connect to the local daemon. Positional Mooncake arguments, or one dict (the
        keys of mooncake.json), or nothing (reads MOONCAKE_CONFIG_PATH). 0 or a code."""
        try:
            if isinstance(local_hostname, dict):
                cfg = dict(local_hostname)
            elif local_hostname is None and metadata_server is None:
                cfg = load_config()
            else:
                cfg = {"local_hostname": local_hostname, "metadata_server": metadata_server,
                       "global_segment_size": global_segment_size, "local_buffer_size": local_buffer_size,
                       "protocol": protocol, "device_name": rdma_devices,
                       "master_server_address": master_server_addr}
            cfg.update(kw)
            return self._setup_from(cfg)
        except KVStoreError as e:
            return self._fail(e, "setup")

    @_code
    def setup_from_file(self, path=None):
        """setup() from a mooncake.json file (default: MOONCAKE_CONFIG_PATH)."""
        try:
            return self._setup_from(load_config(path))
        except KVStoreError as e:
            return self._fail(e, "setup")

    @_code
    def setup_dummy(self, mem_pool_size=0, local_buffer_size=0, server_address=""):
        """SGLang's standalone mode: server_address names the daemon (as master_server_addr)."""
        try:
            return self._setup_from({"global_segment_size": mem_pool_size, "local_buffer_size": local_buffer_size,
                                     "master_server_address": server_address})
        except KVStoreError as e:
            return self._fail(e, "setup_dummy")

    def _setup_from(self, cfg):
        for name in ("local_hostname", "metadata_server", "protocol", "device_name", "rdma_devices",
                     "master_server_address", "master_server_addr", "kvstore_socket"):
            if cfg.get(name) is not None and not isinstance(cfg[name], str):
                raise InvalidValue(f"{name} must be a string, not {type(cfg[name]).__name__}")
        for name in ("global_segment_size", "local_buffer_size"):
            if cfg.get(name) is not None:
                _size_field(name, cfg[name])
        sock = cfg.get("kvstore_socket") or daemon_socket(
            cfg.get("master_server_address") or cfg.get("master_server_addr") or "")
        from kvstore.client import Client
        client = Client(sock, namespace=cfg.get("kvstore_namespace", "") or "")
        with self._lock:
            old, self._client = self._client, client
        if old is not None:
            old.close()
        self.last_error = None
        return ErrorCode.OK

    def close(self):
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            c.close()
        return ErrorCode.OK

    def health_check(self):
        """0: connected to a live daemon; 1: not set up or closed; 2: the daemon is unreachable."""
        c = self._client
        if c is None:
            return 1
        if not c.connected:
            return 2
        try:
            c.stats()
            return 0
        except KVStoreError as e:
            self.last_error = e
            return 2

    # ---- helpers -----------------------------------------------------------------------
    def _fail(self, e, op):
        self.last_error = e
        code = _code_of(e)
        log.warning("%s failed (%d): %s", op, code, e)
        return code

    def _c(self):
        c = self._client
        if c is None:
            raise StoreUnavailable("the store is not set up: call setup() first (or it was closed)")
        return c

    @staticmethod
    def _pin(config):
        return bool(config is not None and getattr(config, "with_hard_pin", False))

    def _put_code(self, c, key, value, config):
        c.put(key, value, pin=self._pin(config))   # an existing key: False, and that is a success
        return ErrorCode.OK

    # ---- put / get ---------------------------------------------------------------------
    @_code
    def put(self, key, value, config=None):
        """Store bytes-like value; 0 (also if the key exists: the first value is kept)."""
        return self._put_code(self._c(), key, value, config)

    @_code
    def put_batch(self, keys, values, config=None):
        """put() each pair; 0, or the first error's code."""
        if len(keys) != len(values):
            raise InvalidSize(f"put_batch got {len(keys)} keys and {len(values)} values")
        self._c().put_many(list(keys), list(values), pin=self._pin(config))
        return ErrorCode.OK

    @_code
    def put_parts(self, key, *parts, config=None):
        """Mooncake's put_parts: the parts stored one after another as one object."""
        return self._put_code(self._c(), key, list(parts), config)

    @_bytes
    def get(self, key):
        """The object's bytes; b'' on a miss or an error (last_error tells which)."""
        r = self._c().read(key, timeout=0)
        return b"" if r is None else r

    @_bytes_list
    def get_batch(self, keys):
        return [r if isinstance(r, bytes) else b"" for r in self._read_results(self._c(), keys, None)]

    def _read_results(self, c, keys, outs):
        rs = c.read_many(list(keys), outs, timeout=0, errors="return")
        for r in rs:
            if isinstance(r, KVStoreError):
                self._fail(r, "get")
        return rs

    # ---- registered buffers ------------------------------------------------------------
    @_code
    def register_buffer(self, ptr, size):
        """Register [ptr, ptr+size) for put_from/get_into; 0, or -600 if it is not memory
        mapped read-write in this process (a device pointer, a freed or bogus address) or
        if it overlaps a mapping of the store's segment."""
        ptr, size = _as_int("ptr", ptr), _as_int("size", size)
        try:
            maps = _maps()
        except (OSError, ValueError, IndexError) as e:
            raise InvalidValue(f"register_buffer: cannot read /proc/self/maps ({e})") from None
        if ptr <= 0 or size <= 0 or not _mapped_rw(maps, ptr, size):
            raise InvalidValue(
                f"register_buffer: [{ptr:#x}, +{size}) is not host memory mapped read-write in this "
                f"process; register a CPU buffer you own (for GPU tensors use kvstore.client.Client, "
                f"which copies them through the pinned segment)")
        c = self._client
        if c is not None:
            seg = _in_segment(c, ptr, size)
            if seg is None:
                files = _segment_files(maps, c)
                seg = next(((lo, hi) for lo, hi, _, ident in maps
                            if ident in files and ptr < hi and lo < ptr + size), None)
            if seg is not None:
                raise InvalidValue(self._in_segment("register_buffer", ptr, size, seg))
        buf = _Buffer(ptr, size)
        with self._lock:
            starts, bufs = self._registry
            i = bisect.bisect_left(starts, ptr)
            self._registry = (starts[:i] + (ptr,) + starts[i:], bufs[:i] + (buf,) + bufs[i:])
        return ErrorCode.OK

    @_code
    def unregister_buffer(self, ptr):
        """0, or -600 if ptr is not the start of a registered buffer."""
        ptr = _as_int("ptr", ptr)
        with self._lock:
            starts, bufs = self._registry
            for i, b in enumerate(bufs):
                if b.ptr == ptr:
                    self._registry = (starts[:i] + starts[i + 1:], bufs[:i] + bufs[i + 1:])
                    return ErrorCode.OK
        raise InvalidValue(f"unregister_buffer: {ptr:#x} is not a registered buffer's start")

    @staticmethod
    def _in_segment(op, ptr, size, seg):
        return (f"{op}: [{ptr:#x}, +{size}) overlaps this process's mapping of the store's segment "
                f"[{seg[0]:#x}, {seg[1]:#x}); writing there would change sealed objects in place; "
                f"register a buffer of your own")

    def _view(self, c, ptr, size):
        """[ptr, ptr+size) inside a registered buffer as CallerMemory (copied only by the
        kernel: see client/safecopy.py), or InvalidValue."""
        ptr, size = _as_int("ptr", ptr), _as_int("size", size)
        if size < 0:
            raise InvalidValue(f"size must be >= 0, not {size}")
        starts, bufs = self._registry
        i = bisect.bisect_right(starts, ptr) - 1
        while i >= 0:
            b = bufs[i]
            if b.ptr <= ptr and ptr + size <= b.ptr + b.size:
                break
            i -= 1
        else:
            raise InvalidValue(f"[{ptr:#x}, +{size}) is not inside a registered buffer; "
                               f"register_buffer() it first")
        # the segment may have been mapped where a registered buffer was (freed, then the
        # client reconnected to a fresh store or made its tensor mapping)
        seg = _in_segment(c, ptr, size)
        if seg is not None:
            raise InvalidValue(self._in_segment("copy", ptr, size, seg))
        return CallerMemory(ptr, size)

    def _views(self, c, key, ptrs, sizes):
        """The pieces of one key (its pointers and sizes) in registered buffers."""
        if len(ptrs) != len(sizes):
            raise InvalidSize(f"key {key!r}: {len(ptrs)} pointers and {len(sizes)} sizes")
        return [self._view(c, p, s) for p, s in zip(ptrs, sizes)]

    @_code
    def put_from(self, key, buffer_ptr, size, config=None):
        """Store size bytes at buffer_ptr (inside a registered buffer): one copy into the segment."""
        c = self._c()
        return self._put_code(c, key, self._view(c, buffer_ptr, size), config)

    @_code
    def get_into(self, key, buffer_ptr, size):
        """Copy the object into the registered buffer at buffer_ptr: the bytes read, -704 on
        a miss, -600 if it does not fit, -801 if it failed its checksum (and was dropped)."""
        c = self._c()
        r = c.read(key, out=self._view(c, buffer_ptr, size), timeout=0)
        return ErrorCode.OBJECT_NOT_FOUND if r is None else r

    @_codes
    def batch_put_from(self, keys, buffer_ptrs, sizes, config=None):
        """put_from() each; a list of codes."""
        _same_lengths(keys, buffer_ptrs, sizes)
        return self.batch_put_from_multi_buffers(keys, [[p] for p in buffer_ptrs], [[s] for s in sizes], config)

    @_codes
    def batch_get_into(self, keys, buffer_ptrs, sizes):
        """get_into() each; a list of bytes read or codes."""
        _same_lengths(keys, buffer_ptrs, sizes)
        return self.batch_get_into_multi_buffers(keys, [[p] for p in buffer_ptrs], [[s] for s in sizes])

    @_codes
    def batch_put_from_multi_buffers(self, keys, all_buffer_ptrs, all_sizes, config=None):
        """Each key's value gathered from several registered buffers into one object."""
        _same_lengths(keys, all_buffer_ptrs, all_sizes)
        c = self._c()
        out, todo_i, todo_k, todo_v = [], [], [], []
        for i, (k, ptrs, sizes) in enumerate(zip(keys, all_buffer_ptrs, all_sizes)):
            try:
                todo_v.append(self._views(c, k, ptrs, sizes))
                todo_i.append(i)
                todo_k.append(k)
                out.append(ErrorCode.OK)
            except KVStoreError as e:
                out.append(self._fail(e, "batch_put_from"))
        if todo_k:
            pin = self._pin(config)
            for i, k, v in zip(todo_i, todo_k, todo_v):
                try:
                    c.put(k, v, pin=pin)
                except KVStoreError as e:
                    out[i] = self._fail(e, "batch_put_from")
        return out

    @_codes
    def batch_get_into_multi_buffers(self, keys, all_buffer_ptrs, all_sizes, prefer_same_node=True):
        """Each object scattered into several registered buffers; bytes read or a code each."""
        _same_lengths(keys, all_buffer_ptrs, all_sizes)
        c = self._c()
        out = [ErrorCode.OK] * len(keys)
        idx, ks, outs = [], [], []
        for i, (k, ptrs, sizes) in enumerate(zip(keys, all_buffer_ptrs, all_sizes)):
            try:
                views = self._views(c, k, ptrs, sizes)
                outs.append(views[0] if len(views) == 1 else views)
                idx.append(i)
                ks.append(k)
            except KVStoreError as e:
                out[i] = self._fail(e, "batch_get_into")
        if ks:
            try:
                rs = self._read_results(c, ks, outs)
            except KVStoreError as e:          # keys refused above keep their own codes
                self._fail(e, "batch_get_into")
                rs = [e] * len(ks)
            for i, r in zip(idx, rs):
                out[i] = (ErrorCode.OBJECT_NOT_FOUND if r is None else _code_of(r) if isinstance(r, Exception)
                          else r)
        return out

    # ---- queries and removal -----------------------------------------------------------
    @_code
    def is_exist(self, key):
        """1 if the key exists, 0 if not, a negative code on error."""
        return int(self._c().contains(key))

    @_codes
    def batch_is_exist(self, keys):
        c = self._c()
        return [int(c.contains(k)) for k in keys]

    @_code
    def get_size(self, key):
        """The object's size in bytes, or -704."""
        n = self._c().size_of(key)
        return ErrorCode.OBJECT_NOT_FOUND if n is None else n

    @_code
    def remove(self, key, force=False):
        """0, or -704 if there is no such object. Readers still holding it keep their copy
        valid; its space is freed at their last release (so ``force`` changes nothing)."""
        return ErrorCode.OK if self._c().delete(key) else ErrorCode.OBJECT_NOT_FOUND

    @_code
    def remove_by_regex(self, pattern, force=False):
        """Remove every key matching the regex; the number removed."""
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        c = self._c()
        return sum(bool(c.delete(k)) for k in c.keys() if rx.search(k))

    @_code
    def remove_all(self, force=False):
        """Remove every object (of this store's namespace); the number removed."""
        c = self._c()
        return sum(bool(c.delete(k)) for k in c.keys())

    def get_hostname(self):
        import socket
        return socket.gethostname()
