"""The layer stack: the branches, safe access to them, and the merge rules.

Every branch is opened once as a directory file descriptor, and everything
below it is reached relative to descriptors, one path component at a time,
with ``O_NOFOLLOW``: no symlink, ``..`` or rename inside a branch can make the
daemon touch anything outside it.  Directory descriptors are kept in a bounded
LRU keyed by (layer, path), so a lookup in a directory the kernel has just
listed costs one ``fstatat`` per layer and no path walk.

Layer 0 is the upper when there is one; lowers follow top-down, as in
overlayfs' ``lowerdir=`` (leftmost on top).

Paths are tuples of byte-string components relative to a branch root; names
are bytes end to end, so non-UTF-8 names survive untouched.
"""

from __future__ import annotations

import errno
import functools
import os
import stat as stat_mod
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import markers
from .markers import Opacity

Path = tuple[bytes, ...]

#: A lookup that misses in a lower directory this small (``st_size``: one to a
#: few blocks, up to ~1,000 names on ext4) reads its names at once; from then
#: on misses and OCI whiteout checks there cost no syscall.
NAME_INDEX_SMALL_DIR = 32 * 1024
#: A bigger directory is read once its misses, each of this many bytes of its
#: ``st_size``, add up to the whole: listing costs about what ~16 names' worth
#: of misses cost, so a few lookups in a huge directory never list it.
NAME_INDEX_MISS_BYTES = 512
#: Lower directories whose size and misses are tracked before they are read.
NAME_INDEX_PENDING = 65536
#: Names kept in those per-layer sets, all directories together (the oldest
#: read go first beyond).
NAME_INDEX_MAX_NAMES = 1_000_000

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MISSING = (errno.ENOENT, errno.ENOTDIR)
#: Cold directories remembered as read ahead (then forgotten all at once).
_COLD_KEPT = 65536
_clock = time.perf_counter_ns
_NO_XATTR = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)
_NO_LAYERS: frozenset[int] = frozenset()


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def changes_upper(fn: F) -> F:
    """Mark a method (of an object with a ``stack``) that changes the upper.

    Bumps the stack's generation when it ends, however it ends, so merged
    listings cached before or during the change are not served after it.
    """

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(self, *args, **kwargs)
        finally:
            self.stack.generation += 1

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Layer:
    """One branch of the union."""

    index: int
    path: str
    fd: int
    dev: int
    writable: bool


def _any_marker(names: frozenset[bytes]) -> bool:
    """Does any name start with ``.wh.``?  (One pass in C over the joined names:
    a generator over them cost ~0.4 us a name, once per listed directory.)"""
    joined = b"/".join(names)  # "/" is in no name
    return joined.startswith(markers.WHITEOUT_PREFIX) or b"/" + markers.WHITEOUT_PREFIX in joined


@dataclass(frozen=True, slots=True)
class Names:
    """The names one lower directory holds, read once.

    ``markers``: whether any is a ``.wh.`` name (an OCI whiteout or the opaque
    marker), so the common directory answers those checks without building
    the marker's name.
    """

    names: frozenset[bytes]
    markers: bool


@dataclass(slots=True)
class Entry:
    """What a name resolves to across the stack.

    For a non-directory only ``layer`` and ``st`` matter.  For a directory,
    ``dir_layers`` lists the layers whose directories merge into it, top-down
    and cut at the first opaque one, and ``xwh_layers`` those whose copy may
    hold xattr whiteouts.  ``ino_layer``/``ino_st`` say whose inode number the
    merged object reports: the topmost *lower* copy of a directory, so that
    its number does not change when a copy-up later creates the upper copy.
    """

    layer: int
    st: os.stat_result
    dir_layers: tuple[int, ...] | None = None
    xwh_layers: frozenset[int] = frozenset()
    ino_layer: int = 0
    ino_st: os.stat_result | None = None
    origin: int | None = None
    lower_links: int | None = None
    #: An upper regular file holding metadata only: its data is a lower file's.
    metacopy: bool = False

    @property
    def is_dir(self) -> bool:
        return self.dir_layers is not None


class LayerStack:
    """The ordered branches and descriptor-relative access to them."""

    def __init__(self, lowers: list[str], upper: str | None, fd_cache_size: int = 1024) -> None:
        self.layers: list[Layer] = []
        self._cache: OrderedDict[tuple[int, Path], int] = OrderedDict()
        self._cache_size = max(16, fd_cache_size)
        self._names: OrderedDict[tuple[int, Path], Names] = OrderedDict()
        self._names_total = 0
        #: Misses so far (and st_size) of big lower directories not read yet.
        self._misses: dict[tuple[int, Path], list[int]] = {}
        #: -o live: asked before a lower directory's names are read to be kept;
        #: True once a watch covers it (watch.py), False: read, not kept.
        self.keep_names: Callable[[int, Path], bool] | None = None
        #: Called with a layer directory's descriptor when an lstat in it took
        #: longer than ``cold_ns`` (it waited for the disk): the C helper reads
        #: the directory ahead of the lookups that follow (_prefetch.c).
        self.on_cold: Callable[[int], object] | None = None
        self.cold_ns = 40_000
        #: Directories handed to ``on_cold`` already (each once; bounded).
        self._cold: set[tuple[int, Path]] = set()
        #: Bumped after every change to the upper's namespace or copy-up; merged
        #: listings cached on directory nodes are valid for one generation.
        self.generation = 0
        #: [hits, misses] of the descriptor cache (``unionfs stats`` shares its
        #: own list here: one increment, where a wrapper around ``dirfd`` cost
        #: ~0.4 us a call).
        self.fd_counts = [0, 0]
        try:
            for path in ([upper] if upper is not None else []) + list(lowers):
                fd = os.open(path, _DIR_FLAGS)
                st = os.fstat(fd)
                writable = upper is not None and not self.layers
                self.layers.append(Layer(len(self.layers), path, fd, st.st_dev, writable))
        except BaseException:
            self.close()
            raise
        self.upper: Layer | None = self.layers[0] if upper is not None else None
        #: The xattr where copy-up records the inode number an object showed
        #: before it was copied (set by the daemon when there is an upper).
        self.origin_xattr: bytes | None = None
        #: The work dir's hard-link index (see CopyUp.link_indexed), if writable.
        self.index_fd: int | None = None
        #: Where an indexed copy records its lower names not linked up yet.
        self.lower_links_xattr: bytes | None = None

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()
        for layer in self.layers:
            os.close(layer.fd)
        self.layers = []

    # -- descriptors -----------------------------------------------------------

    def dirfd(self, layer: int, path: Path) -> int:
        """An O_PATH descriptor of directory ``path`` in ``layer``.

        Walks from the nearest cached ancestor, one component at a time with
        O_NOFOLLOW|O_DIRECTORY, so a symlink anywhere on the way fails with
        ENOTDIR/ELOOP instead of being followed.
        """
        if not path:
            return self.layers[layer].fd
        key = (layer, path)
        fd = self._cache.get(key)
        if fd is not None:
            self.fd_counts[0] += 1
            self._cache.move_to_end(key)
            return fd
        self.fd_counts[1] += 1
        parent = self.dirfd(layer, path[:-1])
        fd = os.open(path[-1], _DIR_FLAGS, dir_fd=parent)
        self._cache[key] = fd
        if len(self._cache) > self._cache_size:
            _, old = self._cache.popitem(last=False)
            os.close(old)
        return fd

    def cached_fds(self) -> int:
        return len(self._cache)

    def forget_dir(self, layer: int, path: Path) -> None:
        """Drop cached descriptors (and remembered names) of ``path`` and below
        (after rename/rmdir; -o live: a lower directory moved or removed)."""
        n = len(path)
        stale = [k for k in self._cache if k[0] == layer and k[1][:n] == path]
        for key in stale:
            os.close(self._cache.pop(key))
        if self.upper is None or layer != 0:
            for key in [k for k in self._names if k[0] == layer and k[1][:n] == path]:
                self.forget_names(*key)
            for key in [k for k in self._misses if k[0] == layer and k[1][:n] == path]:
                del self._misses[key]

    # -- primitives ------------------------------------------------------------

    def lstat(self, layer: int, dirpath: Path, name: bytes) -> os.stat_result | None:
        """lstat of ``name`` in directory ``dirpath`` of ``layer``; None if absent.

        Timed when ``on_cold`` is set (two clock reads): one that waited for
        the disk says the directory is cold, and the next lookups of a
        client walking it would wait too, one after the other.
        """
        fd = -1
        start = _clock() if self.on_cold is not None else 0
        try:
            fd = self.dirfd(layer, dirpath)  # (the directory may be missing here too)
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError as e:
            if e.errno in _MISSING:
                return None
            raise
        finally:
            if start and fd >= 0 and _clock() - start >= self.cold_ns:
                self._went_cold(layer, dirpath, fd)

    def _went_cold(self, layer: int, dirpath: Path, fd: int) -> None:
        """Hand a cold directory to ``on_cold``, once."""
        key = (layer, dirpath)
        if key in self._cold:
            return
        if len(self._cold) >= _COLD_KEPT:
            self._cold.clear()
        self._cold.add(key)
        assert self.on_cold is not None  # (lstat times only when it is set)
        self.on_cold(fd)

    def stat_dir(self, layer: int, path: Path) -> os.stat_result:
        return os.stat(self.dirfd(layer, path))

    def xattr_path(self, layer: int, dirpath: Path, name: bytes | None = None) -> bytes:
        """A /proc path naming an object for the xattr calls, which take no dir_fd.

        The magic link resolves to the directory itself; the final component
        (if any) is then used with follow_symlinks=False by the caller.
        """
        base = b"/proc/self/fd/%d" % self.dirfd(layer, dirpath)
        return base if name is None else base + b"/" + name

    def listxattr(self, layer: int, dirpath: Path, name: bytes | None = None) -> list[bytes]:
        path = self.xattr_path(layer, dirpath, name)
        try:
            return [os.fsencode(x) for x in os.listxattr(path, follow_symlinks=name is None)]
        except OSError as e:
            if e.errno in _NO_XATTR:
                return []
            raise

    def getxattr(self, layer: int, dirpath: Path, name: bytes | None, attr: bytes) -> bytes | None:
        path = self.xattr_path(layer, dirpath, name)
        try:
            return os.getxattr(path, attr, follow_symlinks=name is None)
        except OSError as e:
            if e.errno in _NO_XATTR:
                return None
            raise

    # -- the name index of lower directories -----------------------------------

    def _may_keep(self, layer: int, path: Path) -> bool:
        """May the names of this directory, read from now on, be kept?

        Lower layers never change while mounted, except with -o live, whose
        watch (``keep_names``) must cover the directory before it is read.
        """
        if self.upper is not None and layer == 0:
            return False
        return self.keep_names is None or self.keep_names(layer, path)

    def _remember_names(self, layer: int, path: Path, names: frozenset[bytes]) -> Names:
        """Keep a lower directory's names (``_may_keep`` said yes before reading them)."""
        key = (layer, path)
        self._misses.pop(key, None)
        old = self._names.pop(key, None)
        if old is not None:
            self._names_total -= len(old.names)
        entry = Names(names, _any_marker(names))
        self._names[key] = entry
        self._names_total += len(names)
        while self._names_total > NAME_INDEX_MAX_NAMES and len(self._names) > 1:
            _, dropped = self._names.popitem(last=False)
            self._names_total -= len(dropped.names)
        return entry

    def forget_names(self, layer: int, path: Path) -> None:
        """Drop a lower directory's remembered names (it changed: -o live)."""
        self._misses.pop((layer, path), None)
        old = self._names.pop((layer, path), None)
        if old is not None:
            self._names_total -= len(old.names)

    def _names_after_miss(self, layer: int, path: Path) -> Names | None:
        """A lookup missed in this lower directory: read its names if that pays.

        A small directory is read at its first miss; a big one once its misses
        have cost about what reading it costs (``NAME_INDEX_MISS_BYTES``).
        """
        key = (layer, path)
        pending = self._misses.get(key)
        if pending is None:  # not seen by a lookup (the root, an evicted one)
            try:
                size = os.fstat(self.dirfd(layer, path)).st_size
            except OSError:
                return None
            if len(self._misses) > NAME_INDEX_PENDING:
                self._misses.clear()
            pending = self._misses[key] = [0, size]
        pending[0] += 1
        if pending[1] > NAME_INDEX_SMALL_DIR and pending[0] * NAME_INDEX_MISS_BYTES < pending[1]:
            return None
        if not self._may_keep(layer, path):
            return None
        try:
            names = os.listdir(b"/proc/self/fd/%d" % self.dirfd(layer, path))
        except OSError:
            return None
        return self._remember_names(layer, path, frozenset(names))

    def scandir(self, layer: int, path: Path) -> list[tuple[bytes, bool, bool]]:
        """(name, is_dir, special) for each entry of one layer's directory.

        ``special`` flags devices, fifos and sockets (d_type alone cannot tell
        a 0/0 whiteout from a real device, so those need an lstat).
        """
        keep = self._may_keep(layer, path)
        # By the descriptor's /proc link (the directory itself, as _names_after_miss
        # reads it): a bytes path gives bytes names, with no re-encoding per entry.
        with os.scandir(b"/proc/self/fd/%d" % self.dirfd(layer, path)) as it:
            out = []
            for e in it:
                is_dir = e.is_dir(follow_symlinks=False)
                special = not (is_dir or e.is_file(follow_symlinks=False) or e.is_symlink())
                out.append((e.name, is_dir, special))
        if keep:
            self._remember_names(layer, path, frozenset(n for n, _, _ in out))
        return out

    # -- the merge rules -------------------------------------------------------

    def origin_of(
        self, dirpath: Path, name: bytes | None, xnames: list[bytes] | None
    ) -> int | None:
        """The recorded pre-copy-up inode number of an upper object, if any.

        ``xnames``, when the caller already listed the xattrs, saves the
        getxattr for the common object that has none.
        """
        ox = self.origin_xattr
        if ox is None or (xnames is not None and ox not in xnames):
            return None
        try:
            value = self.getxattr(0, dirpath, name, ox)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                return None
            raise
        try:
            return int(value) if value else None
        except ValueError:
            return None

    def nondir_entry(self, layer: int, dirpath: Path, name: bytes, st: os.stat_result) -> Entry:
        """The Entry of a non-directory found at ``layer``.

        An upper object's xattrs are listed once: they say where its number
        came from (origin) and whether it holds metadata only (metacopy).
        """
        if layer != 0 or self.upper is None:  # a lower file: its own number, no xattrs
            return Entry(layer, st, None, _NO_LAYERS, layer, st)
        xnames = self.listxattr(0, dirpath, name)
        origin = self.origin_of(dirpath, name, xnames)
        metacopy = markers.metacopy_marker(st.st_mode, xnames) is not None
        entry = Entry(layer, st, ino_layer=layer, ino_st=st, origin=origin, metacopy=metacopy)
        if origin is not None and st.st_nlink > 1 and self.lower_links_xattr is not None:
            value = self.getxattr(0, dirpath, name, self.lower_links_xattr)
            entry.lower_links = int(value) if value and value.isdigit() else None
        return entry

    def in_index(self, number: int) -> bool:
        """Has the hard-linked lower file with this number been copied up already?"""
        if self.index_fd is None:
            return False
        try:
            os.stat(b"%d" % number, dir_fd=self.index_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def dir_opacity(self, layer: int, path: Path, names: list[bytes] | None = None) -> Opacity:
        """Opacity of one layer's copy of a directory, from xattrs or the OCI marker.

        A copy the daemon may not read or search (a root-owned 0700 directory
        in a rootless mount) cannot be probed: it counts as merging.  That
        decides nothing anyone can observe, since listing it or looking a name
        up in it fails with EACCES on that copy anyway; failing here instead
        would fail the lookup of the directory itself, and with it the listing
        of its parent (issue 15).
        """
        try:
            if names is None:
                names = self.listxattr(layer, path)
            opacity = Opacity.MERGE  # most directories carry no xattr at all
            if names:
                opacity = markers.opacity_from_xattrs(
                    names, lambda x: self.getxattr(layer, path, None, x)
                )
                if opacity is Opacity.OPAQUE:
                    return opacity
            known = self._names.get((layer, path))
            if known is not None:
                if known.markers and markers.OPAQUE_NAME in known.names:
                    return Opacity.OPAQUE
            elif self.lstat(layer, path, markers.OPAQUE_NAME) is not None:
                return Opacity.OPAQUE
        except PermissionError:
            return Opacity.MERGE
        return opacity

    def has_oci_whiteout(self, layer: int, dirpath: Path, name: bytes) -> bool:
        """Is there a ``.wh.NAME`` beside ``name``? (Names over 251 bytes cannot have one.)"""
        if len(name) > 255 - len(markers.WHITEOUT_PREFIX):
            return False
        return self.lstat(layer, dirpath, markers.oci_whiteout_name(name)) is not None

    def _is_whiteout(
        self, layer: int, dirpath: Path, name: bytes, st: os.stat_result, xwh: bool
    ) -> bool:
        """Is the existing entry ``name`` in this layer a whiteout?"""
        if markers.is_char_whiteout(st.st_mode, st.st_rdev):
            return True
        return xwh and markers.is_xattr_whiteout(
            st.st_mode, st.st_size, self.listxattr(layer, dirpath, name)
        )

    def lookup(
        self, dirpath: Path, dir_layers: tuple[int, ...], xwh_layers: frozenset[int], name: bytes
    ) -> Entry | None:
        """Resolve ``name`` in a merged directory, falling through the layers.

        A non-directory shadows everything below it; directories merge until
        one is opaque; a whiteout hides the name in every layer below its own;
        a non-directory below a directory ends the merge (overlayfs' rule).
        Marker names themselves never resolve.
        """
        if name.startswith(markers.WHITEOUT_PREFIX):  # markers.is_marker_name
            return None
        found: Entry | None = None
        merged: list[int] = []
        xwh: set[int] = set()
        known = self._names
        lstat = self.lstat
        for layer in dir_layers:
            names = known.get((layer, dirpath))
            if names is not None and name not in names.names:
                if names.markers and markers.oci_whiteout_name(name) in names.names:
                    break
                continue
            st = lstat(layer, dirpath, name)
            if st is None:
                if names is None:
                    names = self._names_after_miss(layer, dirpath)
                if names is None:
                    if self.has_oci_whiteout(layer, dirpath, name):
                        break
                elif names.markers and markers.oci_whiteout_name(name) in names.names:
                    break
                continue
            mode = st.st_mode
            if (stat_mod.S_ISCHR(mode) or layer in xwh_layers) and self._is_whiteout(
                layer, dirpath, name, st, layer in xwh_layers
            ):
                break  # (only a char device or an xattr-whiteout layer can hold one)
            if not stat_mod.S_ISDIR(mode):
                if found is None:
                    return self.nondir_entry(layer, dirpath, name, st)
                break
            xnames = None
            child = (*dirpath, name)
            if found is None:
                found = Entry(layer, st, ino_layer=layer, ino_st=st)
                if layer == 0 and self.upper is not None:
                    xnames = self.listxattr(0, child)
                    found.origin = self.origin_of(child, None, xnames)
            elif found.ino_layer == 0 and self.upper is not None:
                found.ino_layer, found.ino_st = layer, st
            merged.append(layer)
            if (layer or self.upper is None) and len(self._misses) < NAME_INDEX_PENDING:
                # Its size decides when its names are read (no fstat then).
                key = (layer, child)
                if key not in self._misses:
                    self._misses[key] = [0, st.st_size]
            if layer == dir_layers[-1]:
                break
            opacity = self.dir_opacity(layer, child, xnames)
            if opacity is Opacity.OPAQUE:
                break
            if opacity is Opacity.HAS_XATTR_WHITEOUTS:
                xwh.add(layer)
        if found is not None:
            found.dir_layers = tuple(merged)
            found.xwh_layers = frozenset(xwh)
        return found

    def merged_names(
        self, dirpath: Path, dir_layers: tuple[int, ...], xwh_layers: frozenset[int]
    ) -> list[tuple[bytes, int, bool]]:
        """The visible entries of a merged directory: (name, top layer, is_dir).

        Each name appears once, in upper-then-lower order.  Whiteouts found in
        a layer hide names only in the layers below it.
        """
        out: list[tuple[bytes, int, bool]] = []
        seen: set[bytes] = set()
        hidden: set[bytes] = set()
        prefix = markers.WHITEOUT_PREFIX
        for layer in dir_layers:
            hides_below: list[bytes] = []
            xwh = layer in xwh_layers
            for name, is_dir, special in self.scandir(layer, dirpath):
                if name.startswith(prefix):  # markers.is_marker_name, once per entry
                    target = markers.oci_whiteout_target(name)
                    if target is not None:
                        hides_below.append(target)
                    continue
                if name in seen or name in hidden:
                    continue
                if special or (xwh and not is_dir):
                    st = self.lstat(layer, dirpath, name)
                    if st is not None and self._is_whiteout(layer, dirpath, name, st, xwh):
                        hides_below.append(name)
                        continue
                seen.add(name)
                out.append((name, layer, is_dir))
            hidden.update(hides_below)
        return out

    # -- metadata-only copies --------------------------------------------------

    def lower_dir(self, path: Path) -> tuple[tuple[int, ...], frozenset[int]]:
        """The lower layers (and xattr-whiteout layers) of merged directory ``path``,
        walked from the root through the lowers only; ``()`` when it is not a
        directory there."""
        layers = tuple(layer.index for layer in self.layers if not layer.writable)
        xwh: frozenset[int] = frozenset()
        for i in range(len(path)):
            if not layers:
                break
            entry = self.lookup(path[:i], layers, xwh, path[i])
            if entry is None or entry.dir_layers is None:
                return (), frozenset()
            layers, xwh = entry.dir_layers, entry.xwh_layers
        return layers, xwh

    def metacopy_data(
        self, dirpath: Path, name: bytes, below: tuple[int, ...], xwh: frozenset[int]
    ) -> tuple[int, Path, bytes, os.stat_result]:
        """Where the data of metacopy upper file ``dirpath/name`` lives:
        (layer, directory, name, lstat) of a regular lower file.

        ``below`` are the lower layers of its parent.  A redirect xattr (kernel
        overlayfs writes one when it renames a metacopy file) names another
        path; without one the data is the same path's in the layers below, as
        in kernel overlayfs.  No such lower file: EIO, as the kernel answers.
        """
        target: Path = (*dirpath, name)
        xnames = self.listxattr(0, dirpath, name)
        redirect = next((x for x in markers.REDIRECT_XATTRS if x in xnames), None)
        if redirect is not None:
            value = self.getxattr(0, dirpath, name, redirect) or b""
            found = markers.redirect_path(value, dirpath)
            if found is None:
                raise OSError(errno.EIO, f"malformed {redirect.decode()} {value!r}")
            target = found
            below, xwh = self.lower_dir(target[:-1])
        entry = self.lookup(target[:-1], below, xwh, target[-1]) if below else None
        if entry is None or not stat_mod.S_ISREG(entry.st.st_mode):
            raise OSError(errno.EIO, "the lower data of a metacopy file is missing")
        return entry.layer, target[:-1], target[-1], entry.st

    def open_metacopy_data(
        self,
        dirpath: Path,
        name: bytes,
        parent_layers: tuple[int, ...],
        xwh: frozenset[int],
        flags: int,
    ) -> tuple[int, int]:
        """Open the lower data of metacopy upper file ``dirpath/name`` for reading:
        (its layer, the descriptor)."""
        below = tuple(i for i in parent_layers if not self.layers[i].writable)
        layer, ddir, dname, _ = self.metacopy_data(dirpath, name, below, xwh)
        keep = flags & (os.O_ACCMODE | os.O_NOATIME)
        fd = os.open(dname, keep | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dirfd(layer, ddir))
        return layer, fd

    def root_entry(self) -> Entry:
        """The merged root: every layer's root merges.

        As in kernel overlayfs, an opaque marker on a layer's root is ignored
        (an OCI layer tar may carry ``./.wh..wh..opq``); ``opaque=x`` still
        announces xattr whiteouts there.
        """
        xwh = {
            layer.index
            for layer in self.layers
            if self.dir_opacity(layer.index, ()) is Opacity.HAS_XATTR_WHITEOUTS
        }
        st = os.fstat(self.layers[0].fd)
        merged = tuple(layer.index for layer in self.layers)
        return Entry(0, st, merged, frozenset(xwh), 0, st)
