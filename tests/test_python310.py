"""Python 3.10: setup.py promises it, so the daemon's configuration path must run there.

kvstore.config reads TOML with tomllib (3.11+) or, on 3.10, tomli (setup.py installs it
there). This suite usually runs on 3.11+, where the tomli branch never runs; so this
test finds a Python 3.10 interpreter that has tomli, and has it load a TOML config
and run the daemon's command line on the checkout (PYTHONPATH: no install needed).
It skips, saying why, when there is no such interpreter.
"""

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python310():
    """A Python 3.10 that can import tomli, or None."""
    candidates = [shutil.which("python3.10")] + sorted(glob.glob("/root/.pyenv/versions/3.10*/bin/python3.10")) \
        + sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))
    for py in filter(None, candidates):
        try:          # a pyenv shim may exist and still refuse to run: try it
            r = subprocess.run([py, "-c", "import sys, tomli; assert sys.version_info[:2] == (3, 10)"],
                               capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return py
    return None


@pytest.fixture(scope="module")
def py310():
    if sys.version_info < (3, 11):
        pytest.skip("this interpreter is 3.10 itself: every config test here already takes the tomli path")
    py = _python310()
    if py is None:
        pytest.skip("no Python 3.10 with tomli found (looked for python3.10 in PATH and in "
                    "~/.pyenv/versions/3.10*); install one and `python3.10 -m pip install tomli` to run this")
    return py


def _run(py, args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["PYTHONPATH"] = ROOT            # the checkout, not an installed copy
    return subprocess.run([py, *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


def test_config_loads_toml_on_python310(py310, tmp_path):
    toml = tmp_path / "kvstore.toml"
    toml.write_text('[kvstore]\nsize = "64MB"\nhugepages = "off"\nmax_clients = 7\n')
    r = _run(py310, ["-c", "import sys, kvstore, kvstore.config as c; cfg = c.load_config(sys.argv[1], env={}); "
                           "print(kvstore.__file__, c.tomllib.__name__, cfg.size, cfg.hugepages, cfg.max_clients)",
                     str(toml)], tmp_path)
    assert r.returncode == 0, r.stderr
    where, parser, size, hugepages, clients = r.stdout.split()
    assert where == os.path.join(ROOT, "kvstore", "__init__.py")
    assert (parser, int(size), hugepages, clients) == ("tomli", 64 << 20, "off", "7")


def test_daemon_command_line_reads_toml_on_python310(py310, tmp_path):
    r = _run(py310, ["-m", "kvstore.daemon", "--help"], tmp_path)
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr
    bad_value = tmp_path / "bad.toml"
    bad_value.write_text('size = "lots"\n')
    r = _run(py310, ["-m", "kvstore.daemon", "--config", str(bad_value)], tmp_path)
    assert r.returncode == 2 and "bad configuration: size:" in r.stderr, r.stderr
    bad_toml = tmp_path / "broken.toml"
    bad_toml.write_text('size = "64MiB\n')
    r = _run(py310, ["-m", "kvstore.daemon", "--config", str(bad_toml)], tmp_path)
    assert r.returncode == 2 and "not valid TOML" in r.stderr, r.stderr
