"""Key validation and encoding.

Owns: what a key may be and its byte form in the index. Keys are str (UTF-8 encoded)
or bytes (KV block hashes), 1 to MAX_KEY_BYTES bytes once encoded. In the index every
key is scoped by its client's namespace: one length byte, the namespace, the key. So
clients of different namespaces (a model, a tenant) never see each other's objects.
Must never: accept a key silently changed (truncated, coerced from another type).
"""

from .errors import InvalidKey, InvalidKeyType

#: Longest namespace in bytes (UTF-8).
MAX_NAMESPACE_BYTES = 64

#: Longest key in bytes (str keys count their UTF-8 bytes). LMDB keys are limited to
#: 511 bytes and the index prefixes keys with up to 16 bytes of its own.
MAX_KEY_BYTES = 256


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
            f"hash long keys (e.g. hashlib.sha256(key).digest())")
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
