"""Review 3: a daemon killed while it swaps a rebuilt index in must not make the next
start come up silently empty, nor leave rebuilt copies behind.

The rebuild writes the new index next to the damaged one (index.rebuilt-*), renames the
damaged one away (index.damaged-*), renames the new one in, and removes the old. A
SIGKILL between the two renames left no ``index`` at all: the next start created a
fresh one, removed the segment with every object, and said nothing at ERROR (the
complete rebuilt index sat unused next to it). A kill during the writing left an
index.rebuilt-* directory with the whole index map reserved on disk, at every such
crash. Each kill is a real SIGKILL of a child process running the daemon's start-up."""

import os
import signal

from conftest import run_py
from test_damaged_index import MAP, SHM, SIZE, _overwrite_page, _values

CHILD = """
import os, signal, sys
sys.path.insert(0, "tests")
from kvstore.config import load_config
from daemon import startup, salvage
from kvstore.store import index_check
where = sys.argv[3]
if where == "swap":              # killed between the two renames of the swap
    real = os.rename
    def rename(a, b):
        real(a, b)
        if ".damaged-" in b:
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
else:                            # killed while writing the rebuilt index
    real_write = salvage.write_index
    def write_index(path, *a):
        real_write(path, *a)
        os.kill(os.getpid(), signal.SIGKILL)
    salvage.write_index = write_index
cfg = load_config(env={}, overrides={"socket": sys.argv[1], "size": "%s", "data_dir": sys.argv[2],
                                     "hugepages": "off", "index_map_size": "%s"})
fd = startup.check_data_dir(cfg)
startup.open_store(cfg, 0o600, 8)
print("not killed")
""" % (SIZE, MAP)


def _damaged_store(make_daemon):
    d = make_daemon(size=SIZE, extra=SHM + ("--index-map-size", MAP))
    vals = _values()
    with d.client() as c:
        for k, v in vals.items():
            assert c.put(k, v)
    assert d.stop() == 0
    _overwrite_page(os.path.join(d.data_dir, "index"), 0, seed=5)   # a meta page: rebuilt
    return d, vals


def _serves(d, vals):
    d.start()
    with d.client() as c:
        n = sum(1 for k, v in vals.items() if c.read(k) is not None and bytes(c.read(k)) == v)
        assert c.verify() == []
    return n


def test_killed_between_the_renames_of_the_swap(make_daemon):
    d, vals = _damaged_store(make_daemon)
    r = run_py(CHILD, d.socket, d.data_dir, "swap", check=False)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr)
    served = _serves(d, vals)
    log = d.read_log()
    assert served > 0 or " ERROR " in log.split("ready: serving")[-2], \
        "the next start came up empty without an ERROR line"
    assert served == len(vals), f"{served} of {len(vals)} objects after the interrupted swap"
    assert not [f for f in os.listdir(d.data_dir) if f.startswith("index.")], os.listdir(d.data_dir)


def test_killed_while_writing_the_rebuilt_index(make_daemon):
    d, vals = _damaged_store(make_daemon)
    r = run_py(CHILD, d.socket, d.data_dir, "write", check=False)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr)
    assert _serves(d, vals) == len(vals)
    left = [f for f in os.listdir(d.data_dir) if f.startswith("index.")]
    assert not left, f"left behind by the killed rebuild: {left}"
