"""kvstore.sizes: the one size rule (every unit a power of 1024), shared by the daemon's
configuration and the Mooncake facade, and its errors (ConfigError naming the field)."""

import pytest

from kvstore.config import load_config
from kvstore.config import parse_size as config_parse_size
from kvstore.errors import ConfigError, InvalidValue
from kvstore.sizes import parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize("value, expected", [
    ("2GiB", 2 * GiB), ("512MiB", 512 * MiB), ("64k", 64 * KiB), ("1.5GiB", 3 * GiB // 2),
    # decimal-looking spellings are binary too: "4GB" means what Mooncake means, 4 GiB
    ("4GB", 4 * GiB), ("4gb", 4 * GiB), ("4G", 4 * GiB), ("4 GB", 4 * GiB),
    ("1KB", KiB), ("1kib", KiB), ("1K", KiB), ("3MB", 3 * MiB), ("2T", 2 * TiB), ("1TB", TiB),
    ("1TiB", TiB), ("100B", 100), ("100", 100), (" 7 ", 7), (4096, 4096),
    ("0.5k", 512), ("1.1k", 1126),                  # fractions round down to whole bytes
    ("9007199254740993", 9007199254740993),         # exact: no float rounding
])
def test_the_rule(value, expected):
    assert parse_size(value) == expected


def test_gib_and_gb_are_the_same_size():
    for p in "KMGT":
        assert parse_size(f"3{p}B") == parse_size(f"3{p}iB") == parse_size(f"3{p}") == 3 * 1024 ** "_KMGT".index(p)


@pytest.mark.parametrize("value", ["2XB", "", "GiB", "1e3", "-1", "2 GiB B", "1,5G", "0x10", True, None, [1]])
def test_what_is_not_a_size_names_the_field_and_says_what_to_write(value):
    with pytest.raises(ConfigError) as ei:
        parse_size(value, "global_segment_size")
    msg = str(ei.value)
    assert msg.startswith("global_segment_size:") and "2GiB" in msg and "1024" in msg


def test_minimum():
    with pytest.raises(ConfigError, match=r"^size: 0 must be at least 1 bytes"):
        parse_size(0)
    with pytest.raises(ConfigError, match="at least 0 bytes"):
        parse_size(-5, "local_buffer_size", minimum=0)
    assert parse_size("0", minimum=0) == 0


def test_config_reexports_the_one_parser():
    assert config_parse_size is parse_size


STRINGS = ["64MiB", "64MB", "64M", "64m", "1GB", "1GiB", "1.5GB", "2g", "3 MB", "67108864", "1TB", "2048KB"]


@pytest.mark.parametrize("text", STRINGS)
def test_daemon_config_and_mooncake_facade_agree(text, tmp_path):
    """One string, one size: the daemon's --size / TOML / KVSTORE_SIZE and the facade's
    global_segment_size (setup() or mooncake.json) read it the same."""
    from kvstore.client.mooncake import _size_field
    want = parse_size(text)
    assert _size_field("global_segment_size", text) == want
    assert load_config(env={}, overrides={"size": text}).size == want
    assert load_config(env={"KVSTORE_SIZE": text}).size == want
    toml = tmp_path / "kv.toml"
    toml.write_text(f'size = "{text}"\n')
    assert load_config(str(toml), env={}).size == want


def test_facade_turns_config_error_into_invalid_value():
    from kvstore.client.mooncake import _size_field
    assert _size_field("local_buffer_size", 0) == 0          # Mooncake allows 0 (no local buffer)
    for bad in ("lots", -1, True, 1.5j):
        with pytest.raises(InvalidValue, match=r"^local_buffer_size:"):
            _size_field("local_buffer_size", bad)
