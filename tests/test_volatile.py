"""``-o volatile``: no sync reaches the upper, and an unclean end is never silent.

As kernel overlayfs' option of the same name: copy-ups are not fsync'd and
fsync/fsyncdir through the mount return without syncing, for builds and
throw-away containers that do not need durability.  The mount leaves
``<workdir>/work/incompat/volatile`` (the kernel's path); a clean unmount
syncs the upper once and removes it, so only a mount that did not end
cleanly (killed daemon, crash) leaves it, and then the next mount refuses,
as the kernel does, and ``unionfs-check`` reports it without removing it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from support import chown_tree, run_as, unionfs_command, unionfs_mount
from test_check import run as check
from test_cli import mounted

MARKER = ("work", "incompat", "volatile")


def _tree(base: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, mnt = base / "lower", base / "upper", base / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "f").write_text("lower\n")
    (lower / "d").mkdir()
    (lower / "d" / "g").write_text("g\n")
    return lower, upper, mnt, base / ".upper.unionfs-work"


def _append_and_fsync(mnt: str) -> str:
    """Copy-up by append, a new file, fsync and fsyncdir: all succeed."""
    fd = os.open(os.path.join(mnt, "f"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"more\n")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    with open(os.path.join(mnt, "d", "new"), "w") as f:
        f.write("new\n")
        f.flush()
        os.fsync(f.fileno())
    dfd = os.open(os.path.join(mnt, "d"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    with open(os.path.join(mnt, "f")) as f:
        return f.read()


@pytest.mark.parametrize("rootless", [False, True], ids=["root", "rootless"])
def test_clean_unmount_syncs_and_removes_the_marker(tmp, request, rootless):
    base = tmp / "t"
    base.mkdir()
    lower, upper, mnt, work = _tree(base)
    user = request.getfixturevalue("unpriv_user") if rootless else None
    if user is not None:
        chown_tree(base, user.uid, user.gid)
    with unionfs_mount([lower], upper, mnt, opts=["volatile"], user=user):
        assert work.joinpath(*MARKER).is_dir(), "the marker must exist while mounted"
        assert run_as(user, _append_and_fsync, str(mnt)) == "lower\nmore\n"
    assert not work.joinpath(*MARKER).exists()
    assert not (work / "work" / "incompat").exists()
    assert (upper / "f").read_text() == "lower\nmore\n"
    assert (upper / "d" / "new").read_text() == "new\n"
    assert check(str(upper)).returncode == 0
    with unionfs_mount([lower], upper, mnt, user=user):  # an ordinary mount takes it
        assert run_as(user, Path.read_text, mnt / "f") == "lower\nmore\n"


def _start(argv: list[str], mnt: Path) -> subprocess.Popen[bytes]:
    """Start a foreground daemon (``argv``) and wait until ``mnt`` is mounted."""
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{argv[0]} did not mount {mnt}")
        time.sleep(0.02)
    return proc


def test_killed_volatile_mount_is_refused_until_someone_decides(tmp):
    lower, upper, mnt, work = _tree(tmp)
    argv = [*unionfs_command(), "-f", "-o", "volatile", str(lower), str(upper), str(mnt)]
    proc = _start(argv, mnt)
    try:
        (mnt / "f").write_text("written\n")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    marker = work.joinpath(*MARKER)
    assert marker.is_dir()

    for opts in ([], ["-o", "volatile"], ["-o", "ro"]):
        r = subprocess.run(
            [*unionfs_command(), *opts, str(lower), str(upper), str(mnt)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1, r.stderr
        assert "volatile" in r.stderr and str(marker) in r.stderr
        assert not mounted(mnt)

    r = check(str(upper))
    assert r.returncode == 4 and str(marker) in r.stdout
    r = check("--repair", str(upper))
    assert r.returncode == 4, "only a person may accept a volatile upper"
    assert marker.is_dir()

    shutil.rmtree(work / "work" / "incompat")  # the person decides the system did not crash
    with unionfs_mount([lower], upper, mnt):
        assert (mnt / "f").read_text() == "written\n"


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("volatile", [False, True], ids=["durable", "volatile"])
def test_volatile_makes_no_sync_until_one_syncfs_at_the_end(tmp, volatile):
    lower, upper, mnt, _ = _tree(tmp)
    log = tmp / "strace.log"
    cmd = [*unionfs_command(), "-f"]
    if volatile:
        cmd += ["-o", "volatile"]
    cmd += [str(lower), str(upper), str(mnt)]
    trace = ["strace", "-f", "-qq", "-o", str(log), "-e", "trace=fsync,fdatasync,syncfs"]
    proc = _start([*trace, *cmd], mnt)
    try:
        assert _append_and_fsync(str(mnt)) == "lower\nmore\n"
        (mnt / "d" / "g").write_text("changed\n")  # one more copy-up
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
                proc.kill()
                proc.wait()
    calls = [line.split("(")[0].split()[-1] for line in log.read_text().splitlines() if "(" in line]
    syncs = [c for c in calls if c in ("fsync", "fdatasync")]
    if volatile:
        assert syncs == [] and calls.count("syncfs") == 1, calls
    else:
        # two copy-ups, then the client's fsync, fdatasync, fsync of the new file, fsyncdir
        assert len(syncs) >= 6 and "syncfs" not in calls, calls
