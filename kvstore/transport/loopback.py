"""The loopback peer transport: a holder and a reader in one process, for unit tests of
the daemon's fetch path without sockets.

Owns: a process-wide registry of LoopbackServers by address (PeerAddr("loopback", n));
LoopbackTransport.read resolves each op through that server's Resolver in the calling
thread, copies the bytes from ``Served.buf`` (or pread from ``Served.fd``) into the
caller's buffer and releases the lease in a ``finally``, honouring the same contract as
TCP: one result per op, ObjectGoneOnPeer when resolve says so (the other ops go on),
PeerUnreachable for an address nobody serves (a closed server), PeerAuthFailed when the
two sides were given different secrets, TransferTimeout for the ops left when the
deadline passes. A server made again under the same number (``port=``) is found by an
existing transport, as a restarted peer is.
Must never: copy more than an op's size into its buffer; call a closed server's Resolver;
be used across processes (it is not a network).
"""

import hmac
import itertools
import os
import threading
import time

from kvstore.errors import (ClientClosed, ObjectGoneOnPeer, PeerAuthFailed, PeerUnreachable,
                            TransferTimeout, TransportError)

from .base import PeerAddr, Transport, TransportServer, buffer_views, pieces_of, report_piece

_registry = {}
_lock = threading.Lock()
_numbers = itertools.count(1)


class LoopbackServer(TransportServer):
    """Registers a Resolver under PeerAddr("loopback", port) until closed."""

    name = "loopback"

    def __init__(self, resolver, port=0, secret=None):
        self.resolver = resolver
        self.secret = None if secret is None else bytes(secret)
        with _lock:
            if port == 0:
                port = next(_numbers)
                while PeerAddr("loopback", port) in _registry:
                    port = next(_numbers)
            self.address = PeerAddr("loopback", port)
            if self.address in _registry:
                raise TransportError(f"{self.address} is already served in this process", self.address,
                                     stage="connect")
            _registry[self.address] = self

    def close(self):
        with _lock:
            if _registry.get(self.address) is self:
                del _registry[self.address]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LoopbackTransport(Transport):
    """Reads from LoopbackServers of this process."""

    name = "loopback"

    def __init__(self, secret=None, **_ignored):
        self.secret = None if secret is None else bytes(secret)
        self._closed = False

    def read(self, peer, ops, bufs, timeout, on_piece=None):
        if self._closed:
            raise ClientClosed("this LoopbackTransport was closed")
        deadline = time.monotonic() + timeout
        peer = PeerAddr(*peer)
        ops = list(ops)
        views = buffer_views(ops, bufs)
        with _lock:
            server = _registry.get(peer)
        if server is None:
            return [PeerUnreachable(f"nothing serves {peer} in this process", peer)] * len(ops)
        if server.secret is not None or self.secret is not None:
            if (server.secret is None or self.secret is None
                    or not hmac.compare_digest(server.secret, self.secret)):
                err = PeerAuthFailed(f"{peer} and this reader hold different cluster secrets: give every "
                                     f"daemon the same --cluster-secret-file")
                err.peer, err.stage = peer, "connect"
                return [err] * len(ops)
        results = []
        for op, view in zip(ops, views):
            if time.monotonic() > deadline:
                results.append(TransferTimeout(f"{peer} did not deliver within {timeout:g} s", peer))
                continue
            try:
                served = server.resolver.resolve(op)
            except ObjectGoneOnPeer as e:
                results.append(ObjectGoneOnPeer(f"{peer} no longer holds it: {e}", peer))
                continue
            except Exception as e:
                results.append(TransportError(f"{peer} failed to serve it ({type(e).__name__}: {e})", peer))
                continue
            try:
                if served.size != op.size:
                    raise ObjectGoneOnPeer(f"{peer} no longer holds it: the object at that extent is "
                                           f"{served.size} bytes, not {op.size}", peer)
                if served.buf is not None:
                    view[:] = memoryview(served.buf).cast("B")[served.offset:served.offset + op.size]
                else:
                    got = 0
                    while got < op.size:
                        k = os.preadv(served.fd, [view[got:]], served.offset + got)
                        if k <= 0:
                            raise TransportError(f"{peer}'s segment file ended inside the object", peer)
                        got += k
                results.append(None)
            except TransportError as e:
                results.append(e)
            finally:
                served.release()
            if on_piece is not None and results[-1] is None:
                i = len(results) - 1
                for off, n in pieces_of(op.size):
                    report_piece(on_piece, i, off, view[off:off + n], results,
                                 lambda e: TransportError(f"on_piece failed: {e!r}", peer))
        return results

    def close(self):
        self._closed = True
