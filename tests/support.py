"""Helpers for mounted tests: snapshots, layer builders, and mounts that always end.

Plain functions and context managers, no pytest, usable from a shell too:

- ``snapshot``/``diff_snapshots``: what a user can observe under a directory,
  and readable differences between two such views.
- ``make_layers``: lower layers written from a small description (files,
  directories, symlinks, fifos, sockets, devices, hard links, whiteouts,
  opaque directories) in any marker format: kernel (char 0/0 whiteouts,
  ``trusted.overlay.opaque``), rootless kernel (``user.overlay.opaque``), OCI
  (``.wh.NAME``, ``.wh..wh..opq``), fuse-overlayfs (``user.fuseoverlayfs.opaque``)
  and xattr whiteouts (``overlay.whiteout`` files in ``overlay.opaque=x`` dirs).
  ``convert_layer`` rewrites a layer on disk into what kernel overlayfs reads.
- ``kernel_overlay`` and ``unionfs_mount``: mounts undone on every exit path
  (``umount``, then ``umount -l``; ``fusermount3 -u``, then ``-uz``), and a
  daemon started here is stopped by its PID (SIGKILL as the last resort).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

PathLike = os.PathLike[str] | str
Snapshot = dict[str, tuple]

#: The fields of one snapshot entry, in order (names for ``exclude=``).
FIELDS = ("mode", "size", "sha256", "target", "rdev", "xattrs", "nlink", "uid", "gid")

#: xattr name prefixes that belong to a union filesystem, never to the user.
MARKER_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
#: The marker xattrs a lower layer may carry (all hidden from a merged view).
MARKER_XATTRS = (
    "trusted.overlay.opaque",
    "trusted.overlay.whiteout",
    "user.overlay.opaque",
    "user.overlay.whiteout",
    "user.fuseoverlayfs.opaque",
)
OCI_WHITEOUT_PREFIX = b".wh."
OCI_OPAQUE = b".wh..wh..opq"


# --------------------------------------------------------------------------- snapshots


def _xattrs(path: bytes, prefixes: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        if name.startswith(prefixes):
            with contextlib.suppress(OSError):
                out.append((name, os.getxattr(path, name, follow_symlinks=False)))
    return tuple(out)


def _sha256(path: bytes) -> str:
    """The content's sha256, or ``error:ENAME`` when it cannot be read (as on both sides)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        return f"error:{errno.errorcode.get(e.errno or 0, e.errno)}"
    return h.hexdigest()


def _entry(path: bytes, st: os.stat_result, prefixes: tuple[str, ...]) -> tuple:
    is_dir = stat.S_ISDIR(st.st_mode)
    is_dev = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
    return (
        stat.filemode(st.st_mode),  # type character and all twelve mode bits
        None if is_dir else st.st_size,
        _sha256(path) if stat.S_ISREG(st.st_mode) else None,
        os.readlink(path) if stat.S_ISLNK(st.st_mode) else None,
        st.st_rdev if is_dev else 0,
        _xattrs(path, prefixes),
        None if is_dir else st.st_nlink,
        st.st_uid,
        st.st_gid,
    )


def snapshot(
    root: PathLike | bytes,
    *,
    exclude: Collection[str] = (),
    xattr_prefixes: tuple[str, ...] = ("user.",),
    include_root: bool = False,
) -> Snapshot:
    """The whole view under ``root``: relative path -> what a user can observe.

    Each entry is a tuple in ``FIELDS`` order: ``stat.filemode`` (the type
    character and every mode bit, e.g. ``-rwsr-xr-x``), size (None for
    directories), sha256 of a regular file's content, symlink target (bytes),
    rdev of device nodes (0 otherwise), the sorted ``(name, value)`` pairs of
    the xattrs whose names start with one of ``xattr_prefixes`` (user.* by
    default), link count (None for directories, whose count differs between
    any two filesystems), uid, gid.  Fields named in ``exclude`` are None.
    Times and inode numbers are never part of it (see ``inode_map``).

    Walked with os.scandir and lstat, never following a symlink; names are
    taken as bytes and keyed by ``os.fsdecode`` (undecodable bytes become
    surrogates, so ``os.fsencode(key)`` gives the name back).  The root itself
    is included under the key ``"."`` when ``include_root`` is set.
    """
    unknown = set(exclude) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown snapshot fields {sorted(unknown)}; known: {FIELDS}")
    drop = [i for i, name in enumerate(FIELDS) if name in exclude]
    base = os.fsencode(root)
    out: Snapshot = {}
    if include_root:
        out["."] = _entry(base, os.lstat(base), xattr_prefixes)
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(base, rel) if rel else base) as it:
            entries = [os.fsencode(e.name) for e in it]
        for raw in entries:
            name = os.path.join(rel, raw) if rel else raw
            path = os.path.join(base, name)
            st = os.lstat(path)
            out[os.fsdecode(name)] = _entry(path, st, xattr_prefixes)
            if stat.S_ISDIR(st.st_mode):
                stack.append(name)
    if drop:
        for key, value in out.items():
            out[key] = tuple(None if i in drop else v for i, v in enumerate(value))
    return out


def show_path(key: str | bytes) -> str:
    """A path key as printable text (repr of its bytes when it is not plain)."""
    raw = os.fsencode(key)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return repr(raw)
    return text if text.isprintable() else repr(raw)


def diff_snapshots(a: Snapshot, b: Snapshot, names: tuple[str, str] = ("a", "b")) -> list[str]:
    """Human-readable differences, for assertion messages (empty when equal).

    One line per path missing on a side, and one per field that differs.
    """
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if va is None or vb is None:
            missing, there = (names[0], vb) if va is None else (names[1], va)
            lines.append(f"{show_path(key)}: missing in {missing} (other side: {there})")
            continue
        fields = FIELDS if len(va) == len(FIELDS) == len(vb) else range(max(len(va), len(vb)))
        for i, fname in enumerate(fields):
            x = va[i] if i < len(va) else "<none>"
            y = vb[i] if i < len(vb) else "<none>"
            if x != y:
                lines.append(f"{show_path(key)}: {fname}: {names[0]}={x!r} {names[1]}={y!r}")
    return lines


def inode_map(root: PathLike | bytes) -> dict[bytes, tuple[int, int]]:
    """path (bytes, absolute) -> (st_ino from lstat, d_ino from readdir), every entry."""
    out: dict[bytes, tuple[int, int]] = {}
    stack = [os.fsencode(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            entries = [(e.path, e.inode()) for e in it]
        for path, d_ino in entries:
            st = os.lstat(path)
            out[path] = (st.st_ino, d_ino)
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
    return out


# --------------------------------------------------------------------------- layer builders

Name = str | bytes


@dataclass(frozen=True)
class File:
    """A regular file (str data is UTF-8 encoded)."""

    data: bytes | str = b""
    mode: int = 0o644
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Dir:
    """A directory; ``opaque`` hides the same directory in the layers below."""

    children: Mapping[Name, Node] = field(default_factory=dict)
    opaque: bool = False
    mode: int = 0o755
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Symlink:
    target: str | bytes


@dataclass(frozen=True)
class Fifo:
    mode: int = 0o644


@dataclass(frozen=True)
class Socket:
    """A unix socket inode (made with mknod S_IFSOCK, as bind would leave it)."""

    mode: int = 0o755


@dataclass(frozen=True)
class Device:
    """A device node (needs root): char by default, ``block=True`` for a block device."""

    major: int
    minor: int
    block: bool = False
    mode: int = 0o666


@dataclass(frozen=True)
class Hardlink:
    """Another name for the file at ``target``, a path relative to the layer root."""

    target: str | bytes


@dataclass(frozen=True)
class Whiteout:
    """Hides the name in the layers below (written in the layer's marker format)."""


Node = File | Dir | Symlink | Fifo | Socket | Device | Hardlink | Whiteout | str | bytes | dict
Layer = Mapping[Name, Node]


@dataclass(frozen=True)
class MarkerFormat:
    """How a layer spells whiteouts and opaque directories.

    ``whiteout``: ``char`` (0/0 device), ``oci`` (``.wh.NAME``), or an xattr name
    (zero-size file carrying it, parent marked ``opaque_x``).  ``opaque``: an
    xattr name set to ``y``, or ``oci`` (``.wh..wh..opq`` file).  ``userxattr``:
    kernel overlayfs reads this format only when mounted with ``-o userxattr``;
    ``kernel_readable``: whether kernel overlayfs reads it at all.
    """

    name: str
    whiteout: str
    opaque: str
    opaque_x: str | None = None
    userxattr: bool = False
    kernel_readable: bool = True


MARKER_FORMATS: dict[str, MarkerFormat] = {
    f.name: f
    for f in (
        MarkerFormat("kernel", "char", "trusted.overlay.opaque"),
        MarkerFormat("user-xattr", "char", "user.overlay.opaque", userxattr=True),
        MarkerFormat("oci", "oci", "oci", kernel_readable=False),
        MarkerFormat("fuse-overlayfs", "char", "user.fuseoverlayfs.opaque", kernel_readable=False),
        MarkerFormat(
            "xattr-whiteout",
            "trusted.overlay.whiteout",
            "trusted.overlay.opaque",
            opaque_x="trusted.overlay.opaque",
        ),
        MarkerFormat(
            "user-xattr-whiteout",
            "user.overlay.whiteout",
            "user.overlay.opaque",
            opaque_x="user.overlay.opaque",
            userxattr=True,
        ),
    )
}
#: A stack whose layers use every format in turn (as when layers come from several tools).
MIXED = "mixed"


def _fmt(fmt: str | MarkerFormat) -> MarkerFormat:
    return fmt if isinstance(fmt, MarkerFormat) else MARKER_FORMATS[fmt]


def layer_formats(fmt: str | Sequence[str], n: int) -> list[MarkerFormat]:
    """The format of each of ``n`` layers: one name for all, ``"mixed"``, or one per layer."""
    if isinstance(fmt, str) and fmt == MIXED:
        names = list(MARKER_FORMATS)
        return [MARKER_FORMATS[names[i % len(names)]] for i in range(n)]
    if isinstance(fmt, str):
        return [MARKER_FORMATS[fmt]] * n
    if len(fmt) != n:
        raise ValueError(f"{len(fmt)} formats for {n} layers")
    return [MARKER_FORMATS[f] for f in fmt]


def _node(value: Node) -> Node:
    if isinstance(value, str | bytes):
        return File(value)
    if isinstance(value, dict):
        return Dir(value)
    return value


def _set_owner_mode(path: bytes, node: File | Dir) -> None:
    if node.uid is not None or node.gid is not None:
        os.lchown(path, -1 if node.uid is None else node.uid, -1 if node.gid is None else node.gid)
    os.chmod(path, node.mode)  # after chown, which clears set-id bits


def write_layer(root: PathLike | bytes, layer: Layer, fmt: str | MarkerFormat = "kernel") -> Path:
    """Write one layer described by ``layer`` into the directory ``root`` (created).

    Plain ``str``/``bytes`` values are files and plain dicts are directories.
    Whiteouts inside an opaque directory are written as char 0/0 devices in
    the xattr-whiteout formats: the kernel treats a whiteout xattr only in an
    ``opaque=x`` directory.
    """
    f = _fmt(fmt)
    base = os.fsencode(root)
    os.makedirs(base, exist_ok=True)
    links: list[tuple[bytes, bytes]] = []
    dirs: list[tuple[bytes, Dir]] = []

    def write_dir(path: bytes, children: Mapping[Name, Node], opaque: bool) -> None:
        has_xwhiteout = False
        for raw_name, value in children.items():
            name = os.fsencode(raw_name)
            if b"/" in name or name in (b"", b".", b".."):
                raise ValueError(f"bad name {name!r}")
            node = _node(value)
            p = os.path.join(path, name)
            if isinstance(node, Whiteout):
                if f.whiteout == "oci":
                    with open(os.path.join(path, OCI_WHITEOUT_PREFIX + name), "xb"):
                        pass
                    os.chmod(os.path.join(path, OCI_WHITEOUT_PREFIX + name), 0o600)
                elif f.whiteout == "char" or opaque:
                    os.mknod(p, stat.S_IFCHR | 0o000, 0)
                else:
                    with open(p, "xb"):
                        pass
                    os.setxattr(p, f.whiteout, b"", follow_symlinks=False)
                    has_xwhiteout = True
            elif isinstance(node, File):
                data = node.data.encode() if isinstance(node.data, str) else node.data
                with open(p, "xb") as out:
                    out.write(data)
                for k, v in node.xattrs.items():
                    os.setxattr(p, k, v)
                _set_owner_mode(p, node)
            elif isinstance(node, Dir):
                os.mkdir(p)
                write_dir(p, node.children, node.opaque)
                for k, v in node.xattrs.items():
                    os.setxattr(p, k, v)
                if node.opaque:
                    if f.opaque == "oci":
                        with open(os.path.join(p, OCI_OPAQUE), "xb"):
                            pass
                    else:
                        os.setxattr(p, f.opaque, b"y")
                dirs.append((p, node))
            elif isinstance(node, Symlink):
                os.symlink(os.fsencode(node.target), p)
            elif isinstance(node, Fifo):
                os.mkfifo(p, node.mode)
                os.chmod(p, node.mode)
            elif isinstance(node, Socket):
                os.mknod(p, stat.S_IFSOCK | node.mode)
                os.chmod(p, node.mode)
            elif isinstance(node, Device):
                kind = stat.S_IFBLK if node.block else stat.S_IFCHR
                os.mknod(p, kind | node.mode, os.makedev(node.major, node.minor))
                os.chmod(p, node.mode)
            elif isinstance(node, Hardlink):
                links.append((os.path.join(base, os.fsencode(node.target)), p))
            else:
                raise TypeError(f"unknown layer entry {node!r}")
        if has_xwhiteout:
            assert f.opaque_x is not None
            os.setxattr(path, f.opaque_x, b"x")

    write_dir(base, layer, False)
    for target, p in links:
        os.link(target, p, follow_symlinks=False)
    for p, node in reversed(dirs):  # deepest first: a 0o555 parent set last
        _set_owner_mode(p, node)
    return Path(os.fsdecode(base))


def make_layers(
    base: PathLike, layers: Sequence[Layer], fmt: str | Sequence[str] = "kernel"
) -> list[Path]:
    """Write ``layers`` (topmost first) as ``base/L0``, ``base/L1``, ...; returns their paths.

    ``fmt`` is a key of ``MARKER_FORMATS``, ``"mixed"``, or one key per layer.
    Build the same description once in the format under test (for unionfs)
    and once with ``"kernel"`` (for the kernel overlayfs oracle).
    """
    formats = layer_formats(fmt, len(layers))
    return [
        write_layer(os.path.join(os.fspath(base), f"L{i}"), layer, f)
        for i, (layer, f) in enumerate(zip(layers, formats, strict=True))
    ]


def _is_marker_xattr(name: str) -> bool:
    return name.startswith(MARKER_XATTR_PREFIXES)


def _opaque_value(path: bytes) -> bytes | None:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque"):
        with contextlib.suppress(OSError):
            return os.getxattr(path, name, follow_symlinks=False)
    return None


def _is_xattr_whiteout(path: bytes, st: os.stat_result) -> bool:
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    names = os.listxattr(path, follow_symlinks=False)
    return "trusted.overlay.whiteout" in names or "user.overlay.whiteout" in names


def copy_sparse(src: PathLike | bytes, dst: PathLike | bytes) -> None:
    """Copy a regular file's content, keeping its holes (SEEK_DATA/SEEK_HOLE)."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            fin.seek(start)
            fout.seek(start)
            left = end - start
            while left > 0:
                chunk = fin.read(min(left, 1 << 20))
                if not chunk:
                    break
                fout.write(chunk)
                left -= len(chunk)
            pos = end
        fout.truncate(size)


def convert_layer(src: PathLike | bytes, dst: PathLike | bytes, userxattr: bool = False) -> Path:
    """Copy the layer ``src`` into ``dst`` in the format kernel overlayfs reads.

    Every whiteout (``.wh.NAME``, an xattr whiteout in an ``opaque=x`` dir,
    char 0/0) becomes a char 0/0 device; every opaque marker (``.wh..wh..opq``,
    ``trusted.overlay.opaque=y``, ``user.overlay.opaque=y``,
    ``user.fuseoverlayfs.opaque=y``) becomes ``trusted.overlay.opaque=y``, or
    ``user.overlay.opaque=y`` with ``userxattr``.  Other xattrs of the overlay
    and fuse-overlayfs namespaces are dropped; everything else (content, mode,
    owner, times, user and other xattrs, hard links within the layer) is kept.
    """
    srcb, dstb = os.fsencode(src), os.fsencode(dst)
    opaque_name = "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"
    seen: dict[tuple[int, int], bytes] = {}
    dir_meta: list[tuple[bytes, os.stat_result]] = []

    def copy_meta(s: bytes, d: bytes, st: os.stat_result) -> None:
        for name in os.listxattr(s, follow_symlinks=False):
            if not _is_marker_xattr(name):
                value = os.getxattr(s, name, follow_symlinks=False)
                os.setxattr(d, name, value, follow_symlinks=False)
        os.lchown(d, st.st_uid, st.st_gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(d, stat.S_IMODE(st.st_mode))
        if not stat.S_ISDIR(st.st_mode):
            os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def walk(s: bytes, d: bytes) -> None:
        names = sorted(os.listdir(s))
        real = {n for n in names if not n.startswith(OCI_WHITEOUT_PREFIX)}
        xwhiteouts = _opaque_value(s) == b"x"
        opaque = OCI_OPAQUE in names or (_opaque_value(s) or b"").startswith(b"y")
        if opaque:
            os.setxattr(d, opaque_name, b"y")
        for name in names:
            sp, dp = os.path.join(s, name), os.path.join(d, name)
            if name == OCI_OPAQUE:
                continue
            if name.startswith(OCI_WHITEOUT_PREFIX):
                hidden = name[len(OCI_WHITEOUT_PREFIX) :]
                if hidden not in real and hidden not in (b"", b".", b".."):
                    os.mknod(os.path.join(d, hidden), stat.S_IFCHR, 0)
                continue
            st = os.lstat(sp)
            if (xwhiteouts and _is_xattr_whiteout(sp, st)) or (
                stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
            ):
                os.mknod(dp, stat.S_IFCHR, 0)
                continue
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in seen:
                os.link(seen[key], dp)
                continue
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(dp)
                walk(sp, dp)
                copy_meta(sp, dp, st)
                dir_meta.append((dp, st))
                continue
            if stat.S_ISREG(st.st_mode):
                copy_sparse(sp, dp)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(sp), dp)
            else:
                os.mknod(dp, st.st_mode, st.st_rdev)
            copy_meta(sp, dp, st)
            seen[key] = dp

    os.makedirs(dstb, exist_ok=True)
    root_st = os.lstat(srcb)
    walk(srcb, dstb)
    copy_meta(srcb, dstb, root_st)
    for d, st in [*dir_meta, (dstb, root_st)]:  # children changed the dirs' times
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return Path(os.fsdecode(dstb))


def convert_layers(
    layers: Sequence[PathLike], base: PathLike, userxattr: bool = False
) -> list[Path]:
    """``convert_layer`` for each layer, into ``base/K0``, ``base/K1``, ..."""
    return [
        convert_layer(layer, os.path.join(os.fspath(base), f"K{i}"), userxattr)
        for i, layer in enumerate(layers)
    ]


def xattr_names(root: PathLike | bytes) -> dict[str, list[str]]:
    """path -> sorted names from listxattr (every namespace), for every entry."""
    base = os.fsencode(root)
    out: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            try:
                names = sorted(os.listxattr(p, follow_symlinks=False))
            except OSError as e:
                names = [f"error:{errno.errorcode.get(e.errno or 0, e.errno)}"]
            out[os.fsdecode(os.path.relpath(p, base))] = names
    return out


def chown_tree(root: PathLike | bytes, uid: int, gid: int) -> None:
    """Give ``root`` and everything below it to uid:gid (symlinks themselves)."""
    base = os.fsencode(root)
    os.lchown(base, uid, gid)
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames + filenames:
            os.lchown(os.path.join(dirpath, n), uid, gid)


# --------------------------------------------------------------------------- mounts


@contextlib.contextmanager
def tmpfs(mnt: PathLike, size: str = "64m") -> Iterator[Path]:
    """A tmpfs at ``mnt`` (root) for the block: a layer on a filesystem of its own."""
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", os.fspath(mnt)],
        check=True,
        capture_output=True,
    )
    try:
        yield Path(mnt)
    finally:
        if subprocess.run(["umount", os.fspath(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", os.fspath(mnt)], capture_output=True)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(field_: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, ``\\012`` newline ...)."""
    if "\\" not in field_:
        return field_
    raw = os.fsencode(field_)
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i : i + 1] == b"\\" and raw[i + 1 : i + 4].isdigit() and len(raw) >= i + 4:
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mounts() -> list[MountEntry]:
    """The mounts this process sees, mount points unescaped."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f.read().decode(errors="surrogateescape").splitlines():
            left, _, right = line.partition(" - ")
            parts, rparts = left.split(" "), right.split(" ")
            out.append(MountEntry(_unescape(parts[4]), rparts[0], _unescape(rparts[1]), rparts[2]))
    return out


def mount_entry(mnt: PathLike) -> MountEntry | None:
    """The topmost mount at ``mnt`` (after resolving symlinks), if any."""
    target = os.path.realpath(os.fspath(mnt))
    found = None
    for m in mounts():
        if m.mountpoint == target:
            found = m
    return found


def is_mounted(mnt: PathLike) -> bool:
    return mount_entry(mnt) is not None


def mounts_under(base: PathLike) -> list[MountEntry]:
    """Every mount at or below ``base``, deepest first (the order to undo them)."""
    prefix = os.path.realpath(os.fspath(base)).rstrip("/") + "/"
    found = [m for m in mounts() if (m.mountpoint + "/").startswith(prefix)]
    return sorted(found, key=lambda m: m.mountpoint.count("/"), reverse=True)


def force_unmount(m: MountEntry) -> bool:
    """Detach a leftover mount (lazily); True when it is gone."""
    if m.fstype.startswith("fuse"):
        subprocess.run(["fusermount3", "-uz", m.mountpoint], capture_output=True)
    if is_mounted(m.mountpoint) and os.geteuid() == 0:
        subprocess.run(["umount", "-l", m.mountpoint], capture_output=True)
    return not any(x.mountpoint == m.mountpoint and x.fstype == m.fstype for x in mounts())


#: The kernel refuses mount(2) option strings longer than a page.
_MAX_OPTIONS = 4000


@contextlib.contextmanager
def kernel_overlay(
    lowers: Sequence[PathLike],
    upper: PathLike | None,
    work: PathLike | None,
    mnt: PathLike,
    userxattr: bool = False,
    index: bool = True,
    options: Sequence[str] = (),
) -> Iterator[Path]:
    """Kernel overlayfs over the given layers, the oracle (needs root); yields ``mnt``.

    Without ``upper`` the mount has only ``lowerdir=`` (read-only; an empty
    extra lowest layer is added when there is one lower, as the kernel wants
    two).  ``index=on`` by default with an upper: unionfs keeps hard-linked
    lower files one file after copy-up, as the kernel does with the index.
    Long layer lists are passed relative to their common parent, so 100+
    layers fit the one-page option string.  Unmounted in every case
    (``umount``, else ``umount -l``).
    """
    if upper is not None and work is None:
        raise ValueError("an upper needs a work dir")
    with contextlib.ExitStack() as stack:
        layer_paths = [os.path.abspath(os.fspath(p)) for p in lowers]
        if upper is None and len(layer_paths) == 1:
            empty = stack.enter_context(tempfile.TemporaryDirectory(prefix="ovl-empty-"))
            layer_paths.append(empty)
        extra = [os.path.abspath(os.fspath(p)) for p in (upper, work) if p is not None]

        def opts(paths: list[str], extra_paths: list[str]) -> str:
            out = ["lowerdir=" + ":".join(p.replace(":", "\\:") for p in paths)]
            if extra_paths:
                out += [f"upperdir={extra_paths[0]}", f"workdir={extra_paths[1]}"]
                out.append("index=on" if index else "index=off")
            if userxattr:
                out.append("userxattr")
            return ",".join([*out, *options])

        cwd = None
        text = opts(layer_paths, extra)
        if len(text) > _MAX_OPTIONS:
            cwd = os.path.commonpath([*layer_paths, *extra])
            text = opts(
                [os.path.relpath(p, cwd) for p in layer_paths],
                [os.path.relpath(p, cwd) for p in extra],
            )
        r = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", text, os.fspath(mnt)],
            capture_output=True,
            text=True,
            cwd=cwd,
        )
        if r.returncode != 0:
            raise RuntimeError(f"mount -t overlay -o {text[:300]} failed: {r.stderr.strip()}")
        try:
            yield Path(mnt)
        finally:
            if subprocess.run(["umount", os.fspath(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", os.fspath(mnt)], capture_output=True)


def helper_opts(mode: str) -> list[str]:
    """The mount options of a ``helper_mode`` (conftest): the C session helper or not."""
    return ["nofastpath"] if mode == "nofastpath" else []


def unionfs_command() -> list[str]:
    """How to run unionfs-mount: the one beside this interpreter, on PATH, or as a module."""
    here = os.path.dirname(sys.executable)
    exe = shutil.which("unionfs-mount", path=os.pathsep.join([here, os.environ.get("PATH", "")]))
    return [exe] if exe else [sys.executable, "-m", "unionfs.cli"]


@dataclass
class User:
    """An unprivileged account to run daemons and test code as."""

    name: str
    uid: int
    gid: int


def as_user(user: User) -> Callable[[], None]:
    """A ``preexec_fn`` that drops to ``user`` (no supplementary groups)."""

    def demote() -> None:
        os.setgroups([])
        os.setgid(user.gid)
        os.setuid(user.uid)

    return demote


_T = TypeVar("_T")


def run_as(user: User | None, fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(*args)`` in a forked child with the user's ids; return its (pickled) result.

    ``user=None`` calls ``fn`` directly.  An exception in the child is raised
    here as an AssertionError carrying the child's traceback.
    """
    import pickle
    import traceback

    if user is None:
        return fn(*args)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            as_user(user)()
            payload = (True, fn(*args))
        except BaseException:
            payload = (False, traceback.format_exc())
        try:
            data = pickle.dumps(payload)
        except Exception:
            data = pickle.dumps((False, traceback.format_exc()))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        raise AssertionError(f"child running {fn!r} as {user.name} died")
    ok, value = pickle.loads(data)
    if not ok:
        raise AssertionError(f"{fn!r} as {user.name} failed:\n{value}")
    return value


class DetachedDaemon:
    """A daemonized unionfs (not our child), with the Popen calls the tests use.

    Held through a pidfd, so waiting for it cannot mistake a recycled PID.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.args: list[str] = []
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._pidfd], [], [], 0)[0]:
            self.returncode = 0  # the exit status belongs to its new parent
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._pidfd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = 0
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def _pids_with_argv(argv: list[str]) -> list[int]:
    want = [os.fsencode(a) for a in argv]
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                got = f.read().split(b"\0")[:-1]
        except OSError:
            continue
        if len(got) >= len(want) and got[-len(want) :] == want:
            pids.append(int(entry))
    return pids


def daemon_processes(under: PathLike) -> list[tuple[int, str]]:
    """(pid, command line) of unionfs processes with an argument at or below ``under``."""
    prefix = os.fsencode(os.path.realpath(os.fspath(under)).rstrip("/") + "/")
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
        except OSError:
            continue
        if not any(b"unionfs" in a for a in argv[:3]) or any(b"pytest" in a for a in argv[:3]):
            continue
        if any((a + b"/").startswith(prefix) or b":" + prefix in a for a in argv[1:]):
            out.append((int(entry), os.fsdecode(b" ".join(argv))))
    return out


def _read(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def _stat_answers(mnt: str, user: User | None, timeout: float) -> str | None:
    """None when a stat of ``mnt`` (as ``user``) answers in time, else why not."""
    try:
        r = subprocess.run(
            ["stat", "--", mnt],
            capture_output=True,
            text=True,
            timeout=max(timeout, 0.5),
            preexec_fn=as_user(user) if user else None,
        )
    except subprocess.TimeoutExpired:
        return f"stat {mnt} did not answer within {timeout:.0f} s"
    return None if r.returncode == 0 else f"stat {mnt}: {r.stderr.strip()}"


@contextlib.contextmanager
def unionfs_mount(
    lowers: Sequence[PathLike],
    upper: PathLike | None,
    mnt: PathLike,
    opts: Sequence[str] = (),
    user: User | None = None,
    foreground: bool = True,
    timeout: float = 20,
    debug: bool = False,
    check_exit: bool = True,
) -> Iterator[tuple[Any, Path]]:
    """Mount unionfs (as ``user`` if given) for the duration of the block.

    Runs ``unionfs-mount -f`` (or, with ``foreground=False``, the daemonizing
    form, then finds the daemon by its command line) and waits until ``mnt``
    is a fuse mount in /proc/self/mountinfo and a ``stat`` of it answers,
    failing with the daemon's stderr when it does not within ``timeout``.
    Yields ``(daemon, mnt)``: the Popen (or a ``DetachedDaemon`` with the same
    poll/wait/send_signal calls) and the mount point.

    On exit: ``fusermount3 -u``; the daemon must then exit within 15 s, else
    ``fusermount3 -uz`` and SIGKILL.  No mount and no process survives.
    With ``check_exit``, a daemon that was still running at the end and then
    exits with a non-zero status fails the block (with its stderr).
    """
    cmd = [*unionfs_command()]
    if foreground:
        cmd.append("-f")
    if debug:
        cmd.append("-d")
    if opts:
        cmd += ["-o", ",".join(opts)]
    cmd.append(":".join(os.fspath(p).replace("\\", "\\\\").replace(":", "\\:") for p in lowers))
    if upper is not None:
        cmd.append(os.fspath(upper))
    cmd.append(os.fspath(mnt))
    mnt_path = Path(mnt)
    with tempfile.TemporaryFile() as errfile:
        launcher: subprocess.Popen[bytes] | None = None
        daemon: Any = None
        failed = False
        try:
            launcher = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=errfile,
                stderr=errfile,
                preexec_fn=as_user(user) if user else None,
                cwd="/",
            )
            daemon = launcher
            deadline = time.monotonic() + timeout
            if not foreground:
                daemon = _detached(launcher, cmd, timeout, errfile)
            while True:
                entry = mount_entry(mnt_path)
                if entry is not None and entry.fstype.startswith("fuse"):
                    break
                if daemon.poll() is not None:
                    raise AssertionError(
                        f"unionfs-mount exited with {daemon.returncode} before mounting:"
                        f" {_read(errfile)}\ncommand: {cmd}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"unionfs-mount did not mount in {timeout} s: {_read(errfile)}"
                    )
                time.sleep(0.02)
            why = _stat_answers(os.fspath(mnt_path), user, deadline - time.monotonic())
            if why is not None:
                raise AssertionError(f"{why}; daemon stderr: {_read(errfile)}")
            yield daemon, mnt_path
        except BaseException:
            failed = True
            raise
        finally:
            code, running = _stop(daemon, mnt_path, user)
            if launcher is not None and launcher.poll() is None:
                launcher.kill()  # a daemonizing launcher that never answered
                launcher.wait()
            if isinstance(daemon, DetachedDaemon):
                daemon.close()
            if check_exit and running and code not in (0, None) and not failed:
                raise AssertionError(
                    f"unionfs daemon exited with {code} at unmount: {_read(errfile)}"
                )


def _detached(
    launcher: subprocess.Popen[bytes], cmd: list[str], timeout: float, errfile: IO[bytes]
) -> DetachedDaemon:
    """The daemon a daemonizing ``unionfs-mount`` left, once the launcher said OK."""
    try:
        code = launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    pids = [p for p in _pids_with_argv(cmd) if p != launcher.pid]
    daemon = DetachedDaemon(pids[0]) if pids else None
    if daemon is not None:
        daemon.args = cmd
    if code != 0 or daemon is None:
        if daemon is not None:  # started, but the launcher failed or hung: end it
            daemon.kill()
            daemon.wait(timeout=15)
            daemon.close()
        raise AssertionError(
            f"unionfs-mount exited with {code} (daemon pids {pids}): {_read(errfile)}\n"
            f"command: {cmd}"
        )
    return daemon


def _stop(daemon: Any, mnt: Path, user: User | None) -> tuple[int | None, bool]:
    """Unmount and end the daemon; returns (its exit code, whether it was running)."""
    running = daemon is not None and daemon.poll() is None
    entry = mount_entry(mnt)
    if entry is not None and entry.fstype.startswith("fuse"):
        r = subprocess.run(
            ["fusermount3", "-u", os.fspath(mnt)],
            capture_output=True,
            preexec_fn=as_user(user) if user else None,
        )
        if r.returncode != 0:
            force_unmount(entry)
    if daemon is None:
        return None, False
    try:
        code = daemon.wait(timeout=15)
    except subprocess.TimeoutExpired:
        daemon.send_signal(signal.SIGKILL)
        code = daemon.wait(timeout=15)
        running = False  # killed by us: its status says nothing
    entry = mount_entry(mnt)
    if entry is not None and entry.fstype.startswith("fuse"):
        force_unmount(entry)
    return code, running


def wait_unmounted(mnt: PathLike, timeout: float = 15) -> bool:
    """Poll until nothing is mounted at ``mnt``; False on timeout."""
    deadline = time.monotonic() + timeout
    while is_mounted(mnt):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def errno_of(fn: Callable[[], object]) -> int:
    """The errno ``fn()`` fails with, or 0 when it succeeds."""
    try:
        fn()
    except OSError as e:
        return e.errno or errno.EIO
    return 0
