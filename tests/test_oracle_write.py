"""The write path against kernel overlayfs: same lowers, same operations, same view.

Each scenario runs one script of operations on a unionfs mount and on a
kernel overlayfs mount of the same lower layers, recording every result
(errno included), then compares the merged views.  It then mounts the upper
that unionfs left behind with kernel overlayfs and expects the same view
again: the upper must be a correct overlay layer.  As root and, with
``-o userxattr`` on the kernel side, as an unprivileged user.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from unionfs.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

from support import diff_snapshots, kernel_overlay, snapshot, unionfs_mount

pytestmark = [
    pytest.mark.oracle,
    pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlayfs needs root"),
]


def build_lowers(base: Path) -> list[Path]:
    """Two lower layers with the shapes the write path must handle."""
    l1, l2 = base / "l1", base / "l2"
    for d in (l1, l2):
        d.mkdir(parents=True)
    (l2 / "file").write_text("lower2 file\n")
    (l2 / "shadowed").write_text("from l2\n")
    (l1 / "shadowed").write_text("from l1\n")
    (l2 / "merged").mkdir()
    (l2 / "merged" / "a").write_text("a\n")
    (l2 / "merged" / "sub").mkdir()
    (l2 / "merged" / "sub" / "deep").write_text("deep\n")
    (l1 / "merged").mkdir()
    (l1 / "merged" / "b").write_text("b\n")
    (l2 / "lowdir").mkdir()
    (l2 / "lowdir" / "x").write_text("x\n")
    (l2 / "lowdir" / "y").mkdir()
    (l2 / "lowdir" / "y" / "z").write_text("z\n")
    (l2 / "hl1").write_text("hard\n")
    os.link(l2 / "hl1", l2 / "hl2")
    os.symlink("file", l2 / "sym")
    os.symlink("/etc/passwd", l2 / "abs-sym")
    os.mkfifo(l2 / "fifo")
    (l1 / "xa").write_text("xattr file\n")
    os.setxattr(l1 / "xa", "user.colour", b"blue")
    (l1 / "mode").write_text("mode\n")
    os.chmod(l1 / "mode", 0o640)
    with open(l2 / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    (l2 / "gone").mkdir()
    (l2 / "gone" / "inner").write_text("inner\n")
    (l1 / "twin-a").write_text("A\n")
    (l1 / "twin-b").write_text("B\n")
    return [l1, l2]


def mv(src: Path, dst: Path) -> None:
    """What mv(1) does: rename, or copy and delete when the fs answers EXDEV."""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
            shutil.rmtree(src)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
            src.unlink()


def script(root: Path, rootful: bool) -> list[tuple[str, object]]:
    """The operations, each recorded as (label, result or errno name)."""
    log: list[tuple[str, object]] = []

    def step(label: str, fn: Callable[[], object]) -> None:
        try:
            log.append((label, fn()))
        except OSError as e:
            log.append((label, errno.errorcode.get(e.errno or 0, str(e.errno))))

    def append(p: Path, text: str) -> None:
        with open(p, "a") as f:
            f.write(text)

    step("append lower", lambda: append(root / "file", "more\n"))
    step("append shadowing", lambda: append(root / "shadowed", "+\n"))
    step("create", lambda: (root / "new").write_text("new\n"))
    step("mkdir", lambda: (root / "newdir").mkdir())
    step("create in newdir", lambda: (root / "newdir" / "f").write_text("f\n"))
    step("create in merged", lambda: (root / "merged" / "c").write_text("c\n"))
    step("unlink lower in merged", lambda: (root / "merged" / "a").unlink())
    step("unlink shadowing", lambda: (root / "shadowed").unlink())
    step("rmdir nonempty", lambda: (root / "gone").rmdir())
    step("rm -r lower dir", lambda: shutil.rmtree(root / "gone"))
    step("mkdir over deleted dir", lambda: (root / "gone").mkdir())
    step("listing of recreated dir", lambda: sorted(os.listdir(root / "gone")))
    step("create in recreated dir", lambda: (root / "gone" / "fresh").write_text("fresh\n"))
    step("unlink missing", lambda: (root / "nothere").unlink())
    step("mkdir existing", lambda: (root / "merged").mkdir())
    step("rmdir file", lambda: (root / "file").rmdir())
    step("unlink dir", lambda: (root / "merged").unlink())
    step("rename lower file", lambda: os.rename(root / "xa", root / "xa2"))
    step("rename over existing", lambda: os.rename(root / "new", root / "file"))
    step("mv lower dir", lambda: mv(root / "lowdir", root / "moved"))
    step("mv merged dir", lambda: mv(root / "merged", root / "merged2"))
    step("listing after mv", lambda: sorted(os.listdir(root / "merged2")))
    step("old name gone", lambda: (root / "merged").exists())
    step(
        "noreplace",
        lambda: renameat2(
            -100, bytes(root / "twin-a"), -100, bytes(root / "twin-b"), RENAME_NOREPLACE
        ),
    )
    step(
        "exchange",
        lambda: renameat2(
            -100, bytes(root / "twin-a"), -100, bytes(root / "twin-b"), RENAME_EXCHANGE
        ),
    )
    step("chmod lower", lambda: os.chmod(root / "mode", 0o604))
    if rootful:
        step("chown lower", lambda: os.chown(root / "file", 1234, 5678))
    step("utime lower", lambda: os.utime(root / "hl1", ns=(10**18, 10**18)))
    step("setxattr lower", lambda: os.setxattr(root / "sym", "user.x", b"1", follow_symlinks=False))
    step("setxattr file", lambda: os.setxattr(root / "xa2", "user.size", b"big"))
    step("removexattr", lambda: os.removexattr(root / "xa2", "user.colour"))
    step("truncate lower", lambda: os.truncate(root / "merged2" / "b", 1))
    step("link lower", lambda: os.link(root / "hl1", root / "hl3"))
    step("symlink", lambda: os.symlink("target", root / "newsym"))
    step("mkfifo", lambda: os.mkfifo(root / "newfifo"))
    step("append sparse", lambda: append(root / "sparse", "tail"))
    step("unlink fifo", lambda: (root / "fifo").unlink())
    step(
        "rmdir emptied merged",
        lambda: [os.unlink(root / "merged2" / n) for n in ("b", "c")] and None,
    )
    step("rm -r merged2", lambda: shutil.rmtree(root / "merged2"))
    step("mkdir again", lambda: (root / "merged2").mkdir())
    step("final listing", lambda: sorted(os.listdir(root)))
    return log


@pytest.mark.parametrize("rootless", [False, True], ids=["root", "rootless"])
def test_write_script_matches_kernel_overlayfs(tmp_path_factory, rootless, request):
    """The rootless run is the same script run by an unprivileged user on both sides.

    Its lowers belong to that user: who owns a copy of a root-owned file is
    where rootless unionfs (the mounter) and a root kernel mount (root)
    legitimately differ, as the docs say.
    """
    user = request.getfixturevalue("unpriv_user") if rootless else None
    base: Path = request.getfixturevalue("world_tmp") if rootless else tmp_path_factory.mktemp("w")
    lowers = build_lowers(base / "lowers")
    for d in ("k-up", "k-work", "k-mnt", "u-up", "u-mnt", "k2-work", "k2-mnt"):
        (base / d).mkdir()
    if user is not None:
        os.chown(base, user.uid, user.gid)
        for d in ("lowers", "k-up", "u-up", "u-mnt"):
            for dirpath, dirnames, filenames in os.walk(base / d):
                for n in [dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)]:
                    os.chown(n, user.uid, user.gid, follow_symlinks=False)

    def as_user(fn, *args):
        return run_as(user, fn, *args) if user is not None else fn(*args)

    with kernel_overlay(lowers, base / "k-up", base / "k-work", base / "k-mnt", userxattr=rootless):
        k_log = as_user(script, base / "k-mnt", not rootless)
        k_view = snapshot(base / "k-mnt")

    with unionfs_mount(lowers, base / "u-up", base / "u-mnt", user=user):
        u_log = as_user(script, base / "u-mnt", not rootless)
        u_view = as_user(snapshot, base / "u-mnt")

    for (label, k), (_, u) in zip(k_log, u_log, strict=True):
        if label.startswith("mv "):
            continue  # the kernel answers EXDEV and mv copies; unionfs renames
        assert u == k, f"{label}: unionfs {u!r}, kernel {k!r}"
    assert not diff_snapshots(k_view, u_view), diff_snapshots(k_view, u_view)

    # unionfs itself sees the same after a remount (nothing lived only in memory).
    with unionfs_mount(lowers, base / "u-up", base / "u-mnt", user=user):
        remounted = as_user(snapshot, base / "u-mnt")
    assert not diff_snapshots(k_view, remounted), diff_snapshots(k_view, remounted)

    # The upper unionfs wrote is a valid kernel overlay layer.  Handing it over,
    # the unionfs work dir goes (its index holds an extra link of hard-linked copies).
    shutil.rmtree(base / ".u-up.unionfs-work")
    with kernel_overlay(
        lowers, base / "u-up", base / "k2-work", base / "k2-mnt", userxattr=rootless
    ):
        again = snapshot(base / "k2-mnt")
    assert not diff_snapshots(k_view, again), diff_snapshots(k_view, again)

    # No stray marker files, and the sparse file stayed sparse.
    for dirpath, dirnames, filenames in os.walk(base / "u-up"):
        for n in dirnames + filenames:
            assert not n.startswith(".wh."), f"stray marker {dirpath}/{n}"
    sparse = os.stat(base / "u-up" / "sparse")
    assert sparse.st_size == (64 << 20) + 4
    assert sparse.st_blocks * 512 < (4 << 20), "copy-up must keep holes"
    if rootless:
        assert os.getxattr(base / "u-up" / "gone", "user.overlay.opaque") == b"y"


def run_as(user, fn, *args):
    """Run ``fn(*args)`` in a child process with the user's ids; return its result."""
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
            data = pickle.dumps(fn(*args))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child failed"
    return pickle.loads(data)


def test_mode_bits_of_whiteouts_are_kernel_format(tmp_path):
    """Deleting a lower file leaves a char 0/0 device, not a .wh. file."""
    lowers = build_lowers(tmp_path / "lowers")
    (tmp_path / "up").mkdir()
    (tmp_path / "mnt").mkdir()
    with unionfs_mount(lowers, tmp_path / "up", tmp_path / "mnt"):
        (tmp_path / "mnt" / "file").unlink()
        shutil.rmtree(tmp_path / "mnt" / "gone")
        (tmp_path / "mnt" / "gone").mkdir()
    st = os.lstat(tmp_path / "up" / "file")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(tmp_path / "up" / "gone", "trusted.overlay.opaque") == b"y"
    assert os.listdir(tmp_path / "up" / "gone") == []
