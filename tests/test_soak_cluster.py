"""The cluster soak (scripts/soak.py --cluster) for half a minute: three hosts in network
namespaces with a real etcd; daemons and clients SIGKILLed, links cut and etcd
restarted while writers on one host and readers on the others run; nothing lost,
corrupted or leaked."""

import os
import subprocess
import sys

import pytest

from clusterlib import unavailable_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cluster_soak_half_a_minute():
    why = unavailable_reason()
    if why:
        pytest.skip(why)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "soak.py"), "--cluster",
                        "--seconds", "30"], capture_output=True, text=True, timeout=400, cwd=ROOT)
    report = r.stdout
    assert r.returncode == 0, report + r.stderr[-3000:]
    assert "objects lost           0" in report and "objects corrupted      0" in report, report
    assert "bytes leaked           0" in report, report
    read_back = int(report.split("logged keys")[0].split(",")[-1].split()[0])
    assert read_back > 100, report
