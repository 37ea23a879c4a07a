"""SIGKILL of the daemon during copy-up: after a remount the file is whole.

The copy is built in the work dir and renamed into place only after fsync,
so at any kill point the merged view shows either the old lower content or
the complete new one, and the next mount removes the leftovers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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


def _copy_up_each(mnt: Path) -> None:
    """Copy up, one way each: an empty file and a full one by append, one by O_TRUNC,
    one by chmod; then change each again (no more copy-ups)."""
    for name in ("empty", "full"):
        with open(mnt / name, "ab") as f:
            f.write(b"x")
    with open(mnt / "trunc", "wb") as f:
        f.write(b"new")
    os.chmod(mnt / "mode", 0o600)
    for name in ("empty", "full", "trunc", "mode"):
        with open(mnt / name, "ab") as f:
            f.write(b"y")


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_copy_up_syncs_only_copied_data_and_leaves_no_temporary(tmp_path):
    """The kernel's syscall budget: only a copy that moved data is fsync'd (an empty
    file, or one truncated at open, has nothing a crash could lose), never a
    directory; a regular file is built as an O_TMPFILE and linked in, no rename."""
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "empty").write_bytes(b"")
    for name in ("full", "trunc", "mode"):
        (lower / name).write_bytes(b"lower data\n" * 100)
    log = tmp_path / "strace.log"
    trace = ["strace", "-f", "-qq", "-o", str(log), "-e", "trace=fsync,fdatasync,syncfs,rename,"]
    trace[-1] += "renameat,renameat2,linkat,open,openat"
    proc = subprocess.Popen(
        [*trace, *CMD, "-f", str(lower), str(upper), str(mnt)], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while not mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, "mount failed"
            time.sleep(0.02)
        _copy_up_each(mnt)
        assert (mnt / "full").read_bytes() == b"lower data\n" * 100 + b"xy"
        assert (mnt / "trunc").read_bytes() == b"newy"
        assert (mnt / "empty").read_bytes() == b"xy"
        assert (mnt / "mode").stat().st_mode & 0o777 == 0o600
    finally:
        unmount(mnt)
        proc.wait(timeout=15)
    lines = log.read_text().splitlines()
    # What the mount's start writes (its stack record, synced) comes before.
    first = next((i for i, line in enumerate(lines) if "O_TMPFILE" in line), 0)
    lines = lines[first:]
    calls = [line.split("(")[0].split()[-1] for line in lines if "(" in line]
    # The copy of "full" and of "mode" (chmod copies data without -o metacopy).
    assert calls.count("fsync") == 2 and "fdatasync" not in calls, calls
    assert not any(c.startswith("rename") for c in calls), calls
    assert sum("O_TMPFILE" in line for line in lines) == 4, lines
    assert sum(line.split()[1].startswith("linkat(") for line in lines) == 4, lines
    assert (upper / "full").stat().st_nlink == 1


#: A daemon on a file system without O_TMPFILE (as some FUSE or network uppers):
#: the real open, except that an O_TMPFILE fails as the kernel fails it there.
_NO_TMPFILE_DAEMON = """
import errno, os, sys
real_open = os.open
def no_tmpfile(path, flags, *args, **kwargs):
    if flags & os.O_TMPFILE == os.O_TMPFILE:
        raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE here")
    return real_open(path, flags, *args, **kwargs)
os.open = no_tmpfile
from unionfs.cli import main
sys.argv[0] = "unionfs-mount"
sys.exit(main())
"""


def test_copy_up_without_o_tmpfile_goes_through_a_named_temporary(tmp_path):
    """Where O_TMPFILE fails, copy-ups are built as named temporaries and renamed
    in: the same data and metadata, nothing left in the work dir."""
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    for name in ("a", "b"):
        (lower / name).write_bytes(b"lower " + name.encode())
        os.chmod(lower / name, 0o640)
        os.utime(lower / name, ns=(10**18, 10**18))
    proc = subprocess.Popen(
        [sys.executable, "-c", _NO_TMPFILE_DAEMON, "-f", str(lower), str(upper), str(mnt)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, "mount failed"
            time.sleep(0.02)
        for name in ("a", "b"):
            with open(mnt / name, "ab") as f:
                f.write(b"+")
            os.utime(mnt / name, ns=(10**18, 10**18))
        assert (mnt / "a").read_bytes() == b"lower a+"
        assert (mnt / "b").read_bytes() == b"lower b+"
        work = tmp_path / ".upper.unionfs-work" / "work"
        assert os.listdir(work) == []
    finally:
        unmount(mnt)
        proc.wait(timeout=15)
    for name in ("a", "b"):
        st = (upper / name).stat()
        assert st.st_mode & 0o777 == 0o640 and st.st_nlink == 1
        assert st.st_size == len(b"lower a+")
