"""Copies between tensors/buffers and the segment: gather puts, scatter reads, tensors as
read targets (the path CUDA tensors take on a GPU machine; here the CPU build of torch
runs the same code), and verified reads without holds."""

import numpy as np
import pytest
import torch

from kvstore.errors import ChecksumMismatch, InvalidSize

from conftest import corrupt_object


def test_put_of_parts_is_one_object(daemon):
    with daemon.client() as c:
        a, b = torch.arange(10, dtype=torch.float32), np.arange(5, dtype=np.int64)
        assert c.put("g", [a, b, b"tail"]) is True
        assert c.size_of("g") == 40 + 40 + 4
        assert c.read("g") == a.numpy().tobytes() + b.tobytes() + b"tail"
        assert c.put("g", [b"x"]) is False                       # existing key: first value kept
        big = torch.randn(600_000)                                # > ONE_TXN_PUT: the chunked path
        assert c.put("big", [big, big]) and c.read("big") == big.numpy().tobytes() * 2


def test_read_into_tensors_and_scatter(daemon):
    with daemon.client() as c:
        src = torch.randn(4, 256, dtype=torch.bfloat16)
        c.put("t", src)
        out = torch.zeros_like(src)
        assert c.read("t", out=out) == src.numel() * 2 and torch.equal(out, src)
        halves = [torch.zeros(2, 256, dtype=torch.bfloat16), torch.zeros(2, 256, dtype=torch.bfloat16)]
        assert c.read("t", out=halves) == src.numel() * 2
        assert torch.equal(torch.cat(halves), src)
        c.put("u", torch.ones(3))
        o1, o2 = torch.zeros(4, 256, dtype=torch.bfloat16), torch.zeros(3)
        assert c.read_many(["t", "missing", "u"], [o1, None, o2]) == [src.numel() * 2, None, 12]
        assert torch.equal(o1, src) and torch.equal(o2, torch.ones(3))
        # a KV-cache-like slice: one block of a [2, blocks, ...] cache is not contiguous
        cache = torch.zeros(2, 8, 16)
        with pytest.raises(InvalidSize, match="contiguous"):
            c.read("u", out=cache[:, 3])
        with pytest.raises(InvalidSize, match="room for 4 bytes"):
            c.read("u", out=torch.zeros(1))
        ro = c.get_tensor("u", dtype=torch.float32)
        with pytest.raises(InvalidSize, match="read-only"):
            c.read("u", out=ro)                                    # a view of a sealed object
        c.release("u")
        assert c.stats()["used"] > 0 and c._reader.held == {}            # reads leave no holds behind


def test_read_many_errors_return_mode(daemon):
    with daemon.client() as c:
        c.put("a", b"a" * 100)
        c.put("b", b"b" * 100)
        small = bytearray(10)
        got = c.read_many(["a", "b"], [bytearray(100), small], errors="return")
        assert got[0] == 100 and isinstance(got[1], InvalidSize)
        with pytest.raises(InvalidSize):
            c.read_many(["a", "b"], [bytearray(100), small])
        assert c.read("b") == b"b" * 100                          # nothing changed


def test_optimistic_read_falls_back_and_catches_corruption(daemon):
    with daemon.client() as c:
        c.put("x", b"x" * 5000)
        corrupt_object(c, "x", 4999)
        out = torch.zeros(5000, dtype=torch.uint8)
        with pytest.raises(ChecksumMismatch):
            c.read("x", out=out)
        assert not c.contains("x")                                 # dropped, never served again


def test_reads_count_as_use_for_eviction(make_daemon):
    d = make_daemon(size="8MiB")
    with d.client() as c:
        c.put("hot", b"h" * (1 << 20))
        for i in range(30):                                        # 30 MiB through an 8 MiB store
            c.put(f"cold{i}", b"c" * (1 << 20))
            assert c.read("hot") is not None, f"the hot object was evicted after {i} puts"


def test_optimistic_read_never_returns_bytes_replaced_mid_copy(daemon, monkeypatch):
    """Fault injection at the two points where a reader without a hold can be overtaken:
    after its lookup another client deletes K and stores J in K's extent, and after the
    copy, before the hash, puts K back (keys are content hashes: re-putting K is normal).
    The copy holds J's bytes; the read must not pass them off as K's."""
    import kvstore.checksum as ck
    with daemon.client() as c, daemon.client() as other:
        K, J, vk, vj = b"K" * 8, b"J" * 8, b"k" * 4096, b"j" * 4096
        c.put(K, vk)
        reader, real_lookup, real_sum = c._reader, c._reader.lookup, ck._h64
        state = {"armed": False}

        def lookup(k):
            r = real_lookup(k)
            monkeypatch.setattr(reader, "lookup", real_lookup)
            other.delete(K)
            buf = other.create(J, len(vj))        # the daemon's best fit: K's freed extent
            buf[:] = vj
            other.seal(J)
            assert other._reader.lookup(other._ns + J).offset == r.offset   # J took K's extent
            state["armed"] = True                 # the next hash is the reader's, after its copy
            return r

        def checksum(data):
            if state["armed"]:
                state["armed"] = False
                other.delete(J)
                other.put(K, vk)
            return real_sum(data)
        monkeypatch.setattr(reader, "lookup", lookup)
        monkeypatch.setattr(ck, "_h64", checksum)       # the hash of what landed
        out = bytearray(4096)
        assert c.read_many([K], [out]) == [4096]
        assert bytes(out) == vk
