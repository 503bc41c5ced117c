"""Key validation and encoding.

Owns: what a key may be and its byte form in the index. Keys are str (UTF-8 encoded)
or bytes (KV block hashes), 1 to MAX_KEY_BYTES bytes once encoded. In the index every
key is scoped by its client's namespace: one length byte, the namespace, the key. So
clients of different namespaces (a model, a tenant) never see each other's objects.
It also owns the one way to make a longer key fit (``fit_key``), which every adapter
uses, so a long key is shortened the same way wherever it is written.
Must never: accept a key silently changed (truncated, coerced from another type);
fit_key changes a key only when it is too long, and then always the same way.
"""

import hashlib

from .errors import InvalidKey, InvalidKeyType

#: Longest namespace in bytes (UTF-8).
MAX_NAMESPACE_BYTES = 64

#: Longest key in bytes (str keys count their UTF-8 bytes). LMDB keys are limited to
#: 511 bytes and the index prefixes keys with up to 16 bytes of its own.
MAX_KEY_BYTES = 256

#: What fit_key puts before the digest of a key it shortened.
DIGEST_MARK = "#sha256:"
#: Bytes of fit_key's mark and digest (the rest of a shortened key is readable prefix).
_DIGEST_BYTES = len(DIGEST_MARK) + 64


def _raw(x):
    return x.encode("utf-8") if isinstance(x, str) else bytes(x)


def fit_key(key, prefix=""):
    """``prefix + key`` if that is at most MAX_KEY_BYTES bytes, else a key that fits:
    the prefix (cut to what fits, so normally whole and readable), then DIGEST_MARK,
    then the sha256 hex digest of the whole ``prefix + key``.

    key and prefix are str (UTF-8) or bytes; the result has the key's type. The same
    input always gives the same key (so other processes find it), and two long keys
    stay distinct (the digest covers all of both). A shortened key is the prefix kept
    plus 72 bytes.
    """
    if isinstance(key, str) and isinstance(prefix, str):
        whole = prefix + key                    # the common case: no bytes round trip
        if len(whole.encode("utf-8")) <= MAX_KEY_BYTES:
            return whole
    raw = _raw(prefix) + _raw(key)
    if len(raw) > MAX_KEY_BYTES:
        raw = (_raw(prefix)[:MAX_KEY_BYTES - _DIGEST_BYTES] + DIGEST_MARK.encode()
               + hashlib.sha256(raw).hexdigest().encode())
    # a prefix cut inside a UTF-8 character drops that character's leftover bytes
    return raw.decode("utf-8", "ignore") if isinstance(key, str) else raw


def encode_key(key):
    """Return the key's bytes, or raise InvalidKeyType / InvalidKey saying what to do."""
    if type(key) is bytes:
        raw = key
    elif type(key) is str:
        raw = key.encode("utf-8")
    elif isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
    elif isinstance(key, str):
        raw = str(key).encode("utf-8")
    else:
        raise InvalidKeyType(
            f"key must be str or bytes, not {type(key).__name__}; "
            f"convert it first, e.g. bytes.fromhex(h) or str(n)")
    if not raw:
        raise InvalidKey("key is empty; use a non-empty str or bytes key")
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidKey(
            f"key is {len(raw)} bytes, the limit is {MAX_KEY_BYTES}; "
            f"shorten long keys with kvstore.keys.fit_key(key) (or hash them)")
    return raw


def namespace_prefix(namespace):
    """The index prefix of a namespace (str): its length byte and its UTF-8 bytes."""
    if not isinstance(namespace, str):
        raise InvalidKeyType(f"namespace must be a str, not {type(namespace).__name__}")
    raw = namespace.encode("utf-8")
    if len(raw) > MAX_NAMESPACE_BYTES:
        raise InvalidKey(f"namespace is {len(raw)} bytes, the limit is {MAX_NAMESPACE_BYTES}")
    return bytes([len(raw)]) + raw


def user_key(index_key):
    """The caller's key inside an index key (for messages)."""
    return index_key[1 + index_key[0]:] if index_key else index_key
