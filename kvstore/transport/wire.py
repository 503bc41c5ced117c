"""The TCP peer transport's frames: what a reader asks a holder and how the holder answers,
each message an encode/decode pair (Plasma style), after the link passed the handshake of
kvstore.cluster.auth.

Owns: the frame header (4-byte little-endian payload length, 1-byte type), the READ
request, the RESULT answer and the limits that bound both. One request is in flight per
connection; the answer to a READ of n parts is

  RESULT header | n status entries (status u8, length u64) | the bytes of every part whose
  status is OK, in request order, each exactly its length | the UTF-8 reasons of the
  failed parts, in order, each the length its entry gave

so the reader knows where every byte goes before the first data byte arrives, and scatters
them straight into its buffers (recvmsg_into) with no staging copy. A READ part names an
object (key, offset, size, incarnation: kvstore.transport.base.ReadOp) and a range of it
(part_off, part_len), which is how one large object is split across several connections;
the holder's Resolver still checks the whole object.
Must never: allocate what a length field claims before checking it against the limits;
accept a frame that does not decode completely; name a raw address.
"""

import struct

from kvstore.errors import ProtocolError
from kvstore.keys import MAX_KEY_BYTES

from .base import ReadOp

_HEADER = struct.Struct("<IB")
HEADER_SIZE = _HEADER.size
READ, RESULT = 1, 2
NAMES = {READ: "READ", RESULT: "RESULT"}

#: Most parts in one READ (a reader splits larger batches into several requests).
MAX_OPS = 1024
#: Most bytes one READ may ask for (its parts' lengths together).
MAX_BYTES = 1 << 30
#: Longest reason a holder gives for a failed part.
MAX_REASON = 512
#: Largest READ payload: MAX_OPS parts with the longest keys.
_PART = struct.Struct("<QQQQQH")   # offset, size, incarnation, part_off, part_len, key length
MAX_READ_PAYLOAD = 4 + MAX_OPS * (_PART.size + MAX_KEY_BYTES)
_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<BQ")       # status, length (data bytes when OK, reason bytes else)
ENTRY_SIZE = _ENTRY.size

#: Part statuses.
OK, GONE, REFUSED, FAILED = 0, 1, 2, 3
STATUS_NAMES = {OK: "ok", GONE: "gone", REFUSED: "refused", FAILED: "failed"}


class Part:
    """One range of one object a READ asks for."""

    __slots__ = ("op", "part_off", "part_len")

    def __init__(self, op, part_off=0, part_len=None):
        self.op = op
        self.part_off = part_off
        self.part_len = op.size if part_len is None else part_len

    def __repr__(self):
        return f"Part({self.op.key!r}@{self.op.offset}+{self.part_off}:{self.part_len})"


def header(mtype, length):
    return _HEADER.pack(length, mtype)


def read_header(data):
    """(type, payload length) of a frame header; ProtocolError for an unknown type."""
    length, mtype = _HEADER.unpack(data)
    if mtype not in NAMES:
        raise ProtocolError(f"unknown peer frame type {mtype}")
    return mtype, length


def read_request(parts):
    """A READ frame (header included) asking for parts (a list of Part)."""
    if not parts or len(parts) > MAX_OPS:
        raise ProtocolError(f"a READ carries 1 to {MAX_OPS} parts, not {len(parts)}")
    out = [_COUNT.pack(len(parts))]
    total = 0
    for p in parts:
        op = p.op
        key = bytes(op.key)
        if not key or len(key) > MAX_KEY_BYTES:
            raise ProtocolError(f"a READ key is 1 to {MAX_KEY_BYTES} bytes, not {len(key)}")
        if p.part_off < 0 or p.part_len < 0 or p.part_off + p.part_len > op.size:
            raise ProtocolError(f"part {p.part_off}+{p.part_len} lies outside the object of {op.size} bytes")
        total += p.part_len
        out.append(_PART.pack(op.offset, op.size, op.incarnation, p.part_off, p.part_len, len(key)))
        out.append(key)
    if total > MAX_BYTES:
        raise ProtocolError(f"a READ asks for at most {MAX_BYTES} bytes, not {total}")
    payload = b"".join(out)
    return header(READ, len(payload)) + payload


def decode_read(payload):
    """The parts of a READ payload; ProtocolError unless it decodes completely."""
    if len(payload) < _COUNT.size:
        raise ProtocolError("READ payload too short")
    (n,) = _COUNT.unpack_from(payload, 0)
    if not 1 <= n <= MAX_OPS:
        raise ProtocolError(f"READ of {n} parts (1 to {MAX_OPS} allowed)")
    at = _COUNT.size
    parts = []
    for _ in range(n):
        if at + _PART.size > len(payload):
            raise ProtocolError("READ payload truncated")
        offset, size, inc, part_off, part_len, klen = _PART.unpack_from(payload, at)
        at += _PART.size
        if not 1 <= klen <= MAX_KEY_BYTES or at + klen > len(payload):
            raise ProtocolError(f"READ key of {klen} bytes (1 to {MAX_KEY_BYTES}) or truncated")
        key = bytes(payload[at:at + klen])
        at += klen
        if part_off + part_len > size:
            raise ProtocolError(f"READ part {part_off}+{part_len} outside its object of {size} bytes")
        parts.append(Part(ReadOp(key, offset, size, inc), part_off, part_len))
    if at != len(payload):
        raise ProtocolError(f"READ payload has {len(payload) - at} trailing bytes")
    return parts


def result_head(entries):
    """The RESULT header and status block; entries are (status, length) pairs."""
    body = b"".join(_ENTRY.pack(s, n) for s, n in entries)
    return header(RESULT, len(body)) + body


def result_size(n):
    """Bytes of the RESULT header and status block for n parts."""
    return HEADER_SIZE + n * ENTRY_SIZE


def decode_result_head(data, parts):
    """The (status, length) entries of a RESULT head for these parts. ProtocolError when
    the frame is not a RESULT of exactly that many entries, a status is unknown, an OK part
    claims other than the bytes asked for, or a reason is longer than MAX_REASON: the
    reader then drops the connection, having written nothing."""
    mtype, length = read_header(data[:HEADER_SIZE])
    if mtype != RESULT or length != len(parts) * ENTRY_SIZE:
        raise ProtocolError(f"expected a RESULT of {len(parts)} entries, got {NAMES[mtype]} of {length} bytes")
    entries = []
    for i, p in enumerate(parts):
        status, n = _ENTRY.unpack_from(data, HEADER_SIZE + i * ENTRY_SIZE)
        if status not in STATUS_NAMES:
            raise ProtocolError(f"unknown part status {status}")
        if status == OK and n != p.part_len:
            raise ProtocolError(f"peer claims {n} bytes for a part of {p.part_len}")
        if status != OK and n > MAX_REASON:
            raise ProtocolError(f"peer sends a reason of {n} bytes (at most {MAX_REASON})")
        entries.append((status, n))
    return entries


def reason(text):
    """A failure reason, cut to MAX_REASON bytes of UTF-8."""
    return str(text).encode("utf-8", "replace")[:MAX_REASON]
