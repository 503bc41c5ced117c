"""kvstore.keys.fit_key: the one way a too-long key is made to fit."""

import hashlib

import pytest

from kvstore.keys import DIGEST_MARK, MAX_KEY_BYTES, encode_key, fit_key


def test_a_key_that_fits_is_unchanged():
    assert fit_key("page") == "page"
    assert fit_key("page", prefix="sgl/a/b/") == "sgl/a/b/page"
    assert fit_key(b"\x00\xff") == b"\x00\xff"
    exact = "k" * (MAX_KEY_BYTES - 4)
    assert fit_key(exact, prefix="pre/") == "pre/" + exact       # the limit itself fits


@pytest.mark.parametrize("key, prefix", [
    ("k" * 257, ""), ("k" * 1000, "sgl/abc/def/"), (b"x" * 300, b""), (b"x" * 300, "lm/"),
    ("é" * 200, "vllm/id/"), ("k", "p" * 300), ("k", "é" * 200), ("é" * 129, ""),
])
def test_a_long_key_fits_and_keeps_its_type(key, prefix):
    k = fit_key(key, prefix)
    assert type(k) is type(key)
    assert len(encode_key(k)) <= MAX_KEY_BYTES           # the store accepts it
    assert DIGEST_MARK in (k if isinstance(k, str) else k.decode())


def test_shortened_form_is_prefix_mark_digest():
    key, prefix = "h" * 300, "sgl/m/s/"
    whole = (prefix + key).encode()
    assert fit_key(key, prefix) == prefix + DIGEST_MARK + hashlib.sha256(whole).hexdigest()
    # bytes without a prefix: LMCache's long keys keep the form they had before fit_key
    s = b"m" * 300
    assert fit_key(s) == b"#sha256:" + hashlib.sha256(s).hexdigest().encode()


def test_stable_across_calls_and_processes():
    import subprocess
    import sys
    key = "layer." * 60
    here = fit_key(key, "vllm/x/")
    there = subprocess.run([sys.executable, "-c", "import sys; from kvstore.keys import fit_key; "
                            "print(fit_key(sys.argv[1], 'vllm/x/'))", key],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert here == there == fit_key(key, "vllm/x/")


def test_distinct_long_keys_stay_distinct():
    base = "m" * 300
    keys = [base, base + "x", base[:-1] + "n", "n" + base[1:], base * 2]
    assert len({fit_key(k) for k in keys}) == len(keys)
    # the same key under two prefixes, and a long prefix cut to fit: still distinct
    assert fit_key(base, "a/") != fit_key(base, "b/")
    long_prefix = "p" * 250
    assert fit_key("1", long_prefix) != fit_key("2", long_prefix)
    # a shortened key never equals a short key that fits unchanged
    assert fit_key(base) not in keys


def test_prefix_cut_inside_a_character_leaves_valid_utf8():
    k = fit_key("x", prefix="é" * 200)     # 400 bytes of prefix: cut at an odd byte
    k.encode("utf-8")
    assert len(k.encode()) <= MAX_KEY_BYTES
