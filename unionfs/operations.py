"""The pyfuse3 Operations class: translates FUSE requests into the union's terms.

Handlers stay thin: they find nodes in the inode table, ask the layer stack
(or copy-up) to do the work, and build replies.  Every handler runs under
``_guard``: an ``OSError`` becomes its errno, and anything unexpected is
logged with its traceback and answered EIO, because an exception escaping a
pyfuse3 handler stops the whole file system and strands every process that
uses the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3

from . import markers
from .inodes import InodeTable, Node
from .layers import Entry, LayerStack
from .options import MountConfig

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: Advertised block size: CPython's buffered I/O sizes its buffer from it, so a
#: large value means fewer, bigger WRITE requests (16x fewer at 4 KiB -> 128 KiB).
BLKSIZE = 128 * 1024


def _guard(fn: F) -> F:
    """Map every failure of a handler to an errno reply; never let one escape."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


@dataclass(slots=True)
class DirHandle:
    """An open directory: the merged listing, taken once per opendir.

    Offsets are list indices + 1, so seekdir/telldir and concurrent readers
    (each with its own handle) see every name exactly once.
    """

    node: Node
    names: list[tuple[bytes, int, bool]] | None = None


class UnionOperations(pyfuse3.Operations):
    """FUSE request handlers for the merged view."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, stack: LayerStack, config: MountConfig) -> None:
        super().__init__()
        self.stack = stack
        self.config = config
        self.table = InodeTable(stack)
        self._dirs: dict[int, DirHandle] = {}
        self._files: dict[int, int] = {}
        self._next_fh = 1

    # -- helpers ---------------------------------------------------------------

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """The single place where replies' attributes and timeouts are made."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.config.entry_timeout
        a.attr_timeout = self.config.attr_timeout
        a.st_mode = st.st_mode
        # Like overlayfs: counting subdirectories of a merged directory is not
        # worth it, and nlink=1 tells find not to rely on the count.
        a.st_nlink = 1 if node.dir_layers is not None and len(node.dir_layers) > 1 else st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = max(BLKSIZE, st.st_blksize)
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _stat(self, node: Node) -> os.stat_result:
        """Fresh lstat of the node's topmost real object."""
        if node.is_dir:
            return self.stack.stat_dir(node.layer, node.path())
        st = self.stack.lstat(node.layer, node.dirpath(), node.name)
        if st is None:
            raise OSError(errno.ESTALE, "object vanished from its layer")
        return st

    def _resolve(self, parent: Node, name: bytes) -> Entry | None:
        assert parent.dir_layers is not None
        return self.stack.lookup(parent.path(), parent.dir_layers, parent.xwh_layers, name)

    def _dir(self, inode: int) -> Node:
        node = self.table[inode]
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return node

    def _negative(self) -> pyfuse3.EntryAttributes:
        """A cacheable "no such name" reply (st_ino 0), so misses are not re-asked."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = self.config.negative_timeout
        return a

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- lookup and attributes -------------------------------------------------

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.parent or parent
        else:
            node = self.table.cached_child(parent, name)
            if node is None:
                entry = self._resolve(parent, name)
                if entry is None:
                    return self._negative()
                node = self.table.node_for(parent, name, entry)
                attrs = self._attrs(node, entry.st)
                self.table.ref(node)
                return attrs
        attrs = self._attrs(node, self._stat(node))
        self.table.ref(node)
        return attrs

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        try:
            for inode, n in inode_list:
                self.table.forget(inode, n)
        except Exception:  # forget has no reply; it must never raise
            log.exception("error in forget")

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.table[inode]
        return self._attrs(node, self._stat(node))

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.table[inode]
        return os.readlink(node.name, dir_fd=self.stack.dirfd(node.layer, node.dirpath()))

    # -- directories -----------------------------------------------------------

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._dir(inode)
        fh = self._new_fh()
        self._dirs[fh] = DirHandle(node)
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        node = handle.node
        assert node.dir_layers is not None
        if handle.names is None:
            handle.names = self.stack.merged_names(node.path(), node.dir_layers, node.xwh_layers)
        names = handle.names
        pos = start_id
        if pos == 0:
            if not pyfuse3.readdir_reply(token, b".", self._attrs(node, self._stat(node)), 1):
                return
            pos = 1
        if pos == 1:
            up = node.parent or node
            if not pyfuse3.readdir_reply(token, b"..", self._attrs(up, self._stat(up)), 2):
                return
            pos = 2
        dirpath = node.path()
        for i in range(pos - 2, len(names)):
            name, layer, is_dir = names[i]
            child = self.table.cached_child(node, name)
            if child is not None:
                st = self._stat(child)
            else:
                if is_dir:
                    entry = self._resolve(node, name)
                else:
                    st0 = self.stack.lstat(layer, dirpath, name)
                    entry = None if st0 is None else Entry(layer, st0, ino_layer=layer, ino_st=st0)
                if entry is None:  # gone since the listing was taken
                    continue
                child = self.table.node_for(node, name, entry)
                st = entry.st
            if not pyfuse3.readdir_reply(token, name, self._attrs(child, st), i + 3):
                return
            self.table.ref(child)

    @_guard
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.table[inode]
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise OSError(errno.EROFS, "read-only union")
        fd = os.open(
            node.name,
            os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (flags & os.O_NOATIME),
            dir_fd=self.stack.dirfd(node.layer, node.dirpath()),
        )
        fh = self._new_fh()
        self._files[fh] = fd
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._files[fh], size, off)

    @_guard
    async def release(self, fh: int) -> None:
        fd = self._files.pop(fh, None)
        if fd is not None:
            os.close(fd)

    # -- xattrs and statfs -----------------------------------------------------

    def _xattr_target(self, node: Node) -> tuple[int, tuple[bytes, ...], bytes | None]:
        if node.is_dir:
            return node.layer, node.path(), None
        return node.layer, node.dirpath(), node.name

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if markers.is_private_xattr(name):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node = self.table[inode]
        layer, dirpath, fname = self._xattr_target(node)
        path = self.stack.xattr_path(layer, dirpath, fname)
        return os.getxattr(path, name, follow_symlinks=fname is None)

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self.table[inode]
        layer, dirpath, fname = self._xattr_target(node)
        return markers.visible_xattrs(self.stack.listxattr(layer, dirpath, fname))

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.stack.layers[0].fd)
        out = pyfuse3.StatvfsData()
        for field in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, field, getattr(sv, field))
        return out

    def close(self) -> None:
        """Release every descriptor the handlers still hold (after unmount)."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        self._dirs.clear()
