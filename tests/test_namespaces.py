"""Namespaces: a client sees and touches only the objects of the namespace it chose at
connect (one per model or tenant); the same key in two namespaces is two objects."""

import pytest

from conftest import run_py
from kvstore.errors import InvalidKey, InvalidKeyType, ObjectNotFound


def test_namespaces_are_isolated(daemon):
    with daemon.client(namespace="model-a") as a, daemon.client(namespace="model-b") as b, \
            daemon.client() as default:
        assert a.put("block", b"A") and b.put("block", b"B")
        assert not default.contains("block") and default.get("block") is None
        assert bytes(a.get("block")) == b"A" and bytes(b.get("block")) == b"B"
        assert b.delete("block") and a.contains("block")       # b's delete touches only b's
        with pytest.raises(ObjectNotFound, match="'only-a'"):  # messages show the caller's key
            b.pin("only-a")
        assert a.stats()["objects"] == 1


def test_namespace_isolation_across_processes(daemon):
    with daemon.client(namespace="tenant-1") as c:
        c.put("secret", b"tenant-1 data")
    r = run_py("""
        import sys
        from kvstore.client import Client
        other = Client(sys.argv[1], namespace="tenant-2")
        assert other.get("secret") is None and not other.contains("secret")
        same = Client(sys.argv[1], namespace="tenant-1")
        print(bytes(same.get("secret")).decode())
    """, daemon.socket)
    assert r.stdout.strip() == "tenant-1 data"


def test_bad_namespaces(daemon):
    with pytest.raises(InvalidKey, match="64"):
        daemon.client(namespace="n" * 65)
    with pytest.raises(InvalidKeyType):
        daemon.client(namespace=b"bytes")
    with daemon.client(namespace="é" * 32) as c:             # 64 UTF-8 bytes: the limit
        assert c.put("k", b"v")
