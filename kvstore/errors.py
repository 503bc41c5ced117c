"""The one vocabulary of errors shared by the daemon, the client and the wire.

Owns: every exception kvstore raises, each with a stable numeric ``code`` that the
socket protocol carries, and a message that says what was wrong and what to do.
Must never: define an error for an expected event. A miss (``get`` of an absent key)
returns None and an existing key on a non-strict ``put`` is a silent no-op; neither is
an exception nor is logged as an error.
"""


class KVStoreError(Exception):
    """Base of every kvstore error; ``code`` is its number on the wire."""

    code = 1


class InvalidKey(KVStoreError, ValueError):
    """A key that is empty or longer than the limit."""

    code = 2


class InvalidKeyType(KVStoreError, TypeError):
    """A key that is neither str nor bytes."""

    code = 3


class InvalidSize(KVStoreError, ValueError):
    """A size that is negative or not an integer."""

    code = 4


class ValueTooLarge(KVStoreError, ValueError):
    """A value that can never fit: larger than the whole segment."""

    code = 5


class InvalidValue(KVStoreError, TypeError):
    """A value of a type put() cannot store."""

    code = 6


class ObjectExists(KVStoreError):
    """A strict create/put of a key that is already sealed or being created."""

    code = 10


class ObjectNotFound(KVStoreError, KeyError):
    """An operation that needs the object (seal, abort, pin, release) found none."""

    code = 11

    def __str__(self):  # KeyError would otherwise print the repr of the message
        return Exception.__str__(self)


class AlreadySealed(KVStoreError):
    """seal() or abort() of an object that is already sealed."""

    code = 12


class NotCreator(KVStoreError):
    """seal()/abort() of an object that another client is creating."""

    code = 13


class NotSealed(KVStoreError):
    """get() of an object the calling client is itself creating."""

    code = 14


class StoreFull(KVStoreError):
    """No space even after evicting every evictable object; nothing was changed."""

    code = 20


class QuotaExceeded(StoreFull):
    """A namespace with a quota has no room within it even after evicting its own
    evictable objects (the rest of the store is not touched); raise its quota or free
    some of its objects."""

    code = 26


class IndexFull(KVStoreError):
    """The LMDB index reached its map size; raise index_map_size."""

    code = 21


class GetTimeout(KVStoreError, TimeoutError):
    """get() waited its timeout for an object that is still being created."""

    code = 22


class ReadOnlyView(KVStoreError, TypeError):
    """A write through a view of a sealed (immutable) object."""

    code = 23


class ChecksumMismatch(KVStoreError):
    """An object's bytes no longer match the checksum recorded at seal; it was dropped."""

    code = 24


class TooManyHolds(KVStoreError):
    """A client holds as many objects at once as its hold table has room for."""

    code = 25


class MissingExtra(KVStoreError, ImportError):
    """A view type whose package is not installed (torch, pyarrow); the message names
    the pip extra that installs it."""

    code = 27


class ProtocolError(KVStoreError):
    """A frame on the daemon's socket that is not a valid kvstore message."""

    code = 30


class ClientClosed(KVStoreError):
    """A call on a Client after close() (or in a forked child)."""

    code = 31


class StoreUnavailable(KVStoreError, ConnectionError):
    """The daemon cannot be reached at the socket path."""

    code = 32


class SegmentGone(StoreUnavailable):
    """The shared-memory segment was truncated or removed behind the store's back; the
    daemon must be restarted (its data in that segment is lost)."""

    code = 33


class ConfigError(KVStoreError, ValueError):
    """A bad configuration field; the message names the field."""

    code = 40


class DaemonStartError(KVStoreError):
    """The daemon refuses to start; the message says why in one line."""

    code = 41


class IndexDamaged(DaemonStartError):
    """The LMDB index failed its check at start-up; the message names the fix."""

    code = 42


# ---- across hosts: transport 50-59, cluster 60-69 -------------------------------------------
class TransportError(KVStoreError, ConnectionError):
    """A transfer from a peer daemon failed; ``stage`` says where (connect, transfer,
    verify) and ``peer`` names the peer. The caller tries the next holder."""

    code = 50
    stage = "transfer"

    def __init__(self, message="", peer=None, stage=None):
        super().__init__(message)
        self.peer = peer
        if stage is not None:
            self.stage = stage


class PeerUnreachable(TransportError):
    """No connection to the peer could be made (refused, unreachable, timed out)."""

    code = 51
    stage = "connect"


class TransferTimeout(TransportError, TimeoutError):
    """The peer did not deliver the bytes within the transfer timeout."""

    code = 52


class ObjectGoneOnPeer(TransportError):
    """The peer no longer holds the object asked for (evicted, deleted, restarted): not a
    fault of the link; the caller tries the next holder."""

    code = 53


class PeerAuthFailed(TransportError):
    """A peer could not prove it knows the cluster secret (or we could not): nothing is
    served to it. Check that every daemon reads the same --cluster-secret-file."""

    code = 60
    stage = "connect"


class PeerIncompatible(TransportError):
    """A peer speaks another peer-protocol version: upgrade the older daemon."""

    code = 61
    stage = "connect"


class ClusterUnavailable(KVStoreError):
    """The membership service (etcd) cannot be reached."""

    code = 62


class ReplicasShort(KVStoreError):
    """A put that asked to wait for its copies found fewer hosts holding the object than
    it asked for when its wait ended. The object is stored (here, and on ``copies``
    hosts in all); ``wanted`` were asked for. Other hosts may lack the free space, or be
    fewer than asked: see ``replicas_short`` in the daemon's stats."""

    code = 63

    def __init__(self, message="", copies=0, wanted=0):
        super().__init__(message)
        self.copies = copies
        self.wanted = wanted


_BY_CODE = {cls.code: cls for cls in (
    KVStoreError, InvalidKey, InvalidKeyType, InvalidSize, ValueTooLarge, InvalidValue,
    ObjectExists, ObjectNotFound, AlreadySealed, NotCreator, NotSealed, StoreFull, IndexFull,
    GetTimeout, ReadOnlyView, ChecksumMismatch, TooManyHolds, ProtocolError, ClientClosed, StoreUnavailable, ConfigError,
    DaemonStartError, QuotaExceeded, MissingExtra, SegmentGone, IndexDamaged,
    TransportError, PeerUnreachable, TransferTimeout, ObjectGoneOnPeer, PeerAuthFailed,
    PeerIncompatible, ClusterUnavailable, ReplicasShort)}


def from_code(code, message):
    """The exception for a wire error code (unknown codes map to KVStoreError)."""
    return _BY_CODE.get(code, KVStoreError)(message)
