"""The pyfuse3 Operations class: translates FUSE requests into the union's terms.

Handlers stay thin: they find nodes in the inode table, ask the layer stack
(or copy-up) to do the work, and build replies.  Every handler runs under
``_guard``: an ``OSError`` becomes its errno, and anything unexpected is
logged with its traceback and answered EIO, because an exception escaping a
pyfuse3 handler stops the whole file system and strands every process that
uses the mount.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import stat as stat_mod
import time
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3

from . import markers, ownership, stats
from .inodes import InodeTable, Node
from .layers import Entry, LayerStack
from .options import MountConfig
from .upper import DEFAULT_ACL, Upper

log = logging.getLogger(__name__)

#: Advertised block size: CPython's buffered I/O sizes its buffer from it, so a
#: large value means fewer, bigger WRITE requests (16x fewer at 4 KiB -> 128 KiB).
BLKSIZE = 128 * 1024

#: How much of a file opened for reading is asked for at OPEN (the kernel's
#: default read-ahead window; a small file is read whole, a big one starts).
_READ_AHEAD_AT_OPEN = 128 * 1024


def _guard(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Map every failure of a handler to an errno reply; never let one escape.

    Also the one place that counts requests: each one's latency goes into its
    type's log2 histogram (``unionfs stats``; a clock read and an increment).

    The handler itself may be a plain function: most never wait for anything,
    and calling one directly saves a coroutine per request.  A handler whose
    slow path must wait returns a coroutine for it, which is awaited here.
    """
    name = fn.__name__
    buckets = stats.COUNTERS.buckets(name)
    clock = time.perf_counter_ns
    coroutine = types.CoroutineType
    handoff = _HANDOFF

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        start = clock()
        try:
            if handoff and handoff[-1][0] == name:  # the C helper called fn: its coroutine
                result = await handoff.pop()[1]
            else:
                result = fn(*args)
                if type(result) is coroutine:
                    result = await result
            return result
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            buckets[(clock() - start).bit_length()] += 1

    return wrapper


#: The coroutine of a request whose handler the C session helper called, which
#: returned it (its slow path waits): the helper puts it here, with the
#: handler's name, and lets pyfuse3 dispatch the request, whose ``_guard``
#: awaits it instead of calling the handler a second time.  pyfuse3 starts that
#: dispatch as soon as the helper returns, so this holds one item at most, for
#: no longer than that (unionfs/_dispatch.c).
_HANDOFF: list[tuple[str, Any]] = []


#: The fields of an os.stat_result that replies carry (``_entry_py``).
_STAT_FIELDS = (
    "st_mode",
    "st_uid",
    "st_gid",
    "st_size",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
    "st_blocks",
    "st_rdev",
)


def _entry_py(
    st: os.stat_result,
    ino: int,
    nlink: int,
    blksize: int,
    entry_timeout: float,
    attr_timeout: float,
) -> pyfuse3.EntryAttributes:
    """An EntryAttributes of ``st``, in Python: what the C helper's
    ``entry_attributes`` makes.  Every field is set but ``generation`` (0 from
    pyfuse3's constructor) and ``st_dev`` (the kernel sets its own)."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.entry_timeout = entry_timeout
    a.attr_timeout = attr_timeout
    a.st_mode = st.st_mode
    a.st_nlink = nlink
    a.st_uid = st.st_uid
    a.st_gid = st.st_gid
    a.st_rdev = st.st_rdev
    a.st_size = st.st_size
    a.st_blksize = blksize
    a.st_blocks = st.st_blocks
    a.st_atime_ns = st.st_atime_ns
    a.st_mtime_ns = st.st_mtime_ns
    a.st_ctime_ns = st.st_ctime_ns
    return a


def _layout_sample() -> pyfuse3.EntryAttributes:
    """An EntryAttributes with the values the C helper must read back where it
    expects them (``enable_dispatch``, ``enable_entries``)."""
    sample = pyfuse3.EntryAttributes()
    sample.st_ino, sample.st_size, sample.st_mode = 0x1234567, 0x7654321, 0o100640
    sample.attr_timeout, sample.entry_timeout = 1.5, 2.5
    return sample


def _log_unexpected(name: str, what: Any) -> None:
    """How a request answered from C reports what ``_guard`` would log.

    ``what`` is the exception, or for a "hand-off" a stale item of
    ``_HANDOFF`` (pyfuse3 never ran its request; the helper drops it).
    """
    if isinstance(what, BaseException):
        log.error("unexpected error in %s", name, exc_info=what)
    else:
        log.error("dropped a %s that pyfuse3 never ran: %r", name, what)
        what[1].close()


async def _reraise(exc: BaseException) -> None:
    """What the C helper hands pyfuse3 for a SystemExit or KeyboardInterrupt: ``_guard``'s way."""
    raise exc


def _start_reading(fd: int) -> None:
    """Start reading a file's first blocks while the OPEN reply travels back.

    The READ that follows an OPEN comes one round trip later; asking for the
    head of the file now overlaps that round trip with the disk (a cold read
    of 20,000 small files: 7.8-8.6 s -> 6.1-6.9 s).  Only a hint: a file
    system that refuses it changes nothing.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, _READ_AHEAD_AT_OPEN, os.POSIX_FADV_WILLNEED)


def _dot_entry(node: Node) -> pyfuse3.EntryAttributes:
    """The READDIRPLUS entry of "." or "..": a directory's number, no attributes.

    The kernel keeps only the dirent of these two (``d_ino`` from ``st_ino``,
    ``d_type`` from ``st_mode``): ``fuse_direntplus_link`` returns before it
    looks at their attributes, and never counts a lookup for them.  So they
    cost no ``fstat`` (two per listing before).
    """
    a = pyfuse3.EntryAttributes()
    a.st_ino = node.ino
    a.st_mode = stat_mod.S_IFDIR | 0o755
    return a


def _masked(mode: int, umask: int, default_acl: bool) -> int:
    """The permission bits of a new object, as the kernel gives them on its own files.

    The caller's umask applies unless the directory has a default ACL, which
    the upper's filesystem then applies itself (the daemon's own umask is 0).
    With POSIX ACLs on (and DONT_MASK), the kernel sends the umask instead of
    applying it; without, it has applied it already and this changes nothing.
    """
    return stat_mod.S_IMODE(mode) if default_acl else stat_mod.S_IMODE(mode) & ~umask


@dataclass(slots=True)
class FileHandle:
    """An open file: the real descriptor and the layer whose file it reads (a metacopy's
    lower data layer; 0 once the copy holds the data, see ``_read_the_copy``)."""

    fd: int
    node: Node
    layer: int


@dataclass(slots=True)
class DirHandle:
    """An open directory: the merged listing, taken at its first readdir and again
    at each rewind (a readdir from offset 0: ``rewinddir`` must show the
    directory as it is now, as a new ``opendir`` would).

    Offsets are list indices + 1, so seekdir/telldir and concurrent readers
    (each with its own handle) see every name exactly once.
    """

    node: Node
    names: list[tuple[bytes, int, bool]] | None = None


class UnionOperations(pyfuse3.Operations):
    """FUSE request handlers for the merged view."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self, stack: LayerStack, table: InodeTable, config: MountConfig, upper: Upper | None
    ) -> None:
        super().__init__()
        self.stack = stack
        self.table = table
        self.config = config
        self.upper = upper if not config.read_only else None
        self.is_root = os.geteuid() == 0
        self._dirs: dict[int, DirHandle] = {}
        self._files: dict[int, FileHandle] = {}
        self._next_fh = 1
        #: The C session helper when it answers READs (``read_in_c``), else None.
        self._fast: Any = None
        #: What makes a reply's EntryAttributes (``_attrs``; ``entry_in_c``).
        self._entry: Callable[..., pyfuse3.EntryAttributes] = _entry_py
        #: Absolute upper, work dir and lowers, as ``unionfs stats`` reports them
        #: (set by the daemon, which knows the directory it was started in).
        self.branches: dict[str, Any] | None = None
        #: Owners, modes and devices recorded as metadata (rootless images),
        #: and id mappings; None when neither applies (see unionfs.ownership).
        self.owners = ownership.presenter_for(
            [layer.fd for layer in stack.layers],
            stack.upper is not None,
            ownership.Mapping(
                config.uidmapping, config.gidmapping, config.squash_uid, config.squash_gid
            ),
            config.xattr_permissions,
        )
        #: Called with each directory a lookup or opendir reads (-o live: watch.py).
        self.on_dir_used: Callable[[Node], None] | None = None
        stats.instrument(table, stack, self.upper.copyup if self.upper is not None else None)
        if self.upper is not None:
            self.upper.copyup.on_copied = self._read_the_copy
        #: [hits, misses] of the listing and xattr-name caches, held to be bumped in place.
        self._listing_counts = stats.COUNTERS.cache("listings")
        self._xattr_counts = stats.COUNTERS.cache("xattr_names")

    # -- helpers ---------------------------------------------------------------

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """The single place where replies' attributes and timeouts are made.

        Runs once per reply and per listed entry: the fields are written by
        ``self._entry`` (in C when the helper can, ``entry_in_c``).
        """
        # Like overlayfs: counting subdirectories of a merged directory is not
        # worth it, and nlink=1 tells find not to rely on the count.
        if node.dir_layers is not None and not node.unlinked:
            nlink = 1 if len(node.dir_layers) > 1 else st.st_nlink
        else:
            extra = node.lower_links
            nlink = st.st_nlink if extra is None else st.st_nlink - 1 + extra
        blksize = BLKSIZE if st.st_blksize < BLKSIZE else st.st_blksize
        cfg = self.config
        a = self._entry(st, node.ino, nlink, blksize, cfg.entry_timeout, cfg.attr_timeout)
        if self.owners is not None:
            a.st_mode, a.st_uid, a.st_gid, a.st_rdev = self._presented(node, st)
        return a

    def entry_in_c(self, helper: Any) -> bool:
        """Make replies' attributes with the C session helper (``entry_attributes``).

        pyfuse3's EntryAttributes takes its fields through one Python property
        call each; the helper writes them into the C struct directly.  False
        (and the Python way kept) if this pyfuse3 lays the struct out otherwise.
        """
        probe = os.stat_result(tuple(range(os.stat_result.n_fields)))
        helper.entry_fields(os.stat_result, [getattr(probe, f) for f in _STAT_FIELDS])
        if not helper.enable_entries(_layout_sample()):
            return False
        self._entry = helper.entry_attributes
        return True

    def _presented(self, node: Node, st: os.stat_result) -> tuple[int, int, int, int]:
        """Owner, mode and device an object shows: its recorded override, if any."""
        assert self.owners is not None
        if node.unlinked:
            return self.owners.present(-1, -1, None, b"", st)

        def where() -> tuple[int, bytes | None, bytes]:  # only when not known yet
            if node.is_dir:
                return self.stack.dirfd(node.layer, node.path()), None, b"/".join(node.path())
            dir_fd = self.stack.dirfd(node.layer, node.dirpath())
            return dir_fd, node.name, b"/".join(node.path())

        return self.owners.present_override(self.owners.node_override(node, where), st)

    def _stat(self, node: Node) -> os.stat_result:
        """Fresh lstat of the node's topmost real object.

        An open but unlinked file has no name left: its open descriptor
        still answers.
        """
        if node.unlinked:
            return self._nameless_stat(node)
        if node.is_dir:
            return self.stack.stat_dir(node.layer, node.path())
        st = self.stack.lstat(node.layer, node.dirpath(), node.name)
        if st is not None:
            return st
        return os.fstat(self._handle_fd(node))

    def _nameless_stat(self, node: Node) -> os.stat_result:
        """An object whose last name went: its open descriptor answers if it has
        one, else the attributes it had then, with no link left (as a local
        filesystem answers fstat on a removed directory or an O_PATH descriptor)."""
        try:
            return os.fstat(self._handle_fd(node))
        except OSError:
            if node.last_st is None:
                raise
            return node.last_st

    def _handle_fd(self, node: Node) -> int:
        """A descriptor of one of the node's open handles (ESTALE if none)."""
        for handle in self._files.values():
            if handle.node is node:
                return handle.fd
        raise OSError(errno.ESTALE, "object vanished from its layer")

    def _writable(self) -> Upper:
        if self.upper is None:
            raise OSError(errno.EROFS, "read-only union")
        return self.upper

    def _copied_link(self, node: Node, entry: Entry) -> bool:
        """Is ``entry`` a lower hard link whose file has an indexed upper copy?

        Another name of the same lower file was changed (in this mount or
        before a remount): this name must then be linked to the copy, in the
        upper (``_settle``), so that all names stay one file, also for a
        kernel mount of the upper.
        """
        return (
            self.upper is not None
            and entry.layer != 0
            and entry.dir_layers is None
            and entry.st.st_nlink >= 2
            and self.stack.in_index(node.ino)
        )

    def _entry_stat(self, node: Node, entry: Entry) -> os.stat_result:
        """The attributes of a node just resolved to ``entry`` (not a copied link)."""
        return entry.st if node.layer == entry.layer else self._stat(node)

    async def _settle(self, parent: Node, name: bytes, node: Node) -> os.stat_result:
        """Serve a lower hard link from its indexed upper copy (``_copied_link``)."""
        assert self.upper is not None
        await self.upper.link_alias(parent, name, node)
        return self._stat(node)

    async def _settled_reply(
        self, parent: Node, name: bytes, node: Node
    ) -> pyfuse3.EntryAttributes:
        """A lookup's reply for a lower hard link served from its upper copy."""
        attrs = self._attrs(node, await self._settle(parent, name, node))
        self.table.ref(node)
        return attrs

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
    def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> Any:
        parent = self._dir(parent_inode)
        if self.on_dir_used is not None:
            self.on_dir_used(parent)
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
                if self._copied_link(node, entry):
                    return self._settled_reply(parent, name, node)
                attrs = self._attrs(node, self._entry_stat(node, entry))
                self.table.ref(node)
                return attrs
        attrs = self._attrs(node, self._stat(node))
        self.table.ref(node)
        return attrs

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        self.forget_now(inode_list)

    def forget_now(self, inode_list: list[tuple[int, int]]) -> None:
        """``forget`` without a coroutine (the C helper calls it)."""
        try:
            for inode, n in inode_list:
                self.table.forget(inode, n)
        except Exception:  # forget has no reply; it must never raise
            log.exception("error in forget")

    @_guard
    def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.table[inode]
        return self._attrs(node, self._stat(node))

    @_guard
    def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.table[inode]
        return os.readlink(node.name, dir_fd=self.stack.dirfd(node.layer, node.dirpath()))

    # -- directories -----------------------------------------------------------

    @_guard
    def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._dir(inode)
        if self.on_dir_used is not None:
            self.on_dir_used(node)
        fh = self._new_fh()
        self._dirs[fh] = DirHandle(node)
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        node = handle.node
        assert node.dir_layers is not None
        if handle.names is None or start_id == 0:
            stale = node.listing is None or node.listing_gen != self.stack.generation
            self._listing_counts[stale] += 1
            if stale:
                node.listing = self.stack.merged_names(
                    node.path(), node.dir_layers, node.xwh_layers
                )
                node.listing_gen = self.stack.generation
            handle.names = node.listing
        names = handle.names
        pos = start_id
        if pos == 0:
            if not pyfuse3.readdir_reply(token, b".", _dot_entry(node), 1):
                return
            pos = 1
        if pos == 1:
            if not pyfuse3.readdir_reply(token, b"..", _dot_entry(node.parent or node), 2):
                return
            pos = 2
        dirpath = node.path()
        table, stack, attrs_of, reply = self.table, self.stack, self._attrs, pyfuse3.readdir_reply
        for i in range(pos - 2, len(names)):
            name, layer, is_dir = names[i]
            child = table.cached_child(node, name)
            if child is not None:
                st = self._stat(child)
            else:
                if is_dir:
                    entry = self._resolve(node, name)
                else:
                    st0 = stack.lstat(layer, dirpath, name)
                    entry = None if st0 is None else stack.nondir_entry(layer, dirpath, name, st0)
                if entry is None:  # gone since the listing was taken
                    continue
                child = table.node_for(node, name, entry)
                if self._copied_link(child, entry):
                    st = await self._settle(node, name, child)
                else:
                    st = self._entry_stat(child, entry)
            if not reply(token, name, attrs_of(child, st), i + 3):
                return
            table.ref(child)

    @_guard
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Make the upper directory's entries durable (renames, creates, whiteouts)."""
        node = self._dirs[fh].node
        if self.config.volatile:
            return  # -o volatile: no sync reaches the upper (kernel overlayfs' rule)
        if self.upper is None or not node.dir_layers or node.dir_layers[0] != 0:
            return
        fd = os.open(
            ".",
            os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
            dir_fd=self.stack.dirfd(0, node.path()),
        )
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @_guard
    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------

    #: Flags of a client's open that the daemon's descriptor keeps.  Not O_APPEND:
    #: without a writeback cache the kernel puts each append at its own end of the
    #: file and sends that offset, and a WRITE may come for another offset through an
    #: append handle (a shared mapping's pages written back through any writable
    #: handle, a write after F_SETFL cleared O_APPEND): on an O_APPEND descriptor
    #: pwrite would put those at the end too.
    _OPEN_KEEP = os.O_ACCMODE | os.O_SYNC | os.O_DSYNC | os.O_NOATIME

    def _open_fd(self, node: Node, flags: int, extra: int = 0) -> int:
        return os.open(
            node.name,
            (flags & self._OPEN_KEEP) | extra | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=self.stack.dirfd(node.layer, node.dirpath()),
        )

    def _file_info(self, node: Node, fd: int, layer: int | None = None) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._files[fh] = FileHandle(fd, node, node.layer if layer is None else layer)
        if self._fast is not None:
            self._fast.register(fh, fd)  # False (a slot taken): ``read`` below answers
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def read_in_c(self, helper: Any) -> None:
        """Let the C session helper answer READs (and WRITEs) of this daemon's handles.

        A READ is a pread of the handle's descriptor, a WRITE a pwrite, nothing
        else (``read`` and ``write`` below); in C they skip pyfuse3's dispatch
        of the request, and a WRITE pyfuse3's copy of its data
        (docs/performance.md).  Each handle is registered as it is made and
        unregistered at release before its descriptor is closed; handle
        numbers are never reused, so a slot never names a closed or reused
        descriptor.  The helper counts the requests it answers (``unionfs
        stats`` merges them).
        """
        self._fast = helper
        for fh, handle in self._files.items():
            helper.register(fh, handle.fd)
        stats.COUNTERS.add_source("read", helper.read_counts)
        if helper.write_active():
            stats.COUNTERS.add_source("write", helper.write_counts)
        # READs that waited for the disk in its worker threads (_readpool.c).
        stats.COUNTERS.helper["worker_reads"] = helper.pool_reads

    def read_ahead_in_c(self, helper: Any, cold_us: int) -> None:
        """Have the C session helper read cold directories ahead (_prefetch.c).

        A layer directory whose lstat took ``cold_us`` or longer (it waited
        for the disk; 0: every directory at its first lstat) is listed, its
        entries lstat'ed and its subdirectories listed by a worker thread,
        off the critical path of the lookups a walking client sends next.
        """
        self.stack.cold_ns = cold_us * 1000
        self.stack.on_cold = helper.read_ahead
        for key in ("dirs", "entries", "dropped"):
            stats.COUNTERS.helper[f"read_ahead_{key}"] = lambda k=key: helper.read_ahead_counts()[k]

    def dispatch_in_c(self, helper: Any) -> bool:
        """Let the C session helper call the plain handlers of its request types.

        Before the session starts.  It calls what ``_guard`` wraps, maps
        exceptions as ``_guard`` does and replies from C, skipping pyfuse3's
        dispatch (a coroutine, a RequestContext and the reply in Cython per
        request); a handler that returns a coroutine goes on through pyfuse3
        (``_HANDOFF``).  False if this pyfuse3's EntryAttributes is not laid
        out as the helper reads it.
        """
        names = helper.dispatched()
        table = {
            name: getattr(type(self), name).__wrapped__.__get__(self)
            for name in names
            if name != "forget"
        }
        table["forget"] = self.forget_now
        args = (
            table,
            _layout_sample(),
            pyfuse3.FileInfo,
            pyfuse3.FUSEError,
            _log_unexpected,
            _HANDOFF,
            _reraise,
        )
        if not helper.enable_dispatch(*args):
            return False
        for name in names:
            stats.COUNTERS.add_source(name, functools.partial(helper.dispatch_counts, name))
        # Requests its bursts read in C, after one it answered (_dispatch.c).
        stats.COUNTERS.helper["bursts"] = lambda: helper.burst_counts()["bursts"]
        stats.COUNTERS.helper["burst_requests"] = lambda: helper.burst_counts()["requests"]
        return True

    @_guard
    def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> Any:
        node = self.table[inode]
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        truncate = bool(flags & os.O_TRUNC)
        if flags & os.O_ACCMODE != os.O_RDONLY or truncate:
            return self._open_for_writing(node, flags, truncate)
        if node.metacopy:  # metadata only in the upper: read the lower's data
            assert node.parent is not None and node.parent.dir_layers is not None
            layer, fd = self.stack.open_metacopy_data(
                node.dirpath(), node.name, node.parent.dir_layers, node.parent.xwh_layers, flags
            )
            return self._file_info(node, fd, layer)
        fd = self._open_fd(node, flags)
        _start_reading(fd)
        return self._file_info(node, fd)

    def _read_the_copy(self, node: Node) -> None:
        """Point the handles still reading ``node``'s lower data at its new copy.

        Kernel overlayfs (4.19+) reads through the upper file once one exists,
        so a read-only descriptor opened before another one wrote (and copied
        the file up) sees the writes.  ``dup2`` puts the copy under the same
        descriptor number, so a READ in flight in a C worker thread reads one
        file or the other, both holding the same bytes at this moment.
        """
        for fh, handle in self._files.items():  # a scan a copy-up: open files are few
            if handle.node is not node or handle.layer == 0:
                continue
            try:
                new = self._open_fd(node, fcntl.fcntl(handle.fd, fcntl.F_GETFL))
                try:
                    os.dup2(new, handle.fd, inheritable=False)
                finally:
                    os.close(new)
            except OSError as e:  # the copy is made: the handle only goes on reading the lower
                log.warning("handle %d of inode %d stays on the lower: %s", fh, node.ino, e)
                continue
            handle.layer = node.layer

    async def _open_for_writing(self, node: Node, flags: int, truncate: bool) -> pyfuse3.FileInfo:
        """An open for writing (or truncating): the object is copied up first."""
        # Truncation makes the lower data useless: copy up metadata only.
        await self._writable().copyup.copy_up(node, with_data=not truncate)
        # O_TRUNC goes to the real open: Linux truncates on O_RDONLY|O_TRUNC
        # too, where an ftruncate of the read-only descriptor was EINVAL.
        # The kernel has checked the caller's write permission (may_open).
        fd = self._open_fd(node, flags, os.O_TRUNC if truncate else 0)
        return self._file_info(node, fd)

    @_guard
    def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._files[fh].fd, size, off)

    @_guard
    def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self._files[fh].fd, buf, off)

    @_guard
    def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._files[fh].fd
        if self.config.volatile:
            return  # -o volatile: no sync reaches the upper (kernel overlayfs' rule)
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    @_guard
    def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None:
            if self._fast is not None:
                self._fast.unregister(fh)
            os.close(handle.fd)

    # -- creating and removing -------------------------------------------------

    async def _new(
        self,
        parent_inode: int,
        name: bytes,
        ctx: pyfuse3.RequestContext,
        is_dir: bool,
        make: Callable[[int, bytes, int], int | None],
        mode: int | None = None,
    ) -> tuple[Node, pyfuse3.EntryAttributes, int | None]:
        """Create an object in the upper, owned as the caller would own it.

        Ownership and the setgid bit follow the POSIX rules (a setgid parent
        passes on its group, and to directories its setgid bit); the object
        is finished before it becomes visible.
        """
        upper = self._writable()
        parent = self._dir(parent_inode)
        pst = self._stat(parent)
        sgid = bool(pst.st_mode & stat_mod.S_ISGID)
        gid = pst.st_gid if sgid else ctx.gid

        def made(dir_fd: int, n: bytes) -> int | None:
            perm = 0 if mode is None else self._new_perm(parent, mode, ctx)
            fd = make(dir_fd, n, perm)
            try:
                if self.owners is not None and self.owners.record:
                    self.owners.new_object(dir_fd, n, ctx.uid, gid)
                elif self.is_root and fd is not None:
                    os.fchown(fd, ctx.uid, gid)  # no name lookup
                elif self.is_root:
                    os.chown(n, ctx.uid, gid, dir_fd=dir_fd, follow_symlinks=False)
                if is_dir and sgid:
                    st_mode = os.stat(n, dir_fd=dir_fd).st_mode
                    os.chmod(b"/proc/self/fd/%d/%s" % (dir_fd, n), st_mode | stat_mod.S_ISGID)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
            return fd

        fd = await upper.create(parent, name, made, is_dir)
        st = os.fstat(fd) if fd is not None else self.stack.lstat(0, parent.path(), name)
        if st is None:
            raise OSError(errno.EIO, "created object vanished")
        entry = Entry(0, st, (0,) if is_dir else None, frozenset(), 0, st)
        node = self.table.node_for(parent, name, entry)
        if fd is not None:
            # The kernel asks for security.capability before every write; the
            # new file's few xattrs (an inherited ACL, an LSM label) are
            # listed now through its descriptor, 8x cheaper than by path.
            with contextlib.suppress(OSError):
                names = map(os.fsencode, os.listxattr(fd))
                node.xattrs = frozenset(ownership.visible(markers.visible_xattrs(names)))
        attrs = self._attrs(node, st)
        self.table.ref(node)
        return node, attrs, fd

    def _new_perm(self, parent: Node, mode: int, ctx: pyfuse3.RequestContext) -> int:
        """Permission bits for a new object in ``parent`` (its upper copy by now).

        Its default ACL comes from the cached xattr names.  An object built in
        the work dir to replace a whiteout is built under the same default ACL
        (``Upper.create``), so the rule is the parent's either way.
        """
        return _masked(mode, ctx.umask, DEFAULT_ACL in self._xattr_names(parent))

    @_guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        oflags = (flags & self._OPEN_KEEP) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        node, attrs, fd = await self._new(
            parent_inode,
            name,
            ctx,
            False,
            lambda d, n, perm: os.open(n, oflags, perm, dir_fd=d),
            mode,
        )
        assert fd is not None
        return self._file_info(node, fd), attrs

    @_guard
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make(d: int, n: bytes, perm: int) -> None:
            os.mkdir(n, perm, dir_fd=d)

        return (await self._new(parent_inode, name, ctx, True, make, mode))[1]

    @_guard
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if stat_mod.S_ISCHR(mode) and rdev == 0:
            raise OSError(errno.EPERM, "a char device 0/0 is a whiteout")

        def make(d: int, n: bytes, perm: int) -> None:
            if (
                self.owners is not None
                and self.owners.record
                and (stat_mod.S_ISCHR(mode) or stat_mod.S_ISBLK(mode))
            ):
                # No mknod right: a regular file that records the device (fuse-overlayfs').
                flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                os.close(os.open(n, flags, 0o600, dir_fd=d))
                kind = ownership.kind_of(mode)
                self.owners.new_object(d, n, ctx.uid, ctx.gid, kind, rdev, perm)
                return
            os.mknod(n, stat_mod.S_IFMT(mode) | perm, rdev, dir_fd=d)

        return (await self._new(parent_inode, name, ctx, False, make, mode))[1]

    @_guard
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make(d: int, n: bytes, _perm: int) -> None:
            os.symlink(target, n, dir_fd=d)

        return (await self._new(parent_inode, name, ctx, False, make))[1]

    @_guard
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        upper = self._writable()
        node = self.table[inode]
        if node.is_dir:
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        await upper.copyup.copy_up(node)
        src_dir = self.stack.dirfd(0, node.dirpath())
        src_name = node.name
        parent = self._dir(new_parent_inode)

        def make(d: int, n: bytes) -> None:
            os.link(src_name, n, src_dir_fd=src_dir, dst_dir_fd=d, follow_symlinks=False)

        await upper.create(parent, new_name, make, False)
        attrs = self._attrs(node, self._stat(node))
        self.table.ref(node)
        self.table.add_alias(node, parent, new_name)
        parent.children[new_name] = node
        return attrs

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._writable().remove(self._dir(parent_inode), name, want_dir=False)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._writable().remove(self._dir(parent_inode), name, want_dir=True)

    @_guard
    async def rename(
        self,
        parent_old: int,
        name_old: bytes,
        parent_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self._writable().rename(
            self._dir(parent_old), name_old, self._dir(parent_new), name_new, flags
        )

    # -- attributes --------------------------------------------------------------

    def _object_fd(self, node: Node) -> int:
        """An O_PATH descriptor of the node's upper object (never a symlink's target)."""
        if node.parent is None:
            return os.dup(self.stack.dirfd(0, ()))
        if node.unlinked:  # open but nameless: its descriptor is the object
            return os.dup(self._handle_fd(node))
        return os.open(
            node.name,
            os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=self.stack.dirfd(0, node.dirpath()),
        )

    @_guard
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        upper = self._writable()
        node = self.table[inode]
        to_zero = fields.update_size and attr.st_size == 0
        await upper.copyup.copy_up(node, with_data=not to_zero, meta_only=not fields.update_size)
        if self.owners is not None:
            self.owners.forget_node(inode)  # chown/chmod may rewrite its override
        handle = self._files.get(fh) if fh is not None else None
        ofd = self._object_fd(node)
        try:
            path = b"/proc/self/fd/%d" % ofd
            recorded = self._record_attrs(ofd, attr, fields)  # into the override
            if (fields.update_uid or fields.update_gid) and not recorded:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                if self.owners is None:
                    os.chown(path, uid, gid)
                else:  # uidmapping=/gidmapping=; with a squash, errors are ignored
                    try:
                        os.chown(path, *self.owners.mapping.disk(uid, gid))
                    except OSError:
                        if not self.owners.mapping.squashing:
                            raise
            if fields.update_mode and not recorded:
                os.chmod(path, stat_mod.S_IMODE(attr.st_mode))
            if fields.update_size:
                if handle is not None and handle.layer == 0:
                    os.ftruncate(handle.fd, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_atime or fields.update_mtime:
                cur = os.fstat(ofd)
                atime = attr.st_atime_ns if fields.update_atime else cur.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns
                os.utime(path, ns=(atime, mtime))  # the magic link is the object itself
            st = os.fstat(ofd)
        finally:
            os.close(ofd)
        return self._attrs(node, st)

    def _record_attrs(self, ofd: int, attr: Any, fields: Any) -> bool:
        """chown/chmod through a rootless mount with ownership metadata: record
        them in the upper object's override (True), or leave them to the real
        calls (False: plain mount, root, or an object that takes no xattr)."""
        if self.owners is None or not self.owners.record or not self.owners.active:
            return False
        if not (fields.update_uid or fields.update_gid or fields.update_mode):
            return False
        st = os.fstat(ofd)
        if not ownership.xattr_capable(st.st_mode):
            return False
        new = self.owners.change(
            ofd,
            st,
            attr.st_uid if fields.update_uid else None,
            attr.st_gid if fields.update_gid else None,
            attr.st_mode if fields.update_mode else None,
        )
        # The real bits keep the daemon's access; the kernel enforces the shown ones.
        owner = 0o700 if stat_mod.S_ISDIR(st.st_mode) else 0o600
        assert new.mode is not None
        os.chmod(b"/proc/self/fd/%d" % ofd, (new.mode & 0o777) | owner)
        return True

    # -- xattrs and statfs -----------------------------------------------------

    def _xattr_target(self, node: Node) -> tuple[int, tuple[bytes, ...], bytes | None]:
        if node.is_dir:
            return node.layer, node.path(), None
        return node.layer, node.dirpath(), node.name

    def _xattr_names(self, node: Node) -> frozenset[bytes]:
        """The visible xattr names of a node, listed once.

        ``ls -l`` asks every file for its ACL and security xattrs, and the
        kernel asks for ``security.capability`` before writes: most objects
        have none, and this answers those from memory.
        """
        self._xattr_counts[node.xattrs is None] += 1
        if node.xattrs is None:
            layer, dirpath, fname = self._xattr_target(node)
            names = self.stack.listxattr(layer, dirpath, fname)
            shown = markers.visible_xattrs(names)
            if self.owners is not None:
                shown = ownership.shown_xattrs(shown)
            node.xattrs = frozenset(shown)
        return node.xattrs

    @_guard
    def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == stats.XATTR and inode == pyfuse3.ROOT_INODE:
            return self._stats_reply(ctx)
        if markers.is_private_xattr(name):
            raise OSError(errno.EOPNOTSUPP, "union-private xattr")
        node = self.table[inode]
        if name not in self._xattr_names(node):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        layer, dirpath, fname = self._xattr_target(node)
        path = self.stack.xattr_path(layer, dirpath, fname)
        try:
            return os.getxattr(path, name, follow_symlinks=fname is None)
        except OSError as e:
            saved = ownership.saved_name(name) if self.owners is not None else None
            if saved is None or e.errno != errno.ENODATA:
                raise
            # Kept by a rootless extraction or setxattr (fuse-overlayfs' containers mode).
            return os.getxattr(path, saved, follow_symlinks=fname is None)

    @_guard
    def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._xattr_names(self.table[inode]))

    async def _change_xattr(self, inode: int, name: bytes, change: Callable[[bytes], None]) -> None:
        """Copy the object up, then apply ``change`` to its /proc path."""
        if markers.is_private_xattr(name) or (
            # Ownership and saved privileged xattrs: a caller could forge an owner
            # or a file capability with them.
            self.owners is not None
            and (
                name in ownership.OWNERSHIP_XATTRS or name.startswith(ownership.SAVED_XATTR_PREFIX)
            )
        ):
            raise OSError(errno.EOPNOTSUPP, "union-private xattr")
        upper = self._writable()
        node = self.table[inode]
        await upper.copyup.copy_up(node, meta_only=True)
        ofd = self._object_fd(node)
        try:
            change(b"/proc/self/fd/%d" % ofd)
        finally:
            node.xattrs = None
            if self.owners is not None:
                self.owners.forget_node(inode)
            os.close(ofd)

    @_guard
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        stored = self._stored_xattr(name)
        await self._change_xattr(inode, name, lambda path: os.setxattr(path, stored, value))

    @_guard
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        def remove(path: bytes) -> None:
            try:
                os.removexattr(path, name)
            except OSError as e:
                if self._stored_xattr(name) == name or e.errno not in (errno.ENODATA, errno.EPERM):
                    raise
                os.removexattr(path, self._stored_xattr(name))

        await self._change_xattr(inode, name, remove)

    def _stored_xattr(self, name: bytes) -> bytes:
        """The name an xattr is written under: a rootless mount with ownership
        metadata keeps ``security.*``/``trusted.*`` as ``user.containers.override_*``."""
        if self.owners is None or not self.owners.record or not self.owners.active:
            return name
        return ownership.saved_name(name) or name

    @_guard
    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
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

    def _stats_reply(self, ctx: pyfuse3.RequestContext) -> bytes:
        """The counters (``unionfs stats``), for the mounting user and root only."""
        if ctx.uid not in (0, os.geteuid()):
            raise OSError(errno.EACCES, "the stats of a mount are its owner's")
        return stats.encode(self.stats(), self.branches)

    def stats(self) -> dict[str, int]:
        """Sizes of what the daemon holds (SIGUSR1 logs them)."""
        return {
            "nodes": len(self.table),
            "dir_fds": self.stack.cached_fds(),
            "open_files": len(self._files),
            "open_dirs": len(self._dirs),
        }

    def close(self) -> None:
        """Release every descriptor the handlers still hold (after unmount)."""
        if self._fast is not None:
            self._fast.clear()
        for handle in self._files.values():
            os.close(handle.fd)
        self._files.clear()
        self._dirs.clear()
