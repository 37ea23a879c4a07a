"""Namespace changes in the upper: create, remove and rename, with markers.

Each change is made so that a crash at any point leaves a consistent merged
view: objects are finished in the work directory and moved into place with a
single rename (RENAME_EXCHANGE to put a directory where a whiteout was,
RENAME_WHITEOUT to move an object away and leave its whiteout in the same
step).  The rules are overlayfs':

* removing a name that lower layers also hold leaves a whiteout;
* a directory created where a whiteout was is opaque, so the deleted lower
  contents never come back;
* renaming a directory with lower contents first makes it a pure upper
  directory (its visible tree copied up, then marked opaque), so the move is
  one rename; the kernel's EXDEV is never returned.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Callable

from . import markers
from .copyup import CopyUp
from .inodes import InodeTable, Node
from .layers import LayerStack, changes_upper
from .markers import Writer
from .syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, renameat2

#: Makes an object named ``name`` in directory ``dir_fd``; may return an open fd.
Maker = Callable[[int, bytes], int | None]


class Upper:
    """The write side of the union: every change lands here."""

    def __init__(
        self, stack: LayerStack, table: InodeTable, copyup: CopyUp, writer: Writer
    ) -> None:
        self.stack = stack
        self.table = table
        self.copyup = copyup
        self.writer = writer

    # -- queries ---------------------------------------------------------------

    def resolve(self, parent: Node, name: bytes) -> Node | None:
        """The node at ``parent/name``, live or freshly resolved (not counted)."""
        node = self.table.cached_child(parent, name)
        if node is not None:
            return node
        assert parent.dir_layers is not None
        entry = self.stack.lookup(parent.path(), parent.dir_layers, parent.xwh_layers, name)
        return None if entry is None else self.table.node_for(parent, name, entry)

    def lower_has(self, parent: Node, name: bytes) -> bool:
        """Would ``name`` show from a lower layer if the upper had nothing there?"""
        assert parent.dir_layers is not None
        lowers = tuple(layer for layer in parent.dir_layers if layer != 0)
        if not lowers:
            return False
        return self.stack.lookup(parent.path(), lowers, parent.xwh_layers, name) is not None

    def is_empty(self, node: Node) -> bool:
        assert node.dir_layers is not None
        return not self.stack.merged_names(node.path(), node.dir_layers, node.xwh_layers)

    # -- creating --------------------------------------------------------------

    @changes_upper
    async def create(self, parent: Node, name: bytes, make: Maker, is_dir: bool) -> int | None:
        """Make a new object at ``parent/name`` in the upper (the name is free).

        Over a whiteout, the object is built in the work dir and swapped in,
        and a directory is made opaque so the lower contents stay deleted.
        """
        if markers.is_marker_name(name):
            raise OSError(errno.EINVAL, "names starting with .wh. cannot be stored in a layer")
        await self.copyup.ensure_dir(parent)
        path = parent.path()
        pfd = self.stack.dirfd(0, path)
        fd = None
        made = False
        if not is_dir:
            # The usual case, a free name: every maker is exclusive (O_EXCL, mknod,
            # symlink, link), so try it first and look at the name only if taken.
            try:
                fd = make(pfd, name)
                made = True
            except FileExistsError:
                pass
        oci_wh = self.stack.has_oci_whiteout(0, path, name)
        if not made:
            fd = self._make_over(parent, name, make, is_dir, oci_wh)
        if oci_wh:
            os.unlink(markers.oci_whiteout_name(name), dir_fd=pfd)
        return fd

    def _make_over(
        self, parent: Node, name: bytes, make: Maker, is_dir: bool, oci_wh: bool
    ) -> int | None:
        """Make ``parent/name`` where the upper has nothing or a whiteout (or, for a
        directory, where a lower one must stay hidden): built in the work dir and
        swapped in unless the name is simply free."""
        path = parent.path()
        pfd = self.stack.dirfd(0, path)
        st = self.stack.lstat(0, path, name)
        if st is not None and not markers.is_char_whiteout(st.st_mode, st.st_rdev):
            raise OSError(errno.EEXIST, "exists in the upper")
        if st is None and not (is_dir and (oci_wh or self.lower_has(parent, name))):
            return make(pfd, name)
        nest = self._nest_with_default_acl(path)
        work = self.copyup.work_fd if nest is None else nest[0]
        tmp = self.copyup.temp_name()
        try:
            fd = make(work, tmp)
            try:
                self._swap_in(work, tmp, pfd, name, replacing=st is not None, is_dir=is_dir)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                if nest is None:
                    self._remove_work(tmp)
                raise
        finally:
            if nest is not None:
                os.close(nest[0])
                self._remove_work(nest[1])
        return fd

    @changes_upper
    async def link_alias(self, parent: Node, name: bytes, node: Node) -> None:
        """Make ``parent/name`` a name of ``node`` in the upper: a lower object is
        copied up there (a hard-linked one is linked to its indexed copy if it
        has one), the lower name of a copied-up file becomes a link to the copy."""
        await self.copyup.ensure_dir(parent)
        if node.layer != 0:
            self.table.readdress(node, parent, name)
            await self.copyup.copy_up(node)  # finds the index entry and links it
            return
        self.copyup.link_index_entry(node, self.stack.dirfd(0, parent.path()), name)

    # -- removing --------------------------------------------------------------

    @changes_upper
    async def remove(self, parent: Node, name: bytes, want_dir: bool) -> Node:
        """unlink/rmdir ``parent/name``, leaving a whiteout where lowers have it."""
        node = self.resolve(parent, name)
        if node is None:
            raise OSError(errno.ENOENT, "no such entry")
        if want_dir and not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if not want_dir and node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if want_dir and not self.is_empty(node):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        await self.copyup.ensure_dir(parent)
        path = parent.path()
        layer = node.layer
        # The lower object, looked at once: hard links, the whiteout, identities.
        below = None if layer == 0 else self.stack.lstat(layer, path, name)
        in_upper = layer == 0
        if not node.is_dir:
            in_upper = await self._up_if_hard_linked(node, parent, name, below)
        gone = below if node.layer == layer != 0 else self.stack.lstat(node.layer, path, name)
        pfd = self.stack.dirfd(0, path)
        # A lower object shown at this name: the lowers have it, no need to look.
        whiteout = (layer != 0 and below is not None) or self.lower_has(parent, name)
        if whiteout and not in_upper and gone is not None:
            self.copyup.replaced((*path, name), gone)  # copied-up objects were recorded then
        if in_upper and whiteout and self.writer.fmt == "kernel":
            tmp = self._work_whiteout()
            renameat2(self.copyup.work_fd, tmp, pfd, name, RENAME_EXCHANGE)
            self._remove_work(tmp)
        else:
            if in_upper:
                if node.is_dir:
                    self._clear_markers((*path, name))
                    os.rmdir(name, dir_fd=pfd)
                else:
                    os.unlink(name, dir_fd=pfd)
            if whiteout:
                self._make_whiteout(pfd, name)
        if node.is_dir:
            self.stack.forget_dir(0, (*path, name))
        self.table.unlink_name(parent, name)
        await self._detach(node, parent, name, gone)
        return node

    async def _up_if_hard_linked(
        self, node: Node, parent: Node, name: bytes, below: os.stat_result | None = None
    ) -> bool:
        """Is non-directory ``parent/name`` in the upper, once linked up if needed?

        One name of a lower file with several is linked up to the (indexed)
        copy before it is removed or replaced, as overlayfs' index=on does, so
        that the other names count one link less once it is gone.  ``below``:
        the lstat of the node's lower object, if the caller has it.
        """
        path = parent.path()
        if self.stack.lstat(0, path, name) is not None:
            return True
        if below is None and node.layer != 0:
            below = self.stack.lstat(node.layer, path, name)
        if node.layer == 0 or (below is not None and below.st_nlink > 1):
            await self.link_alias(parent, name, node)
            return True
        return False

    async def _detach(
        self, node: Node, parent: Node, name: bytes, gone: os.stat_result | None
    ) -> None:
        """``parent/name`` (which was ``gone``) no longer names ``node``: serve it by
        another of its names."""

        def still_names(p: Node, n: bytes) -> bool:
            assert p.dir_layers is not None
            try:
                entry = self.stack.lookup(p.path(), p.dir_layers, p.xwh_layers, n)
            except OSError:
                return False
            if entry is None:
                return False
            if entry.layer == 0 and gone is not None:  # the same upper file, whatever its number
                return (entry.st.st_dev, entry.st.st_ino) == (gone.st_dev, gone.st_ino)
            return self.table.number_of(entry) == node.ino

        self.table.detach(node, parent, name, still_names, gone)
        if not node.is_dir and not node.unlinked and node.layer == 0 and node.parent is not None:
            # Its new name may be a lower name of the copy: linked to the copy.
            await self._to_upper(node, node.parent, node.name)

    def _work_whiteout(self) -> bytes:
        tmp = self.copyup.temp_name()
        if not self.copyup.link_whiteout(self.copyup.work_fd, tmp):
            os.mknod(tmp, stat_mod.S_IFCHR, 0, dir_fd=self.copyup.work_fd)
        return tmp

    def _make_whiteout(self, dir_fd: int, name: bytes) -> None:
        """A whiteout at ``dir_fd/name``: in the kernel format a link of the shared one."""
        if self.writer.fmt != "kernel" or not self.copyup.link_whiteout(dir_fd, name):
            self.writer.make_whiteout(dir_fd, name)

    def _swap_in(
        self, work: int, tmp: bytes, pfd: int, name: bytes, replacing: bool, is_dir: bool
    ) -> None:
        """Move a new object built as ``tmp`` in ``work`` to ``pfd/name``, over a whiteout if
        ``replacing``; a directory is made opaque first, so the lower one stays deleted."""
        if is_dir:
            dfd = os.open(tmp, _PATH_DIR, dir_fd=work)
            try:
                self.writer.set_opaque(dfd)
            finally:
                os.close(dfd)
        if not replacing:
            renameat2(work, tmp, pfd, name, RENAME_NOREPLACE)
        elif is_dir:
            renameat2(work, tmp, pfd, name, RENAME_EXCHANGE)
            os.unlink(tmp, dir_fd=work)
        else:
            renameat2(work, tmp, pfd, name, 0)

    def _nest_with_default_acl(self, path: tuple[bytes, ...]) -> tuple[int, bytes] | None:
        """A work-dir subdirectory carrying the upper dir ``path``'s default ACL, if it has one.

        An object built in the work dir (to replace a whiteout atomically)
        would inherit the work dir's default ACL, not its parent's; built in
        this subdirectory, the kernel applies the parent's ACL and umask rule
        to it, as kernel overlayfs does.  Returns its descriptor and name.
        """
        acl = self.stack.getxattr(0, path, None, DEFAULT_ACL)
        if acl is None:
            return None
        name = self.copyup.temp_name()
        os.mkdir(name, 0o700, dir_fd=self.copyup.work_fd)
        try:
            os.setxattr(self.copyup.work_path(name), DEFAULT_ACL, acl)
            return os.open(name, _PATH_DIR, dir_fd=self.copyup.work_fd), name
        except BaseException:
            self._remove_work(name)
            raise

    def _remove_work(self, name: bytes) -> None:
        self.copyup.remove(name)

    def _clear_markers(self, path: tuple[bytes, ...]) -> None:
        """Empty an upper directory that the merged view already shows as empty."""
        fd = self.stack.dirfd(0, path)
        for name, is_dir, _ in self.stack.scandir(0, path):
            if is_dir:
                raise OSError(errno.ENOTEMPTY, "directory not empty")
            os.unlink(name, dir_fd=fd)

    # -- renaming --------------------------------------------------------------

    async def make_pure_upper(self, node: Node) -> None:
        """Copy a directory's whole visible tree into the upper and make it opaque.

        Each child is copied up atomically, and the merged view is the same
        after every step, so a crash half way leaves nothing wrong behind.
        """
        assert node.dir_layers is not None
        await self.copyup.ensure_dir(node)
        if node.dir_layers == (0,):
            return
        for name, _layer, _is_dir in self.stack.merged_names(
            node.path(), node.dir_layers, node.xwh_layers
        ):
            child = self.resolve(node, name)
            if child is None:
                continue
            await self._to_upper(child, node, name)
        path = node.path()
        self.writer.set_opaque(self.stack.dirfd(0, path))
        self._drop_whiteouts(path)
        node.dir_layers = (0,)
        node.xwh_layers = frozenset()

    def _drop_whiteouts(self, path: tuple[bytes, ...]) -> None:
        """Remove the whiteouts of an upper directory that was just made opaque.

        They hide nothing below an opaque directory, and kernel overlayfs does
        not filter them there: it would list each one (a 0/0 device) under a
        name that lookup says does not exist.  Removed only after the marker is
        set, so that a crash in between changes nothing in the merged view.
        """
        fd = self.stack.dirfd(0, path)
        for name, _is_dir, special in self.stack.scandir(0, path):
            if markers.oci_whiteout_target(name) is not None:  # not the opaque marker
                os.unlink(name, dir_fd=fd)
            elif special:
                st = self.stack.lstat(0, path, name)
                if st is not None and markers.is_char_whiteout(st.st_mode, st.st_rdev):
                    os.unlink(name, dir_fd=fd)

    async def _to_upper(self, node: Node, parent: Node, name: bytes) -> None:
        """Bring ``node`` into the upper at ``parent/name`` (for a hard link, its
        copy may so far be linked under another of its names only)."""
        if node.is_dir:
            assert node.dir_layers is not None
            if any(layer != 0 for layer in node.dir_layers):
                await self.make_pure_upper(node)
        elif node.layer != 0 or self.stack.lstat(0, parent.path(), name) is None:
            await self.link_alias(parent, name, node)
        elif node.metacopy:  # its data is found by its path: fetch it before a move
            await self.copyup.copy_up(node)

    @changes_upper
    async def rename(
        self, old_parent: Node, old: bytes, new_parent: Node, new: bytes, flags: int
    ) -> None:
        src = self.resolve(old_parent, old)
        if src is None:
            raise OSError(errno.ENOENT, "no such entry")
        dst = self.resolve(new_parent, new)
        if markers.is_marker_name(new):
            raise OSError(errno.EINVAL, "names starting with .wh. cannot be stored in a layer")
        if flags & RENAME_NOREPLACE and dst is not None:
            raise OSError(errno.EEXIST, "target exists")
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise OSError(errno.ENOENT, "target does not exist")
            await self._exchange(old_parent, old, src, new_parent, new, dst)
            return
        if flags & ~RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "unsupported rename flags")
        if dst is src:
            return
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            if not src.is_dir and dst.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            if dst.is_dir and not self.is_empty(dst):
                raise OSError(errno.ENOTEMPTY, "directory not empty")

        await self._to_upper(src, old_parent, old)
        await self.copyup.ensure_dir(new_parent)
        dst_gone = None
        if dst is not None:
            if not dst.is_dir:
                await self._up_if_hard_linked(dst, new_parent, new)
            dst_gone = self.stack.lstat(dst.layer, new_parent.path(), new)
            if dst.layer != 0 and dst_gone is not None:  # a lower object renamed over
                self.copyup.replaced((*new_parent.path(), new), dst_gone)
        old_path, new_path = old_parent.path(), new_parent.path()
        ofd, nfd = self.stack.dirfd(0, old_path), self.stack.dirfd(0, new_path)
        leave_whiteout = self.lower_has(old_parent, old)
        dst_st = self.stack.lstat(0, new_path, new)
        dst_is_wh = dst_st is not None and markers.is_char_whiteout(dst_st.st_mode, dst_st.st_rdev)
        if src.is_dir:
            if self.lower_has(new_parent, new) or dst_is_wh:
                self.writer.set_opaque(self.stack.dirfd(0, (*old_path, old)))
            if dst_st is not None and stat_mod.S_ISDIR(dst_st.st_mode):
                self._clear_markers((*new_path, new))
        if src.is_dir and dst_is_wh:
            # A directory cannot replace a whiteout by rename: swap them, and the
            # whiteout lands at the old name, which is what it needs anyway.
            renameat2(ofd, old, nfd, new, RENAME_EXCHANGE)
            if not leave_whiteout:
                os.unlink(old, dir_fd=ofd)
            leave_whiteout = False
        elif leave_whiteout and self.writer.fmt == "kernel":
            try:
                renameat2(ofd, old, nfd, new, RENAME_WHITEOUT)
                leave_whiteout = False
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                    raise
                renameat2(ofd, old, nfd, new, 0)
        else:
            renameat2(ofd, old, nfd, new, 0)
        if leave_whiteout:
            self._make_whiteout(ofd, old)
        if self.stack.has_oci_whiteout(0, new_path, new):
            os.unlink(markers.oci_whiteout_name(new), dir_fd=nfd)
        if src.is_dir:
            self.stack.forget_dir(0, (*old_path, old))
            self.stack.forget_dir(0, (*new_path, new))
        self.table.unlink_name(new_parent, new)
        self.table.unlink_name(old_parent, old)
        if dst is not None:
            await self._detach(dst, new_parent, new, dst_gone)
        self.table.move(src, (old_parent, old), new_parent, new)

    async def _exchange(
        self, op: Node, old: bytes, src: Node, np: Node, new: bytes, dst: Node
    ) -> None:
        await self._to_upper(src, op, old)
        await self._to_upper(dst, np, new)
        old_path, new_path = op.path(), np.path()
        for node, parent, name in ((src, np, new), (dst, op, old)):
            if node.is_dir and self.lower_has(parent, name):
                self.writer.set_opaque(self.stack.dirfd(0, node.path()))
        renameat2(
            self.stack.dirfd(0, old_path), old, self.stack.dirfd(0, new_path), new, RENAME_EXCHANGE
        )
        for node, path, name in ((src, old_path, old), (dst, new_path, new)):
            if node.is_dir:
                self.stack.forget_dir(0, (*path, name))
        self.table.unlink_name(op, old)
        self.table.unlink_name(np, new)
        self.table.move(src, (op, old), np, new)
        self.table.move(dst, (np, new), op, old)


_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The xattr of a directory's default ACL, which new objects in it inherit.
DEFAULT_ACL = b"system.posix_acl_default"
