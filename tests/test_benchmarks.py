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


def test_in_flight_counts_the_io_in_progress_of_every_device(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE / "benchmarks"))
    import run

    stats = (
        " 253       0 vda 6172 10 62944 390 3000 5 24000 100 0 500 600 0 0 0 0 0 0\n"
        " 253       1 vda1 10 0 80 1 0 0 0 0 0 1 1 0 0 0 0 0 0\n"
        "   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0\n"
    )
    assert run.in_flight(stats) == 0
    busy = stats.replace("100 0 500 600", "100 3 500 600").replace("0 0 0 1 1", "0 0 1 1 1")
    assert run.in_flight(busy) == 4
    assert run.in_flight("") == 0 and run.in_flight("garbage\n") == 0


def test_no_target_always_follows_the_same_one(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE / "benchmarks"))
    import run

    names = ["native", "kernel", "fuse-overlayfs", "unionfs-fuse", "unionfs", "unionfs-base"]
    orders = [run.round_order(names, r) for r in range(3)]
    assert all(sorted(o) == sorted(names) for o in orders)
    before = {t: {o[o.index(t) - 1] for o in orders if o.index(t)} for t in names}
    assert all(len(p) >= 2 for t, p in before.items() if t != names[0]), before
