"""WRITE answered in C (unionfs/_dircache.c) and in Python (``-o nofastpath``): the same results.

Without a writeback cache every ``write(2)`` through the mount is one or more
WRITE requests (the kernel splits at its max_write), so the bytes in the upper
file, the counts a write returns and the errno of a failed write show what
either path did.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import subprocess
from pathlib import Path

import pytest

from unionfs import stats

from support import helper_opts, unionfs_mount


@pytest.fixture
def mode(helper_mode: str) -> str:
    return helper_mode


def _writes(mnt: Path) -> tuple[int, int]:
    """(WRITE requests counted, of which answered in C) from ``unionfs stats``."""
    raw = json.loads(os.getxattr(mnt, stats.XATTR))
    return sum(raw["requests"].get("write", {}).values()), raw.get("in_c", {}).get("write", 0)


def _dirs(tmp: Path) -> tuple[Path, Path, Path]:
    lower, upper, mnt = tmp / "lower", tmp / "upper", tmp / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    return lower, upper, mnt


def test_writes_of_every_size_and_offset_land_in_the_upper(tmp_path, mode):
    lower, upper, mnt = _dirs(tmp_path)
    (lower / "lowerfile").write_bytes(b"L" * 10_000)
    expected = bytearray()

    def put(data: bytes, off: int) -> None:
        if len(expected) < off:
            expected.extend(b"\0" * (off - len(expected)))
        expected[off : off + len(data)] = data

    with unionfs_mount([lower], upper, mnt, helper_opts(mode)):
        before = _writes(mnt)
        fd = os.open(mnt / "new", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            chunks = [
                (b"a", 0),
                (os.urandom(4096), 1),
                (os.urandom(128 * 1024), 4097),
                (os.urandom(3 * 2**20 + 5), 200_000),  # more than one WRITE request
                (b"after a hole", 10 * 2**20),
                (b"overwrite", 2),
            ]
            for data, off in chunks:
                assert os.pwrite(fd, data, off) == len(data)
                put(data, off)
            assert os.pread(fd, 64, 0) == bytes(expected[:64])
        finally:
            os.close(fd)
        assert (upper / "new").read_bytes() == bytes(expected)
        assert (mnt / "new").stat().st_size == len(expected)

        # A lower file: copied up at open, then written in the middle and appended to.
        with open(mnt / "lowerfile", "r+b") as f:
            f.seek(5000)
            f.write(b"middle")
        with open(mnt / "lowerfile", "ab") as f:
            assert f.write(b"appended") == 8
        assert (upper / "lowerfile").read_bytes() == (
            b"L" * 5000 + b"middle" + b"L" * 4994 + b"appended"
        )
        assert (lower / "lowerfile").read_bytes() == b"L" * 10_000

        total, in_c = _writes(mnt)
        assert total - before[0] >= len(chunks) + 2
        assert in_c - before[1] == (total - before[0] if mode == "fastpath" else 0)


def test_o_append_writes_go_to_the_end_whatever_the_offset(tmp_path, mode):
    lower, upper, mnt = _dirs(tmp_path)
    with unionfs_mount([lower], upper, mnt, helper_opts(mode)):
        (mnt / "log").write_bytes(b"first\n")
        a = os.open(mnt / "log", os.O_WRONLY | os.O_APPEND)
        b = os.open(mnt / "log", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(a, b"from a\n")
            os.write(b, b"from b\n")
            os.write(a, b"a again\n")
        finally:
            os.close(a)
            os.close(b)
        assert (upper / "log").read_bytes() == b"first\nfrom a\nfrom b\na again\n"


def test_appends_of_concurrent_processes_are_never_lost(tmp_path, mode):
    """Each append goes to the end the kernel holds, under its inode lock: two shells
    appending at once lose no line and interleave whole lines."""
    lower, upper, mnt = _dirs(tmp_path)
    script = 'for i in $(seq 1 2000); do echo "$1 line $i" >> "$2"; done'
    with unionfs_mount([lower], upper, mnt, helper_opts(mode)):
        log = mnt / "log"
        log.write_bytes(b"")
        procs = [subprocess.Popen(["sh", "-c", script, "sh", who, str(log)]) for who in ("a", "b")]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        lines = (upper / "log").read_bytes().splitlines()
    assert len(lines) == 4000
    for who in (b"a", b"b"):
        assert [n for n in lines if n.startswith(who)] == [
            b"%s line %d" % (who, i) for i in range(1, 2001)
        ]


def test_a_write_at_an_offset_through_an_append_handle_lands_there(tmp_path, mode):
    """The kernel decides where each write goes (the end, for an O_APPEND file).

    A WRITE can still come through a handle opened with O_APPEND for another
    offset: the pages of a shared mapping written back (through whichever
    writable handle of the file the kernel picks), or a write after F_SETFL
    cleared O_APPEND, which FUSE never hears of.  The daemon's descriptor
    must write where the request says, as kernel overlayfs does.
    """
    lower, upper, mnt = _dirs(tmp_path)
    (lower / "mapped").write_bytes(b"\0" * 8192)
    with unionfs_mount([lower], upper, mnt, helper_opts(mode)):
        # A logger appends while another handle maps the file and changes its first page.
        mapper = os.open(mnt / "mapped", os.O_RDWR)
        logger = os.open(mnt / "mapped", os.O_WRONLY | os.O_APPEND)
        try:
            with mmap.mmap(mapper, 8192) as m:
                m[0:5] = b"hello"
                m.flush()
            os.write(logger, b"log line\n")
        finally:
            os.close(logger)
            os.close(mapper)
        data = (upper / "mapped").read_bytes()
        assert data[:5] == b"hello" and data[8192:] == b"log line\n" and len(data) == 8201

        (mnt / "g").write_bytes(b"0123456789")
        fd = os.open(mnt / "g", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"ab")
            fcntl.fcntl(fd, fcntl.F_SETFL, 0)
            os.pwrite(fd, b"XY", 0)
        finally:
            os.close(fd)
        assert (upper / "g").read_bytes() == b"XY23456789ab"


@pytest.fixture
def pipes_can_hold_a_request():
    """pipe-max-size raised to 2 MiB while the mount starts, as on a host where the
    daemon has CAP_SYS_RESOURCE: libfuse's request pipe can then hold a whole
    request, and would keep a WRITE's data there if the daemon let it splice."""
    path = Path("/proc/sys/fs/pipe-max-size")
    if os.geteuid() != 0:
        pytest.skip("sets a sysctl")
    old = path.read_text()
    try:
        path.write_text("2097152")
    except OSError as e:
        pytest.skip(f"pipe-max-size not writable: {e.strerror}")
    try:
        yield
    finally:
        path.write_text(old)


def test_writes_are_answered_in_c_where_requests_could_be_spliced(
    tmp_path, pipes_can_hold_a_request
):
    lower, upper, mnt = _dirs(tmp_path)
    data = os.urandom(256 * 1024)
    with unionfs_mount([lower], upper, mnt, helper_opts("fastpath")):
        before = _writes(mnt)
        fd = os.open(mnt / "big", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for off in range(0, len(data), 64 * 1024):
                os.pwrite(fd, data[off : off + 64 * 1024], off)
        finally:
            os.close(fd)
        total, in_c = _writes(mnt)
        assert total - before[0] >= 4
        assert in_c - before[1] == total - before[0]  # none handed to pyfuse3
        assert (upper / "big").read_bytes() == data


def test_a_shared_mapping_is_written_back(tmp_path, mode):
    """Dirty pages of a MAP_SHARED mapping reach the daemon as WRITEs (writepage)."""
    lower, upper, mnt = _dirs(tmp_path)
    (lower / "mapped").write_bytes(b"\0" * 8192)
    with unionfs_mount([lower], upper, mnt, helper_opts(mode)):
        with open(mnt / "mapped", "r+b") as f, mmap.mmap(f.fileno(), 8192) as m:
            m[100:105] = b"hello"
            m[5000:5005] = b"world"
            m.flush()
        data = (upper / "mapped").read_bytes()
        assert data[100:105] == b"hello" and data[5000:5005] == b"world"
        assert len(data) == 8192


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_write_to_a_full_upper_fails_enospc_and_the_daemon_goes_on(tmp_path, mode):
    lower, _, mnt = _dirs(tmp_path)
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(fs)], check=True)
    try:
        upper = fs / "upper"
        upper.mkdir()
        with unionfs_mount([lower], upper, mnt, helper_opts(mode)):
            fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                with pytest.raises(OSError) as info:
                    for i in range(8):
                        os.pwrite(fd, b"f" * 2**20, i * 2**20)
                assert info.value.errno == errno.ENOSPC
            finally:
                os.close(fd)
            _, in_c = _writes(mnt)
            assert (in_c > 0) == (mode == "fastpath")
            (mnt / "filler").unlink()
            (mnt / "after").write_bytes(b"still served\n")
            assert (upper / "after").read_bytes() == b"still served\n"
    finally:
        subprocess.run(["umount", str(fs)], check=False)
