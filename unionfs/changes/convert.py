"""``unionfs convert --to kernel|oci|fuse-overlayfs DIR``: a layer's markers in another format.

Layers come from several tools, each writing whiteouts and opaque markers
its own way (docs/markers.md); unionfs reads them all, but kernel overlayfs,
Docker or fuse-overlayfs each read only some.  This rewrites every marker of
one layer directory in place:

| to | whiteout | opaque directory |
|---|---|---|
| ``kernel`` | char 0/0 | ``trusted.overlay.opaque=y`` (``user.``: ``--userxattr``, rootless) |
| ``oci`` | empty file ``.wh.NAME`` | empty file ``.wh..wh..opq`` |
| ``fuse-overlayfs`` | char 0/0 | ``user.fuseoverlayfs.opaque=y`` |

Each marker changes atomically and in an order where the layer means the same
at every moment: the new marker is made first (a device built aside and
renamed in, a file created, an xattr set), then the old one goes.  So an
interrupted run leaves a valid layer, and a rerun finishes the job.  The
directory is walked with descriptors, one component at a time, never
following a symlink.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat as stat_mod
import sys
from dataclasses import dataclass

from .. import markers, ownership
from ..markers import Opacity
from ..syscalls import RENAME_NOREPLACE, renameat2

Path = tuple[bytes, ...]
FORMATS = ("kernel", "oci", "fuse-overlayfs")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_XATTR = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)


class ConvertError(Exception):
    """A marker that cannot be written in the asked format: one line."""


@dataclass(frozen=True)
class Conversion:
    """One marker rewritten: where, and from which format to which."""

    path: str
    what: str


def _show(path: Path) -> str:
    return "/" + b"/".join(path).decode("utf-8", "backslashreplace")


def _xpath(fd: int, name: bytes | None = None) -> bytes:
    return b"/proc/self/fd/%d" % fd + (b"" if name is None else b"/" + name)


def _listx(fd: int, name: bytes | None = None) -> list[bytes]:
    try:
        # The magic link itself must be followed to reach the directory.
        path = _xpath(fd, name)
        return [os.fsencode(x) for x in os.listxattr(path, follow_symlinks=name is None)]
    except OSError as e:
        if e.errno in _NO_XATTR:
            return []
        raise


def _getx(fd: int, x: bytes) -> bytes | None:
    try:
        return os.getxattr(_xpath(fd), x)
    except OSError as e:
        if e.errno in _NO_XATTR:
            return None
        raise


class Converter:
    """Rewrites the markers of one layer directory into format ``to``."""

    def __init__(self, root: str, to: str, xattr_ns: bytes, dry_run: bool = False) -> None:
        if to not in FORMATS:
            raise ConvertError(f"unknown format {to!r} ({', '.join(FORMATS)})")
        self.root = root
        self.to = to
        self.dry_run = dry_run
        self.opaque_xattr = (
            b"user.fuseoverlayfs.opaque" if to == "fuse-overlayfs" else xattr_ns + b"overlay.opaque"
        )
        self.done: list[Conversion] = []
        self._tmp = b".#ucv.%d" % os.getpid()

    def run(self) -> list[Conversion]:
        try:
            fd = os.open(self.root, _DIR)
        except OSError as e:
            raise ConvertError(f"{self.root}: {e.strerror}") from None
        stack: list[tuple[Path, int]] = [((), fd)]
        try:
            while stack:
                path, fd = stack.pop()
                try:
                    stack.extend(self._dir(path, fd))
                finally:
                    os.close(fd)
        finally:
            for _, fd in stack:
                os.close(fd)
        return self.done

    def _note(self, path: Path, what: str) -> None:
        self.done.append(Conversion(_show(path), what))

    def _dir(self, path: Path, fd: int) -> list[tuple[Path, int]]:
        names = sorted(os.fsencode(n) for n in os.listdir(fd))
        xnames = _listx(fd)
        opacity = markers.opacity_from_xattrs(xnames, lambda x: _getx(fd, x))
        oci_opaque = markers.OPAQUE_NAME in names
        present = set(names)
        subdirs: list[tuple[Path, int]] = []
        had_xattr_whiteouts = False
        for name in names:
            if name == markers.OPAQUE_NAME or name.startswith(b".wh..wh."):
                continue  # the opaque marker, handled below; AUFS meta names (side table)
            target = markers.oci_whiteout_target(name)
            if markers.is_marker_name(name):
                if target is None or b"/" in target:
                    raise ConvertError(f"{_show((*path, name))}: an invalid .wh. name")
                if self.to != "oci":
                    self._oci_to_char(path, fd, name, target, present)
                continue
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if markers.is_char_whiteout(st.st_mode, st.st_rdev):
                if self.to == "oci":
                    self._char_to_oci(path, fd, name)
                continue
            if opacity is Opacity.HAS_XATTR_WHITEOUTS and markers.is_xattr_whiteout(
                st.st_mode, st.st_size, _listx(fd, name)
            ):
                had_xattr_whiteouts = True
                if self.to == "oci":
                    self._char_to_oci(path, fd, name)
                else:
                    self._xattr_to_char(path, fd, name)
                continue
            if stat_mod.S_ISDIR(st.st_mode):
                subdirs.append(((*path, name), os.open(name, _DIR, dir_fd=fd)))
        if opacity is Opacity.OPAQUE or oci_opaque:
            self._opaque(path, fd, xnames, oci_opaque)
        elif had_xattr_whiteouts and not self.dry_run:
            for x in markers.OPAQUE_XATTRS:  # "x": no xattr whiteouts are left to announce
                if x in xnames and (_getx(fd, x) or b"")[:1] == b"x":
                    os.removexattr(_xpath(fd), x)
        return subdirs

    # -- whiteouts -------------------------------------------------------------------

    def _mknod_at(self, fd: int, name: bytes, replace: bool) -> None:
        """A char 0/0 at ``name``, built aside and renamed in (atomic)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp, dir_fd=fd)
        try:
            os.mknod(self._tmp, stat_mod.S_IFCHR, 0, dir_fd=fd)
        except PermissionError:
            raise ConvertError("cannot create char 0/0 whiteouts here (Linux < 5.8?)") from None
        if replace:
            os.rename(self._tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        else:
            renameat2(fd, self._tmp, fd, name, RENAME_NOREPLACE)

    def _oci_to_char(self, path: Path, fd: int, name: bytes, target: bytes, present: set) -> None:
        self._note((*path, target), "whiteout: .wh. file -> char 0/0")
        if self.dry_run:
            return
        if target in present:
            st = os.stat(target, dir_fd=fd, follow_symlinks=False)
            if not markers.is_char_whiteout(st.st_mode, st.st_rdev):
                # The name is in this layer too: the whiteout hides nothing (the name wins).
                os.unlink(name, dir_fd=fd)
                return
        else:
            self._mknod_at(fd, target, replace=False)
        os.unlink(name, dir_fd=fd)

    def _xattr_to_char(self, path: Path, fd: int, name: bytes) -> None:
        self._note((*path, name), "whiteout: xattr -> char 0/0")
        if not self.dry_run:
            self._mknod_at(fd, name, replace=True)

    def _char_to_oci(self, path: Path, fd: int, name: bytes) -> None:
        self._note((*path, name), "whiteout -> .wh. file")
        if len(name) > 255 - len(markers.WHITEOUT_PREFIX):
            raise ConvertError(f"{_show((*path, name))}: too long a name for a .wh. whiteout")
        if self.dry_run:
            return
        wh = markers.oci_whiteout_name(name)
        with contextlib.suppress(FileExistsError):
            os.close(
                os.open(wh, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600, dir_fd=fd)
            )
        os.unlink(name, dir_fd=fd)

    # -- opaque directories ----------------------------------------------------------

    def _opaque(self, path: Path, fd: int, xnames: list[bytes], oci_opaque: bool) -> None:
        want_file = self.to == "oci"
        stale = [x for x in markers.OPAQUE_XATTRS if x in xnames and x != self.opaque_xattr]
        if want_file:
            stale = [x for x in markers.OPAQUE_XATTRS if x in xnames]
        has_want = oci_opaque if want_file else (_getx(fd, self.opaque_xattr) or b"")[:1] == b"y"
        if has_want and not stale and (want_file or not oci_opaque):
            return
        self._note(path, f"opaque -> {'.wh..wh..opq' if want_file else self.opaque_xattr.decode()}")
        if self.dry_run:
            return
        if want_file:
            with contextlib.suppress(FileExistsError):
                os.close(
                    os.open(
                        markers.OPAQUE_NAME,
                        os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW,
                        0o600,
                        dir_fd=fd,
                    )
                )
        else:
            os.setxattr(_xpath(fd), self.opaque_xattr, b"y")
            if oci_opaque:
                os.unlink(markers.OPAQUE_NAME, dir_fd=fd)
        for x in stale:
            with contextlib.suppress(OSError):
                os.removexattr(_xpath(fd), x)


def convert(
    root: str, to: str, xattr_ns: bytes | None = None, dry_run: bool = False
) -> list[Conversion]:
    """Rewrite every marker under ``root`` into format ``to``; returns what changed."""
    if xattr_ns is None:
        xattr_ns = ownership.marker_xattr_ns()
    return Converter(root, to, xattr_ns, dry_run).run()


def main(prog: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Rewrite a layer directory's whiteout and opaque markers."
    )
    parser.add_argument("dir", metavar="DIR")
    parser.add_argument("--to", required=True, choices=FORMATS)
    parser.add_argument(
        "--userxattr",
        action="store_true",
        help="kernel format in user.overlay.* (default when not root)",
    )
    parser.add_argument("--dry-run", "-n", action="store_true", help="print, change nothing")
    args = parser.parse_args(argv)
    ns = b"user." if args.userxattr else ownership.marker_xattr_ns()
    try:
        done = convert(args.dir, args.to, ns, args.dry_run)
    except ConvertError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: {os.fsdecode(e.filename or args.dir)}: {e.strerror}", file=sys.stderr)
        return 1
    for c in done:
        print(f"{'would convert' if args.dry_run else 'converted'} {c.path}: {c.what}")
    return 0
