"""The peer transport: read extents of a remote daemon's segment into local buffers.

Owns: the one interface every transport implements (TCP now, loopback for unit tests,
RDMA READ later through pyverbs), and the shapes of what crosses it. Callers (the
daemon's fetcher) see only this module's names, so a transport plugs in without
changing them: ``open_transport(name, ...)`` picks the implementation, as py-lmdb picks
cpython or cffi at import.

The shape follows Mooncake's transfer request (read, target segment, offset, length),
with one difference that is the security rule of the cluster: a request names an
*object* (its stored key, the extent the holder's location record gave, and the
holder's incarnation), never a bare address. The holder's ``Resolver`` checks that the
extent is a sealed object its index lists under that key in that incarnation, and holds
it (a read lease) until the bytes are sent, so it cannot be evicted or reused under the
read. The reader verifies the checksum of what arrived before anything is sealed
(kvstore.checksum), so a block changed under the read anyway is caught, never served.

Contract (tests/test_transport_contract.py runs it against every implementation):
- ``read(peer, ops, bufs, timeout)`` fills ``bufs[i]`` (a writable buffer of exactly
  ``ops[i].size`` bytes, typically a slice of the local segment) with the object's
  bytes, and returns one entry per op: None when the bytes are in place, else the
  TransportError (a subclass naming the stage) for that op. An op that failed leaves its
  buffer's content undefined; the caller never seals it.
- A peer that is down, refuses, stops answering or dies mid-transfer costs at most
  ``timeout`` seconds in all for the call, never a hang; a failed connection is dropped
  and made again on the next call (links reconnect by themselves after a peer restart).
- ``read`` may be called from several threads at once; each implementation says how it
  shares connections.
- Nothing a peer sends can make ``read`` write outside the buffers it was given.
- ``read(..., on_piece=f)``: the caller hashes while the bytes arrive. Each op's bytes
  are cut into pieces of at most ``PIECE`` bytes starting at multiples of ``PIECE``
  within the object (the unit of the two-level checksum, kvstore.checksum.CHUNK), and
  ``f(i, off, view)`` is called once for each piece of op i after all of its bytes
  landed (view: that piece of the caller's buffer), from whichever thread received it
  (several at once), before ``read`` returns. Every piece of an op that succeeds is
  reported exactly once; pieces of an op that fails may or may not be. An exception in
  ``f`` fails that op (TransportError), never the others or the link.

Must never: let a request name a raw address; write into a buffer past its size;
return success for bytes it did not receive; block past the timeout.
"""

from typing import NamedTuple

from kvstore.checksum import CHUNK as PIECE
from kvstore.errors import InvalidSize

__all__ = ["PIECE", "PeerAddr", "ReadOp", "Served", "Resolver", "Transport", "TransportServer",
           "buffer_views", "pieces_of", "report_piece"]


class PeerAddr(NamedTuple):
    """Where a peer daemon serves its peer protocol."""
    host: str
    port: int

    def __str__(self):
        return f"{self.host}:{self.port}"


class ReadOp(NamedTuple):
    """One object to read from a holder: what its location record says."""
    key: bytes            # the stored key (namespace prefix included)
    offset: int           # where the holder's record says the object starts
    size: int             # its length in bytes
    incarnation: int      # the holder's daemon run that announced it (a restart voids it)


class Served(NamedTuple):
    """What a holder's Resolver grants for one ReadOp: the bytes to send are
    ``size`` bytes at ``offset`` of the segment file ``fd`` (or of ``buf`` when there is
    no file, as in the loopback transport); ``release()`` ends the read lease."""
    fd: int
    offset: int
    size: int
    release: object
    buf: object = None


class Resolver:
    """The holder's side: turns a ReadOp into a Served (a lease on a sealed object), or
    raises kvstore.errors.ObjectGoneOnPeer when its index does not list that object at
    that extent in that incarnation. Implemented by the daemon's peer server."""

    def resolve(self, op):
        raise NotImplementedError

    # Optional: ``resolve_many(ops)`` -> [Served or the exception of that op], one pass for
    # every part of a request (the TCP server uses it when a READ has several parts).
    #
    # Optional: ``peek(op)`` -> (fd, offset, still) or None, for a small object the server
    # copies at once (pread) instead of holding it: no lease is taken; the server copies
    # the bytes, then calls ``still()``, which is True only if the index listed the object
    # unchanged from before the peek until after the copy (a seqlock re-check), so the
    # copied bytes are that object's. False or None: the server falls back to resolve().
    # Raises ObjectGoneOnPeer like resolve.


class Transport:
    """The reader's side. ``name`` is what membership announces ("tcp", "rdma")."""

    name = "base"

    def read(self, peer, ops, bufs, timeout, on_piece=None):
        raise NotImplementedError

    def close(self):
        pass


class TransportServer:
    """The holder's side of a transport: serves ReadOps through a Resolver until
    closed. ``address`` is what it listens on (a TCP port, or the loopback registry)."""

    address = None

    def close(self):
        pass


def pieces_of(size):
    """(offset, length) of an object's pieces for ``on_piece`` (one for an empty one)."""
    if size <= PIECE:
        return [(0, size)]
    return [(at, min(PIECE, size - at)) for at in range(0, size, PIECE)]


def report_piece(on_piece, i, off, view, results, err):
    """Call on_piece for one landed piece; an exception in it fails op i (results[i]
    gets ``err(exc)`` unless it already holds an error), never the link."""
    try:
        on_piece(i, off, view)
    except Exception as e:                  # noqa: BLE001 (the caller's bug fails its op)
        if results[i] is None:
            results[i] = err(e)


def buffer_views(ops, bufs):
    """The callers' buffers as writable flat byte views, one per op and each exactly the
    op's size; InvalidSize (before anything is sent) for any other shape. Every
    transport's ``read`` starts here."""
    if len(bufs) != len(ops):
        raise InvalidSize(f"read got {len(ops)} ops but {len(bufs)} buffers")
    views = []
    for op, b in zip(ops, bufs):
        v = memoryview(b)
        if v.readonly:
            raise InvalidSize(f"the buffer for {op.key!r} is read-only")
        v = v.cast("B") if v.format != "B" or v.ndim != 1 else v
        if v.nbytes != op.size:
            raise InvalidSize(f"the buffer for {op.key!r} holds {v.nbytes} bytes, the op {op.size}")
        views.append(v)
    return views
