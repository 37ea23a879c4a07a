"""``apply`` against two limits of the real world: the open-descriptor limit of a
big tree and a symlink put at a name it changes.

apply reaches TARGET only through directory descriptors and keeps one per
directory it touches until the end; with the default soft limit of 1024 a
change spread over more directories failed with EMFILE.  And chmod has no
no-follow form on Linux: the mode must go to the object at the name, never to
what a symlink swapped in there points to.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unionfs.changes import apply as apply_mod

DIRS = 300


def test_a_change_over_more_directories_than_the_soft_fd_limit(tmp_path: Path) -> None:
    base, upper, target = tmp_path / "base", tmp_path / "upper", tmp_path / "target"
    for i in range(DIRS):
        (base / f"d{i}").mkdir(parents=True)
        (base / f"d{i}" / "f").write_text("old\n")
        (upper / f"d{i}").mkdir(parents=True)
        shutil.copystat(base / f"d{i}", upper / f"d{i}")
        (upper / f"d{i}" / "f").write_text(f"new {i}\n")
    shutil.copytree(base, target, symlinks=True)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * DIRS:
        pytest.skip(f"hard descriptor limit {hard} is too low to raise past {DIRS} directories")
    # A soft limit below the directory count, as a user's default of 1024 is below a home's.
    script = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({DIRS // 2}, {hard}))\n"
        "from unionfs.changes.apply import apply\n"
        f"apply({str(upper)!r}, [{str(base)!r}], {str(target)!r}, durable=False)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    for i in range(DIRS):
        assert (target / f"d{i}" / "f").read_text() == f"new {i}\n"


def test_chmod_never_follows_a_symlink_at_the_name(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("not yours to chmod\n")
    os.chmod(outside, 0o600)
    inside = tmp_path / "inside"
    inside.mkdir()
    os.symlink(outside, inside / "x")
    (inside / "plain").write_text("")
    os.chmod(inside / "plain", 0o600)
    fd = os.open(inside, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(apply_mod.ApplyError, match="symlink"):
            apply_mod._chmod_nofollow(fd, b"x", 0o777)
        apply_mod._chmod_nofollow(fd, b"plain", 0o751)
    finally:
        os.close(fd)
    assert outside.stat().st_mode & 0o7777 == 0o600
    assert (inside / "plain").stat().st_mode & 0o7777 == 0o751
