"""Bringing a store up: start-up checks, then adopting what a previous daemon left or
starting fresh; and ``destroy_store`` for ``--destroy``.

Owns: the data dir lock (one daemon per data dir), the socket check (one daemon per
socket; a stale socket of a dead daemon is removed), the memory check, opening the LMDB
index (with its disk space reserved), the segment (reopened with its recorded backing,
or created), the slots file (kept across restarts: live clients' holds survive), and a
new published table for this run (the previous run's table is retired first, so its
readers move over before anything is freed). Recovery drops dead clients, reclaims
doomed extents nobody holds, verifies every sealed object's checksum (corrupt ones are
dropped), checks that the extents tile the segment, and publishes every record.
Before this process opens an index left on disk, daemon/salvage.py checks it in a child
process and rebuilds it if it is damaged (LMDB can crash on a damaged page). Adopting an
index needs no new space on the data dir's file system (only write access is checked;
a new store is probed with a file), so a full file system does not keep a crashed store
down; the index files get their space before LMDB writes through its map (a full file
system is then a refusal, not SIGBUS). ``remove_files`` reads the index's description in
a child process too, and returns what it removed.
Must never: adopt an index that does not describe the segment next to it, open an
unchecked index, free anything before the old table is retired, or start from a
half-checked store.
"""

import errno
import fcntl
import logging
import os
import shutil
import socket
import stat
import time
import uuid

import numpy as np

from kvstore import access, host, protocol, segment, table as table_mod
from kvstore.errors import DaemonStartError, IndexFull, KVStoreError
from kvstore.keys import user_key
from kvstore.slots import SlotsFile
from kvstore.store import index_check, maintenance
from kvstore.store.schema import SCHEMA, Env

from . import salvage

log = logging.getLogger("kvstore.daemon")


def check_data_dir(cfg):
    """Create and lock the data dir; returns the lock fd."""
    d = cfg.data_dir
    try:
        access.make_dirs(d)      # 0700: no client needs the data dir (see kvstore.access)
        _check_writable(d)
    except OSError as e:
        raise DaemonStartError(f"data dir {d} is not writable ({e.strerror}); "
                               f"choose another --data-dir or fix its permissions") from None
    fd = os.open(os.path.join(d, "daemon.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise DaemonStartError(f"data dir {d} is in use by another daemon (pid {other or '?'}); "
                               f"stop it or choose another --data-dir") from None
    pid = str(os.getpid()).encode()
    try:                         # over the old pid in place: no new space on a full disk
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))
    except OSError as e:         # the pid is only for the refusal message of another daemon
        log.debug("could not record the pid in %s/daemon.lock: %s", d, e.strerror)
    return fd


def _check_writable(d):
    """Raise OSError unless the daemon can write in d. An index left there is adopted
    in place and needs no new space, so then only write access is checked (a full file
    system must not keep the store down after a crash); a new store needs space, so a
    probe file is written."""
    index = os.path.join(d, "index")
    if os.path.exists(os.path.join(index, "data.mdb")):
        for path in (d, index):
            if not os.access(path, os.W_OK | os.X_OK):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        for name in ("data.mdb", "lock.mdb"):
            if os.path.exists(os.path.join(index, name)):
                os.close(os.open(os.path.join(index, name), os.O_RDWR))
        return
    probe = os.path.join(d, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def check_socket(path):
    if not os.path.exists(path):
        if not os.path.isdir(os.path.dirname(path)):
            raise DaemonStartError(f"socket directory {os.path.dirname(path)} does not exist; create it")
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise DaemonStartError(f"{path} exists and is not a socket; choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        log.info("removed stale socket %s left by a dead daemon", path)
        return
    except OSError as e:
        raise DaemonStartError(f"socket {path} exists and does not answer like a dead one "
                               f"({e.strerror or e}); is a daemon still using it?") from None
    finally:
        probe.close()
    raise DaemonStartError(f"socket {path} belongs to a live daemon; stop it or choose another --socket")


def index_path(cfg):
    return os.path.join(cfg.data_dir, "index")


#: smallest index map accepted (LMDB needs a few pages; recovery and a loop turn need more)
MIN_INDEX_MAP = 1 << 20


def map_too_small(map_size, why):
    return (f"index_map_size {map_size} bytes is too small ({why}); raise --index-map-size "
            f"(index_map_size in the config file), or leave it auto")


def open_index(cfg, mode):
    """The LMDB index, created if needed, with its disk space reserved now (with a
    write-mapped index a full disk would otherwise surface as SIGBUS at run time)."""
    path = index_path(cfg)
    map_size = cfg.index_map_bytes()
    if map_size < MIN_INDEX_MAP:
        raise DaemonStartError(map_too_small(map_size, f"the index needs at least {MIN_INDEX_MAP}"))
    try:
        access.make_dirs(path)
        os.chmod(path, 0o700)    # the index is the daemon's alone, whatever the access mode
    except OSError as e:
        raise DaemonStartError(f"cannot open the index in {path} ({e}); move it away or run "
                               f"kvstore-daemon --destroy --data-dir {cfg.data_dir}") from None
    try:                         # before LMDB writes through its map (a full disk: SIGBUS)
        salvage.reserve_files(path, map_size)
    except OSError as e:
        raise DaemonStartError(f"data dir {cfg.data_dir} has no room for the {map_size}-byte index "
                               f"({e.strerror}); free space or lower --index-map-size") from None
    try:
        env = Env(path, map_size, create=True, mode=mode)
    except IndexFull:
        raise DaemonStartError(map_too_small(map_size, "the index's tables do not fit in it")) from None
    except (OSError, KVStoreError) as e:
        raise DaemonStartError(f"cannot open the index in {path} ({e}); move it away or run "
                               f"kvstore-daemon --destroy --data-dir {cfg.data_dir}") from None
    map_size = env.env.info()["map_size"]
    fd = os.open(os.path.join(path, "data.mdb"), os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, map_size)
    except OSError as e:
        env.close()
        raise DaemonStartError(f"data dir {cfg.data_dir} has no room for the {map_size}-byte index "
                               f"({e.strerror}); free space or lower index_map_size") from None
    finally:
        os.close(fd)
    return env, map_size


def shm_path(name, what):
    """Where the store's shared files other than the segment live (tmpfs, always: they
    are written through mappings on every get and put)."""
    return f"/dev/shm/{name}-{what}"


class Opened:
    """What start-up produced: env, segment, slots, table, identity, recovery figures."""

    def __init__(self):
        self.env = self.segment = self.slots = self.table = None
        self.segment_id = ""
        self.incarnation = 0
        self.salvaged = None          # what rebuilding a damaged index did (daemon/salvage.py)
        self.records = None           # (keys, records) of an adopted store, as published
        self.map_size = 0

    def close(self):
        for what in ("table", "slots", "segment"):
            obj = getattr(self, what)
            if obj is not None:
                obj.close()
        if self.env is not None:
            self.env.close()


def open_store(cfg, mode, nslots):
    """Adopt the store a previous daemon left in cfg.data_dir, or start a fresh one."""
    o = Opened()
    name = segment.segment_name(cfg.data_dir)
    try:
        # an index left on disk is checked (and rebuilt if damaged) in child processes
        # before this process opens it: LMDB can crash on a damaged page (daemon/salvage.py)
        o.salvaged = salvage.check_or_salvage(cfg, index_path(cfg), mode, name, shm_path)
        o.env, o.map_size = open_index(cfg, mode)
        desc = o.env.describe()
        seg = None
        if desc is not None:
            seg = segment.reopen(desc["segment_path"], desc["size"], desc["backing"] or None)
            why, cut = None, False
            if desc["schema"] != SCHEMA:
                why = f"index schema {desc['schema']} is not this daemon's {SCHEMA}"
            elif seg is None:
                why, cut = segment.reopen_problem(desc["segment_path"], desc["size"])
            elif seg.size < cfg.size or seg.size - cfg.size >= (2 << 20):
                why = f"size changed from {seg.size} to {cfg.size} bytes"
            if why and cut:          # another process cut the segment: its objects are lost
                log.error("%s; starting empty: %s objects recorded in the index are lost (keep "
                          "other processes away from the segment file)", why, _object_count(o.env))
            elif why:
                log.warning("%s; starting empty", why)
                table_mod.retire_file(desc["table_path"])
                if seg is not None:
                    seg.destroy()
                seg = None
        if seg is not None:
            o.segment = seg
            if _adopt(o, cfg, desc, name, mode, nslots):
                return o
        _fresh(o, cfg, name, mode, nslots, desc)
        return o
    except IndexFull:
        o.close()
        raise DaemonStartError(map_too_small(o.map_size or cfg.index_map_bytes(),
                                             "this store's index does not fit in it")) from None
    except BaseException:
        o.close()
        raise


def _object_count(env):
    try:
        return maintenance.stats(env)["objects"]
    except Exception:                    # an index too damaged to count: say so, go on
        return "an unknown number of"


def _new_table(o, name, entries, mode):
    path = shm_path(name, f"table-{o.incarnation}")
    t = table_mod.TableWriter(path, table_mod.capacity_for(entries), o.incarnation)
    t.set_mode(mode)
    return t


def _fresh(o, cfg, name, mode, nslots, old_desc):
    """Describe an empty store in brand-new index files. Never re-initialise the old
    files in place: clients of the old store that have not reconnected yet would then
    write into the new store with ids it may hand to someone else."""
    if o.segment is not None:
        o.segment.destroy()
        o.segment = None
    o.env.close()
    o.env = None
    old = index_path(cfg) + f".old-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(index_path(cfg), old)      # the new files must not reuse the old inodes
    except OSError:
        old = index_path(cfg)
    for stale in ("slots",):
        try:
            os.unlink(shm_path(name, stale))
        except OSError:
            pass
    o.env, o.map_size = open_index(cfg, mode)
    shutil.rmtree(old, ignore_errors=True)
    o.segment = segment.create(cfg, name, mode)
    o.segment_id = uuid.uuid4().hex
    o.incarnation = (old_desc or {}).get("incarnation", 0) + 1
    o.slots = SlotsFile(shm_path(name, "slots"), nslots, mode)
    o.table = _new_table(o, name, 0, mode)
    maintenance.init_fresh(o.env, o.segment.size, {
        "segment_id": o.segment_id, "segment_path": o.segment.path, "backing": o.segment.backing,
        "slots_path": o.slots.path, "table_path": o.table.path, "incarnation": o.incarnation})
    o.recovered = None


def _adopt(o, cfg, desc, name, mode, nslots):
    """Recover the store a previous daemon left. False: it cannot be trusted (the caller
    starts fresh)."""
    t0 = time.monotonic()
    o.incarnation = desc["incarnation"] + 1
    o.segment_id = desc["segment_id"]
    table_mod.retire_file(desc["table_path"])      # before anything can be freed
    o.slots = SlotsFile(desc["slots_path"] or shm_path(name, "slots"), nslots, mode)
    from kvstore.store.objects import Store
    live_slots = []                            # slots of the clients that stay registered
    held = lambda: o.slots.held(live_slots)    # noqa: E731
    quiet = Store(o.env, _NoTable(), held, o.incarnation)   # the table is built below
    if not o.slots.adopted:
        # The holds of clients still alive are lost with the old file: move them to a
        # "fresh" identity so none of them trusts a hold it no longer has.
        log.warning("the clients' slots file was missing or of another layout; clients "
                    "reconnect as new ones (their earlier views are no longer protected)")
        o.segment_id = uuid.uuid4().hex
        for cid in maintenance.clients(o.env):
            with quiet.batch() as b:
                maintenance.drop_client(quiet, b, cid)
    known = maintenance.clients(o.env)
    dead = maintenance.dead_clients(o.env)
    o.table = _new_table(o, name, 0, mode)
    live_slots += [info.get("slot", -1) for cid, info in known.items()
                   if cid not in dead and info.get("slot", -1) >= 0]
    store = Store(o.env, o.table, held, o.incarnation)
    for cid, info in known.items():
        slot = info.get("slot", -1)
        if not 0 <= slot < o.slots.nslots:
            continue
        data, tail = o.slots.drain(slot)      # puts queued before the crash: they count
        items, bad = protocol.read_seal_prefix(data) if data else ([], None)
        if bad is not None:                   # a corrupt ring: what follows the damage is lost
            log.warning("client %d left a corrupt seal ring (%s); %d puts queued before the "
                        "damage are applied (their checksums are verified below), the rest "
                        "are lost", cid, bad, len(items))
        if items:
            with quiet.batch() as b:
                for _, key, off, size, csum, flags, replicas in items:
                    quiet.seal(b, cid, key, off, size, csum, flags, replicas)
            o.slots.applied[slot] = max(int(o.slots.applied[slot]), max(i[0] for i in items))
        if data is not None:
            o.slots.consumed(slot, tail)
    for cid, info in dead.items():
        slot = info.get("slot", -1)
        with quiet.batch() as b:
            maintenance.drop_client(quiet, b, cid)
        if 0 <= slot < o.slots.nslots:
            o.slots.scrub(slot)
    with quiet.batch() as b:
        maintenance.reclaim(quiet, b)
    keys, recs = maintenance.load_records(o.env)
    problems = maintenance.check_extents(o.env, recs)
    if problems:
        log.error("index of segment %s is inconsistent (%s); starting empty", o.segment_id, problems[0])
        o.table.close(unlink=True)
        o.table = None
        o.slots.close()
        o.slots = None
        return False
    m = o.segment.map(writable=False)
    try:
        view = memoryview(m)
        bad = maintenance.corrupt_objects(view, keys, recs)
        view.release()
    finally:
        m.close()
    bad_names = [user_key(keys[i]) for i in bad[:5]]
    if bad:
        with store.batch() as b:
            for i in bad:
                store.drop_if_at(b, keys[i], int(recs["offset"][i]))
        keys, recs = maintenance.load_records(o.env)
    if o.table.capacity * table_mod.MAX_LOAD < len(keys):
        o.table.close(unlink=True)
        o.table = _new_table(o, name, len(keys), mode)
    if not maintenance.fill_table(o.table, keys, recs):
        o.table.close(unlink=True)
        o.table = _new_table(o, name, 2 * len(keys) + 1, mode)
        maintenance.fill_table(o.table, keys, recs)
    o.records = (keys, recs)
    maintenance.set_meta(o.env, incarnation=o.incarnation, table_path=o.table.path,
                         slots_path=o.slots.path, segment_id=o.segment_id, backing=o.segment.backing)
    st = maintenance.stats(o.env)
    creating = int(np.count_nonzero(recs["state"] == 1)) if len(recs) else 0
    o.recovered = (len(keys) - creating, st["used"], time.monotonic() - t0, creating, len(dead),
                   bad_names, len(bad))
    log.info("recovered %d objects (%d bytes) from %s in %.3f s, checksums verified; %d still "
             "being created by live clients; cleaned up after %d dead clients",
             len(keys) - creating, st["used"], o.segment.path, o.recovered[2], creating, len(dead))
    if bad:
        log.warning("dropped %d objects whose bytes no longer matched their checksum: %s",
                    len(bad), ", ".join(repr(k) for k in o.recovered[5]))
    return True


class _NoTable:
    """Stands in for the table while none exists yet (nothing is published then)."""
    live = 0

    def unpublish(self, key):
        return False

    def publish(self, key, rec):
        return True

    def find(self, key):
        return None


def destroy_store(cfg):
    """Remove a stopped store's segment, index and shared files. Refuses while a daemon
    uses the data dir. Finds the segment from the index when it is readable, else at
    the default names on /dev/shm and on the CONFIGURED hugetlbfs mount."""
    data_dir = cfg.data_dir
    if not os.path.isdir(data_dir):
        removed = remove_files(cfg, None)      # a segment may outlive its data dir
        return removed
    lock = os.path.join(data_dir, "daemon.lock")
    if os.path.exists(lock):
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DaemonStartError(f"a daemon is running on {data_dir}; stop it first") from None
        finally:
            os.close(fd)
    return remove_files(cfg, None)


def remove_files(cfg, desc):
    """Remove the segment, index and shared files of the store in cfg.data_dir.
    Returns the paths it removed (empty: there was no store). The index's description
    is read in a child process (a damaged index must not crash --destroy); an
    unreadable one leaves the default names."""
    name = segment.segment_name(cfg.data_dir)
    path = index_path(cfg)
    if desc is None:
        desc = index_check.read_meta(path)
    removed = []
    segs = [(desc["segment_path"], desc.get("backing") or None)] if desc and desc.get("segment_path") else []
    for p, backing in segs + segment.default_paths(cfg, name):
        if os.path.exists(p) and p not in removed:
            segment.remove(p, backing)
            removed.append(p)
    shared = [(desc or {}).get("table_path"), (desc or {}).get("slots_path"), shm_path(name, "slots")]
    try:
        shared += [os.path.join("/dev/shm", f) for f in os.listdir("/dev/shm")
                   if f.startswith(name + "-table-")]
    except OSError:
        pass
    for p in shared:
        if p and p not in removed:
            try:
                os.unlink(p)
                removed.append(p)
            except OSError:
                pass
    try:                                  # the index and what a rebuild or fresh start left
        left = [os.path.join(cfg.data_dir, f) for f in os.listdir(cfg.data_dir)
                if f == "index" or f.startswith(("index.old-", "index.rebuilt-", "index.damaged-"))]
    except OSError:
        left = []
    for p in left:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    try:
        os.unlink(os.path.join(cfg.data_dir, "daemon.lock"))
    except OSError:
        pass
    return removed


def warn_if_not_tmpfs(cfg):
    fstype = host.fs_type(cfg.data_dir)
    if fstype not in ("tmpfs", "ramfs"):
        log.warning("data dir %s is on %s: the index is write-mapped, so kernel writeback can add "
                    "millisecond stalls to the daemon's commits; it needs to outlive processes, not "
                    "reboots, so a tmpfs dir (e.g. /dev/shm/kvstore-data) serves better",
                    cfg.data_dir, fstype)
