"""Who may use a store: the mode and group of its files, set explicitly.

Owns: ``Access`` (a file mode that also carries the group the store's shared files go
to), ``apply`` (fchown to the group, then fchmod: never through the umask, so a umask
of 027 cannot take the group's bits away), ``group_id`` (a group name or number to a
gid), ``can_give_to`` (whether this process may chown to a gid), ``make_dirs`` (the
daemon's own directories, created 0700 component by component) and
``searchable_by`` (whether a group may reach a path, for the socket's directory).

What clients need: only the socket. The daemon hands every client the fds of the
segment, the published table and the slots file over the socket (SCM_RIGHTS); a
client never opens them, or the data dir, or the LMDB index, by name. The shared files
still get the group and its bits (a tool that inspects them by name works for the
group too), the index stays the daemon's alone (0600, in a 0700 directory).
Must never: widen a mode through the umask, or leave a file of the store with the
group it happened to be created with when a group is configured.
"""

import grp
import os
import stat


class Access(int):
    """A file mode (an int: it goes wherever a mode does) plus ``gid``, the group the
    store's shared files are given (None: the daemon's own group, unchanged)."""

    def __new__(cls, mode, gid=None):
        self = super().__new__(cls, mode)
        self.gid = gid
        return self

    def __repr__(self):
        return f"Access(0o{int(self):o}, gid={self.gid})"


def apply(fd, mode):
    """Give the open file ``fd`` its group (when ``mode`` is an Access with one) and then
    its mode. Chown first: changing the group may clear set-id bits, never these."""
    gid = getattr(mode, "gid", None)
    if gid is not None:
        os.fchown(fd, -1, gid)
    os.fchmod(fd, int(mode))


def apply_path(path, mode):
    """``apply`` for a path (the socket, which has no fd of its own to chmod)."""
    gid = getattr(mode, "gid", None)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, int(mode))


def group_id(name):
    """The gid of a group given by name or number; KeyError if no such group name."""
    s = str(name).strip()
    if s.isdigit():
        return int(s)
    return grp.getgrnam(s).gr_gid


def group_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def can_give_to(gid):
    """Whether this process may chown its files to gid: root, or a member of it."""
    return os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups()


def make_dirs(path, mode=0o700):
    """Create path and any missing parents, each with ``mode`` set explicitly (not
    through the umask). Existing directories are left as they are (a data dir may be a
    directory the operator made on purpose). Returns the directories created."""
    made = []
    path = os.path.abspath(path)
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            continue
        os.chmod(d, mode)
        made.append(d)
    return made


def searchable_by(path, gid):
    """The first directory above path that members of gid (who are not its owner)
    cannot pass through, or None when they can reach path."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            st = os.stat(d)
        except OSError:
            return d
        if not st.st_mode & stat.S_IXOTH and not (st.st_gid == gid and st.st_mode & stat.S_IXGRP):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
