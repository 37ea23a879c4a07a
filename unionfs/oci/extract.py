"""Safe extraction of one OCI layer tar into a new, empty layer directory.

The tar comes from an image anyone may have built, so every name in it is
hostile until proven otherwise.  Nothing is ever resolved as a path: the
extractor holds a descriptor of the layer's root and walks one component at a
time with ``openat(O_PATH|O_DIRECTORY|O_NOFOLLOW)``, creates with
``O_EXCL|O_NOFOLLOW`` relative to the parent's descriptor, and refuses ``..``
components, names inside markers and walks through a non-directory (a symlink
the tar made earlier included).  A hard link may only name an object this
same tar created in this same layer.  So no entry can write outside the layer.

Markers stay in the OCI format the tar uses (``.wh.NAME`` files and
``.wh..wh..opq``), written through ``unionfs.markers.Writer("oci")``.  That is
the format a rootless user reads best: creating it needs neither user xattrs
(missing on NFS, where a shared read-only store lives) nor char-device
whiteouts (mknod rights), any copy tool preserves it, and it keeps the spec's
rule that a whiteout hides only *lower* layers: ``x`` and ``.wh.x`` can both
be in one layer, which kernel-format markers (one name, one object) cannot
express.  A directory the same layer also whites out is marked opaque, so
lower contents do not leak into the re-created directory.

When the extractor cannot chown (not root in the initial user namespace),
each entry's owner, mode and device numbers go through ``unionfs.ownership``
and the real file keeps owner-readable bits only; as root, they are real.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
import stat as stat_mod
import tarfile
import urllib.parse
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from .. import markers, ownership
from ..ownership import Override

log = logging.getLogger(__name__)

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
NAME_MAX = 255

Path = tuple[bytes, ...]


class LayerError(Exception):
    """A layer that cannot be extracted safely: one line, naming the entry."""


@dataclass
class ExtractStats:
    """What one extraction made, and what it dropped and why."""

    entries: int = 0
    bytes: int = 0
    whiteouts: int = 0
    overrides: int = 0
    table_records: int = 0
    dropped_xattrs: Counter[str] = field(default_factory=Counter)


# -- pure rules ----------------------------------------------------------------


def split_name(name: str | bytes) -> Path:
    """A member name as path components below the layer root.

    Leading ``/`` and ``./`` are dropped (producers write ``etc/x``, ``./etc/x``
    and GNU tar ``-P`` ``/etc/x``; all mean the same entry); ``..`` anywhere
    is refused: lexically harmless cases are not worth the ambiguity.
    """
    raw = os.fsencode(name) if isinstance(name, str) else name
    if b"\0" in raw:
        raise LayerError(f"entry {raw!r} has a NUL byte in its name")
    parts = tuple(p for p in raw.split(b"/") if p not in (b"", b"."))
    if b".." in parts:
        raise LayerError(f"entry {_show(raw)} has a '..' component")
    for p in parts:
        if len(p) > NAME_MAX:
            raise LayerError(f"entry {_show(raw)} has a name over {NAME_MAX} bytes")
    return parts


def _show(name: bytes | Path) -> str:
    if isinstance(name, tuple):
        name = b"/".join(name) or b"."
    return repr(os.fsdecode(name))


def xattr_action(name: bytes, privileged: bool) -> str:
    """What becomes of an xattr from a layer: ``set``, ``save`` (under a name the
    process may set, fuse-overlayfs' ``user.containers.override_``) or ``drop``.

    Ownership and union marker xattrs are never taken from a tar: a layer
    would forge its own owners or hide lower files.  ``security.selinux`` is
    the runtime's to label (containers/storage ignores it on extract too).
    """
    if name in ownership.OWNERSHIP_XATTRS or name.startswith(ownership.SAVED_XATTR_PREFIX):
        return "drop"
    if markers.is_private_xattr(name) or name.startswith(b"trusted.overlay."):
        return "drop"
    if name == b"security.selinux":
        return "drop"
    if name.startswith(b"user."):
        return "set"
    if name in (b"system.posix_acl_access", b"system.posix_acl_default"):
        return "set"
    if name.startswith((b"security.", b"trusted.")):
        return "set" if privileged else "save"
    return "drop"


def pax_xattrs(pax: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Xattrs recorded in PAX headers: ``SCHILY.xattr.`` (Go, Docker, GNU tar)
    and ``LIBARCHIVE.xattr.`` (bsdtar: URL-encoded name, base64 value)."""
    out = []
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out.append(
                (
                    os.fsencode(key[len("SCHILY.xattr.") :]),
                    value.encode("utf-8", "surrogateescape"),
                )
            )
        elif key.startswith("LIBARCHIVE.xattr."):
            with contextlib.suppress(ValueError):
                out.append(
                    (
                        urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :]),
                        base64.b64decode(value, validate=False),
                    )
                )
    return out


# -- the extractor ---------------------------------------------------------------


class Extractor:
    """Applies tar members, one by one, to a layer directory held by descriptor."""

    def __init__(self, root_fd: int, privileged: bool | None = None, use_xattrs: bool = True):
        self.root_fd = root_fd
        self.privileged = ownership.real_root() if privileged is None else privileged
        self.use_xattrs = use_xattrs
        self.uid, self.gid = os.geteuid(), os.getegid()
        self.writer = markers.Writer("oci", b"user.")
        self.table = ownership.TableWriter(root_fd)
        self.stats = ExtractStats()
        self._fds: OrderedDict[Path, int] = OrderedDict()
        #: Directories whose descriptors the current member still uses.
        self._pinned: set[Path] = set()
        #: Directories made here, with the attributes to give them at the end
        #: (a directory's mode and mtime are set after its children are in).
        self._dirs: dict[Path, tuple[int, int, int, int, list[tuple[bytes, bytes]]]] = {}
        self._whiteouts: list[tuple[Path, bytes]] = []
        #: Directories the tar names itself (the others were made as parents).
        self._explicit: set[Path] = set()
        #: Side-table records by path, for hard links to symlinks and FIFOs.
        self._tabled: dict[Path, Override] = {}

    # descriptors --------------------------------------------------------------

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.table.close()

    def _dirfd(self, path: Path, create: bool, entry: Path) -> int:
        """Descriptor of directory ``path`` in the layer, made (as an implicit
        parent, root-owned 0755 like Docker's) when missing and ``create``."""
        if not path:
            return self.root_fd
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        parent = self._dirfd(path[:-1], create, entry)
        name = path[-1]
        if markers.is_marker_name(name):
            raise LayerError(f"entry {_show(entry)} is inside the marker {_show(path)}")
        try:
            fd = os.open(name, _DIR, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise LayerError(
                    f"entry {_show(entry)}: {_show(path)} is not in this layer"
                ) from None
            os.mkdir(name, 0o700, dir_fd=parent)
            self._dirs[path] = (0o755, 0, 0, 0, [])
            fd = os.open(name, _DIR, dir_fd=parent)
        except (NotADirectoryError, OSError) as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise LayerError(
                    f"entry {_show(entry)} goes through {_show(path)}, which is not a directory"
                ) from None
            raise
        self._fds[path] = fd
        if len(self._fds) > 128:
            # The oldest that no caller still holds (a hard link holds two).
            old = next(k for k in self._fds if k not in self._pinned and k != path)
            os.close(self._fds.pop(old))
        return fd

    # ownership ----------------------------------------------------------------

    def _record(self, path: Path, dir_fd: int, name: bytes | None, ov: Override, real: int) -> None:
        """Keep ``ov`` for an object this process could not give it for real."""
        natural = ov.kind is None or ov.kind == ownership.kind_of(real)
        if (
            path  # the root's record is always kept: it marks the layer (fuse-overlayfs' rule)
            and natural
            and (ov.uid, ov.gid) == (self.uid, self.gid)
            and ov.mode == stat_mod.S_IMODE(real)
        ):
            return
        if self.use_xattrs and ownership.xattr_capable(real):
            try:
                ownership.write_override_xattr(dir_fd, name, ov)
                self.stats.overrides += 1
                return
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                log.info("no user xattrs here (%s): ownership goes to the side table", e.strerror)
                self.use_xattrs = False
        self.table.add(b"/".join(path), ov)
        self._tabled[path] = ov
        self.stats.table_records += 1

    def _set_xattrs(
        self, dir_fd: int, name: bytes | None, xattrs: list[tuple[bytes, bytes]]
    ) -> None:
        path = ownership._proc(dir_fd, name)
        for key, value in xattrs:
            action = xattr_action(key, self.privileged)
            if action == "save" and not self.use_xattrs:
                action = "drop"
            if action == "drop":
                self.stats.dropped_xattrs[os.fsdecode(key)] += 1
                continue
            target = key if action == "set" else ownership.SAVED_XATTR_PREFIX + key
            try:
                os.setxattr(path, target, value, follow_symlinks=name is None)
            except OSError as e:
                log.debug("xattr %r not set: %s", key, e.strerror)
                self.stats.dropped_xattrs[os.fsdecode(key)] += 1

    # members ------------------------------------------------------------------

    def apply(self, ti: tarfile.TarInfo, data: IO[bytes] | None) -> None:
        """Apply one member; ``data`` is its content stream for regular files."""
        parts = split_name(ti.name)
        self.stats.entries += 1
        if not parts:
            if not ti.isdir():
                raise LayerError("the layer's root entry is not a directory")
            perm = ti.mode & 0o7777  # some producers keep the type bits in the mode field
            self._dirs[()] = (perm, ti.uid, ti.gid, int(ti.mtime), pax_xattrs(ti.pax_headers))
            return
        parent, base = parts[:-1], parts[-1]
        if base == markers.OPAQUE_NAME:
            self.writer.set_opaque(self._dirfd(parent, True, parts))
            return
        if base.startswith(b".wh..wh."):
            log.debug("AUFS metadata entry %r skipped", ti.name)
            return
        if markers.is_marker_name(base):
            self._whiteout(parts, parent, base)
            return
        dir_fd = self._dirfd(parent, True, parts)
        try:
            self._replace(dir_fd, parts, ti)
            self._create(dir_fd, parts, ti, data)
        except OSError as e:
            raise LayerError(f"entry {_show(parts)}: {e.strerror}") from None

    def _whiteout(self, parts: Path, parent: Path, base: bytes) -> None:
        target = markers.oci_whiteout_target(base)
        if target is None:
            raise LayerError(f"entry {_show(parts)} is a whiteout of no valid name")
        dir_fd = self._dirfd(parent, True, parts)
        with contextlib.suppress(FileExistsError):
            self.writer.make_whiteout(dir_fd, target)
        self._whiteouts.append((parent, target))
        self.stats.whiteouts += 1

    def _replace(self, dir_fd: int, parts: Path, ti: tarfile.TarInfo) -> None:
        """A duplicate entry: the later wins (directories merge their attributes)."""
        try:
            st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat_mod.S_ISDIR(st.st_mode):
            if ti.isdir():
                return
            raise LayerError(f"entry {_show(parts)} would replace a directory of this layer")
        os.unlink(parts[-1], dir_fd=dir_fd)
        self._tabled.pop(parts, None)

    def _create(
        self, dir_fd: int, parts: Path, ti: tarfile.TarInfo, data: IO[bytes] | None
    ) -> None:
        name = parts[-1]
        perm = ti.mode & 0o7777
        xattrs = pax_xattrs(ti.pax_headers)
        mtime = int(ti.mtime)
        if ti.isdir():
            with contextlib.suppress(FileExistsError):  # a dir already: attributes merge
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            self._dirs[parts] = (perm, ti.uid, ti.gid, mtime, xattrs)
            self._explicit.add(parts)
            return
        if ti.islnk():
            self._hardlink(dir_fd, parts, ti)
            return
        if ti.issym():
            os.symlink(os.fsencode(ti.linkname), name, dir_fd=dir_fd)
            ov = Override(ti.uid, ti.gid, 0o777, "symlink")
            if self.privileged:
                os.chown(name, ti.uid, ti.gid, dir_fd=dir_fd, follow_symlinks=False)
            else:
                self._record(parts, dir_fd, name, ov, stat_mod.S_IFLNK | 0o777)
            os.utime(name, ns=(mtime * 10**9,) * 2, dir_fd=dir_fd, follow_symlinks=False)
            return
        if ti.isreg():
            self._file(dir_fd, parts, ti, data, xattrs)
            return
        if ti.ischr() or ti.isblk() or ti.isfifo():
            self._special(dir_fd, parts, ti, xattrs)
            return
        raise LayerError(f"entry {_show(parts)} has an unsupported type {ti.type!r}")

    def _file(
        self,
        dir_fd: int,
        parts: Path,
        ti: tarfile.TarInfo,
        data: IO[bytes] | None,
        xattrs: list[tuple[bytes, bytes]],
    ) -> None:
        fd = os.open(parts[-1], _NEW_FILE, 0o600, dir_fd=dir_fd)
        try:
            regions = data_regions(ti)
            if data is not None:
                pos = 0
                while chunk := data.read(_CHUNK):
                    if regions is None:
                        _write_all(fd, memoryview(chunk), None)
                    else:  # a sparse entry: only its data regions are written
                        for lo, hi in overlaps(regions, pos, pos + len(chunk)):
                            _write_all(fd, memoryview(chunk)[lo - pos : hi - pos], lo)
                    pos += len(chunk)
                    self.stats.bytes += len(chunk)
            if regions is not None:
                os.ftruncate(fd, ti.size)  # the holes, and a hole at the end
            self._finish(fd, parts, dir_fd, ti, stat_mod.S_IFREG, xattrs)
        finally:
            os.close(fd)

    def _finish(
        self,
        fd: int,
        parts: Path,
        dir_fd: int,
        ti: tarfile.TarInfo,
        fmt: int,
        xattrs: list[tuple[bytes, bytes]],
        kind: str | None = None,
        rdev: int = 0,
    ) -> None:
        """Owner, mode, xattrs and times of a regular file made through ``fd``."""
        perm = ti.mode & 0o7777
        if self.privileged:
            os.fchown(fd, ti.uid, ti.gid)  # before chmod: chown clears setuid
            os.fchmod(fd, perm)
        else:
            real = (perm & 0o777) | 0o600
            os.fchmod(fd, real)
            ov = Override(ti.uid, ti.gid, perm, kind or ownership.kind_of(fmt), rdev)
            self._record(parts, dir_fd, parts[-1], ov, stat_mod.S_IFREG | real)
        self._set_xattrs(dir_fd, parts[-1], xattrs)
        os.utime(fd, ns=(int(ti.mtime) * 10**9,) * 2)

    def _special(
        self, dir_fd: int, parts: Path, ti: tarfile.TarInfo, xattrs: list[tuple[bytes, bytes]]
    ) -> None:
        name = parts[-1]
        perm = ti.mode & 0o7777
        fmt = (
            stat_mod.S_IFIFO
            if ti.isfifo()
            else (stat_mod.S_IFCHR if ti.ischr() else stat_mod.S_IFBLK)
        )
        rdev = 0 if ti.isfifo() else os.makedev(ti.devmajor, ti.devminor)
        if self.privileged:
            os.mknod(name, fmt | 0o600, rdev, dir_fd=dir_fd)
            os.chown(name, ti.uid, ti.gid, dir_fd=dir_fd, follow_symlinks=False)
            os.chmod(ownership._proc(dir_fd, name), perm)  # no fd for a device: by /proc
            os.utime(name, ns=(int(ti.mtime) * 10**9,) * 2, dir_fd=dir_fd, follow_symlinks=False)
            return
        if ti.isfifo():
            os.mkfifo(name, 0o600, dir_fd=dir_fd)
            real = (perm & 0o777) | 0o600
            os.chmod(ownership._proc(dir_fd, name), real)
            ov = Override(ti.uid, ti.gid, perm, "pipe")
            self._record(parts, dir_fd, name, ov, stat_mod.S_IFIFO | real)
            os.utime(name, ns=(int(ti.mtime) * 10**9,) * 2, dir_fd=dir_fd, follow_symlinks=False)
            return
        # A device a user may not make: an empty regular file whose override
        # says what it is (fuse-overlayfs >= 1.15 does the same).
        fd = os.open(name, _NEW_FILE, 0o600, dir_fd=dir_fd)
        try:
            self._finish(fd, parts, dir_fd, ti, fmt, xattrs, ownership.kind_of(fmt), rdev)
        finally:
            os.close(fd)

    def _hardlink(self, dir_fd: int, parts: Path, ti: tarfile.TarInfo) -> None:
        target = split_name(ti.linkname)
        if not target or markers.is_marker_name(target[-1]):
            raise LayerError(f"entry {_show(parts)} is a hard link to {_show(target)}")
        if target == parts:
            raise LayerError(f"entry {_show(parts)} is a hard link to itself")
        self._pinned = {parts[:-1]}  # dir_fd must outlive the walk to the target
        try:
            tdir = self._dirfd(target[:-1], False, parts)
        finally:
            self._pinned = set()
        try:
            st = os.stat(target[-1], dir_fd=tdir, follow_symlinks=False)
        except FileNotFoundError:
            raise LayerError(
                f"entry {_show(parts)} is a hard link to {_show(target)}, not in this layer"
            ) from None
        if stat_mod.S_ISDIR(st.st_mode):
            raise LayerError(f"entry {_show(parts)} is a hard link to a directory")
        os.link(target[-1], parts[-1], src_dir_fd=tdir, dst_dir_fd=dir_fd, follow_symlinks=False)
        ov = self._tabled.get(target)
        if ov is not None:
            self.table.add(b"/".join(parts), ov)
            self._tabled[parts] = ov

    # the end ------------------------------------------------------------------

    def finish(self) -> None:
        """Opaque markers for re-created dirs, then every directory's attributes,
        deepest first (a read-only directory must not block its children)."""
        for parent, target in self._whiteouts:
            path = (*parent, target)
            if path not in self._dirs:
                continue
            if path not in self._explicit and self._only_markers(path):
                # ``.wh.foo`` with ``foo/.wh.bar`` (``rm -rf /foo/bar`` seen by a
                # naive differ): foo was made only to hold a whiteout of its
                # own child; it is deleted, not re-created.
                self._drop_marker_dir(path)
                continue
            self.writer.set_opaque(self._dirfd(path, False, path))
        if () not in self._dirs:
            self._dirs[()] = (0o755, 0, 0, 0, [])
        for path in sorted(self._dirs, key=len, reverse=True):
            perm, uid, gid, mtime, xattrs = self._dirs[path]
            self._dir_attrs(path, perm, uid, gid, mtime, xattrs)
        self.table.close(durable=False)

    def _only_markers(self, path: Path) -> bool:
        fd = os.open(
            path[-1],
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
            dir_fd=self._dirfd(path[:-1], False, path),
        )
        try:
            return all(markers.is_marker_name(os.fsencode(n)) for n in os.listdir(fd))
        finally:
            os.close(fd)

    def _drop_marker_dir(self, path: Path) -> None:
        fd = self._dirfd(path, False, path)
        for n in os.listdir(b"/proc/self/fd/%d" % fd):
            os.unlink(n, dir_fd=fd)
        os.close(self._fds.pop(path))
        os.rmdir(path[-1], dir_fd=self._dirfd(path[:-1], False, path))
        del self._dirs[path]

    def _dir_attrs(
        self, path: Path, perm: int, uid: int, gid: int, mtime: int, xattrs: list
    ) -> None:
        if path:
            parent = self._dirfd(path[:-1], False, path)
            fd = os.open(path[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        else:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.root_fd)
        try:
            self._set_xattrs(fd, None, xattrs)
            if self.privileged:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, perm)
            else:
                real = (perm & 0o777) | 0o700
                os.fchmod(fd, real)
                ov = Override(uid, gid, perm, "dir")
                self._record(path, fd, None, ov, stat_mod.S_IFDIR | real)
            os.utime(fd, ns=(mtime * 10**9,) * 2)
        finally:
            os.close(fd)


def data_regions(ti: tarfile.TarInfo) -> list[tuple[int, int]] | None:
    """A sparse entry's data regions as sorted (start, end) offsets; None if not sparse.

    tarfile gives GNU sparse entries (old GNU and PAX 0.0/0.1/1.0) a map of
    (offset, size) in ``ti.sparse`` and reads the holes back as zeros; writing
    only the regions keeps the holes, as GNU tar and umoci do.
    """
    sparse = getattr(ti, "sparse", None)
    if not sparse:
        return None
    return sorted((off, off + size) for off, size in sparse if size > 0)


def overlaps(regions: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of [lo, hi) that lie in ``regions`` (sorted, non-overlapping)."""
    return [(max(a, lo), min(b, hi)) for a, b in regions if a < hi and b > lo]


def _write_all(fd: int, view: memoryview, offset: int | None) -> None:
    """Write all of ``view`` (at ``offset`` with pwrite, else at the file position)."""
    while view:  # a write may be short
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def extract_tar(
    stream: IO[bytes],
    root_fd: int,
    privileged: bool | None = None,
    use_xattrs: bool = True,
    on_entry: Callable[[ExtractStats], None] | None = None,
) -> ExtractStats:
    """Extract a layer tar read from ``stream`` (read once, in order) into the
    empty directory ``root_fd``.  Raises LayerError (or OSError, e.g. ENOSPC);
    the caller owns the directory and removes it on failure."""
    ex = Extractor(root_fd, privileged, use_xattrs)
    try:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|", errorlevel=2)  # noqa: SIM115
        except tarfile.ReadError as e:
            raise LayerError(f"not a tar archive: {e}") from None
        with tf:
            while True:
                try:
                    ti = tf.next()
                except tarfile.ReadError as e:
                    raise LayerError(f"corrupt tar: {e}") from None
                if ti is None:
                    break
                data = tf.extractfile(ti) if ti.isreg() else None
                try:
                    ex.apply(ti, data)
                except tarfile.ReadError as e:  # the entry's data ends early
                    raise LayerError(f"corrupt tar: entry {ti.name!r}: {e}") from None
                if on_entry is not None:
                    on_entry(ex.stats)
        ex.finish()
        return ex.stats
    finally:
        ex.close()
