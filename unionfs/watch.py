"""``-o live``: follow changes other programs make to the lower layers while mounted.

Without it the daemon and the kernel cache what the lowers hold for the
timeouts (300 s by default), since lowers are read-only by contract.  A
sandbox's lower is the user's live $HOME, which other programs keep
changing, so the view must follow it.

How: an inotify watch on every lower directory the view has read (a lookup
or an opendir in it: only what the kernel can have cached needs one), read by
a trio task.  An event for ``NAME`` in directory ``D`` of a lower drops:

- the daemon's caches: D's remembered names (layers.py), the merged listings
  (the stack's generation), the cached child node of D/NAME (inodes.py) so the
  next lookup resolves it again through the layers, the cached descriptors of
  a directory NAME removed or moved (layers.py);
- the kernel's: the dentry D/NAME (positive or negative), D's attributes and
  cached listing, and NAME's attributes and page cache.

Semantics, as for kernel overlayfs with an upper: an object copied up (or
whited out) is the upper's from then on.  A lower file changed after its
copy-up is not shown, the copy wins; ``unionfs sandbox commit`` notices
such a file through the identity recorded at copy-up and reports it as a
conflict.  A lower directory merges live: names created, removed or renamed
in it show and vanish unless the upper has the same name or a whiteout.

Limits: inotify sees changes made through this mount namespace's view of
the lower filesystem (not, e.g., on another NFS client); watches are bounded
by fs.inotify.max_user_watches (past it, directories fall back to the
timeouts, logged once).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyfuse3
import trio

if TYPE_CHECKING:
    from .inodes import Node
    from .operations import UnionOperations

log = logging.getLogger("unionfs")

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

#: What a watched directory reports: its names' changes and their contents'.
MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_ONLYDIR
    | IN_EXCL_UNLINK
)
#: Events that change which names a directory holds.
NAMESPACE = IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE

_HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


def inotify_init() -> int:
    fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    return fd


def add_watch(fd: int, path: bytes, mask: int = MASK) -> int:
    wd = _libc.inotify_add_watch(fd, path, mask)
    if wd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return wd


def parse_events(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(wd, mask, name) for each ``struct inotify_event`` in ``data``."""
    pos = 0
    while pos + _HEADER.size <= len(data):
        wd, mask, _cookie, length = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        name = data[pos : pos + length].rstrip(b"\0")
        pos += length
        yield wd, mask, name


def coalesce(events: Iterator[tuple[int, int, bytes]]) -> dict[tuple[int, bytes], int]:
    """One entry per (wd, name), the masks or'ed: a burst of writes is one change."""
    out: dict[tuple[int, bytes], int] = {}
    for wd, mask, name in events:
        out[(wd, name)] = out.get((wd, name), 0) | mask
    return out


class LowerWatch:
    """The inotify watches of one mount, and what an event invalidates."""

    def __init__(self, ops: UnionOperations, max_watches: int = 65536) -> None:
        self.ops = ops
        self.stack = ops.stack
        self.table = ops.table
        self.fd = inotify_init()
        self.first_lower = 1 if self.stack.upper is not None else 0
        #: (layer, merged path) -> wd, and back.
        self.watched: dict[tuple[int, tuple[bytes, ...]], int] = {}
        self.by_wd: dict[int, set[tuple[int, tuple[bytes, ...]]]] = {}
        #: Node number -> the merge set it was watched with (a node whose merge
        #: set changes is watched again).
        self._done: dict[int, tuple[int, ...] | None] = {}
        self.max_watches = max_watches
        self._full = False
        ops.on_dir_used = self.use
        self.stack.keep_names = self.covers
        self.use(self.table.root)

    # -- watching --------------------------------------------------------------

    def use(self, node: Node) -> None:
        """Watch ``node``'s lower directories (called on every lookup: cheap when known)."""
        layers = node.dir_layers
        if self._done.get(node.ino, ()) is layers or layers is None or self._full:
            return
        self._done[node.ino] = layers
        try:
            path = node.path()
        except OSError:
            return
        for layer in layers:
            if layer >= self.first_lower and (layer, path) not in self.watched:
                self._add(layer, path)

    def covers(self, layer: int, path: tuple[bytes, ...]) -> bool:
        """Is lower directory ``path`` of ``layer`` watched (added now if it can be)?

        The layer stack asks before it reads a directory's names to keep them:
        names kept without a watch would never be dropped.
        """
        if (layer, path) not in self.watched and layer >= self.first_lower:
            self._add(layer, path)
        return (layer, path) in self.watched

    def _add(self, layer: int, path: tuple[bytes, ...]) -> None:
        if len(self.watched) >= self.max_watches:
            self._limit("the daemon's watch limit")
            return
        try:
            target = b"/proc/self/fd/%d" % self.stack.dirfd(layer, path)
            wd = add_watch(self.fd, target)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self._limit("fs.inotify.max_user_watches")
            return
        self.watched[(layer, path)] = wd
        self.by_wd.setdefault(wd, set()).add((layer, path))

    def _limit(self, what: str) -> None:
        if not self._full:
            log.warning("-o live: %s reached; further lower directories follow the timeouts", what)
        self._full = True

    def _unwatch_below(self, layer: int, path: tuple[bytes, ...]) -> None:
        """Forget the watches of ``path`` and below (it was moved or removed)."""
        n = len(path)
        for key in [k for k in self.watched if k[0] == layer and k[1][:n] == path]:
            wd = self.watched.pop(key)
            keys = self.by_wd.get(wd)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_wd[wd]
                    with contextlib.suppress(OSError):
                        _libc.inotify_rm_watch(self.fd, wd)
        self._done.clear()  # nodes below are watched again when next used
        self._full = False

    # -- events ----------------------------------------------------------------

    async def run(self) -> None:
        """Read events until cancelled (the mount ends)."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                data = b""
                with contextlib.suppress(BlockingIOError):
                    while chunk := os.read(self.fd, 65536):
                        data += chunk
                try:
                    await self.apply(coalesce(parse_events(data)))
                except Exception:
                    log.exception("-o live: an event could not be applied")
        finally:
            self.ops.on_dir_used = None
            self.stack.keep_names = None
            os.close(self.fd)

    async def apply(self, changes: dict[tuple[int, bytes], int]) -> None:
        inodes: set[int] = set()
        for (wd, name), mask in changes.items():
            if mask & IN_Q_OVERFLOW:
                self._overflow(inodes)
                continue
            if mask & IN_IGNORED:
                for key in list(self.by_wd.pop(wd, ())):
                    self.watched.pop(key, None)
                continue
            if not name:
                continue
            for layer, path in list(self.by_wd.get(wd, ())):
                self._changed(layer, path, name, mask, inodes)
        for ino in inodes:
            # In a thread: a page-cache invalidation can wait for a page a
            # reader holds while the kernel waits for this loop's READ reply.
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)

    def _node_at(self, path: tuple[bytes, ...]) -> Node | None:
        node: Node | None = self.table.root
        for part in path:
            assert node is not None
            node = self.table.cached_child(node, part)
            if node is None:
                return None
        return node

    def _changed(
        self, layer: int, path: tuple[bytes, ...], name: bytes, mask: int, inodes: set[int]
    ) -> None:
        """Lower ``layer``'s directory ``path`` changed at ``name``: drop what it stales."""
        self.stack.forget_names(layer, path)
        self.stack.generation += 1  # merged listings are made again
        if mask & IN_ISDIR and mask & (IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE):
            self.stack.forget_dir(layer, (*path, name))
            self._unwatch_below(layer, (*path, name))
        parent = self._node_at(path)
        if parent is None:
            return  # the kernel holds nothing below it any more
        child = self.table.cached_child(parent, name)
        if child is not None and (child.layer != 0 or self.stack.upper is None or child.is_dir):
            # Served from a lower (or a merged directory): resolve it again.
            del parent.children[name]
            child.xattrs = None
            inodes.add(child.ino)
        pyfuse3.invalidate_entry_async(parent.ino, name, ignore_enoent=True)
        inodes.add(parent.ino)

    def _overflow(self, inodes: set[int]) -> None:
        """Events were lost: drop every cache of every watched directory."""
        log.warning("-o live: inotify queue overflow; dropping all cached lower entries")
        self.stack.generation += 1
        for layer, path in list(self.watched):
            self.stack.forget_names(layer, path)
            parent = self._node_at(path)
            if parent is None:
                continue
            inodes.add(parent.ino)
            for name, child in list(parent.children.items()):
                if child.layer != 0 or child.is_dir:
                    del parent.children[name]
                    inodes.add(child.ino)
                pyfuse3.invalidate_entry_async(parent.ino, name, ignore_enoent=True)
