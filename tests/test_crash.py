"""SIGKILL of the daemon during copy-up: after a remount the file is whole.

The copy is built in the work dir and renamed into place only after fsync,
so at any kill point the merged view shows either the old lower content or
the complete new one, and the next mount removes the leftovers.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli import CMD, mounted, unmount

SIZE = 96 << 20


def _start(lower: Path, upper: Path, mnt: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [*CMD, "-f", str(lower), str(upper), str(mnt)], stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 20
    while not mounted(mnt):
        assert proc.poll() is None and time.monotonic() < deadline, "mount failed"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.4])
def test_kill_during_copy_up_leaves_old_or_new(tmp_path, delay):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB, not sparse
    with open(lower / "big", "wb") as f:
        for _ in range(SIZE >> 20):
            f.write(block)
    old = hashlib.sha256((lower / "big").read_bytes()).hexdigest()
    new = hashlib.sha256((lower / "big").read_bytes() + b"tail").hexdigest()

    proc = _start(lower, upper, mnt)
    writer = subprocess.Popen(
        [sys.executable, "-c", f"f=open({str(mnt / 'big')!r},'ab'); f.write(b'tail'); f.close()"],
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)

    work = tmp_path / ".upper.unionfs-work" / "work"
    print("leftovers before remount:", os.listdir(work), "upper:", os.listdir(upper))
    proc = _start(lower, upper, mnt)
    try:
        got = hashlib.sha256((mnt / "big").read_bytes()).hexdigest()
        assert got in (old, new)
        assert os.listdir(work) == [], "the mount must clean the work dir"
        assert (lower / "big").stat().st_size == SIZE, "the lower is never written"
        if (upper / "big").exists():
            assert (upper / "big").stat().st_size in (SIZE, SIZE + 4)
    finally:
        unmount(mnt)
        proc.wait(timeout=15)
