"""The daemon's socket protocol: frames and the messages they carry, each an encode/decode pair.

Owns: the frame format (4-byte little-endian payload length, 1-byte message type, a
payload of at most MAX_PAYLOAD bytes), every message type with its encoder and decoder,
and the incremental FrameReader the daemon uses so that a peer sending garbage, a huge
length prefix or half a frame never blocks or crashes it. Control messages (hello,
welcome, stats, check, errors) carry UTF-8 JSON objects; the messages on the write path
carry fixed binary layouts (struct), since a put sends one.

The socket is how clients ask the daemon to change the store: SEAL items (a batch of
objects a client wrote into its arena, numbered by the client; they travel in the
client's seal ring, kvstore.slots, with the same encoding, and DOORBELL wakes a sleeping
daemon to read them),
GRANT (space for puts), RETURN (give space back), CREATE/ABORT (Plasma's two-step
path), DELETE, PIN, DROP (an object found corrupt), KEYS (list a namespace), TABLE (the
fd of the current published table), RECLAIM (free now what the caller's release
left unheld). Reads never cross it: clients look objects up in
the published table and read the segment directly. A client's hang-up is how the
daemon learns it is gone.
Must never: allocate what a length prefix claims before checking it, or accept a
payload that does not decode completely.
"""

import json
import os
import socket
import struct

from .errors import ProtocolError, StoreUnavailable, from_code
from .keys import MAX_KEY_BYTES, MAX_NAMESPACE_BYTES

VERSION = 3     # 3: the daemon is the only index writer (seal/grant/create/... messages)
MAGIC = "kvstore"
MAX_PAYLOAD = 64 << 10

_HEADER = struct.Struct("<IB")
HEADER_SIZE = _HEADER.size

HELLO, WELCOME, ERROR, STATS, STATS_REPLY, PING, PONG = 1, 2, 3, 4, 5, 6, 7
SEAL, GRANT, GRANTED, RETURN, CREATE, CREATED, ABORT, DONE = 10, 11, 12, 13, 14, 15, 16, 17
DELETE, PIN, DROP, KEYS, KEYS_REPLY, CHECK, CHECK_REPLY, TABLE, TABLE_REPLY = 18, 19, 20, 21, 22, 23, 24, 25, 26
RECLAIM, DOORBELL, BYE = 27, 28, 29
FETCH, FETCHED = 30, 31          # cluster: pull local misses from other hosts
LOCATE, LOCATED, DELETE_ALL = 32, 33, 34   # cluster: which keys exist anywhere; delete everywhere
REPLICATE_KEYS = 35              # cluster: place copies of these keys (held here) on other hosts

NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", ERROR: "ERROR", STATS: "STATS",
         STATS_REPLY: "STATS_REPLY", PING: "PING", PONG: "PONG", SEAL: "SEAL", GRANT: "GRANT",
         GRANTED: "GRANTED", RETURN: "RETURN", CREATE: "CREATE", CREATED: "CREATED",
         ABORT: "ABORT", DONE: "DONE", DELETE: "DELETE", PIN: "PIN", DROP: "DROP", KEYS: "KEYS",
         KEYS_REPLY: "KEYS_REPLY", CHECK: "CHECK", CHECK_REPLY: "CHECK_REPLY", TABLE: "TABLE",
         TABLE_REPLY: "TABLE_REPLY", RECLAIM: "RECLAIM",
         DOORBELL: "DOORBELL", BYE: "BYE", FETCH: "FETCH", FETCHED: "FETCHED",
         LOCATE: "LOCATE", LOCATED: "LOCATED", DELETE_ALL: "DELETE_ALL",
         REPLICATE_KEYS: "REPLICATE_KEYS"}
JSON_TYPES = frozenset((HELLO, WELCOME, ERROR, STATS, STATS_REPLY, PING, PONG, CHECK, CHECK_REPLY,
                        TABLE, TABLE_REPLY))
#: Messages a client may send (the daemon refuses the others from a client).
CLIENT_TYPES = frozenset((HELLO, STATS, PING, SEAL, GRANT, RETURN, CREATE, ABORT, DELETE, PIN,
                          DROP, KEYS, CHECK, TABLE, RECLAIM, DOORBELL, BYE, FETCH, LOCATE,
                          DELETE_ALL, REPLICATE_KEYS))

_SEAL_ITEM = struct.Struct("<QQQQBBHH")   # seq, offset, size, checksum, flags, _, replicas, key length
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_U64x2 = struct.Struct("<QQ")
_CREATE = struct.Struct("<QB")
_CREATED = struct.Struct("<BQ")
_U8 = struct.Struct("<B")
_KEYS = struct.Struct("<IHH")             # limit, prefix length, after length
_KLEN = struct.Struct("<H")
#: Most bytes of seal items in one SEAL frame.
SEAL_ITEM_OVERHEAD = _SEAL_ITEM.size


def frame(mtype, payload):
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"{NAMES.get(mtype, mtype)} message of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(len(payload), mtype) + payload


def encode(mtype, body):
    """A JSON control message."""
    return frame(mtype, json.dumps(body, separators=(",", ":")).encode())


def decode_json(mtype, payload):
    try:
        body = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("payload is not UTF-8 JSON; is this a kvstore client?") from None
    if not isinstance(body, dict):
        raise ProtocolError("payload is not a JSON object; is this a kvstore client?")
    return body


class FrameReader:
    """Feed bytes as they arrive; get complete (type, payload) messages out (payloads of
    JSON types decoded to dicts, binary ones as bytes)."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data):
        self._buf += data
        out = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            length, mtype = _HEADER.unpack_from(buf, pos)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame length {length} exceeds {MAX_PAYLOAD}; is this a kvstore client?")
            if mtype not in NAMES:
                raise ProtocolError(f"unknown message type {mtype}; is this a kvstore client?")
            end = pos + HEADER_SIZE + length
            if len(buf) < end:
                break
            payload = bytes(buf[pos + HEADER_SIZE:end])
            pos = end
            out.append((mtype, decode_json(mtype, payload) if mtype in JSON_TYPES else payload))
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self):
        return len(self._buf)


def _key(payload, at, n, what):
    if n == 0 or n > MAX_KEY_BYTES + MAX_NAMESPACE_BYTES + 1 or at + n > len(payload):
        raise ProtocolError(f"{what}: bad key length {n}")
    return bytes(payload[at:at + n])


def _exact(payload, size, what):
    if len(payload) < size:
        raise ProtocolError(f"{what} message too short ({len(payload)} bytes)")


# ---- hello / welcome -----------------------------------------------------------------------
def hello(pid, namespace="", resume=None):
    """resume: {"cid", "segment_id"} of a client reconnecting after a daemon restart."""
    body = {"magic": MAGIC, "version": VERSION, "pid": pid, "namespace": namespace}
    if resume is not None:
        body["resume"] = resume
    return encode(HELLO, body)


def read_hello(body):
    if body.get("magic") != MAGIC:
        raise ProtocolError("HELLO without the kvstore magic; is this a kvstore client?")
    if body.get("version") != VERSION:
        raise ProtocolError(f"protocol version {body.get('version')!r} is not {VERSION}; "
                            f"upgrade the client or the daemon so they match")
    pid = body.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise ProtocolError("HELLO pid must be a positive integer")
    ns = body.get("namespace", "")
    if not isinstance(ns, str) or len(ns.encode("utf-8", "surrogatepass")) > MAX_NAMESPACE_BYTES:
        raise ProtocolError(f"HELLO namespace must be a string of at most {MAX_NAMESPACE_BYTES} bytes")
    resume = body.get("resume")
    if resume is not None:
        if not (isinstance(resume, dict) and isinstance(resume.get("cid"), int)
                and isinstance(resume.get("segment_id"), str)):
            raise ProtocolError("HELLO resume must be {cid: int, segment_id: str}")
        resume = (resume["cid"], resume["segment_id"])
    return pid, ns, resume


def welcome(**fields):
    """cid, slot, segment_size, backing, segment_id, slots (layout), incarnation; the fds
    of the segment, the published table and the slots file travel with it."""
    return encode(WELCOME, fields)


def error(exc):
    return encode(ERROR, {"code": getattr(exc, "code", 1), "message": str(exc)[:4000]})


def raise_error(body):
    code = body.get("code", 1)
    message = body.get("message", "unknown error from the daemon")
    raise from_code(code if type(code) is int else 1, str(message))


# ---- the write path ------------------------------------------------------------------------
def seal_item(seq, key, offset, size, checksum, flags=0, replicas=1):
    return _SEAL_ITEM.pack(seq, offset, size, checksum, flags, 0, replicas, len(key)) + key


def seal(items):
    """A SEAL frame of encoded seal_item()s (their total must fit MAX_PAYLOAD)."""
    return frame(SEAL, b"".join(items))


def read_seal(payload):
    """[(seq, key, offset, size, checksum, flags, replicas)]"""
    out, err = read_seal_prefix(payload)
    if err is not None:
        raise err
    if not out:
        raise ProtocolError("SEAL without items")
    return out


def read_seal_prefix(payload):
    """(the whole items before the first bad one, the ProtocolError of that one or None):
    a dead client's corrupt seal ring still yields the puts queued before the damage."""
    out = []
    pos, n = 0, len(payload)
    try:
        while pos < n:
            if n - pos < _SEAL_ITEM.size:
                raise ProtocolError("SEAL: truncated item")
            seq, off, size, csum, flags, _, replicas, klen = _SEAL_ITEM.unpack_from(payload, pos)
            pos += _SEAL_ITEM.size
            key = _key(payload, pos, klen, "SEAL")
            pos += klen
            out.append((seq, key, off, size, csum, flags, replicas))
    except ProtocolError as e:
        return out, e
    return out, None


def grant(want, least):
    return frame(GRANT, _U64x2.pack(want, least))


def read_grant(payload):
    _exact(payload, _U64x2.size, "GRANT")
    return _U64x2.unpack_from(payload)


def granted(offset, size):
    return frame(GRANTED, _U64x2.pack(offset, size))


def read_granted(payload):
    _exact(payload, _U64x2.size, "GRANTED")
    return _U64x2.unpack_from(payload)


def give_back(start, end=None):
    """RETURN of the arena granted at start; with its end (the daemon finds the arena by
    its end: its start may have been freed and granted again meanwhile)."""
    return frame(RETURN, _U64.pack(start) + (b"" if end is None else _U64.pack(end)))


def read_give_back(payload):
    _exact(payload, _U64.size, "RETURN")
    return _U64.unpack_from(payload)[0]


def read_give_back_end(payload):
    """The end a RETURN names, or None (a client that sent only the start)."""
    return _U64.unpack_from(payload, _U64.size)[0] if len(payload) >= 2 * _U64.size else None


def create(key, size, pinned):
    return frame(CREATE, _CREATE.pack(size, 1 if pinned else 0) + key)


def read_create(payload):
    _exact(payload, _CREATE.size + 1, "CREATE")
    size, pinned = _CREATE.unpack_from(payload)
    return _key(payload, _CREATE.size, len(payload) - _CREATE.size, "CREATE"), size, bool(pinned)


def created(status, offset):
    """status 0: created at offset; else the state of the existing object."""
    return frame(CREATED, _CREATED.pack(status, offset))


def read_created(payload):
    _exact(payload, _CREATED.size, "CREATED")
    return _CREATED.unpack_from(payload)


def keyed(mtype, key, flag=0, offset=0):
    """ABORT, DELETE, PIN (flag: pinned), DROP (offset): a key and a little more."""
    return frame(mtype, _U64.pack(offset) + _U8.pack(flag) + key)


def read_keyed(payload, what="request"):
    _exact(payload, 10, what)
    (offset,) = _U64.unpack_from(payload)
    return _key(payload, 9, len(payload) - 9, what), payload[8], offset


def doorbell():
    """Wake a sleeping daemon: seals are waiting in the sender's ring (kvstore.slots)."""
    return frame(DOORBELL, b"")


def bye():
    """A client closing on purpose: forget it now. A connection lost without BYE (a
    timeout reset, a daemon restart) leaves the client registered while its process
    lives, so it can resume with its holds."""
    return frame(BYE, b"")


def reclaim():
    return frame(RECLAIM, b"")


def done(result):
    return frame(DONE, _U8.pack(1 if result else 0))


def read_done(payload):
    _exact(payload, 1, "DONE")
    return bool(payload[0])


def keys(prefix, after, limit):
    return frame(KEYS, _KEYS.pack(limit, len(prefix), len(after)) + prefix + after)


def read_keys(payload):
    _exact(payload, _KEYS.size, "KEYS")
    limit, plen, alen = _KEYS.unpack_from(payload)
    if _KEYS.size + plen + alen != len(payload):
        raise ProtocolError("KEYS: lengths do not add up")
    p = _KEYS.size
    return bytes(payload[p:p + plen]), bytes(payload[p + plen:]), limit


def keys_reply(found, more):
    return frame(KEYS_REPLY, _U8.pack(1 if more else 0) + b"".join(_KLEN.pack(len(k)) + k for k in found))


def read_keys_reply(payload):
    _exact(payload, 1, "KEYS_REPLY")
    out, pos = [], 1
    while pos < len(payload):
        if pos + 2 > len(payload):
            raise ProtocolError("KEYS_REPLY: truncated")
        (n,) = _KLEN.unpack_from(payload, pos)
        pos += 2
        out.append(_key(payload, pos, n, "KEYS_REPLY"))
        pos += n
    return out, bool(payload[0])


# ---- client side: blocking request/reply -----------------------------------------------------
#: FETCHED statuses: the key is local now; no host has it; every holder failed (why given)
FETCH_LOCAL, FETCH_MISS, FETCH_FAILED = 0, 1, 2
_FETCH_HEAD = struct.Struct("<dI")          # timeout in seconds, key count
_FETCHED_ITEM = struct.Struct("<BHH")       # status, error code, message length


def fetch(keys, timeout):
    """Ask the daemon to pull these local misses (stored keys) from other hosts."""
    return frame(FETCH, _FETCH_HEAD.pack(timeout, len(keys)) +
                 b"".join(_KLEN.pack(len(k)) + k for k in keys))


def read_fetch(payload):
    if len(payload) < _FETCH_HEAD.size:
        raise ProtocolError("FETCH: truncated")
    timeout, n = _FETCH_HEAD.unpack_from(payload)
    if not 0 <= timeout <= 3600 or timeout != timeout:
        raise ProtocolError(f"FETCH: timeout {timeout} out of range")
    pos, keys = _FETCH_HEAD.size, []
    for _ in range(n):
        if pos + 2 > len(payload):
            raise ProtocolError("FETCH: truncated")
        (klen,) = _KLEN.unpack_from(payload, pos)
        keys.append(_key(payload, pos + 2, klen, "FETCH"))
        pos += 2 + klen
    if pos != len(payload):
        raise ProtocolError("FETCH: bytes after the last key")
    return timeout, keys


def fetched(results):
    """results: [(status, error code, message)] in the order of the FETCH's keys."""
    parts = [_U32.pack(len(results))]
    for status, code, msg in results:
        m = msg.encode("utf-8", "replace")[:1024]
        parts.append(_FETCHED_ITEM.pack(status, code, len(m)) + m)
    return frame(FETCHED, b"".join(parts))


def read_fetched(payload):
    if len(payload) < 4:
        raise ProtocolError("FETCHED: truncated")
    (n,) = _U32.unpack_from(payload)
    pos, out = 4, []
    for _ in range(n):
        if pos + _FETCHED_ITEM.size > len(payload):
            raise ProtocolError("FETCHED: truncated")
        status, code, mlen = _FETCHED_ITEM.unpack_from(payload, pos)
        pos += _FETCHED_ITEM.size
        if pos + mlen > len(payload):
            raise ProtocolError("FETCHED: truncated")
        out.append((status, code, bytes(payload[pos:pos + mlen]).decode("utf-8", "replace")))
        pos += mlen
    if pos != len(payload):
        raise ProtocolError("FETCHED: bytes after the last item")
    return out


def key_batches(keys):
    """(start, end) slices of keys, each small enough for one FETCH / LOCATE /
    DELETE_ALL frame (the client sends several when a batch does not fit one)."""
    start, size = 0, 0
    for j, k in enumerate(keys):
        size += 2 + len(k)
        if j == len(keys) - 1 or size + 2 + len(keys[j + 1]) > MAX_PAYLOAD - 64:
            yield start, j + 1
            start, size = j + 1, 0


def key_list(mtype, keys, timeout):
    """LOCATE / DELETE_ALL: a timeout and stored keys (FETCH's layout)."""
    return frame(mtype, fetch(keys, timeout)[HEADER_SIZE:])


def read_key_list(payload):
    return read_fetch(payload)


def replicate_keys(keys, copies):
    """REPLICATE_KEYS: FETCH's layout, its first field the number of copies wanted (2-64)."""
    return frame(REPLICATE_KEYS, fetch(keys, float(copies))[HEADER_SIZE:])


def read_replicate_keys(payload):
    """(copies, keys)."""
    copies, keys = read_fetch(payload)
    if copies != int(copies) or not 2 <= copies <= 64:
        raise ProtocolError(f"REPLICATE_KEYS: {copies} copies is not 2 to 64")
    return int(copies), keys


def located(counts):
    """LOCATED: one byte per key: for a LOCATE, how many hosts hold it sealed (0: none;
    capped at 255); for a DELETE_ALL, 1 if it was deleted somewhere."""
    return frame(LOCATED, bytes(min(255, int(c)) for c in counts))


def read_located(payload, n):
    """[bool] per key: found (LOCATE) or deleted (DELETE_ALL) somewhere."""
    return [bool(c) for c in read_copies(payload, n)]


def read_copies(payload, n):
    """[int] per key of a LOCATE: how many hosts hold it sealed."""
    if len(payload) != n:
        raise ProtocolError(f"LOCATED: {len(payload)} counts for {n} keys")
    return list(payload)


def recv_message(sock, with_fds=0):
    """Read one whole message from a blocking socket; returns (type, payload, fds)
    (payload decoded for JSON types). An ERROR reply raises its typed error."""
    fds = []
    header = b""
    while len(header) < HEADER_SIZE:
        if with_fds and not fds:
            chunk, got, _, _ = socket.recv_fds(sock, HEADER_SIZE - len(header), with_fds)
            fds.extend(got)
        else:
            chunk = sock.recv(HEADER_SIZE - len(header))
        if not chunk:
            for fd in fds:
                _close_quietly(fd)
            raise StoreUnavailable("the daemon closed the connection; is it still running?")
        header += chunk
    length, mtype = _HEADER.unpack(header)
    if length > MAX_PAYLOAD or mtype not in NAMES:
        raise ProtocolError(f"daemon sent a frame of {length} bytes, type {mtype}; is that a kvstore daemon?")
    payload = bytearray()
    while len(payload) < length:
        chunk = sock.recv(length - len(payload))
        if not chunk:
            raise StoreUnavailable("the daemon closed the connection mid-message")
        payload += chunk
    body = decode_json(mtype, payload) if mtype in JSON_TYPES else bytes(payload)
    if mtype == ERROR:
        for fd in fds:
            _close_quietly(fd)
        raise_error(body)
    return mtype, body, fds


def _close_quietly(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def request(sock, frame_bytes, expect, with_fds=0):
    """Send a request and read its reply (which must be of type ``expect``)."""
    sock.sendall(frame_bytes)
    mtype, body, fds = recv_message(sock, with_fds)
    if mtype != expect:
        for fd in fds:
            _close_quietly(fd)
        raise ProtocolError(f"expected {NAMES[expect]}, daemon sent {NAMES.get(mtype, mtype)}")
    return (body, fds) if with_fds else body
