"""Reading starts at OPEN: the head of a file opened for reading is on its way before READ."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from support import unionfs_mount

pytestmark = pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore")

SIZE = 64 * 1024


def _resident(path) -> int:
    """Bytes of ``path`` in the page cache (util-linux fincore)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_open_for_reading_starts_reading_the_head(tmp):
    lower, upper, mnt = tmp / "lower", tmp / "upper", tmp / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "f").write_bytes(os.urandom(SIZE))
    (lower / "g").write_bytes(os.urandom(SIZE))
    with unionfs_mount([lower], upper, mnt):
        os.stat(mnt / "f")
        os.stat(mnt / "g")
        for name in ("f", "g"):
            _evict(lower / name)
            if _resident(lower / name):
                pytest.skip("this file system keeps pages the test cannot evict")
        fd = os.open(mnt / "f", os.O_RDONLY)  # opened, never read
        try:
            deadline = time.monotonic() + 10
            while _resident(lower / "f") < SIZE and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _resident(lower / "f") == SIZE
        finally:
            os.close(fd)
        # The control: a file only looked up is not read.
        assert _resident(lower / "g") == 0
