"""Differential fuzzing of the write path: random operations, two implementations, one answer.

A hypothesis state machine draws 2-3 lower layers (files, directories,
symlinks, hard links within a layer, char 0/0 whiteouts, opaque directories,
user xattrs) over a small set of names, so that operations collide often,
then applies random system calls (create, write at offsets, append,
truncate, mkdir, rmdir, unlink, rename with NOREPLACE/EXCHANGE, link,
symlink, chmod, chown, utime, user xattrs, reads, listings) and remounts to
every *side* at once.  Each call must answer the same on every side (value
or errno) and after every step the whole merged view must be the same.

- ``test_unionfs_matches_kernel`` (root): unionfs against kernel overlayfs
  (``index=on``) over identical copies of the layers.  Kernel overlayfs
  without ``redirect_dir`` answers EXDEV to renaming a directory with lower
  contents, which unionfs performs; the kernel side then does what mv(1)
  does (remove an empty target, re-create the tree and delete the source:
  directories are re-made, everything else is hard-linked across, which
  keeps the identity and link counts a rename keeps) and the outcome is
  compared.  A ``handover`` step mounts a copy of the upper unionfs wrote
  with kernel overlayfs and expects the same view.
- ``test_unionfs_matches_model``: unionfs mounted by an unprivileged user
  (the current user, or, as root, the test user) against ``fsmodel.Model``,
  the pure-Python oracle for where kernel overlayfs is missing.
- ``test_model_matches_kernel`` (root): keeps the oracle honest.

The default profile (3 x 15 examples of 25 steps, ~30 s) draws the same
examples every run, so CI fails only when a change breaks something;
``UNIONFS_SOAK=<seconds>`` draws new, longer examples until the time is
spent.  A failure prints the minimal sequence of steps that reproduces it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import stat
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from unionfs.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

from fsmodel import Entry, Layer, Model, build_layer, prune_whiteouts
from support import User, diff_snapshots, kernel_overlay, snapshot, unionfs_mount

AT_FDCWD = -100
UMASK = 0o022

# --------------------------------------------------------------------------- the name space

TOP = ("a", "b", "c", "d")
SUB = ("a", "b")
D1 = TOP
D2 = tuple(f"{t}/{s}" for t in TOP for s in SUB)
D3 = tuple(f"{p}/{s}" for p in D2 for s in SUB)
ALL_PATHS = D1 + D2 + D3
#: Relative symlink targets: existing names, names inside, ".", and a dangling one.
TARGETS = ("a", "b", "c/a", "a/b/a", ".", "x")
XATTR_NAMES = ("user.a", "user.b")

paths = st.one_of(
    st.sampled_from(D1),
    st.sampled_from(D1),
    st.sampled_from(D2),
    st.sampled_from(D2),
    st.sampled_from(D3),
)
contents = st.binary(max_size=20)


@dataclass(frozen=True)
class Config:
    """What a run compares and which operations it may use."""

    sides: tuple[str, ...]  # the first is the reference: "kernel", "model" or "unionfs"
    rootful: bool  # chown, setuid/setgid/sticky modes, 0000
    user: User | None = None  # unionfs mounted by (and operated as) this user
    whiteouts: bool = True  # char 0/0 whiteouts in the lowers
    opaque_xattr: str = "trusted.overlay.opaque"

    @property
    def file_modes(self) -> tuple[int, ...]:
        base = (0o644, 0o600, 0o755, 0o640)
        return (*base, 0o444, 0o000, 0o4755, 0o2755, 0o6711) if self.rootful else base

    @property
    def dir_modes(self) -> tuple[int, ...]:
        base = (0o755, 0o700, 0o775)
        return (*base, 0o555, 0o000, 0o2775, 0o1777) if self.rootful else base

    @property
    def chmod_modes(self) -> tuple[int, ...]:
        # Rootless: the owner keeps rwx, so no answer depends on permission checks.
        base = (0o755, 0o700, 0o750, 0o777)
        return (*base, 0o644, 0o000, 0o4755, 0o2755, 0o1777, 0o6777) if self.rootful else base

    @property
    def create_modes(self) -> tuple[int, ...]:
        return (0o644, 0o600, 0o755, 0o666) + ((0o000, 0o444) if self.rootful else ())

    @property
    def mkdir_modes(self) -> tuple[int, ...]:
        return (0o755, 0o700, 0o777) + ((0o555, 0o1777) if self.rootful else ())


# --------------------------------------------------------------------------- lower layers


def layer_strategy(cfg: Config, bottom: bool) -> st.SearchStrategy[Layer]:
    top_kinds = ["none", "file", "dir", "dir", "dir", "symlink", "link"]
    kinds = ["none", "none", "none", "file", "file", "dir", "symlink", "link"]
    if cfg.whiteouts and not bottom:
        top_kinds.append("whiteout")
        kinds.append("whiteout")
    xattrs = st.sampled_from([(), (("user.a", b"lower"),), (("user.a", b"1"), ("user.b", b""))])

    @st.composite
    def layer(draw) -> Layer:
        out: dict[str, Entry] = {}
        files: list[str] = []
        for path in ALL_PATHS:
            parent = os.path.dirname(path)
            if parent and (parent not in out or out[parent].kind != "dir"):
                continue
            kind = draw(st.sampled_from(kinds if parent else top_kinds))
            if kind == "none":
                continue
            if kind == "link" and not files:
                kind = "file"
            if kind == "file":
                files.append(path)
                out[path] = Entry(
                    "file",
                    mode=draw(st.sampled_from(cfg.file_modes)),
                    data=draw(contents),
                    xattrs=draw(xattrs),
                )
            elif kind == "link":
                out[path] = Entry("link", target=draw(st.sampled_from(files)))
            elif kind == "dir":
                out[path] = Entry(
                    "dir",
                    mode=draw(st.sampled_from(cfg.dir_modes)),
                    opaque=not bottom and draw(st.booleans()),
                    xattrs=draw(xattrs),
                )
            elif kind == "symlink":
                out[path] = Entry("symlink", target=draw(st.sampled_from(TARGETS)))
            else:
                out[path] = Entry("whiteout")
        return tuple(out.items())

    return layer()


def layers_strategy(cfg: Config) -> st.SearchStrategy[list[Layer]]:
    """2 or 3 layers, topmost first."""
    return st.integers(2, 3).flatmap(
        lambda n: st.tuples(*(layer_strategy(cfg, i == n - 1) for i in range(n))).map(
            lambda t: prune_whiteouts(list(t))
        )
    )


def write_layers(layers: list[Layer], base: Path, cfg: Config) -> list[Path]:
    dirs = []
    for i, layer in enumerate(layers):
        d = base / f"l{i}"
        d.mkdir(parents=True)
        build_layer(layer, d, cfg.opaque_xattr)
        dirs.append(d)
    return dirs


def chown_tree(root: Path, user: User) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)]:
            os.chown(n, user.uid, user.gid, follow_symlinks=False)


# --------------------------------------------------------------------------- the operations


#: Descriptors held open across steps: (mount root, slot) -> fd.
_FDS: dict[tuple[str, int], int] = {}
OPEN_MODES = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY,
    "rw": os.O_RDWR,
    "a": os.O_WRONLY | os.O_APPEND,
}


def _fd(root: str, slot: int) -> int:
    fd = _FDS.get((root, slot))
    if fd is None:
        raise OSError(errno.EBADF, "slot not open")
    return fd


def _fd_op(root: str, op: str, args: tuple):
    if op == "open":
        path, slot, mode = args
        if (root, slot) in _FDS:
            os.close(_FDS.pop((root, slot)))
        _FDS[(root, slot)] = os.open(os.path.join(root, path), OPEN_MODES[mode])
        return None
    if op == "close_all":
        for key in [k for k in _FDS if k[0] == root]:
            os.close(_FDS.pop(key))
        return None
    fd = _fd(root, args[0])
    if op == "fd_read":
        return os.pread(fd, 4096, 0)
    if op == "fd_write":
        return os.pwrite(fd, args[2], args[1])
    if op == "fd_truncate":
        return os.ftruncate(fd, args[1])
    if op == "fd_stat":
        st_ = os.fstat(fd)
        is_dir = stat.S_ISDIR(st_.st_mode)
        return (
            stat.filemode(st_.st_mode),
            None if is_dir else st_.st_size,
            None if is_dir else st_.st_nlink,
        )
    if op == "fd_close":
        os.close(_FDS.pop((root, args[0])))
        return None
    raise ValueError(op)


def real_op(root: str, op: str, args: tuple):
    """Run one operation on a mounted view; return what it returns or raise OSError."""

    def p(rel: str) -> str:
        return os.path.join(root, rel)

    if op == "open" or op == "close_all" or op.startswith("fd_"):
        return _fd_op(root, op, args)

    if op == "create":
        path, data, mode, excl = args
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if excl else os.O_TRUNC)
        fd = os.open(p(path), flags, mode)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return None
    if op in ("write_at", "append"):
        path, *rest = args
        fd = os.open(p(path), os.O_WRONLY | (os.O_APPEND if op == "append" else 0))
        try:
            return os.write(fd, rest[0]) if op == "append" else os.pwrite(fd, rest[1], rest[0])
        finally:
            os.close(fd)
    if op == "read":
        fd = os.open(p(args[0]), os.O_RDONLY)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    if op == "listdir":
        return sorted(os.listdir(p(args[0])))
    if op == "truncate":
        return os.truncate(p(args[0]), args[1])
    if op == "mkdir":
        return os.mkdir(p(args[0]), args[1])
    if op == "symlink":
        return os.symlink(args[0], p(args[1]))
    if op == "rmdir":
        return os.rmdir(p(args[0]))
    if op == "unlink":
        return os.unlink(p(args[0]))
    if op == "link":
        return os.link(p(args[0]), p(args[1]), follow_symlinks=False)
    if op == "rename":
        src, dst, flags = args
        return renameat2(AT_FDCWD, os.fsencode(p(src)), AT_FDCWD, os.fsencode(p(dst)), flags)
    if op == "chmod":
        return os.chmod(p(args[0]), args[1])
    if op == "chown":
        path, uid, gid, follow = args
        return os.chown(p(path), uid, gid, follow_symlinks=follow)
    if op == "utime":
        path, ns, follow = args
        os.utime(p(path), ns=(ns, ns), follow_symlinks=follow)
        return os.stat(p(path), follow_symlinks=follow).st_mtime_ns
    if op == "setxattr":
        path, name, value, flags, follow = args
        return os.setxattr(p(path), name, value, flags, follow_symlinks=follow)
    if op == "removexattr":
        path, name, follow = args
        return os.removexattr(p(path), name, follow_symlinks=follow)
    raise ValueError(op)


def outcome(fn: Callable, *args) -> tuple[str, object]:
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno or 0, str(e.errno)))


class Worker:
    """A child process with a user's ids that runs ``real_op`` and ``snapshot`` for us.

    Root cannot enter a FUSE mount made by another user without allow_other,
    so everything on such a mount is done from here.
    """

    def __init__(self, user: User) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                os.close(self._to_child)
                os.close(self._from_child)
                os.setgroups([])
                os.setgid(user.gid)
                os.setuid(user.uid)
                with os.fdopen(to_child_r, "rb") as rf, os.fdopen(from_child_w, "wb") as wf:
                    while True:
                        try:
                            msg = pickle.load(rf)
                        except EOFError:
                            break
                        try:
                            if msg[0] == "op":
                                res = outcome(real_op, *msg[1:])
                            else:
                                res = ("ok", snapshot(msg[1]))
                        except BaseException:
                            res = ("crash", traceback.format_exc())
                        pickle.dump(res, wf)
                        wf.flush()
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(to_child_r)
        os.close(from_child_w)
        self._w = os.fdopen(self._to_child, "wb")
        self._r = os.fdopen(self._from_child, "rb")

    def _call(self, msg: tuple):
        pickle.dump(msg, self._w)
        self._w.flush()
        res = pickle.load(self._r)
        if res[0] == "crash":
            raise AssertionError(f"worker failed:\n{res[1]}")
        return res

    def op(self, root: str, op: str, args: tuple) -> tuple[str, object]:
        return self._call(("op", root, op, args))

    def snapshot(self, root: str) -> dict:
        return self._call(("snapshot", root))[1]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._w.close()
        with contextlib.suppress(OSError):
            self._r.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


# --------------------------------------------------------------------------- the sides


class Side:
    name = "?"

    def run(self, op: str, args: tuple) -> tuple[str, object]:
        raise NotImplementedError

    def view(self) -> dict:
        raise NotImplementedError

    def remount(self) -> None:
        pass

    def close(self) -> None:
        pass


class ModelSide(Side):
    name = "model"

    def __init__(self, layers: list[Layer], uid: int, gid: int) -> None:
        self.model = Model(layers, uid, gid, umask=UMASK)

    def run(self, op: str, args: tuple) -> tuple[str, object]:
        return outcome(getattr(self.model, op), *args)

    def view(self) -> dict:
        return self.model.snapshot()


def _relink_tree(src: str, dst: str) -> None:
    """Re-create ``src`` at ``dst``: directories made anew, the rest hard-linked across."""
    st_ = os.lstat(src)
    if not stat.S_ISDIR(st_.st_mode):
        os.link(src, dst, follow_symlinks=False)
        return
    os.mkdir(dst, 0o700)
    for name in sorted(os.listdir(src)):
        _relink_tree(os.path.join(src, name), os.path.join(dst, name))
    os.chown(dst, st_.st_uid, st_.st_gid)
    os.chmod(dst, stat.S_IMODE(st_.st_mode))
    for x in os.listxattr(src):
        if x.startswith("user."):
            os.setxattr(dst, x, os.getxattr(src, x))


def _mv(src: str, dst: str) -> None:
    """rename, or on EXDEV what mv(1) does: remove the (empty) target, copy, delete."""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        if os.path.lexists(dst):
            os.rmdir(dst)
        _relink_tree(src, dst)
        shutil.rmtree(src)


class KernelSide(Side):
    name = "kernel"

    def __init__(self, base: Path, layers: list[Layer], cfg: Config) -> None:
        self.lowers = write_layers(layers, base / "k-lowers", cfg)
        for d in ("k-up", "k-work", "k-mnt"):
            (base / d).mkdir()
        self.mnt = base / "k-mnt"
        self._cm = kernel_overlay(self.lowers, base / "k-up", base / "k-work", self.mnt)
        self._cm.__enter__()
        self._open = True
        self.emulated = 0

    def run(self, op: str, args: tuple) -> tuple[str, object]:
        res = outcome(real_op, str(self.mnt), op, args)
        if op == "rename" and res == ("err", "EXDEV"):
            self.emulated += 1
            # Parents resolved first: moving a symlink must not change where the other path leads.
            src, dst = (
                os.path.join(
                    os.path.realpath(os.path.dirname(os.path.join(self.mnt, a))),
                    os.path.basename(a),
                )
                for a in args[:2]
            )
            flags = args[2]
            if flags & RENAME_EXCHANGE:
                tmp = os.path.join(os.path.dirname(src), ".fuzz-swap")

                def swap() -> None:
                    _mv(src, tmp)
                    _mv(dst, src)
                    _mv(tmp, dst)

                res = outcome(swap)
            else:
                res = outcome(_mv, src, dst)
        return res

    def view(self) -> dict:
        return snapshot(self.mnt)

    def close(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(OSError):
                real_op(str(self.mnt), "close_all", ())
            self._cm.__exit__(None, None, None)


class UnionfsSide(Side):
    name = "unionfs"

    def __init__(self, base: Path, layers: list[Layer], cfg: Config) -> None:
        self.base = base
        self.lowers = write_layers(layers, base / "u-lowers", cfg)
        for d in ("u-up", "u-mnt"):
            (base / d).mkdir()
        self.upper, self.mnt = base / "u-up", base / "u-mnt"
        self.user = cfg.user
        if self.user is not None:
            for d in ("u-lowers", "u-up", "u-mnt"):
                chown_tree(base / d, self.user)
        self.worker = Worker(self.user) if self.user is not None else None
        self._cm = None
        self.mount()

    def mount(self) -> None:
        self._cm = unionfs_mount(self.lowers, self.upper, self.mnt, user=self.user)
        self._cm.__enter__()

    def unmount(self) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            with contextlib.suppress(Exception):
                self.run("close_all", ())
            cm.__exit__(None, None, None)

    def run(self, op: str, args: tuple) -> tuple[str, object]:
        if self.worker is not None:
            return self.worker.op(str(self.mnt), op, args)
        return outcome(real_op, str(self.mnt), op, args)

    def view(self) -> dict:
        if self.worker is not None:
            return self.worker.snapshot(str(self.mnt))
        return snapshot(self.mnt)

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def close(self) -> None:
        try:
            self.unmount()
        finally:
            if self.worker is not None:
                self.worker.close()


# --------------------------------------------------------------------------- the machine


@dataclass
class Stats:
    examples: int = 0
    steps: int = 0
    emulated_renames: int = 0
    handovers: int = 0
    ops: dict[str, dict[str, int]] = field(default_factory=dict)


def machine_class(cfg: Config, stats: Stats) -> type[RuleBasedStateMachine]:
    file_modes = st.sampled_from(cfg.create_modes)
    chmod_modes = st.sampled_from(cfg.chmod_modes)
    mkdir_modes = st.sampled_from(cfg.mkdir_modes)
    slots = st.integers(0, 2)

    class UnionFuzz(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.base: Path | None = None
            self.sides: list[Side] = []
            self.layers: list[Layer] = []
            self.existing: list[str] = []
            self.dirs: list[str] = []
            self.open_slots: set[int] = set()
            self.last: tuple = ()
            self.log: list[tuple] = []

        @initialize(layers=layers_strategy(cfg))
        def setup(self, layers: list[Layer]) -> None:
            stats.examples += 1
            self.layers = layers
            self.base = Path(tempfile.mkdtemp(prefix="unionfs-fuzz-", dir="/tmp"))
            os.chmod(self.base, 0o755)
            if cfg.user is not None:  # the default work dir is made beside the upper
                os.chown(self.base, cfg.user.uid, cfg.user.gid)
            uid, gid = (cfg.user.uid, cfg.user.gid) if cfg.user else (os.getuid(), os.getgid())
            for name in cfg.sides:
                if name == "kernel":
                    self.sides.append(KernelSide(self.base, layers, cfg))
                elif name == "unionfs":
                    self.sides.append(UnionfsSide(self.base, layers, cfg))
                else:
                    self.sides.append(ModelSide(layers, uid, gid))

        def teardown(self) -> None:
            try:
                for side in reversed(self.sides):
                    with contextlib.suppress(Exception):
                        side.close()
                    if isinstance(side, KernelSide):
                        stats.emulated_renames += side.emulated
            finally:
                if self.base is not None:
                    shutil.rmtree(self.base, ignore_errors=True)

        # ------------------------------------------------------------ helpers

        def script(self) -> str:
            """The run so far, as the calls that reproduce it."""
            lines = [f"layers (topmost first): {self.layers!r}"]
            lines += [f"  {op}{args!r}" for op, args in self.log]
            return "\n".join(lines)

        def apply(self, op: str, *args) -> None:
            stats.steps += 1
            self.log.append((op, args))
            results = [side.run(op, args) for side in self.sides]
            counts = stats.ops.setdefault(op, {})
            key = "ok" if results[0][0] == "ok" else str(results[0][1])
            counts[key] = counts.get(key, 0) + 1
            ref = self.last = results[0]
            if op == "fd_close":
                self.open_slots.discard(args[0])
            elif op == "close_all":
                self.open_slots.clear()
            for side, res in zip(self.sides[1:], results[1:], strict=True):
                assert res == ref, (
                    f"{op}{args!r}: {side.name} answered {res!r}, "
                    f"{self.sides[0].name} answered {ref!r}\n{self.script()}"
                )

        @invariant()
        def same_view(self) -> None:
            if not self.sides:
                return
            ref = self.sides[0].view()
            self.existing = sorted(ref)
            self.dirs = [p for p, v in sorted(ref.items()) if v[0].startswith("d")]
            for side in self.sides[1:]:
                try:
                    diff = diff_snapshots(ref, side.view())
                except OSError as e:
                    raise AssertionError(f"{side.name} view: {e!r}\n{self.script()}") from e
                assert not diff, (
                    f"views differ ({self.sides[0].name} != {side.name}):\n"
                    + "\n".join(diff)
                    + "\n"
                    + self.script()
                )

        # ------------------------------------------------------------ rules
        # Paths are drawn half the time from what the view holds now, so that
        # most operations meet an object; the rest from the whole name space.

        def path(self, data, label: str, new: bool = False) -> str:
            """A path: mostly one that exists now, unless the object is to be ``new``."""
            choices = [paths]
            if self.existing and not new:
                choices += [st.sampled_from(self.existing)] * 2
            return data.draw(st.one_of(choices), label=label)

        def run(self, op: str, *args) -> None:
            self.apply(op, *args)

        @rule(data=st.data(), content=contents, mode=file_modes, excl=st.booleans())
        def create(self, data, content, mode, excl):
            self.run("create", self.path(data, "path", new=excl), content, mode, excl)

        @rule(data=st.data(), offset=st.integers(0, 40), content=contents)
        def write_at(self, data, offset, content):
            self.run("write_at", self.path(data, "path"), offset, content)

        @rule(data=st.data(), content=contents)
        def append(self, data, content):
            self.run("append", self.path(data, "path"), content)

        @rule(data=st.data(), size=st.integers(0, 40))
        def truncate(self, data, size):
            self.run("truncate", self.path(data, "path"), size)

        @rule(data=st.data())
        def read(self, data):
            self.run("read", self.path(data, "path"))

        @rule(data=st.data(), root=st.booleans())
        def listdir(self, data, root):
            self.run("listdir", "." if root else self.path(data, "path"))

        @rule(data=st.data(), mode=mkdir_modes)
        def mkdir(self, data, mode):
            self.run("mkdir", self.path(data, "path", new=True), mode)

        @rule(data=st.data())
        def rmdir(self, data):
            self.run("rmdir", self.path(data, "path"))

        @rule(data=st.data())
        def unlink(self, data):
            self.run("unlink", self.path(data, "path"))

        @rule(data=st.data(), flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
        def rename(self, data, flags):
            self.run(
                "rename", self.path(data, "src"), self.path(data, "dst", new=flags == 0), flags
            )

        @precondition(lambda self: self.dirs)
        @rule(data=st.data(), flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
        def rename_dir(self, data, flags):
            """Directories moved often: unionfs' copy-up of trees, the kernel's EXDEV."""
            src = data.draw(st.sampled_from(self.dirs), label="src")
            self.run("rename", src, self.path(data, "dst", new=flags == 0), flags)

        @rule(data=st.data())
        def link(self, data):
            self.run("link", self.path(data, "src"), self.path(data, "dst", new=True))

        @rule(data=st.data(), content=st.sampled_from(TARGETS))
        def symlink(self, data, content):
            self.run("symlink", content, self.path(data, "path", new=True))

        @rule(data=st.data(), slot=slots, mode=st.sampled_from(sorted(OPEN_MODES)))
        def open(self, data, slot, mode):
            """Descriptors kept across steps: copy-up, rename, unlink under an open file."""
            self.run("open", self.path(data, "path"), slot, mode)
            if self.last == ("ok", None):
                self.open_slots.add(slot)
            else:
                self.open_slots.discard(slot)  # a failed open leaves the slot closed

        @precondition(lambda self: self.open_slots)
        @rule(
            data=st.data(),
            kind=st.sampled_from(["fd_read", "fd_write", "fd_truncate", "fd_stat", "fd_close"]),
            offset=st.integers(0, 40),
            content=contents,
        )
        def fd_op(self, data, kind, offset, content):
            slot = data.draw(st.sampled_from(sorted(self.open_slots)), label="slot")
            if kind == "fd_write":
                self.run(kind, slot, offset, content)
            elif kind == "fd_truncate":
                self.run(kind, slot, offset)
            else:
                self.run(kind, slot)

        @rule(data=st.data(), mode=chmod_modes)
        def chmod(self, data, mode):
            self.run("chmod", self.path(data, "path"), mode)

        @precondition(lambda self: cfg.rootful)
        @rule(
            data=st.data(),
            uid=st.sampled_from([0, 1000, 1234]),
            gid=st.sampled_from([0, 100, 1234]),
            follow=st.booleans(),
        )
        def chown(self, data, uid, gid, follow):
            self.run("chown", self.path(data, "path"), uid, gid, follow)

        @rule(data=st.data(), ns=st.integers(0, 2**62), follow=st.booleans())
        def utime(self, data, ns, follow):
            self.run("utime", self.path(data, "path"), ns, follow)

        @rule(
            data=st.data(),
            name=st.sampled_from(XATTR_NAMES),
            value=st.binary(max_size=8),
            flags=st.sampled_from([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE]),
            follow=st.booleans(),
        )
        def setxattr(self, data, name, value, flags, follow):
            self.run("setxattr", self.path(data, "path"), name, value, flags, follow)

        @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES), follow=st.booleans())
        def removexattr(self, data, name, follow):
            self.run("removexattr", self.path(data, "path"), name, follow)

        @precondition(lambda self: "unionfs" in cfg.sides)
        @rule()
        def remount(self):
            """unionfs unmounted (its descriptors closed first) and mounted again."""
            self.apply("close_all")
            self.log.append(("remount", ()))
            for side in self.sides:
                side.remount()

        @precondition(
            lambda self: (
                cfg.sides == ("kernel", "unionfs")
                and len(self.log) % 4 == 3
                and not any(e.kind == "link" for layer in self.layers for _, e in layer)
            )
        )
        @rule()
        def handover(self):
            """The upper unionfs wrote, mounted by kernel overlayfs, shows the same view.

            Hard-linked lowers are left out: their copies live in the work dir's
            index, which is not handed over (nor is the kernel's own).
            """
            self.log.append(("handover", ()))
            stats.handovers += 1
            kernel, union = self.sides
            assert isinstance(kernel, KernelSide) and isinstance(union, UnionfsSide)
            assert self.base is not None
            h = Path(tempfile.mkdtemp(prefix="handover-", dir=self.base))
            try:
                subprocess.run(["cp", "-a", str(union.upper), str(h / "up")], check=True)
                (h / "work").mkdir()
                (h / "mnt").mkdir()
                with kernel_overlay(union.lowers, h / "up", h / "work", h / "mnt"):
                    got = snapshot(h / "mnt")
                diff = diff_snapshots(kernel.view(), got)
                assert not diff, "kernel view of unionfs' upper differs:\n" + "\n".join(diff)
            finally:
                shutil.rmtree(h, ignore_errors=True)

    return UnionFuzz


# --------------------------------------------------------------------------- running


def _settings(**over) -> settings:
    db = Path(__file__).resolve().parent.parent / ".pytest_cache" / "hypothesis-fuzz"
    over.setdefault("database", DirectoryBasedExampleDatabase(str(db)))
    return settings(
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        **over,
    )


def run_fuzz(cfg: Config) -> Stats:
    """The default profile (15 examples of 25 steps), or a soak of UNIONFS_SOAK seconds."""
    stats = Stats()
    machine = machine_class(cfg, stats)
    old_umask = os.umask(UMASK)
    try:
        soak = float(os.environ.get("UNIONFS_SOAK") or 0)
        if not soak:
            # The same examples every run: a CI run that fails is a change that broke
            # something, never a new draw.  Soaks draw anew (and find new cases).
            run_state_machine_as_test(
                machine,
                settings=_settings(
                    max_examples=15, stateful_step_count=25, derandomize=True, database=None
                ),
            )
        else:
            end = time.monotonic() + soak
            while time.monotonic() < end:
                run_state_machine_as_test(
                    machine, settings=_settings(max_examples=25, stateful_step_count=50)
                )
    finally:
        os.umask(old_umask)
    print(
        f"\n{cfg.sides}: {stats.examples} examples, {stats.steps} steps, "
        f"{stats.emulated_renames} EXDEV renames done as mv, {stats.handovers} handovers"
    )
    for op, counts in sorted(stats.ops.items()):
        print(f"  {op}: {counts}")
    return stats


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlayfs needs root")


@pytest.mark.oracle
@root_only
def test_unionfs_matches_kernel():
    run_fuzz(Config(sides=("kernel", "unionfs"), rootful=True))


@pytest.mark.oracle
@root_only
def test_model_matches_kernel():
    run_fuzz(Config(sides=("kernel", "model"), rootful=True))


def _can_whiteout(where: Path) -> bool:
    probe = where / "probe"
    try:
        os.mknod(probe, stat.S_IFCHR | 0o600, 0)
    except OSError:
        return False
    probe.unlink()
    return True


def test_unionfs_matches_model(request, tmp_path):
    """Rootless unionfs against the model: as the test user when root, else as ourselves."""
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 missing")
    if os.geteuid() == 0:
        user = request.getfixturevalue("unpriv_user")
    else:
        user = None
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            pytest.skip("/dev/fuse is not usable")
    run_fuzz(
        Config(
            sides=("model", "unionfs"),
            rootful=False,
            user=user,
            whiteouts=os.geteuid() == 0 or _can_whiteout(tmp_path),
            opaque_xattr="user.overlay.opaque",
        )
    )
