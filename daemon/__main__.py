"""Command line of the daemon: ``kvstore-daemon`` / ``python -m kvstore.daemon``.

Owns: flag parsing and turning start-up refusals into one line on stderr and a
non-zero exit (2 for a bad configuration, 1 for any other refusal, including a damaged
index that could not be rebuilt: kvstore.errors.IndexDamaged). ``--destroy`` says what
it removed, or that there was nothing to remove (exit 0 either way: the store is gone).
Must never: print a traceback for a refusal it can explain.
"""

import argparse
import logging
import os
import sys

from kvstore.config import FIELDS, load_config
from kvstore.errors import ConfigError, DaemonStartError, KVStoreError


def build_parser():
    p = argparse.ArgumentParser(
        prog="kvstore-daemon",
        description="Per-host kvstore daemon: a shared-memory KV-cache segment indexed in LMDB.")
    p.add_argument("--config", help="TOML file with any of the fields below (flags win over it)")
    p.add_argument("--socket", help="unix socket path clients connect to (default /tmp/kvstore.sock)")
    p.add_argument("--size", help="segment size, e.g. 2GiB (default 1GiB)")
    p.add_argument("--data-dir", dest="data_dir", help="directory of the LMDB index, best on tmpfs (default /dev/shm/kvstore-data)")
    p.add_argument("--hugepages", choices=("auto", "require", "off"),
                   help="segment backing: huge pages if possible (auto), only huge pages, or /dev/shm")
    p.add_argument("--reserve-hugepages", dest="reserve_hugepages", action="store_const", const=True,
                   help="as root, raise vm.nr_hugepages and mount hugetlbfs as needed")
    p.add_argument("--hugetlbfs-dir", dest="hugetlbfs_dir", help="hugetlbfs mount point (default /dev/hugepages)")
    p.add_argument("--high-watermark", dest="high_watermark", help="evict above this fraction used (0.9)")
    p.add_argument("--low-watermark", dest="low_watermark", help="evict down to this fraction (0.8)")
    p.add_argument("--index-map-size", dest="index_map_size", help="LMDB map size, or auto")
    p.add_argument("--max-clients", dest="max_clients", help="most clients connected at once (1000)")
    p.add_argument("--discard-on-exit", dest="discard_on_exit", action="store_const", const=True,
                   help="remove segment and index on a clean stop (default: keep them for the next start)")
    p.add_argument("--socket-mode", dest="socket_mode",
                   help="mode of the socket and the shared files, octal (0600; 0660 with --group)")
    p.add_argument("--group", dest="group",
                   help="group (name or number) given the socket and the shared files, so its "
                        "members may use the store (the daemon must be root or a member)")
    p.add_argument("--namespace-quotas", dest="namespace_quotas",
                   help="guaranteed shares, e.g. tenant-a=4GiB,tenant-b=2GiB (docs/namespaces.md)")
    p.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING or ERROR")
    c = p.add_argument_group("cluster (docs/cluster.md)")
    c.add_argument("--cluster", help="etcd://HOST:PORT[,HOST:PORT...]: membership and liveness in etcd")
    c.add_argument("--peers", help="HOST:PORT,...: a static cluster without etcd (the other daemons)")
    c.add_argument("--advertise", help="the address of this host other daemons dial (a local interface's)")
    c.add_argument("--peer-port", dest="peer_port",
                   help="TCP port of the peer protocol (0: a free one, published in etcd)")
    c.add_argument("--cluster-secret-file", dest="cluster_secret_file",
                   help="file with the cluster secret (>= 16 bytes), the same on every daemon")
    c.add_argument("--replicas", help="copies a put places on distinct hosts (default 1)")
    c.add_argument("--transfer-timeout", dest="transfer_timeout",
                   help="seconds a cross-host get spends on one holder before the next (2)")
    c.add_argument("--member-ttl", dest="member_ttl", help="seconds of this daemon's etcd lease (3)")
    c.add_argument("--wait-for-cluster", dest="wait_for_cluster", action="store_const", const=True,
                   help="at start, wait for an unreachable etcd instead of refusing")
    p.add_argument("--destroy", action="store_true",
                   help="remove the segment and index of a stopped daemon's --data-dir, then exit")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in FIELDS if hasattr(args, k)}
    try:
        cfg = load_config(args.config, overrides=overrides)
    except ConfigError as e:
        print(f"kvstore-daemon: bad configuration: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s kvstore-daemon %(levelname)s %(message)s")
    from .server import Daemon
    from .startup import destroy_store
    try:
        if args.destroy:
            removed = destroy_store(cfg)
            if removed:
                print(f"kvstore-daemon: removed the store in {cfg.data_dir} "
                      f"({', '.join(removed)})", file=sys.stderr)
            elif not os.path.isdir(cfg.data_dir):
                print(f"kvstore-daemon: nothing to remove: {cfg.data_dir} does not exist "
                      f"(and no segment of it is left)", file=sys.stderr)
            else:
                print(f"kvstore-daemon: nothing to remove: no store in {cfg.data_dir}",
                      file=sys.stderr)
            return 0
        Daemon(cfg).run()
    except (DaemonStartError, KVStoreError, OSError) as e:
        print(f"kvstore-daemon: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
