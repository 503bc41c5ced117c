"""Host checks of a cluster daemon's network settings, run before it starts serving.

Owns: whether an address belongs to a local interface (``check_advertise``), binding
the peer port with a refusal that names the process already holding it
(``bind_peer_port``, reading /proc/net/tcp{,6} and /proc/*/fd), so that "wrong address
in a config file" and "two services on one port" are found at start, in one line each,
never at run time.
Must never: guess: a holder it cannot see (another user's process) is said to be
unseen, not named wrongly.
"""

import errno
import os
import socket

from kvstore.errors import DaemonStartError


def _family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def check_advertise(addr):
    """Refuse an advertised address no local interface has (binding to it fails with
    EADDRNOTAVAIL), or one that is the wildcard (others cannot dial 0.0.0.0)."""
    if addr in ("0.0.0.0", "::", ""):
        raise DaemonStartError(f"advertise: {addr or '(empty)'} is not an address other daemons can "
                               f"dial; give this host's own IP on the cluster network")
    try:
        infos = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DaemonStartError(f"advertise: {addr} does not resolve ({e.strerror}); give this "
                               f"host's IP on the cluster network") from None
    fam, _, _, _, sa = infos[0]
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.bind((sa[0], 0))
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise DaemonStartError(f"advertise: {addr} is not an address of any interface of this "
                                   f"host; give one of this host's own IPs (ip -brief addr)") from None
        raise DaemonStartError(f"advertise: cannot use {addr} ({e.strerror})") from None
    finally:
        s.close()
    return sa[0]


def bind_peer_port(addr, port, backlog=128):
    """A listening TCP socket on addr:port (port 0: a free one). Refuses a port another
    process holds, naming it when /proc lets us see it."""
    s = socket.socket(_family(addr), socket.SOCK_STREAM)
    # connections of a killed run linger in TIME_WAIT; a live listener still refuses us
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, port))
        s.listen(backlog)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise DaemonStartError(f"peer_port: {addr}:{port} is already in use by "
                                   f"{port_holder(port)}; stop it or choose another --peer-port") from None
        if e.errno == errno.EACCES:
            raise DaemonStartError(f"peer_port: {port} is a privileged port this user may not bind; "
                                   f"use one above 1023") from None
        raise DaemonStartError(f"peer_port: cannot listen on {addr}:{port} ({e.strerror})") from None
    return s


def _listening_inodes(port):
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10:
                        continue
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:   # LISTEN
                        found.add(inode)
        except OSError:
            pass
    return found


def port_holder(port):
    """'process NAME (pid N)' holding a listening socket on port, as far as /proc shows."""
    inodes = _listening_inodes(port)
    if not inodes:
        return "another socket (not a listener this host's /proc shows)"
    wanted = {f"socket:[{i}]" for i in inodes}
    unseen = False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            unseen = True
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") in wanted:
                    return f"process {_name(pid)} (pid {pid})"
            except OSError:
                continue
    return "a process this user cannot see (another user's; try as root: ss -ltnp)" if unseen \
        else "a process that is gone or hidden from this user (ss -ltnp)"


def _name(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
        words = [w.decode(errors="replace") for w in cmd if w]
        if words:
            return " ".join(" ".join(words).split())[:120]     # one line, however it was started
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
