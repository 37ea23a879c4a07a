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
    # the shapes of issue 16 ran too, on every target (a failure makes the exit status 1)
    for row in ("mount (cold)", "walk (warm)", "read-4procs (cold)", "git-status-5k (cold)"):
        assert f"| {row} |" in r.stdout, row
    (result,) = (tmp_path / "out").iterdir()
    assert (result / "results.json").stat().st_size > 0
    # every scratch tree set aside during the run is gone at its end
    assert list((tmp_path / "w" / "scratch").iterdir()) == []


def test_scratch_trees_wait_for_the_end_of_the_run_but_big_files_do_not(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE / "benchmarks"))
    from bench import targets

    monkeypatch.setattr(targets, "_MIN_FREE_BYTES", 0)  # however full this disk is
    monkeypatch.setattr(targets, "_MIN_FREE_INODES", 0)
    scratch = tmp_path / "fuse-overlayfs-1"
    (scratch / "upper" / "d").mkdir(parents=True)
    (scratch / "upper" / "d" / "small").write_bytes(b"x" * 100)
    with open(scratch / "upper" / "big", "wb") as f:
        f.truncate(targets._BIG_FILE)
    targets.set_aside(scratch)
    assert (scratch / "upper" / "d" / "small").exists()
    assert not (scratch / "upper" / "big").exists()
    targets.discard_set_aside()
    assert not scratch.exists()
