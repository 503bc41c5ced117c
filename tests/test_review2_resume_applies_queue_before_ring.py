"""Review round 3 (after 5baac4f): Daemon._resumable applies the superseded connection's
queued requests at once, from inside _hello, BEFORE this turn's seal rings are drained.
The design's order ("its ring is read after its socket and applied before": a client
writes the seals of an arena into its ring before it sends the RETURN of that arena)
is broken: a RETURN queued on the old connection frees the arena from a frontier that
the seals still in the ring have not moved yet, and those seals are then refused as
INVALID. The put returned True and is silently lost.

Interleaving (daemon stalled, e.g. stopped or in a long turn, longer than the client's
timeout): the client writes a seal into its ring and sends RETURN(arena) on its old
connection; its next request times out; its watchdog connects again and says HELLO
with resume. The daemon wakes: the old connection's RETURN is read into its queue, the
new connection's HELLO supersedes it and _apply([RETURN]) runs, then the ring.
"""

import mmap
import os
import signal
import socket
import time

from kvstore import protocol
from kvstore.checksum import checksum
from kvstore.slots import ClientSlot


def _connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def test_a_return_queued_on_a_superseded_connection_does_not_beat_the_ring(daemon):
    watcher = daemon.client()
    k = watcher._key("lost-put")
    s1 = _connect(daemon.socket)
    s1.sendall(protocol.hello(os.getpid(), "", None))
    mtype, body, fds = protocol.recv_message(s1, with_fds=3)
    assert mtype == protocol.WELCOME
    seg_fd, table_fd, slots_fd = fds
    slot = ClientSlot(slots_fd, body["slots"], body["slot"])
    seg = mmap.mmap(seg_fd, body["segment_size"], flags=mmap.MAP_SHARED)
    got = protocol.request(s1, protocol.grant(1 << 20, 4096), protocol.GRANTED)
    off, size = protocol.read_granted(got)
    value = b"x" * 4096
    seg[off:off + len(value)] = value
    s2 = _connect(daemon.socket)               # accepted now; its HELLO comes later
    time.sleep(0.2)
    pid = daemon.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.005)
        # the seal is in the ring; its count is published below, after the daemon's first
        # turn on waking (a stopped daemon's first turn finds no events and would drain a
        # counted ring at once; a daemon busy in a long turn goes straight to the events)
        slot.ring_write(protocol.seal_item(1, k, off, len(value), checksum(value)))
        s1.sendall(protocol.give_back(off))    # after the seal, as the Writer does
        time.sleep(0.05)
        s2.sendall(protocol.hello(os.getpid(), "", {"cid": body["cid"], "segment_id": body["segment_id"]}))
        time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGCONT)
    mtype, body2, fds2 = protocol.recv_message(s2, with_fds=3)
    for fd in fds2:
        os.close(fd)
    assert mtype == protocol.WELCOME and body2["cid"] == body["cid"]
    slot.note_sent(1)
    deadline = time.monotonic() + 3
    while int(slot.applied[body["slot"]]) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert watcher.contains("lost-put"), (
            "a put whose seal was in the ring before its RETURN was lost: the superseded "
            "connection's RETURN was applied before the ring")
    finally:
        watcher.close()
        s1.close()
        s2.close()
        for fd in fds:
            os.close(fd)
