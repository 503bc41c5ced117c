"""kvstore as an SGLang HiCache storage backend (the L3 tier behind SGLang's host pool).

Owns: ``KVStoreHiCacheStorage``, a ``HiCacheStorage`` that SGLang loads through its
dynamic backend::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
    '{"backend_name": "kvstore", "module_path": "kvstore.client.adapters.sglang",
      "class_name": "KVStoreHiCacheStorage", "interface_v1": 1,
      "socket": "/tmp/kvstore.sock"}'

Our own options in that extra config: ``socket`` (else $KVSTORE_SOCKET, else
/tmp/kvstore.sock: kvstore.defaults.socket_path), ``namespace`` (a kvstore
namespace), ``timeout`` and ``reconnect_timeout`` (seconds, passed to the Client;
engine defaults in client/adapters/_link.py), ``extra_backend_tag`` (mixed into the keys, as SGLang's Mooncake backend does, to
keep tenants apart).

It owns the mapping from SGLang's page hashes to store keys, and the copies between
the registered host pool's pages and the store. One object per page holds the page's
bytes in the order of the host pool's own flat data page (``get_data_page(i,
flat=True)``), so the zero-copy v1 calls and the legacy get/set calls read and write
the same objects. The zero-copy path hands the Client torch views of the host pool's
page tensors (never numpy, never a staging copy), gathered on put and scattered on
read, so pinned or CUDA host pools take the Client's device path unchanged.

Keys: ``sgl/<model digest>/<shard digest>/<page hash>``. The model digest covers the
model name and the optional tag; the shard digest covers what makes a page's bytes
differ between two writers: tp rank and size (not for MLA, whose KV is the same on
every TP rank, as in SGLang's file and Mooncake backends), pp, attention-cp and dcp
rank and size, and, once the host pool is registered, its class, dtype, page size,
layout and per-token geometry. Keys written before ``register_mem_pool_host`` (the
legacy get/set with no pool) therefore live under a different shard digest than
those written after it. A page hash too long for a kvstore key is shortened by
kvstore.keys.fit_key (the prefix, then a digest of the whole key).

A store outage: SGLang starts and serves without the daemon (client/adapters/_link.py
connects in the background); pages then miss, stores report False, one WARNING per
outage, an INFO when the store is back, and ``store_down`` counts the calls it failed.

Must never: reach the store other than through kvstore.client.Client, copy a page
through numpy or an intermediate buffer, report a page it did not store or load as
done, hide a failed store or load (it is logged as a warning and reported as False /
None), log a miss or an already-stored page as a problem, or import SGLang's model
code (only ``hicache_storage``; the metrics class is imported lazily).
"""

import hashlib
import json
import logging
import threading
import time
from typing import Any, List, Optional

import torch

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageExtraInfo

from kvstore.defaults import socket_path
from kvstore.errors import KVStoreError
from kvstore.keys import fit_key

from ._link import StoreLink, options

logger = logging.getLogger(__name__)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _contiguous_pieces(t: torch.Tensor, out: list) -> list:
    """Split a strided view into contiguous views, in the order flatten() reads it."""
    if t.is_contiguous():
        out.append(t)
    elif t.dim() <= 1:
        raise ValueError("a page view has a non-contiguous innermost dimension")
    else:
        for sub in t.unbind(0):
            _contiguous_pieces(sub, out)
    return out


class KVStoreHiCacheStorage(HiCacheStorage):
    """SGLang HiCache L3 storage on a local kvstore daemon. Thread-safe (the Client is);
    SGLang calls it from its prefetch and backup threads."""

    def __init__(self, storage_config=None, kwargs: Optional[dict] = None):
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        if kwargs:
            extra.update({k: v for k, v in kwargs.items() if k not in extra})
        self.storage_config = storage_config
        self.socket = socket_path(extra.get("socket"))
        self._link = StoreLink(self.socket, str(extra.get("namespace", "")), logger=logger,
                               name="kvstore HiCache backend", **options(extra))

        cfg = storage_config
        self.is_mla = bool(getattr(cfg, "is_mla_model", False))
        self._model_digest = _digest({
            "model": getattr(cfg, "model_name", None) or "",
            "tag": extra.get("extra_backend_tag"),
        })
        shard = {
            "pp": (getattr(cfg, "pp_rank", 0), getattr(cfg, "pp_size", 1)),
            "cp": (getattr(cfg, "attn_cp_rank", 0), getattr(cfg, "attn_cp_size", 1)),
            "dcp": (getattr(cfg, "dcp_rank", 0), getattr(cfg, "dcp_size", 1)),
            "mla": self.is_mla,
        }
        if getattr(cfg, "dcp_size", 1) > 1:
            shard["logical_page"] = getattr(cfg, "logical_page_size", None)
        if not self.is_mla:
            # MHA heads are split over TP ranks: each rank's page is a different shard.
            shard["tp"] = (getattr(cfg, "tp_rank", 0), getattr(cfg, "tp_size", 1))
        self._shard_identity = shard
        self.mem_pool_host = None
        self._page_view = None          # how pages of the registered pool are cut into views
        self._set_prefix(None)

        self._lock = threading.Lock()
        self._counters = {"set_pages": 0, "existing_pages": 0, "set_failed": 0,
                          "get_pages": 0, "get_missing": 0, "get_failed": 0, "store_down": 0}
        self._prefetch_pgs, self._backup_pgs = [], []
        self._prefetch_bw, self._backup_bw = [], []
        logger.info("kvstore HiCache backend on %s, key prefix %s",
                    self.socket, self._prefix)
        self._link.start()      # an absent daemon: one WARNING, then connected in the background

    @property
    def _client(self):
        """The Client; StoreUnavailable at once while the daemon is away."""
        return self._link.client()

    def _outage(self, e) -> bool:
        """True (counted; logged once per outage by the link) if e means the store is down."""
        if not self._link.failed(e):
            return False
        with self._lock:
            self._counters["store_down"] += 1
        return True

    # ---- keys ----------------------------------------------------------------------------
    def _set_prefix(self, pool):
        identity = dict(self._shard_identity)
        if pool is not None:
            identity["pool"] = {
                "class": type(pool).__name__,
                "dtype": str(getattr(pool, "dtype", None)),
                "page_size": getattr(pool, "page_size", None),
                "layout": getattr(pool, "layout", None),
                "size_per_token": getattr(pool, "size_per_token", None),
                "format": getattr(pool, "storage_format_tag", None),
                "view": self._page_view,
                **{a: getattr(pool, a) for a in ("layer_num", "head_num", "head_dim", "v_head_dim",
                                                  "kv_lora_rank", "qk_rope_head_dim", "kv_cache_dim")
                   if isinstance(getattr(pool, a, None), int)},
            }
        self._prefix = f"sgl/{self._model_digest}/{_digest(identity)}/"

    def _key(self, key) -> str:
        if not isinstance(key, str):
            raise TypeError(f"HiCache keys are page-hash strings, not {type(key).__name__}")
        return fit_key(key, prefix=self._prefix)

    def _keys(self, keys) -> List[str]:
        return [self._key(k) for k in keys]

    # ---- the host pool -------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host):
        super().register_mem_pool_host(mem_pool_host)
        self._page_view = self._choose_page_view(mem_pool_host)
        self._set_prefix(mem_pool_host)
        logger.info("kvstore HiCache backend: host pool %s (layout %s, page size %s, pages as %s); "
                    "key prefix %s", type(mem_pool_host).__name__, getattr(mem_pool_host, "layout", None),
                    getattr(mem_pool_host, "page_size", None), self._page_view, self._prefix)

    @staticmethod
    def _pool_buffers(pool) -> List[torch.Tensor]:
        buf = getattr(pool, "kv_buffer", None)
        if buf is None:
            return []
        return list(buf) if isinstance(buf, (list, tuple)) else [buf]

    def _choose_page_view(self, pool) -> Optional[str]:
        """"data_page": the pool's get_data_page(i, flat=False) is a view of its buffer
        (the flat data page byte order); "buffer_meta": get_page_buffer_meta's regions
        (pools without flat pages, e.g. K and V of different widths); None: no buffer."""
        bufs = self._pool_buffers(pool)
        if not bufs:
            return None
        try:
            page = pool.get_data_page(0, flat=False)
            if self._inside(page, bufs):
                _contiguous_pieces(page, [])
                return "data_page"
        except (NotImplementedError, ValueError, AttributeError, RuntimeError, TypeError):
            pass
        if hasattr(pool, "get_page_buffer_meta"):
            return "buffer_meta"
        raise TypeError(f"host pool {type(pool).__name__} offers neither page views nor buffer meta")

    @staticmethod
    def _inside(t, bufs) -> bool:
        p = t.data_ptr()
        return any(b.data_ptr() <= p < b.data_ptr() + b.numel() * b.element_size() for b in bufs)

    def _page_parts(self, host_indices: torch.Tensor, n: int) -> List[List[torch.Tensor]]:
        """The host pool's memory of n pages, as a list of contiguous tensor views per page."""
        pool = self.mem_pool_host
        ps = pool.page_size
        if self._page_view == "data_page":
            starts = host_indices[::ps].tolist()
            return [_contiguous_pieces(pool.get_data_page(i, flat=False), []) for i in starts]
        ptrs, sizes = pool.get_page_buffer_meta(host_indices)
        if len(ptrs) % n:
            raise ValueError(f"{len(ptrs)} buffer regions for {n} pages")
        flats = [(b.data_ptr(), b.numel() * b.element_size(), b.reshape(-1).view(torch.uint8))
                 for b in self._pool_buffers(pool)]
        views = []
        for p, s in zip(ptrs, sizes):
            for base, nbytes, flat in flats:
                if base <= p and p + s <= base + nbytes:
                    views.append(flat[p - base:p - base + s])
                    break
            else:
                raise ValueError("a page region lies outside the host pool's buffers")
        per = len(views) // n
        return [views[i * per:(i + 1) * per] for i in range(n)]

    def _v1_prepare(self, op, keys, host_indices):
        """(store keys, per-page views) for a v1 call, or None after logging why not."""
        pool = self.mem_pool_host
        if pool is None:
            logger.warning("kvstore HiCache %s: no host pool registered (register_mem_pool_host)", op)
            return None
        if self._page_view is None:
            return None
        if len(keys) == 0:
            return [], []
        if host_indices is None or host_indices.numel() != len(keys) * pool.page_size:
            logger.warning("kvstore HiCache %s: %d keys need %d host indices (page size %d), got %s",
                           op, len(keys), len(keys) * pool.page_size, pool.page_size,
                           None if host_indices is None else host_indices.numel())
            return None
        try:
            return self._keys(keys), self._page_parts(host_indices, len(keys))
        except (ValueError, TypeError, IndexError, RuntimeError) as e:
            logger.warning("kvstore HiCache %s: cannot address the host pool's pages: %s", op, e)
            return None

    # ---- zero-copy v1 --------------------------------------------------------------------
    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        prepared = self._v1_prepare("batch_set_v1", keys, host_indices)
        if prepared is None:
            # a logical anchor pool (no buffer of its own) has nothing to store
            return [self.mem_pool_host is not None and self._page_view is None] * len(keys)
        ks, parts = prepared
        t0 = time.perf_counter()
        results, nbytes = self._put_pages(ks, parts)
        self._record(self._backup_pgs, self._backup_bw, sum(results), nbytes, time.perf_counter() - t0)
        return results

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        prepared = self._v1_prepare("batch_get_v1", keys, host_indices)
        if prepared is None:
            return [self.mem_pool_host is not None and self._page_view is None] * len(keys)
        ks, parts = prepared
        t0 = time.perf_counter()
        got = self._read_pages(ks, parts)
        results = [r is not None for r in got]
        nbytes = sum(r for r in got if r is not None)
        self._record(self._prefetch_pgs, self._prefetch_bw, sum(results), nbytes, time.perf_counter() - t0)
        return results

    # ---- the store -------------------------------------------------------------------------
    def _put_pages(self, ks, values):
        """put each value (a tensor, bytes, or a list of them); returns ([stored or
        already there], bytes written). A key already stored is a success: keys are
        page hashes, the first value stays."""
        nbytes = 0
        try:
            written = self._client.put_many(ks, values)
            results = [True] * len(ks)
        except KVStoreError as e:
            written, results = [], []
            if self._outage(e):                  # the store is down: none made it, say so once
                written, results = [False] * len(ks), [False] * len(ks)
            else:
                # find out which pages made it, one at a time, so the caller learns exactly
                logger.warning("kvstore HiCache: storing %d pages failed (%s); retrying one by one",
                               len(ks), e)
            for k, v in zip(ks, values) if not written else ():
                try:
                    w = self._client.put(k, v)
                    written.append(w)
                    results.append(True)
                except KVStoreError as e1:
                    if not self._outage(e1):
                        logger.warning("kvstore HiCache: storing %s failed: %s", k, e1)
                    written.append(False)
                    results.append(False)
        for w, v in zip(written, values):
            if w:
                nbytes += sum(_nbytes(p) for p in v) if isinstance(v, (list, tuple)) else _nbytes(v)
        with self._lock:
            self._counters["set_pages"] += sum(1 for w in written if w)
            self._counters["existing_pages"] += sum(1 for w, r in zip(written, results) if r and not w)
            self._counters["set_failed"] += results.count(False)
        return results, nbytes

    def _read_pages(self, ks, outs):
        """Read each key into its out (a tensor or a list of tensor views, filled in
        order); returns per key the bytes read, or None (missing or failed)."""
        try:
            got = self._client.read_many(ks, outs, errors="return")
        except KVStoreError as e:
            if not self._outage(e):
                logger.warning("kvstore HiCache: loading %d pages failed: %s", len(ks), e)
            with self._lock:
                self._counters["get_failed"] += len(ks)
            return [None] * len(ks)
        res, missing, failed = [], 0, 0
        for k, o, r in zip(ks, outs, got):
            if r is None:
                missing += 1                 # evicted or never stored: a miss, not a fault
                res.append(None)
            elif isinstance(r, Exception):
                logger.warning("kvstore HiCache: loading %s failed: %s", k, r)
                failed += 1
                res.append(None)
            else:
                room = sum(_nbytes(p) for p in o) if isinstance(o, (list, tuple)) else _nbytes(o)
                if r != room:
                    logger.warning("kvstore HiCache: %s holds %d bytes, the page has %d; "
                                   "not loaded (a different layout under the same key?)", k, r, room)
                    failed += 1
                    res.append(None)
                else:
                    res.append(r)
        with self._lock:
            self._counters["get_pages"] += len(ks) - missing - failed
            self._counters["get_missing"] += missing
            self._counters["get_failed"] += failed
        if missing:
            logger.debug("kvstore HiCache: %d of %d pages not in the store", missing, len(ks))
        return res

    def _record(self, pgs, bws, pages, nbytes, seconds):
        cfg = self.storage_config
        if cfg is None or not getattr(cfg, "enable_storage_metrics", False) or not pages:
            return
        with self._lock:
            pgs.append(pages)
            bws.append(nbytes / (1 << 30) / max(seconds, 1e-9))

    # ---- the generic (copying) interface ---------------------------------------------------
    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        """The page under key: read into target_location (a tensor, e.g. the host pool's
        dummy flat page) and returned, or a new uint8 tensor; None if missing or failed."""
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        if not keys:
            return []
        ks = self._keys(keys)
        if target_locations is None:
            try:
                got = self._client.read_many(ks, errors="return")
            except KVStoreError as e:
                if not self._outage(e):
                    logger.warning("kvstore HiCache: loading %d pages failed: %s", len(ks), e)
                return [None] * len(ks)
            out = []
            for k, r in zip(ks, got):
                if isinstance(r, Exception):
                    logger.warning("kvstore HiCache: loading %s failed: %s", k, r)
                    r = None
                out.append(None if r is None else torch.empty(0, dtype=torch.uint8) if not r
                           else torch.frombuffer(bytearray(r), dtype=torch.uint8))
            return out
        if len(target_locations) != len(keys):
            raise ValueError(f"batch_get got {len(keys)} keys and {len(target_locations)} targets")
        got = self._read_pages(ks, list(target_locations))
        return [t if r is not None else None for t, r in zip(target_locations, got)]

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None,
                  target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None) -> bool:
        """Store values (tensors or bytes-like, e.g. host_pool.get_data_page(i)); True if
        every key is stored now (written or already there)."""
        if not keys:
            return True
        if values is None or len(values) != len(keys):
            logger.warning("kvstore HiCache batch_set: %d keys need %d values (addresses alone are not "
                           "accepted; pass tensors), got %s", len(keys), len(keys),
                           None if values is None else len(values))
            return False
        results, nbytes = self._put_pages(self._keys(keys), [_whole(v) for v in values])
        return all(results)

    def exists(self, key: str) -> bool:
        try:
            return self._client.contains(self._key(key))
        except KVStoreError as e:
            if not self._outage(e):
                logger.warning("kvstore HiCache: exists(%s) failed: %s", key, e)
            return False

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """How many keys from the start are all stored (SGLang loads a prefix)."""
        try:
            ks = self._keys(keys)
            for i, k in enumerate(ks):
                if not self._client.contains(k):
                    return i
            return len(ks)
        except KVStoreError as e:
            if not self._outage(e):
                logger.warning("kvstore HiCache: batch_exists of %d keys failed: %s", len(keys), e)
            return 0

    def clear(self) -> bool:
        """Delete this backend's pages (this model and shard, current key prefix); other
        models' and other ranks' pages stay."""
        prefix = self._prefix.encode()
        try:
            mine = [k for k in self._client.keys() if k.startswith(prefix)]
            n = sum(1 for k in mine if self._client.delete(k))
        except KVStoreError as e:
            if not self._outage(e):
                logger.warning("kvstore HiCache: clear failed: %s", e)
            return False
        logger.info("kvstore HiCache: cleared %d pages under %s", n, self._prefix)
        return True

    def get_stats(self):
        """SGLang's StorageMetrics (drained, as SGLang's own backends do), with the
        counters since start as ``kvstore_counters``; None if SGLang's metrics module
        cannot be imported here."""
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except Exception:          # noqa: BLE001  (metrics are optional; the caller substitutes)
            return None
        m = StorageMetrics()
        with self._lock:
            m.prefetch_pgs.extend(self._prefetch_pgs)
            m.backup_pgs.extend(self._backup_pgs)
            m.prefetch_bandwidth.extend(self._prefetch_bw)
            m.backup_bandwidth.extend(self._backup_bw)
            for lst in (self._prefetch_pgs, self._backup_pgs, self._prefetch_bw, self._backup_bw):
                lst.clear()
            m.kvstore_counters = dict(self._counters)
        return m

    @property
    def counters(self) -> dict:
        with self._lock:
            return dict(self._counters)

    def close(self):
        self._link.close()


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    return memoryview(v).nbytes


def _whole(v):
    """A legacy value as the Client takes it: a torch tensor as is if contiguous (its
    own path, CPU or CUDA), else its contiguous pieces in flatten() order."""
    if isinstance(v, torch.Tensor) and not v.is_contiguous():
        return _contiguous_pieces(v, [])
    return v
