"""Peer authentication: both daemons prove they know the cluster secret before any
request crosses a peer link, and agree on the peer-protocol version.

Owns: reading the secret file (``load_secret``) and the handshake, both directions
(``dial_handshake`` for the side that connected, ``accept_handshake`` for the side that
accepted). HMAC-SHA256 challenge and response over fresh random nonces from each side,
so a recorded handshake cannot be replayed and the secret never crosses the link:

  dialer  -> HELLO   magic, version, nonce_d
  acceptor-> PROOF   magic, version, status, nonce_a, HMAC(secret, "acceptor" nonce_d nonce_a)
  dialer  -> PROOF   HMAC(secret, "dialer" nonce_a nonce_d)
  acceptor-> VERDICT status

A version the acceptor does not speak is refused in its PROOF (status 1) and both sides
raise PeerIncompatible; a wrong proof on either side raises PeerAuthFailed there (the
acceptor also says so in its VERDICT, status 2, so the dialer's error is clear too).
Every read has a deadline: a peer that stops mid-handshake costs ``timeout``, no more.
Must never: send the secret or anything from which it can be computed offline faster
than by guessing; accept a request on a link before its VERDICT was ok; compare MACs
with ``==`` (hmac.compare_digest).
"""

import hashlib
import hmac
import os
import socket
import struct
import time

from kvstore.errors import ConfigError, PeerAuthFailed, PeerIncompatible, TransportError

MAGIC = b"KVSPEER\x00"
#: The peer-protocol version this daemon speaks (the handshake refuses any other).
#: 2: homes scored by fmix64(xxh3(key) ^ xxh3(member)) (kvstore.cluster.directory); a
#: daemon of version 1 would look keys up on other homes.
VERSION = 2
#: Shortest secret accepted: 16 bytes (128 bits) of whatever the file holds.
MIN_SECRET = 16
_NONCE = 32
_HELLO = struct.Struct(f"<8sH{_NONCE}s")
_PROOF = struct.Struct(f"<8sHB{_NONCE}s32s")
_OK, _INCOMPATIBLE, _DENIED = 0, 1, 2


def load_secret(path):
    """The cluster secret in the file at path (trailing newlines stripped). Raises
    ConfigError naming the field and the fix when it is missing, unreadable or short."""
    if not path:
        raise ConfigError("cluster_secret_file: a cluster needs a secret; create one with "
                          "`head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE` and pass "
                          "--cluster-secret-file FILE to every daemon")
    try:
        with open(path, "rb") as f:
            secret = f.read(1 << 16).rstrip(b"\r\n")
    except FileNotFoundError:
        raise ConfigError(f"cluster_secret_file: {path} does not exist; create it (e.g. "
                          f"`head -c 32 /dev/urandom | base64 > {path}`) and give every "
                          f"daemon the same file") from None
    except OSError as e:
        raise ConfigError(f"cluster_secret_file: cannot read {path} ({e.strerror}); make it "
                          f"readable by the daemon's user") from None
    if len(secret) < MIN_SECRET:
        raise ConfigError(f"cluster_secret_file: {path} holds {len(secret)} bytes; a secret "
                          f"needs at least {MIN_SECRET} (e.g. `head -c 32 /dev/urandom | base64`)")
    return secret


def _mac(secret, role, a, b):
    return hmac.new(secret, role + a + b, hashlib.sha256).digest()


def recv_exact(sock, n, deadline, peer="peer"):
    """n bytes from sock before the monotonic deadline, or TransportError."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransportError(f"{peer} did not answer within the handshake timeout", peer)
        sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:])
        except socket.timeout:
            continue
        except OSError as e:
            raise TransportError(f"the link to {peer} failed ({e.strerror or e})", peer) from None
        if k == 0:
            raise TransportError(f"{peer} closed the link during the handshake", peer)
        got += k
    return bytes(buf)


def _send(sock, data, deadline, peer):
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        sock.sendall(data)
    except OSError as e:
        raise TransportError(f"the link to {peer} failed ({e.strerror or e})", peer) from None


def dial_handshake(sock, secret, timeout=2.0, peer="peer"):
    """Authenticate a connection this side opened. Returns the peer's version."""
    deadline = time.monotonic() + timeout
    nonce_d = os.urandom(_NONCE)
    _send(sock, _HELLO.pack(MAGIC, VERSION, nonce_d), deadline, peer)
    magic, version, status, nonce_a, mac_a = _PROOF.unpack(recv_exact(sock, _PROOF.size, deadline, peer))
    if magic != MAGIC:
        raise PeerAuthFailed(f"{peer} does not speak the kvstore peer protocol (is --peers or "
                             f"the advertised address pointing at another service?)")
    if status == _INCOMPATIBLE or version != VERSION:
        raise PeerIncompatible(f"{peer} speaks peer protocol {version}, this daemon {VERSION}: "
                               f"run the same kvstore version on every host")
    if not hmac.compare_digest(mac_a, _mac(secret, b"acceptor", nonce_d, nonce_a)):
        try:                    # a proof that cannot pass: the acceptor logs a refusal too
            _send(sock, bytes(32), deadline, peer)
        except TransportError:
            pass
        raise PeerAuthFailed(f"{peer} could not prove it knows the cluster secret: give every "
                             f"daemon the same --cluster-secret-file")
    _send(sock, _mac(secret, b"dialer", nonce_a, nonce_d), deadline, peer)
    verdict = recv_exact(sock, 1, deadline, peer)[0]
    if verdict != _OK:
        raise PeerAuthFailed(f"{peer} refused this daemon's proof of the cluster secret: give "
                             f"every daemon the same --cluster-secret-file")
    return version


def accept_handshake(sock, secret, timeout=2.0, peer="peer"):
    """Authenticate a connection this side accepted; raises before any request is read."""
    deadline = time.monotonic() + timeout
    magic, version, nonce_d = _HELLO.unpack(recv_exact(sock, _HELLO.size, deadline, peer))
    if magic != MAGIC:
        raise PeerAuthFailed(f"{peer} sent something other than a kvstore peer hello")
    nonce_a = os.urandom(_NONCE)
    if version != VERSION:
        _send(sock, _PROOF.pack(MAGIC, VERSION, _INCOMPATIBLE, nonce_a, bytes(32)), deadline, peer)
        raise PeerIncompatible(f"{peer} speaks peer protocol {version}, this daemon {VERSION}: "
                               f"run the same kvstore version on every host")
    _send(sock, _PROOF.pack(MAGIC, VERSION, _OK, nonce_a, _mac(secret, b"acceptor", nonce_d, nonce_a)),
          deadline, peer)
    proof = recv_exact(sock, 32, deadline, peer)
    if not hmac.compare_digest(proof, _mac(secret, b"dialer", nonce_a, nonce_d)):
        try:
            _send(sock, bytes([_DENIED]), deadline, peer)
        except TransportError:
            pass
        raise PeerAuthFailed(f"{peer} could not prove it knows the cluster secret; nothing "
                             f"is served to it")
    _send(sock, bytes([_OK]), deadline, peer)
