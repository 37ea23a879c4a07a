"""The benchmark suite runs end to end (quick mode; no timing is checked)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.geteuid() != 0, reason="drops caches and mounts the kernel target")
def test_quick_benchmark_runs(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(HERE / "benchmarks" / "run.py"),
            "--quick",
            "--targets",
            "native,kernel,unionfs",
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| stat-walk (cold) |" in r.stdout and "unionfs" in r.stdout
    (result,) = (tmp_path / "out").iterdir()
    assert (result / "results.json").stat().st_size > 0
