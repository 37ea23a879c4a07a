"""The lower stack a mount covers, recorded in its work directory.

Every tool that reads an upper on its own (``unionfs diff``, ``export-layer``,
``apply``) must know the lowers the upper was written against: is an upper
file added or changed, does an opaque directory really hide anything?  So a
mount writes ``<workdir>/stack.json`` when it starts: the absolute lower
paths (top-down, as ``lowerdir=``), the upper, and the marker format it
writes.  The file is replaced atomically (written aside, fsync'd, renamed),
so a reader sees the previous stack or the new one, never half a file.

Only the standard library is used: tools import this without the FUSE stack.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .options import MountConfig

#: The file's name inside the work directory.
STACK_FILE = "stack.json"
_VERSION = 1


class StackError(Exception):
    """A stack record that cannot be used (unreadable, malformed, relative paths)."""


@dataclass(frozen=True)
class StackInfo:
    """What a mount recorded: its lowers (top-down), upper and marker format."""

    lowers: tuple[str, ...]
    upper: str | None = None
    #: ``kernel`` or ``oci``: the format the mount wrote markers in.
    whiteout: str = "kernel"
    #: ``trusted.`` (mounted by root) or ``user.``: the namespace of its xattrs.
    xattr_ns: str = "user."

    def to_json(self) -> bytes:
        doc = {
            "version": _VERSION,
            "lowers": list(self.lowers),
            "upper": self.upper,
            "whiteout": self.whiteout,
            "xattr_ns": self.xattr_ns,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> StackInfo:
        """Parse a record; every field is checked, since it decides what a tool reads."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise StackError(f"not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("version") != _VERSION:
            raise StackError("unknown stack record version")
        lowers = doc.get("lowers")
        if not isinstance(lowers, list) or not all(isinstance(p, str) for p in lowers):
            raise StackError("'lowers' is not a list of paths")
        upper = doc.get("upper")
        if upper is not None and not isinstance(upper, str):
            raise StackError("'upper' is not a path")
        for p in [*lowers, *([upper] if upper else [])]:
            if not os.path.isabs(p):
                raise StackError(f"path {p!r} is not absolute")
        whiteout = doc.get("whiteout", "kernel")
        xattr_ns = doc.get("xattr_ns", "user.")
        if whiteout not in ("kernel", "oci") or xattr_ns not in ("trusted.", "user."):
            raise StackError("unknown marker format")
        return cls(tuple(lowers), upper, whiteout, xattr_ns)


def record(workdir: str, info: StackInfo, durable: bool = True) -> None:
    """Write ``info`` as ``<workdir>/stack.json``, atomically (and durably unless told not).

    ``durable=False`` is for ``-o volatile`` mounts, which make no sync at all.
    """
    data = info.to_json()
    dfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".{STACK_FILE}.{os.getpid()}"
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dfd,
        )
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, STACK_FILE, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        if durable:
            os.fsync(dfd)
    finally:
        os.close(dfd)


def record_mount(cfg: MountConfig, whiteout: str, ns: bytes) -> None:
    """The one call a mount makes (unionfs/cli.py): record what it is about to serve.

    ``whiteout`` is the format the mount writes (after its probe), ``ns`` its
    xattr namespace.  A ``-o volatile`` mount records without syncing.
    """
    assert cfg.workdir is not None and cfg.upper is not None
    lowers = tuple(os.path.abspath(p) for p in cfg.lowers)
    info = StackInfo(lowers, os.path.abspath(cfg.upper), whiteout, ns.decode())
    record(cfg.workdir, info, durable=not cfg.volatile)


def read(workdir: str) -> StackInfo | None:
    """The recorded stack, or None when the work dir has none (never mounted by us)."""
    try:
        with open(os.path.join(workdir, STACK_FILE), "rb") as f:
            data = f.read(1 << 20)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StackError(f"cannot read {workdir}/{STACK_FILE}: {e.strerror}") from None
    return StackInfo.from_json(data)
