"""``-o identities``: the identity of every lower object the upper replaced.

At each copy-up and each whiteout of a lower object, the daemon appends the
object's identity as it was then (device, inode, size, mtime and ctime in
ns, mode) under its merged path to ``WORKDIR/identities``.  ``unionfs
sandbox commit`` compares it with the live tree: a path whose live object is
not the one recorded was changed by someone else meanwhile, a conflict.

Format: one JSON object per line, appended with a single write (a line is
never torn by a crash; a lost last line makes commit see no record, which it
treats as a conflict whenever the live tree has the path).  Paths are
``os.fsdecode``'d bytes (undecodable bytes survive as surrogate escapes).
The first record of a path is the one that counts: later ones describe
objects the sandbox itself made.
"""

from __future__ import annotations

import json
import os
import stat as stat_mod
from dataclasses import dataclass

FILE = "identities"


@dataclass(frozen=True)
class Identity:
    """What identifies one version of an object: its inode and its change times."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        size = 0 if stat_mod.S_ISDIR(st.st_mode) else st.st_size
        return cls(st.st_dev, st.st_ino, size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)

    def same_object(self, st: os.stat_result | None) -> bool:
        """Is ``st`` still this version?  A directory's mtime and ctime change with
        its entries, whose own records are checked one by one: for a directory
        only the inode and mode count."""
        if st is None:
            return False
        other = Identity.of(st)
        if stat_mod.S_ISDIR(self.mode):
            return (other.dev, other.ino, other.mode) == (self.dev, self.ino, self.mode)
        return other == self


def encode(path: tuple[bytes, ...], st: os.stat_result) -> bytes:
    ident = Identity.of(st)
    rec = {"path": os.fsdecode(b"/".join(path)), **ident.__dict__}
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


class IdentityLog:
    """The daemon's writer: an O_APPEND descriptor, one write per record."""

    def __init__(self, workdir: str) -> None:
        self.fd = os.open(
            os.path.join(workdir, FILE),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
            0o600,
        )
        self._seen: set[tuple[bytes, ...]] = set()

    def record(self, path: tuple[bytes, ...], st: os.stat_result) -> None:
        if path in self._seen:
            return  # only the first counts; this mount already wrote it
        self._seen.add(path)
        os.write(self.fd, encode(path, st))


def load(workdir: str | os.PathLike[str]) -> dict[str, Identity]:
    """Merged path (``a/b``) -> the identity first recorded for it."""
    out: dict[str, Identity] = {}
    try:
        with open(os.path.join(workdir, FILE), "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
            path = rec.pop("path")
            ident = Identity(**rec)
        except (ValueError, TypeError, KeyError):
            continue  # a torn or foreign line: no record for it
        out.setdefault(path, ident)
    return out
