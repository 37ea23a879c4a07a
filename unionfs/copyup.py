"""Copy-up: bringing a lower object into the upper before its first change.

A copy-up is atomic.  The copy is built under ``<workdir>/work/`` (same
filesystem as the upper), given its data, xattrs, owner, mode and times,
fsync'd, and only then renamed into place: a crash or SIGKILL at any moment
leaves either the lower object visible (and a leftover in ``work/``, removed
at the next mount) or the complete copy, never a partial file.  Under
``-o volatile`` (``durable=False``) the fsync is skipped, as kernel overlayfs
skips it: still atomic against a killed daemon, not against a power cut.

A regular file is built as kernel overlayfs builds it: an ``O_TMPFILE`` in
the work directory, filled and given its metadata through its descriptor,
fsync'd, then linked in under its name (``linkat`` fails if the name is
taken, as ``RENAME_NOREPLACE``); a crash leaves no leftover at all.  Other
objects (and file systems without ``O_TMPFILE``) go through a named
temporary and a rename.  As the kernel, only a copy that moved data is
fsync'd: an empty file, a metadata-only copy or one about to be truncated
has nothing a crash could lose, and the journal orders its metadata before
the link that makes it visible.

Data moves as cheaply as the system allows: a reflink (FICLONE) first, then
``copy_file_range`` over the data extents only (SEEK_DATA/SEEK_HOLE), so
sparse files stay sparse, then a plain read/write loop.  A source file
system that cannot clone is not asked again, and a file without holes is
copied without looking for them.  Copies of more than ``THREAD_THRESHOLD``
bytes run in a worker thread so that the daemon keeps answering other
requests meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import shutil
import stat as stat_mod
from collections.abc import Callable
from typing import Any

import trio

from . import markers
from .inodes import Node
from .layers import LayerStack, changes_upper
from .markers import Writer
from .syscalls import FICLONE, RENAME_NOREPLACE, renameat2, start_writeback

log = logging.getLogger(__name__)

THREAD_THRESHOLD = 1 << 20
_CHUNK = 1 << 20
#: A copy that will be fsync'd starts writing out each this many bytes as it goes.
WRITEBACK_EVERY = 16 << 20
_NOT_PERMITTED_ERRORS = (PermissionError, NotImplementedError)
_NOT_PERMITTED = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL)
#: FICLONE errors that hold for every file between the same two file systems.
_NO_CLONE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.ENOSYS)
#: O_TMPFILE errors of a file system (or kernel) that has none.
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)
_TMPFILE_FLAGS = os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC


def copy_data(
    src: int,
    dst: int,
    size: int,
    clone: bool = True,
    holes: bool = True,
    writeback: bool = False,
) -> bool:
    """Copy ``size`` bytes between descriptors, keeping holes as holes.

    ``clone=False`` skips the reflink attempt; ``holes=False`` (the source
    has as many blocks as bytes) copies the whole range without looking for
    holes; ``writeback``: the copy will be fsync'd, so start writing each
    ``WRITEBACK_EVERY`` bytes out as soon as they are copied.  Returns
    whether cloning is still worth trying between these file systems (False
    once they said they cannot).
    """
    if clone:
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return True
        except OSError as e:
            clone = e.errno not in _NO_CLONE
    end = (
        _copy_extents(src, dst, size, writeback)
        if holes
        else _copy_range(src, dst, 0, size, writeback)
    )
    if end < size:  # a trailing hole, or the source shrank
        os.ftruncate(dst, size)
    return clone


def _copy_extents(src: int, dst: int, size: int, writeback: bool = False) -> int:
    """Copy the data extents of ``src`` below ``size``; returns where the data ended."""
    off = end = 0
    while off < size:
        try:
            start = os.lseek(src, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            start = off  # no SEEK_DATA support: treat everything as data
            hole = size
        else:
            hole = min(os.lseek(src, start, os.SEEK_HOLE), size)
        end = _copy_range(src, dst, start, hole, writeback)
        off = hole
    return end


def _copy_range(src: int, dst: int, start: int, end: int, writeback: bool = False) -> int:
    """Copy bytes ``start``..``end``; returns where the copy stopped (earlier at EOF)."""
    pos = written = start
    while pos < end:
        if writeback and pos - written >= WRITEBACK_EVERY:
            # Only while the source comes from memory: when it comes from the
            # disk, writes in between only slow its reads down (a cold 1 GiB
            # copy: docs/performance.md), and the fsync writes the rest.
            if _in_page_cache(src, pos):
                start_writeback(dst, written, pos - written)
            written = pos
        n = min(_CHUNK * 16, end - pos)
        try:
            done = os.copy_file_range(src, dst, n, pos, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = 0
        if done == 0:  # not supported here, or source shrank: fall back to read/write
            buf = os.pread(src, min(_CHUNK, end - pos), pos)
            if not buf:
                return pos
            done = os.pwrite(dst, buf, pos)
        pos += done
    return pos


#: preadv's flag for "only from the page cache" (absent from some Python builds).
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


def _in_page_cache(fd: int, off: int) -> bool:
    """Is the byte of ``fd`` at ``off`` in the page cache (a read of it would not wait)?"""
    if _RWF_NOWAIT is None:
        return True  # cannot tell: as if it were
    try:
        os.preadv(fd, [bytearray(1)], off, _RWF_NOWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True  # cannot tell (no RWF_NOWAIT here): as if it were
    return True


def may_have_holes(st: os.stat_result) -> bool:
    """Could the file have holes?  Not if all its bytes have blocks (the usual small file)."""
    return st.st_blocks * 512 < st.st_size


def copy_xattrs(src: bytes | int, dst: bytes | int, follow: bool = True) -> None:
    """Copy every non-private xattr (ACLs and capabilities included) that may be set.

    ``src`` and ``dst`` are paths or descriptors (then ``follow`` must stay True).
    """
    try:
        names = os.listxattr(src, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        bname = os.fsencode(name)
        if markers.is_private_xattr(bname):
            continue
        try:
            os.setxattr(
                dst, bname, os.getxattr(src, bname, follow_symlinks=follow), follow_symlinks=follow
            )
        except OSError as e:
            if e.errno not in _NOT_PERMITTED:
                raise
            log.debug("xattr %r not copied up: %s", name, e.strerror)


class CopyUp:
    """Copies lower objects into the upper, through the work directory."""

    def __init__(
        self,
        stack: LayerStack,
        workdir: str,
        writer: Writer,
        durable: bool = True,
        metacopy: bool = False,
    ) -> None:
        assert stack.upper is not None
        self.stack = stack
        self.writer = writer
        self.durable = durable
        #: Copy only metadata for metadata changes (``-o metacopy=on``).
        self.metacopy = metacopy
        work = os.path.join(workdir, "work")
        os.makedirs(work, mode=0o700, exist_ok=True)
        self.work_dir = os.fsencode(work)
        self.work_fd = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        index = os.path.join(workdir, "index")
        os.makedirs(index, mode=0o700, exist_ok=True)
        self.index_fd = os.open(index, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        stack.index_fd = self.index_fd
        stack.lower_links_xattr = writer.lower_links_xattr
        self._names = itertools.count()
        #: Does the work dir's file system make O_TMPFILEs (and let us link them)?
        self._tmpfile = True
        #: Lower devices from which a clone to the upper is impossible (no retry).
        self._no_clone: set[int] = set()
        #: The whiteout of the work dir that new kernel-format whiteouts are
        #: hard links of (kernel overlayfs' whiteout sharing); False: not shared.
        self._whiteout: bytes | bool | None = None
        #: Where the bytes of data copied up are counted (``unionfs stats`` puts
        #: its totals here; no stat of the result is needed).
        self.totals: dict[str, int] = {"bytes": 0}
        self._locks: dict[int, trio.Lock] = {}
        #: Called with (merged path, lower lstat) just before a lower object is
        #: replaced in the upper (copy-up here, whiteout in upper.py): -o
        #: identities records it, for the conflict check of sandbox commit.
        self.on_replace: Callable[[tuple[bytes, ...], os.stat_result], None] | None = None
        #: Called with each file whose data the upper now holds (a copy-up, a
        #: metacopy given its data): descriptors opened on the lower's data
        #: before it must read the copy from now on, as kernel overlayfs' do.
        self.on_copied: Callable[[Node], None] | None = None
        self.clean()

    def replaced(self, path: tuple[bytes, ...], st: os.stat_result) -> None:
        if self.on_replace is not None:
            self.on_replace(path, st)

    def close(self) -> None:
        if isinstance(self._whiteout, bytes):
            with contextlib.suppress(OSError):
                os.unlink(self._whiteout, dir_fd=self.work_fd)
        os.close(self.work_fd)
        os.close(self.index_fd)

    def link_whiteout(self, dir_fd: int, name: bytes) -> bool:
        """Make ``dir_fd/name`` a char 0/0 whiteout as one more link of a shared one.

        As kernel overlayfs (5.8+): a whiteout costs a directory entry, not a
        new inode each time (a delete of a lower file ~2x cheaper on ext4).
        A full link count starts a new shared whiteout; False (and not tried
        again) where links cannot be made, for the caller to mknod one.
        """
        for _ in range(2):
            if self._whiteout is False:
                return False
            if self._whiteout is None:
                tmp = self.temp_name()
                os.mknod(tmp, stat_mod.S_IFCHR, 0, dir_fd=self.work_fd)
                self._whiteout = tmp
            assert isinstance(self._whiteout, bytes)
            try:
                os.link(
                    self._whiteout,
                    name,
                    src_dir_fd=self.work_fd,
                    dst_dir_fd=dir_fd,
                    follow_symlinks=False,
                )
                return True
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOENT, errno.ENOSPC, errno.EDQUOT):
                    raise
                with contextlib.suppress(OSError):
                    os.unlink(self._whiteout, dir_fd=self.work_fd)
                self._whiteout = None if e.errno == errno.EMLINK else False
        return False

    def clean(self) -> int:
        """Remove what a crash left in the work directory; returns the count."""
        names = os.listdir(b"/proc/self/fd/%d" % self.work_fd)
        for name in names:
            self.remove(name)
        n = len(names)
        if n:
            log.info("removed %d leftover(s) from the work directory", n)
        return n

    def remove(self, name: bytes) -> None:
        """Remove a work-dir object, a whole tree for a directory."""
        try:
            st = os.stat(name, dir_fd=self.work_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat_mod.S_ISDIR(st.st_mode):
            shutil.rmtree(os.path.join(self.work_dir, name))
        else:
            os.unlink(name, dir_fd=self.work_fd)

    def temp_name(self) -> bytes:
        return b"#%d.%d" % (os.getpid(), next(self._names))

    def work_path(self, name: bytes) -> bytes:
        return b"/proc/self/fd/%d/%s" % (self.work_fd, name)

    # -- metadata --------------------------------------------------------------

    def set_meta(
        self,
        obj: bytes | int,
        st: os.stat_result,
        xattr_src: bytes | int | None,
        origin: int | None,
    ) -> None:
        """Owner, mode, xattrs and times of a work-dir object, in the order that keeps them.

        ``obj`` is the object's name in the work dir, or a descriptor of a
        regular file (cheaper: no path walk through /proc).  chown first (it
        clears setuid bits and capabilities), xattrs next, times last.  When
        the mounter may not chown (rootless), the object keeps the mounter's
        ownership; data and mode are kept regardless.  ``origin`` is the
        inode number the merged view showed, recorded so it survives remounts.
        """
        symlink = stat_mod.S_ISLNK(st.st_mode)
        at: dict[str, Any] = {}
        path: bytes | int = obj
        if not isinstance(obj, int):
            at = {"dir_fd": self.work_fd, "follow_symlinks": False}
            path = self.work_path(obj)
        follow = not symlink
        try:
            os.chown(obj, st.st_uid, st.st_gid, **at)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EINVAL):
                raise
        if not symlink:
            os.chmod(path, stat_mod.S_IMODE(st.st_mode))
        if xattr_src is not None:
            copy_xattrs(xattr_src, path, follow=follow)
        if origin is not None:
            try:
                os.setxattr(path, self.writer.origin_xattr, b"%d" % origin, follow_symlinks=follow)
            except OSError as e:
                if e.errno not in _NOT_PERMITTED:
                    raise
        os.utime(obj, ns=(st.st_atime_ns, st.st_mtime_ns), **at)

    # -- copy-up ---------------------------------------------------------------

    @changes_upper
    async def ensure_dir(self, node: Node) -> None:
        """Make sure directory ``node`` and its ancestors exist in the upper."""
        assert node.dir_layers is not None
        if node.dir_layers[0] == 0:
            return
        assert node.parent is not None
        await self.ensure_dir(node.parent)
        async with self._lock(node):
            if node.dir_layers[0] == 0:
                return
            path = node.path()
            st = self.stack.stat_dir(node.dir_layers[0], path)
            self.replaced(path, st)
            tmp = self.temp_name()
            os.mkdir(tmp, 0o700, dir_fd=self.work_fd)
            try:
                self.set_meta(tmp, st, self.stack.xattr_path(node.dir_layers[0], path), None)
                parent_fd = self.stack.dirfd(0, path[:-1])
                renameat2(self.work_fd, tmp, parent_fd, path[-1], RENAME_NOREPLACE)
            except BaseException:
                self.remove(tmp)
                raise
            node.dir_layers = (0, *node.dir_layers)
            node.layer = 0
            node.xattrs = None  # what could be copied may differ (rootless)

    @changes_upper
    async def copy_up(self, node: Node, with_data: bool = True, meta_only: bool = False) -> None:
        """Bring non-directory ``node`` into the upper, with its data unless told not.

        ``with_data=False``: the caller truncates it to zero, no data is needed.
        ``meta_only``: only metadata changes (chmod, chown, utimes, xattrs); with
        ``-o metacopy=on`` a lone regular file is then copied as metadata only,
        its data left in the lower until a write needs it.  A metacopy file
        already in the upper gets its data here when ``with_data`` and not
        ``meta_only``.
        """
        if node.is_dir:
            await self.ensure_dir(node)
            return
        if node.layer == 0 and not (node.metacopy and not meta_only):
            return
        if node.unlinked and node.layer != 0:
            raise OSError(errno.ESTALE, "a deleted lower object cannot be copied up")
        assert node.parent is not None and node.parent.dir_layers is not None
        if node.parent.dir_layers[0] != 0:
            await self.ensure_dir(node.parent)
        async with self._lock(node):
            if node.layer == 0:
                if node.metacopy and not meta_only:
                    await self._complete(node, with_data)
                    self._copied(node)
                return
            meta = meta_only and self.metacopy
            await self._copy_nondir(node, with_data, meta)
            node.layer = 0
            node.xattrs = None  # what could be copied may differ (rootless)
            self._copied(node)

    def _copied(self, node: Node) -> None:
        if self.on_copied is not None and not node.metacopy:
            self.on_copied(node)

    async def _complete(self, node: Node, with_data: bool) -> None:
        """Give a metacopy upper file its data, in place, then drop its marker.

        The marker goes last: until then the data is read from the lower, so
        a crash half way through the copy shows nothing partial (as the
        kernel's own order).  Without ``with_data`` (a truncation to zero
        follows) the file is emptied instead of filled.
        """
        assert node.parent is not None and node.parent.dir_layers is not None
        dirpath, name = node.dirpath(), node.name
        dst = os.open(
            name,
            os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if with_data else os.O_TRUNC),
            dir_fd=self.stack.dirfd(0, dirpath),
        )
        try:
            if with_data:
                below = tuple(layer for layer in node.parent.dir_layers if layer != 0)
                layer, ddir, dname, _ = self.stack.metacopy_data(
                    dirpath, name, below, node.parent.xwh_layers
                )
                size = os.fstat(dst).st_size
                src = os.open(
                    dname,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=self.stack.dirfd(layer, ddir),
                )
                try:
                    big = size > THREAD_THRESHOLD
                    if big:
                        await trio.to_thread.run_sync(
                            copy_data, src, dst, size, True, True, self.durable
                        )
                    else:
                        copy_data(src, dst, size)
                    self.totals["bytes"] += size
                    if self.durable and big:
                        await trio.to_thread.run_sync(os.fsync, dst)
                    elif self.durable and size:
                        os.fsync(dst)
                finally:
                    os.close(src)
            path = b"/proc/self/fd/%d" % dst
            for xattr in markers.METACOPY_XATTRS:
                with contextlib.suppress(OSError):
                    os.removexattr(path, xattr)
        finally:
            os.close(dst)
        node.metacopy = False
        node.xattrs = None

    def link_indexed(self, node: Node) -> bool:
        """Link the indexed copy of a hard-linked lower file in at ``node``'s name.

        A lower file with several names is copied up once: the copy is also
        linked as ``<workdir>/index/<inode number>`` (as overlayfs' index=on
        does), and every other name, when first used, becomes one more link to
        it.  So all names stay one file, also after a remount.
        """
        try:
            self.link_index_entry(node, self.stack.dirfd(0, node.dirpath()), node.name)
        except FileNotFoundError:
            return False
        return True

    def link_index_entry(self, node: Node, dir_fd: int, name: bytes) -> None:
        """Link index entry ``node.ino`` as ``name`` in ``dir_fd``; count the lower name done."""
        key = b"%d" % node.ino
        os.link(key, name, src_dir_fd=self.index_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        xattr = self.writer.lower_links_xattr
        path = b"/proc/self/fd/%d/%s" % (self.index_fd, key)
        try:
            left = max(int(os.getxattr(path, xattr, follow_symlinks=False)) - 1, 0)
            os.setxattr(path, xattr, b"%d" % left, follow_symlinks=False)
        except (OSError, ValueError):
            left = None  # no count kept (e.g. user xattrs on a symlink): report the real one
        node.lower_links = left

    async def _copy_nondir(self, node: Node, with_data: bool, meta: bool = False) -> None:
        layer, dirpath, name = node.layer, node.dirpath(), node.name
        src_dir = self.stack.dirfd(layer, dirpath)
        st = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
        self.replaced((*dirpath, name), st)
        hardlinked = st.st_nlink > 1
        if hardlinked and self.link_indexed(node):
            return
        # Hard-linked files are copied whole: their copy is shared through the index.
        meta = meta and with_data and not hardlinked and stat_mod.S_ISREG(st.st_mode)
        data = with_data and not meta
        linkable = stat_mod.S_ISREG(st.st_mode) and not hardlinked and self._tmpfile
        if linkable and await self._copy_file_linked(node, src_dir, st, data, meta):
            node.metacopy = meta
            return
        tmp = self.temp_name()
        try:
            origin = node.ino
            if stat_mod.S_ISREG(st.st_mode):
                await self._copy_file(src_dir, name, tmp, st, data, origin, meta)
            else:
                if stat_mod.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(name, dir_fd=src_dir), tmp, dir_fd=self.work_fd)
                else:
                    os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=self.work_fd)
                src_path = self.stack.xattr_path(layer, dirpath, name)
                self.set_meta(tmp, st, src_path, origin)
            if hardlinked:
                with contextlib.suppress(*_NOT_PERMITTED_ERRORS):
                    os.setxattr(
                        self.work_path(tmp),
                        self.writer.lower_links_xattr,
                        b"%d" % (st.st_nlink - 1),
                        follow_symlinks=False,
                    )
                    node.lower_links = st.st_nlink - 1
                os.link(
                    tmp,
                    b"%d" % node.ino,
                    src_dir_fd=self.work_fd,
                    dst_dir_fd=self.index_fd,
                    follow_symlinks=False,
                )
            # The parent may have moved while a big copy ran: look it up now.
            dst_dir = self.stack.dirfd(0, node.dirpath())
            renameat2(self.work_fd, tmp, dst_dir, node.name, RENAME_NOREPLACE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.work_fd)
            raise
        node.metacopy = meta

    async def _copy_file_linked(
        self, node: Node, src_dir: int, st: os.stat_result, with_data: bool, meta: bool
    ) -> bool:
        """Copy regular file ``node`` as kernel overlayfs does: into an O_TMPFILE of
        the work dir, then linked in at its name.

        Nothing is left behind by a failure or a crash, and one directory
        entry fewer is made and removed than through a named temporary.
        False (and not tried again) when the work dir cannot make one, or the
        system does not let this daemon link it (a hardened ``protected_hardlinks``).
        """
        try:
            dst = os.open(b".", _TMPFILE_FLAGS, 0o600, dir_fd=self.work_fd)
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise
            self._tmpfile = False
            return False
        try:
            await self._fill(src_dir, node.name, dst, st, with_data, node.ino, meta)
            # The parent may have moved while a big copy ran: look it up now.
            dst_dir = self.stack.dirfd(0, node.dirpath())
            try:
                os.link(b"/proc/self/fd/%d" % dst, node.name, dst_dir_fd=dst_dir)
            except OSError as e:
                if e.errno != errno.EPERM:
                    raise
                self._tmpfile = False
                return False
        finally:
            os.close(dst)
        return True

    async def _copy_file(
        self,
        src_dir: int,
        name: bytes,
        tmp: bytes,
        st: os.stat_result,
        with_data: bool,
        origin: int | None,
        meta: bool = False,
    ) -> None:
        """Build the copy of a regular file in the work dir, as ``tmp``."""
        dst = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self.work_fd
        )
        try:
            await self._fill(src_dir, name, dst, st, with_data, origin, meta)
        finally:
            os.close(dst)

    async def _fill(
        self,
        src_dir: int,
        name: bytes,
        dst: int,
        st: os.stat_result,
        with_data: bool,
        origin: int | None,
        meta: bool,
    ) -> None:
        """Give new file ``dst`` the data (unless not ``with_data``) and metadata of
        ``src_dir/name`` (whose lstat is ``st``), and make it durable.

        ``meta``: a metadata-only copy, kernel overlayfs' format: a sparse file
        of the lower's size, marked with the ``overlay.metacopy`` xattr (empty
        value); its data stays in the lower.  Only copied data is fsync'd, as
        the kernel does: what has no data has nothing a crash could lose.
        """
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        try:
            data = with_data and st.st_size > 0
            big = data and st.st_size > THREAD_THRESHOLD
            if data:
                args = (
                    src,
                    dst,
                    st.st_size,
                    st.st_dev not in self._no_clone,
                    may_have_holes(st),
                    self.durable,
                )
                if big:
                    clone = await trio.to_thread.run_sync(copy_data, *args)
                else:
                    clone = copy_data(*args)
                self.totals["bytes"] += st.st_size
                if not clone:
                    self._no_clone.add(st.st_dev)
            elif meta:
                os.ftruncate(dst, st.st_size)
            self.set_meta(dst, st, src, origin)
            if meta:
                os.setxattr(dst, self.writer.metacopy_xattr, b"")
            if not (self.durable and data):
                return
            if big:
                await trio.to_thread.run_sync(os.fsync, dst)
            else:
                os.fsync(dst)
        finally:
            os.close(src)

    def _lock(self, node: Node) -> _NodeLock:
        return _NodeLock(self._locks, node.ino)


class _NodeLock:
    """A per-inode trio lock, dropped from the table when nobody holds or waits."""

    def __init__(self, locks: dict[int, trio.Lock], ino: int) -> None:
        self.locks, self.ino = locks, ino

    async def __aenter__(self) -> None:
        lock = self.locks.get(self.ino)
        if lock is None:
            lock = self.locks[self.ino] = trio.Lock()
        await lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        lock = self.locks[self.ino]
        lock.release()
        if not lock.statistics().tasks_waiting:
            del self.locks[self.ino]
