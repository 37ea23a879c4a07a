"""The mount table as the kernel shows it (/proc/self/mountinfo), parsed once, here.

The Python API finds its own mount by mount ID, the layer tools find what is
mounted at a path; both need the same fields with the kernel's octal escapes
(``\\040`` for a space) undone.  Standard library only: tools that never mount
import this.
"""

from __future__ import annotations

import os
from typing import NamedTuple


class MountEntry(NamedTuple):
    """One line of mountinfo: the fields the tools use."""

    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    super_options: str


def unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, ``\\134`` for a backslash)."""
    if "\\" not in field:
        return field
    raw = os.fsencode(field)
    out = bytearray()
    i = 0
    while i < len(raw):
        octal = raw[i + 1 : i + 4]
        if raw[i : i + 1] == b"\\" and len(octal) == 3 and octal.isdigit():
            out.append(int(octal, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def parse_line(line: str) -> MountEntry | None:
    """One mountinfo line (optional fields end at `` - ``); None if malformed."""
    left, sep, right = line.partition(" - ")
    fields, tail = left.split(" "), right.split(" ")
    if not sep or len(fields) < 5 or len(tail) < 3 or not fields[0].isdigit():
        return None
    return MountEntry(
        int(fields[0]), unescape(fields[4]), tail[0], unescape(tail[1]), unescape(tail[2])
    )


def entries() -> list[MountEntry]:
    """Every mount this process sees, in the kernel's order (a later one stacks on top)."""
    with open("/proc/self/mountinfo", "rb") as f:
        text = f.read().decode(errors="surrogateescape")
    return [e for e in map(parse_line, text.splitlines()) if e is not None]


def at(path: str) -> list[MountEntry]:
    """The mounts whose mount point is exactly ``path``, bottom first."""
    return [e for e in entries() if e.mountpoint == path]
