"""Requests dispatched from C (unionfs/_dispatch.c) and through pyfuse3 (``-o nofastpath``).

Both modes must give every program the same answers: the same entries,
attributes, link targets, xattr values and sizes, and the same errnos.  With
the helper on, the request types it dispatches are counted as answered in C
(``unionfs stats``); a handler whose slow path waits (a copy-up) still
completes, through pyfuse3; and an unexpected exception in a handler called
from C is logged and answered EIO, as ``_guard`` does, while the daemon goes on.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import textwrap
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

from unionfs import operations, stats

from support import errno_of, helper_opts, unionfs_mount

try:
    from unionfs import _dircache  # type: ignore[attr-defined]
except ImportError:
    _dircache = None

DISPATCHED = (
    "lookup",
    "getattr",
    "readlink",
    "open",
    "release",
    "opendir",
    "releasedir",
    "getxattr",
    "listxattr",
    "forget",
)

_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def mode(helper_mode: str) -> str:
    return helper_mode


_opts = helper_opts


def _layers(tmp: Path) -> tuple[Path, Path, Path]:
    lower, upper, mnt = tmp / "lower", tmp / "upper", tmp / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir(parents=True)
    (lower / "d" / "sub").mkdir(parents=True)
    (lower / "d" / "f").write_bytes(b"lower file\n")
    (lower / "d" / "sub" / "g").write_bytes(b"g" * 5000)
    os.symlink("f", lower / "d" / "link")
    os.symlink("/nowhere/" + "x" * 200, lower / "d" / "longlink")
    os.setxattr(lower / "d" / "f", "user.colour", b"blue")
    os.setxattr(lower / "d" / "f", "user.big", b"v" * 300)
    (upper / "u").write_bytes(b"upper file\n")
    return lower, upper, mnt


def _counts(mnt: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(requests by type, of which answered in C) from ``unionfs stats``."""
    raw = json.loads(os.getxattr(mnt, stats.XATTR))
    total = {name: sum(b.values()) for name, b in raw["requests"].items()}
    return total, raw.get("in_c", {})


def _getxattr_size(path: Path, name: bytes, size: int) -> tuple[int, int]:
    """lgetxattr with a buffer of ``size`` bytes: (return value, errno)."""
    buf = ctypes.create_string_buffer(max(size, 1))
    r = _libc.lgetxattr(os.fsencode(path), name, buf if size else None, size)
    return r, ctypes.get_errno() if r < 0 else 0


def _listxattr_size(path: Path, size: int) -> tuple[int, int]:
    buf = ctypes.create_string_buffer(max(size, 1))
    r = _libc.llistxattr(os.fsencode(path), buf if size else None, size)
    return r, ctypes.get_errno() if r < 0 else 0


def _observe(mnt: Path) -> dict[str, object]:
    """What a program sees of the tree: entries, attributes, contents, xattrs, errnos."""
    seen: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(mnt):
        for name in sorted(dirs + files):
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(mnt))
            seen[rel] = (st.st_mode, st.st_size, st.st_nlink, st.st_uid, st.st_gid)
            if p.is_symlink():
                seen[rel + ":target"] = os.readlink(p)
            elif p.is_file():
                seen[rel + ":data"] = p.read_bytes()
                seen[rel + ":xattrs"] = sorted(
                    (n, os.getxattr(p, n)) for n in os.listxattr(p) if n.startswith("user.")
                )
    f = mnt / "d" / "f"
    seen["missing"] = errno_of(lambda: (mnt / "d" / "nope").lstat())
    seen["under-file"] = errno_of(lambda: (mnt / "d" / "f" / "x").lstat())
    seen["no-xattr"] = errno_of(lambda: os.getxattr(f, "user.absent"))
    seen["xattr-size"] = _getxattr_size(f, b"user.big", 0)
    seen["xattr-small"] = _getxattr_size(f, b"user.big", 10)
    seen["xattr-exact"] = _getxattr_size(f, b"user.big", 300)
    seen["list-size"] = _listxattr_size(f, 0)
    seen["list-small"] = _listxattr_size(f, 3)
    seen["dir-as-file"] = errno_of(lambda: os.open(mnt / "d", os.O_WRONLY))
    seen["file-as-dir"] = errno_of(lambda: os.listdir(mnt / "d" / "f"))
    return seen


def test_programs_see_the_same_in_both_modes(tmp_path):
    if _dircache is None:
        pytest.skip("the C session helper is not built")
    seen = {}
    for mode in ("fastpath", "nofastpath"):
        lower, upper, mnt = _layers(tmp_path / mode)
        with unionfs_mount([lower], upper, mnt, _opts(mode)):
            seen[mode] = _observe(mnt)
            # A shell and ls, over every entry (lookups, getattrs, xattrs, readlinks).
            ls = subprocess.run(
                ["ls", "-lRa", "--time-style=+"], cwd=mnt, capture_output=True, check=True
            ).stdout
            seen[mode]["ls"] = ls
    assert seen["fastpath"] == seen["nofastpath"]
    assert seen["fastpath"]["missing"] == errno.ENOENT
    assert seen["fastpath"]["under-file"] == errno.ENOTDIR
    assert seen["fastpath"]["no-xattr"] == errno.ENODATA
    assert seen["fastpath"]["xattr-size"] == (300, 0)
    assert seen["fastpath"]["xattr-small"] == (-1, errno.ERANGE)
    assert seen["fastpath"]["xattr-exact"] == (300, 0)
    assert seen["fastpath"]["list-small"] == (-1, errno.ERANGE)
    assert seen["fastpath"]["dir-as-file"] == errno.EISDIR
    assert seen["fastpath"]["file-as-dir"] == errno.ENOTDIR
    assert seen["fastpath"]["d/longlink:target"] == "/nowhere/" + "x" * 200


def test_dispatched_requests_are_counted_where_they_were_answered(tmp_path, mode):
    lower, upper, mnt = _layers(tmp_path)
    with unionfs_mount([lower], upper, mnt, _opts(mode)):
        _observe(mnt)
        # Drop the kernel's entries so that FORGETs come.
        subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=False)
        total, in_c = _counts(mnt)
    for name in ("lookup", "getattr", "readlink", "open", "release", "opendir", "releasedir"):
        assert total.get(name, 0) > 0, name
        if mode == "fastpath":
            assert in_c.get(name) == total[name], name
        else:
            assert in_c.get(name, 0) == 0, name
    for name in ("getxattr", "listxattr"):
        assert total.get(name, 0) > 0, name
        assert (in_c.get(name, 0) > 0) == (mode == "fastpath"), name


def test_a_handler_that_waits_goes_on_through_pyfuse3(tmp_path, mode):
    """An open for writing (a coroutine: it may copy up) completes, counted in Python."""
    lower, upper, mnt = _layers(tmp_path)
    with unionfs_mount([lower], upper, mnt, _opts(mode)):
        before_total, before_c = _counts(mnt)
        for i in range(5):
            with open(mnt / "d" / "f", "ab") as f:
                f.write(b"%d" % i)
            assert (mnt / "d" / "f").read_bytes() == b"lower file\n" + b"01234"[: i + 1]
        with open(mnt / "d" / "sub" / "g", "r+b") as f:
            f.write(b"G")
        total, in_c = _counts(mnt)
        assert (upper / "d" / "f").read_bytes() == b"lower file\n01234"
        assert (upper / "d" / "sub" / "g").read_bytes() == b"G" + b"g" * 4999
        assert (lower / "d" / "f").read_bytes() == b"lower file\n"
    opens = total["open"] - before_total.get("open", 0)
    opens_in_c = in_c.get("open", 0) - before_c.get("open", 0)
    assert opens == 11
    # The six opens for writing went through pyfuse3; the five for reading were
    # answered in C (all eleven in Python without the helper).
    assert opens_in_c == (5 if mode == "fastpath" else 0)


_FAULT = textwrap.dedent(
    """
    import logging, os
    from unionfs import operations

    logging.getLogger("unionfs.operations").addHandler(
        logging.FileHandler(os.environ["UNIONFS_TEST_LOG"])
    )
    _names = operations.UnionOperations._xattr_names

    def _xattr_names(self, node):
        if node.name == b"boom":
            raise ZeroDivisionError("injected by test_dispatch")
        return _names(self, node)

    operations.UnionOperations._xattr_names = _xattr_names
    """
)


def test_an_unexpected_exception_is_logged_and_answered_eio(tmp_path, mode, monkeypatch):
    lower, upper, mnt = _layers(tmp_path)
    (lower / "boom").write_bytes(b"x")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FAULT)
    log = tmp_path / "daemon.log"
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("UNIONFS_TEST_LOG", str(log))
    with unionfs_mount([lower], upper, mnt, _opts(mode)):
        assert errno_of(lambda: os.getxattr(mnt / "boom", "user.x")) == errno.EIO
        assert errno_of(lambda: os.listxattr(mnt / "boom")) == errno.EIO
        # The daemon goes on serving.
        assert (mnt / "d" / "f").read_bytes() == b"lower file\n"
        assert os.getxattr(mnt / "d" / "f", "user.colour") == b"blue"
        _, in_c = _counts(mnt)
    text = log.read_text()
    assert "unexpected error in getxattr" in text
    assert "unexpected error in listxattr" in text
    assert "ZeroDivisionError: injected by test_dispatch" in text
    assert (in_c.get("getxattr", 0) > 0) == (mode == "fastpath")


_ENTRY_FIELDS = (
    "st_ino",
    "generation",
    "entry_timeout",
    "attr_timeout",
    "st_mode",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_rdev",
    "st_size",
    "st_blksize",
    "st_blocks",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
)

_u32 = st_.integers(0, 2**32 - 1)
_ns = st_.integers(-(2**62), 2**62)


@settings(max_examples=300, deadline=None)
@given(
    mode=_u32,
    uid=_u32,
    gid=_u32,
    size=st_.integers(0, 2**63 - 1),
    times=st_.tuples(_ns, _ns, _ns),
    blocks=st_.integers(0, 2**62),
    rdev=st_.integers(0, 2**64 - 1),
    ino=st_.integers(1, 2**64 - 1),
    nlink=_u32,
    blksize=st_.integers(0, 2**31 - 1),
    timeouts=st_.tuples(st_.floats(0, 1e9), st_.floats(0, 1e9)),
)
def test_replies_made_in_c_carry_what_python_would(
    mode, uid, gid, size, times, blocks, rdev, ino, nlink, blksize, timeouts
):
    """``entry_attributes`` (C) and ``_entry_py``: the same EntryAttributes, field by field."""
    if _dircache is None:
        pytest.skip("the C session helper is not built")
    ops = types.SimpleNamespace()
    assert operations.UnionOperations.entry_in_c(ops, _dircache)
    probe = os.stat_result(tuple(range(os.stat_result.n_fields)))
    values = [0] * os.stat_result.n_fields
    named = {
        "st_mode": mode,
        "st_uid": uid,
        "st_gid": gid,
        "st_size": size,
        "st_atime_ns": times[0],
        "st_mtime_ns": times[1],
        "st_ctime_ns": times[2],
        "st_blocks": blocks,
        "st_rdev": rdev,
    }
    for name, value in named.items():
        values[getattr(probe, name)] = value
    st = os.stat_result(values)
    args = (st, ino, nlink, blksize, *timeouts)
    made_in_c, made_in_python = ops._entry(*args), operations._entry_py(*args)
    for field in _ENTRY_FIELDS:
        assert getattr(made_in_c, field) == getattr(made_in_python, field), field


def test_entry_attributes_refuses_what_is_not_a_stat_result():
    if _dircache is None:
        pytest.skip("the C session helper is not built")
    ops = types.SimpleNamespace()
    assert operations.UnionOperations.entry_in_c(ops, _dircache)
    with pytest.raises(TypeError):
        ops._entry(tuple(range(19)), 1, 1, 4096, 1.0, 1.0)
    with pytest.raises(TypeError):
        ops._entry(os.stat("/"), 1, 1)
    with pytest.raises(OverflowError):
        ops._entry(os.stat("/"), -1, 1, 4096, 1.0, 1.0)
