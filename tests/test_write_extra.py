"""Write-path behaviour beyond the oracle script: mmap, OCI markers, mount flags."""

from __future__ import annotations

import mmap
import os
import stat

import pytest

from unionfs import markers

from support import kernel_overlay, snapshot, unionfs_mount


@pytest.fixture
def layers(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "data").write_bytes(b"0123456789" * 1000)
    (lower / "dir").mkdir()
    (lower / "dir" / "x").write_text("x")
    (lower / "gone").write_text("gone")
    return lower, upper, mnt


def test_mmap_shared_write_reaches_the_upper(layers):
    lower, upper, mnt = layers
    with unionfs_mount([lower], upper, mnt):
        with open(mnt / "data", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[0:5] = b"HELLO"
            m.flush()
        assert (mnt / "data").read_bytes()[:12] == b"HELLO5678901"
    assert (upper / "data").read_bytes()[:10] == b"HELLO56789"
    assert (lower / "data").read_bytes()[:5] == b"01234", "the lower is never written"


def test_oci_format_writes_wh_files_and_reads_them_back(layers):
    lower, upper, mnt = layers
    with unionfs_mount([lower], upper, mnt, opts=("whiteout=oci",)):
        (mnt / "gone").unlink()
        (mnt / "dir" / "x").unlink()
        (mnt / "dir").rmdir()
        (mnt / "dir").mkdir()
        (mnt / "dir" / "new").write_text("new")
        before = snapshot(mnt)
    wh = upper / ".wh.gone"
    assert wh.is_file() and wh.stat().st_size == 0
    assert (upper / "dir" / markers.OPAQUE_NAME.decode()).is_file()
    assert not any(
        stat.S_ISCHR(os.lstat(os.path.join(d, n)).st_mode)
        for d, ds, fs in os.walk(upper)
        for n in ds + fs
    ), "no char devices in an OCI-format upper"
    with unionfs_mount([lower], upper, mnt):
        after = snapshot(mnt)
    assert before == after
    assert set(after) == {"data", "dir", "dir/new"}


@pytest.mark.skipif(os.geteuid() != 0, reason="suid/dev need root")
def test_nosuid_nodev_unless_asked(layers):
    lower, upper, mnt = layers

    def flags() -> set[str]:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if parts[4] == str(mnt):
                    return set(parts[5].split(","))
        raise AssertionError("not mounted")

    with unionfs_mount([lower], upper, mnt):
        assert {"nosuid", "nodev"} <= flags()
    with unionfs_mount([lower], upper, mnt, opts=("suid,dev",)):
        assert not {"nosuid", "nodev"} & flags()


# --------------------------------------------------------------------------- names of one file


def test_hard_link_survives_removal_of_the_name_it_was_made_from(layers):
    """link() a lower file, change it, unlink the first name: the other name answers
    (it used to be EIO: the daemon still stat'ed the first name, now a whiteout)."""
    lower, upper, mnt = layers
    with unionfs_mount([lower], upper, mnt):
        os.link(mnt / "gone", mnt / "other")
        (mnt / "gone").write_text("changed")
        os.unlink(mnt / "gone")
        assert (mnt / "other").read_text() == "changed"
        assert os.stat(mnt / "other").st_nlink == 1
        assert stat.S_ISREG(os.stat(mnt / "other").st_mode)
        assert not os.path.lexists(mnt / "gone")


def test_hard_link_renamed_then_replaced_leaves_its_other_name(layers):
    """Rename one name of a linked file, then rename something over it: the file
    stays reachable through its first name (found by the crash workload test)."""
    lower, upper, mnt = layers
    with unionfs_mount([lower], upper, mnt):
        os.mkdir(mnt / "d")
        os.link(mnt / "gone", mnt / "d" / "l")
        os.rename(mnt / "d" / "l", mnt / "dir" / "moved")
        os.rename(mnt / "data", mnt / "dir" / "moved")
        assert (mnt / "gone").read_text() == "gone"
        assert os.stat(mnt / "gone").st_nlink == 1
        assert len((mnt / "dir" / "moved").read_bytes()) == 10000


def test_open_file_unlinked_and_replaced_is_changed_alone(layers):
    """An open, unlinked file is changed through its descriptor; the new file that
    took its name is left alone."""
    lower, upper, mnt = layers
    with unionfs_mount([lower], upper, mnt):
        fd = os.open(mnt / "gone", os.O_RDWR)
        try:
            os.unlink(mnt / "gone")
            (mnt / "gone").write_text("newcomer")
            os.ftruncate(fd, 2)
            os.fchmod(fd, 0o600)
            st = os.fstat(fd)
            assert (st.st_size, stat.S_IMODE(st.st_mode)) == (2, 0o600)
            assert os.pread(fd, 10, 0) == b"go"
        finally:
            os.close(fd)
        assert (mnt / "gone").read_text() == "newcomer"
        assert stat.S_IMODE(os.stat(mnt / "gone").st_mode) == 0o644
    assert (upper / "gone").read_text() == "newcomer"


# --------------------------------------------------------------------------- found by the fuzzer


def _hard_linked_lower(root):
    """b/a and b/b one file, c/x a third name of it: three names in one lower layer."""
    (root / "b").mkdir(parents=True)
    (root / "c").mkdir()
    (root / "b" / "a").write_text("one file\n")
    os.link(root / "b" / "a", root / "b" / "b")
    os.link(root / "b" / "a", root / "c" / "x")


@pytest.mark.parametrize(
    "steps",
    [
        # A lower dir holding two names of one file, renamed: both names move (one was lost).
        [("listdir",), ("rename", "b", "moved")],
        # One lower name unlinked after all were seen: the others count one link less.
        [("listdir",), ("unlink", "b/a")],
        # A lower name exchanged with a dir after its other name was seen (was ENOENT).
        [("listdir",), ("mkdir", "d"), ("exchange", "d", "b/b")],
        # One lower name replaced by a rename: the others count one link less.
        [("symlink", "s"), ("rename", "s", "b/b")],
        # Change through one name, rename another, unlink the first.
        [("append", "b/a"), ("rename", "c/x", "y"), ("unlink", "b/a"), ("append", "y")],
    ],
)
def test_lower_hard_links_match_the_kernel(tmp, unionfs, kernel_overlay, steps):
    from unionfs.syscalls import RENAME_EXCHANGE, renameat2

    from support import diff_snapshots

    views = []
    for side in ("u", "k"):
        lower, upper = tmp / f"{side}-lower", tmp / f"{side}-upper"
        _hard_linked_lower(lower)
        upper.mkdir()
        if side == "u":
            m = unionfs([lower], upper)
        else:  # renames directories as unionfs does, instead of EXDEV
            m = kernel_overlay([lower], upper, options=("redirect_dir=on",))
        for op, *args in steps:
            paths = [os.path.join(m.mnt, a) for a in args]
            if op == "listdir":
                snapshot(m.mnt)
            elif op == "rename":
                os.rename(*paths)
            elif op == "unlink":
                os.unlink(*paths)
            elif op == "symlink":
                os.symlink("target", *paths)
            elif op == "mkdir":
                os.mkdir(*paths)
            elif op == "append":
                with open(paths[0], "a") as f:
                    f.write("more\n")
            elif op == "exchange":
                renameat2(-100, os.fsencode(paths[0]), -100, os.fsencode(paths[1]), RENAME_EXCHANGE)
        views.append(snapshot(m.mnt))
        m.close()
    assert not diff_snapshots(*views, ("unionfs", "kernel")), diff_snapshots(*views)


def _link_symlink_then_unlink(mnt: str) -> tuple[bool, str]:
    os.link(os.path.join(mnt, "s"), os.path.join(mnt, "t"), follow_symlinks=False)
    os.unlink(os.path.join(mnt, "s"))
    st = os.lstat(os.path.join(mnt, "t"))
    return stat.S_ISLNK(st.st_mode), os.readlink(os.path.join(mnt, "t"))


def test_rootless_hard_linked_symlink_keeps_its_other_name(unpriv_tmp, unpriv_user, unionfs):
    """Rootless, a copied-up symlink carries no origin xattr (user.* xattrs are refused on
    symlinks), so its number changes; its other name must still be found (was ESTALE)."""
    from support import chown_tree, run_as

    lower, upper = unpriv_tmp / "lower", unpriv_tmp / "upper"
    lower.mkdir()
    upper.mkdir()
    os.symlink("target", lower / "s")
    chown_tree(unpriv_tmp, unpriv_user.uid, unpriv_user.gid)
    m = unionfs([lower], upper, user=unpriv_user)
    assert run_as(unpriv_user, _link_symlink_then_unlink, str(m.mnt)) == (True, "target")


def _make_dir(path: str) -> None:
    os.mkdir(path)


def _make_symlink(path: str) -> None:
    os.symlink("target-of-" + os.path.basename(path), path)


def _held_then_replaced(mnt: str, upper: str, make, remove) -> tuple[int, list[str]]:
    """Make ``a<i>``, hold it (O_PATH), remove it, make ``b<i>``; the upper filesystem
    often gives ``b<i>`` the inode just freed.  Returns how often it did, and what
    went wrong then: the merged number shared, a symlink's old target, a directory
    refusing entries (the kernel took it for the removed one)."""
    reused, wrong = 0, []
    for i in range(20):
        old, new = os.path.join(mnt, f"a{i}"), os.path.join(mnt, f"b{i}")
        make(old)
        if os.path.islink(old):
            os.readlink(old)  # in the kernel's symlink cache now
        fd = os.open(old, os.O_PATH | os.O_NOFOLLOW)
        try:
            real_old = os.lstat(os.path.join(upper, f"a{i}")).st_ino
            held = os.fstat(fd).st_ino
            remove(old)
            make(new)
            if os.lstat(os.path.join(upper, f"b{i}")).st_ino != real_old:
                continue
            reused += 1
            if os.lstat(new).st_ino == held:
                wrong.append(f"b{i}: the number of the removed a{i}")
            if os.path.islink(new) and os.readlink(new) != f"target-of-b{i}":
                wrong.append(f"b{i}: target {os.readlink(new)!r}")
            if os.path.isdir(new):
                try:
                    open(os.path.join(new, "x"), "w").close()
                except OSError as e:
                    wrong.append(f"b{i}/x: {e.strerror}")
        finally:
            os.close(fd)
    return reused, wrong


@pytest.mark.parametrize(
    ("make", "remove"), [(_make_dir, os.rmdir), (_make_symlink, os.unlink)], ids=["dir", "symlink"]
)
def test_new_object_on_a_freed_number_is_not_the_removed_one(tmp_path, make, remove):
    """A removed upper object still held by the kernel (cwd, O_PATH) keeps its number;
    a new object the upper gives the same inode gets another (was: a new directory
    answered ENOENT to every create, a new symlink showed the old target)."""
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    with unionfs_mount([lower], upper, mnt):
        reused, wrong = _held_then_replaced(str(mnt), str(upper), make, remove)
        assert wrong == [], wrong
        assert sorted(os.listdir(mnt)) == sorted(f"b{i}" for i in range(20))
    if reused == 0:
        pytest.skip("the upper's filesystem gave no inode twice: nothing was exercised")


def test_removed_directory_held_open_is_not_its_successor(tmp_path):
    """fstat of a removed directory's descriptor answers its own last attributes with no
    link left (as the kernel does), and a change through it never reaches the directory
    that took its name (was: the new directory's attributes, and setxattr landed on it)."""
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "merged").mkdir(mode=0o750)
    with unionfs_mount([lower], upper, mnt):
        for name in ("new", "merged"):  # upper-only, and a lower directory (whiteout)
            d = mnt / name
            if name == "new":
                d.mkdir(mode=0o700)
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                mode = os.fstat(fd).st_mode
                d.rmdir()
                d.mkdir(mode=0o755)
                st = os.fstat(fd)
                assert (st.st_mode, st.st_nlink) == (mode, 0), name
                with pytest.raises(OSError):
                    os.setxattr(fd, "user.x", b"1")
                with pytest.raises(OSError):
                    os.fchmod(fd, 0o711)
            finally:
                os.close(fd)
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o755
            assert os.listxattr(d) == []


@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_renamed_lower_dir_leaves_no_whiteout_in_its_opaque_copy(tmp, unionfs, kernel_overlay, fmt):
    """A whiteout in a directory that becomes opaque hides nothing any more, and kernel
    overlayfs lists it (as a 0/0 device) in an opaque directory: the copy drops it.
    Found by the fuzzer (handover): a lower dir renamed after one of its files was removed."""
    lower, upper = tmp / "lower", tmp / "upper"
    (lower / "b" / "a").mkdir(parents=True)
    (lower / "b" / "a" / "f").write_text("f\n")
    (lower / "b" / "keep").write_text("keep\n")
    (lower / "a").mkdir()
    upper.mkdir()
    m = unionfs([lower], upper, opts=(f"whiteout={fmt}",))
    os.unlink(m.mnt / "b" / "a" / "f")
    os.rename(m.mnt / "b", m.mnt / "a")  # over an empty lower dir: the copy is opaque
    view = snapshot(m.mnt)
    m.close()
    assert sorted(view) == ["a", "a/a", "a/keep"], view
    assert sorted(os.listdir(upper / "a" / "a")) == ([".wh..wh..opq"] if fmt == "oci" else [])
    if fmt == "kernel":  # the same upper, mounted by the kernel
        k = kernel_overlay([lower], upper)
        assert snapshot(k.mnt) == view


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts kernel overlayfs")
def test_whiteouts_share_one_inode_as_the_kernel_makes_them(layers, tmp_path):
    """Kernel overlayfs' whiteout sharing: each whiteout of a remove is one more
    link of a char 0/0 device in the work dir, not a new inode, also over an
    upper copy (RENAME_EXCHANGE with a work-dir link); a rename away from a
    lower name leaves its own, made by RENAME_WHITEOUT in the same step.
    Nothing is left in the work dir after unmount, and the kernel reads the
    upper as unionfs showed it."""
    lower, upper, mnt = layers
    for name in ("a", "b", "c"):
        (lower / name).write_text(name)
    with unionfs_mount([lower], upper, mnt):
        (mnt / "gone").unlink()
        (mnt / "dir" / "x").unlink()
        (mnt / "a").write_text("copied up, then removed")
        (mnt / "a").unlink()
        (mnt / "b").rename(mnt / "b2")
        before = snapshot(mnt)
    work = tmp_path / ".upper.unionfs-work" / "work"
    assert os.listdir(work) == []
    sts = [os.lstat(p) for p in (upper / "gone", upper / "dir" / "x", upper / "a")]
    moved = os.lstat(upper / "b")
    assert all(markers.is_char_whiteout(st.st_mode, st.st_rdev) for st in [*sts, moved])
    assert len({st.st_ino for st in sts}) == 1 and sts[0].st_nlink == 3
    assert set(before) == {"c", "b2", "data", "dir"}
    kwork = tmp_path / "kwork"
    kwork.mkdir()
    kmnt = tmp_path / "kmnt"
    kmnt.mkdir()
    with kernel_overlay([lower], upper, kwork, kmnt):
        assert snapshot(kmnt) == before
