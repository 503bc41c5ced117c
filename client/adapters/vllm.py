"""vLLM KV connector (v1) backed by the local kvstore daemon.

Load it with::

    --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.client.adapters.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"socket": "/run/kv.sock", "namespace": "",
                                      "timeout": 5.0, "reconnect_timeout": 1.0}}'

(``socket`` defaults to $KVSTORE_SOCKET, else /tmp/kvstore.sock; ``timeout`` and
``reconnect_timeout`` are the Client's, with the engine defaults of client/adapters/_link.py.)

Owns: vLLM's ``KVConnectorBase_V1`` interface for a prefix cache shared by every engine
on the host. The scheduler side looks prefixes up (``get_num_new_matched_tokens``) and
plans per-step loads and saves (``build_connector_meta``); the worker side copies FULL
blocks between its registered KV cache tensors and the store, one object per
(block, layer), with ``Client.put_many`` / ``read_many`` on torch tensors (so CUDA
caches take the pinned, non-blocking path of client/device_copy.py; CPU caches the
same code).

Keys: ``vllm/<identity>/<block hash>/<rank>/<layer>``, where the block hash is vLLM's
chained ``request.block_hashes`` entry of the block's last token (identical across
processes with the default sha256 prefix hashing) and ``identity`` digests what makes
bytes interchangeable: model, revision, model dtype, cache dtype, block size, KV spec
(heads, head size, dtype, class) and TP/PP world sizes. A key longer than kvstore
allows (a very long layer name) is shortened by kvstore.keys.fit_key: everything up
to the layer name stays, then a digest of the whole key. Each worker writes its own
rank's objects; a block's objects are stored in vLLM's logical per-layer order
``[H, N, C]`` (``cache[block]``), whatever the physical layout, so layouts that differ
only in strides share objects. After every layer of a block is stored,
``wait_for_save`` writes a per-block completion marker; the scheduler counts a block
as a hit only if the markers of all ranks exist, so a half-saved block (a crash, or a
save still running in another engine) is never reported.

Hits: only full blocks, and never the whole request: at least one token is left for
vLLM to compute (it needs logits for the next token), as vLLM's own connectors do.
Loads are synchronous: start_load_kv copies every planned block before the forward.
A block that cannot be loaded (evicted or deleted since the lookup, checksum mismatch,
wrong size) is logged as a warning and returned by ``get_block_ids_with_load_errors``
so vLLM recomputes it (``kv_load_failure_policy``); failed loads are counted in the
connector's stats (``get_kv_connector_stats``: vLLM logs them as "KV Transfer metrics").

A store outage: the engine starts and serves without the daemon (client/adapters/_link.py
connects in the background): lookups miss, loads in flight are reported as load errors,
saves are skipped; one WARNING per outage, an INFO when the store is back, and the
``lookups_missed_store_down`` / ``blocks_save_skipped`` counters in the stats.
Must never: report a block whose layers are not all stored, claim all of a request's
tokens, hide a failed load, reach the store other than through kvstore's Client, or
crash the engine on a store outage (a lookup then misses, a save is skipped, both
with a warning).
"""

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvstore.defaults import socket_path
from kvstore.errors import ConfigError, KVStoreError
from kvstore.keys import fit_key

from ._link import StoreLink, options

log = logging.getLogger("kvstore.adapters.vllm")

#: Bytes of the per-block completion marker (its presence is what counts).
_MARKER = b"kvstore-vllm-block-complete"


class KVStoreConfigError(ValueError):
    """The connector cannot serve this vLLM configuration (bad extra config, or an
    unsupported KV cache structure)."""


#: What the connector counts (per stats interval; summed over workers by vLLM).
_STAT_FIELDS = ("lookups_missed_store_down", "blocks_loaded", "blocks_load_failed", "blocks_saved",
                "blocks_save_skipped", "store_outages")


@dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """Counters of one interval: blocks loaded and failed to load (vLLM recomputed
    them), blocks saved and skipped, lookups answered as misses because the store was
    down, outages begun. vLLM sums them over workers and logs them."""

    def __post_init__(self):
        for f in _STAT_FIELDS:
            self.data.setdefault(f, 0)

    def reset(self):
        self.data = {f: 0 for f in _STAT_FIELDS}

    def aggregate(self, other):
        for k, v in (other.data if other is not None else {}).items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self):
        return dict(self.data)

    def is_empty(self):
        return not any(self.data.values())


@dataclass
class _Load:
    req_id: str
    block_id: int
    block_hash: str


@dataclass
class _Save:
    block_id: int
    block_hash: str


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker plan for one step: blocks to load before the forward and
    full blocks to save after it."""
    loads: list = field(default_factory=list)   # [_Load]
    saves: list = field(default_factory=list)   # [_Save]


@dataclass
class _ReqState:
    """Scheduler-side bookkeeping of one live request."""
    request: Any
    block_ids: list = field(default_factory=list)
    saved_upto: int = 0                          # blocks [0, saved_upto) planned for save
    lookup: tuple = (0, 0)                       # (first block looked up, blocks hit)
    load: list = field(default_factory=list)     # [_Load] planned by update_state_after_alloc


def _hash_hex(h):
    if isinstance(h, (bytes, bytearray)):
        return bytes(h).hex()
    return str(h)


def _identity(vllm_config, kv_cache_config):
    """A short digest of everything that must match for two engines to share blocks."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
    specs = []
    for g in groups:
        s = g.kv_cache_spec
        specs.append({"cls": type(s).__name__,
                      **{k: str(getattr(s, k)) for k in ("block_size", "num_kv_heads", "head_size",
                                                          "head_size_v", "dtype", "kv_quant_mode",
                                                          "sliding_window", "page_size_bytes")
                         if hasattr(s, k)}})
    ident = {
        "model": str(mc.model), "revision": str(getattr(mc, "revision", None)),
        "dtype": str(mc.dtype), "cache_dtype": str(cc.cache_dtype), "block_size": cc.block_size,
        "tp": pc.tensor_parallel_size, "pp": pc.pipeline_parallel_size,
        "dcp": getattr(pc, "decode_context_parallel_size", 1), "specs": specs,
    }
    blob = json.dumps(ident, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _worker_rank():
    """(tp rank, pp rank) of this worker; (0, 0) when vLLM's groups are not set up
    (a single-process engine or a test)."""
    try:
        from vllm.distributed import parallel_state as ps
        return ps.get_tensor_model_parallel_rank(), ps.get_pp_group().rank_in_group
    except Exception:   # groups not initialised: one worker
        return 0, 0


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM KV connector that shares full KV blocks through a kvstore daemon."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._socket = socket_path() if extra.get("socket") is None else extra["socket"]
        if not isinstance(self._socket, str) or not self._socket:
            raise KVStoreConfigError("kv_connector_extra_config['socket'] must be the daemon's socket path")
        self._namespace = str(extra.get("namespace", ""))
        try:
            opts = options(extra)
        except ConfigError as e:
            raise KVStoreConfigError(f"kv_connector_extra_config: {e}") from None
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) > 1:
            raise KVStoreConfigError(
                f"KVStoreConnector supports one KV cache group (full attention); this model has "
                f"{len(kv_cache_config.kv_cache_groups)} (hybrid). Start vLLM with "
                f"--disable-hybrid-kv-cache-manager or without this connector")
        self._block_size = vllm_config.cache_config.block_size
        hash_bs = getattr(kv_cache_config, "hash_block_size", None) or self._block_size
        if self._block_size % hash_bs:
            raise KVStoreConfigError(f"block size {self._block_size} is not a multiple of the hash "
                                     f"block size {hash_bs}")
        self._hashes_per_block = self._block_size // hash_bs
        self._ident = _identity(vllm_config, kv_cache_config)
        pc = vllm_config.parallel_config
        self._ranks = [(t, p) for t in range(pc.tensor_parallel_size) for p in range(pc.pipeline_parallel_size)]
        self._link = StoreLink(self._socket, self._namespace, logger=log,
                               name="kvstore vLLM connector", **opts)
        self._stats = dict.fromkeys(_STAT_FIELDS, 0)
        self._stats_lock = threading.Lock()
        self._outages_reported = 0
        if role == KVConnectorRole.SCHEDULER:
            self._link.start()      # the worker connects in register_kv_caches
        # scheduler side
        self._reqs = {}                 # req_id -> _ReqState
        # worker side
        self._rank = _worker_rank()
        self._layers = {}               # layer name -> per-block view [num_blocks, ...]
        self._num_blocks = getattr(kv_cache_config, "num_blocks", None)
        self._pending_saves = {}        # block hash -> (block_id, {layer: ok})
        self._load_errors = set()

    # ---- store access ------------------------------------------------------------------
    def _store(self):
        """The Client; StoreUnavailable at once while the daemon is away (the link
        connects in the background; the daemon may start after vLLM)."""
        return self._link.client()

    def _count(self, field, n=1):
        with self._stats_lock:
            self._stats[field] += n

    def get_kv_connector_stats(self):
        """This interval's counters (then zeroed), or None when nothing happened."""
        with self._stats_lock:
            outages = self._link.outages
            self._stats["store_outages"] += outages - self._outages_reported
            self._outages_reported = outages
            if not any(self._stats.values()):
                return None
            data, self._stats = self._stats, dict.fromkeys(_STAT_FIELDS, 0)
        return KVStoreConnectorStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return KVStoreConnectorStats(data=dict(data) if data else {})

    def _marker_key(self, block_hash, rank):
        return f"vllm/{self._ident}/{block_hash}/t{rank[0]}p{rank[1]}/done"

    def _layer_key(self, block_hash, layer):
        r = self._rank
        return fit_key(layer, prefix=f"vllm/{self._ident}/{block_hash}/t{r[0]}p{r[1]}/")

    def _block_hash(self, request, i):
        """Hash key of manager block i of the request (None if the block is not full)."""
        j = (i + 1) * self._hashes_per_block - 1
        hashes = request.block_hashes
        return _hash_hex(hashes[j]) if j < len(hashes) else None

    @property
    def requires_kv_delivery(self):
        # A best-effort cache: a save dropped by preemption is just a future miss.
        return False

    # ==== scheduler side ==================================================================
    def on_new_request(self, request):
        self._reqs.setdefault(request.request_id, _ReqState(request))

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        st = self._reqs.setdefault(request.request_id, _ReqState(request))
        st.request = request
        bs = self._block_size
        start = num_computed_tokens // bs
        # Full blocks only, and leave at least one token to compute: vLLM must run the
        # last prompt token to sample the next one.
        limit = max(0, (request.num_tokens - 1) // bs)
        end = start
        try:
            client = self._store()
            while end < limit:
                h = self._block_hash(request, end)
                if h is None or not all(client.contains(self._marker_key(h, r)) for r in self._ranks):
                    break
                end += 1
        except KVStoreError as e:
            if self._link.failed(e):        # the store is down: logged once per outage
                self._count("lookups_missed_store_down")
            else:
                log.warning("kvstore lookup for request %s failed (%s); treating it as a miss",
                            request.request_id, e)
            end = start
        st.lookup = (start, end)
        hit = (end - start) * bs
        if hit:
            log.debug("request %s: %d external tokens (blocks %d..%d) in kvstore",
                      request.request_id, hit, start, end)
        return hit, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        st = self._reqs.setdefault(request.request_id, _ReqState(request))
        st.load = []
        if num_external_tokens <= 0:
            return
        start, end = st.lookup
        n = -(-num_external_tokens // self._block_size)
        if start + n > end:
            # more than the lookup found (vLLM only ever lowers it): plan the loads
            # anyway, so the blocks the store cannot supply are reported as load
            # errors and recomputed rather than used unfilled
            log.warning("request %s: vLLM expects %d external tokens, the lookup found %d",
                        request.request_id, num_external_tokens, (end - start) * self._block_size)
        block_ids = blocks.get_block_ids()[0]
        st.load = [_Load(request.request_id, block_ids[i], self._block_hash(request, i) or "partial-block")
                   for i in range(start, start + n)]

    def build_connector_meta(self, scheduler_output):
        meta = KVStoreConnectorMetadata()
        sched = scheduler_output.num_scheduled_tokens
        progress = []    # (state, computed tokens once this step ran)
        for nr in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(nr.req_id)
            if st is None:
                continue
            st.block_ids = list(nr.block_ids[0])
            progress.append((st, nr.num_computed_tokens + sched.get(nr.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new[0]) if new is not None else []
            elif new is not None:
                st.block_ids.extend(new[0])
            progress.append((st, cached.num_computed_tokens[i] + sched.get(req_id, 0)))
        for st, done_tokens in progress:
            meta.loads.extend(st.load)
            loaded = {ld.block_id for ld in st.load}
            st.load = []
            full = min(done_tokens // self._block_size, len(st.block_ids))
            for i in range(st.saved_upto, full):
                h = self._block_hash(st.request, i)
                if h is None:
                    full = i
                    break
                if st.block_ids[i] not in loaded:
                    meta.saves.append(_Save(st.block_ids[i], h))
            st.saved_upto = max(st.saved_upto, full)
        return meta

    def request_finished(self, request, block_ids):
        self._reqs.pop(request.request_id, None)
        return False, None

    # ==== worker side =====================================================================
    def register_kv_caches(self, kv_caches):
        """Remember each layer's cache as a per-block view. vLLM gives every layer a
        logical [B, H, N, C] view whatever the physical layout (B is dim 0); with
        kernel-block splitting B is num_blocks * ratio, grouped back here."""
        self._layers = {}
        for name, cache in kv_caches.items():
            if not isinstance(cache, torch.Tensor) or cache.dim() < 2:
                raise KVStoreConfigError(f"layer {name}: expected a KV cache tensor with a block dim, "
                                         f"got {type(cache).__name__}")
            n = self._num_blocks or cache.shape[0]
            if cache.shape[0] != n:
                if cache.shape[0] % n:
                    raise KVStoreConfigError(f"layer {name}: {cache.shape[0]} cache blocks do not split "
                                             f"into {n} manager blocks")
                cache = cache.unflatten(0, (n, -1))
            self._layers[name] = cache
        self._link.start()   # connect now; a missing daemon: one WARNING, then in the background

    def start_load_kv(self, forward_context, **kwargs):
        """Copy every planned block into the registered caches (synchronously, so
        wait_for_layer_load has nothing to wait for)."""
        meta = self._connector_metadata
        self._pending_saves = {}
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.loads:
            return
        keys, outs, where = [], [], []
        staged = []     # (staging tensor, destination view) for non-contiguous slices
        for ld in meta.loads:
            for name, cache in self._layers.items():
                dst = cache[ld.block_id]
                if not dst.is_contiguous():
                    tmp = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
                    staged.append((len(keys), tmp, dst))
                    dst = tmp
                keys.append(self._layer_key(ld.block_hash, name))
                outs.append(dst)
                where.append(ld)
        outage = False
        try:
            got = self._store().read_many(keys, outs, errors="return")
        except KVStoreError as e:
            outage = self._link.failed(e)
            got = [e] * len(keys)
        failed = {}
        for key, out, ld, res in zip(keys, outs, where, got):
            want = out.numel() * out.element_size()
            if res is None:
                failed.setdefault(ld.block_id, (ld, f"{key} is no longer in the store"))
            elif isinstance(res, Exception):
                failed.setdefault(ld.block_id, (ld, f"{key}: {type(res).__name__}: {res}"))
            elif res != want:
                failed.setdefault(ld.block_id, (ld, f"{key} holds {res} bytes, the cache block {want}"))
        for i, tmp, dst in staged:
            if where[i].block_id not in failed:
                dst.copy_(tmp)
        if failed:
            # counted in the stats; one line per call (an outage was logged by the link)
            first = next(iter(failed.values()))
            log.log(logging.DEBUG if outage else logging.WARNING,
                    "kvstore: loading %d block(s) failed (block %d of request %s: %s); reported to "
                    "vLLM as load errors, it recomputes them", len(failed), first[0].block_id,
                    first[0].req_id, first[1])
        self._count("blocks_load_failed", len(failed))
        self._count("blocks_loaded", len({ld.block_id for ld in meta.loads} - set(failed)))
        self._load_errors.update(failed)

    def wait_for_layer_load(self, layer_name):
        return      # start_load_kv loaded every layer already

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        """Store this layer's slice of every full block planned for saving."""
        meta = self._connector_metadata
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.saves:
            return
        cache = self._layers.get(layer_name)
        if cache is None:
            # a layer vLLM did not register (e.g. one sharing another's cache): the
            # block can never be complete for this worker's layer set
            log.warning("kvstore: save of unregistered layer %s skipped", layer_name)
            return
        try:
            client = self._store()
        except KVStoreError as e:
            self._link.failed(e)
            client = None
        todo = []
        for sv in meta.saves:
            pend = self._pending_saves.get(sv.block_hash)
            if pend is None:
                pend = self._pending_saves[sv.block_hash] = (sv.block_id, {}, [False])
                try:
                    if client is not None:
                        pend[2][0] = client.contains(self._marker_key(sv.block_hash, self._rank))
                except KVStoreError as e:
                    self._link.failed(e)
            if not pend[2][0]:      # not stored completely yet
                todo.append(sv)
        if not todo:
            return
        if client is None:                      # the store is down: skipped (no copies made)
            for sv in todo:
                self._pending_saves[sv.block_hash][1][layer_name] = False
            return
        keys = [self._layer_key(sv.block_hash, layer_name) for sv in todo]
        values = []
        for sv in todo:
            src = cache[sv.block_id]
            values.append(src if src.is_contiguous() else src.contiguous())
        try:
            client.put_many(keys, values)       # False = already there: content-addressed, fine
            ok = [True] * len(todo)
        except KVStoreError as e:
            if not self._link.failed(e):
                log.warning("kvstore: saving layer %s of %d blocks failed (%s); those blocks stay "
                            "uncached", layer_name, len(todo), e)
            ok = [False] * len(todo)
        for sv, good in zip(todo, ok):
            self._pending_saves[sv.block_hash][1][layer_name] = good

    def wait_for_save(self):
        """Mark each block whose every layer is stored: only then does it count as a hit."""
        pending, self._pending_saves = self._pending_saves, {}
        if not pending:
            return
        try:
            client = self._store()
        except KVStoreError as e:
            self._link.failed(e)
            self._count("blocks_save_skipped", sum(1 for p in pending.values() if not p[2][0]))
            return
        layers = list(self._layers)
        for block_hash, (block_id, done, complete) in pending.items():
            if complete[0]:
                continue
            if not all(done.get(name) for name in layers):
                self._count("blocks_save_skipped")
                if not self._link.down:         # during an outage the link has said it once
                    log.warning("kvstore: block %d (%s) was not stored for every layer; no marker "
                                "written", block_id, block_hash[:16])
                continue
            try:
                # a layer put that found its key "already there" may have found another
                # writer's unsealed object: check every layer is sealed before marking
                if not all(client.contains(self._layer_key(block_hash, n)) for n in layers):
                    log.warning("kvstore: block %d (%s) lost a layer before completion; not marked",
                                block_id, block_hash[:16])
                    self._count("blocks_save_skipped")
                    continue
                client.put(self._marker_key(block_hash, self._rank), _MARKER)
                self._count("blocks_saved")
            except KVStoreError as e:
                self._count("blocks_save_skipped")
                if not self._link.failed(e):
                    log.warning("kvstore: marking block %d complete failed (%s)", block_id, e)

    def get_block_ids_with_load_errors(self):
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self):
        self._link.close()
