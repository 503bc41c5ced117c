"""The peer control protocol: what daemons say to each other about locations, each
message an encode/decode pair (Plasma's habit), carried on an authenticated link
(kvstore.cluster.auth) in frames of a 4-byte little-endian payload length and a 1-byte
type.

Owns: the messages LOOKUP (keys) -> LOCATIONS (per key, its holders' records), ANNOUNCE
(a holder's batch of records under its incarnation) and WITHDRAW (keys it no longer
holds) -> OK (a count), DELETE (keys to drop from the receiving daemon's store) -> OK,
REPLICATE (objects of the sender to pull and keep) -> OK, VERIFY (keys whose bytes the
sender found corrupt: check them against their checksums and drop the bad ones) -> OK
(how many were dropped), INFO -> INFO_REPLY (the
receiver's incarnation, transport port and free bytes), and ERROR (a code from
kvstore.errors and a message); the limits that bound them.
The bytes of objects do not travel here: kvstore.transport moves them.
Must never: allocate what a length field claims before checking it against the bytes
present and the limits; accept a payload that does not decode completely (trailing
bytes are an error too); let a decoder raise anything but ProtocolError.
"""

import struct

from kvstore.errors import ProtocolError
from kvstore.keys import MAX_KEY_BYTES

LOOKUP, LOCATIONS, ANNOUNCE, WITHDRAW, OK, ERROR, DELETE = 1, 2, 3, 4, 5, 6, 7
INFO, INFO_REPLY, REPLICATE, VERIFY = 8, 9, 10, 11
NAMES = {LOOKUP: "LOOKUP", LOCATIONS: "LOCATIONS", ANNOUNCE: "ANNOUNCE", WITHDRAW: "WITHDRAW",
         OK: "OK", ERROR: "ERROR", DELETE: "DELETE", INFO: "INFO", INFO_REPLY: "INFO_REPLY",
         REPLICATE: "REPLICATE", VERIFY: "VERIFY"}
#: Largest payload of one frame; an announcement of more records is split.
MAX_PAYLOAD = 8 << 20
#: Most keys one LOOKUP, WITHDRAW or DELETE may carry, and records one ANNOUNCE.
MAX_ITEMS = 65536
#: Most holders one key's record list may name.
MAX_HOLDERS = 64
MAX_ID = 255                      # bytes of a member id ("host:port")

HEADER = struct.Struct("<IB")
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_REC = struct.Struct("<QQQ")      # offset, size, checksum
_LOC = struct.Struct("<QQQQ")     # incarnation, offset, size, checksum


def frame(mtype, payload):
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"{NAMES.get(mtype, mtype)}: payload of {len(payload)} bytes is over "
                            f"the {MAX_PAYLOAD}-byte limit; send it in smaller batches")
    return HEADER.pack(len(payload), mtype) + payload


def read_header(raw):
    """(payload length, type) of a 5-byte header; refuses a length over the limit or an
    unknown type before anything is read or allocated."""
    n, mtype = HEADER.unpack(raw)
    if mtype not in NAMES:
        raise ProtocolError(f"unknown peer message type {mtype}")
    if n > MAX_PAYLOAD:
        raise ProtocolError(f"peer frame of {n} bytes is over the {MAX_PAYLOAD}-byte limit")
    return n, mtype


class _Reader:
    def __init__(self, payload, what):
        self.b, self.at, self.what = memoryview(payload), 0, what

    def take(self, n):
        if n < 0 or self.at + n > len(self.b):
            raise ProtocolError(f"{self.what}: truncated")
        v = self.b[self.at:self.at + n]
        self.at += n
        return v

    def u(self, st):
        return st.unpack(self.take(st.size))[0]

    def blob(self, limit, name):
        n = self.u(_U16)
        if n > limit:
            raise ProtocolError(f"{self.what}: {name} of {n} bytes is over the {limit}-byte limit")
        return bytes(self.take(n))

    def key(self):
        k = self.blob(MAX_KEY_BYTES + 256, "key")
        if not k:
            raise ProtocolError(f"{self.what}: empty key")
        return k

    def ident(self):
        try:
            s = self.blob(MAX_ID, "member id").decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what}: member id is not UTF-8") from None
        if not s:
            raise ProtocolError(f"{self.what}: empty member id")
        return s

    def count(self, limit=MAX_ITEMS):
        n = self.u(_U32)
        if n > limit:
            raise ProtocolError(f"{self.what}: {n} items is over the {limit} limit")
        return n

    def end(self):
        if self.at != len(self.b):
            raise ProtocolError(f"{self.what}: {len(self.b) - self.at} bytes after the message")


def _blob(b):
    return _U16.pack(len(b)) + b


def _keys(keys):
    if len(keys) > MAX_ITEMS:
        raise ProtocolError(f"{len(keys)} keys is over the {MAX_ITEMS} limit; split the batch")
    return _U32.pack(len(keys)) + b"".join(_blob(k) for k in keys)


def _read_keys(payload, what):
    r = _Reader(payload, what)
    keys = [r.key() for _ in range(r.count())]
    r.end()
    return keys


def lookup(keys):
    return frame(LOOKUP, _keys(keys))


def read_lookup(payload):
    return _read_keys(payload, "LOOKUP")


def locations(found):
    """found: {key: [Location-like (holder, incarnation, offset, size, checksum)]}."""
    parts = [_U32.pack(len(found))]
    for key, locs in found.items():
        locs = list(locs)[:MAX_HOLDERS]
        parts.append(_blob(key) + _U16.pack(len(locs)))
        for loc in locs:
            parts.append(_blob(loc.holder.encode()) + _LOC.pack(loc.incarnation, loc.offset, loc.size,
                                                                loc.checksum))
    return frame(LOCATIONS, b"".join(parts))


def read_locations(payload):
    """{key: [(holder, incarnation, offset, size, checksum), ...]}."""
    r = _Reader(payload, "LOCATIONS")
    out = {}
    for _ in range(r.count()):
        key = r.key()
        n = r.u(_U16)
        if n > MAX_HOLDERS:
            raise ProtocolError(f"LOCATIONS: {n} holders of one key is over the {MAX_HOLDERS} limit")
        out[key] = [(r.ident(), *_LOC.unpack(r.take(_LOC.size))) for _ in range(n)]
    r.end()
    return out


def announce(holder, incarnation, items):
    """items: [(key, offset, size, checksum)]."""
    if len(items) > MAX_ITEMS:
        raise ProtocolError(f"{len(items)} records is over the {MAX_ITEMS} limit; split the batch")
    body = [_blob(holder.encode()), _U64.pack(incarnation), _U32.pack(len(items))]
    body += [_blob(k) + _REC.pack(off, size, csum) for k, off, size, csum in items]
    return frame(ANNOUNCE, b"".join(body))


def read_announce(payload):
    """(holder, incarnation, [(key, offset, size, checksum)])."""
    r = _Reader(payload, "ANNOUNCE")
    holder, inc = r.ident(), r.u(_U64)
    items = [(r.key(), *_REC.unpack(r.take(_REC.size))) for _ in range(r.count())]
    r.end()
    return holder, inc, items


def withdraw(holder, incarnation, keys):
    return frame(WITHDRAW, _blob(holder.encode()) + _U64.pack(incarnation) + _keys(keys))


def read_withdraw(payload):
    r = _Reader(payload, "WITHDRAW")
    holder, inc = r.ident(), r.u(_U64)
    keys = [r.key() for _ in range(r.count())]
    r.end()
    return holder, inc, keys


def delete(keys):
    return frame(DELETE, _keys(keys))


def read_delete(payload):
    return _read_keys(payload, "DELETE")


def verify(keys):
    return frame(VERIFY, _keys(keys))


def read_verify(payload):
    return _read_keys(payload, "VERIFY")


def ok(count=0):
    return frame(OK, _U64.pack(count))


def read_ok(payload):
    r = _Reader(payload, "OK")
    n = r.u(_U64)
    r.end()
    return n


def error(code, message):
    return frame(ERROR, _U16.pack(code) + message.encode("utf-8", "replace")[:4096])


def read_error(payload):
    """(code, message)."""
    r = _Reader(payload, "ERROR")
    code = r.u(_U16)
    rest = bytes(r.take(len(r.b) - r.at))
    return code, rest.decode("utf-8", "replace")


def info():
    return frame(INFO, b"")


def read_info(payload):
    if payload:
        raise ProtocolError("INFO: carries no payload")
    return None


def info_reply(fields):
    """INFO_REPLY: a JSON object (address, tcp_port, incarnation, free bytes, version)."""
    import json
    return frame(INFO_REPLY, json.dumps(fields).encode())


def read_info_reply(payload):
    import json
    try:
        v = json.loads(bytes(payload))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("INFO_REPLY: not JSON") from None
    if not isinstance(v, dict):
        raise ProtocolError("INFO_REPLY: not a JSON object")
    return v


def replicate(holder, incarnation, items):
    """REPLICATE: "pull these objects of mine and keep a replica" (ANNOUNCE's layout)."""
    return frame(REPLICATE, announce(holder, incarnation, items)[HEADER.size:])


def read_replicate(payload):
    return read_announce(payload)


DECODERS = {INFO: read_info, INFO_REPLY: read_info_reply, REPLICATE: read_replicate,
            LOOKUP: read_lookup, LOCATIONS: read_locations, ANNOUNCE: read_announce,
            WITHDRAW: read_withdraw, OK: read_ok, ERROR: read_error, DELETE: read_delete,
            VERIFY: read_verify}


def decode(mtype, payload):
    """The decoded body of any peer message; ProtocolError for anything malformed."""
    try:
        return DECODERS[mtype](payload)
    except ProtocolError:
        raise
    except (KeyError, struct.error, ValueError, OverflowError) as e:
        raise ProtocolError(f"{NAMES.get(mtype, mtype)}: malformed ({e})") from None
