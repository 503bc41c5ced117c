"""LMCache remote-storage plugin (client/adapters/lmcache.py) against a real daemon.

Everything goes through LMCache 0.5.6's own parts: the plugin is loaded by
``CreateConnector("plugin://kvstore", ...)`` from ``remote_storage_plugins`` and
``extra_config`` exactly as LMCache's RemoteBackend does, memory comes from a real
``LocalCPUBackend(dst_device="cpu")`` built from an ``LMCacheMetadata`` the way
LMCache's storage manager builds it, and coroutines run on a separate event-loop
thread (LMCache runs its connector on one and calls it with run_coroutine_threadsafe).
"""

import asyncio
import hashlib
import logging
import os
import signal
import threading
import time

import pytest

import torch  # noqa: E402  (this file runs in its engine's tox environment: tox -e <engine>)
import lmcache  # noqa: E402,F401

from conftest import run_py, wait_for  # noqa: E402

from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.connector import CreateConnector  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402

from kvstore.client.adapters.lmcache import KVStoreConnector  # noqa: E402

PLUGIN = "kvstore"
MODEL = "tiny-llama"
CHUNK = 16
# (num_layers, 2, chunk_size, num_kv_heads, head_size): 2 x 2 x 16 x 2 x 8 bf16 = 2 KiB a chunk
KV_SHAPE = (2, 2, CHUNK, 2, 8)


def make_config(socket, namespace="lmcache-test", **options):
    return LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK, local_cpu=False, max_local_cpu_size=0.05,
        remote_storage_plugins=[PLUGIN],
        extra_config={
            f"remote_storage_plugin.{PLUGIN}.module_path": "kvstore.client.adapters.lmcache",
            f"remote_storage_plugin.{PLUGIN}.class_name": "KVStoreConnector",
            "kvstore.socket": socket,
            "kvstore.namespace": namespace,
            **{f"kvstore.{k}": v for k, v in options.items()},
        })


def make_metadata():
    return LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=KV_SHAPE,
                           chunk_size=CHUNK)


class Engine:
    """What LMCache's storage manager sets up around a remote connector."""

    def __init__(self, socket, namespace="lmcache-test", **options):
        self.config, self.metadata = make_config(socket, namespace, **options), make_metadata()
        self.backend = LocalCPUBackend(self.config, self.metadata, dst_device="cpu")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.conn = CreateConnector(f"plugin://{PLUGIN}", self.loop, self.backend,
                                    self.config, self.metadata, plugin_name=PLUGIN)
        self.inner = self.conn.getWrappedConnector()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def chunk(self, seed, tokens=CHUNK):
        obj = self.backend.allocate(self.metadata.get_shapes(tokens), self.metadata.get_dtypes())
        g = torch.Generator().manual_seed(seed)
        obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=g).to(torch.bfloat16))
        return obj

    def close(self):
        self.run(self.conn.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def key(h, model=MODEL):
    return CacheEngineKey(model, 1, 0, h, torch.bfloat16)


def put(eng, k, obj):
    """A put as RemoteBackend.submit_put_task makes it: it holds one reference for the
    put, and the connector wrapper drops it afterwards."""
    obj.ref_count_up()
    eng.run(eng.conn.put(k, obj))


def digest(obj):
    return hashlib.sha256(obj.raw_tensor[:obj.get_size()].numpy().tobytes()).hexdigest()


@pytest.fixture
def eng(daemon):
    e = Engine(daemon.socket)
    yield e
    e.close()


def test_loaded_through_lmcache_plugin_path(eng):
    assert type(eng.inner) is KVStoreConnector
    assert eng.inner.socket_path == eng.config.extra_config["kvstore.socket"]
    assert eng.inner.namespace == "lmcache-test"
    assert eng.conn.support_batched_get() and eng.conn.support_batched_put()


def test_put_exists_get_roundtrip(eng):
    k, obj = key(0x1234), eng.chunk(1)
    assert not eng.run(eng.conn.exists(k)) and not eng.conn.exists_sync(k)
    put(eng, k, obj)
    assert obj.get_ref_count() == 1             # ours + the wrapper's: exactly one drop
    assert eng.run(eng.conn.exists(k)) and eng.conn.exists_sync(k)
    got = eng.run(eng.conn.get(k))
    assert got is not None and got is not obj and got.data_ptr != obj.data_ptr
    assert got.get_shapes() == obj.get_shapes() and got.get_dtypes() == obj.get_dtypes()
    assert got.get_memory_format() == obj.get_memory_format() == MemoryFormat.KV_2LTD
    assert got.get_shape() == obj.get_shape() and got.get_dtype() == torch.bfloat16
    assert torch.equal(got.tensor.view(torch.uint8), obj.tensor.view(torch.uint8))
    assert got.get_ref_count() == 1             # handed to LMCache with one reference
    assert k.to_string() in eng.run(eng.conn.list())
    got.ref_count_down()
    obj.ref_count_down()


def test_partial_chunk_keeps_its_shape(eng):
    k, obj = key(0x77), eng.chunk(7, tokens=5)
    put(eng, k, obj)
    got = eng.run(eng.conn.get(k))
    assert got.get_shapes() == [torch.Size([2, 2, 5, 16])]
    assert got.get_size() == obj.get_size() == 2 * 2 * 5 * 16 * 2
    assert digest(got) == digest(obj)
    got.ref_count_down()
    obj.ref_count_down()


def test_missing_key_is_a_quiet_miss(eng, caplog):
    caplog.set_level(logging.WARNING)
    k = key(0xdead)
    assert eng.run(eng.conn.get(k)) is None
    assert eng.run(eng.conn.batched_get([k, key(0xbeef)])) == [None, None]
    assert not eng.run(eng.conn.exists(k)) and not eng.conn.exists_sync(k)
    assert not [r for r in caplog.records if r.name.startswith("kvstore")]


@pytest.fixture
def lmcache_warnings(caplog):
    """LMCache's loggers do not propagate: listen to its memory manager directly (it is
    what reports a double free)."""
    mm = logging.getLogger("lmcache.v1.memory_management")
    mm.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    yield caplog
    mm.removeHandler(caplog.handler)


def double_frees(caplog):
    return [r for r in caplog.records if "Double free" in r.getMessage()]


def test_existing_key_keeps_first_value_without_double_free(eng, lmcache_warnings):
    caplog = lmcache_warnings
    probe = eng.chunk(0)                         # the detector works: a real double free is seen
    probe.ref_count_down()
    probe.ref_count_down()
    assert double_frees(caplog)
    caplog.clear()
    k, first, second = key(0x42), eng.chunk(1), eng.chunk(2)
    assert digest(first) != digest(second)
    put(eng, k, first)
    # the connector itself must leave the reference count alone, on a new key and an old one
    before = second.get_ref_count()
    eng.run(eng.inner.put(key(0x43), second))    # a new key
    assert second.get_ref_count() == before == 1 and eng.conn.exists_sync(key(0x43))
    eng.run(eng.inner.put(k, second))            # an existing key
    assert second.get_ref_count() == before == 1
    put(eng, k, second)                          # through the wrapper: one drop, back to 1
    assert second.get_ref_count() == 1 and second.is_valid()
    got = eng.run(eng.conn.get(k))
    assert digest(got) == digest(first)
    assert not double_frees(caplog)
    assert not [r for r in caplog.records if r.name.startswith("kvstore")]   # an existing key is no error
    for o in (got, first, second):
        o.ref_count_down()


def test_batched_put_get_and_contains(eng):
    keys = [key(0x100 + i) for i in range(4)]
    objs = [eng.chunk(10 + i) for i in range(4)]
    for o in objs[:3]:
        o.ref_count_up()                         # the wrapper drops one per object
    eng.run(eng.conn.batched_put(keys[:3], objs[:3]))
    assert [o.get_ref_count() for o in objs] == [1, 1, 1, 1]
    assert eng.run(eng.conn.batched_async_contains("req", keys)) == 3
    assert eng.conn.batched_contains(keys) == 3
    got = eng.run(eng.conn.batched_get(keys))
    assert got[3] is None
    assert [digest(g) for g in got[:3]] == [digest(o) for o in objs[:3]]
    # a miss in the middle: only the hit prefix comes back, the rest is freed
    prefix = eng.run(eng.conn.batched_get_non_blocking("req", [keys[0], keys[3], keys[1]]))
    assert len(prefix) == 1 and digest(prefix[0]) == digest(objs[0])
    for o in got[:3] + prefix + objs:
        o.ref_count_down()


def test_foreign_object_is_a_failed_load_with_warning(eng, daemon, caplog):
    caplog.set_level(logging.WARNING)
    k = key(0x5150)
    with daemon.client(namespace="lmcache-test") as c:
        assert c.put(k.to_string(), b"not an LMCache chunk")
    assert eng.conn.exists_sync(k)
    assert eng.run(eng.conn.get(k)) is None
    assert any(r.levelno == logging.WARNING and "LMCache chunk" in r.getMessage() for r in caplog.records)


def test_different_models_never_share_a_chunk(eng):
    k, obj = key(0x99), eng.chunk(3)
    put(eng, k, obj)
    assert not eng.conn.exists_sync(key(0x99, model="other-model"))
    assert eng.run(eng.conn.get(key(0x99, model="other-model"))) is None
    obj.ref_count_down()


def test_real_remote_backend_path(eng):
    """LMCache's RemoteBackend (the storage manager's view) over the plugin."""
    from lmcache.v1.storage_backend.remote_backend import RemoteBackend
    rb = RemoteBackend(eng.config, eng.metadata, eng.loop, eng.backend, "cpu", plugin_name=PLUGIN)
    k, obj = key(0xabc), eng.chunk(5)
    rb.submit_put_task(k, obj).result(20)
    assert obj.get_ref_count() == 1
    assert rb.contains(k)
    got = rb.get_blocking(k)
    assert got is not None and digest(got) == digest(obj)
    assert rb.get_blocking(key(0xabd)) is None
    got.ref_count_down()
    obj.ref_count_down()
    rb.close()


def test_default_socket_from_environment(daemon, monkeypatch):
    monkeypatch.setenv("KVSTORE_SOCKET", daemon.socket)
    cfg, md = make_config(None), make_metadata()
    cfg.extra_config.pop("kvstore.socket")
    backend = LocalCPUBackend(cfg, md, dst_device="cpu")
    loop = asyncio.new_event_loop()
    try:
        conn = CreateConnector(f"plugin://{PLUGIN}", loop, backend, cfg, md, plugin_name=PLUGIN)
        assert conn.getWrappedConnector().socket_path == daemon.socket
        loop.run_until_complete(conn.close())
    finally:
        loop.close()


def test_second_process_reads_what_the_first_stored(eng, daemon):
    k, obj = key(0xfeed), eng.chunk(9)
    put(eng, k, obj)
    r = run_py("""
        import sys, hashlib, torch
        sys.path[:0] = [sys.argv[2], sys.argv[2] + "/.."]     # tests/engines, tests (conftest)
        from test_lmcache import Engine, key
        e = Engine(sys.argv[1])
        k = key(0xfeed)
        assert e.conn.exists_sync(k)
        got = e.run(e.conn.get(k))
        print("SHAPE", list(got.get_shapes()[0]), got.get_dtypes()[0], got.get_memory_format().name)
        print("SHA", hashlib.sha256(got.raw_tensor[:got.get_size()].numpy().tobytes()).hexdigest())
        got.ref_count_down()
        e.close()
    """, daemon.socket, os.path.dirname(os.path.abspath(__file__)), timeout=60)
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line[:4] in ("SHAP", "SHA "))
    assert lines["SHAPE"] == f"{list(obj.get_shapes()[0])} torch.bfloat16 KV_2LTD"
    assert lines["SHA"] == digest(obj)
    obj.ref_count_down()


def test_scheduler_role_without_cpu_backend(eng):
    """LMCache's scheduler builds the connector with no CPU backend (and no metadata):
    lookups must still work."""
    k, obj = key(0x5c4e), eng.chunk(4)
    put(eng, k, obj)
    conn = CreateConnector(f"plugin://{PLUGIN}", eng.loop, None, eng.config, None, plugin_name=PLUGIN)
    assert conn.exists_sync(k) and not conn.exists_sync(key(0x5c4f))
    assert eng.run(conn.batched_async_contains("lookup", [k, key(0x5c4f)])) == 1
    eng.run(conn.close())
    obj.ref_count_down()


def test_key_longer_than_kvstore_allows(eng):
    k, obj = key(0x10, model="org/" + "m" * 300), eng.chunk(6)
    assert len(k.to_string()) > 256
    put(eng, k, obj)
    assert eng.conn.exists_sync(k) and not eng.conn.exists_sync(key(0x10, model="org/" + "m" * 299))
    got = eng.run(eng.conn.get(k))
    assert digest(got) == digest(obj)
    assert k.to_string() in eng.run(eng.conn.list())
    got.ref_count_down()
    obj.ref_count_down()


def test_failed_save_raises_and_warns(make_daemon, caplog):
    """A chunk the store cannot take: the put raises (LMCache logs and counts it), we
    warn, and the reference LMCache handed over is still dropped exactly once."""
    from kvstore.errors import KVStoreError
    caplog.set_level(logging.WARNING)
    small = make_daemon(size="1MiB")
    e = Engine(small.socket)
    try:
        with small.client() as c:                        # 1 MiB, or 2 MiB on huge pages
            seg = c.segment_size
        k, obj = key(0xb16), e.chunk(8, tokens=seg // 128 + 64)    # larger than the segment
        obj.ref_count_up()
        with pytest.raises(KVStoreError):
            e.run(e.conn.put(k, obj))
        assert obj.get_ref_count() == 1
        assert any(r.levelno == logging.WARNING and r.name.startswith("kvstore") for r in caplog.records)
        assert not e.conn.exists_sync(k) and e.run(e.conn.get(k)) is None
        obj.ref_count_down()
    finally:
        e.close()


def _store_warnings(caplog):
    return [r for r in caplog.records if r.name.startswith("kvstore") and r.levelno >= logging.WARNING]


def test_serves_without_the_daemon_then_connects_in_the_background(make_daemon, caplog, lmcache_warnings):
    """No daemon when LMCache builds the plugin: it is built (it used to raise
    StoreUnavailable), lookups and gets miss and puts are skipped at once with one
    WARNING (and no ERROR from LMCache per put); once the daemon starts, the plugin
    connects by itself and stores."""
    caplog.set_level(logging.INFO)
    d = make_daemon(start=False)
    e = Engine(d.socket)
    try:
        k, obj = key(0x0a), e.chunk(1)
        t0 = time.monotonic()
        for _ in range(10):
            put(e, k, obj)                                    # skipped, not raised
            assert not e.conn.exists_sync(k) and e.inner.batched_contains([k]) == 0
            assert e.run(e.conn.get(k)) is None
        assert e.run(e.conn.ping()) == 1
        assert time.monotonic() - t0 < 2.0
        warnings = _store_warnings(caplog)
        assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage(), \
            [r.getMessage() for r in warnings]
        assert e.inner.counters["store_down"] >= 40
        assert obj.get_ref_count() == 1                       # each put's reference dropped once
        assert not double_frees(caplog)
        d.start()
        wait_for(lambda: e.inner._link.connected, timeout=20, what="the plugin connecting")
        put(e, k, obj)
        got = e.run(e.conn.get(k))
        assert got is not None and digest(got) == digest(obj)
        got.ref_count_down()
        obj.ref_count_down()
        assert any("is back" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
        assert len(_store_warnings(caplog)) == 1
    finally:
        e.close()


def test_daemon_killed_mid_run_calls_fail_fast_then_recover(make_daemon, caplog):
    caplog.set_level(logging.INFO)
    d = make_daemon()
    e = Engine(d.socket, reconnect_timeout=0.5)
    try:
        k, obj = key(0x0b), e.chunk(2)
        put(e, k, obj)
        d.stop(signal.SIGKILL)
        wait_for(lambda: not e.inner._link.connected, what="the client noticing")
        times = []
        for i in range(10):
            t0 = time.monotonic()
            assert e.run(e.conn.get(k)) is None and not e.conn.exists_sync(k)
            put(e, key(0x100 + i), obj)
            times.append(time.monotonic() - t0)
        assert max(times) < 2.0 and sorted(times)[-2] < 0.5, times
        warnings = [r for r in _store_warnings(caplog) if r.name == "kvstore.adapters.lmcache"]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        d.start()
        wait_for(lambda: e.inner._link.connected, timeout=20, what="reconnection")
        got = e.run(e.conn.get(k))
        assert got is not None and digest(got) == digest(obj)
        got.ref_count_down()
        obj.ref_count_down()
    finally:
        e.close()
