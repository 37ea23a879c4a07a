"""``-o identities``: each lower object the upper replaces is recorded as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unionfs import identity

import support


def _workload(mnt: Path) -> None:
    with open(mnt / "f", "a") as f:  # copy-up of a file
        f.write("more\n")
    os.unlink(mnt / "gone")  # whiteout of a lower file never copied up
    os.rename(mnt / "old", mnt / "new")  # copy-up, then whiteout of the old name
    os.chmod(mnt / "d", 0o700)  # copy-up of a directory
    for name in os.listdir(mnt / "tree"):
        os.unlink(mnt / "tree" / name)
    os.rmdir(mnt / "tree")  # rm -rf: each child, then the directory
    (mnt / "fresh").write_text("new\n")  # nothing replaced: no record


@pytest.mark.parametrize("who", ["root", "user"])
def test_replaced_lower_objects_are_recorded(who: str, tmp: Path, unionfs, request) -> None:
    user = request.getfixturevalue("unpriv_user") if who == "user" else None
    lower, upper, work, mnt = (tmp / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    for name in ("f", "gone", "old"):
        (lower / name).write_text(f"{name}\n")
    (lower / "d").mkdir()
    (lower / "tree").mkdir()
    (lower / "tree" / "a").write_text("a\n")
    (lower / "tree" / "b").write_text("b\n")
    if user is not None:
        support.chown_tree(tmp, user.uid, user.gid)
    before = {
        p: identity.Identity.of(os.lstat(lower / p))
        for p in ("f", "gone", "old", "d", "tree", "tree/a", "tree/b")
    }
    m = unionfs([lower], upper, mnt, opts=["identities", f"workdir={work}"], user=user)
    support.run_as(user, _workload, mnt)
    m.close()
    got = identity.load(work)
    assert got == before
    # What is recorded is what the lower still holds: nothing changed it.
    for p, ident in got.items():
        assert ident.same_object(os.lstat(lower / p))
    os.utime(lower / "f", ns=(1, 1))
    assert not got["f"].same_object(os.lstat(lower / "f"))
    assert not got["gone"].same_object(None)


def test_load_skips_torn_lines(tmp: Path) -> None:
    st = os.lstat(tmp)
    (tmp / identity.FILE).write_bytes(
        identity.encode((b"a", b"\xff"), st) + b'{"path": "x", "dev"' + b"\n" + b"junk\n"
    )
    got = identity.load(tmp)
    assert list(got) == [os.fsdecode(b"a/\xff")]
    assert got[os.fsdecode(b"a/\xff")] == identity.Identity.of(st)
