"""The fault-injection soak (scripts/soak.py) for about a minute: daemon and clients
SIGKILLed at random while writers and readers run; nothing lost, corrupted or leaked."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_soak_one_minute_with_daemon_and_client_kills():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "soak.py"), "--seconds", "60",
                        "--size", "256MiB"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    report = r.stdout
    assert r.returncode == 0, report + r.stderr[-3000:]
    assert "objects lost           0" in report and "objects corrupted      0" in report
    assert "bytes leaked           0" in report
    restarts = int(report.split("daemon restarts")[1].split()[0])
    verified = int(report.split("objects verified")[1].split()[0])
    assert restarts >= 1 and verified > 1000, report
