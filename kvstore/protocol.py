"""The daemon's socket protocol: frames and the messages they carry.

Owns: the frame format (4-byte little-endian payload length, 1-byte message type,
payload of at most MAX_PAYLOAD bytes of UTF-8 JSON), every message type with its
encode/decode pair, and the incremental FrameReader the daemon uses so that a peer
sending garbage, a huge length prefix or half a frame never blocks or crashes it.
The socket is the control plane only: hello (with the segment fd passed by
SCM_RIGHTS; a reconnecting client adds resume {cid, segment_id} to keep its id),
stats, ping. A client's hang-up is how the daemon learns it is gone. Object data and index operations never cross it.
Must never: allocate what a length prefix claims before checking it, or accept a
payload that is not a JSON object.
"""

import json
import os
import socket
import struct

from .errors import ProtocolError, StoreUnavailable, from_code

VERSION = 2     # 2: resume in HELLO, segment_id in WELCOME
MAGIC = "kvstore"
MAX_PAYLOAD = 64 << 10

_HEADER = struct.Struct("<IB")

HELLO, WELCOME, ERROR, STATS, STATS_REPLY, PING, PONG = 1, 2, 3, 4, 5, 6, 7
_NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", ERROR: "ERROR", STATS: "STATS",
          STATS_REPLY: "STATS_REPLY", PING: "PING", PONG: "PONG"}


def encode(mtype, body):
    payload = json.dumps(body, separators=(",", ":")).encode()
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"{_NAMES.get(mtype, mtype)} message of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(len(payload), mtype) + payload


def decode_payload(mtype, payload):
    if mtype not in _NAMES:
        raise ProtocolError(f"unknown message type {mtype}; is this a kvstore client?")
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("payload is not UTF-8 JSON; is this a kvstore client?") from None
    if not isinstance(body, dict):
        raise ProtocolError("payload is not a JSON object; is this a kvstore client?")
    return body


class FrameReader:
    """Feed bytes as they arrive; get complete (type, body) messages out."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data):
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER.size:
            length, mtype = _HEADER.unpack_from(self._buf)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame length {length} exceeds {MAX_PAYLOAD}; is this a kvstore client?")
            if mtype not in _NAMES:
                raise ProtocolError(f"unknown message type {mtype}; is this a kvstore client?")
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[_HEADER.size:end])
            del self._buf[:end]
            out.append((mtype, decode_payload(mtype, payload)))
        return out

    @property
    def pending(self):
        return len(self._buf)


# ---- message pairs ---------------------------------------------------------------------
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
    if not isinstance(ns, str) or len(ns) > 64:
        raise ProtocolError("HELLO namespace must be a string of at most 64 characters")
    resume = body.get("resume")
    if resume is not None:
        if not (isinstance(resume, dict) and isinstance(resume.get("cid"), int)
                and isinstance(resume.get("segment_id"), str)):
            raise ProtocolError("HELLO resume must be {cid: int, segment_id: str}")
        resume = (resume["cid"], resume["segment_id"])
    return pid, ns, resume


def welcome(cid, segment_size, backing, index_path, index_map_size, max_readers, segment_id):
    return encode(WELCOME, {"cid": cid, "segment_size": segment_size, "backing": backing,
                            "index_path": index_path, "index_map_size": index_map_size,
                            "max_readers": max_readers, "segment_id": segment_id})


def error(exc):
    return encode(ERROR, {"code": getattr(exc, "code", 1), "message": str(exc)[:4000]})


def raise_error(body):
    raise from_code(body.get("code", 1), body.get("message", "unknown error from the daemon"))


# ---- client side: blocking request/reply --------------------------------------------------
def recv_message(sock, with_fds=0):
    """Read one whole message from a blocking socket; returns (type, body, fds)."""
    fds = []
    header = b""
    while len(header) < _HEADER.size:
        if with_fds and not fds:
            chunk, got, _, _ = socket.recv_fds(sock, _HEADER.size - len(header), with_fds)
            fds.extend(got)
        else:
            chunk = sock.recv(_HEADER.size - len(header))
        if not chunk:
            raise StoreUnavailable("the daemon closed the connection; is it still running?")
        header += chunk
    length, mtype = _HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"daemon sent a frame of {length} bytes; is that a kvstore daemon?")
    payload = bytearray()
    while len(payload) < length:
        chunk = sock.recv(length - len(payload))
        if not chunk:
            raise StoreUnavailable("the daemon closed the connection mid-message")
        payload += chunk
    body = decode_payload(mtype, bytes(payload))
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


def request(sock, frame, expect):
    sock.sendall(frame)
    mtype, body, _ = recv_message(sock)
    if mtype != expect:
        raise ProtocolError(f"expected {_NAMES[expect]}, daemon sent {_NAMES.get(mtype, mtype)}")
    return body
