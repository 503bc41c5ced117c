"""Review 3: the index check runs in a forked child that inherits the daemon's data-dir
lock. A daemon SIGKILLed during a long check left that child running, holding the lock,
so a restart was refused until the check ended. The child now dies with its parent."""

import os
import signal
import time

from conftest import run_py, wait_line

PARENT = """
    import os, sys, time
    from kvstore.store.index_check import in_child

    def slow(send):
        send(os.getpid())
        print("child", os.getpid(), flush=True)
        time.sleep(60)
    print("parent", flush=True)
    in_child(slow, timeout=120)
"""


def test_the_check_child_dies_with_its_daemon():
    p = run_py(PARENT, background=True)
    try:
        wait_line(p, "parent")
        line = wait_line(p, "child")
        child = int(line.split()[1])
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            try:                                  # reaped by init, or a zombie of ours?
                with open(f"/proc/{child}/stat") as f:
                    if f.read().split(")")[1].split()[0] == "Z":
                        break
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the check's child outlived its killed parent")
    finally:
        if p.poll() is None:
            p.kill()
