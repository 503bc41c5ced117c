"""The SGLang HiCache backend against a real daemon and SGLang's own classes (CPU).

Loading goes through SGLang's StorageBackendFactory ("dynamic" backend, the path
--hicache-storage-backend dynamic takes); the zero-copy v1 calls run over real SGLang
host pools (MHATokenToKVPoolHost / MLATokenToKVPoolHost built from a real CPU device
pool, in each layout they offer); a second process reads through its own backend.

SGLang 0.5.23 pins torch 2.14.1, and its pool modules import torchvision (through
sglang.srt.configs); the sglang tox environment installs torch 2.14.1 with torchvision
0.29.1 (CUDA builds from this machine's disk that run on the CPU) and the packages the
pools import (transformers, sentencepiece, dill, gguf, compressed-tensors,
apache-tvm-ffi). Nothing is stubbed.
"""

import hashlib
import logging
import signal
import time

import pytest

import torch  # noqa: E402  (this file runs in its engine's tox environment: tox -e <engine>)
import sglang  # noqa: E402,F401

from conftest import run_py, wait_for  # noqa: E402

from kvstore.errors import ConfigError  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

from kvstore.client.adapters.sglang import KVStoreHiCacheStorage  # noqa: E402

MODULE = "kvstore.client.adapters.sglang"

# Run in this process and in the second one: makes SGLang's pool modules importable.
_POOL_IMPORT_SRC = r'''
def _import_pools():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "Only CUDA ... supports AWQ/GGUF" on import
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
    return MHATokenToKVPool, MLATokenToKVPool, MHATokenToKVPoolHost, MLATokenToKVPoolHost


def make_host_pool(kind, layout, page_size=4, layers=3):
    import torch
    MHA, MLA, MHAHost, MLAHost = _import_pools()
    if kind == "mha-asym":   # K and V of different widths: no flat pages, only buffer meta
        from sglang.srt.mem_cache.pool_host.mha import get_mha_host_pool_cls
        dev = MHA(size=64, page_size=page_size, dtype=torch.bfloat16, head_num=2, head_dim=8,
                  v_head_dim=4, layer_num=layers, device="cpu", enable_memory_saver=False)
        info = dev.get_device_pool_infos()[0].buffer_info
        return get_mha_host_pool_cls(info)(
            info, 2.0, 0, page_size, layout, pin_memory=False, device="cpu",
            device_capacity_tokens=dev.size, start_layer=dev.start_layer, end_layer=dev.end_layer)
    if kind == "mha":
        dev = MHA(size=64, page_size=page_size, dtype=torch.bfloat16, head_num=2, head_dim=8,
                  layer_num=layers, device="cpu", enable_memory_saver=False)
        info = dev.get_device_pool_infos()[0].buffer_info
        return MHAHost(info, 2.0, 0, page_size, layout, pin_memory=False, device="cpu",
                       device_capacity_tokens=dev.size, start_layer=dev.start_layer,
                       end_layer=dev.end_layer)
    dev = MLA(size=64, page_size=page_size, dtype=torch.bfloat16, kv_lora_rank=16, qk_rope_head_dim=8,
              layer_num=layers, device="cpu", enable_memory_saver=False)
    info = dev.get_device_pool_infos()[0].buffer_info
    return MLAHost(info, 2.0, 0, page_size, layout, pin_memory=False, device="cpu",
                   device_capacity_tokens=dev.size, start_layer=dev.start_layer,
                   end_layer=dev.end_layer, target_layer_num=layers)
'''
exec(_POOL_IMPORT_SRC)


@pytest.fixture(scope="module")
def pools_importable():
    _import_pools()  # noqa: F821 (defined by the exec above); a failure here is a real failure


def config(socket, model="org/tiny-llama", tp_rank=0, tp_size=1, mla=False, **extra):
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=True, is_page_first_layout=False, model_name=model,
        extra_config={"backend_name": "kvstore", "module_path": MODULE,
                      "class_name": "KVStoreHiCacheStorage", "interface_v1": 1, "socket": socket, **extra})


def create(socket, pool=None, **kw):
    """The backend as SGLang makes it: factory first, host pool registered after."""
    backend = StorageBackendFactory.create_backend("dynamic", config(socket, **kw), pool)
    if pool is not None:
        backend.register_mem_pool_host(pool)
    return backend


def page_bytes(pool, index):
    return pool.get_data_page(index, flat=True).view(torch.uint8).clone()


def test_factory_loads_the_backend(daemon):
    b = create(daemon.socket)
    try:
        assert type(b) is KVStoreHiCacheStorage and isinstance(b, HiCacheStorage)
        assert b.socket == daemon.socket
        assert b.set("probe", torch.arange(8, dtype=torch.uint8))
        assert daemon.client().contains(b._key("probe"))        # it really reached this daemon
    finally:
        b.close()
    # bad client options are refused at construction, naming the key
    with pytest.raises(ConfigError, match="reconnect_timeout"):
        create(daemon.socket, reconnect_timeout="later")


def test_set_get_exists_round_trip_and_miss(daemon, caplog):
    b = create(daemon.socket)
    value = torch.randn(3, 5, dtype=torch.bfloat16)
    raw = value.view(torch.uint8).reshape(-1).clone()
    assert not b.exists("k1")
    assert b.set("k1", value)
    assert b.exists("k1")
    into = torch.zeros(15, dtype=torch.bfloat16)
    got = b.get("k1", into)
    assert got is into and torch.equal(into.view(torch.uint8), raw)
    assert torch.equal(b.get("k1"), raw)                       # no target: a fresh uint8 tensor
    with caplog.at_level(logging.WARNING):
        assert b.get("missing") is None
        assert b.get("missing", torch.zeros(15, dtype=torch.bfloat16)) is None
        assert not b.exists("missing")
        assert b.set("k1", torch.zeros(15, dtype=torch.bfloat16))   # already there: success...
    assert torch.equal(b.get("k1"), raw)                       # ...and the first value stays
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "a miss is not a failure"
    assert b.batch_set(["k2", "k3"], [torch.ones(4), torch.full((4,), 2.0)])
    out = b.batch_get(["k2", "nope", "k3"], [torch.zeros(4), torch.zeros(4), torch.zeros(4)])
    assert torch.equal(out[0], torch.ones(4)) and out[1] is None and torch.equal(out[2], torch.full((4,), 2.0))
    # a page of the wrong size is reported and logged, never half-loaded silently
    with caplog.at_level(logging.WARNING):
        assert b.get("k1", torch.zeros(64, dtype=torch.uint8)) is None
    assert any("30 bytes" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    b.close()


def test_batch_exists_is_the_stored_prefix(daemon):
    b = create(daemon.socket)
    keys = [f"h{i}" for i in range(8)]
    for i in (0, 1, 2, 3, 4, 6):
        assert b.set(keys[i], torch.full((16,), i, dtype=torch.uint8))
    assert b.batch_exists(keys) == 5
    assert b.batch_exists(keys[:5]) == 5
    assert b.batch_exists(keys[5:]) == 0
    assert b.batch_exists([]) == 0
    b.close()


def test_keys_separate_models_and_tp_ranks(daemon):
    v = torch.arange(32, dtype=torch.uint8)
    r0, r1 = create(daemon.socket, tp_rank=0, tp_size=2), create(daemon.socket, tp_rank=1, tp_size=2)
    other = create(daemon.socket, model="org/other-model", tp_rank=0, tp_size=2)
    assert r0.set("page", v)
    assert r0.exists("page") and not r1.exists("page") and not other.exists("page")
    # MLA KV is the same on every TP rank: ranks share one copy (as SGLang's backends do)
    m0, m1 = (create(daemon.socket, tp_rank=r, tp_size=2, mla=True) for r in (0, 1))
    assert m0.set("page", v) and m1.exists("page") and not r0.exists("x")
    # clear() takes this shard's pages and no one else's
    assert r0.clear() and not r0.exists("page") and m1.exists("page")
    for b in (r0, r1, other, m0, m1):
        b.close()


LAYOUTS = [("mha", "layer_first"), ("mha", "page_first"), ("mha", "page_first_direct"),
           ("mha", "page_head"), ("mla", "layer_first"), ("mla", "page_first"),
           ("mla", "page_first_direct")]


@pytest.mark.parametrize("kind,layout", LAYOUTS, ids=[f"{k}-{lay}" for k, lay in LAYOUTS])
def test_v1_zero_copy_round_trip_over_a_host_pool(daemon, pools_importable, caplog, kind, layout):
    pool = make_host_pool(kind, layout)  # noqa: F821
    ps = pool.page_size
    g = torch.Generator().manual_seed(7)
    bufs = pool.kv_buffer if isinstance(pool.kv_buffer, (list, tuple)) else [pool.kv_buffer]
    for buf in bufs:
        buf.copy_(torch.randn(buf.shape, generator=g).to(buf.dtype))
    b = create(daemon.socket, pool, mla=(kind == "mla"))
    keys = ["p1", "p2", "p3"]
    src = torch.arange(1 * ps, 4 * ps)                       # pages 1..3
    want = [page_bytes(pool, i * ps) for i in (1, 2, 3)]
    assert b.batch_set_v1(keys, src) == [True, True, True]
    assert b.batch_exists(keys + ["p4"]) == 3
    for i in (1, 2, 3):                                     # clear the pages in the pool
        pool.set_from_flat_data_page(i * ps, torch.zeros_like(pool.get_data_page(i * ps)))
    dst = torch.arange(5 * ps, 8 * ps)                       # into other pages: 5..7
    with caplog.at_level(logging.WARNING):
        assert b.batch_get_v1(keys, dst) == [True, True, True]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    for w, i in zip(want, (5, 6, 7)):
        assert torch.equal(page_bytes(pool, i * ps), w)
    for i in (1, 2, 3):                                     # the sources were not touched
        assert not page_bytes(pool, i * ps).any()
    # v1 objects are the pool's flat data pages: the legacy get reads them the same way
    assert torch.equal(b.get("p2", pool.get_dummy_flat_data_page()).view(torch.uint8), want[1])
    # a missing page in the middle: reported as not loaded, not logged as a failure
    pool.set_from_flat_data_page(6 * ps, torch.zeros_like(pool.get_data_page(6 * ps)))
    assert b.batch_get_v1(["p1", "absent", "p3"], dst) == [True, False, True]
    assert not page_bytes(pool, 6 * ps).any()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # storing a page again is a success and changes nothing
    assert b.batch_set_v1(["p1"], torch.arange(6 * ps, 7 * ps)) == [True]
    assert torch.equal(b.get("p1", pool.get_dummy_flat_data_page()).view(torch.uint8), want[0])
    # wrong host indices: every page reported failed, and a warning says why
    with caplog.at_level(logging.WARNING):
        assert b.batch_set_v1(["p8", "p9"], torch.arange(ps)) == [False, False]
    assert any("host indices" in r.getMessage() for r in caplog.records)
    stats = b.get_stats()
    assert stats.backup_pgs and stats.prefetch_pgs and stats.kvstore_counters["get_missing"] == 1
    b.close()


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
def test_v1_round_trip_over_a_pool_without_flat_pages(daemon, pools_importable, layout):
    """AsymmetricMHATokenToKVPoolHost (K and V of different head dims) has no flat data
    page; its pages are the K and V regions its get_page_buffer_meta names."""
    pool = make_host_pool("mha-asym", layout)  # noqa: F821
    assert type(pool).__name__ == "AsymmetricMHATokenToKVPoolHost"
    ps = pool.page_size
    k, v = pool.kv_buffer
    for buf in (k, v):
        buf.copy_(torch.randn(buf.shape).to(buf.dtype))

    def page(i):   # the page's K and V bytes, wherever this layout keeps them
        sl = slice(i, i + 1) if layout == "page_first_direct" else slice(i * ps, (i + 1) * ps)
        return torch.cat([k[sl].reshape(-1).view(torch.uint8), v[sl].reshape(-1).view(torch.uint8)])

    b = create(daemon.socket, pool)
    assert b._page_view == "buffer_meta"
    want = [page(i).clone() for i in (1, 2)]
    assert b.batch_set_v1(["a1", "a2"], torch.arange(ps, 3 * ps)) == [True, True]
    assert b.batch_get_v1(["a1", "a2"], torch.arange(4 * ps, 6 * ps)) == [True, True]
    assert torch.equal(page(4), want[0]) and torch.equal(page(5), want[1])
    b.close()


def test_second_process_reads_through_its_own_backend(daemon, pools_importable):
    pool = make_host_pool("mha", "page_first")  # noqa: F821
    ps = pool.page_size
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape).to(pool.kv_buffer.dtype))
    b = create(daemon.socket, pool)
    keys = [hashlib.sha256(f"block{i}".encode()).hexdigest() for i in range(4)]
    assert all(b.batch_set_v1(keys, torch.arange(2 * ps, 6 * ps)))
    digests = [hashlib.sha256(page_bytes(pool, i * ps).numpy().tobytes()).hexdigest() for i in range(2, 6)]
    b.close()
    child = _POOL_IMPORT_SRC + r'''
import hashlib, json, sys, torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
cfg = HiCacheStorageConfig(**json.loads(sys.argv[2]))   # the parent's config, field for field
pool = make_host_pool("mha", "page_first")
b = StorageBackendFactory.create_backend("dynamic", cfg, pool)
b.register_mem_pool_host(pool)
keys = json.loads(sys.argv[3])
ps = pool.page_size
n = b.batch_exists(keys + ["never-stored"])
ok = b.batch_get_v1(keys, torch.arange(10 * ps, 14 * ps))
pages = [pool.get_data_page(i * ps).view(torch.uint8).numpy().tobytes() for i in range(10, 14)]
print(json.dumps({"exists": n, "ok": ok, "digests": [hashlib.sha256(p).hexdigest() for p in pages]}))
'''
    import dataclasses
    import json
    cfg = json.dumps(dataclasses.asdict(config(daemon.socket)))
    r = run_py(child, daemon.socket, cfg, json.dumps(keys), timeout=120)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["exists"] == 4
    assert got["ok"] == [True] * 4
    assert got["digests"] == digests


def _store_warnings(caplog, name="kvstore.client.adapters.sglang"):
    return [r for r in caplog.records if r.name == name and r.levelno >= logging.WARNING]


def test_serves_without_the_daemon_then_connects_in_the_background(make_daemon, caplog):
    """No daemon when SGLang builds the backend: it is built (it used to raise
    StoreUnavailable), every call answers at once as a miss / a failed store, one
    WARNING; once the daemon starts, the backend connects by itself and stores."""
    caplog.set_level(logging.INFO)
    d = make_daemon(start=False)
    b = create(d.socket)
    try:
        value = torch.arange(16, dtype=torch.uint8)
        t0 = time.monotonic()
        for i in range(20):
            assert not b.set(f"k{i}", value)
            assert not b.exists(f"k{i}") and b.batch_exists([f"k{i}", "x"]) == 0
            assert b.get(f"k{i}") is None
        assert time.monotonic() - t0 < 1.0                  # 80 calls, none waits
        warnings = _store_warnings(caplog)
        assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage(), \
            [r.getMessage() for r in warnings]
        assert b.counters["store_down"] >= 80 and b.counters["set_failed"] == 20
        d.start()
        wait_for(lambda: b._link.connected, timeout=20, what="the backend connecting in the background")
        assert b.set("k0", value) and b.exists("k0")
        assert torch.equal(b.get("k0"), value)
        assert any("is back" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
        assert len(_store_warnings(caplog)) == 1
    finally:
        b.close()


def test_daemon_killed_mid_run_calls_fail_fast_then_recover(make_daemon, caplog):
    """The daemon SIGKILLed under a running backend: calls wait at most
    reconnect_timeout once, then answer at once (misses, failed stores), with one
    WARNING from the backend; after the restart the stored pages are there again."""
    caplog.set_level(logging.INFO)
    d = make_daemon()
    b = create(d.socket, reconnect_timeout=0.5)
    try:
        value = torch.arange(32, dtype=torch.uint8)
        assert b.set("kept", value)
        d.stop(signal.SIGKILL)
        wait_for(lambda: not b._link.connected, what="the client noticing")
        times = []
        for i in range(10):
            t0 = time.monotonic()
            assert not b.set(f"new{i}", value)
            assert b.get("kept") is None and b.batch_exists(["kept"]) == 0
            times.append(time.monotonic() - t0)
        assert max(times) < 2.0 and sorted(times)[-2] < 0.5, times
        assert len(_store_warnings(caplog)) == 1
        d.start()
        wait_for(lambda: b._link.connected, timeout=20, what="reconnection")
        assert torch.equal(b.get("kept"), value) and b.set("new0", value)
    finally:
        b.close()
