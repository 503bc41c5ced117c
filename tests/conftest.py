"""Shared fixtures: real daemon processes on real shared memory and a real LMDB index.

``daemon`` starts ``python -m kvstore.daemon`` in a fresh directory and stops it
(SIGTERM) afterwards; its segment is discarded on exit so tests leak no memory.
``run_py`` runs a snippet in a separate Python process (a real second client).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DaemonProc:
    def __init__(self, tmp_path, size="64MiB", extra=(), name="d"):
        self.dir = tmp_path / name
        self.dir.mkdir(exist_ok=True)
        self.socket = str(self.dir / "kv.sock")
        self.data_dir = str(self.dir / "data")
        self.log_path = str(self.dir / "daemon.log")
        self.size = size
        self.extra = list(extra)
        self.proc = None

    def args(self):
        return [sys.executable, "-m", "kvstore.daemon", "--socket", self.socket, "--size", self.size,
                "--data-dir", self.data_dir, "--log-level", "DEBUG", *self.extra]

    def start(self, wait=True):
        self.log = open(self.log_path, "ab")
        readies = self.read_log().count("ready: serving") if os.path.exists(self.log_path) else 0
        self.proc = subprocess.Popen(self.args(), stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        if wait:
            deadline = time.monotonic() + 30
            while self.read_log().count("ready: serving") <= readies:   # this start's line
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.read_log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"daemon not ready:\n{self.read_log()}")
                time.sleep(0.02)
        return self

    def read_log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode if self.proc else None
        self.proc = None
        return rc

    def destroy(self):
        self.stop()
        subprocess.run([sys.executable, "-m", "kvstore.daemon", "--data-dir", self.data_dir, "--destroy"],
                       capture_output=True, cwd=ROOT)

    def client(self, **kw):
        from kvstore.client import Client
        return Client(self.socket, **kw)


@pytest.fixture
def make_daemon(tmp_path):
    made = []

    def make(size="64MiB", extra=(), name=None, start=True):
        d = DaemonProc(tmp_path, size, extra, name or f"d{len(made)}")
        made.append(d)
        return d.start() if start else d
    yield make
    for d in made:
        d.destroy()


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()


def run_py(code, *args, timeout=60, check=True, background=False):
    """Run code in a new Python process; sys.argv[1:] = args. Returns CompletedProcess
    (or the Popen when background=True)."""
    cmd = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def wait_line(proc, text, timeout=30):
    """Read a background child's stdout until a line containing text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode}: {proc.stderr.read()}")
    raise AssertionError(f"no line with {text!r}")


def corrupt_object(client, key, at, byte=b"!"):
    """Overwrite one byte of a sealed object in the segment file, out of band (bit rot,
    a stray write), the way the checksum tests inject corruption."""
    import mmap
    import numpy as np
    v = client.get(key)
    off = np.frombuffer(v, dtype=np.uint8).ctypes.data - client._ro_range[0]
    client.release(key)
    fd = os.open(client.stats()["segment_path"], os.O_RDWR)
    try:
        m = mmap.mmap(fd, off + at + 1)
        m[off + at:off + at + 1] = byte
        m.close()
    finally:
        os.close(fd)


def raw_hello(path):
    """A bare socket to the daemon at path, past the handshake (no Client around it), for
    tests that send frames by hand. Returns (socket, WELCOME body)."""
    import socket
    from kvstore import protocol
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(protocol.hello(os.getpid(), "", None))
    mtype, body, fds = protocol.recv_message(s, with_fds=3)
    for fd in fds:
        os.close(fd)
    assert mtype == protocol.WELCOME
    return s, body
