"""Bad input of every kind gets a typed error that says what to do, and the daemon
keeps serving everyone else: wrong keys, sizes and values, misuse of the object life
cycle, calls after close or fork, and garbage on the socket (with a bounded fuzz)."""

import os
import random
import socket
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import run_py
from kvstore import protocol
from kvstore.errors import (AlreadySealed, ClientClosed, InvalidKey, InvalidKeyType, InvalidSize,
                            InvalidValue, NotCreator, ObjectNotFound, ProtocolError, ValueTooLarge)
from kvstore.keys import MAX_KEY_BYTES


@pytest.mark.parametrize("key", [1, None, 2.5, ["a"], {"a": 1}, object()])
def test_wrong_key_type(daemon, key):
    with daemon.client() as c:
        with pytest.raises(InvalidKeyType, match="str or bytes"):
            c.put(key, b"v")
        with pytest.raises(InvalidKeyType):
            c.get(key)
        with pytest.raises(InvalidKeyType):
            c.contains(key)


def test_empty_and_oversize_keys(daemon):
    with daemon.client() as c:
        for bad in ("", b""):
            with pytest.raises(InvalidKey, match="empty"):
                c.put(bad, b"v")
        with pytest.raises(InvalidKey, match=str(MAX_KEY_BYTES)):
            c.put(b"x" * (MAX_KEY_BYTES + 1), b"v")
        with pytest.raises(InvalidKey):
            c.put("é" * (MAX_KEY_BYTES // 2 + 1), b"v")      # counted in UTF-8 bytes
        assert c.put(b"x" * MAX_KEY_BYTES, b"v")              # the limit itself is fine
        assert c.stats()["objects"] == 1


def test_bad_sizes_and_values(daemon):
    with daemon.client() as c:
        with pytest.raises(InvalidSize, match="negative"):
            c.create("neg", -1)
        with pytest.raises(InvalidSize):
            c.create("float", 1.5)
        with pytest.raises(ValueTooLarge, match="larger --size"):
            c.create("huge", c.segment_size + 1)
        with pytest.raises(ValueTooLarge):
            c.put("huge", np.zeros(c.segment_size + 1, dtype=np.uint8))
        with pytest.raises(InvalidValue, match="cannot store"):
            c.put("obj", object())
        with pytest.raises(InvalidValue):
            c.put("str", "a str is not bytes")
        with pytest.raises(InvalidSize):
            c.put_many(["a", "b"], [b"1"])
        assert c.stats()["objects"] == 0 and c.verify() == []


def test_life_cycle_misuse(daemon):
    with daemon.client() as c, daemon.client() as other:
        with pytest.raises(ObjectNotFound, match="create"):
            c.seal("unknown")
        with pytest.raises(ObjectNotFound):
            c.abort("unknown")
        with pytest.raises(ObjectNotFound, match="get"):
            c.release("never-got")
        c.create("once", 4)
        with pytest.raises(NotCreator):
            other.seal("once")
        c.seal("once")
        with pytest.raises(AlreadySealed, match="once"):
            c.seal("once")
        with pytest.raises(AlreadySealed, match="delete"):
            c.abort("once")
        with pytest.raises(ObjectNotFound):
            c.pin("unknown")
        assert c.verify() == []


def test_calls_after_close(daemon):
    c = daemon.client()
    c.put("a", b"1")
    c.close()
    for call in (lambda: c.put("b", b"2"), lambda: c.get("a"), lambda: c.contains("a"),
                 lambda: c.delete("a"), lambda: c.create("c", 1), lambda: c.stats()):
        with pytest.raises(ClientClosed, match="new Client"):
            call()


def test_client_used_after_fork_refuses_in_child(daemon):
    c = daemon.client()
    c.put("f", b"parent")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            c.get("f")
        except ClientClosed:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert bytes(c.get("f")) == b"parent"       # the parent's client still works
    c.close()


def _raw(sock_path):
    from kvstore.client.connection import connect as _connect
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    _connect(s, sock_path, 5)
    return s


def _expect_error_then_close(s):
    mtype, body, _ = None, None, None
    try:
        protocol.recv_message(s)
    except ProtocolError:
        pass                                      # the daemon said why
    else:
        raise AssertionError("expected an ERROR frame")
    assert s.recv(10) == b""                      # then it closed the connection


def test_garbage_frames_get_an_error_and_a_close(daemon):
    cases = [
        b"GET / HTTP/1.1\r\n\r\n",                                  # some other protocol
        struct.pack("<IB", 0xFFFFFFF0, protocol.HELLO),            # huge length prefix
        struct.pack("<IB", 4, 99) + b"abcd",                       # unknown type
        struct.pack("<IB", 3, protocol.HELLO) + b"\xff\xfe\xfd",   # not UTF-8
        protocol.encode(protocol.HELLO, {"magic": "nope", "version": 1, "pid": 1}),
        protocol.encode(protocol.STATS, {}),                       # no HELLO first
    ]
    for frame in cases:
        s = _raw(daemon.socket)
        s.sendall(frame)
        _expect_error_then_close(s)
        s.close()
    with daemon.client() as c:                    # still serving
        assert c.put("after", b"garbage") and c.stats()["connected"] == 1


def test_garbage_sender_does_not_disturb_a_well_behaved_client(daemon):
    worker = run_py("""
        import sys
        from kvstore.client import Client
        c = Client(sys.argv[1])
        for i in range(3000):
            assert c.put("w%d" % i, b"v%d" % i) is True
            assert bytes(c.get("w%d" % i)) == b"v%d" % i
            c.release("w%d" % i)
            if i % 50 == 0:
                assert c.stats()["objects"] >= 1      # a socket round trip too
        print("clean")
    """, daemon.socket, background=True)
    rng = random.Random(7)
    stalled = []
    while worker.poll() is None:
        s = _raw(daemon.socket)
        if rng.random() < 0.3 and len(stalled) < 100:
            s.sendall(struct.pack("<IB", 1000, protocol.HELLO) + b"{")   # stalls mid-frame
            stalled.append(s)
            continue
        try:
            s.sendall(rng.randbytes(rng.randrange(1, 4000)))
        except OSError:
            pass
        s.close()
    out, err = worker.communicate()
    assert worker.returncode == 0 and "clean" in out, err
    with daemon.client() as c:                    # stalled peers block nobody
        assert c.stats()["objects"] == 3000
    for s in stalled:
        s.close()
    assert "Traceback" not in daemon.read_log()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(max_size=300), max_size=8))
def test_frame_reader_fuzz(chunks):
    """Any byte stream, in any chunking, yields messages or a ProtocolError, nothing else."""
    r = protocol.FrameReader()
    try:
        for ch in chunks:
            for mtype, body in r.feed(ch):
                assert isinstance(body, dict)
    except ProtocolError:
        pass


def test_socket_fuzz_bounded(daemon):
    """A bounded fuzz of the live daemon: mutated valid frames from many connections."""
    rng = random.Random(11)
    valid = [protocol.hello(1), protocol.encode(protocol.PING, {}), protocol.encode(protocol.STATS, {})]
    deadline = time.monotonic() + 5
    n = 0
    while time.monotonic() < deadline:
        data = bytearray(b"".join(rng.choice(valid) for _ in range(rng.randrange(1, 4))))
        for _ in range(rng.randrange(0, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        s = _raw(daemon.socket)
        try:
            s.sendall(bytes(data))
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except OSError:
            pass
        finally:
            s.close()
        n += 1
    assert n > 50
    with daemon.client() as c:
        assert c.put("alive", b"1") and c.stats()["connected"] == 1
    assert daemon.proc.poll() is None and "Traceback" not in daemon.read_log()


def test_peers_that_vanish_or_nest_deeply_do_not_stop_the_daemon(daemon):
    s = _raw(daemon.socket)                       # deeply nested JSON
    payload = b"[" * 100000 + b"]" * 100000
    s.sendall(struct.pack("<IB", min(len(payload), protocol.MAX_PAYLOAD), protocol.HELLO)
              + payload[:protocol.MAX_PAYLOAD])
    s.close()
    nested = b"[" * 30000 + b"]" * 30000
    s = _raw(daemon.socket)
    s.sendall(struct.pack("<IB", len(nested), protocol.STATS) + nested)
    s.close()
    for _ in range(20):                           # HELLO, then gone before the reply
        s = _raw(daemon.socket)
        s.sendall(protocol.hello(1))
        s.close()
    time.sleep(0.2)
    assert daemon.proc.poll() is None
    with daemon.client() as c:
        assert c.put("alive", b"1")
    assert "Traceback" not in daemon.read_log()
