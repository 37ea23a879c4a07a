"""Cold directories read ahead of a walking client (unionfs/_prefetch.c).

The read-ahead only fills the kernel's caches, so what a client sees must not
change with it; these pin what it reads (bounded, never through a symbolic
link, never a directory the daemon may not read) and when the daemon asks for
it (a slow lstat; ``-o dir_readahead_us=0`` makes every directory's first one
count, so the tests need no cold disk).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from unionfs import stats

from support import is_mounted, snapshot, unionfs_command, unionfs_mount

try:
    from unionfs import _dircache  # type: ignore[attr-defined]
except ImportError:
    _dircache = None

needs_helper = pytest.mark.skipif(
    _dircache is None or not hasattr(_dircache, "read_ahead"), reason="C helper not built"
)


def _settled(before: dict[str, int], dirs: int, timeout: float = 10) -> dict[str, int]:
    """The workers' counts once ``dirs`` more directories are done (all queued ones)."""
    deadline = time.monotonic() + timeout
    while True:
        now = _dircache.read_ahead_counts()
        if (now["dirs"] - before["dirs"] >= dirs and not now["queued"]) or (
            time.monotonic() > deadline
        ):
            return {k: now[k] - before[k] for k in ("dirs", "entries", "dropped")}
        time.sleep(0.01)


def _tree(root: Path) -> None:
    """10 files, 2 subdirectories of 3 files, a symlink to a big directory."""
    root.mkdir()
    for i in range(10):
        (root / f"f{i}").write_text("x")
    for d in ("a", "b"):
        (root / d).mkdir()
        for i in range(3):
            (root / d / f"g{i}").write_text("y")
    (root / "link").symlink_to("/usr/lib")


@needs_helper
def test_a_directory_and_its_subdirectories_are_read_not_through_links(tmp_path):
    _tree(tmp_path / "t")
    before = _dircache.read_ahead_counts()
    fd = os.open(tmp_path / "t", os.O_PATH | os.O_DIRECTORY)
    try:
        assert _dircache.read_ahead(fd) is True
    finally:
        os.close(fd)  # the worker has its own descriptor
    done = _settled(before, 1)
    # 13 entries, then the 3 of each subdirectory; /usr/lib's are never read.
    assert done == {"dirs": 1, "entries": 13 + 6, "dropped": 0}


@needs_helper
def test_read_ahead_stays_on_its_file_system(tmp_path):
    from support import tmpfs

    _tree(tmp_path / "t")
    (tmp_path / "t" / "mnt").mkdir()
    with tmpfs(tmp_path / "t" / "mnt") as other:
        for i in range(5):
            (other / f"x{i}").touch()
        before = _dircache.read_ahead_counts()
        fd = os.open(tmp_path / "t", os.O_PATH | os.O_DIRECTORY)
        try:
            assert _dircache.read_ahead(fd)
        finally:
            os.close(fd)
        # The mount point is an entry; what is mounted there is not listed.
        assert _settled(before, 1)["entries"] == 14 + 6


@needs_helper
def test_a_huge_directory_is_read_ahead_only_so_far(tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    for i in range(4200):
        (big / f"{i}").touch()
    before = _dircache.read_ahead_counts()
    fd = os.open(big, os.O_PATH | os.O_DIRECTORY)
    try:
        assert _dircache.read_ahead(fd)
    finally:
        os.close(fd)
    assert _settled(before, 1)["entries"] == 4096


@needs_helper
def test_a_directory_the_daemon_may_not_read_is_not_queued(unpriv_tmp, unpriv_user):
    secret = unpriv_tmp / "secret"  # root's, 0700, in a directory the user may search
    secret.mkdir(mode=0o700)
    (secret / "f").touch()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(unpriv_user.gid)
            os.setuid(unpriv_user.uid)
            fd = os.open(secret, os.O_PATH | os.O_DIRECTORY)  # O_PATH needs no permission
            os.write(w, b"1" if _dircache.read_ahead(fd) else b"0")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"0"
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def _helper_counts(mnt: Path) -> dict[str, int]:
    return json.loads(os.getxattr(mnt, stats.XATTR)).get("helper", {})


def _layers(tmp: Path) -> tuple[list[Path], Path, Path]:
    """Two lowers whose directories merge, files in each."""
    lowers = [tmp / "l0", tmp / "l1"]
    for n, lower in enumerate(lowers):
        for d in ("src", "src/sub", "doc"):
            (lower / d).mkdir(parents=True)
            for i in range(20):
                (lower / d / f"{n}-{i}").write_text(f"{n}{d}{i}")
    upper, mnt = tmp / "upper", tmp / "mnt"
    upper.mkdir()
    mnt.mkdir()
    return lowers, upper, mnt


def _stat_all(mnt: Path, lowers: list[Path]) -> int:
    n = 0
    for lower in lowers:
        for dirpath, dirs, files in os.walk(lower):
            rel = os.path.relpath(dirpath, lower)
            for name in dirs + files:
                os.lstat(mnt / rel / name)
                n += 1
    return n


@needs_helper
def test_lookups_in_cold_directories_have_them_read_ahead(tmp_path):
    lowers, upper, mnt = _layers(tmp_path)
    with unionfs_mount(lowers, upper, mnt, ["dir_readahead_us=0"]):
        assert _stat_all(mnt, lowers) == 2 * 63
        deadline = time.monotonic() + 10
        while _helper_counts(mnt)["read_ahead_dirs"] < 9 and time.monotonic() < deadline:
            time.sleep(0.01)
        counts = _helper_counts(mnt)
        # Once each: each lower's root, src, src/sub and doc, and the upper's
        # root (the only directory it has, where every name is looked up first).
        assert counts["read_ahead_dirs"] == 9
        assert counts["read_ahead_dropped"] == 0
        with_read_ahead = snapshot(mnt)
    upper2, mnt2 = tmp_path / "upper2", tmp_path / "mnt2"
    upper2.mkdir()
    mnt2.mkdir()
    with unionfs_mount(lowers, upper2, mnt2, ["nodir_readahead"]):
        _stat_all(mnt2, lowers)
        assert "read_ahead_dirs" not in _helper_counts(mnt2)
        assert snapshot(mnt2) == with_read_ahead  # the same view either way


def test_bad_thresholds_are_refused_in_one_line(tmp_path):
    for d in ("l", "u", "m"):
        (tmp_path / d).mkdir()
    for bad in ("dir_readahead_us=-1", "dir_readahead_us=fast", "dir_readahead_us=1000001"):
        r = subprocess.run(
            [*unionfs_command(), "-f", "-o", bad, "l", "u", "m"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "dir_readahead_us=" in r.stderr
        assert not is_mounted(tmp_path / "m")
