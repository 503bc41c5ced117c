"""The daemon's one configuration object.

Owns: every setting, its default, its parsing from a TOML file, the environment
(KVSTORE_<FIELD>) and command-line flags (in that order of precedence, flags winning),
and validation at start-up with messages that name the bad field. Sizes are read by
kvstore.sizes (every unit a power of 1024: "4GB" is 4 GiB, as in Mooncake); the
defaults' names live in kvstore.defaults. ``group`` must name a group of this host
(``check_group`` refuses, at daemon start, one the daemon may not give files to).
Must never: let a bad value through to run time; start from a half-valid config.
"""

import dataclasses
import os

try:
    import tomllib
except ModuleNotFoundError:     # Python 3.10: tomllib is 3.11+; tomli is the same parser
    import tomli as tomllib

from . import access
from .defaults import DEFAULT_DATA_DIR, DEFAULT_HUGETLBFS_DIR, DEFAULT_SOCKET, ENV_PREFIX
from .errors import ConfigError
from .sizes import parse_size  # noqa: F401  (re-exported: callers import it from here)


def _parse_bool(value, field):
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{field}: {value!r} is not a boolean; use true or false")


def _parse_fraction(value, field):
    if isinstance(value, bool):
        raise ConfigError(f"{field}: {value!r} is not a number; use a fraction such as 0.9")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: {value!r} is not a number; use a fraction such as 0.9") from None
    if not 0.0 < f <= 1.0:
        raise ConfigError(f"{field}: {value!r} must be in (0, 1], e.g. 0.9")
    return f


def _parse_choice(choices):
    def parse(value, field):
        s = str(value).strip().lower()
        if s not in choices:
            raise ConfigError(f"{field}: {value!r} is not one of {', '.join(choices)}")
        return s
    return parse


def _parse_path(value, field):
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field}: {value!r} is not a path; give a non-empty path")
    return os.path.abspath(os.path.expanduser(value))


def _parse_pos_int(value, field):
    if isinstance(value, (bool, float)):
        raise ConfigError(f"{field}: {value!r} is not an integer; use a whole number such as 100")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: {value!r} is not an integer; use a whole number such as 100") from None
    if n <= 0:
        raise ConfigError(f"{field}: {value!r} must be a positive integer")
    return n


def _parse_level(value, field):
    s = str(value).strip().upper()
    if s not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{field}: {value!r} is not one of DEBUG, INFO, WARNING, ERROR")
    return s


def _parse_quotas(value, field):
    """Namespace quotas: a TOML table {name = size}, or "name=size,name=size" (env, flag)."""
    if isinstance(value, str):
        items = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, eq, size = part.rpartition("=")
            if not eq:
                raise ConfigError(f"{field}: {part!r} is not name=size; write e.g. "
                                  f"\"tenant-a=4GiB,tenant-b=2GiB\"")
            items[name.strip()] = size.strip()
        value = items
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: {value!r} is not a table of namespace = size")
    out = {}
    for name, size in value.items():
        if not isinstance(name, str) or len(name.encode("utf-8")) > 64:
            raise ConfigError(f"{field}: namespace {name!r} must be a string of at most 64 bytes")
        q = parse_size(size, f"{field}.{name or '(default namespace)'}")
        if q <= 0:
            raise ConfigError(f"{field}: the quota of {name!r} must be positive")
        out[name] = q
    return out


def _parse_hostport(text, field, what):
    """(host, port) of "host:port" ("[v6]:port" for IPv6), or ConfigError naming field."""
    t = str(text).strip()
    host, sep, port = t.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{field}: {text!r} is not {what} host:port, e.g. 10.0.0.2:7700")
    return host, int(port)


def _parse_cluster(value, field):
    """etcd://HOST:PORT[,HOST:PORT...] -> the same text, normalised; "" = no etcd."""
    s = str(value).strip()
    if not s:
        return ""
    if not s.startswith("etcd://"):
        raise ConfigError(f"{field}: {value!r} is not etcd://HOST:PORT[,HOST:PORT...]; for a static "
                          f"cluster without etcd use peers instead")
    eps = [p for p in s[len("etcd://"):].split(",") if p.strip()]
    if not eps:
        raise ConfigError(f"{field}: {value!r} names no etcd endpoint; write etcd://HOST:PORT")
    return "etcd://" + ",".join("%s:%d" % _parse_hostport(e, field, "an etcd") for e in eps)


def _parse_peers(value, field):
    """Static peers: a list, or "host:port,host:port" -> ["host:port", ...]."""
    if isinstance(value, str):
        value = [p for p in value.split(",") if p.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{field}: {value!r} is not a list of host:port")
    out = []
    for p in value:
        host, port = _parse_hostport(p, field, "a peer's")
        out.append(f"{host}:{port}")
    if len(set(out)) != len(out):
        raise ConfigError(f"{field}: a peer is listed twice in {value!r}")
    return out


def _parse_port(value, field):
    if isinstance(value, (bool, float)):
        raise ConfigError(f"{field}: {value!r} is not a port number; use 1-65535, or 0 for a free one")
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{field}: {value!r} is not a port number; use 1-65535, or 0 for a free one") from None
    if not 0 <= n <= 65535:
        raise ConfigError(f"{field}: {n} is not a port number; use 1-65535, or 0 for a free one")
    return n


def _parse_seconds(value, field):
    if isinstance(value, bool):
        raise ConfigError(f"{field}: {value!r} is not a number of seconds")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: {value!r} is not a number of seconds, e.g. 2") from None
    if not 0 < f <= 3600:
        raise ConfigError(f"{field}: {value!r} must be more than 0 and at most 3600 seconds")
    return f


def _parse_address(value, field):
    s = str(value).strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    if s.count(":") == 1 or (":" in s and not all(c in "0123456789abcdefABCDEF:." for c in s)):
        raise ConfigError(f"{field}: {value!r} is not an address; give the IP other daemons dial, "
                          f"e.g. 10.0.0.2 (no port: that is peer_port)")
    if s and ":" not in s and not all(c.isalnum() or c in ".-" for c in s):
        raise ConfigError(f"{field}: {value!r} is not an address; give the IP other daemons dial, e.g. 10.0.0.2")
    return s


def _size_or_auto(value, field):
    if str(value).strip().lower() == "auto":
        return 0
    return parse_size(value, field)


@dataclasses.dataclass
class Config:
    """Daemon settings. Sizes are bytes once validated."""

    socket: str = DEFAULT_SOCKET
    size: int = 1 << 30
    #: holds the LMDB index; tmpfs is best: the index need only outlive processes, not
    #: reboots (the segment does not survive one either), and disk writeback stalls it
    data_dir: str = DEFAULT_DATA_DIR
    #: auto: huge pages when they can be had, else /dev/shm; require: fail without them; off
    hugepages: str = "auto"
    #: as root, raise vm.nr_hugepages and mount hugetlbfs_dir when needed
    reserve_hugepages: bool = False
    hugetlbfs_dir: str = DEFAULT_HUGETLBFS_DIR
    #: eviction starts when used bytes exceed high_watermark * size, stops at low_watermark
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    #: LMDB map size; 0 = auto (size / 8, at least 64 MiB)
    index_map_size: int = 0
    max_clients: int = 1000
    #: on a clean stop, remove the segment and index instead of keeping them for a restart
    discard_on_exit: bool = False
    #: mode of the socket and of the shared files clients are handed (segment, table,
    #: slots); 0600 by default, 0660 by default when ``group`` is set
    socket_mode: str = "0600"
    log_level: str = "INFO"
    #: group (name or number) given the socket and the shared files; "" = the daemon's
    group: str = ""
    #: namespace -> guaranteed share in bytes (kvstore.store.quotas); empty: no quotas
    namespace_quotas: dict = dataclasses.field(default_factory=dict)
    # ---- the cluster (docs/cluster.md); none of it is used on a single host
    #: etcd://HOST:PORT[,HOST:PORT...]: membership and liveness in etcd; "" = no etcd
    cluster: str = ""
    #: a static cluster without etcd: every other daemon's advertise:peer_port
    peers: list = dataclasses.field(default_factory=list)
    #: the address of this host that other daemons dial (must be on a local interface)
    advertise: str = ""
    #: TCP port of the peer protocol; 0 picks a free one and publishes it (etcd only)
    peer_port: int = 0
    #: file holding the cluster secret (at least 16 bytes), the same on every daemon
    cluster_secret_file: str = ""
    #: copies a put places on distinct hosts unless it says otherwise
    replicas: int = 1
    #: seconds a cross-host get may spend on one holder before trying the next
    transfer_timeout: float = 2.0
    #: seconds of the etcd lease; a daemon that stops renewing it leaves every lookup then
    member_ttl: float = 3.0
    #: at start, wait for an unreachable etcd instead of refusing to start
    wait_for_cluster: bool = False

    @property
    def clustered(self):
        return bool(self.cluster or self.peers)

    def group_id(self):
        """The gid of ``group``, or None when no group is configured."""
        return access.group_id(self.group) if self.group else None

    def index_map_bytes(self):
        if self.index_map_size:
            return self.index_map_size
        return max(64 << 20, (self.size // 8 + (1 << 20) - 1) & ~((1 << 20) - 1))


_PARSERS = {
    "socket": _parse_path,
    "size": parse_size,
    "data_dir": _parse_path,
    "hugepages": _parse_choice(("auto", "require", "off")),
    "reserve_hugepages": _parse_bool,
    "hugetlbfs_dir": _parse_path,
    "high_watermark": _parse_fraction,
    "low_watermark": _parse_fraction,
    "index_map_size": _size_or_auto,
    "max_clients": _parse_pos_int,
    "discard_on_exit": _parse_bool,
    "socket_mode": lambda v, f: _parse_mode(v, f),
    "log_level": _parse_level,
    "namespace_quotas": _parse_quotas,
    "group": lambda v, f: _parse_group(v, f),
    "cluster": _parse_cluster,
    "peers": _parse_peers,
    "advertise": _parse_address,
    "peer_port": _parse_port,
    "cluster_secret_file": lambda v, f: _parse_path(v, f) if str(v).strip() else "",
    "replicas": _parse_pos_int,
    "transfer_timeout": _parse_seconds,
    "member_ttl": _parse_seconds,
    "wait_for_cluster": _parse_bool,
}


def _parse_group(value, field):
    s = str(value).strip()
    if not s:
        return ""
    if isinstance(value, bool) or not all(c.isalnum() or c in "._-" for c in s):
        raise ConfigError(f"{field}: {value!r} is not a group name or number; give one such as kvstore")
    try:
        access.group_id(s)
    except KeyError:
        raise ConfigError(f"{field}: there is no group {s!r} on this host; create it (groupadd {s}) "
                          f"or give an existing group") from None
    return s


def check_group(cfg):
    """Refuse a group this process cannot give its files to (it must be root or a member
    of it). Called when the daemon starts, before it creates anything."""
    gid = cfg.group_id()
    if gid is None or access.can_give_to(gid):
        return
    import pwd
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    raise ConfigError(f"group: the daemon's user {user} is neither root nor a member of group "
                      f"{cfg.group}, so it cannot give the store's files to it; add it "
                      f"(usermod -aG {cfg.group} {user}, then log in again) or run the daemon as root")


def _parse_mode(value, field):
    try:
        mode = int(str(value), 8)
    except ValueError:
        raise ConfigError(f"{field}: {value!r} is not an octal file mode such as 0600") from None
    if mode & ~0o777 or not mode & 0o600 == 0o600:
        raise ConfigError(f"{field}: {value!r} must be an octal mode that includes 0600, e.g. 0660")
    return f"{mode:04o}"


FIELDS = tuple(_PARSERS)


def load_config(file=None, env=None, overrides=None):
    """Build a validated Config: defaults < file (TOML) < environment < overrides.

    ``overrides`` holds flag values; None values are ignored.
    """
    raw = {}
    if file:
        try:
            with open(file, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config: file {file} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config: {file} is not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"config: cannot read {file}: {e.strerror}; give a readable TOML file") from None
        data = data.get("kvstore", data)
        if not isinstance(data, dict):
            raise ConfigError(f"kvstore: in {file} it must be a table ([kvstore]) of fields")
        for k, v in data.items():
            if k not in _PARSERS:
                raise ConfigError(f"{k}: unknown field in {file}; known fields: {', '.join(FIELDS)}")
            raw[k] = v
    env = os.environ if env is None else env
    for k in FIELDS:
        v = env.get(ENV_PREFIX + k.upper())
        if v is not None and v != "":
            raw[k] = v
    for k, v in (overrides or {}).items():
        if v is not None:
            if k not in _PARSERS:
                raise ConfigError(f"{k}: unknown field; known fields: {', '.join(FIELDS)}")
            raw[k] = v
    values = {k: _PARSERS[k](v, k) for k, v in raw.items()}
    cfg = Config(**values)
    if cfg.group:
        if "socket_mode" not in values:
            cfg.socket_mode = "0660"          # a group that cannot connect would be pointless
        elif int(cfg.socket_mode, 8) & 0o060 != 0o060:
            raise ConfigError(f"socket_mode: {cfg.socket_mode} gives group {cfg.group} no access; "
                              f"use 0660, or leave out group")
    if cfg.low_watermark >= cfg.high_watermark:
        raise ConfigError(
            f"low_watermark: {cfg.low_watermark} must be below high_watermark {cfg.high_watermark}")
    if cfg.size < (1 << 20):
        raise ConfigError(f"size: {cfg.size} bytes is too small; use at least 1MiB")
    _check_cluster(cfg)
    reserved = sum(cfg.namespace_quotas.values())
    if reserved > cfg.size:
        raise ConfigError(f"namespace_quotas: they add up to {reserved} bytes, more than the "
                          f"{cfg.size}-byte segment; lower them or raise size")
    return cfg


def _check_cluster(cfg):
    """The cluster fields must agree with each other (the host-dependent checks, such as
    whether advertise is a local address, run when the daemon starts)."""
    if cfg.cluster and cfg.peers:
        raise ConfigError("peers: give either cluster (etcd) or peers (a static list), not both")
    if not cfg.clustered:
        for k in ("advertise", "cluster_secret_file"):
            if getattr(cfg, k):
                raise ConfigError(f"{k}: set, but neither cluster nor peers is: this daemon would "
                                  f"serve one host only; add --cluster etcd://HOST:PORT or --peers")
        if cfg.peer_port:
            raise ConfigError("peer_port: set, but neither cluster nor peers is; add --cluster or --peers")
        if cfg.replicas > 1:
            raise ConfigError(f"replicas: {cfg.replicas} copies need other hosts; add --cluster or "
                              f"--peers, or use 1")
        return
    if not cfg.advertise:
        raise ConfigError("advertise: a cluster daemon must say which address of this host other "
                          "daemons dial; add --advertise IP (an address of a local interface)")
    if not cfg.cluster_secret_file:
        raise ConfigError("cluster_secret_file: a cluster needs a secret shared by every daemon; "
                          "create one (head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE) "
                          "and add --cluster-secret-file FILE")
    if cfg.peers and not cfg.peer_port:
        raise ConfigError("peer_port: a static cluster (peers) needs a fixed port that the others "
                          "list; add --peer-port N (0, a free port, works only with etcd)")
    me = f"{cfg.advertise}:{cfg.peer_port}"
    if me in cfg.peers:
        raise ConfigError(f"peers: {me} is this daemon itself (advertise:peer_port); list only the others")
