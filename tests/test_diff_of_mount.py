"""``unionfs diff MNT`` finds the upper of a mount whose command line had relative paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import unionfs


def test_diff_of_a_mount_started_with_relative_paths(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for d in ("l/d", "u", "m"):
        (tmp / d).mkdir(parents=True)
    (tmp / "l/a").write_text("a\n")
    (tmp / "l/d/x").write_text("x\n")
    monkeypatch.chdir(tmp)
    with unionfs.mounted(["l"], "u", "m"):
        with open(tmp / "m/a", "a") as f:
            f.write("more\n")
        os.unlink(tmp / "m/d/x")
        (tmp / "m/new").write_text("n\n")
        # From elsewhere: the daemon's command line says only "l u m".
        r = subprocess.run(
            [sys.executable, "-m", "unionfs.command", "diff", str(tmp / "m")],
            capture_output=True,
            text=True,
            cwd="/",
        )
    assert r.returncode == 0, r.stderr
    lines = sorted(line.split(" (")[0] for line in r.stdout.splitlines())
    assert lines == ["A /new", "C /a", "C /d", "D /d/x"]
