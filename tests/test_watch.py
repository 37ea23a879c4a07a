"""``-o live``: changes other processes make in a lower show through the mount.

Every check polls with a bounded wait (the change must show, how fast is not
asserted); the same checks run as root and as the unprivileged user.
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from unionfs import watch

import support


def _eventually(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``check`` until true; an error in it (ESTALE from a name the kernel
    still holds for a moment after it went from the lower) counts as not yet."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return check()


def _read(p: Path) -> str | None:
    try:
        return p.read_text()
    except OSError:
        return None


def _names(p: Path) -> list[str] | None:
    try:
        return sorted(os.listdir(p))
    except OSError:
        return None


Mount = tuple[Path, Path, Path, "support.User | None"]


@pytest.fixture(params=["root", "user"])
def live_mount(request: pytest.FixtureRequest, tmp: Path, unionfs) -> Mount:
    user = request.getfixturevalue("unpriv_user") if request.param == "user" else None
    lower, upper, mnt = tmp / "lower", tmp / "upper", tmp / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "f").write_text("one\n")
    (lower / "kept").write_text("lower\n")
    (lower / "d").mkdir()
    (lower / "d" / "g").write_text("g\n")
    (lower / "d" / "h").write_text("h\n")
    if user is not None:
        support.chown_tree(tmp, user.uid, user.gid)
    unionfs([lower], upper, mnt, opts=["live"], user=user)
    return lower, upper, mnt, user


def test_lower_changes_show_through_the_mount(live_mount: Mount) -> None:
    """Another process changes the lower (as the mount's owner, who alone can
    read a rootless mount): each change shows through."""
    *paths, user = live_mount
    support.run_as(user, _changes_show, *paths)


def _changes_show(lower: Path, upper: Path, mnt: Path) -> None:
    # The view reads everything first, so the kernel and the daemon cache it.
    assert _read(mnt / "f") == "one\n"
    assert _names(mnt / "d") == ["g", "h"]
    assert not (mnt / "new").exists()
    assert _read(mnt / "d" / "g") == "g\n"

    # Changed in place (same inode, same size, then another size).
    with open(lower / "f", "r+") as f:
        f.write("two\n")
    assert _eventually(lambda: _read(mnt / "f") == "two\n")
    (lower / "f").write_text("three, longer\n")
    assert _eventually(lambda: _read(mnt / "f") == "three, longer\n")
    # Replaced by a rename over it (a new inode).
    (lower / "f.tmp").write_text("four\n")
    os.rename(lower / "f.tmp", lower / "f")
    assert _eventually(lambda: _read(mnt / "f") == "four\n")

    # Created: a name the kernel had cached as missing.
    (lower / "new").write_text("new\n")
    assert _eventually(lambda: _read(mnt / "new") == "new\n")
    # Removed and renamed in a directory whose listing was read.
    (lower / "d" / "g").unlink()
    os.rename(lower / "d" / "h", lower / "d" / "h2")
    assert _eventually(lambda: _names(mnt / "d") == ["h2"])
    assert _eventually(lambda: not os.path.lexists(mnt / "d" / "g"))
    assert _read(mnt / "d" / "h2") == "h\n"
    # A directory removed and made again with other contents.
    shutil.rmtree(lower / "d")
    assert _eventually(lambda: not os.path.lexists(mnt / "d"))
    (lower / "d").mkdir()
    (lower / "d" / "x").write_text("x\n")
    assert _eventually(lambda: _names(mnt / "d") == ["x"])
    # chmod shows (attributes).
    os.chmod(lower / "new", 0o600)
    assert _eventually(lambda: (mnt / "new").stat().st_mode & 0o777 == 0o600)


def test_copied_up_file_keeps_the_upper(live_mount: Mount) -> None:
    *paths, user = live_mount
    support.run_as(user, _upper_wins, *paths)


def _upper_wins(lower: Path, upper: Path, mnt: Path) -> None:
    (mnt / "kept").write_text("mine\n")  # copy-up
    (lower / "kept").write_text("changed outside\n")
    (lower / "marker").write_text("m\n")  # an event after it, to know the first was seen
    assert _eventually(lambda: _read(mnt / "marker") == "m\n")
    assert _read(mnt / "kept") == "mine\n"
    assert (upper / "kept").read_text() == "mine\n"
    # A name removed through the mount stays removed when the lower changes it.
    os.unlink(mnt / "f")
    (lower / "f").write_text("again\n")
    (lower / "marker2").write_text("m\n")
    assert _eventually(lambda: _read(mnt / "marker2") == "m\n")
    assert not (mnt / "f").exists()


def test_parse_and_coalesce() -> None:
    def ev(wd: int, mask: int, name: bytes) -> bytes:
        padded = name + b"\0" * (16 - len(name)) if name else b""
        return struct.pack("iIII", wd, mask, 0, len(padded)) + padded

    data = (
        ev(1, watch.IN_MODIFY, b"a")
        + ev(1, watch.IN_CLOSE_WRITE, b"a")
        + ev(2, watch.IN_IGNORED, b"")
    )
    events = list(watch.parse_events(data))
    assert events == [
        (1, watch.IN_MODIFY, b"a"),
        (1, watch.IN_CLOSE_WRITE, b"a"),
        (2, watch.IN_IGNORED, b""),
    ]
    assert watch.coalesce(iter(events)) == {
        (1, b"a"): watch.IN_MODIFY | watch.IN_CLOSE_WRITE,
        (2, b""): watch.IN_IGNORED,
    }
