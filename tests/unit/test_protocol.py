"""kvstore.protocol: frames, every message's encode/decode pair, and FrameReader.

Covers: a round trip (encode -> FrameReader -> decode) for every message type: hello /
read_hello (with resume, and the namespace limit counted in UTF-8 BYTES: 64 bytes pass,
65 fail), seal / read_seal (many items, keys of length 1 and of the longest namespaced
key), grant / granted, give_back, create / created, keyed (ABORT, DELETE, PIN, DROP),
done, keys / keys_reply, and encode / error / raise_error for the JSON types.
FrameReader: a stream fed byte by byte yields the same messages as fed whole; a huge
length prefix, an unknown type, a non-JSON (or non-object) payload for a JSON type and
truncated or malformed binary payloads raise ProtocolError and nothing else; a hypothesis
fuzz test checks that random bytes (and random well-framed payloads) fed to FrameReader
and decoded with each type's decoder only ever raise ProtocolError.
"""

import json
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import errors, protocol as P
from kvstore.errors import KVStoreError, ProtocolError
from kvstore.keys import MAX_KEY_BYTES, MAX_NAMESPACE_BYTES

#: Longest key a binary message carries: a namespaced key (length byte + namespace + key).
MAX_WIRE_KEY = MAX_KEY_BYTES + MAX_NAMESPACE_BYTES + 1
U64_MAX = 2 ** 64 - 1


def one(frame_bytes):
    """Decode exactly one message from frame bytes."""
    r = P.FrameReader()
    out = r.feed(frame_bytes)
    assert len(out) == 1 and r.pending == 0
    return out[0]


# ---- frames --------------------------------------------------------------------------------
def test_frame_layout():
    f = P.frame(P.DONE, b"\x01")
    assert f == struct.pack("<IB", 1, P.DONE) + b"\x01"
    assert P.HEADER_SIZE == 5


def test_frame_of_max_payload_passes_and_one_more_fails():
    f = P.frame(P.SEAL, b"x" * P.MAX_PAYLOAD)
    assert one(f) == (P.SEAL, b"x" * P.MAX_PAYLOAD)
    with pytest.raises(ProtocolError):
        P.frame(P.SEAL, b"x" * (P.MAX_PAYLOAD + 1))


def test_every_type_has_a_name_and_json_and_client_types_are_known():
    assert P.JSON_TYPES <= set(P.NAMES)
    assert P.CLIENT_TYPES <= set(P.NAMES)
    assert len(set(P.NAMES.values())) == len(P.NAMES)


# ---- hello ---------------------------------------------------------------------------------
def test_hello_round_trip():
    mtype, body = one(P.hello(1234, "model-a"))
    assert mtype == P.HELLO
    assert P.read_hello(body) == (1234, "model-a", None)


def test_hello_default_namespace_is_empty():
    assert P.read_hello(one(P.hello(7))[1]) == (7, "", None)


def test_hello_with_resume():
    mtype, body = one(P.hello(99, "ns", resume={"cid": 17, "segment_id": "seg-abc"}))
    assert P.read_hello(body) == (99, "ns", (17, "seg-abc"))


@pytest.mark.parametrize("ns", ["n" * MAX_NAMESPACE_BYTES, "é" * (MAX_NAMESPACE_BYTES // 2),
                                "€" * (MAX_NAMESPACE_BYTES // 3) + "a", "😀" * (MAX_NAMESPACE_BYTES // 4)])
def test_hello_namespace_of_64_utf8_bytes_passes(ns):
    assert len(ns.encode("utf-8")) == MAX_NAMESPACE_BYTES
    assert P.read_hello(one(P.hello(5, ns))[1]) == (5, ns, None)


@pytest.mark.parametrize("ns", ["n" * (MAX_NAMESPACE_BYTES + 1), "é" * (MAX_NAMESPACE_BYTES // 2) + "a",
                                "é" * 33, "😀" * (MAX_NAMESPACE_BYTES // 4) + "x"])
def test_hello_namespace_of_65_utf8_bytes_fails(ns):
    assert len(ns.encode("utf-8")) > MAX_NAMESPACE_BYTES
    assert len(ns) <= MAX_NAMESPACE_BYTES + 1     # a character count would let most of these pass
    with pytest.raises(ProtocolError):
        P.read_hello(one(P.hello(5, ns))[1])


@pytest.mark.parametrize("body", [
    {},
    {"magic": "other", "version": P.VERSION, "pid": 1},
    {"magic": P.MAGIC, "version": P.VERSION - 1, "pid": 1},
    {"magic": P.MAGIC, "pid": 1},
    {"magic": P.MAGIC, "version": P.VERSION},
    {"magic": P.MAGIC, "version": P.VERSION, "pid": 0},
    {"magic": P.MAGIC, "version": P.VERSION, "pid": -3},
    {"magic": P.MAGIC, "version": P.VERSION, "pid": True},
    {"magic": P.MAGIC, "version": P.VERSION, "pid": "12"},
    {"magic": P.MAGIC, "version": P.VERSION, "pid": 1.5},
    {"magic": P.MAGIC, "version": P.VERSION, "pid": 1, "namespace": 5},
    {"magic": P.MAGIC, "version": P.VERSION, "pid": 1, "namespace": None},
    {"magic": P.MAGIC, "version": P.VERSION, "pid": 1, "resume": 5},
    {"magic": P.MAGIC, "version": P.VERSION, "pid": 1, "resume": {"cid": "1", "segment_id": "s"}},
    {"magic": P.MAGIC, "version": P.VERSION, "pid": 1, "resume": {"cid": 1}},
    {"magic": P.MAGIC, "version": P.VERSION, "pid": 1, "resume": {"cid": 1, "segment_id": 2}},
])
def test_read_hello_refuses_bad_bodies(body):
    with pytest.raises(ProtocolError):
        P.read_hello(body)


# ---- seal ----------------------------------------------------------------------------------
def _items(n, klen, seed=0):
    rng = random.Random(seed)
    return [(i + 1, bytes(rng.randrange(256) for _ in range(klen)), rng.randrange(2 ** 40) * 64,
             rng.randrange(2 ** 32), rng.randrange(2 ** 64), i % 2, 1 + i % 3) for i in range(n)]


def _seal_round_trip(items):
    encoded = [P.seal_item(seq, key, off, size, csum, flags, replicas)
               for seq, key, off, size, csum, flags, replicas in items]
    mtype, payload = one(P.seal(encoded))
    assert mtype == P.SEAL
    assert P.read_seal(payload) == items


def test_seal_one_item():
    _seal_round_trip([(1, b"k", 0, 0, 0, 0, 1)])


def test_seal_edge_values():
    _seal_round_trip([(U64_MAX, b"k" * MAX_WIRE_KEY, U64_MAX, U64_MAX, U64_MAX, 255, 2 ** 16 - 1),
                      (0, b"\x00", 0, 0, 0, 0, 0)])


def test_seal_many_items_with_one_byte_keys():
    n = P.MAX_PAYLOAD // (P.SEAL_ITEM_OVERHEAD + 1)
    _seal_round_trip(_items(n, 1))


def test_seal_many_items_with_longest_keys():
    n = P.MAX_PAYLOAD // (P.SEAL_ITEM_OVERHEAD + MAX_WIRE_KEY)
    assert n > 100
    _seal_round_trip(_items(n, MAX_WIRE_KEY))


def test_seal_mixed_key_lengths():
    items = []
    for i, klen in enumerate([1, MAX_WIRE_KEY, 2, 100, MAX_WIRE_KEY - 1, 1]):
        items += _items(3, klen, seed=i)
    _seal_round_trip(items)


def test_seal_too_big_for_one_frame_is_refused_by_the_encoder():
    n = P.MAX_PAYLOAD // (P.SEAL_ITEM_OVERHEAD + 1) + 1
    with pytest.raises(ProtocolError):
        P.seal([P.seal_item(*it) for it in _items(n, 1)])


def test_read_seal_refuses_empty():
    with pytest.raises(ProtocolError):
        P.read_seal(b"")


def test_read_seal_refuses_too_long_and_empty_keys():
    with pytest.raises(ProtocolError):
        P.read_seal(P.seal_item(1, b"k" * (MAX_WIRE_KEY + 1), 0, 1, 2))
    with pytest.raises(ProtocolError):
        P.read_seal(P.seal_item(1, b"", 0, 1, 2))


def test_read_seal_of_a_cut_item_raises_protocol_error_at_every_cut():
    good = P.seal_item(1, b"key-one", 64, 10, 5) + P.seal_item(2, b"key-two", 128, 10, 6)
    assert len(P.read_seal(good)) == 2
    first = len(P.seal_item(1, b"key-one", 64, 10, 5))
    for cut in range(1, len(good)):
        if cut == first:
            assert len(P.read_seal(good[:cut])) == 1     # a whole first item
            continue
        with pytest.raises(ProtocolError):
            P.read_seal(good[:cut])


# ---- grant / granted / return --------------------------------------------------------------
@pytest.mark.parametrize("a, b", [(0, 0), (1 << 20, 64), (U64_MAX, U64_MAX)])
def test_grant_and_granted_round_trip(a, b):
    mtype, payload = one(P.grant(a, b))
    assert mtype == P.GRANT and tuple(P.read_grant(payload)) == (a, b)
    mtype, payload = one(P.granted(a, b))
    assert mtype == P.GRANTED and tuple(P.read_granted(payload)) == (a, b)


@pytest.mark.parametrize("start", [0, 4096, U64_MAX])
def test_give_back_round_trip(start):
    mtype, payload = one(P.give_back(start))
    assert mtype == P.RETURN and P.read_give_back(payload) == start


# ---- create / created ----------------------------------------------------------------------
@pytest.mark.parametrize("key", [b"k", b"\x00" * MAX_WIRE_KEY, "ключ".encode()])
@pytest.mark.parametrize("size", [0, 1, U64_MAX])
@pytest.mark.parametrize("pinned", [False, True])
def test_create_round_trip(key, size, pinned):
    mtype, payload = one(P.create(key, size, pinned))
    assert mtype == P.CREATE
    assert P.read_create(payload) == (key, size, pinned)


def test_read_create_refuses_too_long_key():
    with pytest.raises(ProtocolError):
        P.read_create(one(P.create(b"k" * (MAX_WIRE_KEY + 1), 1, False))[1])


@pytest.mark.parametrize("status, offset", [(0, 0), (0, U64_MAX), (1, 4096), (255, 7)])
def test_created_round_trip(status, offset):
    mtype, payload = one(P.created(status, offset))
    assert mtype == P.CREATED and tuple(P.read_created(payload)) == (status, offset)


# ---- keyed / done --------------------------------------------------------------------------
@pytest.mark.parametrize("mtype", [P.ABORT, P.DELETE, P.PIN, P.DROP])
@pytest.mark.parametrize("key", [b"k", b"\xff" * MAX_WIRE_KEY])
@pytest.mark.parametrize("flag, offset", [(0, 0), (1, 0), (0, 64 * 1000), (255, U64_MAX)])
def test_keyed_round_trip(mtype, key, flag, offset):
    got_type, payload = one(P.keyed(mtype, key, flag=flag, offset=offset))
    assert got_type == mtype
    assert P.read_keyed(payload, P.NAMES[mtype]) == (key, flag, offset)


@pytest.mark.parametrize("result", [True, False, 1, 0, "x", None])
def test_done_round_trip(result):
    mtype, payload = one(P.done(result))
    assert mtype == P.DONE and P.read_done(payload) is bool(result)


# ---- keys / keys_reply ---------------------------------------------------------------------
@pytest.mark.parametrize("prefix, after, limit", [
    (b"", b"", 0), (b"\x03abc", b"", 10), (b"\x03abc", b"\x03abcdef", 2 ** 32 - 1),
    (b"", b"k" * MAX_WIRE_KEY, 1), (b"p" * MAX_WIRE_KEY, b"p" * MAX_WIRE_KEY, 5),
])
def test_keys_round_trip(prefix, after, limit):
    mtype, payload = one(P.keys(prefix, after, limit))
    assert mtype == P.KEYS and P.read_keys(payload) == (prefix, after, limit)


@pytest.mark.parametrize("found", [[], [b"a"], [b"k" * MAX_WIRE_KEY], [b"x%d" % i for i in range(1000)]])
@pytest.mark.parametrize("more", [False, True])
def test_keys_reply_round_trip(found, more):
    mtype, payload = one(P.keys_reply(found, more))
    assert mtype == P.KEYS_REPLY and P.read_keys_reply(payload) == (found, more)


# ---- JSON messages -------------------------------------------------------------------------
BODIES = [{}, {"a": 1}, {"nested": {"list": [1, 2.5, None, True, "é😀"], "n": -(2 ** 63)}},
          {"big": 2 ** 64 - 1, "s": "x" * 1000}]


@pytest.mark.parametrize("mtype", sorted(P.JSON_TYPES))
@pytest.mark.parametrize("body", BODIES)
def test_encode_round_trip_for_every_json_type(mtype, body):
    assert one(P.encode(mtype, body)) == (mtype, body)


def test_welcome_round_trip():
    fields = dict(cid=3, slot=1, segment_size=1 << 30, backing="shm", segment_id="abc",
                  slots={"slots": 8, "region": 4096}, incarnation=2)
    assert one(P.welcome(**fields)) == (P.WELCOME, fields)


@pytest.mark.parametrize("cls", sorted(set(errors._BY_CODE.values()), key=lambda c: c.code))
def test_error_round_trip_raises_the_same_typed_error(cls):
    mtype, body = one(P.error(cls("what went wrong")))
    assert mtype == P.ERROR
    with pytest.raises(cls) as info:
        P.raise_error(body)
    assert type(info.value) is cls and str(info.value) == "what went wrong"


def test_error_message_is_cut_to_4000_characters():
    _, body = one(P.error(KVStoreError("m" * 10000)))
    assert len(body["message"]) == 4000


def test_raise_error_of_unknown_code_is_kvstore_error():
    with pytest.raises(KVStoreError) as info:
        P.raise_error({"code": 9999, "message": "odd"})
    assert type(info.value) is KVStoreError


@pytest.mark.parametrize("code", [[1], {"a": 1}])
def test_raise_error_of_unhashable_code_is_still_a_kvstore_error(code):
    with pytest.raises(KVStoreError):
        P.raise_error({"code": code, "message": "odd"})


# ---- FrameReader ---------------------------------------------------------------------------
#: The message types these tests know (the module may add more).
KNOWN_TYPES = {P.HELLO, P.WELCOME, P.ERROR, P.STATS, P.STATS_REPLY, P.PING, P.PONG, P.SEAL, P.GRANT,
               P.GRANTED, P.RETURN, P.CREATE, P.CREATED, P.ABORT, P.DONE, P.DELETE, P.PIN, P.DROP,
               P.KEYS, P.KEYS_REPLY, P.CHECK, P.CHECK_REPLY, P.TABLE, P.TABLE_REPLY}


def _stream():
    """One of every message type, as frames, and what FrameReader yields for them."""
    frames = [
        P.hello(1, "ns", resume={"cid": 1, "segment_id": "s"}), P.welcome(cid=1), P.error(ProtocolError("x")),
        P.encode(P.STATS, {}), P.encode(P.STATS_REPLY, {"used": 1}), P.encode(P.PING, {}),
        P.encode(P.PONG, {}), P.seal([P.seal_item(1, b"k", 0, 1, 2), P.seal_item(2, b"kk", 64, 1, 3)]),
        P.grant(100, 64), P.granted(0, 128), P.give_back(64), P.create(b"c", 10, True),
        P.created(0, 4096), P.keyed(P.ABORT, b"a"), P.done(True), P.keyed(P.DELETE, b"d"),
        P.keyed(P.PIN, b"p", flag=1), P.keyed(P.DROP, b"x", offset=4096), P.keys(b"p", b"", 5),
        P.keys_reply([b"a", b"b"], True), P.encode(P.CHECK, {}), P.encode(P.CHECK_REPLY, {"ok": True}),
        P.encode(P.TABLE, {}), P.encode(P.TABLE_REPLY, {"generation": 2}),
    ]
    if hasattr(P, "reclaim"):                           # a newer message without a payload
        frames.append(P.reclaim())
    covered = {f[4] for f in frames}
    assert covered >= KNOWN_TYPES
    return frames


def test_feed_whole_stream_yields_every_message_in_order():
    frames = _stream()
    msgs = P.FrameReader().feed(b"".join(frames))
    assert [m[0] for m in msgs] == [f[4] for f in frames]
    assert msgs == [one(f) for f in frames]


def test_feed_byte_by_byte_yields_the_same_messages():
    data = b"".join(_stream())
    whole = P.FrameReader().feed(data)
    r = P.FrameReader()
    got = []
    for i in range(len(data)):
        got += r.feed(data[i:i + 1])
    assert got == whole
    assert r.pending == 0


def test_feed_in_random_chunks_yields_the_same_messages():
    data = b"".join(_stream()) * 3
    whole = P.FrameReader().feed(data)
    rng = random.Random(1)
    for _ in range(20):
        r, got, pos = P.FrameReader(), [], 0
        while pos < len(data):
            n = rng.randrange(0, 300)
            got += r.feed(data[pos:pos + n])
            pos += n
        assert got == whole and r.pending == 0


def test_pending_counts_a_partial_frame():
    f = P.grant(1, 2)
    r = P.FrameReader()
    assert r.feed(f[:7]) == [] and r.pending == 7
    assert r.feed(f[7:] + f[:3]) == [(P.GRANT, f[5:])] and r.pending == 3


def test_empty_feed():
    r = P.FrameReader()
    assert r.feed(b"") == [] and r.pending == 0


@pytest.mark.parametrize("length", [P.MAX_PAYLOAD + 1, 1 << 24, 2 ** 32 - 1])
def test_huge_length_prefix_raises_on_the_header_alone(length):
    with pytest.raises(ProtocolError):
        P.FrameReader().feed(struct.pack("<IB", length, P.SEAL))


def test_huge_length_prefix_after_a_good_frame():
    with pytest.raises(ProtocolError):
        P.FrameReader().feed(P.done(True) + struct.pack("<IB", 2 ** 32 - 1, P.HELLO))


@pytest.mark.parametrize("mtype", sorted(set(range(256)) - set(P.NAMES)))
def test_unknown_type_raises(mtype):
    with pytest.raises(ProtocolError):
        P.FrameReader().feed(struct.pack("<IB", 0, mtype))


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"{", b"\xff\xfe", b"\xc3", b"[1, 2]", b"\"s\"", b"1", b"null", b"true",
    b"[" * 60000, b"{\"a\":" * 20000, b"{\"a\": " + b"1" * 5000 + b"}", "{\"é\": 1}".encode("latin-1"),
])
@pytest.mark.parametrize("mtype", [P.HELLO, P.ERROR, P.STATS, P.CHECK_REPLY, P.TABLE])
def test_bad_json_payload_raises_protocol_error(mtype, payload):
    with pytest.raises(ProtocolError):
        P.FrameReader().feed(P.frame(mtype, payload))


@pytest.mark.parametrize("decode, payload", [
    (P.read_seal, b"\x01"),
    (P.read_grant, b"\x00" * 15),
    (P.read_granted, b""),
    (P.read_give_back, b"\x00" * 7),
    (P.read_create, b"\x00" * 9),
    (P.read_created, b"\x00" * 8),
    (P.read_keyed, b"abc"),
    (P.read_keyed, b"\x00" * 9),
    (P.read_keyed, b"\x00" * 9 + b"k" * (MAX_WIRE_KEY + 1)),
    (P.read_done, b""),
    (P.read_keys, b"\x00" * 7),
    (P.read_keys, struct.pack("<IHH", 1, 3, 0) + b"ab"),          # prefix cut
    (P.read_keys, struct.pack("<IHH", 1, 1, 1) + b"abc"),         # one byte too many
    (P.read_keys_reply, b""),
    (P.read_keys_reply, b"\x00\x05"),                              # cut length
    (P.read_keys_reply, b"\x00\x05\x00abc"),                       # cut key
    (P.read_keys_reply, b"\x00\x00\x00"),                          # empty key
])
def test_truncated_or_malformed_binary_payloads_raise_protocol_error(decode, payload):
    with pytest.raises(ProtocolError):
        decode(payload)


def test_read_keyed_of_three_bytes():
    with pytest.raises(ProtocolError):
        P.read_keyed(b"abc", "DELETE")


# ---- fuzz ----------------------------------------------------------------------------------
DECODERS = {
    P.SEAL: P.read_seal, P.GRANT: P.read_grant, P.GRANTED: P.read_granted, P.RETURN: P.read_give_back,
    P.CREATE: P.read_create, P.CREATED: P.read_created, P.ABORT: P.read_keyed, P.DELETE: P.read_keyed,
    P.PIN: P.read_keyed, P.DROP: P.read_keyed, P.DONE: P.read_done, P.KEYS: P.read_keys,
    P.KEYS_REPLY: P.read_keys_reply, P.HELLO: P.read_hello,
}


def test_every_known_binary_type_has_a_decoder_here():
    assert KNOWN_TYPES <= set(P.NAMES)
    assert KNOWN_TYPES - P.JSON_TYPES <= set(DECODERS)


def _feed_and_decode(chunks):
    r = P.FrameReader()
    for chunk in chunks:
        try:
            msgs = r.feed(chunk)
        except ProtocolError:
            return
        for mtype, payload in msgs:
            assert mtype in P.NAMES
            if mtype in P.JSON_TYPES:
                assert isinstance(payload, dict)
            else:
                assert isinstance(payload, bytes)
            decode = DECODERS.get(mtype)
            if decode is None:
                continue
            try:
                decode(payload)
            except ProtocolError:
                pass


def _chunks(data, cuts):
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


_framed = st.builds(lambda t, p: struct.pack("<IB", len(p), t) + p,
                    st.sampled_from(sorted(P.NAMES)), st.binary(max_size=600))
_framed_binary = st.builds(lambda t, p: struct.pack("<IB", len(p), t) + p,
                           st.sampled_from(sorted(set(P.NAMES) - P.JSON_TYPES)), st.binary(max_size=600))
_json_ish = st.builds(lambda t, p: P.frame(t, json.dumps(p).encode()), st.sampled_from([P.HELLO]),
                      st.dictionaries(st.sampled_from(["magic", "version", "pid", "namespace", "resume"]),
                                      st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=80),
                                                st.just(P.MAGIC), st.just(P.VERSION),
                                                st.dictionaries(st.sampled_from(["cid", "segment_id"]),
                                                                st.one_of(st.integers(), st.text(max_size=5))))))

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(0, 4000), max_size=8))
def test_fuzz_random_bytes_only_raise_protocol_error(data, cuts):
    _feed_and_decode(_chunks(data, cuts))


@FUZZ
@given(st.lists(st.one_of(_framed, _framed_binary, _json_ish, st.binary(max_size=20)), max_size=12),
       st.lists(st.integers(0, 10000), max_size=8))
def test_fuzz_framed_random_payloads_only_raise_protocol_error(parts, cuts):
    _feed_and_decode(_chunks(b"".join(parts), cuts))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, U64_MAX), st.binary(min_size=1, max_size=40), st.integers(0, U64_MAX),
                          st.integers(0, U64_MAX), st.integers(0, U64_MAX), st.integers(0, 255),
                          st.integers(0, 2 ** 16 - 1)), min_size=1, max_size=20),
       st.integers(0, 2000), st.binary(max_size=3))
def test_fuzz_mangled_seal_payloads(items, cut, junk):
    payload = b"".join(P.seal_item(*it) for it in items)
    assert P.read_seal(payload) == [(s, k, o, n, c, f, r) for s, k, o, n, c, f, r in items]
    mangled = payload[:cut % (len(payload) + 1)] + junk
    try:
        got = P.read_seal(mangled)
    except ProtocolError:
        return
    assert all(isinstance(it[1], bytes) and it[1] for it in got)
