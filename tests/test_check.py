"""unionfs-check finds and repairs leftovers and malformed markers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from unionfs import check

from support import snapshot, unionfs_mount

EXE = shutil.which("unionfs-check")
CMD = [EXE] if EXE else [sys.executable, "-m", "unionfs.check"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=60)


def test_clean_upper_written_by_unionfs(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "a").write_text("a")
    os.link(lower / "a", lower / "b")
    (lower / "d").mkdir()
    (lower / "d" / "x").write_text("x")
    with unionfs_mount([lower], upper, mnt):
        (mnt / "a").write_text("changed")
        shutil.rmtree(mnt / "d")
        (mnt / "d").mkdir()
        (mnt / "new").write_text("new")
    r = run(str(upper))
    assert r.returncode == check.OK, r.stdout + r.stderr
    assert "clean" in r.stdout


def test_finds_and_repairs(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "keep").write_text("keep")
    work = tmp_path / ".upper.unionfs-work"
    (work / "work").mkdir(parents=True)
    (work / "work" / "#123.0").write_text("half a copy")
    (work / "work" / "#123.1").mkdir()
    (work / "index").mkdir()
    (work / "index" / "4242").write_text("orphan")
    (upper / ".wh.keep").write_text("not empty")
    (upper / "keep").write_text("upper keep")
    (upper / ".wh.").write_text("")
    (upper / "dir").mkdir()
    os.setxattr(upper / "dir", "trusted.overlay.opaque", b"maybe")
    (upper / "f").write_text("f")
    os.setxattr(upper / "f", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "f", "trusted.overlay.unionfs.origin", b"12x")

    r = run(str(upper))
    assert r.returncode == check.LEFT
    out = r.stdout
    for fragment in (
        "#123.0",
        "#123.1",
        "4242",
        ".wh.keep",
        "/.wh.:",
        "has value b'maybe'",
        "on a non-directory",
        "not a number",
    ):
        assert fragment in out, out
    assert (work / "work" / "#123.0").exists(), "nothing removed without --repair"

    r = run(str(upper), "--repair")
    assert r.returncode == check.REPAIRED, r.stdout + r.stderr
    assert os.listdir(work / "work") == [] and os.listdir(work / "index") == []
    assert not (upper / ".wh.keep").exists() and (upper / "keep").read_text() == "upper keep"
    assert os.listxattr(upper / "dir") == []
    assert run(str(upper)).returncode == check.OK

    with unionfs_mount([lower], upper, mnt):
        view = snapshot(mnt)
    assert set(view) == {"keep", "dir", "f"}


def test_usage_errors(tmp_path):
    r = run(str(tmp_path / "missing"))
    assert r.returncode == check.FAILED and "not a directory" in r.stderr
