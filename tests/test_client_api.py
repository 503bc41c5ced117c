"""The client API on a real daemon: every value type round-trips, batch forms, helpers."""

import numpy as np
import pytest

from kvstore.errors import ObjectExists


def test_put_get_bytes_memoryview_numpy(daemon):
    with daemon.client() as c:
        assert c.put("k-bytes", b"abc") is True
        assert c.put(b"\x00\xffhash", memoryview(b"xyz")) is True
        arr = np.arange(1000, dtype=np.float32).reshape(10, 100)
        assert c.put("k-np", arr) is True
        assert bytes(c.get("k-bytes")) == b"abc"
        assert bytes(c.get(b"\x00\xffhash")) == b"xyz"
        back = c.get_array("k-np", np.float32, (10, 100))
        assert back.shape == (10, 100) and np.array_equal(back, arr)
        assert not back.flags.writeable


def test_non_contiguous_numpy_is_stored_contiguous(daemon):
    with daemon.client() as c:
        arr = np.arange(100, dtype=np.int64).reshape(10, 10)[:, ::2]
        c.put("nc", arr)
        assert np.array_equal(c.get_array("nc", np.int64, (10, 5)), arr)


def test_torch_round_trip(daemon):
    torch = pytest.importorskip("torch", reason="torch extra not installed")
    with daemon.client() as c:
        t = torch.randn(4, 8, dtype=torch.float32)
        assert c.put("t", t)
        back = c.get_tensor("t", torch.float32, (4, 8))
        assert torch.equal(back, t)
        bf = torch.randn(16).to(torch.bfloat16)
        c.put("bf16", bf)
        assert torch.equal(c.get_tensor("bf16", torch.bfloat16), bf)
        doubled = back * 2          # new memory: a plain, writable tensor
        doubled.add_(1)
        assert type(doubled) is torch.Tensor


def test_arrow_buffers(daemon):
    pa = pytest.importorskip("pyarrow", reason="arrow extra not installed")
    with daemon.client() as c:
        c.put("a1", b"one")
        c.put("a2", pa.py_buffer(b"two"))
        bufs = c.get_buffers(["a1", "a2", "missing"])
        assert [b.to_pybytes() if b else None for b in bufs] == [b"one", b"two", None]
        assert not bufs[0].is_mutable


def test_put_many_get_many(daemon):
    with daemon.client() as c:
        keys = [f"m{i}" for i in range(100)]
        vals = [bytes([i]) * (i + 1) for i in range(100)]
        assert c.put_many(keys, vals) == [True] * 100
        assert c.put_many(keys[:3], vals[:3]) == [False] * 3
        views = c.get_many(keys + ["nope"])
        assert [bytes(v) for v in views[:-1]] == vals and views[-1] is None
        c.release_many(keys)


def test_create_seal_abort(daemon):
    with daemon.client() as c:
        buf = c.create("c1", 5)
        assert not buf.readonly
        buf[:] = b"hello"
        assert not c.contains("c1")
        c.seal("c1")
        assert c.contains("c1") and bytes(c.get("c1")) == b"hello"
        used = c.stats()["used"]
        c.create("c2", 1 << 20)
        assert c.stats()["used"] > used
        c.abort("c2")
        assert c.stats()["used"] == used and not c.contains("c2")


def test_zero_size_object(daemon):
    with daemon.client() as c:
        assert c.put("empty", b"")
        assert bytes(c.get("empty")) == b"" and c.size_of("empty") == 0


def test_existing_key_is_not_an_error(daemon):
    with daemon.client() as c:
        assert c.put("dup", b"first") is True
        assert c.put("dup", b"second") is False          # keys are content hashes
        assert bytes(c.get("dup")) == b"first"
        with pytest.raises(ObjectExists, match="already|sealed"):
            c.put("dup", b"x", strict=True)
        with pytest.raises(ObjectExists):
            c.create("dup", 3)
    log = daemon.read_log()
    assert "ERROR" not in log and "exists" not in log.lower()


def test_contains_delete_size_of(daemon):
    with daemon.client() as c:
        assert not c.contains("x") and c.get("x") is None and c.size_of("x") is None
        c.put("x", b"12345")
        assert c.contains("x") and c.size_of("x") == 5
        assert c.delete("x") is True
        assert not c.contains("x") and c.delete("x") is False


def test_same_key_held_twice_needs_two_releases(daemon):
    with daemon.client() as c:
        c.put("h", b"v")
        c.get("h")
        c.get("h")
        assert c.stats()["held_extents"] == 1
        c.release("h")
        assert c.stats()["held_extents"] == 1
        c.release("h")
        assert c.stats()["held_extents"] == 0


def test_close_releases_everything(daemon):
    c = daemon.client()
    c.put("r", b"v")
    c.get("r")
    c.create("unsealed", 100)
    with daemon.client() as other:
        assert other.stats()["held_extents"] == 1 and other.stats()["creating"] == 1
        c.close()
        c.close()                     # idempotent
        st = other.stats()
        assert st["held_extents"] == 0 and st["creating"] == 0
