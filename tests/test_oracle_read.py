"""The merged read view against kernel overlayfs, in every marker format.

One logical set of layers is written twice: in kernel format for the oracle,
and in the format under test for unionfs (OCI ``.wh.`` files, the rootless and
fuse-overlayfs opaque xattrs, xattr whiteouts).  Both views must be equal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from support import diff_snapshots, kernel_overlay, snapshot, unionfs_mount

pytestmark = [
    pytest.mark.oracle,
    pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlayfs needs root"),
]

FORMATS = ["kernel", "oci", "user-xattr", "fuse-overlayfs", "xattr-whiteout"]


def whiteout(d: Path, name: str, fmt: str) -> None:
    if fmt == "oci":
        (d / f".wh.{name}").write_bytes(b"")
    elif fmt == "xattr-whiteout":
        (d / name).write_bytes(b"")
        os.setxattr(d / name, "trusted.overlay.whiteout", b"")
        os.setxattr(d, "trusted.overlay.opaque", b"x")
    else:
        os.mknod(d / name, stat.S_IFCHR, 0)


def opaque(d: Path, fmt: str) -> None:
    if fmt == "oci":
        (d / ".wh..wh..opq").write_bytes(b"")
    elif fmt == "user-xattr":
        os.setxattr(d, "user.overlay.opaque", b"y")
    elif fmt == "fuse-overlayfs":
        os.setxattr(d, "user.fuseoverlayfs.opaque", b"y")
    else:
        os.setxattr(d, "trusted.overlay.opaque", b"y")


def build(base: Path, fmt: str) -> list[Path]:
    """Three lowers with shadowing, merging, whiteouts and an opaque directory."""
    top, mid, bottom = (base / n for n in ("top", "mid", "bottom"))
    for layer in (top, mid, bottom):
        (layer / "dir").mkdir(parents=True)
    (bottom / "file").write_text("bottom\n")
    (mid / "file").write_text("mid\n")
    (bottom / "only-bottom").write_text("b\n")
    (bottom / "dir" / "b").write_text("b\n")
    (mid / "dir" / "m").write_text("m\n")
    (top / "dir" / "t").write_text("t\n")
    (bottom / "dir" / "gone").write_text("gone\n")
    whiteout(mid / "dir", "gone", fmt)
    (bottom / "deleted").write_text("x\n")
    whiteout(top, "deleted", "oci" if fmt == "oci" else "kernel")
    # A file shadowing a directory, and a directory shadowing a file.
    (bottom / "was-dir").mkdir()
    (bottom / "was-dir" / "inner").write_text("inner\n")
    (top / "was-dir").write_text("now a file\n")
    (bottom / "was-file").write_text("file\n")
    (mid / "was-file").mkdir()
    (mid / "was-file" / "x").write_text("x\n")
    # An opaque directory in mid hides bottom's copy.
    (bottom / "opq").mkdir()
    (bottom / "opq" / "hidden").write_text("hidden\n")
    (mid / "opq").mkdir()
    (mid / "opq" / "shown").write_text("shown\n")
    opaque(mid / "opq", fmt)
    # Every file type, links and xattrs.
    os.symlink("file", top / "rel-link")
    os.symlink("/etc/passwd", top / "abs-link")
    os.symlink("nowhere", top / "dangling")
    os.mkfifo(bottom / "fifo")
    os.mknod(bottom / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(bottom / "sock"))
    sock.close()
    (bottom / "hard1").write_text("hard\n")
    os.link(bottom / "hard1", bottom / "hard2")
    (top / "xattrs").write_text("x\n")
    os.setxattr(top / "xattrs", "user.colour", b"green")
    os.setxattr(top / "xattrs", "trusted.overlay.anything", b"private")
    (bottom / "empty").mkdir()
    os.chmod(bottom / "only-bottom", 0o751)
    odd = os.fsencode(bottom) + b"/odd name\n\xff"
    with open(odd, "wb") as f:
        f.write(b"odd\n")
    return [top, mid, bottom]


@pytest.mark.parametrize("fmt", FORMATS)
def test_view_matches_kernel(tmp_path, fmt):
    k_layers = build(tmp_path / "k", "kernel")
    u_layers = build(tmp_path / "u", fmt)
    for d in ("kmnt", "umnt", "up", "umnt2"):
        (tmp_path / d).mkdir()
    with kernel_overlay(k_layers, None, None, tmp_path / "kmnt"):
        want = snapshot(tmp_path / "kmnt")
    with unionfs_mount(u_layers, None, tmp_path / "umnt"):
        got = snapshot(tmp_path / "umnt")
        assert "user.colour" in os.listxattr(tmp_path / "umnt" / "xattrs")
        assert not [x for x in os.listxattr(tmp_path / "umnt" / "xattrs") if "overlay" in x]
    assert not diff_snapshots(want, got), diff_snapshots(want, got)
    assert "dir/gone" not in got and "opq/hidden" not in got and "deleted" not in got
    assert got["hard1"][6] == 2
    # With an (empty) upper the view is the same.
    with unionfs_mount(u_layers, tmp_path / "up", tmp_path / "umnt2"):
        assert not diff_snapshots(want, snapshot(tmp_path / "umnt2"))


def _inodes(root: Path) -> dict[bytes, tuple[int, int]]:
    """path -> (st_ino from lstat, d_ino from readdir) for every entry."""
    out = {}
    stack = [os.fsencode(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = os.lstat(e.path)
                out[e.path] = (st.st_ino, e.inode())
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
    return out


def test_inode_numbers_unique_consistent_and_stable(tmp_path):
    """Layers on two filesystems (one a tmpfs): no collisions, d_ino == st_ino, stable."""
    on_disk = build(tmp_path / "disk", "kernel")
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
    try:
        other = build(tmpfs, "kernel")
        lowers = [*other, *on_disk]
        (tmp_path / "up").mkdir()
        (tmp_path / "mnt").mkdir()
        with unionfs_mount(lowers, tmp_path / "up", tmp_path / "mnt"):
            first = _inodes(tmp_path / "mnt")
            st = os.stat(tmp_path / "mnt" / "hard1"), os.stat(tmp_path / "mnt" / "hard2")
        with unionfs_mount(lowers, tmp_path / "up", tmp_path / "mnt"):
            second = _inodes(tmp_path / "mnt")
    finally:
        subprocess.run(["umount", str(tmpfs)], check=False)
    assert all(s == d for s, d in first.values()), "d_ino must equal st_ino"
    hard = {p for p in first if p.endswith((b"/hard1", b"/hard2"))}
    numbers = [first[p][0] for p in first if p not in hard]
    assert len(numbers) == len(set(numbers)), "two objects share an inode number"
    assert st[0].st_ino == st[1].st_ino and st[0].st_nlink == 2
    assert first == second, "inode numbers must survive a remount"


def test_hundred_layers(tmp_path):
    base = tmp_path / "layers"
    base.mkdir()
    names = [str(i) for i in range(100)]
    for i, n in enumerate(names):
        layer = base / n
        (layer / "common").mkdir(parents=True)
        (layer / "common" / f"f{i}").write_text(f"{i}\n")
        (layer / "shadow").write_text(f"layer {i}\n")
    os.mknod(base / "10" / "common" / "f50", stat.S_IFCHR, 0)
    (tmp_path / "kmnt").mkdir()
    (tmp_path / "umnt").mkdir()
    # Short relative paths keep the kernel's option string within one page.
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            "lowerdir=" + ":".join(names),
            str(tmp_path / "kmnt"),
        ],
        cwd=base,
        check=True,
    )
    try:
        want = snapshot(tmp_path / "kmnt")
    finally:
        subprocess.run(["umount", str(tmp_path / "kmnt")], check=False)
    with unionfs_mount([base / n for n in names], None, tmp_path / "umnt"):
        got = snapshot(tmp_path / "umnt")
        assert (tmp_path / "umnt" / "shadow").read_text() == "layer 0\n"
    assert not diff_snapshots(want, got), diff_snapshots(want, got)
    assert len([p for p in got if p.startswith("common/")]) == 99


class _Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


def test_big_directory_seekdir_telldir_and_concurrent_readers(tmp_path):
    lowers = [tmp_path / f"l{i}" for i in range(3)]
    for i, layer in enumerate(lowers):
        layer.mkdir()
        for j in range(i, 5000, 3):
            (layer / f"n{j:05d}").write_bytes(b"")
    (tmp_path / "mnt").mkdir()
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]

    def read_all(dirp) -> list[bytes]:
        names = []
        while True:
            ent = libc.readdir(dirp)
            if not ent:
                return names
            names.append(ent.contents.d_name)

    with unionfs_mount(lowers, None, tmp_path / "mnt"):
        mnt = tmp_path / "mnt"
        dirp = libc.opendir(os.fsencode(mnt))
        assert dirp
        try:
            head = [libc.readdir(dirp).contents.d_name for _ in range(2600)]
            pos = libc.telldir(dirp)
            tail = read_all(dirp)
            libc.seekdir(dirp, pos)
            again = read_all(dirp)
        finally:
            libc.closedir(dirp)
        assert again == tail, "seekdir to a telldir position resumes exactly there"
        names = [n for n in head + tail if n not in (b".", b"..")]
        assert len(names) == 5000 and len(set(names)) == 5000
        assert b"." in head + tail and b".." in head + tail
        # Two readers interleaved, each on its own handle, each sees every name once.
        a, b = os.scandir(mnt), os.scandir(mnt)
        seen_a, seen_b = [], []
        for ea, eb in zip(a, b, strict=False):
            seen_a.append(ea.name)
            seen_b.append(eb.name)
        seen_a += [e.name for e in a]
        seen_b += [e.name for e in b]
        a.close()
        b.close()
        assert sorted(seen_a) == sorted(seen_b) == sorted(f"n{j:05d}" for j in range(5000))


def test_unprivileged_user_reads_the_merged_view(world_tmp, unpriv_user):
    k_layers = build(world_tmp / "k", "kernel")
    u_layers = build(world_tmp / "u", "user-xattr")
    for d in ("kmnt", "umnt"):
        (world_tmp / d).mkdir()
    for top in ("k", "u", "umnt"):  # the user's own layers, as in a home sandbox
        for dirpath, dirnames, filenames in os.walk(world_tmp / top):
            for n in [dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)]:
                os.chown(n, unpriv_user.uid, unpriv_user.gid, follow_symlinks=False)
    from test_oracle_write import run_as

    with kernel_overlay(k_layers, None, None, world_tmp / "kmnt"):
        want = run_as(unpriv_user, snapshot, world_tmp / "kmnt")
    with unionfs_mount(u_layers, None, world_tmp / "umnt", user=unpriv_user):
        got = run_as(unpriv_user, snapshot, world_tmp / "umnt")
        with open("/proc/self/mountinfo") as f:
            line = next(x for x in f if x.split()[4] == str(world_tmp / "umnt"))
        assert f"user_id={unpriv_user.uid}" in line, "mounted by the user, not root"
    assert not diff_snapshots(want, got), diff_snapshots(want, got)
