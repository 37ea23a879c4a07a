"""open(O_RDONLY|O_TRUNC) truncates when the caller may write, as on Linux (issue 15, item 2).

Linux truncates a regular file opened ``O_RDONLY|O_TRUNC`` (after checking write
permission), and kernel overlayfs copies a lower file up to do it.  unionfs
answered EINVAL: it dropped O_TRUNC from the real open and ftruncate'd the
read-only descriptor.  Each case (lower and upper files, new files with
O_CREAT, through symlinks; writable and not) is run by root and by an
unprivileged user on unionfs and on kernel overlayfs over the same layers, and
the answers, the sizes and what the upper holds afterwards must be the same.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from support import User, run_as

pytestmark = pytest.mark.oracle

RDTRUNC = os.O_RDONLY | os.O_TRUNC
#: (name opened, flags): lower files, upper files, new and existing names with
#: O_CREAT, and symlinks to lower and upper files.
CASES = [
    ("lower644", RDTRUNC),
    ("lower666", RDTRUNC),
    ("lower444", RDTRUNC),
    ("upper644", RDTRUNC),
    ("upper-mine444", RDTRUNC),
    ("new", RDTRUNC | os.O_CREAT),
    ("lower666-again", RDTRUNC | os.O_CREAT),
    ("link-lower644", RDTRUNC),
    ("link-lower666", RDTRUNC),
    ("link-upper644", RDTRUNC),
    ("lower666-rdwr", os.O_RDWR | os.O_TRUNC),
]


def build(base: Path, user: User) -> tuple[Path, Path]:
    """A root-owned lower and an upper with a root file and one of the user's."""
    lower, upper = base / "lower", base / "upper"
    lower.mkdir(parents=True)
    upper.mkdir()
    os.chmod(lower, 0o777)  # new names may be made by the user too
    os.chmod(upper, 0o777)  # the merged root shows the upper's mode
    for name, mode in (("lower644", 0o644), ("lower666", 0o666), ("lower444", 0o444)):
        (lower / name).write_bytes(b"lower data\n")
        os.chmod(lower / name, mode)
    (lower / "lower666-again").write_bytes(b"again\n")
    os.chmod(lower / "lower666-again", 0o666)
    (lower / "lower666-rdwr").write_bytes(b"rdwr\n")
    os.chmod(lower / "lower666-rdwr", 0o666)
    (upper / "upper644").write_bytes(b"upper data\n")
    (upper / "upper-mine444").write_bytes(b"mine\n")
    os.chown(upper / "upper-mine444", user.uid, user.gid)
    os.chmod(upper / "upper-mine444", 0o444)
    for link, target in (
        ("link-lower644", "lower644"),
        ("link-lower666", "lower666"),
        ("link-upper644", "upper644"),
    ):
        os.symlink(target, lower / link)
    return lower, upper


def attempt(root: str) -> dict[str, object]:
    """Per case: the errno name or the size seen through the new descriptor, and
    the size of the file afterwards."""
    out: dict[str, object] = {}
    for name, flags in CASES:
        path = os.path.join(root, name)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            got: object = errno.errorcode[e.errno or 0]
        else:
            got = os.fstat(fd).st_size
            os.close(fd)
        try:
            after: object = os.stat(path).st_size
        except OSError as e:
            after = errno.errorcode[e.errno or 0]
        out[name] = (got, after)
    return out


def upper_view(upper: Path) -> dict[str, int]:
    """Regular files in an upper and their sizes (what was copied up or created)."""
    return {p.name: p.stat().st_size for p in upper.iterdir() if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("mounter,caller", [("root", "root"), ("root", "user"), ("user", "user")])
def test_open_rdonly_trunc_matches_kernel(
    tmp, unpriv_user, unionfs, kernel_overlay, mounter, caller
):
    user = unpriv_user
    u_lower, u_upper = build(tmp / "u", user)
    k_lower, k_upper = build(tmp / "k", user)
    umnt = tmp / "u" / "mnt"
    umnt.mkdir()
    if mounter == "user":
        for p in (tmp / "u", u_upper, umnt):
            os.chown(p, user.uid, user.gid)
        for p in u_upper.iterdir():
            os.lchown(p, user.uid, user.gid)
        for p in k_upper.iterdir():  # the same owners on the oracle's side
            os.lchown(p, user.uid, user.gid)
    m = unionfs([u_lower], u_upper, umnt, user=user if mounter == "user" else None)
    k = kernel_overlay([k_lower], k_upper)
    who = user if caller == "user" else None
    got = run_as(who, attempt, str(m.mnt))
    want = run_as(who, attempt, str(k.mnt))
    assert got == want, {n: (got[n], want[n]) for n in got if got[n] != want[n]}
    assert upper_view(u_upper) == upper_view(k_upper)
    # Not vacuous: writable files were truncated, others refused and left alone.
    assert got["lower666"] == (0, 0) and got["link-lower666"] == (0, 0)
    assert got["new"] == (0, 0)
    if caller == "user":
        assert got["lower644"] == ("EACCES", len(b"lower data\n"))
        assert got["upper-mine444"] == ("EACCES", len(b"mine\n"))
        assert "lower644" not in upper_view(u_upper), "a refused open copies nothing up"
    else:
        assert got["lower444"] == (0, 0) and got["upper644"] == (0, 0)
