"""Faults and load: full disks, many descriptors, busy unmounts, signals, concurrency."""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import unionfs_mount
from test_cli import CMD, mounted

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")


@pytest.fixture
def small_upper(tmp_path):
    """An upper on a 4 MiB tmpfs; the default work dir lands on it too."""
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(fs)], check=True)
    try:
        (fs / "upper").mkdir()
        yield fs / "upper"
    finally:
        subprocess.run(["umount", str(fs)], check=False)


@root_only
def test_enospc_fails_cleanly_and_recovers(tmp_path, small_upper):
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mnt.mkdir()
    (lower / "big").write_bytes(b"b" * (6 << 20))
    (lower / "small").write_text("small\n")
    work = small_upper.parent / ".upper.unionfs-work" / "work"
    with unionfs_mount([lower], small_upper, mnt):
        with pytest.raises(OSError) as info, open(mnt / "big", "ab") as f:
            f.write(b"x")
        assert info.value.errno == errno.ENOSPC
        assert not (small_upper / "big").exists(), "no partial copy-up in the upper"
        assert os.listdir(work) == [], "no leftover in the work dir"
        assert (mnt / "big").stat().st_size == 6 << 20, "reads still served"
        # Fill the disk through the mount, then free it: writes work again.
        with pytest.raises(OSError) as info, open(mnt / "filler", "wb") as f:
            for _ in range(8):
                f.write(b"f" * (1 << 20))
                f.flush()
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as info:
            (mnt / "more").write_bytes(b"m" * (1 << 20))
        assert info.value.errno == errno.ENOSPC
        (mnt / "filler").unlink()
        (mnt / "more").unlink(missing_ok=True)
        (mnt / "small").write_text("changed\n")
        assert (mnt / "small").read_text() == "changed\n"
        assert (small_upper / "small").read_text() == "changed\n"


def _raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(n, soft)), hard))


def test_many_descriptors(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    for i in range(5000):
        (lower / f"f{i}").write_text(str(i))
    _raise_nofile(6000)
    with unionfs_mount([lower], upper, mnt):
        fds = [os.open(mnt / f"f{i}", os.O_RDONLY) for i in range(5000)]
        try:
            assert os.pread(fds[4321], 10, 0) == b"4321"
        finally:
            for fd in fds:
                os.close(fd)
        path = os.fsencode(mnt / "f7")
        for _ in range(100_000):
            os.close(os.open(path, os.O_RDONLY))
        assert (mnt / "f7").read_text() == "7"
        daemon = [p for p in _pids_of(mnt)]
        assert daemon and all(_fd_count(p) < 2000 for p in daemon), "daemon fds bounded"


def _pids_of(mnt: Path) -> list[int]:
    from test_cli import daemon_pids

    return daemon_pids(mnt)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_busy_unmount_then_lazy_keeps_data(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "f").write_text("lower\n")
    proc = subprocess.Popen([*CMD, "-f", str(lower), str(upper), str(mnt)])
    try:
        deadline = time.monotonic() + 20
        while not mounted(mnt):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        f = open(mnt / "f", "a")  # noqa: SIM115 - held open across the unmount
        f.write("one\n")
        f.flush()
        r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        assert r.returncode != 0, "a busy mount is not unmounted"
        subprocess.run(["fusermount3", "-uz", str(mnt)], check=True)
        assert not mounted(mnt)
        f.write("two\n")
        f.close()
        assert proc.wait(timeout=15) == 0, "the daemon ends when the last file closes"
        assert (upper / "f").read_text() == "lower\none\ntwo\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


def test_sigterm_with_open_files_loses_nothing(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    proc = subprocess.Popen([*CMD, "-f", str(lower), str(upper), str(mnt)])
    try:
        deadline = time.monotonic() + 20
        while not mounted(mnt):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        fd = os.open(mnt / "new", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"written before the signal\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not mounted(mnt)
        with contextlib.suppress(OSError):
            os.close(fd)
        assert (upper / "new").read_bytes() == b"written before the signal\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


def _worker(mnt: str, wid: int, seconds: float, out: multiprocessing.Queue) -> None:
    """Create, write, rename, list and delete in one shared directory."""
    errors: list[str] = []
    done = 0
    end = time.monotonic() + seconds
    shared = os.path.join(mnt, "shared")
    while time.monotonic() < end:
        try:
            name = os.path.join(shared, f"w{wid}-{done}")
            with open(name, "w") as f:
                f.write(f"{wid}:{done}\n")
            os.rename(name, name + ".r")
            with open(name + ".r") as f:
                if f.read() != f"{wid}:{done}\n":
                    errors.append(f"corrupt {name}")
            os.listdir(shared)
            for lower_name in ("l0", "l1", "l2"):
                try:
                    with open(os.path.join(shared, lower_name)) as f:
                        f.read()
                except FileNotFoundError:
                    pass
            if done % 3 == 0:
                os.unlink(name + ".r")
            done += 1
        except OSError as e:
            errors.append(f"{e!r}")
    out.put((wid, done, errors))


def test_concurrent_processes_in_one_directory(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "shared").mkdir()
    for i in range(3):
        (lower / "shared" / f"l{i}").write_text(f"lower {i}\n")
    with unionfs_mount([lower], upper, mnt):
        q: multiprocessing.Queue = multiprocessing.Queue()
        procs = [
            multiprocessing.Process(target=_worker, args=(str(mnt), w, 3.0, q)) for w in range(4)
        ]
        for p in procs:
            p.start()
        results = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        for wid, done, errors in results:
            assert errors == [], f"worker {wid}: {errors[:5]}"
            assert done > 0
        names = set(os.listdir(mnt / "shared"))
        for wid, done, _ in results:
            for i in range(done):
                expected = i % 3 != 0
                assert (f"w{wid}-{i}.r" in names) == expected
        assert {"l0", "l1", "l2"} <= names


def test_daemon_answers_during_big_copy_up(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    with open(lower / "big", "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(512):
            f.write(chunk)
    (lower / "other").write_text("other\n")
    work = tmp_path / ".upper.unionfs-work" / "work"
    with unionfs_mount([lower], upper, mnt):
        done = threading.Event()

        def append() -> None:
            with open(mnt / "big", "ab") as f:
                f.write(b"tail")
            done.set()

        t = threading.Thread(target=append)
        t.start()
        while not os.listdir(work) and not done.is_set():
            time.sleep(0.001)
        copying = not done.is_set()
        print("copy in progress during stat:", copying)
        st = os.stat(mnt / "other")  # must be answered while the copy runs
        listing = os.listdir(mnt)
        answered_during_copy = not done.is_set()
        t.join(timeout=120)
        assert done.is_set()
        assert st.st_size == 6 and "other" in listing
        if copying:
            assert answered_during_copy, "requests must not wait for a copy-up"
        assert (mnt / "big").stat().st_size == (512 << 20) + 4
