"""Metadata-only copy-up, kernel overlayfs' ``metacopy=on`` format (issue 15, item 4).

With ``-o metacopy=on`` (root mounts), chmod, chown, utimes and setxattr of a
lower regular file put only its metadata in the upper: a sparse file of the
lower's size marked ``trusted.overlay.metacopy``; the data is copied on the
first open for writing, a truncation to a non-zero size, or a rename.  The
daemon reads such files (its own, after a remount, and kernel overlayfs'),
kernel overlayfs with ``metacopy=on`` reads the ones unionfs wrote, and a
rootless mount refuses the option (the kernel cannot read metacopy there).
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from unionfs import check

from support import unionfs_command

pytestmark = pytest.mark.root

MARK = "trusted.overlay.metacopy"
SIZE = 3 << 20  # above the threaded-copy threshold


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lower(base: Path) -> Path:
    lower = base / "lower"
    lower.mkdir()
    for name in ("chmod", "chown", "utime", "xattr", "append", "trunc", "rdwr", "otrunc", "mv"):
        (lower / name).write_bytes((name.encode() * (SIZE // len(name) + 1))[:SIZE])
    (lower / "dir").mkdir()
    (lower / "dir" / "deep").write_bytes(bytes(range(256)) * (SIZE // 256))
    (lower / "linked").write_bytes(b"linked" * 1000)
    os.link(lower / "linked", lower / "hardlink")  # hard-linked: always copied whole
    return lower


def _is_metacopy(path: Path) -> bool:
    try:
        os.getxattr(path, MARK, follow_symlinks=False)
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return False
    return True


def _data_blocks_free(path: Path) -> bool:
    """A metacopy upper holds no data: (almost) no blocks for a multi-MiB size."""
    st = path.stat()
    return st.st_size == SIZE and st.st_blocks * 512 < SIZE // 8


def test_metadata_changes_copy_metadata_only(tmp, unionfs):
    lower = _lower(tmp)
    upper = tmp / "upper"
    upper.mkdir()
    want = {p.name: _sha(p) for p in lower.iterdir() if p.is_file()}
    m = unionfs([lower], upper, opts=("metacopy=on",))
    mnt = m.mnt
    os.chmod(mnt / "chmod", 0o600)
    os.chown(mnt / "chown", 1234, 5678)
    os.utime(mnt / "utime", (1_000_000_000, 1_000_000_000))
    os.setxattr(mnt / "xattr", "user.note", b"hello")
    os.chmod(mnt / "dir" / "deep", 0o640)
    os.chmod(mnt / "hardlink", 0o444)
    for name in ("chmod", "chown", "utime", "xattr"):
        assert _is_metacopy(upper / name) and _data_blocks_free(upper / name), name
        assert _sha(mnt / name) == want[name], f"{name}: reads the lower's data"
    assert _is_metacopy(upper / "dir" / "deep")
    assert _sha(mnt / "dir" / "deep") == _sha(lower / "dir" / "deep")
    assert not _is_metacopy(upper / "hardlink"), "hard links are copied whole"
    assert os.stat(mnt / "chmod").st_mode & 0o7777 == 0o600
    assert (os.stat(mnt / "chown").st_uid, os.stat(mnt / "chown").st_gid) == (1234, 5678)
    assert os.stat(mnt / "utime").st_mtime == 1_000_000_000
    assert os.stat(mnt / "utime").st_size == SIZE
    assert os.getxattr(mnt / "xattr", "user.note") == b"hello"

    # The data comes up on the first write, truncation to non-zero, open for writing, rename.
    for name in ("append", "trunc", "rdwr", "otrunc", "mv"):
        os.chmod(mnt / name, 0o666)
        assert _is_metacopy(upper / name)
    with open(mnt / "append", "ab") as f:
        f.write(b"END")
    os.truncate(mnt / "trunc", 10)
    os.close(os.open(mnt / "rdwr", os.O_RDWR))
    os.close(os.open(mnt / "otrunc", os.O_WRONLY | os.O_TRUNC))
    os.rename(mnt / "mv", mnt / "moved")
    expect = {
        "append": (lower / "append").read_bytes() + b"END",
        "trunc": (lower / "trunc").read_bytes()[:10],
        "rdwr": (lower / "rdwr").read_bytes(),
        "otrunc": b"",
        "moved": (lower / "mv").read_bytes(),
    }
    for name, data in expect.items():
        assert not _is_metacopy(upper / name), name
        assert (upper / name).read_bytes() == data, f"{name}: the upper holds the data"
        assert (mnt / name).read_bytes() == data, name
        assert os.stat(upper / name).st_mode & 0o777 == 0o666, f"{name}: metadata kept"
    m.close()

    # A later mount (metacopy off: reading never depends on the option) reads them.
    m = unionfs([lower], upper)
    for name in ("chmod", "chown", "utime", "xattr"):
        assert _sha(m.mnt / name) == want[name], name
    assert os.stat(m.mnt / "chmod").st_mode & 0o7777 == 0o600
    with open(m.mnt / "chown", "r+b") as f:
        f.write(b"X")
    assert not _is_metacopy(upper / "chown")
    assert (upper / "chown").read_bytes() == b"X" + (lower / "chown").read_bytes()[1:]
    m.close()
    assert check.main([str(upper)]) == check.OK, "unionfs-check knows the marker"


def test_metacopy_off_copies_data(tmp, unionfs):
    """The default: a chmod copies the data, no marker (any kernel mount reads the upper)."""
    lower = _lower(tmp)
    upper = tmp / "upper"
    upper.mkdir()
    m = unionfs([lower], upper)
    os.chmod(m.mnt / "chmod", 0o600)
    assert not _is_metacopy(upper / "chmod")
    assert (upper / "chmod").read_bytes() == (lower / "chmod").read_bytes()


@pytest.mark.oracle
def test_kernel_reads_what_unionfs_wrote(tmp, unionfs, kernel_overlay):
    lower = _lower(tmp)
    upper = tmp / "upper"
    upper.mkdir()
    m = unionfs([lower], upper, opts=("metacopy=on",))
    os.chmod(m.mnt / "chmod", 0o600)
    os.chown(m.mnt / "dir" / "deep", 42, 43)
    m.close()
    k = kernel_overlay([lower], upper, options=("metacopy=on",))
    assert os.stat(k.mnt / "chmod").st_mode & 0o7777 == 0o600
    assert _sha(k.mnt / "chmod") == _sha(lower / "chmod")
    st = os.stat(k.mnt / "dir" / "deep")
    assert (st.st_uid, st.st_gid, st.st_size) == (42, 43, SIZE)
    assert _sha(k.mnt / "dir" / "deep") == _sha(lower / "dir" / "deep")
    k.close()
    # Why metacopy is off by default: a kernel mount without metacopy=on refuses the file.
    k = kernel_overlay([lower], upper)
    with pytest.raises(OSError) as e:
        os.stat(k.mnt / "chmod")
    assert e.value.errno in (errno.EPERM, errno.EIO)


@pytest.mark.oracle
def test_unionfs_reads_what_the_kernel_wrote(tmp, unionfs, kernel_overlay):
    """Kernel overlayfs (metacopy=on) chmods files, and renames one (it then records a
    redirect); unionfs reads their data from the lower, and copies it up on write."""
    lower = _lower(tmp)
    upper = tmp / "upper"
    upper.mkdir()
    k = kernel_overlay([lower], upper, options=("metacopy=on",))
    os.chmod(k.mnt / "chmod", 0o600)
    os.chmod(k.mnt / "dir" / "deep", 0o640)
    os.chmod(k.mnt / "mv", 0o600)
    os.rename(k.mnt / "mv", k.mnt / "dir" / "moved")
    k.close()
    assert _is_metacopy(upper / "chmod") and _is_metacopy(upper / "dir" / "moved")
    assert any(x.endswith("overlay.redirect") for x in os.listxattr(upper / "dir" / "moved"))
    m = unionfs([lower], upper)
    assert os.stat(m.mnt / "chmod").st_mode & 0o7777 == 0o600
    assert _sha(m.mnt / "chmod") == _sha(lower / "chmod")
    assert _sha(m.mnt / "dir" / "deep") == _sha(lower / "dir" / "deep")
    assert _sha(m.mnt / "dir" / "moved") == _sha(lower / "mv"), "the redirect is followed"
    with open(m.mnt / "dir" / "moved", "ab") as f:
        f.write(b"!")
    assert (upper / "dir" / "moved").read_bytes() == (lower / "mv").read_bytes() + b"!"
    assert not _is_metacopy(upper / "dir" / "moved")


def test_rootless_mount_refuses_metacopy(tmp, unpriv_user):
    """A rootless upper keeps full copy-up: the kernel cannot read user.* metacopy."""
    from support import as_user

    for d in ("l", "u", "m"):
        (tmp / d).mkdir()
        os.chown(tmp / d, unpriv_user.uid, unpriv_user.gid)
    r = subprocess.run(
        [*unionfs_command(), "-o", "metacopy=on", str(tmp / "l"), str(tmp / "u"), str(tmp / "m")],
        capture_output=True,
        text=True,
        preexec_fn=as_user(unpriv_user),
    )
    assert r.returncode == 2 and "metacopy=on needs a root mount" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1 and not os.listdir(tmp / "u")
    r = subprocess.run(
        [*unionfs_command(), "-o", "metacopy=yes", "l", "u", "m"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "metacopy= takes on or off" in r.stderr, r


def test_check_validates_the_marker(tmp):
    upper = tmp / "upper"
    upper.mkdir()
    (upper / "good").write_bytes(b"")
    os.setxattr(upper / "good", MARK, b"")
    (upper / "bad").write_bytes(b"")
    os.setxattr(upper / "bad", MARK, b"\x01\x02")
    (upper / "dir").mkdir()
    os.setxattr(upper / "dir", MARK, b"")
    problems = {Path(p.path).name: p.what for p in check.check_upper(str(upper))}
    assert set(problems) == {"bad", "dir"}, problems
    assert check.markers.valid_metacopy_value(bytes([0, 36, 1, 1]) + b"d" * 32)


def _sequence(mnt: Path) -> dict[str, str]:
    """Metadata changes on lower files, then every way their data is needed or moved;
    the errno (or ok) of each step."""
    steps = [
        ("chmod", lambda: os.chmod(mnt / "chmod", 0o640)),
        ("chown", lambda: os.chown(mnt / "chown", 11, 12)),
        ("utime", lambda: os.utime(mnt / "utime", ns=(10**18, 10**18))),
        ("setxattr", lambda: os.setxattr(mnt / "xattr", "user.k", b"v")),
        ("chmod deep", lambda: os.chmod(mnt / "dir" / "deep", 0o600)),
        ("chmod hardlink", lambda: os.chmod(mnt / "hardlink", 0o600)),
        *[(f"chmod {n}", lambda n=n: os.chmod(mnt / n, 0o666)) for n in ("append", "trunc", "mv")],
        ("append", lambda: (mnt / "append").open("ab").write(b"tail")),
        ("truncate", lambda: os.truncate(mnt / "trunc", 4096)),
        ("rename", lambda: os.rename(mnt / "mv", mnt / "dir" / "mv2")),
        ("link", lambda: os.link(mnt / "chown", mnt / "chown-link")),
        ("rename dir", lambda: os.rename(mnt / "dir", mnt / "dir2")),
        ("unlink", lambda: os.unlink(mnt / "utime")),
    ]
    out = {}
    for name, step in steps:
        try:
            step()
            out[name] = "ok"
        except OSError as e:
            out[name] = errno.errorcode[e.errno or 0]
    return out


@pytest.mark.oracle
def test_metacopy_view_matches_kernel_metacopy(tmp, unionfs, kernel_overlay):
    """The same sequence on unionfs and kernel overlayfs, both metacopy=on: the same
    answers and the same merged view (modes, owners, sizes, data, xattrs, links), also
    after a remount, and with the upper unionfs wrote handed to the kernel."""
    from support import diff_snapshots, snapshot

    (tmp / "u").mkdir()
    (tmp / "k").mkdir()
    u_lower, k_lower = _lower(tmp / "u"), _lower(tmp / "k")
    (tmp / "u" / "upper").mkdir()
    (tmp / "k" / "upper").mkdir()
    m = unionfs([u_lower], tmp / "u" / "upper", opts=("metacopy=on",))
    k = kernel_overlay([k_lower], tmp / "k" / "upper", options=("metacopy=on",))
    assert _sequence(m.mnt) == _sequence(k.mnt)
    want = snapshot(k.mnt)
    diff = diff_snapshots(want, snapshot(m.mnt), ("kernel", "unionfs"))
    assert not diff, "\n".join(diff)
    m.close()
    m = unionfs([u_lower], tmp / "u" / "upper")
    diff = diff_snapshots(want, snapshot(m.mnt), ("kernel", "unionfs after remount"))
    assert not diff, "\n".join(diff)
    m.close()
    # Hard links are left out of the hand-over: their copy lives in unionfs' index.
    work = tmp / "u" / "kwork"
    work.mkdir()
    h = kernel_overlay([u_lower], tmp / "u" / "upper", work, options=("metacopy=on",))
    got = {p: v for p, v in snapshot(h.mnt).items() if "link" not in p}
    diff = diff_snapshots({p: v for p, v in want.items() if "link" not in p}, got)
    assert not diff, "\n".join(diff)
