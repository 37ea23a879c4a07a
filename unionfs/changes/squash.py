"""``unionfs squash L1:L2:... -o OUT``: a range of layers flattened into one, fewest markers.

The result ``OUT`` stacked over any layers ``B`` shows what ``L1:L2:...``
over ``B`` showed.  It holds every visible entry of the range's merged view
(read through the filesystem core's merge rules, so in every marker format),
and only the markers that can still matter below the range:

- a directory is opaque only when the range cut it off from what lies below
  (an opaque marker, or a whiteout or non-directory under it in the range);
- a whiteout only for a name the range deletes and nobody in it re-creates,
  and never inside an opaque directory.

Hard links among the range's files stay hard links.  OUT is built in
``.OUT.partial-PID`` beside it and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import stat as stat_mod
import sys

from .. import markers, ownership
from ..layers import Entry, LayerStack
from ..markers import Opacity
from ..options import ConfigError, split_lowerdirs

Path = tuple[bytes, ...]


class SquashError(Exception):
    """A squash that cannot be done: one line."""


class Squasher:
    """Writes the flattened layer of ``layers`` (top-down) into the empty dir ``out``."""

    def __init__(self, layers: list[str], out: str, fmt: str, xattr_ns: bytes) -> None:
        self.stack = LayerStack(layers, None)
        self.out = out
        self.fmt = fmt
        self.opaque_xattr = xattr_ns + b"overlay.opaque"
        self.links: dict[tuple[int, int], bytes] = {}
        self.dir_times: list[tuple[bytes, os.stat_result]] = []
        self.entries = 0

    def close(self) -> None:
        self.stack.close()

    def _dst(self, path: Path) -> bytes:
        return os.path.join(os.fsencode(self.out), *path) if path else os.fsencode(self.out)

    def run(self) -> int:
        root = self.stack.root_entry()
        self._dir((), root)
        for dst, st in reversed(self.dir_times):
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return self.entries

    def _cut_below(self, path: Path, entry: Entry) -> bool:
        """Did the range cut this directory off from the layers below the range?"""
        assert entry.dir_layers is not None
        last = entry.dir_layers[-1]
        if self.stack.dir_opacity(last, path) is Opacity.OPAQUE:
            return True
        n = len(self.stack.layers)
        return any(
            self.stack.lstat(k, path[:-1], path[-1]) is not None
            or self.stack.has_oci_whiteout(k, path[:-1], path[-1])
            for k in range(last + 1, n)
        )

    def _whiteouts(self, path: Path, entry: Entry, visible: set[bytes]) -> set[bytes]:
        """Names some layer of this directory's chain deletes and none re-creates."""
        assert entry.dir_layers is not None
        gone: set[bytes] = set()
        for layer in entry.dir_layers:
            for name, _is_dir, special in self.stack.scandir(layer, path):
                target = markers.oci_whiteout_target(name)
                if target is not None:
                    gone.add(target)
                elif not markers.is_marker_name(name) and (special or layer in entry.xwh_layers):
                    st = self.stack.lstat(layer, path, name)
                    if st is not None and (
                        markers.is_char_whiteout(st.st_mode, st.st_rdev)
                        or (
                            layer in entry.xwh_layers
                            and markers.is_xattr_whiteout(
                                st.st_mode, st.st_size, self.stack.listxattr(layer, path, name)
                            )
                        )
                    ):
                        gone.add(name)
        return gone - visible

    def _dir(self, path: Path, entry: Entry) -> None:
        assert entry.dir_layers is not None
        dst = self._dst(path)
        if path:
            os.mkdir(dst, 0o700)
            self._meta(entry.layer, path, dst, entry.st)
        self.dir_times.append((dst, entry.st))
        opaque = bool(path) and self._cut_below(path, entry)
        if opaque:
            if self.fmt == "oci":
                with open(os.path.join(dst, markers.OPAQUE_NAME), "xb"):
                    pass
            else:
                os.setxattr(dst, self.opaque_xattr, b"y")
        visible = self.stack.merged_names(path, entry.dir_layers, entry.xwh_layers)
        if not opaque:
            for name in sorted(self._whiteouts(path, entry, {n for n, _, _ in visible})):
                if self.fmt == "oci":
                    with open(os.path.join(dst, markers.oci_whiteout_name(name)), "xb"):
                        pass
                else:
                    os.mknod(os.path.join(dst, name), stat_mod.S_IFCHR, 0)
                self.entries += 1
        for name, _layer, _is_dir in sorted(visible):
            child = self.stack.lookup(path, entry.dir_layers, entry.xwh_layers, name)
            if child is None:
                continue
            self.entries += 1
            if child.is_dir:
                self._dir((*path, name), child)
            else:
                self._nondir((*path, name), child)

    def _nondir(self, path: Path, entry: Entry) -> None:
        st = entry.st
        dst = self._dst(path)
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:
            os.link(self.links[key], dst, follow_symlinks=False)
            return
        dir_fd = self.stack.dirfd(entry.layer, path[:-1])
        if stat_mod.S_ISREG(st.st_mode):
            src = os.open(path[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                with open(dst, "xb") as out:
                    shutil.copyfileobj(os.fdopen(os.dup(src), "rb"), out, 1 << 20)
            finally:
                os.close(src)
        elif stat_mod.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path[-1], dir_fd=dir_fd), dst)
        else:
            os.mknod(dst, st.st_mode, st.st_rdev)
        self._meta(entry.layer, path, dst, st)
        if not stat_mod.S_ISLNK(st.st_mode):
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        if st.st_nlink > 1:
            self.links[key] = dst

    def _meta(self, layer: int, path: Path, dst: bytes, st: os.stat_result) -> None:
        with contextlib.suppress(PermissionError):
            os.lchown(dst, st.st_uid, st.st_gid)
        if stat_mod.S_ISLNK(st.st_mode):
            return
        os.chmod(dst, stat_mod.S_IMODE(st.st_mode))
        for x in self.stack.listxattr(layer, path[:-1], path[-1]):
            if markers.is_private_xattr(x):
                continue
            value = self.stack.getxattr(layer, path[:-1], path[-1], x)
            if value is not None:
                with contextlib.suppress(PermissionError, OSError):
                    os.setxattr(dst, x, value, follow_symlinks=False)


def squash(layers: list[str], out: str, fmt: str = "kernel", xattr_ns: bytes | None = None) -> int:
    """Flatten ``layers`` (top-down) into the new directory ``out``; returns its entry count."""
    if fmt not in ("kernel", "oci"):
        raise SquashError(f"unknown format {fmt!r} (kernel, oci)")
    if os.path.lexists(out):
        raise SquashError(f"{out}: exists")
    if xattr_ns is None:
        xattr_ns = ownership.marker_xattr_ns()
    parent, base = os.path.split(os.path.abspath(out))
    tmp = os.path.join(parent, f".{base}.partial-{os.getpid()}")
    os.mkdir(tmp, 0o755)
    s = Squasher(layers, tmp, fmt, xattr_ns)
    try:
        n = s.run()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        s.close()
    return n


def main(prog: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Flatten a range of layers (top-down) into one new layer dir."
    )
    parser.add_argument("layers", metavar="L1:L2:...")
    parser.add_argument("-o", "--output", required=True, help="the new layer directory")
    parser.add_argument("--format", choices=("kernel", "oci"), default="kernel")
    args = parser.parse_args(argv)
    try:
        layers = split_lowerdirs(args.layers)
        for p in layers:
            if not os.path.isdir(p):
                raise SquashError(f"{p}: not a directory")
        n = squash(layers, args.output, args.format)
    except (SquashError, ConfigError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: {os.fsdecode(e.filename or args.output)}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"{args.output}: {n} entries", file=sys.stderr)
    return 0
