"""System calls the standard library lacks: ``renameat2``, ``syncfs`` and ``FICLONE``.

``renameat2`` gives the atomic steps the write path is built on: EXCHANGE
(swap a finished directory with a whiteout in one step), NOREPLACE, and
WHITEOUT (move an object away and leave a whiteout behind, atomically).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

#: ioctl FICLONE: share the source's extents (reflink) on btrfs, xfs, ...
FICLONE = 0x40049409

# The C library the interpreter already runs on (dlopen(NULL)): ctypes.util.find_library
# would spawn ``ldconfig -p`` at every start of the daemon (docs/performance.md, start-up).
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    """rename(2) relative to directory descriptors, with flags; raises OSError."""
    if _renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), oldname, None, newname)


_syncfs = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int


def syncfs(fd: int) -> None:
    """Write out the whole filesystem holding ``fd`` (one call, not an fsync per file)."""
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def raise_fd_limit() -> None:
    """Take the hard limit of open descriptors as the soft one.

    Walks by descriptor hold one per directory on the path (the daemon one per
    open file and cached directory, apply one per directory it touches): the
    default soft limit of 1024 would fail a large tree with EMFILE.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: None in a C library without it: writeback is then left to the fsync.
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing ``fd``'s dirty pages in the range to the disk, without waiting.

    A hint for a copy that an fsync will make durable: the disk writes while
    the copy goes on, instead of all at once in the fsync (1 GiB copy-up:
    docs/performance.md).  Its failure is not reported: the fsync that
    follows writes whatever is left and reports what goes wrong.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)
