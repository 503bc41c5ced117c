"""Key validation and encoding.

Owns: what a key may be and its byte form in the index. Keys are str (UTF-8 encoded)
or bytes (KV block hashes), 1 to MAX_KEY_BYTES bytes once encoded.
Must never: accept a key silently changed (truncated, coerced from another type).
"""

from .errors import InvalidKey, InvalidKeyType

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
