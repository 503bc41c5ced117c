"""LMCache remote-storage plugin backed by the local kvstore daemon.

Owns: ``KVStoreConnector``, a subclass of LMCache's ``RemoteConnector`` that LMCache
loads as a remote-storage plugin::

    remote_storage_plugins: ["kvstore"]
    extra_config:
      remote_storage_plugin.kvstore.module_path: kvstore.client.adapters.lmcache
      remote_storage_plugin.kvstore.class_name: KVStoreConnector
      kvstore.socket: /tmp/kvstore.sock      # default: $KVSTORE_SOCKET, else /tmp/kvstore.sock
      kvstore.namespace: lmcache             # default "lmcache"
      kvstore.timeout: 5.0                   # seconds for one exchange with the daemon
      kvstore.reconnect_timeout: 1.0         # seconds a call waits, once per outage, for a daemon that went away
      kvstore.get_timeout: 5.0               # seconds to wait for a chunk another client is writing

LMCache calls ``KVStoreConnector(loop=, local_cpu_backend=, config=)`` and uses the URL
``plugin://kvstore``. It also owns the layout of what it stores: one kvstore object per
``CacheEngineKey.to_string()`` (the string names the model, world size, worker id,
chunk hash, kv dtype and, for layer-wise keys, the layer), holding a small header
(shapes, dtypes, memory format, byte count) padded to 64 bytes, then the chunk's raw
bytes. A key longer than kvstore allows is stored under kvstore.keys.fit_key's
shortened form (``#sha256:`` and a digest of the key string); its header keeps the
full key string, so ``list()`` can still name it. A get reads the header first,
allocates a MemoryObj of that shape from the local CPU backend and copies the bytes
straight into its tensor (checksum-verified by the Client), so no intermediate buffer
is made.

Must never: call ``memory_obj.ref_count_down()`` on a put (LMCache's
InstrumentedRemoteConnector already does: a second call double-frees), keep or hand
out a view of the segment (every copy goes through Client.put/read with torch tensors,
so the GPU path of client/device_copy.py serves device tensors), reach the store other
than through kvstore.client.Client, or report a miss or an existing key as an error.
A failed read is returned as None (LMCache's way) and logged as a warning; a failed
write raises (LMCache logs it and counts it) and is logged as a warning here too.

A store outage: the plugin is built and LMCache serves without the daemon
(client/adapters/_link.py connects in the background). While the store is down,
lookups and reads miss, writes are skipped (not raised: LMCache would log an ERROR per
chunk), ``ping`` reports 1; one WARNING per outage, an INFO when the store is back,
and ``counters["store_down"]`` counts the calls it answered that way.
"""

import asyncio
import json
import logging
import struct
from typing import List, Optional

import torch

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryFormat, MemoryObj
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from kvstore.defaults import DEFAULT_SOCKET, socket_path  # noqa: F401  (DEFAULT_SOCKET: old callers)
from kvstore.errors import KVStoreError
from kvstore.keys import DIGEST_MARK, fit_key

from ._link import StoreLink, options

log = logging.getLogger("kvstore.adapters.lmcache")

DEFAULT_NAMESPACE = "lmcache"
#: Header: magic, layout version, JSON length; the JSON follows, then zero padding
#: up to a multiple of HEADER_ALIGN so the chunk's bytes start aligned in the segment.
_MAGIC = b"KVLC"
_VERSION = 1
_PREFIX = struct.Struct("<4sHI")
HEADER_ALIGN = 64
#: How a shortened key starts (fit_key with no prefix): list() reads such a key's
#: name from its header.
_DIGESTED = DIGEST_MARK.encode()


class KVStoreConnector(RemoteConnector):
    """LMCache RemoteConnector storing chunks in the local kvstore daemon."""

    def __init__(self, loop, local_cpu_backend, config=None):
        extra = (getattr(config, "extra_config", None) or {}) if config is not None else {}
        meta = getattr(local_cpu_backend, "metadata", None)
        if meta is not None:
            # the base class only derives full-chunk sizes from the metadata (used by
            # reshape_partial_chunk); the scheduler role has no metadata and needs none
            super().__init__(getattr(local_cpu_backend, "config", None) or config, meta)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.socket_path = str(socket_path(extra.get("kvstore.socket")))
        self.namespace = str(extra.get("kvstore.namespace", DEFAULT_NAMESPACE))
        self.get_timeout = float(extra.get("kvstore.get_timeout", 5.0))
        self._link = StoreLink(self.socket_path, self.namespace, logger=log,
                               name="kvstore LMCache connector", **options(extra, "kvstore."))
        self.counters = {"store_down": 0}
        log.info("kvstore LMCache connector on %s (namespace %r)", self.socket_path, self.namespace)
        self._link.start()      # an absent daemon: one WARNING, then connected in the background

    @property
    def client(self):
        """The Client; StoreUnavailable at once while the daemon is away."""
        return self._link.client()

    def _outage(self, e) -> bool:
        """True (counted; logged once per outage by the link) if e means the store is down."""
        if not self._link.failed(e):
            return False
        self.counters["store_down"] += 1
        return True

    def __repr__(self):
        return f"<KVStoreConnector {self.socket_path} ns={self.namespace!r}>"

    # ---- keys and headers --------------------------------------------------------------
    @staticmethod
    def _key(key) -> bytes:
        return fit_key(key.to_string().encode())

    @staticmethod
    def _header(key, memory_obj, nbytes) -> bytes:
        body = json.dumps({
            "key": key.to_string(),
            "nbytes": nbytes,
            "fmt": memory_obj.get_memory_format().name,
            "shapes": [list(s) for s in memory_obj.get_shapes()],
            "dtypes": [str(d).replace("torch.", "") for d in memory_obj.get_dtypes()],
        }, separators=(",", ":")).encode()
        raw = _PREFIX.pack(_MAGIC, _VERSION, len(body)) + body
        return raw + bytes(-len(raw) % HEADER_ALIGN)

    @staticmethod
    def _parse_header(view):
        """(header length, fields) of a stored object; ValueError if it is not ours."""
        if view.nbytes < _PREFIX.size:
            raise ValueError(f"object of {view.nbytes} bytes is too short for a header")
        magic, version, n = _PREFIX.unpack(bytes(view[:_PREFIX.size]))
        if magic != _MAGIC or version != _VERSION:
            raise ValueError(f"not an LMCache chunk of layout {_VERSION} (magic {magic!r}, version {version})")
        end = _PREFIX.size + n
        hlen = end + (-end % HEADER_ALIGN)
        if hlen > view.nbytes:
            raise ValueError("header runs past the object's end")
        h = json.loads(bytes(view[_PREFIX.size:end]))
        dtypes = []
        for d in h["dtypes"]:
            dt = getattr(torch, d, None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"unknown dtype {d!r}")
            dtypes.append(dt)
        h["dtypes"] = dtypes
        h["shapes"] = [torch.Size(s) for s in h["shapes"]]
        h["fmt"] = MemoryFormat[h["fmt"]]
        if hlen + h["nbytes"] != view.nbytes:
            raise ValueError(f"object has {view.nbytes} bytes, header says {hlen} + {h['nbytes']}")
        return hlen, h

    @staticmethod
    def _data(memory_obj, nbytes):
        """The chunk's bytes as a flat uint8 tensor (no copy), or bytes-like for memory
        objects without a tensor."""
        raw = memory_obj.raw_tensor
        if raw is None:
            return memory_obj.byte_array
        return raw.reshape(-1).view(torch.uint8)[:nbytes]

    # ---- lookups -------------------------------------------------------------------------
    async def exists(self, key: CacheEngineKey) -> bool:
        return self.exists_sync(key)     # ~1 us, no round trip: no thread

    def exists_sync(self, key: CacheEngineKey) -> bool:
        try:
            return self.client.contains(self._key(key))
        except KVStoreError as e:
            if not self._outage(e):
                raise
            return False

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: List[CacheEngineKey]) -> int:
        try:
            client = self.client
            for i, k in enumerate(keys):
                if not client.contains(self._key(k)):
                    return i
        except KVStoreError as e:
            if not self._outage(e):
                raise
            return 0
        return len(keys)

    async def batched_async_contains(self, lookup_id: str, keys: List[CacheEngineKey], pin: bool = False) -> int:
        # pin is LMCache's lookup pin; kvstore holds are taken by the get itself
        return self.batched_contains(keys)

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        try:
            await asyncio.to_thread(self.client.stats)
            return 0
        except KVStoreError as e:
            if not self._outage(e):
                log.warning("kvstore ping failed: %s", e)
            return 1

    async def list(self) -> List[str]:
        return await asyncio.to_thread(self._list_sync)

    def _list_sync(self):
        out = []
        try:
            keys = self.client.keys()
        except KVStoreError as e:
            if not self._outage(e):
                raise
            return out
        for k in keys:
            if not k.startswith(_DIGESTED):
                out.append(k.decode(errors="replace"))
                continue
            v = self.client.get(k, timeout=0)
            if v is None:
                continue
            try:
                out.append(self._parse_header(v)[1]["key"])
            except ValueError:
                pass
            finally:
                self.client.release(k)
        return out

    def remove_sync(self, key: CacheEngineKey) -> bool:
        try:
            return self.client.delete(self._key(key))
        except KVStoreError as e:
            if not self._outage(e):
                raise
            return False

    # ---- writes --------------------------------------------------------------------------
    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj):
        # LMCache's wrapper drops the reference after this returns: not us.
        await asyncio.to_thread(self._put_many, [key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: List[CacheEngineKey], memory_objs: List[MemoryObj]):
        await asyncio.to_thread(self._put_many, list(keys), list(memory_objs))

    def _put_many(self, keys, memory_objs):
        if len(keys) != len(memory_objs):
            raise ValueError(f"batched_put got {len(keys)} keys and {len(memory_objs)} memory objects")
        ks, values = [], []
        try:
            client = self.client
        except KVStoreError as e:
            if self._outage(e):
                return                       # the store is down: skipped, said once per outage
            raise
        for key, obj in zip(keys, memory_objs):
            k = self._key(key)
            try:
                if client.contains(k):       # content-addressed: the first value stands
                    continue
            except KVStoreError as e:
                if self._outage(e):
                    return
                raise
            n = obj.get_size()
            ks.append(k)
            values.append([self._header(key, obj, n), self._data(obj, n)])   # stored as one object
        if not ks:
            return
        try:
            client.put_many(ks, values)           # an existing key is False, not an error
        except KVStoreError as e:
            if self._outage(e):
                return
            log.warning("kvstore: saving %d LMCache chunk(s) failed: %s", len(ks), e)
            raise

    # ---- reads ---------------------------------------------------------------------------
    async def get(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        return (await asyncio.to_thread(self._get_many, [key]))[0]

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: List[CacheEngineKey]) -> List[Optional[MemoryObj]]:
        return await asyncio.to_thread(self._get_many, list(keys))

    async def batched_get_non_blocking(self, lookup_id: str, keys: List[CacheEngineKey]) -> List[MemoryObj]:
        got = await asyncio.to_thread(self._get_many, list(keys))
        prefix = []
        for obj in got:
            if obj is None:
                break
            prefix.append(obj)
        for obj in got[len(prefix):]:     # LMCache wants the hit prefix only: free the rest
            if obj is not None:
                obj.ref_count_down()
        return prefix

    def _get_many(self, keys):
        """MemoryObjs (or None) for keys: hold each object while its header is read and
        its MemoryObj allocated, then one verified read_many into the MemoryObjs."""
        ks = [self._key(k) for k in keys]
        out: List[Optional[MemoryObj]] = [None] * len(ks)
        try:
            client = self.client
            views = client.get_many(ks, timeout=self.get_timeout)
        except KVStoreError as e:
            if not self._outage(e):
                log.warning("kvstore: loading %d LMCache chunk(s) failed: %s", len(ks), e)
            return out
        held = [k for k, v in zip(ks, views) if v is not None]
        try:
            todo, outs = [], []
            for i, v in enumerate(views):
                if v is None:
                    continue                       # a miss: expected, not logged
                try:
                    hlen, h = self._parse_header(v)
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("kvstore: %r does not hold a readable LMCache chunk (%s); treating it as a miss",
                                keys[i].to_string(), e)
                    continue
                obj = self.local_cpu_backend.allocate(h["shapes"], h["dtypes"], h["fmt"], busy_loop=False)
                if obj is None:
                    log.warning("kvstore: no local CPU memory for LMCache chunk %r; not loaded",
                                keys[i].to_string())
                    continue
                if obj.get_size() != h["nbytes"]:
                    log.warning("kvstore: LMCache chunk %r: allocated %d bytes for a %d-byte chunk; not loaded",
                                keys[i].to_string(), obj.get_size(), h["nbytes"])
                    obj.ref_count_down()
                    continue
                out[i] = obj
                hdr = bytearray(hlen)
                todo.append((i, hdr, bytes(v[:hlen])))
                outs.append([hdr, self._data(obj, h["nbytes"])])   # scatter: header, then chunk
            if todo:
                try:
                    got = client.read_many([ks[i] for i, _, _ in todo], outs, errors="return")
                except KVStoreError as e:
                    got = [e] * len(todo)
                for (i, hdr, peeked), r in zip(todo, got):
                    why = None
                    if isinstance(r, Exception):
                        why = f"{type(r).__name__}: {r}"
                    elif r is None:
                        why = "it vanished while held"       # cannot happen while held
                    elif bytes(hdr) != peeked:
                        why = "its header changed during the read"
                    if why is not None:
                        log.warning("kvstore: reading LMCache chunk %r failed (%s); not loaded",
                                    keys[i].to_string(), why)
                        out[i].ref_count_down()
                        out[i] = None
        except BaseException:
            for o in out:
                if o is not None:
                    o.ref_count_down()
            raise
        finally:
            if held:
                try:
                    client.release_many(held)
                except KVStoreError as e:     # the daemon went away meanwhile: its holds went too
                    if not self._outage(e):
                        raise
        return out

    async def close(self):
        self._link.close()
