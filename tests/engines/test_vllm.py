"""kvstore's vLLM KV connector through vLLM's own Scheduler and loading path (CPU).

Each "engine" here is vLLM's real Scheduler (built as vLLM's
tests/v1/kv_connector/unit/utils.py builds it: a tiny Llama config.json, ModelConfig
with skip_tokenizer_init, DeviceConfig("cpu")), whose KVConnectorFactory loads our
connector from kv_connector_module_path, plus a worker loop that drives a
worker-role connector in the model runner's order over real CPU KV cache tensors
allocated by vLLM's own allocate_kv_cache. The "forward" writes random KV into the
slots of the scheduled tokens, so a byte-identical block after a load can only have
come from the store. The daemon is real (conftest's make_daemon).
"""

import json
import logging
import os
import signal
import time

import pytest

import torch  # noqa: E402  (this file runs in its engine's tox environment: tox -e <engine>)
import vllm  # noqa: E402,F401

from conftest import run_py, wait_for  # noqa: E402

from vllm import SamplingParams  # noqa: E402
from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig,  # noqa: E402
                         VllmConfig)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,  # noqa: E402
                                        KVCacheTensor)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
BLOCK = 32          # the CPU attention backend's kernel blocks are multiples of 32
LAYERS = 2
KV_HEADS, HEAD_SIZE = 2, 32
NUM_BLOCKS = 24
EOS = 2


def llama_dir(root, dtype="float32"):
    """A tiny Llama checkpoint directory (config.json only: the scheduler never loads weights)."""
    d = os.path.join(str(root), f"tiny-llama-{dtype}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": KV_HEADS * 2 * HEAD_SIZE,
                   "num_attention_heads": KV_HEADS * 2, "num_key_value_heads": KV_HEADS,
                   "num_hidden_layers": LAYERS, "intermediate_size": 256, "vocab_size": 1000,
                   "max_position_embeddings": 4096, "torch_dtype": dtype, "eos_token_id": EOS,
                   "bos_token_id": 1}, f)
    return d


def make_request(rid, prompt, block_size=BLOCK, max_tokens=1):
    """A vLLM Request whose block_hashes come from vLLM's own sha256 block hasher."""
    sp = SamplingParams(max_tokens=max_tokens)
    sp.update_from_generation_config({}, EOS)
    return Request(request_id=rid, prompt_token_ids=list(prompt), sampling_params=sp, pooling_params=None,
                   block_hasher=get_request_block_hasher(block_size, sha256))


class Engine:
    """vLLM's Scheduler + a worker loop over real CPU KV caches, our connector on both sides."""

    def __init__(self, socket, model_dir, layout="LBHNC", block_size=BLOCK, policy="recompute", extra=None):
        init_none_hash(sha256)
        model_config = ModelConfig(model=model_dir, skip_tokenizer_init=True, seed=0)
        dtype = model_config.dtype
        self.block_size = block_size
        self.config = VllmConfig(
            model_config=model_config,
            scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048, max_model_len=2048,
                                             is_encoder_decoder=False),
            cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=True),
            kv_transfer_config=KVTransferConfig(
                kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.client.adapters.vllm",
                kv_role="kv_both", kv_connector_extra_config={"socket": socket, **(extra or {})},
                kv_load_failure_policy=policy),
            device_config=DeviceConfig("cpu"),
        )
        self.config.cache_config.num_gpu_blocks = NUM_BLOCKS
        self.layers = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=dtype)
        page = spec.page_size_bytes
        self.layout = KVCacheLayout[layout]
        if self.layout.is_layer_compact:
            layer_stride, block_stride = page * NUM_BLOCKS, page
        else:                                   # block-outermost: a block holds every layer's page
            layer_stride, block_stride = page, page * LAYERS
        self.kv_cache_config = KVCacheConfig(
            num_blocks=NUM_BLOCKS,
            kv_cache_tensors=[KVCacheTensor(size=page * NUM_BLOCKS * LAYERS, layers=self.layers,
                                            layer_stride=layer_stride, block_stride=block_stride)],
            kv_cache_groups=[KVCacheGroupSpec(self.layers, spec)])
        self.scheduler = Scheduler(vllm_config=self.config, kv_cache_config=self.kv_cache_config,
                                   structured_output_manager=StructuredOutputManager(self.config),
                                   block_size=block_size, log_stats=True)
        # the worker side, created the way vLLM's worker creates it
        self.worker = KVConnectorFactory.create_connector(self.config, KVConnectorRole.WORKER, self.kv_cache_config)
        self.kv = allocate_kv_cache(self.kv_cache_config, torch.device("cpu"), self.layout)
        self.worker.register_kv_caches(self.kv)
        self.block_ids = {}
        self.gen = torch.Generator().manual_seed(os.getpid())
        self.invalid = []       # invalid block ids reported per step
        self.stats = []         # the connector stats vLLM's scheduler reported, per step
        self.before_load = None  # hook(scheduler_output) between scheduling and the worker's load

    def request(self, rid, prompt, max_tokens=1):
        return make_request(rid, prompt, self.block_size, max_tokens)

    def step(self):
        out = self.scheduler.schedule()
        if self.before_load is not None:
            self.before_load(out)
        w = self.worker
        positions = {}
        for nr in out.scheduled_new_reqs:
            self.block_ids[nr.req_id] = list(nr.block_ids[0])
            positions[nr.req_id] = nr.num_computed_tokens
        c = out.scheduled_cached_reqs
        for i, rid in enumerate(c.req_ids):
            if c.new_block_ids[i] is not None:
                if rid in c.resumed_req_ids:
                    self.block_ids[rid] = list(c.new_block_ids[i][0])
                else:
                    self.block_ids[rid].extend(c.new_block_ids[i][0])
            positions[rid] = c.num_computed_tokens[i]
        # the model runner's order (docs/engines.md)
        w.bind_connector_metadata(out.kv_connector_metadata)
        w.start_load_kv(None)
        for name in self.layers:
            w.wait_for_layer_load(name)
            cache = self.kv[name]
            for rid, start in positions.items():       # "forward": KV of the scheduled tokens
                for p in range(start, start + out.num_scheduled_tokens[rid]):
                    blk = self.block_ids[rid][p // self.block_size]
                    cache[blk, :, p % self.block_size] = torch.randn(
                        cache[blk, :, p % self.block_size].shape, generator=self.gen).to(cache.dtype)
            w.save_kv_layer(name, cache, None)
        w.wait_for_save()
        w.get_finished(out.finished_req_ids)
        invalid = w.get_block_ids_with_load_errors()
        w.clear_connector_metadata()
        self.invalid.append(invalid)
        rids = list(out.num_scheduled_tokens)
        mro = ModelRunnerOutput(req_ids=rids, req_id_to_index={r: i for i, r in enumerate(rids)},
                                sampled_token_ids=[[7] for _ in rids],
                                kv_connector_output=KVConnectorOutput(
                                    invalid_block_ids=set(invalid),
                                    kv_connector_stats=w.get_kv_connector_stats()))
        for eco in self.scheduler.update_from_output(out, mro).values():
            st = eco.scheduler_stats
            if st is not None and st.kv_connector_stats:
                self.stats.append(st.kv_connector_stats)
        return out, positions

    def stat(self, name):
        """A connector counter summed over the steps so far (vLLM's aggregated stats)."""
        return sum(s.get(name, 0) for s in self.stats)

    def run(self, req, max_steps=8):
        """Add req, step until it finishes; returns (first step's output, its positions)."""
        self.scheduler.add_request(req)
        first = None
        for _ in range(max_steps):
            got = self.step()
            first = first or got
            if req.request_id not in self.scheduler.requests:
                return first
        raise AssertionError(f"{req.request_id} did not finish in {max_steps} steps")

    def blocks(self, rid, n):
        """The first n KV blocks of a request, every layer, in logical [H, N, C] order."""
        return [self.kv[name][b].clone() for b in self.block_ids[rid][:n] for name in self.layers]


PROMPT = [(i * 37 + 11) % 997 + 3 for i in range(3 * BLOCK + 5)]     # 3 full blocks + 5 tokens


def test_connector_loaded_by_vllm_and_layout_is_cpu_backends(daemon, tmp_path):
    from kvstore.client.adapters.vllm import KVStoreConnector
    e = Engine(daemon.socket, llama_dir(tmp_path))
    assert type(e.scheduler.connector) is KVStoreConnector and type(e.worker) is KVStoreConnector
    assert e.scheduler.connector.role == KVConnectorRole.SCHEDULER and e.worker.role == KVConnectorRole.WORKER
    # the layout the CPU attention backend accepts; per layer [blocks, heads, tokens, K+V], block dim 0
    assert CPUAttentionBackend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    t = e.kv[e.layers[0]]
    assert t.shape == (NUM_BLOCKS, KV_HEADS, BLOCK, 2 * HEAD_SIZE)
    # a cold store: no external hit, and nothing is claimed for a partial block
    req = e.request("cold", PROMPT)
    assert e.scheduler.connector.get_num_new_matched_tokens(req, 0) == (0, False)


ENGINE_CHILD = """
import sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import test_vllm as T
sock, model, out, mode = sys.argv[3:7]
e = T.Engine(sock, model)
req = e.request("r-" + mode, T.PROMPT)
first, positions = e.run(req)
n = len(T.PROMPT) // T.BLOCK
torch.save({"blocks": e.blocks(req.request_id, n), "start": positions[req.request_id],
            "invalid": [sorted(s) for s in e.invalid]}, out)
print("done", positions[req.request_id])
"""


def test_two_engines_share_kv_byte_identical(daemon, tmp_path):
    """Engine A (its own process) computes and saves; engine B (another process) gets an
    external hit from its Scheduler and loads exactly the bytes A saved."""
    model = llama_dir(tmp_path)
    a_out, b_out = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    run_py(ENGINE_CHILD, HERE, TESTS, daemon.socket, model, a_out, "a", timeout=120)
    run_py(ENGINE_CHILD, HERE, TESTS, daemon.socket, model, b_out, "b", timeout=120)
    a, b = torch.load(a_out), torch.load(b_out)
    assert a["start"] == 0                      # A computed everything
    # B: the 3 full prompt blocks came from the store, it computed only the 5-token tail
    assert b["start"] == 3 * BLOCK
    assert all(not s for s in b["invalid"])
    assert len(a["blocks"]) == len(b["blocks"]) == 3 * LAYERS
    for x, y in zip(a["blocks"], b["blocks"]):
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    assert any(x.abs().sum() > 0 for x in a["blocks"])


def test_never_claims_every_prompt_token(daemon, tmp_path):
    """A prompt of exactly 2 full blocks, all stored: only 1 block is reported (vLLM must
    compute at least the last token)."""
    model = llama_dir(tmp_path)
    prompt = PROMPT[:2 * BLOCK]
    a = Engine(daemon.socket, model)
    a.run(a.request("a", prompt))
    b = Engine(daemon.socket, model)
    req = b.request("b", prompt)
    assert b.scheduler.connector.get_num_new_matched_tokens(req, 0) == (BLOCK, False)
    # one token more: both blocks may be claimed
    req2 = b.request("b2", prompt + [5])
    assert b.scheduler.connector.get_num_new_matched_tokens(req2, 0) == (2 * BLOCK, False)
    # and a local prefix hit of one block leaves one block to load
    assert b.scheduler.connector.get_num_new_matched_tokens(req2, BLOCK) == (BLOCK, False)


@pytest.mark.parametrize("save_layout,load_layout", [("LBNHC", "BLHNC"), ("BLHNC", "LBNHC")])
def test_non_contiguous_layouts_round_trip(daemon, tmp_path, save_layout, load_layout):
    """Layouts whose block slices are not contiguous (LBNHC: heads and tokens swapped
    inside a page) or whose layers interleave (BLHNC): blocks are stored in vLLM's
    logical order, so they load byte-identical into either layout."""
    model = llama_dir(tmp_path)
    a = Engine(daemon.socket, model, layout=save_layout)
    assert not a.kv[a.layers[0]][0].is_contiguous() or not a.kv[a.layers[0]].is_contiguous()
    a.run(a.request("a", PROMPT))
    b = Engine(daemon.socket, model, layout=load_layout)
    _, pos = b.run(b.request("b", PROMPT))
    assert pos["b"] == 3 * BLOCK
    for x, y in zip(a.blocks("a", 3), b.blocks("b", 3)):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def test_load_failure_is_reported_not_hidden(daemon, tmp_path, caplog):
    """A block deleted between the scheduler's lookup and the worker's load is reported
    through get_block_ids_with_load_errors (with a warning); vLLM's scheduler then
    rewinds the request to recompute from that block."""
    model = llama_dir(tmp_path)
    a = Engine(daemon.socket, model)
    a.run(a.request("a", PROMPT))
    b = Engine(daemon.socket, model)
    client = daemon.client()
    victim = {}

    def delete_second_block(out):
        loads = out.kv_connector_metadata.loads
        assert len(loads) == 3
        ld = loads[1]
        victim["block"] = ld.block_id
        assert client.delete(b.worker._layer_key(ld.block_hash, b.layers[1]))

    b.before_load = delete_second_block
    req = b.request("b", PROMPT, max_tokens=2)
    b.scheduler.add_request(req)
    with caplog.at_level("WARNING", logger="kvstore.adapters.vllm"):
        out, pos = b.step()
    assert pos["b"] == 3 * BLOCK                           # the hit was taken
    assert b.invalid[-1] == {victim["block"]}              # ... and its failure reported
    assert any("failed" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    # vLLM's scheduler consumed the report: the request restarts at the failed block
    assert req.num_computed_tokens == BLOCK
    b.before_load = None
    out2, pos2 = b.step()
    assert pos2["b"] == BLOCK and out2.num_scheduled_tokens["b"] == len(PROMPT) - BLOCK
    assert all(not s for s in b.invalid[1:])
    # counted, not only logged: vLLM's stats carry the failed load and the good ones
    assert b.stat("blocks_load_failed") == 1 and b.stat("blocks_loaded") == 2
    client.close()


def test_half_saved_block_is_not_a_hit(daemon, tmp_path):
    """Some layers of a block stored, no completion marker (a writer that died between
    save_kv_layer and wait_for_save): the scheduler reports no hit; once every layer is
    stored and marked, it does."""
    model = llama_dir(tmp_path)
    a = Engine(daemon.socket, model)
    req = a.request("a", PROMPT)
    a.scheduler.add_request(req)
    out = a.scheduler.schedule()
    meta = out.kv_connector_metadata
    assert len(meta.saves) == 3
    w = a.worker
    a.block_ids["a"] = list(out.scheduled_new_reqs[0].block_ids[0])
    w.bind_connector_metadata(meta)
    w.start_load_kv(None)
    w.save_kv_layer(a.layers[0], a.kv[a.layers[0]], None)      # layer 0 only, then "crash"
    client = daemon.client()
    h = meta.saves[0].block_hash
    assert client.contains(w._layer_key(h, a.layers[0]))       # the layer really is in the store
    assert not client.contains(w._layer_key(h, a.layers[1]))
    b = Engine(daemon.socket, model)
    probe = b.request("probe", PROMPT)
    assert b.scheduler.connector.get_num_new_matched_tokens(probe, 0) == (0, False)
    # wait_for_save with a layer missing writes no marker either
    w.wait_for_save()
    assert b.scheduler.connector.get_num_new_matched_tokens(probe, 0) == (0, False)
    w.clear_connector_metadata()
    # a complete save (all layers, then wait_for_save) makes it a hit
    w.bind_connector_metadata(meta)
    w.start_load_kv(None)
    for name in a.layers:
        w.save_kv_layer(name, a.kv[name], None)
    w.wait_for_save()
    assert b.scheduler.connector.get_num_new_matched_tokens(probe, 0) == (3 * BLOCK, False)
    client.close()


def test_different_model_never_shares_blocks(daemon, tmp_path):
    """Same prompt, different KV dtype / block size: different keys, no hit."""
    a = Engine(daemon.socket, llama_dir(tmp_path, "float32"))
    a.run(a.request("a", PROMPT))
    other = Engine(daemon.socket, llama_dir(tmp_path, "bfloat16"))
    assert other.scheduler.connector.get_num_new_matched_tokens(other.request("o", PROMPT), 0) == (0, False)
    bigger = Engine(daemon.socket, llama_dir(tmp_path, "float32"), block_size=2 * BLOCK)
    assert bigger.scheduler.connector.get_num_new_matched_tokens(bigger.request("g", PROMPT), 0) == (0, False)
    same = Engine(daemon.socket, llama_dir(tmp_path, "float32"))
    assert same.scheduler.connector.get_num_new_matched_tokens(same.request("s", PROMPT), 0) == (3 * BLOCK, False)


def test_store_down_is_a_miss_not_a_crash(tmp_path, caplog):
    """No daemon at the socket: vLLM still builds the connector, and a lookup is a miss
    with a warning instead of an exception in the scheduler."""
    init_none_hash(sha256)
    model_config = ModelConfig(model=llama_dir(tmp_path), skip_tokenizer_init=True)
    cfg = VllmConfig(model_config=model_config, cache_config=CacheConfig(block_size=BLOCK),
                     kv_transfer_config=KVTransferConfig(
                         kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.client.adapters.vllm",
                         kv_role="kv_both", kv_connector_extra_config={"socket": str(tmp_path / "none.sock")}),
                     device_config=DeviceConfig("cpu"))
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32)
    kcc = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    conn = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kcc)
    req = make_request("x", PROMPT)
    with caplog.at_level("WARNING", logger="kvstore.adapters.vllm"):
        assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
    assert any("miss" in r.getMessage() for r in caplog.records)


def _store_warnings(caplog):
    return [r for r in caplog.records if r.name.startswith("kvstore") and r.levelno >= logging.WARNING]


def _timed_steps(engine, n):
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        engine.step()
        times.append(time.monotonic() - t0)
    return times


def test_engine_starts_and_serves_without_the_daemon(make_daemon, tmp_path, caplog):
    """No daemon at engine start: vLLM builds both connector roles, registers the KV
    caches and serves requests (misses, saves skipped, one WARNING per connector), each
    step fast; once the daemon starts, the connectors connect in the background and the
    engine saves, and another engine gets hits."""
    caplog.set_level(logging.INFO, logger="kvstore")
    d = make_daemon(start=False)
    model = llama_dir(tmp_path)
    t0 = time.monotonic()
    a = Engine(d.socket, model)                  # used to raise StoreUnavailable here
    assert time.monotonic() - t0 < 5
    req = a.request("a", PROMPT, max_tokens=3)
    a.scheduler.add_request(req)
    times = _timed_steps(a, 3)
    assert req.request_id not in a.scheduler.requests          # served to the end
    assert max(times) < 1.0, times
    assert all(not s for s in a.invalid)
    warnings = _store_warnings(caplog)
    assert len(warnings) == 2, [r.getMessage() for r in warnings]   # scheduler + worker, once each
    assert all("unavailable" in r.getMessage() for r in warnings)
    assert a.stat("lookups_missed_store_down") >= 1 and a.stat("blocks_save_skipped") >= 3
    assert a.stat("store_outages") == 2
    d.start()
    wait_for(lambda: a.worker._link.connected and a.scheduler.connector._link.connected, timeout=20,
             what="the connectors connecting in the background")
    assert any("is back" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    a.run(a.request("a2", PROMPT))               # computed and saved now
    b = Engine(d.socket, model)
    _, pos = b.run(b.request("b", PROMPT))
    assert pos["b"] == 3 * BLOCK                 # the blocks engine A saved after the daemon came
    for x, y in zip(a.blocks("a2", 3), b.blocks("b", 3)):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    assert len(_store_warnings(caplog)) == 2     # nothing more to warn about


def test_daemon_killed_mid_run_engine_keeps_serving(make_daemon, tmp_path, caplog):
    """The daemon SIGKILLed while an engine runs: the engine keeps serving (lookups
    miss, saves are skipped), the first step of the outage waits at most the
    connector's reconnect_timeout and later steps not at all (it used to be 10 s per
    store call); after the restart the engine gets hits again from what survived."""
    caplog.set_level(logging.INFO, logger="kvstore")
    d = make_daemon()
    model = llama_dir(tmp_path)
    a = Engine(d.socket, model, extra={"reconnect_timeout": 0.5, "timeout": 2.0})
    a.run(a.request("a", PROMPT))                # saved while the daemon runs
    b = Engine(d.socket, model, extra={"reconnect_timeout": 0.5, "timeout": 2.0})
    d.stop(signal.SIGKILL)
    wait_for(lambda: not b.worker._link.connected, what="the worker's client noticing")
    times = []
    for i in range(3):
        req = b.request(f"down{i}", [t + i + 1 for t in PROMPT], max_tokens=2)
        b.scheduler.add_request(req)
        times += _timed_steps(b, 2)
        assert req.request_id not in b.scheduler.requests, i
    assert max(times) < 2.5, times               # bounded by reconnect_timeout (0.5 s), not 10 s a call
    assert sorted(times)[-2] < 1.0, times        # and only the first step of the outage waits
    assert all(not s for s in b.invalid)
    # once per outage, not per call: each of the 4 clients (2 engines x 2 roles) says the
    # daemon went away, each of engine B's 2 connectors that it goes on without the store
    warnings = _store_warnings(caplog)
    went = [r for r in warnings if r.name == "kvstore.client"]
    link = [r for r in warnings if r.name == "kvstore.adapters.vllm"]
    assert len(went) <= 4 and len(link) == 2 and len(warnings) == len(went) + len(link), \
        [r.getMessage() for r in warnings]
    print("step times with the daemon down:", [round(t, 3) for t in times])
    assert b.stat("blocks_save_skipped") >= 3
    d.start()
    wait_for(lambda: b.worker._link.connected and b.scheduler.connector._link.connected,
             timeout=20, what="reconnection")
    _, pos = b.run(b.request("b", PROMPT))
    assert pos["b"] == 3 * BLOCK                 # engine A's blocks survived the kill
    for x, y in zip(a.blocks("a", 3), b.blocks("b", 3)):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def test_client_options_in_the_extra_config(tmp_path, make_daemon):
    """timeout and reconnect_timeout reach the Client; a bad value is refused naming the key."""
    from kvstore.client.adapters.vllm import KVStoreConfigError
    d = make_daemon()
    e = Engine(d.socket, llama_dir(tmp_path), extra={"timeout": 3.5, "reconnect_timeout": 0.25})
    c = e.worker._link.client()
    assert c._conn.timeout == 3.5 and c.reconnect_timeout == 0.25
    with pytest.raises(KVStoreConfigError, match="reconnect_timeout"):
        Engine(d.socket, llama_dir(tmp_path), extra={"reconnect_timeout": "soon"})


def test_daemon_killed_between_lookup_and_load_is_never_silent(make_daemon, tmp_path, caplog):
    """The daemon dies after the scheduler found the blocks and before the worker loads
    them: every block is either loaded byte-identical or reported to vLLM as a load
    error (recomputed) and counted in the connector's stats; the request finishes."""
    caplog.set_level(logging.INFO, logger="kvstore")
    d = make_daemon()
    model = llama_dir(tmp_path)
    a = Engine(d.socket, model, extra={"reconnect_timeout": 0.5})
    a.run(a.request("a", PROMPT))
    b = Engine(d.socket, model, extra={"reconnect_timeout": 0.5})

    def kill(out):
        assert len(out.kv_connector_metadata.loads) == 3          # the lookup hit
        d.stop(signal.SIGKILL)
        wait_for(lambda: not b.worker._link.connected, what="the worker's client noticing")

    b.before_load = kill
    req = b.request("b", PROMPT, max_tokens=2)
    b.scheduler.add_request(req)
    out, pos = b.step()
    b.before_load = None
    assert pos["b"] == 3 * BLOCK
    failed = b.invalid[0]
    assert b.stat("blocks_load_failed") == len(failed)
    assert b.stat("blocks_loaded") == 3 - len(failed)
    for _ in range(4):
        if req.request_id not in b.scheduler.requests:
            break
        b.step()
    assert req.request_id not in b.scheduler.requests
    if not failed:                    # loaded from the shared segment without the daemon
        for x, y in zip(a.blocks("a", 3), b.blocks("b", 3)):
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    print("blocks failed to load with the daemon killed:", len(failed))
