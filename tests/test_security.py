"""Nothing in a branch or in the merged view can turn the daemon against its user."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
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


# --------------------------------------------------------------------------- other users


def _attempts(mnt: str) -> dict[str, str]:
    """What an unprivileged user tries on a root mount: each call's errno name or "ok"."""

    def p(rel: str) -> str:
        return os.path.join(mnt, rel)

    def create(rel: str) -> None:
        os.close(os.open(p(rel), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))

    def read(rel: str) -> bytes:
        with open(p(rel), "rb") as f:
            return f.read()

    tries = {
        "read 0600 file": lambda: read("secret"),
        "read 0644 file": lambda: read("public"),
        "open 0644 file for writing": lambda: os.close(os.open(p("public"), os.O_WRONLY)),
        "truncate 0644 file": lambda: os.truncate(p("public"), 0),
        "chmod another's file": lambda: os.chmod(p("public"), 0o666),
        "chown to self": lambda: os.chown(p("public"), os.getuid(), os.getgid()),
        "set user xattr on another's file": lambda: os.setxattr(p("public"), "user.x", b"1"),
        "utime another's file": lambda: os.utime(p("public"), (1, 1)),
        "list 0700 dir": lambda: os.listdir(p("private")),
        "stat in 0700 dir": lambda: os.stat(p("private/inner")),
        "create in 0755 dir": lambda: create("rodir/new"),
        "mkdir in 0755 dir": lambda: os.mkdir(p("rodir/sub")),
        "unlink in 0755 dir": lambda: os.unlink(p("rodir/file")),
        "rename in 0755 dir": lambda: os.rename(p("rodir/file"), p("rodir/moved")),
        "rmdir 0755 dir": lambda: os.rmdir(p("rodir/empty")),
        "symlink in 0755 dir": lambda: os.symlink("x", p("rodir/link")),
        "link into 0755 dir": lambda: os.link(p("tmp/shared"), p("rodir/hard")),
        "unlink another's file in sticky dir": lambda: os.unlink(p("tmp/roots")),
        "create in sticky dir": lambda: create("tmp/mine"),
        "hard link to another's file": lambda: os.link(p("public"), p("tmp/hard")),
        "write to a 0666 file": lambda: os.truncate(p("tmp/shared"), 1),
    }
    out = {}
    for what, fn in tries.items():
        try:
            fn()
            out[what] = "ok"
        except OSError as e:
            out[what] = errno.errorcode[e.errno]
    return out


def _build_shared_lower(root: Path) -> None:
    root.mkdir()
    (root / "secret").write_text("root only\n")
    os.chmod(root / "secret", 0o600)
    (root / "public").write_text("for all\n")
    (root / "private").mkdir(mode=0o700)
    (root / "private" / "inner").write_text("x")
    (root / "rodir").mkdir()
    (root / "rodir" / "file").write_text("x")
    (root / "rodir" / "empty").mkdir()
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "tmp" / "roots").write_text("x")
    (root / "tmp" / "shared").write_text("xx")
    os.chmod(root / "tmp" / "shared", 0o666)


def _upper_paths(upper: Path) -> list[str]:
    return sorted(
        str(Path(d, n).relative_to(upper)) for d, ds, fs in os.walk(upper) for n in ds + fs
    )


def test_root_mount_keeps_other_users_to_their_rights(tmp, unpriv_user, unionfs, kernel_overlay):
    """Mounted by root (allow_other + default_permissions), a second user gets exactly the
    kernel overlayfs answers: no reading a 0600 file, no writing a read-only directory, the
    sticky bit kept; and nothing it was refused leaves a trace in the upper."""
    from support import run_as

    for side in ("u", "k"):
        _build_shared_lower(tmp / f"{side}-lower")
        (tmp / f"{side}-upper").mkdir()
    m = unionfs([tmp / "u-lower"], tmp / "u-upper")
    k = kernel_overlay([tmp / "k-lower"], tmp / "k-upper")
    got = run_as(unpriv_user, _attempts, str(m.mnt))
    want = run_as(unpriv_user, _attempts, str(k.mnt))
    assert got == want, {n: (got[n], want[n]) for n in got if got[n] != want[n]}
    refused = {
        "read 0600 file",
        "open 0644 file for writing",
        "truncate 0644 file",
        "list 0700 dir",
        "stat in 0700 dir",
        "create in 0755 dir",
        "mkdir in 0755 dir",
        "unlink in 0755 dir",
        "rename in 0755 dir",
        "rmdir 0755 dir",
        "symlink in 0755 dir",
        "link into 0755 dir",
    }
    assert {n: got[n] for n in refused} == dict.fromkeys(refused, "EACCES")
    for n in (
        "chmod another's file",
        "chown to self",
        "utime another's file",
        "unlink another's file in sticky dir",
        "hard link to another's file",
    ):
        assert got[n] == "EPERM", n
    assert got["read 0644 file"] == "ok" and got["create in sticky dir"] == "ok"
    assert got["write to a 0666 file"] == "ok"
    assert (
        _upper_paths(tmp / "u-upper")
        == _upper_paths(tmp / "k-upper")
        == [
            "tmp",
            "tmp/mine",
            "tmp/shared",
        ]
    )
    assert os.stat(tmp / "u-upper" / "tmp" / "mine").st_uid == unpriv_user.uid
    assert stat.S_IMODE(os.stat(tmp / "u-upper" / "tmp").st_mode) == 0o1777


# --------------------------------------------------------------------------- ACLs and umask


def _acl_session(mnt: str) -> dict[str, object]:
    """As the mounter (root): new objects under umask 0, 022, 077 and under a default ACL."""
    out: dict[str, object] = {}
    old = os.umask(0)
    try:
        for mask in (0, 0o022, 0o077):
            os.umask(mask)
            f = os.path.join(mnt, f"file-{mask:o}")
            os.close(os.open(f, os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(os.path.join(mnt, f"dir-{mask:o}"), 0o777)
            out[f"file-{mask:o}"] = oct(os.stat(f).st_mode)
            out[f"dir-{mask:o}"] = oct(os.stat(os.path.join(mnt, f"dir-{mask:o}")).st_mode)
        os.umask(0o077)
        inherit = os.path.join(mnt, "inherit")
        os.mkdir(inherit, 0o755)
        subprocess.run(["setfacl", "-d", "-m", "u:nobody:rwx", inherit], check=True)
        os.close(os.open(os.path.join(inherit, "f"), os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(os.path.join(inherit, "d"), 0o777)
        for n in ("f", "d"):
            p = os.path.join(inherit, n)
            out[f"inherit/{n}"] = oct(os.stat(p).st_mode)
            acl = subprocess.run(["getfacl", "-c", "-n", p], capture_output=True, text=True)
            out[f"inherit/{n} acl"] = acl.stdout
    finally:
        os.umask(old)
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        return errno.errorcode[e.errno]


@pytest.mark.skipif(shutil.which("setfacl") is None, reason="setfacl (package acl) missing")
def test_acls_and_umask_as_the_kernel(tmp, unpriv_user, unionfs, kernel_overlay):
    """An ACL on a lower file grants access through the mount (mode bits alone would
    refuse it); new objects get the caller's umask, or the parent's default ACL instead,
    exactly as on kernel overlayfs."""
    import subprocess as sp

    from support import run_as

    mounts = []
    for side in ("u", "k"):
        lower = tmp / f"{side}-lower"
        lower.mkdir()
        (lower / "granted").write_text("by an ACL\n")
        os.chmod(lower / "granted", 0o600)
        sp.run(["setfacl", "-m", f"u:{unpriv_user.uid}:r", str(lower / "granted")], check=True)
        (tmp / f"{side}-upper").mkdir()
        if side == "u":
            mounts.append(unionfs([lower], tmp / "u-upper"))
        else:
            mounts.append(kernel_overlay([lower], tmp / "k-upper"))
    got, want = (run_as(unpriv_user, _read, str(m.mnt / "granted")) for m in mounts)
    assert got == want == "by an ACL\n"
    got, want = (_acl_session(str(m.mnt)) for m in mounts)
    assert got == want
    assert got["file-0"] == oct(0o100666) and got["file-77"] == oct(0o100600)
    assert "user:65534:rwx" in str(got["inherit/f acl"])


def _over_whiteouts(mnt: str) -> dict[str, str]:
    """Under a default ACL and umask 077: a file and a directory made where lower ones
    were deleted (built in the work dir and swapped in for the whiteout)."""
    d = os.path.join(mnt, "d")
    subprocess.run(["setfacl", "-d", "-m", "u:nobody:rwx", d], check=True)
    os.unlink(os.path.join(d, "f"))
    shutil.rmtree(os.path.join(d, "sub"))
    out: dict[str, str] = {}
    old = os.umask(0o077)
    try:
        os.close(os.open(os.path.join(d, "f"), os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(os.path.join(d, "sub"), 0o777)
    finally:
        os.umask(old)
    for n in ("f", "sub"):
        p = os.path.join(d, n)
        acl = subprocess.run(["getfacl", "-c", "-n", p], capture_output=True, text=True)
        out[n] = f"{oct(os.stat(p).st_mode)}\n{acl.stdout}"
    return out


@pytest.mark.skipif(shutil.which("setfacl") is None, reason="setfacl (package acl) missing")
def test_objects_made_over_whiteouts_inherit_the_default_acl(tmp, unionfs, kernel_overlay):
    """The parent's default ACL (and its umask rule) applies to an object that replaces
    a whiteout as to any other new object, as on kernel overlayfs."""
    mounts = []
    for side in ("u", "k"):
        lower = tmp / f"{side}-lower"
        (lower / "d" / "sub").mkdir(parents=True)
        (lower / "d" / "f").write_text("lower\n")
        (lower / "d" / "sub" / "g").write_text("lower\n")
        (tmp / f"{side}-upper").mkdir()
        if side == "u":
            mounts.append(unionfs([lower], tmp / "u-upper"))
        else:
            mounts.append(kernel_overlay([lower], tmp / "k-upper"))
    got, want = (_over_whiteouts(str(m.mnt)) for m in mounts)
    assert got == want
    assert "user:65534:rwx" in got["f"] and "default:user:65534:rwx" in got["sub"]
    work = tmp / ".u-upper.unionfs-work"
    assert work.is_dir()
    # No building directory or object left behind: only the whiteout that whiteouts
    # are linked to (kernel overlayfs' shared whiteout) may stay while mounted.
    left = [
        os.path.join(top, n)
        for top, dirs, files in os.walk(work)
        for n in dirs + files
        if n.startswith("#")
    ]
    kinds = [(stat.S_ISCHR(st.st_mode), st.st_rdev) for st in map(os.lstat, left)]
    assert all(kind == (True, 0) for kind in kinds), left
