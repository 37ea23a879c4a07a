"""``unionfs apply UPPER TARGET``: an upper's changes applied onto a real directory.

Also the library function the sandbox's commit is built on::

    from unionfs.changes.apply import apply, undo
    actions = apply(upper, lowers, target, select=..., conflict_check=..., dry_run=False)

How it works:

1. **Plan.**  The upper's changes (``scan``) become steps on TARGET paths:
   ``remove`` (a deletion, or what an opaque directory hides), ``mkdir`` (a
   directory the target lacks or has as a non-directory), ``put`` (a file,
   symlink, device, fifo or socket, or a hard link to an earlier name),
   ``dirmeta`` (a directory's mode, owner, xattrs, times; after its
   children).  Every path is checked against TARGET first: a symlink where a
   directory is needed, or a missing parent, is an error before anything is
   changed.  ``select`` keeps some paths only (the directories they need come
   along); ``conflict_check`` may skip or refuse a step.
2. **Journal.**  The plan is written to the journal directory (by default
   ``.TARGETNAME.unionfs-apply`` beside TARGET, on its filesystem) before the
   first change, fsync'd.  Whatever a step replaces or removes is moved into
   the journal's ``backup/`` (a hard link first for a file: the replacement
   is one rename, atomic for readers).
3. **Steps.**  Each object is built aside in its target directory
   (``.#ufa-PLANID-N``), given owner, mode, xattrs and times, then renamed
   into place.  A durable run commits in groups: up to ``_GROUP`` files are
   built, one ``syncfs`` writes them out, then they are renamed (plan order,
   directories' metadata behind the renames into them): no rename reaches
   the disk before its data, as with an fsync per file, for two syncfs per
   group instead.  Each step is idempotent: whether it happened is read
   from the filesystem (the temporary name, the backup, the target), so after
   a SIGKILL at any point a rerun resumes (automatically) and ``--undo``
   restores everything from the backups.  A finished run drops its journal
   (``keep_journal`` keeps it, so that ``undo`` still works).

TARGET is reached only through directory descriptors opened one component at
a time with ``O_NOFOLLOW``: a symlink inside TARGET never redirects a write
outside it, and names from the journal are checked before use.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import operator
import os
import secrets
import shutil
import stat as stat_mod
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .. import markers
from ..syscalls import RENAME_NOREPLACE, raise_fd_limit, renameat2, syncfs
from .scan import Change, Kind, ScanError, Scanner, paused_gc
from .source import SourceError, resolve

Path = tuple[bytes, ...]
#: os.fsdecode's arguments, for decoding many names without its per-call overhead.
_FS = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PLAN = "plan.json"
_DONE = "done"
_BACKUP = "backup"
_VERSION = 2
#: Journals this version resumes and undoes (1: without new trees).
_VERSIONS = (1, 2)
#: The fields of a step's ``meta`` (see ``_meta``), in their journal order.
_META_KEYS = ("mode", "fmt", "rdev", "uid", "gid", "atime_ns", "mtime_ns", "xattrs")
_meta_values = operator.itemgetter(*_META_KEYS)
#: Files built per group commit (one syncfs each) at most.
_GROUP = 4096


class ApplyError(Exception):
    """A plan that cannot be carried out safely, or a failed step: one line."""


#: ``select(path) -> bool``: apply the change at ``path`` (components, bytes)?
Select = Callable[[Path], bool]
#: ``conflict_check(change, target_lstat_or_None) -> bool``: False skips the step;
#: raising ApplyError aborts before anything is changed.
ConflictCheck = Callable[[Change, os.stat_result | None], bool]


@dataclass
class Step:
    """One idempotent action on one TARGET path (stored in the journal as JSON)."""

    n: int
    op: str  # remove | mkdir | put | dirmeta
    path: list[str]  # components, os.fsdecode'd (surrogateescape round-trips)
    kind: str = ""  # the change's A/C/D, for reports
    had: str | None = None  # what TARGET had there when planned: dir | nondir | None
    link: list[str] | None = None  # put: a hard link to this earlier TARGET path
    meta: dict[str, Any] = field(default_factory=dict)  # mode uid gid mtime_ns xattrs
    old: dict[str, Any] = field(default_factory=dict)  # dirmeta: TARGET's, for undo
    #: Inside a wholly new directory (TARGET has nothing there): the number of
    #: the ``mkdir`` step that makes its top (that step's own ``within`` is its
    #: ``n``).  The whole subtree is built under the top's temporary name and
    #: appears in one rename: no temporary name, rename or backup per file.
    within: int | None = None

    @functools.cached_property
    def bpath(self) -> Path:
        return tuple(os.fsencode(c) for c in self.path)

    def doc(self) -> list[Any]:
        """The step as stored in the journal: its fields in order (not the caches),
        ``meta`` as a list of ``_META_KEYS`` (half the JSON of dicts, twice as fast)."""
        meta = _meta_values(self.meta) if self.meta else None
        return [
            self.n,
            self.op,
            self.path,
            self.kind,
            self.had,
            self.link,
            meta,
            self.old or None,
            self.within,
        ]

    @staticmethod
    def from_doc(doc: Any) -> Step:
        """A step from ``doc()`` (or a version 1 journal's dict); TypeError or
        ValueError when it is not one."""
        if isinstance(doc, dict):
            return Step(**doc)
        n, op, path, kind, had, link, meta, old, within = doc
        meta = dict(zip(_META_KEYS, meta, strict=True)) if meta else {}
        return Step(n, op, path, kind, had, link, meta, old or {}, within)

    def display(self) -> str:
        return "/" + "/".join(self.path)


class Action(NamedTuple):
    """What apply did (or would do) at one path; ``skipped`` says why not.

    (A named tuple: one is made per planned step, three times faster than a
    frozen dataclass.)
    """

    path: str
    op: str
    kind: str
    skipped: str | None = None


# -- TARGET access -------------------------------------------------------------------


def _check_name(name: bytes) -> bytes:
    if not name or b"/" in name or name in (b".", b"..") or b"\0" in name:
        raise ApplyError(f"refusing the name {name!r}: it would leave its directory")
    return name


def _chmod_nofollow(pfd: int, name: bytes | None, mode: int) -> None:
    """chmod of ``name`` in ``pfd`` (of ``pfd`` itself if None), never through a symlink.

    Linux has no lchmod, and ``chmod(name, dir_fd=)`` follows a symlink put at
    the name meanwhile: the object is pinned with ``O_PATH | O_NOFOLLOW`` and
    changed through its ``/proc`` link, which names that inode, not a path.
    """
    if name is None:
        os.chmod(pfd, mode)
        return
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        if stat_mod.S_ISLNK(os.fstat(fd).st_mode):
            raise ApplyError(f"{os.fsdecode(name)}: became a symlink meanwhile: refusing")
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


class Tree:
    """A directory reached only by descriptors, one component at a time, O_NOFOLLOW."""

    def __init__(self, root: str) -> None:
        raise_fd_limit()  # one descriptor per directory touched, kept to the end
        self.root_fd = os.open(root, _DIR)
        self._fds: dict[Path, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.root_fd)

    def dirfd(self, path: Path) -> int:
        if not path:
            return self.root_fd
        fd = self._fds.get(path)
        if fd is None:
            parent = self.dirfd(path[:-1])
            try:
                fd = os.open(_check_name(path[-1]), _DIR, dir_fd=parent)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ApplyError(
                        f"{_show(path)}: not a directory in TARGET (a symlink?): refusing"
                    ) from None
                raise
            self._fds[path] = fd
        return fd

    def adopt(self, path: Path, fd: int) -> None:
        """Reach ``path`` (and below) through ``fd`` from now on: a new directory
        built under a temporary name is reached so at its final path, before and
        after it is renamed there (the descriptor follows the directory)."""
        self.forget(path)
        self._fds[path] = fd

    def forget(self, path: Path) -> None:
        """Drop descriptors of ``path`` and below (it moved)."""
        n = len(path)
        for key in [k for k in self._fds if k[:n] == path]:
            os.close(self._fds.pop(key))

    def lstat(self, path: Path) -> os.stat_result | None:
        try:
            return os.stat(
                _check_name(path[-1]), dir_fd=self.dirfd(path[:-1]), follow_symlinks=False
            )
        except FileNotFoundError:
            return None


def _show(path: Path) -> str:
    return "/" + b"/".join(path).decode("utf-8", "backslashreplace")


def _kind_of(st: os.stat_result | None) -> str | None:
    if st is None:
        return None
    return "dir" if stat_mod.S_ISDIR(st.st_mode) else "nondir"


def _meta(c: Change) -> dict[str, Any]:
    st = c.st
    assert st is not None
    return {
        "mode": stat_mod.S_IMODE(st.st_mode),
        # The type and device number as scanned: executing needs no stat of the upper
        # (journals without them stat it, as before).
        "fmt": stat_mod.S_IFMT(st.st_mode),
        "rdev": st.st_rdev,
        "uid": c.owner[0],
        "gid": c.owner[1],
        "atime_ns": st.st_atime_ns,
        "mtime_ns": st.st_mtime_ns,
        "xattrs": {k.hex(): v.hex() for k, v in c.xattrs.items()},
    }


def _xattrs_of(fd_path: bytes | int, follow: bool) -> dict[str, str]:
    try:
        names = os.listxattr(fd_path, follow_symlinks=follow)
    except OSError:
        return {}
    out = {}
    for n in names:
        b = os.fsencode(n)
        if markers.is_private_xattr(b):
            continue
        with contextlib.suppress(OSError):
            out[b.hex()] = os.getxattr(fd_path, n, follow_symlinks=follow).hex()
    return out


# -- planning -------------------------------------------------------------------------


def _selected_closure(changes: list[Change], select: Select | None) -> set[Path] | None:
    """Paths kept by ``select``, plus every directory a kept path is inside."""
    if select is None:
        return None
    keep: set[Path] = set()
    for c in changes:
        if select(c.path):
            keep.add(c.path)
            for i in range(len(c.path)):
                keep.add(c.path[:i])
    return keep


def _check_shape(c: Change, tst: os.stat_result | None) -> None:
    """Refuse to replace a directory by a non-directory, or back, unless the upper did.

    A symlink (or file) in TARGET where the lowers had a directory means TARGET
    is not what the upper was made over; replacing it would be a guess.
    """
    if tst is None or c.kind is Kind.DELETED:
        return
    lower_dir = c.lower is not None and stat_mod.S_ISDIR(c.lower.st_mode)
    lower_nondir = c.lower is not None and not lower_dir
    if c.is_dir and not stat_mod.S_ISDIR(tst.st_mode) and not lower_nondir:
        what = "a symlink" if stat_mod.S_ISLNK(tst.st_mode) else "a non-directory"
        raise ApplyError(
            f"{_show(c.path)}: TARGET has {what} where the upper has a directory"
            " over the lowers' (refusing)"
        )
    if not c.is_dir and stat_mod.S_ISDIR(tst.st_mode) and not lower_dir:
        raise ApplyError(f"{_show(c.path)}: TARGET has a directory where the lowers had none")


def plan(
    changes: list[Change],
    tree: Tree,
    select: Select | None = None,
    conflict_check: ConflictCheck | None = None,
) -> tuple[list[Step], list[Action]]:
    """The steps that make TARGET show the upper's changes; checks every path first."""
    keep = _selected_closure(changes, select)
    #: Every change is applied as it is (no selection, no conflicts to check).
    plain = keep is None and conflict_check is None
    steps: list[Step] = []
    actions: list[Action] = []
    #: Directories that will exist as real directories when their children run.
    dirs_ok: set[Path] = {()}
    #: Directories whose dirmeta runs once their subtree is done (a stack).
    open_dirs: list[tuple[Path, Step | None]] = []
    removed: set[Path] = set()
    #: Non-directories this plan writes: the names a later hard link may point at.
    put_paths: set[Path] = set()
    #: Directories this plan creates (TARGET has none there when planned): the
    #: number of the mkdir step of the top one (their steps' ``within``).
    new_dirs: dict[Path, int] = {}

    def add(step: Step, bpath: Path) -> None:
        step.n = len(steps)
        step.__dict__["bpath"] = bpath  # the cached property, known already
        steps.append(step)
        actions.append(Action(step.display(), step.op, step.kind))

    def close_dirs(upto: Path) -> None:
        while open_dirs and open_dirs[-1][0] != upto[: len(open_dirs[-1][0])]:
            path, meta_step = open_dirs.pop()
            if meta_step is not None:
                add(meta_step, path)

    for c in changes:
        if open_dirs:
            close_dirs(c.path)
        parent = c.path[:-1]
        if removed and any(parent[:i] in removed for i in range(len(parent) + 1)):
            continue  # inside something this plan removes
        wanted = keep is None or c.path in keep
        fully = keep is None or (select is not None and select(c.path))
        if not wanted:
            continue
        if parent not in dirs_ok:
            raise ApplyError(f"{_show(parent)}: TARGET has no directory there")
        # Below a directory this plan makes anew, TARGET has nothing yet (and may
        # hold a non-directory on the way, which must not be looked through).
        within = new_dirs.get(parent)
        if within is not None and plain and c.link is None and c.kind is Kind.ADDED:
            st = c.st
            if st is not None and not stat_mod.S_ISDIR(st.st_mode):
                # The most common change of all: a new file in a new directory
                # (what the general path below does for it, in short).
                put_paths.add(c.path)
                spath = [x.decode(*_FS) for x in c.path]
                add(Step(0, "put", spath, "A", None, None, _meta(c), {}, within), c.path)
                continue
        fresh_parent = within is not None or any(
            parent[:i] in new_dirs for i in range(1, len(parent))
        )
        tst = None if fresh_parent else tree.lstat(c.path)
        spath = [x.decode(*_FS) for x in c.path]
        if conflict_check is not None and fully and not conflict_check(c, tst):
            actions.append(Action(_show(c.path), "skip", c.kind.value, "conflict"))
            if c.is_dir and _kind_of(tst) == "dir":
                dirs_ok.add(c.path)
            else:
                removed.add(c.path)  # its subtree is left alone too
            continue
        if c.kind is Kind.DELETED:
            if tst is not None:
                add(Step(0, "remove", spath, "D", _kind_of(tst)), c.path)
                removed.add(c.path)
            continue
        _check_shape(c, tst)
        if c.is_dir:
            had = _kind_of(tst)
            meta = _meta(c)
            dirmeta = None
            if had != "dir":
                if within is None:
                    within = len(steps)  # this mkdir's own number: the top of a new tree
                add(Step(0, "mkdir", spath, c.kind.value, had, meta=meta, within=within), c.path)
                new_dirs[c.path] = within
            if had != "dir" or (fully and c.kind is not Kind.SAME):
                old: dict[str, Any] = {}
                if had == "dir":
                    assert tst is not None
                    fd = tree.dirfd(c.path)
                    old = {
                        "mode": stat_mod.S_IMODE(tst.st_mode),
                        "uid": tst.st_uid,
                        "gid": tst.st_gid,
                        "atime_ns": tst.st_atime_ns,
                        "mtime_ns": tst.st_mtime_ns,
                        "xattrs": _xattrs_of(b"/proc/self/fd/%d" % fd, True),
                    }
                dirmeta = Step(
                    0, "dirmeta", spath, c.kind.value, had, meta=meta, old=old, within=within
                )
            dirs_ok.add(c.path)
            open_dirs.append((c.path, dirmeta))
            continue
        if c.kind is Kind.SAME or not fully:
            continue
        link = None if c.link is None else [os.fsdecode(x) for x in c.link]
        if c.link is not None and c.link not in put_paths:
            link = None  # its first name is not applied (not selected, or refused): a copy
        put_paths.add(c.path)
        had = _kind_of(tst)
        step = Step(0, "put", spath, c.kind.value, had, link=link, meta=_meta(c), within=within)
        add(step, c.path)
        if had == "dir":
            removed.add(c.path)  # its old subtree goes to the backup as a whole
    close_dirs(())
    return steps, actions


# -- executing ------------------------------------------------------------------------


def _tmp_name(plan_id: str, n: int) -> bytes:
    """The temporary name step ``n`` builds its object under (in its directory)."""
    return b".#ufa-%s-%d" % (plan_id.encode(), n)


def _free_plan_id(tree: Tree, steps: list[Step]) -> str:
    """A random plan id whose temporary names of new trees are free in TARGET.

    A resume takes what it finds under such a name for its own (a half-built
    tree, removed whole): something else there must not be, so an id that
    would collide with it is not used.
    """
    tops = [s for s in steps if s.within == s.n]
    for _ in range(16):
        plan_id = secrets.token_hex(4)
        if all(tree.lstat((*s.bpath[:-1], _tmp_name(plan_id, s.n))) is None for s in tops):
            return plan_id
    raise ApplyError("TARGET holds the temporary names of every plan id tried: refusing")


class _Run:
    """Carries out (or undoes) a journaled plan; every step is idempotent."""

    def __init__(
        self,
        upper: str,
        tree: Tree,
        journal: str,
        plan_id: str,
        durable: bool,
        warn: Callable[[str], None],
    ) -> None:
        self._upper_path = upper
        self._upper: Tree | None = None
        self.tree = tree
        self.journal = journal
        self.plan_id = plan_id
        self.durable = durable
        self.warn = warn
        self.backup_fd = os.open(os.path.join(journal, _BACKUP), _DIR)
        self._warned: set[str] = set()
        #: Group commit (durable runs): files are built without an fsync each and
        #: renamed into place after one syncfs per group (see ``flush``).
        self.group = durable
        #: Built, waiting for the group's syncfs: (step, fresh, the step numbers
        #: final once it is placed: a new tree's top carries its whole subtree's).
        self._pending: list[tuple[Step, bool, list[int]]] = []
        self._pending_files = 0
        #: The wholly new tree being built under its temporary name (its top's
        #: mkdir step), and the numbers of the steps built into it so far.
        self._tree_top: Step | None = None
        self._tree_steps: list[int] = []
        #: A new tree found in place on resume: its steps are skipped.
        self._tree_skip: int | None = None
        #: Directories this run made (in new trees): what a file created in one gets.
        self._made: dict[Path, _MadeDir] = {}
        self.euid, self.egid = os.geteuid(), os.getegid()
        self.umask = _umask()

    @property
    def upper(self) -> Tree:
        """The upper, opened on first use (undo needs it not)."""
        if self._upper is None:
            self._upper = Tree(self._upper_path)
        return self._upper

    def close(self) -> None:
        if self._upper is not None:
            self._upper.close()
        os.close(self.backup_fd)

    def _tmp(self, step: Step) -> bytes:
        return _tmp_name(self.plan_id, step.n)

    def _bak(self, step: Step) -> bytes:
        return b"%d" % step.n

    def _exists(self, dir_fd: int, name: bytes) -> bool:
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _discard(self, dir_fd: int, name: bytes) -> None:
        """Remove a leftover temporary object (a whole tree for a directory)."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat_mod.S_ISDIR(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                _empty_tree(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def committed(self, step: Step) -> bool:
        """Has this step's effect reached TARGET? (Read from the filesystem alone.)"""
        path = step.bpath
        pfd = self.tree.dirfd(path[:-1])
        if step.op == "dirmeta":
            return False  # always safe to (re)apply
        if step.op == "remove":
            return not self._exists(pfd, path[-1])
        if self._exists(pfd, self._tmp(step)):
            return False
        if step.had is None:
            return self._exists(pfd, path[-1])
        return self._exists(self.backup_fd, self._bak(step))

    def building(self, step: Step) -> bool:
        """Is ``step`` inside the new tree being built now (done again, whatever the log says)?"""
        return self._tree_top is not None and step.within == self._tree_top.n

    # -- do ----------------------------------------------------------------------------

    def do(self, step: Step, fresh: bool = False) -> list[int]:
        """Carry out one step; ``fresh``: this run made the plan, nothing of it exists yet.

        Returns the steps whose effect is now final (for the ``done`` log): this
        one, or none while the group commit holds it back, or a whole group.
        """
        if step.within is not None:
            if step.within != step.n:
                return self._in_new_tree(step)
            return self._new_tree(step, fresh)
        path = step.bpath
        if step.op == "dirmeta":
            if self._pending:
                # After the renames into it, which would change its times again.
                self._pending.append((step, fresh, [step.n]))
                return []
            self._set_meta_path(path, step.meta, is_dir=True)
            return [step.n]
        finished = []
        if self._pending and not (step.op == "mkdir" or (step.op == "put" and not step.link)):
            finished = self.flush()  # a hard link needs its first name in place, ...
        if not fresh and self.committed(step):
            return [*finished, step.n]
        pfd = self.tree.dirfd(path[:-1])
        name = path[-1]
        if step.op == "remove":
            self._to_backup(step, pfd, name)
            return [*finished, step.n]
        tmp = self._tmp(step)
        if not fresh:
            self._discard(pfd, tmp)
        if step.op == "mkdir":  # (a journal of before new trees)
            os.mkdir(tmp, 0o700, dir_fd=pfd)
            # Writable by us until its dirmeta step, which sets the exact mode last.
            meta = dict(step.meta, mode=step.meta["mode"] | 0o700)
            self._set_meta(pfd, tmp, meta, is_dir=True, times=False)
        else:
            self._build(step, pfd, tmp)
            if self.group and step.link is None:
                finished += self._hold(step, fresh, [step.n])
                return finished
        self._place(step, pfd, name, tmp, fresh)
        return [*finished, step.n]

    def _hold(self, step: Step, fresh: bool, numbers: list[int]) -> list[int]:
        """Keep a built object for the group commit (which runs when the group is full)."""
        self._pending.append((step, fresh, numbers))
        self._pending_files += len(numbers)
        return self.flush() if self._pending_files >= _GROUP else []

    # -- wholly new trees ------------------------------------------------------------

    def _new_tree(self, step: Step, fresh: bool) -> list[int]:
        """Start a directory TARGET has nothing at: made under its temporary name,
        its whole subtree built inside at the final names (``_in_new_tree``)."""
        path = step.bpath
        if not fresh and self.committed(step):
            self._tree_skip = step.n  # renamed into place before the kill
            return [step.n]
        pfd = self.tree.dirfd(path[:-1])
        tmp = self._tmp(step)
        if not fresh:
            self._discard(pfd, tmp)  # half built when killed: built again
        self._make_dir(pfd, tmp, path, step.meta)
        self._tree_top, self._tree_steps = step, []
        return []

    def _make_dir(self, pfd: int, name: bytes, path: Path, meta: dict[str, Any]) -> None:
        """A new directory, writable by us until its dirmeta step (the exact mode
        last), reached from now on through its descriptor under ``path``."""
        os.mkdir(name, 0o700, dir_fd=pfd)
        # Its metadata through its own descriptor: nothing put at its name meanwhile
        # is followed.
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        self.tree.adopt(path, fd)
        self._set_meta(fd, None, dict(meta, mode=meta["mode"] | 0o700), is_dir=True, times=False)
        self._made[path] = _MadeDir.of(os.fstat(fd), meta, self.egid)

    def _in_new_tree(self, step: Step) -> list[int]:
        """One object of the new tree being built: made at its final name in its
        (not yet visible) directory, with no temporary name, rename or backup."""
        top = self._tree_top
        if top is None or top.n != step.within:
            if self._tree_skip == step.within:
                return [step.n]
            raise ApplyError(f"{step.display()}: outside the new directory it belongs to")
        path = step.bpath
        parent, name = path[:-1], path[-1]
        if step.op == "put" and step.link is None and step.meta.get("fmt") == stat_mod.S_IFREG:
            # A file (most steps): straight to its copy.
            ufd = self.upper.dirfd(parent)
            self._build_file(step, ufd, self.tree.dirfd(parent), name, self._made.get(parent))
            self._tree_steps.append(step.n)
            return []
        finished: list[int] = []
        if step.op == "put" and step.link is not None and self._pending:
            finished = self.flush()  # its first name may be built aside still
        pfd = self.tree.dirfd(parent)
        if step.op == "mkdir":
            self._make_dir(pfd, name, path, step.meta)
        elif step.op == "put":
            self._build(step, pfd, name, self._made.get(parent))
        else:  # a directory's metadata, through its own descriptor
            self._set_meta(self.tree.dirfd(path), None, step.meta, is_dir=True)
        if step.op == "dirmeta" and len(path) == len(top.bpath):
            # The top's own metadata: the tree is complete.
            self._tree_top = None
            numbers = [top.n, *self._tree_steps, step.n]
            if self.group:
                return finished + self._hold(top, True, numbers)
            self._place(top, pfd, name, self._tmp(top), True)
            return finished + numbers
        self._tree_steps.append(step.n)
        return finished

    def flush(self) -> list[int]:
        """The group commit: one syncfs makes every file built since the last one
        durable, then they are renamed into place (and the directories' metadata
        held back behind them is set), in plan order."""
        if not self._pending:
            return []
        self.sync()
        pending, self._pending, self._pending_files = self._pending, [], 0
        out: list[int] = []
        for step, fresh, numbers in pending:
            path = step.bpath
            try:
                if step.op == "dirmeta":
                    self._set_meta_path(path, step.meta, is_dir=True)
                else:
                    self._place(step, self.tree.dirfd(path[:-1]), path[-1], self._tmp(step), fresh)
            except OSError as e:
                raise ApplyError(
                    f"{step.display()}: {step.op}: {e.strerror} (rerun to resume, or --undo)"
                ) from None
            out += numbers
        return out

    def sync(self) -> None:
        """Write out TARGET's filesystem (syncfs needs a real descriptor, not O_PATH)."""
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.tree.root_fd)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def _place(self, step: Step, pfd: int, name: bytes, tmp: bytes, fresh: bool) -> None:
        """Rename a built object into place, the old one kept in the backup."""
        if step.had == "nondir" and step.op == "put":
            # The old file stays reachable from the backup; the swap is one rename.
            if fresh or not self._exists(self.backup_fd, self._bak(step)):
                os.link(
                    name,
                    self._bak(step),
                    src_dir_fd=pfd,
                    dst_dir_fd=self.backup_fd,
                    follow_symlinks=False,
                )
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        else:
            if step.had is not None and (fresh or self._exists(pfd, name)):
                self._to_backup(step, pfd, name)
            renameat2(pfd, tmp, pfd, name, RENAME_NOREPLACE)
        if step.op == "mkdir" or step.had == "dir":
            self.tree.forget(step.bpath)
            if step.op == "mkdir":
                self._forget_made(step.bpath)

    def _forget_made(self, path: Path) -> None:
        n = len(path)
        for key in [k for k in self._made if k[:n] == path]:
            del self._made[key]

    def _to_backup(self, step: Step, pfd: int, name: bytes) -> None:
        if self._exists(self.backup_fd, self._bak(step)):
            raise ApplyError(f"{step.display()}: both the object and its backup exist")
        renameat2(pfd, name, self.backup_fd, self._bak(step), RENAME_NOREPLACE)
        self.tree.forget(step.bpath)

    def _build(self, step: Step, pfd: int, tmp: bytes, made: _MadeDir | None = None) -> None:
        """Make the new object as ``tmp`` in ``pfd``, complete with its metadata
        (``made``: ``pfd`` is a directory this run made, see ``_MadeDir``)."""
        path = step.bpath
        if step.link is not None:
            first = tuple(os.fsencode(x) for x in step.link)
            os.link(
                _check_name(first[-1]),
                tmp,
                src_dir_fd=self.tree.dirfd(first[:-1]),
                dst_dir_fd=pfd,
                follow_symlinks=False,
            )
            return
        ufd = self.upper.dirfd(path[:-1])
        fmt, rdev = step.meta.get("fmt"), step.meta.get("rdev", 0)
        if fmt is None:
            st = os.stat(path[-1], dir_fd=ufd, follow_symlinks=False)
            fmt, rdev = stat_mod.S_IFMT(st.st_mode), st.st_rdev
        if fmt == stat_mod.S_IFREG:
            self._build_file(step, ufd, pfd, tmp, made)
            return
        if fmt == stat_mod.S_IFLNK:
            os.symlink(os.readlink(path[-1], dir_fd=ufd), tmp, dir_fd=pfd)
        else:
            os.mknod(tmp, fmt | 0o600, rdev, dir_fd=pfd)
        self._set_meta(pfd, tmp, step.meta, is_dir=False, symlink=fmt == stat_mod.S_IFLNK)

    def _build_file(
        self, step: Step, ufd: int, pfd: int, tmp: bytes, made: _MadeDir | None
    ) -> None:
        """A regular file's copy, its metadata set through its descriptor (no path
        lookups).  No fsync: a durable run syncs a whole group at once (``flush``).

        In a directory this run made (``made``), what creating the file gives
        already is not set again: the mode when the umask keeps it, the owner
        when it is ours, no xattrs to remove (tar -x's calls, no more)."""
        src = os.open(
            step.bpath[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=ufd
        )
        try:
            st = os.fstat(src)
            if not stat_mod.S_ISREG(st.st_mode):
                raise ApplyError(f"{step.display()}: changed type in the upper since the plan")
            meta = step.meta
            mode = meta["mode"]
            as_made = made is not None and made.plain and _created_as(mode, self.umask)
            dst = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode if as_made else 0o600,
                dir_fd=pfd,
            )
            try:
                _copy(src, dst, st.st_size)
                if made is None or not made.plain:
                    self._set_meta(dst, None, meta, is_dir=False)
                else:
                    self._set_new_meta(dst, meta, made, set_mode=not as_made)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _set_new_meta(self, fd: int, meta: dict[str, Any], made: _MadeDir, set_mode: bool) -> None:
        """``_set_meta`` of a file just created in a directory this run made (no
        default ACL there): owner and mode only when creating did not give them
        already, its xattrs added (it has none to remove), then its times."""
        if meta["uid"] != self.euid or meta["gid"] != made.new_gid:
            try:
                os.chown(fd, meta["uid"], meta["gid"])
            except PermissionError:
                self._warn_once("owner", "owners not set (not permitted): files keep yours")
        if set_mode:  # (a mode created as it is has no set-id bits for chown to clear)
            os.chmod(fd, meta["mode"])
        for k, v in meta["xattrs"].items():
            self._set_xattr(fd, bytes.fromhex(k), bytes.fromhex(v), True)
        os.utime(fd, ns=(meta["atime_ns"], meta["mtime_ns"]))

    def _set_meta_path(self, path: Path, meta: dict[str, Any], is_dir: bool) -> None:
        if not path:
            return
        self._set_meta(self.tree.dirfd(path[:-1]), path[-1], meta, is_dir=is_dir)

    def _set_meta(
        self,
        pfd: int,
        name: bytes | None,
        meta: dict[str, Any],
        is_dir: bool,
        times: bool = True,
        symlink: bool = False,
    ) -> None:
        """Owner first (it clears set-id bits), then mode, xattrs, times.

        ``name`` None: ``pfd`` is the object itself (an open file: every call
        goes through the descriptor, no path is resolved).
        """
        if name is None:
            target: int | bytes = pfd
            at: dict[str, Any] = {}
        else:
            target, at = name, {"dir_fd": pfd, "follow_symlinks": False}
        try:
            os.chown(target, meta["uid"], meta["gid"], **at)
        except PermissionError:
            self._warn_once("owner", "owners not set (not permitted): files keep yours")
        if not symlink:
            path = pfd if name is None else b"/proc/self/fd/%d/%s" % (pfd, name)
            fol = name is None  # a descriptor is the object; a final name is not followed
            _chmod_nofollow(pfd, name, meta["mode"])
            want = {bytes.fromhex(k): bytes.fromhex(v) for k, v in meta["xattrs"].items()}
            have = {bytes.fromhex(k) for k in _xattrs_of(path, fol)}
            for x in have - want.keys():
                with contextlib.suppress(OSError):
                    os.removexattr(path, x, follow_symlinks=fol)
            for x, v in want.items():
                self._set_xattr(path, x, v, fol)
        if times:
            os.utime(target, ns=(meta["atime_ns"], meta["mtime_ns"]), **at)

    def _set_xattr(self, path: bytes | int, x: bytes, v: bytes, fol: bool) -> None:
        """One xattr; one the filesystem or our privileges refuse is a warning (once)."""
        try:
            os.setxattr(path, x, v, follow_symlinks=fol)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            self._warn_once(f"x{x!r}", f"xattr {x.decode(errors='replace')} not set: {e.strerror}")

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(msg)

    # -- undo -------------------------------------------------------------------------

    def undo(self, step: Step) -> None:
        path = step.bpath
        try:
            pfd = self.tree.dirfd(path[:-1])
        except (FileNotFoundError, ApplyError):
            return  # its parent never came to be
        name = path[-1]
        if step.op == "dirmeta":
            if step.old:
                self._set_meta(pfd, name, step.old, is_dir=True)
            return
        tmp = self._tmp(step)
        bak = self._bak(step)
        has_bak = self._exists(self.backup_fd, bak)
        if step.op == "remove":
            if has_bak:
                renameat2(self.backup_fd, bak, pfd, name, RENAME_NOREPLACE)
            return
        if self._exists(pfd, tmp):
            self._discard(pfd, tmp)
            if step.had is None or not has_bak:
                return  # not committed
        if step.had is None:
            if self._exists(pfd, name):
                self._remove_new(pfd, name, step.op)
        elif has_bak:
            if step.had == "nondir" and step.op == "put":
                os.rename(bak, name, src_dir_fd=self.backup_fd, dst_dir_fd=pfd)
            else:
                if self._exists(pfd, name):
                    self._remove_new(pfd, name, step.op)
                renameat2(self.backup_fd, bak, pfd, name, RENAME_NOREPLACE)
        self.tree.forget(path)

    def _remove_new(self, pfd: int, name: bytes, op: str) -> None:
        if op == "mkdir":
            try:
                os.rmdir(name, dir_fd=pfd)
            except OSError as e:
                raise ApplyError(f"cannot undo: {e.strerror}") from None
        else:
            os.unlink(name, dir_fd=pfd)


_DEFAULT_ACL = b"system.posix_acl_default".hex()


@dataclass(frozen=True)
class _MadeDir:
    """What a file created in a directory this run made gets without asking."""

    #: Its group when created: the directory's when set-group-ID, else ours
    #: (None: not known, e.g. a ``grpid`` mount: always chown).
    new_gid: int | None
    #: No default ACL: the mode is the create mode less the umask, no xattrs.
    plain: bool

    @staticmethod
    def of(st: os.stat_result, meta: dict[str, Any], egid: int) -> _MadeDir:
        if st.st_mode & stat_mod.S_ISGID or st.st_gid == egid:
            new_gid: int | None = st.st_gid
        else:
            new_gid = None
        return _MadeDir(new_gid, _DEFAULT_ACL not in meta["xattrs"])


def _created_as(mode: int, umask: int | None) -> bool:
    """Does creating a file with ``mode`` give exactly ``mode`` (no chmod needed)?"""
    return umask is not None and not mode & ~0o777 and not mode & umask


def _umask() -> int | None:
    """The process's umask, read without changing it (None when the kernel does not say)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _empty_tree(fd: int) -> None:
    """Remove everything in the open directory ``fd``, read-only directories
    inside included (made writable through their own descriptors, never by
    name: a symlink put in meanwhile is removed, not followed)."""
    os.fchmod(fd, 0o700)
    for entry in os.scandir(fd):
        name = os.fsencode(entry.name)
        if entry.is_dir(follow_symlinks=False):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            try:
                _empty_tree(sub)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)


#: Files below this size are copied with read/write: copy_file_range of a file
#: with dirty pages may write them back first (profiled in benchmarks/layers.py:
#: 0.29 ms per call for just-written 512-byte files on ext4).
_SMALL_COPY = 1 << 20


def _copy(src: int, dst: int, size: int) -> None:
    """Copy a whole file (``size``: its fstat's) between descriptors, in the kernel
    when it is big enough to pay."""
    if size < _SMALL_COPY:
        # A buffer of the file's size (+1 to see the end in the same call): a 1 MiB
        # read buffer per small file costs more than the copy itself.
        want = size + 1
        while chunk := os.read(src, want):
            os.write(dst, chunk)
            if len(chunk) < want:
                return
            want = _SMALL_COPY
        return
    while True:
        try:
            n = os.copy_file_range(src, dst, 1 << 30)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            break
        if n == 0:
            return
    while chunk := os.read(src, 1 << 20):
        os.write(dst, chunk)


# -- the journal ---------------------------------------------------------------------


def default_journal(target: str) -> str:
    """``.TARGETNAME.unionfs-apply`` beside TARGET (on its filesystem, outside it)."""
    target = os.path.abspath(target).rstrip("/") or "/"
    parent, base = os.path.split(target)
    return os.path.join(parent, f".{base}.unionfs-apply")


def _write_atomic(dir_path: str, name: str, data: bytes, durable: bool = True) -> None:
    """Write a file whole or not at all (``durable``: on disk when this returns; a
    --no-sync run's survives a kill, not a crash, as the rest of the run)."""
    tmp = os.path.join(dir_path, f".{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.rename(tmp, os.path.join(dir_path, name))
    if not durable:
        return
    dfd = os.open(dir_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _load_plan(journal: str) -> tuple[dict[str, Any], list[Step], set[int]]:
    try:
        with open(os.path.join(journal, _PLAN), "rb") as f:
            doc = json.loads(f.read())
        steps = [Step.from_doc(s) for s in doc["steps"]]
        if doc.get("version") not in _VERSIONS:
            raise ValueError("version")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ApplyError(f"{journal}: not a usable apply journal ({e})") from None
    for s in steps:
        for comp in [*s.path, *(s.link or [])]:
            _check_name(os.fsencode(comp))
        if s.op not in ("remove", "mkdir", "put", "dirmeta"):
            raise ApplyError(f"{journal}: unknown step {s.op!r}")
    done: set[int] = set()
    with contextlib.suppress(FileNotFoundError), open(os.path.join(journal, _DONE)) as f:
        done = {int(x) for x in f.read().split() if x.isdigit()}
    return doc, steps, done


def _clear_stale_journal(journal: str) -> None:
    """Remove what a run killed before its plan was written leaves; refuse anything else."""
    try:
        names = set(os.listdir(journal))
    except FileNotFoundError:
        return
    backup = os.path.join(journal, _BACKUP)
    if not names <= {_BACKUP, f".{_PLAN}.tmp"} or (_BACKUP in names and os.listdir(backup)):
        raise ApplyError(f"{journal}: exists and is not an apply journal: remove it")
    shutil.rmtree(journal)


def _journal_checks(journal: str, target: str) -> None:
    parent = os.path.dirname(os.path.abspath(journal))
    if os.stat(parent).st_dev != os.stat(target).st_dev:
        raise ApplyError(
            f"journal {journal} is not on TARGET's filesystem: give --journal DIR on it"
        )


def _execute(
    doc: dict[str, Any],
    steps: list[Step],
    done: set[int] | None,
    journal: str,
    tree: Tree,
    durable: bool,
    warn: Callable[[str], None],
    progress: Callable[[int, int], None] | None,
) -> None:
    run = _Run(doc["upper"], tree, journal, doc["plan_id"], durable, warn)
    #: None: this run made the plan, so no step can have happened (no inference needed).
    fresh = done is None
    done = done or set()
    log = os.open(os.path.join(journal, _DONE), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    finished: list[int] = []

    def record(numbers: list[int]) -> None:
        # Written in batches: the log only spares a resume the checks of what is
        # in it; a step done but not logged yet is found done by those checks
        # (every step is idempotent), as after a kill right before its write.
        finished.extend(numbers)
        if len(finished) >= 512:
            os.write(log, b"".join(b"%d\n" % n for n in finished))
            finished.clear()

    try:
        for step in steps:
            if step.n in done and not run.building(step):
                continue
            if step.within is not None and step.within != step.n and step.within in done:
                continue  # its new tree was renamed into place whole
            try:
                record(run.do(step, fresh=fresh))
            except OSError as e:
                raise ApplyError(
                    f"{step.display()}: {step.op}: {e.strerror} (rerun to resume, or --undo)"
                ) from None
            if progress is not None:
                progress(step.n + 1, len(steps))
        record(run.flush())
        if durable:
            run.sync()  # the last group's renames and directory metadata
        os.write(log, b"".join(b"%d\n" % n for n in finished))
        if durable:
            os.fsync(log)
    finally:
        os.close(log)
        run.close()


@paused_gc()  # (see there: a fifth of the time of a big apply)
def apply(
    upper: str,
    lowers: Iterable[str],
    target: str,
    *,
    select: Select | None = None,
    conflict_check: ConflictCheck | None = None,
    changes: list[Change] | None = None,
    journal_dir: str | None = None,
    dry_run: bool = False,
    durable: bool = True,
    keep_journal: bool = False,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Action]:
    """Make TARGET show ``upper``'s changes over ``lowers``; returns what was (to be) done.

    A journal left by an interrupted run for the same upper and TARGET is
    resumed first (its plan, not a new one).  Raises ApplyError (nothing
    changed when raised during planning) and ScanError for a corrupt upper.
    ``changes``: the upper's scan, when the caller has made it already (the
    sandbox's commit reviews them first): not scanned twice.
    """
    warn = warn or (lambda _m: None)
    journal = journal_dir or default_journal(target)
    target = os.path.realpath(target)
    upper = os.path.realpath(upper)
    if not os.path.isdir(target):
        raise ApplyError(f"{target}: not a directory")
    if os.path.exists(os.path.join(journal, _PLAN)):
        doc, steps, done = _load_plan(journal)
        if doc["target"] != target or doc["upper"] != upper:
            raise ApplyError(
                f"{journal}: an unfinished apply of {doc['upper']} onto "
                f"{doc['target']}: resume or undo that first"
            )
        if dry_run:
            return [Action(s.display(), s.op, s.kind, "resume") for s in steps if s.n not in done]
        tree = Tree(target)
        try:
            _execute(doc, steps, done, journal, tree, durable, warn, progress)
        finally:
            tree.close()
        if not keep_journal:
            shutil.rmtree(journal)
        return [Action(s.display(), s.op, s.kind) for s in steps]
    if changes is None:
        with Scanner(upper, list(lowers)) as scanner:
            changes = list(scanner.changes())
            for w in scanner.warnings:
                warn(w)
    tree = Tree(target)
    try:
        steps, actions = plan(changes, tree, select, conflict_check)
        if dry_run:
            return actions
        _clear_stale_journal(journal)
        _journal_checks(journal, target)
        os.makedirs(os.path.join(journal, _BACKUP), mode=0o700, exist_ok=True)
        doc = {
            "version": _VERSION,
            "upper": upper,
            "target": target,
            "plan_id": _free_plan_id(tree, steps),
            "steps": [s.doc() for s in steps],
        }
        _write_atomic(journal, _PLAN, json.dumps(doc).encode(), durable)
        _execute(doc, steps, None, journal, tree, durable, warn, progress)
    finally:
        tree.close()
    if not keep_journal:
        shutil.rmtree(journal)
    return actions


def _placed(run: _Run, top: Step) -> bool:
    """Did the new tree of ``top`` reach its place (not left under its temporary name)?"""
    try:
        return run.committed(top)
    except (FileNotFoundError, ApplyError):
        return False


def undo(target: str, journal_dir: str | None = None) -> int:
    """Roll back an interrupted (or kept) apply from its journal; returns steps undone."""
    journal = journal_dir or default_journal(target)
    if not os.path.exists(os.path.join(journal, _PLAN)):
        raise ApplyError(f"{journal}: no apply journal to undo")
    doc, steps, _done = _load_plan(journal)
    if doc["target"] != os.path.realpath(target):
        raise ApplyError(f"{journal}: the journal is for {doc['target']}")
    tree = Tree(doc["target"])
    run = _Run(doc["upper"], tree, journal, doc["plan_id"], True, lambda _m: None)
    try:
        # The new trees that reached their place: the steps inside one are undone
        # one by one; inside one that did not, nothing is (its top's undo removes
        # what was built aside, and whatever is at its name is not ours).
        placed = {s.n for s in steps if s.within == s.n and _placed(run, s)}
        for step in reversed(steps):
            if step.within is not None and step.within != step.n and step.within not in placed:
                continue
            try:
                run.undo(step)
            except OSError as e:
                raise ApplyError(f"{step.display()}: undo {step.op}: {e.strerror}") from None
        for step in steps:  # children changed the directories' times again
            if step.op == "dirmeta" and step.old:
                with contextlib.suppress(OSError, ApplyError):
                    run.undo(step)
    finally:
        run.close()
        tree.close()
    shutil.rmtree(journal)
    return len(steps)


# -- the command ---------------------------------------------------------------------


def main(prog: str, argv: list[str]) -> int:
    from .diff import add_source_args

    parser = argparse.ArgumentParser(
        prog=prog, description="Apply an upper's changes onto a real directory, journaled."
    )
    add_source_args(parser)
    parser.add_argument("target", metavar="TARGET")
    parser.add_argument("--dry-run", "-n", action="store_true", help="print the plan only")
    parser.add_argument("--undo", action="store_true", help="roll back an interrupted apply")
    parser.add_argument(
        "--resume", action="store_true", help="resume an interrupted apply (also automatic)"
    )
    parser.add_argument("--journal", help="journal dir (default: .TARGET.unionfs-apply beside)")
    parser.add_argument("--keep-journal", action="store_true", help="keep it, for a later --undo")
    parser.add_argument(
        "--no-sync",
        action="store_true",
        help="no fsync (as -o volatile): survives a kill, not a crash",
    )
    parser.add_argument("--json", action="store_true", help="print the actions as JSON")
    args = parser.parse_args(argv)

    def warn(msg: str) -> None:
        print(f"{prog}: warning: {msg}", file=sys.stderr)

    progress = None
    if sys.stderr.isatty():

        def progress(i: int, n: int) -> None:
            if i == n or i % 500 == 0:
                print(f"\r{prog}: {i}/{n}", end="\n" if i == n else "", file=sys.stderr)

    try:
        if args.undo:
            n = undo(args.target, args.journal)
            print(f"{prog}: undone ({n} steps)", file=sys.stderr)
            return 0
        journal = args.journal or default_journal(args.target)
        if args.resume or os.path.exists(os.path.join(journal, _PLAN)):
            doc, _steps, _done = _load_plan(journal)
            upper, lowers = doc["upper"], ()
        else:
            src = resolve(args.upper, args.lower, args.workdir)
            upper, lowers = src.upper, src.lowers
        actions = apply(
            upper,
            lowers,
            args.target,
            journal_dir=args.journal,
            dry_run=args.dry_run,
            durable=not args.no_sync,
            keep_journal=args.keep_journal,
            warn=warn,
            progress=progress,
        )
    except (SourceError, ScanError, ApplyError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: {os.fsdecode(e.filename or '')}: {e.strerror}", file=sys.stderr)
        return 1
    if args.json:
        json.dump([a._asdict() for a in actions], sys.stdout, indent=1)
        print()
    else:
        verb = "would " if args.dry_run else ""
        for a in actions:
            print(
                f"{a.kind or ' '} {verb}{a.op} {a.path}" + (f" ({a.skipped})" if a.skipped else "")
            )
    return 0
