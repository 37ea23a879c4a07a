"""The stream of changes an upper makes to the merged view of its lowers.

``scan(upper, lowers)`` walks the upper only, top-down, with directory
descriptors opened one component at a time with ``O_NOFOLLOW``; for every
upper entry it looks up the same path in the lower stack through the
filesystem core's merge rules (``LayerStack.lookup``), which costs one
``fstatat`` per lower layer holding the parent directory.  Markers are read
in every format the mount reads (``unionfs.markers``): char 0/0, ``.wh.NAME``
and xattr whiteouts; ``overlay.opaque`` in ``trusted.``/``user.``,
``user.fuseoverlayfs.opaque`` and ``.wh..wh..opq`` opaque directories.

The result is a list of ``Change`` in tar order: a directory, then its
deletions (sorted), then its other entries (sorted, each directory followed by
its own subtree).  Entries the upper holds without changing anything (a
directory that only contains changes, a copy identical to its lower) come as
``Kind.SAME``: an exported layer needs them, ``diff`` does not print them.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import gc
import os
import stat as stat_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .. import markers, ownership
from ..layers import Entry, LayerStack
from ..markers import Opacity
from ..syscalls import raise_fd_limit

Path = tuple[bytes, ...]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_XATTR = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)
#: Regular files up to this size are compared byte for byte with the lower copy
#: to tell a metadata-only change from a content change; bigger ones too, but
#: only when their sizes are equal (reading stops at the first difference).
_CHUNK = 1 << 20


class ScanError(Exception):
    """The upper is corrupt or not readable as a layer: one line, nothing changed."""


class Kind(enum.Enum):
    ADDED = "A"
    CHANGED = "C"
    DELETED = "D"
    #: In the upper, but the merged view is the same as the lowers' (a parent of
    #: changes, an unchanged copy-up).
    SAME = " "


#: The aspects of a change ``diff`` reports; the last four are metadata.
ASPECTS = ("type", "content", "mode", "owner", "times", "xattrs")
METADATA = frozenset({"mode", "owner", "times", "xattrs"})


@dataclass(slots=True)
class Change:
    """One path of the merged view the upper changes (or holds unchanged)."""

    path: Path
    kind: Kind
    #: lstat of the upper object (None for a deletion).
    st: os.stat_result | None = None
    #: lstat of what the path showed before, in the lowers (None when added).
    lower: os.stat_result | None = None
    #: For CHANGED: which of ASPECTS differ.
    aspects: frozenset[str] = frozenset()
    #: Visible xattrs of the upper object (the union's own never included).
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    #: The owner the object shows (ownership metadata applied): (uid, gid).
    owner: tuple[int, int] = (0, 0)
    #: A directory that hides lower contents (opaque, and the lower is non-empty).
    opaque: bool = False
    #: An earlier path of the same upper inode: this one is a hard link to it.
    link: Path | None = None
    #: A hard-linked lower file copied up: its lower names not linked up yet.
    pending_links: int = 0
    #: For DELETED: whether the deleted object was a directory.
    was_dir: bool = False
    #: For DELETED: hidden by an opaque directory above (or at) its parent, so an
    #: exported layer needs no whiteout of its own for it.
    in_opaque: bool = False
    #: For DELETED: inside a directory the upper replaced by a non-directory (no
    #: whiteout can be written there, and none is needed).
    under_nondir: bool = False

    @property
    def is_dir(self) -> bool:
        return self.st is not None and stat_mod.S_ISDIR(self.st.st_mode)

    @property
    def metadata_only(self) -> bool:
        return self.kind is Kind.CHANGED and bool(self.aspects) and self.aspects <= METADATA

    def display(self) -> str:
        """``/a/b`` as printable text (undecodable bytes as ``\\xNN``)."""
        return "/" + b"/".join(self.path).decode("utf-8", "backslashreplace")


# -- ownership ----------------------------------------------------------------------


def owner_of(st: os.stat_result, xattrs: dict[bytes, bytes]) -> tuple[int, int]:
    """The owner an object shows: THE one place where rootless ownership metadata applies.

    A rootless mount or unpack cannot chown, so it keeps the intended owner in
    an xattr (``user.containers.override_stat``, ``user.rootlesscontainers``,
    ...: ``unionfs.ownership``) or, for objects that cannot carry user xattrs
    (symlinks, fifos), in the layer's side table; ``xattrs`` are the object's
    xattrs with those included; the override's mode and type apply through
    ``shown``.  (The scanner itself goes through ``override_of``, which also
    reads the side table.)
    """
    ov = ownership.from_xattrs(xattrs)
    return (st.st_uid, st.st_gid) if ov is None else (ov.uid, ov.gid)


def override_of(
    table: dict[bytes, ownership.Override], path: Path, xattrs: dict[bytes, bytes]
) -> ownership.Override | None:
    """The ownership metadata of the object at ``path``: its layer's side table
    first (as the image writer and the mount read it), then its xattrs."""
    ov = table.get(b"/".join(path)) if table else None
    if ov is None and xattrs:
        ov = ownership.from_xattrs(xattrs)
    return ov


#: Xattrs that carry ownership metadata rather than user data (see owner_of):
#: never exported or compared as such.
OWNERSHIP_XATTRS: frozenset[bytes] = ownership.OWNERSHIP_XATTRS


def user_xattrs(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """``xattrs`` without the ownership metadata."""
    return {k: v for k, v in xattrs.items() if k not in OWNERSHIP_XATTRS}


class ShownStat:
    """An lstat with the mode, type, owner and device numbers its ownership metadata records.

    A rootless mount cannot set set-id bits on, chown or mknod what it copies
    up or creates: the real file is the user's (0755 for a 4755 root file) and
    the truth is in the override xattr.  A tool must read the object as the
    mount shows it, or a commit loses set-id bits and device nodes.  The other
    fields (size, times, inode, links) are the real ones.
    """

    __slots__ = ("_real", "st_gid", "st_mode", "st_rdev", "st_uid")

    def __init__(self, real: os.stat_result, ov: ownership.Override) -> None:
        self._real = real
        self.st_mode, self.st_uid, self.st_gid, self.st_rdev = ownership.shown_stat(real, ov)

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


def shown(st: os.stat_result, xattrs: dict[bytes, bytes]) -> os.stat_result:
    """``st`` as the mount shows it, given the object's xattrs (ownership ones included)."""
    return shown_with(st, ownership.from_xattrs(xattrs))


def shown_with(st: os.stat_result, ov: ownership.Override | None) -> os.stat_result:
    """``st`` with the override ``ov`` (None: as it is)."""
    return st if ov is None else ShownStat(st, ov)  # type: ignore[return-value]


# -- reading one object -------------------------------------------------------------


def _xattr_path(dir_fd: int, name: bytes | None) -> bytes:
    base = b"/proc/self/fd/%d" % dir_fd
    return base if name is None else base + b"/" + name


def list_xattrs(dir_fd: int, name: bytes | None) -> list[bytes]:
    try:
        return [
            os.fsencode(x)
            for x in os.listxattr(_xattr_path(dir_fd, name), follow_symlinks=name is None)
        ]
    except OSError as e:
        if e.errno in _NO_XATTR:
            return []
        raise


def read_xattrs(dir_fd: int, name: bytes | None, names: list[bytes]) -> dict[bytes, bytes]:
    """The values of the non-private xattrs among ``names`` (ownership ones included)."""
    out: dict[bytes, bytes] = {}
    path = _xattr_path(dir_fd, name)
    for x in sorted(names):
        if markers.is_private_xattr(x):
            continue
        try:
            out[x] = os.getxattr(path, x, follow_symlinks=name is None)
        except OSError as e:
            if e.errno not in (*_NO_XATTR, errno.EPERM, errno.EACCES):
                raise
    return out


def same_content(fd_a: int, fd_b: int) -> bool:
    """Do two open files hold the same bytes? (Sizes already equal.)"""
    off = 0
    while True:
        a = os.pread(fd_a, _CHUNK, off)
        b = os.pread(fd_b, _CHUNK, off)
        if a != b:
            return False
        if not a:
            return True
        off += len(a)


# -- the walk -----------------------------------------------------------------------


@dataclass(slots=True)
class _Dir:
    """An upper directory being walked, and its counterpart in the lowers."""

    path: Path
    fd: int
    #: The lower stack's entry at this path, when it is a directory.
    lower: Entry | None
    #: The lowers below do not merge here (opaque here or above, or lower not a dir).
    cut: bool
    #: Its names, when listed already (its opacity needed them).
    names: set[bytes] | None = None


class Scanner:
    """Reads one upper against one lower stack; ``changes()`` gives the stream.

    The lowers are opened once (a ``LayerStack`` without upper); the upper is
    opened by ``changes()``.  ``warnings`` collects what a caller should tell
    the user (hard-linked lower names not linked up yet).
    """

    def __init__(self, upper: str, lowers: list[str] | tuple[str, ...]) -> None:
        raise_fd_limit()  # the layer stack caches a descriptor per lower directory
        self.upper = upper
        self.stack = LayerStack(list(lowers), None)
        self.warnings: list[str] = []
        self._links: dict[tuple[int, int], Path] = {}
        #: The upper's ownership side table (read when ``changes()`` opens it).
        self._table: dict[bytes, ownership.Override] = {}
        #: The lowers' side tables, read on first use: layer index -> records.
        self._lower_tables: dict[int, dict[bytes, ownership.Override]] = {}

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> Scanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lower side -------------------------------------------------------------

    def _lower_lookup(self, parent: _Dir, name: bytes) -> Entry | None:
        if parent.lower is None:
            return None
        assert parent.lower.dir_layers is not None
        return self.stack.lookup(
            parent.path, parent.lower.dir_layers, parent.lower.xwh_layers, name
        )

    def _lower_names(self, entry: Entry, path: Path) -> list[bytes]:
        assert entry.dir_layers is not None
        return sorted(
            n for n, _, _ in self.stack.merged_names(path, entry.dir_layers, entry.xwh_layers)
        )

    def _lower_table(self, layer: int) -> dict[bytes, ownership.Override]:
        table = self._lower_tables.get(layer)
        if table is None:
            try:
                table = ownership.read_table(self.stack.layers[layer].fd) or {}
            except OSError:
                table = {}
            self._lower_tables[layer] = table
        return table

    def _lower_xattrs(self, entry: Entry, path: Path) -> dict[bytes, bytes]:
        dir_fd = self.stack.dirfd(entry.layer, path[:-1])
        try:
            return read_xattrs(dir_fd, path[-1], list_xattrs(dir_fd, path[-1]))
        except OSError:
            return {}

    def _lower_same_content(self, entry: Entry, path: Path, up_fd: int, name: bytes) -> bool:
        try:
            lfd = os.open(
                path[-1],
                os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self.stack.dirfd(entry.layer, path[:-1]),
            )
        except OSError:
            return False  # unreadable lower (rootless): call it changed
        try:
            ufd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=up_fd)
            try:
                return same_content(ufd, lfd)
            finally:
                os.close(ufd)
        finally:
            os.close(lfd)

    def _lower_target(self, entry: Entry, path: Path) -> bytes | None:
        try:
            return os.readlink(path[-1], dir_fd=self.stack.dirfd(entry.layer, path[:-1]))
        except OSError:
            return None

    # -- comparing ----------------------------------------------------------------

    def _aspects(
        self,
        parent: _Dir,
        name: bytes,
        st: os.stat_result,
        xattrs: dict[bytes, bytes],
        owner: tuple[int, int],
        entry: Entry,
    ) -> frozenset[str]:
        path = (*parent.path, name)
        lxattrs = self._lower_xattrs(entry, path)
        lov = override_of(self._lower_table(entry.layer), path, lxattrs)
        lst = shown_with(entry.st, lov)
        if stat_mod.S_IFMT(st.st_mode) != stat_mod.S_IFMT(lst.st_mode):
            return frozenset({"type"})
        out = set()
        if stat_mod.S_ISREG(st.st_mode):
            if st.st_size != lst.st_size or not self._lower_same_content(
                entry, path, parent.fd, name
            ):
                out.add("content")
        elif stat_mod.S_ISLNK(st.st_mode):
            if os.readlink(name, dir_fd=parent.fd) != self._lower_target(entry, path):
                out.add("content")
        elif (stat_mod.S_ISCHR(st.st_mode) or stat_mod.S_ISBLK(st.st_mode)) and (
            st.st_rdev != lst.st_rdev
        ):
            out.add("content")
        if not stat_mod.S_ISLNK(st.st_mode) and (
            stat_mod.S_IMODE(st.st_mode) != stat_mod.S_IMODE(lst.st_mode)
        ):
            out.add("mode")
        if owner != (lst.st_uid, lst.st_gid):
            out.add("owner")
        lxattrs = user_xattrs(lxattrs)
        if st.st_mtime_ns != lst.st_mtime_ns:
            out.add("times")
        if xattrs != lxattrs:
            out.add("xattrs")
        return frozenset(out)

    # -- markers ------------------------------------------------------------------

    def _opacity(self, fd: int, names: set[bytes], path: Path) -> Opacity:
        xnames = list_xattrs(fd, None)
        for x in xnames:
            if x in markers.OPAQUE_XATTRS:
                value = os.getxattr(_xattr_path(fd, None), x) or b""
                if value[:1] not in (b"y", b"x", b"n"):
                    raise ScanError(f"{_show(path)}: {x.decode()} has the value {value!r}")
        opacity = markers.opacity_from_xattrs(
            xnames, lambda x: os.getxattr(_xattr_path(fd, None), x)
        )
        if markers.OPAQUE_NAME in names:
            return Opacity.OPAQUE
        return opacity

    def _check_marker_file(self, fd: int, name: bytes, path: Path) -> None:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat_mod.S_ISREG(st.st_mode) or st.st_size != 0:
            raise ScanError(f"{_show((*path, name))}: an OCI marker that is not an empty file")

    # -- the walk ------------------------------------------------------------------

    def changes(self) -> Iterator[Change]:
        """The upper's changes in tar order (see the module doc)."""
        try:
            root_fd = os.open(self.upper, _DIR_FLAGS)
        except OSError as e:
            raise ScanError(f"{self.upper}: {e.strerror}") from None
        try:
            self._table = ownership.read_table(root_fd) or {}
        except OSError as e:
            os.close(root_fd)
            raise ScanError(f"{self.upper}: the ownership side table: {e.strerror}") from None
        root = _Dir((), root_fd, self.stack.root_entry(), False)
        stack: list[tuple[_Dir, Iterator[Change]]] = [(root, self._dir_changes(root))]
        try:
            while stack:
                d, it = stack[-1]
                item = next(it, None)
                if item is None:
                    stack.pop()
                    os.close(d.fd)
                    continue
                if isinstance(item, _Dir):
                    stack.append((item, self._dir_changes(item)))
                    continue
                yield item
        finally:
            for d, _ in stack:
                with contextlib.suppress(OSError):
                    os.close(d.fd)

    def _dir_changes(self, d: _Dir) -> Iterator:
        """This directory's deletions, then its entries (a subdirectory as a _Dir)."""
        names = d.names
        if names is None:
            try:
                names = _names(d.fd)
            except OSError as e:
                raise ScanError(f"{_show(d.path) or '/'}: {e.strerror}") from None
        d.names = None  # not kept while its subtree is walked
        opacity = self._opacity(d.fd, names, d.path) if d.path else Opacity.MERGE
        oci_gone: set[bytes] = set()
        objects: dict[bytes, os.stat_result] = {}
        gone: set[bytes] = set()
        for name in names:
            if name == markers.OPAQUE_NAME:
                self._check_marker_file(d.fd, name, d.path)
                continue
            if name.startswith(b".wh..wh."):
                continue  # AUFS meta names (the ownership side table): no whiteout
            if markers.is_marker_name(name):
                target = markers.oci_whiteout_target(name)
                if target is None or b"/" in target:
                    raise ScanError(f"{_show((*d.path, name))}: an invalid .wh. name")
                self._check_marker_file(d.fd, name, d.path)
                oci_gone.add(target)
                continue
            st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
            if markers.is_char_whiteout(st.st_mode, st.st_rdev) or (
                opacity is Opacity.HAS_XATTR_WHITEOUTS
                and markers.is_xattr_whiteout(st.st_mode, st.st_size, list_xattrs(d.fd, name))
            ):
                gone.add(name)
                continue
            objects[name] = st
        gone |= oci_gone - objects.keys()
        # Deletions first: what the lowers showed here and the upper hides.
        if d.lower is not None and d.cut:
            for name in self._lower_names(d.lower, d.path):
                if name not in objects:
                    entry = self._lower_lookup(d, name)
                    yield Change(
                        (*d.path, name),
                        Kind.DELETED,
                        lower=entry.st if entry else None,
                        was_dir=bool(entry and entry.is_dir),
                        in_opaque=True,
                    )
        elif d.lower is not None:
            for name in sorted(gone):
                entry = self._lower_lookup(d, name)
                if entry is None:
                    continue  # a whiteout that hides nothing: no change
                yield Change((*d.path, name), Kind.DELETED, lower=entry.st, was_dir=entry.is_dir)
        for name in sorted(objects):
            yield from self._entry(d, name, objects[name])

    def _entry(self, d: _Dir, name: bytes, st: os.stat_result) -> list:
        """The change at one upper entry, then what follows it in the stream (the
        deletions under a directory it replaced, or itself as a _Dir to walk).

        A list, not a generator: this runs once per upper entry.
        """
        path = (*d.path, name)
        entry = None if d.lower is None else self._lower_lookup(d, name)
        is_dir = stat_mod.S_ISDIR(st.st_mode)
        # (list_xattrs and override_of, inline: this runs once per upper entry.)
        try:
            xnames = os.listxattr(b"/proc/self/fd/%d/%s" % (d.fd, name), follow_symlinks=False)
        except OSError as e:
            if e.errno not in _NO_XATTR:
                raise
            xnames = []
        # Most objects have no xattrs: then only the side table can say more.
        xattrs = read_xattrs(d.fd, name, [os.fsencode(x) for x in xnames]) if xnames else {}
        ov = self._table.get(b"/".join(path)) if self._table else None
        if ov is None and xattrs:
            ov = ownership.from_xattrs(xattrs)
        if ov is not None:
            st = ShownStat(st, ov)  # type: ignore[assignment]
        owner = (st.st_uid, st.st_gid)
        if xattrs:
            xattrs = user_xattrs(xattrs)
        change = Change(path, Kind.ADDED, st=st, xattrs=xattrs, owner=owner)
        if entry is not None:
            change.lower = entry.st
            change.aspects = self._aspects(d, name, st, xattrs, owner, entry)
            change.kind = Kind.CHANGED if change.aspects else Kind.SAME
        if not is_dir:
            if st.st_nlink > 1:
                self._note_link(change, d.fd, name)
            if entry is None or not entry.is_dir:
                return [change]
            # A directory replaced by a non-directory: its contents are gone too.
            out: list = [change]
            for child in self._lower_names(entry, path):
                sub = self.stack.lookup(path, entry.dir_layers, entry.xwh_layers, child)
                out.append(
                    Change(
                        (*path, child),
                        Kind.DELETED,
                        lower=sub.st if sub else None,
                        was_dir=bool(sub and sub.is_dir),
                        in_opaque=True,
                        under_nondir=True,
                    )
                )
            return out
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=d.fd)
        except OSError as e:
            raise ScanError(f"{_show(path)}: {e.strerror}") from None
        try:
            sub_names = _names(fd)
            opaque = self._opacity(fd, sub_names, path) is Opacity.OPAQUE
        except BaseException:
            os.close(fd)
            raise
        lower_dir = entry if entry is not None and entry.is_dir else None
        cut = d.cut or opaque or lower_dir is None
        if opaque and not d.cut and lower_dir is not None:
            change.opaque = bool(self._lower_names(lower_dir, path))
            if change.opaque and change.kind is Kind.SAME:
                change.kind = Kind.CHANGED
        return [change, _Dir(path, fd, lower_dir, cut, sub_names)]

    def _note_link(self, change: Change, dir_fd: int, name: bytes) -> None:
        """Hard links: later names of one upper inode point at the first."""
        st = change.st
        assert st is not None
        if st.st_nlink < 2:
            return
        key = (st.st_dev, st.st_ino)
        first = self._links.get(key)
        if first is None:
            self._links[key] = change.path
        else:
            change.link = first
        for ns in (b"trusted.", b"user."):
            try:
                value = os.getxattr(
                    _xattr_path(dir_fd, name),
                    ns + b"overlay.unionfs.lowerlinks",
                    follow_symlinks=False,
                )
            except OSError:
                continue
            if value.isdigit() and int(value) > 0 and first is None:
                change.pending_links = int(value)
                self.warnings.append(
                    f"{change.display()}: a hard-linked lower file with {int(value)} other"
                    " name(s) not linked up yet (they show its new content only through a"
                    " mount: stat them there first)"
                )
            break


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector paused (as it was after).

    A scan makes an object or three per entry and keeps them (Change, its
    stat, its xattrs), and apply and export make more per change: with the
    collector on, its passes over all of them cost a fifth of an apply of
    10,000 files.  None of them is in a reference cycle: reference counting
    frees them all the same.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _names(fd: int) -> set[bytes]:
    """The names in an open directory, as bytes (listed through its descriptor's
    /proc name: ``os.listdir(fd)`` gives str, decoded and encoded again per name)."""
    return set(os.listdir(b"/proc/self/fd/%d" % fd))


def _show(path: Path) -> str:
    return "/" + b"/".join(path).decode("utf-8", "backslashreplace") if path else "/"


@paused_gc()
def scan(
    upper: str, lowers: list[str] | tuple[str, ...], on_warning: Callable[[str], None] | None = None
) -> list[Change]:
    """All changes of ``upper`` over ``lowers`` (top-down), in tar order."""
    with Scanner(upper, lowers) as s:
        try:
            out = list(s.changes())
        except OSError as e:
            where = os.fsdecode(e.filename) if e.filename else upper
            raise ScanError(f"{where}: {e.strerror}") from None
        for w in s.warnings:
            if on_warning is not None:
                on_warning(w)
        return out
