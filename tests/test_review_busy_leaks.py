"""Review: kvstore.table.Busy (not a KVStoreError) escapes get/contains/put.

Reader.lookup catches Busy once, calls _refresh (the table is not retired: it only
sleeps 1 ms) and looks again WITHOUT a handler, so a bucket that stays odd for more
than ~2000 spins + 1 ms (the daemon descheduled between the two sequence stores of
TableWriter._write on a loaded host, stopped, or SIGKILLed there before the client's
watchdog notices) surfaces as a bare Busy from get(), read(), contains(), size_of() and
put() (put looks the key up through Reader.lookup too). Here the daemon is stopped
with one bucket mid-update and finishes the write 0.3 s later.
"""

import mmap
import os
import signal
import threading

from kvstore.table import HEADER_SIZE


def _table_path():
    with open("/proc/self/maps") as f:
        for line in f:
            if "-table-" in line:
                return line.split()[5]


def test_a_bucket_mid_update_for_a_while_is_waited_for(daemon):
    c = daemon.client()
    try:
        c.put("k", b"v" * 100)
        with daemon.client() as other:               # waits for the seal in flight
            assert other.contains("k")
        e = c._conn.att.table.lookup(c._key("k"))
        fd = os.open(_table_path(), os.O_RDWR)
        m = mmap.mmap(fd, HEADER_SIZE + (e.bucket + 1) * 64)
        at = HEADER_SIZE + e.bucket * 64
        seq = int.from_bytes(m[at:at + 4], "little")
        daemon.proc.send_signal(signal.SIGSTOP)
        m[at:at + 4] = (seq + 1).to_bytes(4, "little")       # the daemon is mid-write ...

        def finish():
            m[at:at + 4] = (seq + 2).to_bytes(4, "little")   # ... and completes it
            daemon.proc.send_signal(signal.SIGCONT)
        t = threading.Timer(0.3, finish)
        t.start()
        try:
            got = c.get("k")
            assert got is not None and bytes(got) == b"v" * 100
            c.release("k")
        finally:
            t.join()
            m.close()
            os.close(fd)
    finally:
        c.close()
