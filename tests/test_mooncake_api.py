"""The Mooncake-compatible facade, tested against Mooncake's documented semantics:
return codes instead of exceptions, an existing key gives 0 and keeps the first value,
a miss gives b'' from get and -704 from get_into, registered buffers for put_from /
get_into, and setup from positional arguments, a dict or a mooncake.json file."""

import json
import mmap
import signal

import numpy as np
import pytest

from kvstore.client.mooncake import ErrorCode, MooncakeDistributedStore, ReplicateConfig
from kvstore.errors import InvalidValue, StoreUnavailable

from conftest import corrupt_object, run_py, wait_for


@pytest.fixture
def store(daemon):
    s = MooncakeDistributedStore()
    assert s.setup("localhost", "P2PHANDSHAKE", 512 << 20, 128 << 20, "tcp", "", daemon.socket) == 0
    yield s
    s.close()


def _ptr(a):
    return a.ctypes.data


def test_setup_forms(daemon, tmp_path, monkeypatch):
    cfg = {"local_hostname": "localhost", "metadata_server": "P2PHANDSHAKE", "protocol": "tcp",
           "device_name": "", "master_server_address": daemon.socket,
           "global_segment_size": "512MB", "local_buffer_size": 134217728}
    s = MooncakeDistributedStore()
    assert s.setup(cfg) == 0 and s.health_check() == 0
    s.close()
    path = tmp_path / "mooncake.json"
    path.write_text(json.dumps(cfg))
    assert s.setup_from_file(str(path)) == 0
    s.close()
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(path))
    assert s.setup() == 0
    s.close()
    # a Mooncake master address means the local daemon named by KVSTORE_SOCKET
    monkeypatch.setenv("KVSTORE_SOCKET", daemon.socket)
    assert s.setup("localhost", "http://127.0.0.1:8080/metadata", 1 << 30, 1 << 28, "rdma", "mlx5_0",
                   "127.0.0.1:50051") == 0
    assert s.put("k", b"v") == 0
    s.close()
    assert s.setup_dummy(1 << 30, 1 << 28, "unix:" + daemon.socket) == 0 and s.get("k") == b"v"
    s.close()


def test_setup_errors_are_codes_at_setup_time(daemon, tmp_path):
    s = MooncakeDistributedStore()
    # wrong address: found at setup, not at the first put
    assert s.setup("localhost", "P2PHANDSHAKE", 0, 0, "tcp", "", str(tmp_path / "nobody.sock")) == ErrorCode.RPC_FAIL
    assert isinstance(s.last_error, StoreUnavailable) and "kvstore-daemon --socket" in str(s.last_error)
    assert s.health_check() == 1 and s.put("k", b"v") == ErrorCode.RPC_FAIL
    assert s.setup({"master_server_address": daemon.socket, "global_segment_size": "lots"}) == \
        ErrorCode.INVALID_PARAMS
    assert "global_segment_size" in str(s.last_error)
    assert s.setup({"master_server_address": daemon.socket, "protocol": 7}) == ErrorCode.INVALID_PARAMS
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert s.setup_from_file(str(bad)) == ErrorCode.INVALID_PARAMS and "not valid JSON" in str(s.last_error)
    assert s.setup_from_file(str(tmp_path / "missing.json")) == ErrorCode.INVALID_PARAMS


def test_put_get_existing_key_and_miss(store):
    assert store.put("a", b"first") == 0
    assert store.put("a", b"second") == 0            # an existing key: 0, and the first value stays
    assert store.get("a") == b"first"
    assert store.get("missing") == b""
    assert store.is_exist("a") == 1 and store.is_exist("missing") == 0
    assert store.batch_is_exist(["a", "missing"]) == [1, 0]
    assert store.get_size("a") == 5 and store.get_size("missing") == ErrorCode.OBJECT_NOT_FOUND
    assert store.put_batch(["b", "c"], [b"bb", b"ccc"]) == 0
    assert store.get_batch(["b", "missing", "c"]) == [b"bb", b"", b"ccc"]
    assert store.put_parts("p", b"ab", b"cd", memoryview(b"ef")) == 0 and store.get("p") == b"abcdef"


def test_bad_input_gives_codes_and_changes_nothing(store):
    assert store.put(12, b"v") == ErrorCode.INVALID_PARAMS
    assert store.put("", b"v") == ErrorCode.INVALID_PARAMS
    assert store.put("k" * 300, b"v") == ErrorCode.INVALID_PARAMS
    assert store.put("k", "a str is not bytes") == ErrorCode.INVALID_PARAMS
    assert store.put("empty", b"") == 0 and store.get_size("empty") == 0      # empty values are fine
    assert store.put_batch(["x", "y"], [b"1"]) == ErrorCode.INVALID_PARAMS
    assert store.is_exist(None) == ErrorCode.INVALID_PARAMS
    assert store.batch_is_exist(["x", None]) == [ErrorCode.INVALID_PARAMS] * 2
    assert store.is_exist("k") == 0 and store.is_exist("x") == 0


def test_remove_and_remove_all(store):
    for k in ("r1", "r2", "r3"):
        store.put(k, k.encode())
    assert store.remove("r1") == 0 and store.remove("r1") == ErrorCode.OBJECT_NOT_FOUND
    assert store.get("r1") == b""
    assert store.remove_by_regex("^r2$") == 1
    assert store.remove_all() == 1 and store.is_exist("r3") == 0


def test_put_from_and_get_into_registered_buffers(store):
    src = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
    dst = np.zeros(4 << 20, dtype=np.uint8)
    assert store.register_buffer(_ptr(src), src.nbytes) == 0
    assert store.register_buffer(_ptr(dst), dst.nbytes) == 0
    assert store.put_from("blk", _ptr(src) + 100, 1 << 20) == 0
    assert store.get_into("blk", _ptr(dst) + 7, 2 << 20) == 1 << 20
    assert np.array_equal(dst[7:7 + (1 << 20)], src[100:100 + (1 << 20)])
    assert store.get_into("missing", _ptr(dst), 100) == ErrorCode.OBJECT_NOT_FOUND
    # too small a destination: -600, nothing written, the object intact
    dst[:] = 0
    assert store.get_into("blk", _ptr(dst), 1000) == ErrorCode.INVALID_PARAMS and not dst.any()
    assert store.get_size("blk") == 1 << 20
    # batches, one key spread over several buffers, and per-key codes
    keys = [f"b{i}" for i in range(4)]
    assert store.batch_put_from(keys, [_ptr(src) + i * 4096 for i in range(4)], [4096] * 4) == [0] * 4
    got = store.batch_get_into(keys + ["nope"], [_ptr(dst) + i * 4096 for i in range(5)], [4096] * 5)
    assert got == [4096] * 4 + [ErrorCode.OBJECT_NOT_FOUND]
    assert np.array_equal(dst[:4 * 4096], src[:4 * 4096])
    assert store.batch_put_from_multi_buffers(["m"], [[_ptr(src), _ptr(src) + 8192]], [[10, 20]]) == [0]
    assert store.get_size("m") == 30
    assert store.batch_get_into_multi_buffers(["m"], [[_ptr(dst) + 100, _ptr(dst)]], [[5, 25]]) == [30]
    assert np.array_equal(np.concatenate([dst[100:105], dst[:25]]),
                          np.concatenate([src[:10], src[8192:8212]]))
    assert store.unregister_buffer(_ptr(src)) == 0
    assert store.put_from("after", _ptr(src), 10) == ErrorCode.INVALID_PARAMS


def test_unregistered_and_bogus_pointers_never_crash(store):
    a = np.zeros(1 << 16, dtype=np.uint8)
    assert store.put_from("k", _ptr(a), 100) == ErrorCode.INVALID_PARAMS       # not registered
    assert "register_buffer" in str(store.last_error)
    assert store.get_into("k", 0x10, 100) == ErrorCode.INVALID_PARAMS
    assert store.register_buffer(0x10, 4096) == ErrorCode.INVALID_PARAMS       # unmapped
    assert store.register_buffer(1 << 46, 1 << 20) == ErrorCode.INVALID_PARAMS
    assert store.register_buffer(_ptr(a), 1 << 40) == ErrorCode.INVALID_PARAMS  # runs past the mapping
    ro = mmap.mmap(-1, 4096, prot=mmap.PROT_READ)
    addr = np.frombuffer(ro, dtype=np.uint8).ctypes.data
    assert store.register_buffer(addr, 4096) == ErrorCode.INVALID_PARAMS       # read-only memory
    assert store.register_buffer(_ptr(a), a.nbytes) == 0
    assert store.put_from("k", _ptr(a) + a.nbytes - 10, 100) == ErrorCode.INVALID_PARAMS  # past its end
    assert store.put_from("k", _ptr(a), -1) == ErrorCode.INVALID_PARAMS
    assert store.unregister_buffer(12345) == ErrorCode.INVALID_PARAMS
    assert isinstance(store.last_error, InvalidValue)
    assert store.is_exist("k") == 0


def test_checksum_mismatch_is_801_and_the_object_is_dropped(store, daemon):
    store.put("c", b"z" * 100000)
    corrupt_object(store._client, "c", 50, b"Y")
    dst = np.zeros(100000, dtype=np.uint8)
    store.register_buffer(_ptr(dst), dst.nbytes)
    assert store.get_into("c", _ptr(dst), dst.nbytes) == ErrorCode.CHECKSUM_MISMATCH
    assert store.is_exist("c") == 0


def test_hard_pin_survives_eviction(make_daemon):
    d = make_daemon(size="16MiB")
    s = MooncakeDistributedStore()
    assert s.setup({"master_server_address": d.socket}) == 0
    assert s.put("pinned", b"p" * (1 << 20), ReplicateConfig(with_hard_pin=True)) == 0
    for i in range(40):                       # 40 MiB through a 16 MiB store
        assert s.put(f"f{i}", b"f" * (1 << 20)) == 0
    assert s.get("pinned") == b"p" * (1 << 20)
    assert s.put("toolarge", b"x" * (32 << 20)) == ErrorCode.INVALID_PARAMS
    s.close()


def test_health_check_and_reconnect(make_daemon):
    d = make_daemon()
    s = MooncakeDistributedStore()
    assert s.setup({"master_server_address": d.socket}) == 0 and s.health_check() == 0
    s.put("k", b"v")
    d.stop(signal.SIGKILL)
    wait_for(lambda: s.health_check() == 2, timeout=5, what="health_check to see the daemon gone")
    d.start()
    s._client.reconnect_timeout = 20
    assert s.get("k") == b"v"                 # the client reconnected by itself
    assert s.health_check() == 0
    s.close()
    assert s.health_check() == 1


def test_a_second_process_reads_what_the_first_stored(store, daemon):
    store.put("shared", b"from process one")
    r = run_py("""
        import sys
        from kvstore.client.mooncake import MooncakeDistributedStore
        s = MooncakeDistributedStore()
        assert s.setup({"master_server_address": sys.argv[1]}) == 0
        print(s.get("shared").decode(), s.put("shared", b"other"), s.is_exist("shared"))
        s.close()
    """, daemon.socket)
    assert r.stdout.split() == ["from", "process", "one", "0", "1"]
    assert store.get("shared") == b"from process one"


def test_a_buffer_freed_after_registration_is_refused_not_a_crash(store):
    a = np.ones(64 << 20, dtype=np.uint8)       # large: numpy gives it back with munmap
    p = _ptr(a)
    assert store.register_buffer(p, a.nbytes) == 0
    assert store.put("stored", b"s" * (1 << 20)) == 0
    del a
    assert store.put_from("k", p, 1 << 20) == ErrorCode.INVALID_PARAMS and store.is_exist("k") == 0
    assert store.get_into("stored", p, 1 << 20) == ErrorCode.INVALID_PARAMS   # the copy is refused
    assert "unmapped" in str(store.last_error) and store.unregister_buffer(p) == 0
    assert store.get("stored") == b"s" * (1 << 20)


def test_any_bad_argument_is_a_code_not_an_exception(store):
    assert store.setup({"master_server_address": store._client._socket_path,
                        "global_segment_size": "1024B"}) == 0
    assert store.get_batch(None) == b""
    assert store.batch_is_exist(None) == ErrorCode.INVALID_PARAMS
    assert store.batch_put_from(None, [1], [1]) == ErrorCode.INVALID_PARAMS
    assert store.batch_put_from_multi_buffers(["a"], [None], [[8]]) == [ErrorCode.INVALID_PARAMS]
    assert store.batch_get_into_multi_buffers(["a"], [5], [5]) == [ErrorCode.INVALID_PARAMS]
    assert store.remove_by_regex("(") == ErrorCode.INVALID_PARAMS
    assert store.put_batch(["a"], 5) == ErrorCode.INVALID_PARAMS
    assert store.register_buffer(True, 10) == ErrorCode.INVALID_PARAMS
    assert store.register_buffer(1.5, 10) == ErrorCode.INVALID_PARAMS
    a = np.zeros(4096, dtype=np.uint8)
    assert store.register_buffer(np.int64(_ptr(a)), np.int64(4096)) == 0      # numpy ints, as pybind takes
    assert store.put_from("n", np.int64(_ptr(a)), np.int32(16)) == 0 and store.get_size("n") == 16
    assert store.is_exist("a") == 0
