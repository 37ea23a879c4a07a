"""A file opened for reading before it is copied up reads the copy afterwards.

Kernel overlayfs (4.19 and later) reads through the upper file as soon as one
exists, whatever layer a descriptor was opened on: a reader that opened a
lower file sees what a writer wrote after copying it up, and so does every
later open.  Kernel overlayfs is the oracle; each scenario runs with the C
session helper (READ answered from the handle's descriptor) and without.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from support import helper_opts


def _readers_see_the_writers(mnt: Path) -> dict[str, bytes]:
    """Readers opened on lower files, then changes that copy each file up."""
    seen: dict[str, bytes] = {}
    changes: dict[str, Callable[[Path], None]] = {
        "written": lambda p: _write_at(p, b"NEW", 0, os.O_WRONLY),
        "appended": lambda p: _write_at(p, b"+tail", None, os.O_WRONLY | os.O_APPEND),
        "truncated": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)),
        "chmod then written": lambda p: (os.chmod(p, 0o600), _write_at(p, b"NEW", 0, os.O_RDWR)),
    }
    for name, change in changes.items():
        path = mnt / "d" / name
        reader = os.open(path, os.O_RDONLY)
        try:
            seen[f"{name}: before"] = os.pread(reader, 64, 0)
            change(path)
            seen[f"{name}: same reader"] = os.pread(reader, 64, 0)
            seen[f"{name}: new open"] = path.read_bytes()
        finally:
            os.close(reader)
    return seen


def _write_at(path: Path, data: bytes, off: int | None, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        if off is None:
            os.write(fd, data)
        else:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def _layers(tmp: Path, side: str) -> tuple[Path, Path]:
    lower, upper = tmp / f"{side}-lower", tmp / f"{side}-upper"
    (lower / "d").mkdir(parents=True)
    upper.mkdir()
    for name in ("written", "appended", "truncated", "chmod then written"):
        (lower / "d" / name).write_bytes(b"old contents of the lower file\n")
    return lower, upper


def test_a_reader_opened_before_a_copy_up_reads_the_copy(tmp, unionfs, kernel_overlay, helper_mode):
    lower, upper = _layers(tmp, "k")
    want = _readers_see_the_writers(kernel_overlay([lower], upper).mnt)
    lower, upper = _layers(tmp, "u")
    got = _readers_see_the_writers(unionfs([lower], upper, opts=helper_opts(helper_mode)).mnt)
    assert got == want
    assert want["written: same reader"].startswith(b"NEW")
    assert want["truncated: same reader"] == b""


def test_with_metadata_only_copy_ups_the_reader_moves_when_the_data_comes(
    tmp, unionfs, kernel_overlay
):
    """-o metacopy=on: a chmod copies metadata only, the reader keeps the lower's data
    until a write copies it; then it reads the copy."""
    lower, upper = _layers(tmp, "k")
    want = _readers_see_the_writers(kernel_overlay([lower], upper, options=["metacopy=on"]).mnt)
    lower, upper = _layers(tmp, "u")
    got = _readers_see_the_writers(unionfs([lower], upper, opts=["metacopy=on"]).mnt)
    assert got == want
    assert want["chmod then written: same reader"].startswith(b"NEW")
