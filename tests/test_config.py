"""kvstore.config: sizes, the defaults < file < environment < flags order, validation.

Unit level: load_config is called with an explicit ``env`` dict, so the test process's
own KVSTORE_* variables never leak in.
"""

import os

import pytest

from kvstore.config import FIELDS, Config, load_config, parse_size
from kvstore.errors import ConfigError

MiB = 1 << 20
GiB = 1 << 30


def write(tmp_path, text, name="kvstore.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ---- parse_size -------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("2GiB", 2 * GiB),
    ("512MiB", 512 * MiB),
    ("64k", 64 << 10),
    ("1G", GiB),
    ("1.5k", 1536),
    (" 3 MiB ", 3 * MiB),
    ("2gb", 2 * GiB),                  # every unit is binary, as in Mooncake (kvstore.sizes)
    ("4096", 4096),
    (4096, 4096),
    (1, 1),
])
def test_parse_size_accepts(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["2XB", "", "-1", True, False, 0, -5, "0", "GiB", "1e3", "2 GiB B", None])
def test_parse_size_rejects_with_field_name_first(value):
    with pytest.raises(ConfigError) as ei:
        parse_size(value)
    assert str(ei.value).startswith("size:"), str(ei.value)
    with pytest.raises(ConfigError) as ei:
        parse_size(value, "index_map_size")
    assert str(ei.value).startswith("index_map_size:"), str(ei.value)


# ---- defaults and precedence ------------------------------------------------------------

def test_defaults_without_file_env_or_flags():
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.size == GiB and cfg.hugepages == "auto" and cfg.socket_mode == "0600"
    assert cfg.reserve_hugepages is False and cfg.discard_on_exit is False
    assert cfg.log_level == "INFO" and cfg.max_clients == 1000


def test_precedence_defaults_file_env_flags(tmp_path):
    f = write(tmp_path, 'size = "32MiB"\nmax_clients = 7\nlog_level = "debug"\nhigh_watermark = 0.95\n')
    # file alone beats defaults
    cfg = load_config(f, env={})
    assert (cfg.size, cfg.max_clients, cfg.log_level, cfg.high_watermark) == (32 * MiB, 7, "DEBUG", 0.95)
    assert cfg.low_watermark == 0.8          # untouched field keeps its default
    # environment beats the file
    env = {"KVSTORE_SIZE": "48MiB", "KVSTORE_MAX_CLIENTS": "9"}
    cfg = load_config(f, env=env)
    assert (cfg.size, cfg.max_clients, cfg.log_level) == (48 * MiB, 9, "DEBUG")
    # flags beat the environment; a None flag (not given) does not
    cfg = load_config(f, env=env, overrides={"size": "96MiB", "max_clients": None, "log_level": None})
    assert (cfg.size, cfg.max_clients, cfg.log_level) == (96 * MiB, 9, "DEBUG")


def test_flags_beat_environment_without_a_file():
    cfg = load_config(env={"KVSTORE_HUGEPAGES": "off", "KVSTORE_DISCARD_ON_EXIT": "yes"},
                      overrides={"hugepages": "require"})
    assert cfg.hugepages == "require"
    assert cfg.discard_on_exit is True


def test_empty_environment_value_is_ignored(tmp_path):
    f = write(tmp_path, 'size = "32MiB"\n')
    assert load_config(f, env={"KVSTORE_SIZE": ""}).size == 32 * MiB


def test_environment_names_every_field():
    env = {"KVSTORE_SOCKET": "/tmp/x.sock", "KVSTORE_SIZE": "2MiB", "KVSTORE_DATA_DIR": "/tmp/xd",
           "KVSTORE_HUGEPAGES": "OFF", "KVSTORE_RESERVE_HUGEPAGES": "true",
           "KVSTORE_HUGETLBFS_DIR": "/tmp/xh", "KVSTORE_HIGH_WATERMARK": "0.7",
           "KVSTORE_LOW_WATERMARK": "0.5", "KVSTORE_INDEX_MAP_SIZE": "80MiB",
           "KVSTORE_MAX_CLIENTS": "3", "KVSTORE_DISCARD_ON_EXIT": "1",
           "KVSTORE_SOCKET_MODE": "660", "KVSTORE_LOG_LEVEL": "warning", "KVSTORE_GROUP": "0",
           "KVSTORE_NAMESPACE_QUOTAS": "a=1MiB", "KVSTORE_CLUSTER": "",
           "KVSTORE_PEERS": "10.0.0.2:7700,10.0.0.3:7700", "KVSTORE_ADVERTISE": "10.0.0.1",
           "KVSTORE_PEER_PORT": "7700", "KVSTORE_CLUSTER_SECRET_FILE": "/tmp/secret",
           "KVSTORE_REPLICAS": "2", "KVSTORE_TRANSFER_TIMEOUT": "1.5", "KVSTORE_MEMBER_TTL": "4",
           "KVSTORE_WAIT_FOR_CLUSTER": "yes"}
    assert {k[len("KVSTORE_"):].lower() for k in env} == set(FIELDS)
    cfg = load_config(env=env)
    assert cfg == Config(socket="/tmp/x.sock", size=2 * MiB, data_dir="/tmp/xd", hugepages="off",
                         reserve_hugepages=True, hugetlbfs_dir="/tmp/xh", high_watermark=0.7,
                         low_watermark=0.5, index_map_size=80 * MiB, max_clients=3,
                         discard_on_exit=True, socket_mode="0660", log_level="WARNING", group="0",
                         namespace_quotas={"a": MiB}, peers=["10.0.0.2:7700", "10.0.0.3:7700"],
                         advertise="10.0.0.1", peer_port=7700, cluster_secret_file="/tmp/secret",
                         replicas=2, transfer_timeout=1.5, member_ttl=4.0, wait_for_cluster=True)


def test_file_with_kvstore_table(tmp_path):
    f = write(tmp_path, '[kvstore]\nsize = "16MiB"\nhugepages = "off"\nreserve_hugepages = true\n')
    cfg = load_config(f, env={})
    assert (cfg.size, cfg.hugepages, cfg.reserve_hugepages) == (16 * MiB, "off", True)


def test_file_with_top_level_keys_and_integer_size(tmp_path):
    f = write(tmp_path, 'size = 8388608\ndiscard_on_exit = true\nsocket_mode = "0640"\n')
    cfg = load_config(f, env={})
    assert (cfg.size, cfg.discard_on_exit, cfg.socket_mode) == (8 * MiB, True, "0640")


def test_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(env={}, overrides={"socket": "rel/kv.sock", "data_dir": "~/kvdata"})
    assert cfg.socket == str(tmp_path / "rel" / "kv.sock")
    assert cfg.data_dir == os.path.join(os.path.expanduser("~"), "kvdata")


# ---- errors that name the field ---------------------------------------------------------

def test_unknown_field_in_file_is_named(tmp_path):
    f = write(tmp_path, 'size = "16MiB"\nsocket_path = "/tmp/s"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(f, env={})
    assert str(ei.value).startswith("socket_path:")
    assert "unknown field" in str(ei.value)


def test_unknown_field_in_kvstore_table_is_named(tmp_path):
    f = write(tmp_path, '[kvstore]\nhuge_pages = "off"\n')
    with pytest.raises(ConfigError, match=r"^huge_pages: unknown field"):
        load_config(f, env={})


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match=r"^colour: unknown field"):
        load_config(env={}, overrides={"colour": "blue"})


@pytest.mark.parametrize("field, value", [
    # bool
    ("reserve_hugepages", '"maybe"'),
    ("discard_on_exit", "2"),
    ("discard_on_exit", '"yes please"'),
    # fraction
    ("high_watermark", '"most"'),
    ("high_watermark", "1.5"),
    ("low_watermark", "0"),
    ("low_watermark", "-0.2"),
    ("high_watermark", '"nan"'),
    # choice
    ("hugepages", '"sometimes"'),
    ("hugepages", "true"),
    # path
    ("socket", '""'),
    ("data_dir", "5"),
    ("hugetlbfs_dir", '"   "'),
    # octal mode
    ("socket_mode", '"rw-------"'),
    ("socket_mode", '"0400"'),        # lacks owner read/write
    ("socket_mode", '"0689"'),        # not octal
    ("socket_mode", '"1777"'),        # beyond the permission bits
    # log level
    ("log_level", '"verbose"'),
    ("log_level", "10"),
    # sizes and integers
    ("size", '"2XB"'),
    ("size", "true"),
    ("index_map_size", '"lots"'),
    ("max_clients", '"many"'),
    ("max_clients", "0"),
    ("max_clients", "true"),
    # wrong TOML types for number fields
    ("high_watermark", "true"),
    ("low_watermark", "false"),   # float(False) == 0.0 is refused by the range check
    ("max_clients", "1.5"),
])
def test_bad_value_in_file_names_the_field(tmp_path, field, value):
    f = write(tmp_path, f"{field} = {value}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(f, env={})
    assert str(ei.value).startswith(f"{field}:"), str(ei.value)


@pytest.mark.parametrize("field, value", [
    ("reserve_hugepages", "maybe"), ("high_watermark", "abc"), ("hugepages", "always"),
    ("socket_mode", "0200"), ("log_level", "loud"), ("size", "-1"), ("max_clients", "1.5"),
])
def test_bad_value_in_environment_names_the_field(field, value):
    with pytest.raises(ConfigError) as ei:
        load_config(env={"KVSTORE_" + field.upper(): value})
    assert str(ei.value).startswith(f"{field}:"), str(ei.value)


def test_kvstore_key_that_is_not_a_table(tmp_path):
    f = write(tmp_path, "kvstore = 5\n")
    with pytest.raises(ConfigError):
        load_config(f, env={})


def test_bad_flag_names_the_field():
    with pytest.raises(ConfigError, match=r"^size:"):
        load_config(env={}, overrides={"size": "2XB"})


@pytest.mark.parametrize("low, high", [("0.9", "0.9"), ("0.95", "0.9"), ("0.5", "0.4")])
def test_low_watermark_must_be_below_high(low, high):
    with pytest.raises(ConfigError) as ei:
        load_config(env={"KVSTORE_LOW_WATERMARK": low, "KVSTORE_HIGH_WATERMARK": high})
    assert str(ei.value).startswith("low_watermark:")
    assert "high_watermark" in str(ei.value)


def test_low_watermark_above_default_high_is_refused():
    with pytest.raises(ConfigError, match=r"^low_watermark:"):
        load_config(env={}, overrides={"low_watermark": "0.91"})


def test_watermarks_accepted_when_ordered():
    cfg = load_config(env={}, overrides={"low_watermark": "0.5", "high_watermark": "1"})
    assert (cfg.low_watermark, cfg.high_watermark) == (0.5, 1.0)


def test_size_below_one_mib_is_refused():
    with pytest.raises(ConfigError, match=r"^size:"):
        load_config(env={}, overrides={"size": "512k"})
    assert load_config(env={}, overrides={"size": "1MiB"}).size == MiB


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as ei:
        load_config(missing, env={})
    assert str(ei.value).startswith("config:") and missing in str(ei.value)


@pytest.mark.parametrize("text", ['size = "16MiB\n', "size = = 3\n", "[kvstore\nsize=1\n", "\xff\xfe"])
def test_invalid_toml(tmp_path, text):
    p = tmp_path / "bad.toml"
    p.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as ei:
        load_config(str(p), env={})
    assert str(ei.value).startswith("config:") and "not valid TOML" in str(ei.value)


def test_bad_file_value_is_refused_even_when_a_flag_overrides_nothing_else(tmp_path):
    # A bad value must never be let through, whatever layer it comes from.
    f = write(tmp_path, 'hugepages = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"^hugepages:"):
        load_config(f, env={}, overrides={"size": "64MiB"})
    # ... but a flag for the same field replaces the file's value before validation
    assert load_config(f, env={}, overrides={"hugepages": "off"}).hugepages == "off"


# ---- normalisation ----------------------------------------------------------------------

def test_values_are_normalised():
    cfg = load_config(env={}, overrides={"hugepages": " Require ", "log_level": "error",
                                         "socket_mode": "660", "reserve_hugepages": "On",
                                         "discard_on_exit": "no", "max_clients": "12"})
    assert cfg.hugepages == "require" and cfg.log_level == "ERROR" and cfg.socket_mode == "0660"
    assert cfg.reserve_hugepages is True and cfg.discard_on_exit is False and cfg.max_clients == 12


# ---- index_map_bytes --------------------------------------------------------------------

@pytest.mark.parametrize("size, expected", [
    (MiB, 64 * MiB),                      # small stores get the 64 MiB floor
    (64 * MiB, 64 * MiB),
    (512 * MiB, 64 * MiB),                # size/8 == 64 MiB exactly
    (GiB, 128 * MiB),                     # size/8
    (8 * GiB, GiB),
    (8 * 100 * MiB + 8 * MiB + 8, 102 * MiB),   # size/8 = 101 MiB + 1 byte -> rounded up to a MiB
])
def test_index_map_bytes_auto_rule(size, expected):
    cfg = load_config(env={}, overrides={"size": size})
    assert cfg.index_map_size == 0
    got = cfg.index_map_bytes()
    assert got == expected
    assert got % MiB == 0 and got >= size // 8


def test_index_map_size_explicit_and_auto():
    cfg = load_config(env={}, overrides={"size": "8GiB", "index_map_size": "256MiB"})
    assert cfg.index_map_bytes() == 256 * MiB
    cfg = load_config(env={"KVSTORE_INDEX_MAP_SIZE": "256MiB"}, overrides={"index_map_size": "AUTO"})
    assert cfg.index_map_size == 0 and cfg.index_map_bytes() == 128 * MiB   # default 1 GiB / 8
    with pytest.raises(ConfigError, match=r"^index_map_size:"):
        load_config(env={}, overrides={"index_map_size": "0"})
