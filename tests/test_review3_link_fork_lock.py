"""Review 3: a StoreLink used in a child forked while another thread of the parent was
inside the link (connecting, under its lock) must not hang the child forever.

StoreLink connects under an RLock; a first connect to a socket path that exists but
refuses (a daemon restarting) waits up to reconnect_timeout under that lock. A fork at
that moment copied the lock held, by a thread that does not exist in the child: the
child's first call into the link blocked for ever, although the link's promise is that
an engine call never waits on a daemon that is away. The child runs in a real forked
process; the test kills it if it hangs."""

import multiprocessing
import os
import socket
import threading
import time

from kvstore.client.adapters._link import StoreLink
from kvstore.errors import StoreUnavailable

ctx = multiprocessing.get_context("fork")


def _child(link, q):
    t0 = time.monotonic()
    try:
        link.client()
        q.put(("connected", time.monotonic() - t0))
    except StoreUnavailable:
        q.put(("unavailable", time.monotonic() - t0))
    link.close()


def test_fork_while_a_thread_connects_under_the_lock(tmp_path):
    path = str(tmp_path / "kv.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)                       # exists, refuses: a daemon restarting
    try:
        link = StoreLink(path, reconnect_timeout=3.0)
        t = threading.Thread(target=lambda: _swallow(link.client))
        t.start()
        time.sleep(0.5)                    # the thread is waiting inside, holding the lock
        assert link._lock._is_owned() is False    # (held by the other thread, not us)
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(link, q))
        p.start()
        p.join(10)
        hung = p.is_alive()
        if hung:
            p.kill()
            p.join()
        t.join()
        assert not hung, "the forked child hung on the link's lock"
        what, took = q.get(timeout=1)
        assert what == "unavailable" and took < 5, (what, took)
        link.close()
    finally:
        stale.close()
        os.unlink(path)


def _swallow(fn):
    try:
        fn()
    except StoreUnavailable:
        pass
