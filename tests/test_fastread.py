"""READ answered in C (unionfs/_dircache.c) and in Python (``-o nofastpath``): the same replies.

Reads use ``O_DIRECT`` where the test needs each one to reach the daemon (the
kernel's page cache answers a buffered re-read itself), so a wrong byte, a
wrong length or a wrong errno from either path shows here.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from unionfs import stats

from support import helper_opts, is_mounted, unionfs_command, unionfs_mount

try:
    from unionfs import _dircache  # type: ignore[attr-defined]
except ImportError:
    _dircache = None

PAGE = 4096
BIG = 3 * 2**20 + 123  # not a multiple of a page: the last READ is short
HOLE = 4 * 2**20


@pytest.fixture
def mode(helper_mode: str) -> str:
    return helper_mode


_opts = helper_opts


def _layers(tmp: Path) -> tuple[Path, Path, Path, dict[str, bytes]]:
    """A lower and an upper with an empty, a small, a big and a sparse file."""
    lower, upper, mnt = tmp / "lower", tmp / "upper", tmp / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    content = {
        "empty": b"",
        "small": b"small file\n",
        "big": os.urandom(BIG),
        "sparse": b"\0" * HOLE + b"after the hole",
    }
    for name in ("empty", "small", "big"):
        (lower / name).write_bytes(content[name])
    with open(lower / "sparse", "wb") as f:
        f.seek(HOLE)
        f.write(b"after the hole")
    content["in-upper"] = b"only in the upper" * 1000
    (upper / "in-upper").write_bytes(content["in-upper"])
    return lower, upper, mnt, content


def _reads(mnt: Path) -> tuple[int, int]:
    """(READ requests counted, of which answered in C) from ``unionfs stats``."""
    raw = json.loads(os.getxattr(mnt, stats.XATTR))
    return sum(raw["requests"].get("read", {}).values()), raw.get("in_c", {}).get("read", 0)


def _direct_pread(fd: int, size: int, off: int) -> bytes:
    """One READ request of ``size`` bytes at ``off`` (page-aligned buffer, O_DIRECT fd)."""
    buf = mmap.mmap(-1, size)
    n = os.preadv(fd, [buf], off)
    return bytes(buf[:n])


def test_files_read_whole_equal_their_content(tmp_path, mode):
    lower, upper, mnt, content = _layers(tmp_path)
    with unionfs_mount([lower], upper, mnt, _opts(mode)):
        for name, data in content.items():
            assert (mnt / name).read_bytes() == data, name
        total, in_c = _reads(mnt)
        assert total > 0
        # Every READ answered in C with the fast path on, none without.
        assert in_c == (total if mode == "fastpath" else 0)


def test_reads_at_and_past_the_end(tmp_path, mode):
    lower, upper, mnt, content = _layers(tmp_path)
    big = content["big"]
    with unionfs_mount([lower], upper, mnt, _opts(mode)):
        fd = os.open(mnt / "big", os.O_RDONLY | os.O_DIRECT)
        try:
            last = len(big) // PAGE * PAGE
            assert _direct_pread(fd, 2 * PAGE, last) == big[last:]  # spans the end: short
            assert _direct_pread(fd, PAGE, last + PAGE) == b""  # past the end
            assert _direct_pread(fd, PAGE, 10 * 2**20) == b""
            assert _direct_pread(fd, PAGE, PAGE) == big[PAGE : 2 * PAGE]
            # Large READs (spliced from the descriptor in C): whole, across the end, past it.
            chunk = 128 * 1024
            assert _direct_pread(fd, chunk, chunk) == big[chunk : 2 * chunk]
            tail = len(big) // chunk * chunk
            assert _direct_pread(fd, 2 * chunk, tail) == big[tail:]
            assert _direct_pread(fd, chunk, len(big) // PAGE * PAGE + PAGE) == b""
        finally:
            os.close(fd)
        fd = os.open(mnt / "sparse", os.O_RDONLY | os.O_DIRECT)
        try:
            assert _direct_pread(fd, PAGE, 0) == b"\0" * PAGE  # in the hole
            assert _direct_pread(fd, PAGE, HOLE) == b"after the hole"
            assert _direct_pread(fd, 256 * 1024, HOLE - 128 * 1024) == (
                b"\0" * 128 * 1024 + b"after the hole"
            )
        finally:
            os.close(fd)


def test_stats_count_every_read(tmp_path, mode):
    lower, upper, mnt, content = _layers(tmp_path)
    with unionfs_mount([lower], upper, mnt, _opts(mode)):
        before = _reads(mnt)
        fd = os.open(mnt / "big", os.O_RDONLY | os.O_DIRECT)
        try:
            for i in range(10):
                assert (
                    _direct_pread(fd, PAGE, i * PAGE) == content["big"][i * PAGE : (i + 1) * PAGE]
                )
        finally:
            os.close(fd)
        after = _reads(mnt)
        assert after[0] - before[0] == 10
        assert after[1] - before[1] == (10 if mode == "fastpath" else 0)
        out = subprocess.run(
            [sys.executable, "-m", "unionfs.command", "stats", str(mnt)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        row = next(line.split() for line in out.splitlines() if line.startswith("read "))
        assert int(row[1]) == after[0]


def test_concurrent_readers_get_their_own_bytes(tmp_path, mode):
    lower, upper, mnt, content = _layers(tmp_path)
    big = content["big"]
    errors: list[str] = []

    def reader(k: int) -> None:
        fd = os.open(mnt / "big", os.O_RDONLY | os.O_DIRECT)
        try:
            for i in range(k, len(big) // PAGE, 4):
                if _direct_pread(fd, PAGE, i * PAGE) != big[i * PAGE : (i + 1) * PAGE]:
                    errors.append(f"reader {k}: page {i}")
        finally:
            os.close(fd)

    with unionfs_mount([lower], upper, mnt, _opts(mode)):
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        # Handles closed and opened again: a descriptor number the daemon reuses
        # for another file reads that file, not the closed one.
        for name in ("small", "in-upper", "small", "big"):
            fd = os.open(mnt / name, os.O_RDONLY | os.O_DIRECT)
            try:
                assert _direct_pread(fd, 2 * PAGE, 0) == content[name][: 2 * PAGE]
            finally:
                os.close(fd)


def test_read_only_handle_reads_the_copy_after_a_copy_up(tmp_path, mode):
    lower, upper, mnt, _ = _layers(tmp_path)
    (lower / "f").write_bytes(b"lower data")
    with unionfs_mount([lower], upper, mnt, _opts(mode)):
        ro = os.open(mnt / "f", os.O_RDONLY | os.O_DIRECT)
        try:
            assert _direct_pread(ro, PAGE, 0) == b"lower data"
            with open(mnt / "f", "r+b") as w:  # copy-up, then a write in the upper
                w.write(b"UPPER")
            assert (upper / "f").read_bytes() == b"UPPER data"
            # As on kernel overlayfs (tests/test_open_across_copyup.py): the handle's
            # descriptor now holds the copy, also for READs answered in C.
            assert _direct_pread(ro, PAGE, 0) == b"UPPER data"
        finally:
            os.close(ro)
        fd = os.open(mnt / "f", os.O_RDONLY | os.O_DIRECT)
        try:
            assert _direct_pread(fd, PAGE, 0) == b"UPPER data"
        finally:
            os.close(fd)


@pytest.mark.parametrize("size", [PAGE, 256 * 1024])
def test_a_failing_descriptor_read_is_its_errno_and_the_daemon_goes_on(tmp_path, mode, size):
    """A lower on another FUSE mount whose daemon is killed: the pread fails ENOTCONN."""
    inner_lower, inner_mnt = tmp_path / "inner-lower", tmp_path / "inner"
    inner_lower.mkdir()
    inner_mnt.mkdir()
    (inner_lower / "data").write_bytes(os.urandom(8 * 2**20))
    lower, upper, mnt, content = _layers(tmp_path)
    inner = subprocess.Popen(
        [*unionfs_command(), "-f", str(inner_lower), str(inner_mnt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(inner_mnt):
            assert inner.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with unionfs_mount([lower, inner_mnt], upper, mnt, _opts(mode)) as (outer, _):
            fd = os.open(mnt / "data", os.O_RDONLY | os.O_DIRECT)
            try:
                assert len(_direct_pread(fd, PAGE, 0)) == PAGE
                inner.send_signal(signal.SIGKILL)  # its connection is aborted
                inner.wait(timeout=10)
                with pytest.raises(OSError) as e:  # far from anything read ahead
                    _direct_pread(fd, size, 6 * 2**20)
                assert e.value.errno == errno.ENOTCONN
            finally:
                os.close(fd)
            assert outer.poll() is None  # and answers what its live layer holds
            assert (mnt / "small").read_bytes() == content["small"]
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(inner_mnt)], check=False)
    assert not is_mounted(inner_mnt)


@pytest.mark.skipif(_dircache is None, reason="the C session helper is not built")
def test_registry_never_mixes_two_handles_of_one_slot():
    """A slot holds one handle: a newer one mapping to it stays with Python until it is free."""
    slots = 1 << 16
    try:
        assert _dircache.register(7, 3)
        assert not _dircache.register(7 + slots, 4)  # the slot is 7's
        assert _dircache.register(7, 5)  # the same handle: its descriptor replaced
        _dircache.unregister(7 + slots)  # not registered: changes nothing
        assert not _dircache.register(7 + slots, 4)
        _dircache.unregister(7)
        assert _dircache.register(7 + slots, 4)
        assert not _dircache.register(0, 3)  # 0 is "free"
        assert not _dircache.register(8, -1)
    finally:
        _dircache.clear()


@pytest.mark.skipif(os.geteuid() != 0, reason="drops the page cache")
def test_reads_from_disk_are_answered_by_workers_with_the_right_bytes(tmp_path, mode):
    """READs of data not in the page cache wait in worker threads (unionfs/_readpool.c)."""
    lower, upper, mnt, _ = _layers(tmp_path)
    files = {f"cold{i}": os.urandom(2 * 2**20 + i * 777) for i in range(4)}
    for name, data in files.items():
        (lower / name).write_bytes(data)
    errors: list[str] = []

    def reader(name: str) -> None:
        data = files[name]
        fd = os.open(mnt / name, os.O_RDONLY | os.O_DIRECT)
        try:
            # Backwards, so that no read-ahead of the lower file has them cached already.
            for i in reversed(range(0, len(data), 64 * 1024)):
                got = _direct_pread(fd, 64 * 1024, i)
                if got != data[i : i + 64 * 1024]:
                    errors.append(f"{name} at {i}")
        finally:
            os.close(fd)

    with unionfs_mount([lower], upper, mnt, _opts(mode)):
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        threads = [threading.Thread(target=reader, args=(name,)) for name in files]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        helper = json.loads(os.getxattr(mnt, stats.XATTR))["helper"]
    if mode == "fastpath":
        assert helper["worker_reads"] > 0
    else:
        assert "worker_reads" not in helper
