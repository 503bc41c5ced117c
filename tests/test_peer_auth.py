"""Peer authentication (issue 10, security): HMAC challenge and response in both
directions over real TCP sockets on loopback, with a protocol version; a peer without
the secret, of another version, silent or sending garbage is refused within the
handshake timeout and never gets past it."""

import socket
import struct
import threading
import time

import pytest

from kvstore.cluster import auth
from kvstore.errors import PeerAuthFailed, PeerIncompatible, TransportError

SECRET = b"k" * 32


def pair():
    lst = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lst.getsockname())
    b, _ = lst.accept()
    lst.close()
    return a, b


def run_both(dial_secret, accept_secret, timeout=2.0):
    a, b = pair()
    out = {}

    def acceptor():
        try:
            auth.accept_handshake(b, accept_secret, timeout, "dialer")
            out["accept"] = "ok"
        except Exception as e:                       # noqa: BLE001
            out["accept"] = e
    t = threading.Thread(target=acceptor)
    t.start()
    try:
        auth.dial_handshake(a, dial_secret, timeout, "acceptor")
        out["dial"] = "ok"
    except Exception as e:                           # noqa: BLE001
        out["dial"] = e
    t.join(timeout + 1)
    a.close()
    b.close()
    return out


def test_same_secret_both_sides_pass():
    assert run_both(SECRET, SECRET) == {"accept": "ok", "dial": "ok"}


def test_a_dialer_without_the_secret_is_refused_and_told():
    out = run_both(b"x" * 32, SECRET)      # the dialer finds out first (it checks first)
    assert isinstance(out["accept"], PeerAuthFailed) and "nothing is served" in str(out["accept"])
    assert isinstance(out["dial"], PeerAuthFailed) and "cluster-secret-file" in str(out["dial"])


def test_an_acceptor_without_the_secret_is_not_trusted():
    out = run_both(SECRET, b"y" * 32)
    assert isinstance(out["dial"], PeerAuthFailed) and "could not prove" in str(out["dial"])
    assert isinstance(out["accept"], PeerAuthFailed)


def test_another_version_is_refused_with_a_clear_message():
    a, b = pair()
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("e", _catch(auth.accept_handshake, b, SECRET)))
    t.start()
    a.sendall(struct.pack("<8sH32s", auth.MAGIC, auth.VERSION + 1, b"n" * 32))
    reply = auth.recv_exact(a, struct.calcsize("<8sHB32s32s"), time.monotonic() + 2)
    t.join(3)
    assert reply[10] == 1                               # status: incompatible
    assert isinstance(box["e"], PeerIncompatible) and "peer protocol" in str(box["e"])
    a.close()
    b.close()


def _catch(fn, *args):
    try:
        fn(*args)
    except Exception as e:                           # noqa: BLE001
        return e
    return None


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b" " * 20, bytes(42),
                                     b"\xff" * 100])
def test_garbage_instead_of_a_hello_is_refused(garbage):
    a, b = pair()
    a.sendall(garbage)
    e = _catch(auth.accept_handshake, b, SECRET, 1.0)
    assert isinstance(e, PeerAuthFailed)
    a.close()
    b.close()


def test_a_silent_peer_costs_the_timeout_and_no_more():
    a, b = pair()
    t0 = time.monotonic()
    e = _catch(auth.accept_handshake, b, SECRET, 0.3)
    assert isinstance(e, TransportError) and time.monotonic() - t0 < 1.5
    t0 = time.monotonic()
    e = _catch(auth.dial_handshake, a, SECRET, 0.3)     # b never answers
    assert isinstance(e, TransportError) and time.monotonic() - t0 < 1.5
    a.close()
    b.close()


def test_a_replayed_proof_does_not_pass():
    """A recording of a good handshake, replayed: the acceptor's fresh nonce makes the
    recorded dialer proof worthless."""
    a, b = pair()
    rec = {}
    # record a real handshake's dialer side bytes through a relay
    hello = struct.pack("<8sH32s", auth.MAGIC, auth.VERSION, b"r" * 32)
    t = threading.Thread(target=lambda: rec.setdefault("e", _catch(auth.accept_handshake, b, SECRET)))
    t.start()
    a.sendall(hello)
    proof = auth.recv_exact(a, struct.calcsize("<8sHB32s32s"), time.monotonic() + 2)
    nonce_a = proof[11:43]
    good = auth._mac(SECRET, b"dialer", nonce_a, b"r" * 32)
    a.sendall(good)
    assert auth.recv_exact(a, 1, time.monotonic() + 2) == b"\x00"
    t.join(3)
    a.close()
    b.close()
    assert rec["e"] is None
    a, b = pair()                                        # replay the same two messages
    t = threading.Thread(target=lambda: rec.__setitem__("e", _catch(auth.accept_handshake, b, SECRET)))
    t.start()
    a.sendall(hello)
    auth.recv_exact(a, struct.calcsize("<8sHB32s32s"), time.monotonic() + 2)
    a.sendall(good)
    t.join(3)
    assert isinstance(rec["e"], PeerAuthFailed)
    a.close()
    b.close()
