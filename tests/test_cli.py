"""The command line as users call it: errors, help, daemon life cycle."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

EXE = shutil.which("unionfs-mount") or ""
CMD = [EXE] if EXE else [sys.executable, "-m", "unionfs.cli"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout)


def mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def unmount(path: Path) -> None:
    if mounted(path):
        r = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


def daemon_pids(mnt: Path) -> list[int]:
    """PIDs of unionfs daemons serving ``mnt`` (found by their command line)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(str(mnt)) in argv and any(b"unionfs" in a for a in argv[:3]):
            pids.append(int(entry))
    return pids


@pytest.fixture
def dirs(tmp_path):
    for d in ("l1", "l2", "up", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "l1" / "f").write_text("one")
    (tmp_path / "l2" / "g").write_text("two")
    yield tmp_path
    mnt = tmp_path / "mnt"
    unmount(mnt)
    for pid in daemon_pids(mnt):
        os.kill(pid, signal.SIGKILL)


def test_help_and_version():
    r = run("--help")
    assert r.returncode == 0 and "LOWER1" in r.stdout and "workdir=" in r.stdout
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("unionfs ")


@pytest.mark.parametrize(
    ("make_args", "code", "fragment"),
    [
        (lambda t: [f"{t}/nope", f"{t}/up", f"{t}/mnt"], 1, "does not exist"),
        (lambda t: [f"{t}/l1/f", f"{t}/up", f"{t}/mnt"], 1, "not a directory"),
        (lambda t: [f"{t}/l1", f"{t}/up", f"{t}/l1/f"], 1, "not a directory"),
        (lambda t: [f"{t}/l1:{t}/l1", f"{t}/up", f"{t}/mnt"], 1, "given twice"),
        (lambda t: [f"{t}/l1", f"{t}/l1", f"{t}/mnt"], 1, "inside lower"),
        (lambda t: [f"{t}", f"{t}/up", f"{t}/mnt"], 1, "inside branch"),
        (lambda t: [f"{t}/l1", f"{t}/up", f"{t}/mnt", "-o", "frobnicate"], 2, "unknown option"),
        (lambda t: [f"{t}/l1", f"{t}/up", f"{t}/mnt", "-o", "timeout=x"], 2, "number"),
        (lambda t: [f"{t}/l1"], 2, "usage"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(dirs, make_args, code, fragment):
    before = sorted(p.name for p in dirs.iterdir())
    r = run(*make_args(dirs))
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert lines[0].startswith("unionfs-mount: ")
    assert not mounted(dirs / "mnt")
    assert sorted(p.name for p in dirs.iterdir()) == before, "nothing may be created"


def test_nonempty_mountpoint_refused_unless_asked(dirs):
    (dirs / "mnt" / "x").write_text("")
    r = run(f"{dirs}/l1", f"{dirs}/up", f"{dirs}/mnt")
    assert r.returncode == 1 and "not empty" in r.stderr
    r = run(f"{dirs}/l1", f"{dirs}/up", f"{dirs}/mnt", "-o", "nonempty")
    assert r.returncode == 0, r.stderr
    assert (dirs / "mnt" / "f").read_text() == "one"


def test_daemon_returns_when_mounted_and_exits_after_unmount(dirs):
    mnt = dirs / "mnt"
    r = run(f"{dirs}/l1:{dirs}/l2", f"{dirs}/up", str(mnt))
    assert r.returncode == 0, r.stderr
    # No waiting: the command returned only once the mount answered.
    assert mounted(mnt)
    assert sorted(os.listdir(mnt)) == ["f", "g"]
    pids = daemon_pids(mnt)
    assert len(pids) == 1
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    deadline = time.monotonic() + 10
    while daemon_pids(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemon_pids(mnt), "the daemon must exit after fusermount3 -u"


def wait_mounted(proc: subprocess.Popen[bytes], mnt: Path) -> None:
    """Until ``mnt`` is in the mount table; fails if the daemon ends or 20 s pass."""
    deadline = time.monotonic() + 20
    while not mounted(mnt):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "mount did not appear"
        time.sleep(0.05)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """Kill and reap the foreground daemon if the block leaves it running."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop_and_check_unmounted(proc: subprocess.Popen[bytes], mnt: Path, sig: int) -> None:
    """The signal ends the foreground daemon with status 0 and the mount with it."""
    proc.send_signal(sig)
    assert proc.wait(timeout=15) == 0
    assert not mounted(mnt)


def test_mount_serves_on_when_the_one_waiting_is_gone(dirs):
    """The ready pipe's reader ended before the mount answered (a Ctrl-C of the waiting
    command): the report fails with EPIPE, and the daemon serves on instead of dying
    with the mount left dead (ENOTCONN)."""
    mnt = dirs / "mnt"
    r, w = os.pipe()
    proc = subprocess.Popen(
        [*CMD, "-f", "--ready-fd", str(w), f"{dirs}/l1", f"{dirs}/up", str(mnt)],
        pass_fds=(w,),
        stderr=subprocess.PIPE,
    )
    os.close(w)
    os.close(r)  # before the daemon could possibly report
    with reaped(proc):
        wait_mounted(proc, mnt)
        time.sleep(0.5)  # the report has been tried by now
        assert (mnt / "f").read_text() == "one"
        assert proc.poll() is None
        stop_and_check_unmounted(proc, mnt, signal.SIGTERM)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_signal_unmounts_cleanly(dirs, sig):
    mnt = dirs / "mnt"
    proc = subprocess.Popen(
        [*CMD, "-f", f"{dirs}/l1", f"{dirs}/up", str(mnt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with reaped(proc):
        wait_mounted(proc, mnt)
        assert (mnt / "f").read_text() == "one"
        stop_and_check_unmounted(proc, mnt, sig)


def test_read_only_union_answers_erofs(dirs):
    mnt = dirs / "mnt"
    r = run(f"{dirs}/l1:{dirs}/l2", str(mnt))
    assert r.returncode == 0, r.stderr
    assert (mnt / "g").read_text() == "two"
    with pytest.raises(OSError) as info:
        (mnt / "new").write_text("x")
    assert info.value.errno == 30  # EROFS
    with pytest.raises(OSError) as info:
        (mnt / "f").unlink()
    assert info.value.errno == 30
