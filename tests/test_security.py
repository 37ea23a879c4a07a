"""Nothing in a branch or in the merged view can turn the daemon against its user."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

from support import unionfs_mount


@pytest.fixture
def union(tmp_path):
    """A mounted union of one lower and an upper; yields (lower, upper, mnt)."""
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "d").mkdir()
    (lower / "d" / "inner").write_text("inner\n")
    (lower / "f").write_text("f\n")
    with unionfs_mount([lower], upper, mnt):
        yield lower, upper, mnt


def _errno(fn) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno


MARKER_XATTRS = [
    "trusted.overlay.opaque",
    "trusted.overlay.whiteout",
    "user.overlay.opaque",
    "user.overlay.redirect",
    "user.fuseoverlayfs.opaque",
    "trusted.overlay.unionfs.origin",
]


@pytest.mark.parametrize("name", MARKER_XATTRS)
def test_marker_xattrs_cannot_be_set_or_read(union, name):
    _, upper, mnt = union
    assert _errno(lambda: os.setxattr(mnt / "d", name, b"y")) == errno.EOPNOTSUPP
    assert _errno(lambda: os.getxattr(mnt / "d", name)) == errno.EOPNOTSUPP
    assert _errno(lambda: os.removexattr(mnt / "d", name)) == errno.EOPNOTSUPP
    assert name not in os.listxattr(mnt / "d")
    assert not (upper / "d").exists(), "a refused change copies nothing up"


def test_private_xattrs_on_disk_are_hidden(union):
    _lower, upper, mnt = union
    (mnt / "f").write_text("changed\n")  # copy-up records an origin xattr
    on_disk = os.listxattr(upper / "f")
    assert any("overlay.unionfs.origin" in x for x in on_disk)
    assert [x for x in os.listxattr(mnt / "f") if "overlay" in x] == []


@pytest.mark.parametrize(
    "make",
    [
        lambda m: (m / ".wh.f").write_text(""),
        lambda m: (m / ".wh..wh..opq").write_text(""),
        lambda m: (m / ".wh.x").mkdir(),
        lambda m: os.symlink("f", m / ".wh.f"),
        lambda m: os.link(m / "f", m / ".wh.f"),
        lambda m: os.rename(m / "f", m / ".wh.f"),
        lambda m: os.mkfifo(m / ".wh.p"),
    ],
)
def test_marker_names_cannot_be_created(union, make):
    _lower, upper, mnt = union
    assert _errno(lambda: make(mnt)) == errno.EINVAL
    assert (mnt / "f").read_text() == "f\n", "the name it would hide is still there"
    assert not [n for n in os.listdir(upper) if n.startswith(".wh.")]


def test_whiteout_device_cannot_be_created(union):
    _, upper, mnt = union
    assert _errno(lambda: os.mknod(mnt / "w", stat.S_IFCHR | 0o600, 0)) == errno.EPERM
    assert not (upper / "w").exists()


def test_lower_symlink_swapped_in_is_not_followed(union, tmp_path):
    lower, _upper, mnt = union
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "inner").write_text("SECRET\n")
    assert (mnt / "d" / "inner").read_text() == "inner\n"
    # Swap the lower directory for a symlink pointing outside the branch.
    os.rename(lower / "d", tmp_path / "d-moved")
    os.symlink(secret, lower / "d")
    for name in ("inner", "other"):
        try:
            content = (mnt / "d" / name).read_text()
        except OSError:
            continue
        assert content != "SECRET\n"
    # A fresh name through the swapped path is refused, never resolved outside.
    try:
        listing = os.listdir(mnt / "d")
    except OSError:
        listing = []
    assert "SECRET" not in "".join(listing)


def test_upper_symlink_swapped_in_is_not_followed(union, tmp_path):
    _lower, upper, mnt = union
    target = tmp_path / "target"
    target.mkdir()
    (mnt / "newdir").mkdir()
    (mnt / "newdir" / "a").write_text("a\n")
    shutil.rmtree(upper / "newdir")
    os.symlink(target, upper / "newdir")
    for name in ("b", "c"):
        with contextlib.suppress(OSError):
            (mnt / "newdir" / name).write_text("x\n")
    assert os.listdir(target) == [], "nothing may be written through a branch symlink"


def test_symlinks_in_branches_are_shown_not_followed(union):
    lower, upper, mnt = union
    os.symlink("/etc/passwd", lower / "abs")
    os.symlink("../../../../etc", lower / "rel")
    assert os.readlink(mnt / "abs") == "/etc/passwd"
    assert os.readlink(mnt / "rel") == "../../../../etc"
    assert stat.S_ISLNK(os.lstat(mnt / "abs").st_mode)
    # Changing the symlink's xattrs or times copies the link, not its target.
    os.utime(mnt / "abs", ns=(10**9, 10**9), follow_symlinks=False)
    assert stat.S_ISLNK(os.lstat(upper / "abs").st_mode)
    assert os.readlink(upper / "abs") == "/etc/passwd"


def test_long_and_odd_names(union):
    _, upper, mnt = union
    long = "x" * 255
    (mnt / long).write_text("long\n")
    assert (upper / long).read_text() == "long\n"
    assert _errno(lambda: (mnt / ("y" * 256)).write_text("")) == errno.ENAMETOOLONG
    odd = b"sp ace\nnew\xff\xfeline"
    fd = os.open(os.fsencode(mnt) + b"/" + odd, os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    assert odd in os.listdir(os.fsencode(mnt))
    assert os.path.exists(os.fsencode(upper) + b"/" + odd)


def test_deep_paths(union):
    _, upper, mnt = union
    path = Path(mnt)
    rel = []
    while len(str(path)) < 5000:
        path = path / ("d" * 200)
        rel.append("d" * 200)
    # Build it one level at a time relative to a descriptor (paths > PATH_MAX).
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for comp in rel:
            os.mkdir(comp, dir_fd=fd)
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(leaf, b"deep")
        os.close(leaf)
    finally:
        os.close(fd)
    real = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for comp in rel:
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=real)
            os.close(real)
            real = nfd
        assert os.read(os.open("leaf", os.O_RDONLY, dir_fd=real), 10) == b"deep"
    finally:
        os.close(real)
    assert sum(len(c) + 1 for c in rel) > 4096
