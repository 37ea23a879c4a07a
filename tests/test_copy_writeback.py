"""A durable copy-up writes its data out as it copies (``copy_data(writeback=True)``).

The ranges handed to ``start_writeback`` must follow the copy exactly (each
copied byte once, none past what was copied, holes skipped), and the copy must
stay byte-for-byte and hole-for-hole the source's; a copy that will not be
fsync'd (``-o volatile``) starts no writeback.  Through a mount, a big lower
file appended to comes out whole in the upper.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest

from unionfs import copyup

from support import unionfs_mount

MIB = 1 << 20


def _sparse_source(path: Path) -> bytes:
    """40 MiB of data, a 24 MiB hole, 20 MiB of data, a trailing 8 MiB hole."""
    first, second = os.urandom(40 * MIB), os.urandom(20 * MIB)
    with open(path, "wb") as f:
        f.write(first)
        f.seek(64 * MIB)
        f.write(second)
        f.truncate(92 * MIB)
    return first + b"\0" * (24 * MIB) + second + b"\0" * (8 * MIB)


def _copy_sparse(tmp_path: Path, monkeypatch, writeback: bool) -> list[tuple[int, int]]:
    """Copy a sparse source with copy_data; returns the writeback ranges it started."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(copyup, "start_writeback", lambda fd, off, n: calls.append((off, n)))
    expected = _sparse_source(tmp_path / "src")
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copyup.copy_data(src, dst, len(expected), clone=False, holes=True, writeback=writeback)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == expected
    return calls


@pytest.mark.parametrize("writeback", [True, False])
def test_copy_starts_writeback_of_each_copied_range_once(tmp_path, monkeypatch, writeback):
    calls = _copy_sparse(tmp_path, monkeypatch, writeback)
    assert os.stat(tmp_path / "dst").st_blocks * 512 < 70 * MIB, "holes kept"
    if not writeback:
        assert calls == []
        return
    # Every range starts where the last one ended, or at a data extent after a hole.
    assert calls, "a 60 MiB copy starts writeback"
    assert all(n >= copyup.WRITEBACK_EVERY for _, n in calls)
    covered = sorted(calls)
    for (off, n), (nxt, _) in itertools.pairwise(covered):
        assert off + n <= nxt, "no byte written out twice"
    for off, n in covered:
        assert off + n <= 40 * MIB or off >= 64 * MIB, "no range across the hole"
        assert off + n <= 84 * MIB, "nothing past the data"
    assert sum(n for _, n in calls) >= 40 * MIB, "most of the data written out as copied"


def test_a_big_lower_file_appended_to_comes_out_whole(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    data = os.urandom(50 * MIB)
    (lower / "big").write_bytes(data)
    with unionfs_mount([lower], upper, mnt):
        with open(mnt / "big", "ab") as f:
            f.write(b"tail")
            os.fsync(f.fileno())
        assert (upper / "big").read_bytes() == data + b"tail"
        assert (lower / "big").read_bytes() == data


def test_no_writeback_while_the_source_comes_from_the_disk(tmp_path, monkeypatch):
    """A source read from the disk would only compete with the writes: they wait for the fsync."""
    monkeypatch.setattr(copyup, "_in_page_cache", lambda fd, off: False)
    assert _copy_sparse(tmp_path, monkeypatch, True) == []


def test_the_page_cache_probe_tells_cached_from_dropped(tmp_path):
    fstype = subprocess.run(
        ["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True
    ).stdout.strip()
    if fstype in ("tmpfs", "ramfs"):
        pytest.skip(f"{fstype}: its pages are the file, DONTNEED drops none")
    path = tmp_path / "f"
    path.write_bytes(os.urandom(4 * MIB))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        assert copyup._in_page_cache(fd, MIB)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped
        assert not copyup._in_page_cache(fd, MIB)
    finally:
        os.close(fd)


def test_without_the_probe_or_sync_file_range_a_copy_still_completes(tmp_path, monkeypatch):
    """A Python without RWF_NOWAIT, a C library without sync_file_range: the fsync does it all."""
    from unionfs import syscalls

    monkeypatch.setattr(copyup, "_RWF_NOWAIT", None)
    monkeypatch.setattr(syscalls, "_sync_file_range", None)
    data = os.urandom(3 * copyup.WRITEBACK_EVERY + 5)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert copyup._in_page_cache(src, 0)  # cannot tell: as if cached
        copyup.copy_data(src, dst, len(data), clone=False, holes=False, writeback=True)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == data
