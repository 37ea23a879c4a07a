"""The kernel's directory-listing cache: used, and exact after every change."""

from __future__ import annotations

import functools
import os
import subprocess
import time

import pytest

from unionfs.cli import enable_kernel_dircache

from support import is_mounted, unionfs_command, unionfs_mount

pytestmark = pytest.mark.skipif(not enable_kernel_dircache(), reason="_dircache not built")


def _count_requests(tmp_path, opts: list[str], opcode: str, fill, use) -> int:
    """Mount with ``-d`` over ``fill(lower)``, run ``use(mnt)``, count ``opcode`` requests."""
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir(parents=True)
    fill(lower)
    log = tmp_path / "trace.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*unionfs_command(), "-d", *opts, str(lower), str(upper), str(mnt)], stderr=err
        )
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        use(mnt)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(timeout=15)
    return log.read_text().count(f"opcode: {opcode}")


def _twenty_dirs(lower) -> None:
    for i in range(20):
        (lower / f"d{i}").mkdir()
        (lower / f"d{i}" / "f").write_text("f")


def _list_three_times(mnt) -> None:
    for _ in range(3):
        for i in range(20):
            os.listdir(mnt / f"d{i}")


def _twenty_symlinks(lower) -> None:
    for i in range(20):
        os.symlink(f"target{i}", lower / f"s{i}")


def _read_links_three_times(mnt) -> None:
    for _ in range(3):
        for i in range(20):
            assert os.readlink(mnt / f"s{i}") == f"target{i}"


@pytest.mark.parametrize(
    ("opcode", "fill", "use"),
    [
        ("READDIRPLUS", _twenty_dirs, _list_three_times),
        ("READLINK", _twenty_symlinks, _read_links_three_times),
    ],
    ids=["listings", "symlink-targets"],
)
def test_repeats_are_served_by_the_kernel(tmp_path, opcode, fill, use):
    count = functools.partial(_count_requests, opcode=opcode, fill=fill, use=use)
    cached = count(tmp_path / "a", [])
    uncached = count(tmp_path / "b", ["-o", "nodircache"])
    assert uncached >= 3 * 20, f"without the caches every {opcode} reaches the daemon"
    assert cached <= uncached / 2, (cached, uncached)  # the first pass, not the others


def test_symlink_target_follows_replacement(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    os.symlink("old", lower / "s")
    os.symlink("other", lower / "t")
    with unionfs_mount([lower], upper, mnt):
        assert os.readlink(mnt / "s") == "old"
        (mnt / "s").unlink()
        os.symlink("new", mnt / "s")
        assert os.readlink(mnt / "s") == "new"
        assert os.readlink(mnt / "t") == "other"
        os.rename(mnt / "t", mnt / "s")
        assert os.readlink(mnt / "s") == "other"
        os.symlink("third", mnt / "u")
        os.rename(mnt / "u", mnt / "s")
        assert os.readlink(mnt / "s") == "third"
    with unionfs_mount([lower], upper, mnt):
        assert os.readlink(mnt / "s") == "third"


def test_listing_follows_every_change(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "d").mkdir()
    (lower / "d" / "a").write_text("a")
    (lower / "d" / "sub").mkdir()
    (lower / "d" / "sub" / "x").write_text("x")
    with unionfs_mount([lower], upper, mnt):
        d = mnt / "d"
        assert sorted(os.listdir(d)) == ["a", "sub"]
        (d / "b").write_text("b")
        assert sorted(os.listdir(d)) == ["a", "b", "sub"]
        (d / "a").unlink()
        assert sorted(os.listdir(d)) == ["b", "sub"]
        os.rename(d / "b", d / "c")
        assert sorted(os.listdir(d)) == ["c", "sub"]
        os.rename(d / "sub", mnt / "moved")
        assert sorted(os.listdir(d)) == ["c"]
        assert os.listdir(mnt / "moved") == ["x"]
        os.mkdir(d / "sub")
        assert os.listdir(d / "sub") == [], "a re-created directory is empty"
        os.link(d / "c", d / "c2")
        os.symlink("c", d / "s")
        assert sorted(os.listdir(d)) == ["c", "c2", "s", "sub"]
        os.rmdir(d / "sub")
        assert sorted(os.listdir(d)) == ["c", "c2", "s"]
