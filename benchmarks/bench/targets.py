"""The file systems under test, mounted over the same layers, and their guaranteed unmount.

FUSE daemons are started in the foreground (``-f``) as our own children: we then
know their pid (a hung daemon can be killed so a blocked workload fails instead of
hanging the run), we capture their output for error messages, and we can wait for
them to exit after the unmount.  Every mount is recorded in ``_ACTIVE`` before it
is attempted and undone by ``release`` (lazy unmount as the fallback), also from
``release_all`` on Ctrl-C, SIGTERM or any exception.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.layers import Tree

IS_ROOT = os.geteuid() == 0
INSTALL_HINT = "apt-get install fuse-overlayfs unionfs-fuse"
MOUNT_TIMEOUT = 30.0
#: A top-level name of every generated tree: its LOOKUP is the first request a mount answers.
PROBE = "src"
#: How often a starting FUSE daemon is probed (s): fine enough for a 7 ms start.
PROBE_EVERY = 0.0005
MAX_MOUNT_DATA = 4095  # the legacy mount(2) data page of kernel overlayfs
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class MountError(Exception):
    """A target could not be mounted (the run carries on without it and exits non-zero)."""


@dataclass
class Mount:
    """One live mount (or, for native, one directory) that workloads run in."""

    target: Target
    path: Path
    scratch: Path | None = None  # upper, work dir, mount point; removed after the unmount
    proc: subprocess.Popen[bytes] | None = None
    command: list[str] = field(default_factory=list)
    killed: bool = False

    def abort(self) -> None:
        """Kill a hung FUSE daemon: its pending requests then fail with ENOTCONN."""
        if self.proc is not None and self.proc.poll() is None:
            self.killed = True
            self.proc.kill()


_ACTIVE: list[Mount] = []
_counter = itertools.count()

#: Scratch trees kept until the end of the run (see ``set_aside``).
_SET_ASIDE: list[Path] = []
#: Files at least this big are removed at once: a few inodes, most of the space.
_BIG_FILE = 1 << 20
#: Below this much free space or these many free inodes, set-aside trees go at once.
_MIN_FREE_BYTES = 8 << 30
_MIN_FREE_INODES = 2_000_000


# -- mount table ----------------------------------------------------------------------------


def mount_table() -> list[tuple[str, str]]:
    """(mount point, fs type) from /proc/self/mounts; reading it never touches a hung mount."""
    rows = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            rows.append((point, fields[2]))
    return rows


def is_mounted(path: Path) -> bool:
    return any(point == str(path) for point, _ in mount_table())


def leftover_mounts(under: Path) -> list[tuple[str, str]]:
    """Mounts below our scratch dir (from a run that was SIGKILLed, say)."""
    prefix = str(under) + "/"
    return [(p, t) for p, t in mount_table() if p.startswith(prefix)]


def clear_leftovers(under: Path) -> None:
    """Lazily unmount our own leftovers, so a new run starts clean."""
    for point, fstype in leftover_mounts(under):
        print(f"unmounting leftover {fstype} mount {point}", flush=True)
        if fstype.startswith("fuse"):
            _quiet(["fusermount3", "-uz", point])
        else:
            _quiet(["umount", "-l", point])


def _quiet(argv: list[str]) -> int:
    return subprocess.run(argv, capture_output=True, check=False).returncode


# -- targets --------------------------------------------------------------------------------


class Target:
    """A file system to compare; ``mount`` returns a ``Mount`` that ``release`` undoes."""

    name = ""

    def unavailable(self) -> str | None:
        """Why this target cannot run here, or None."""
        return None

    def version(self) -> str:
        return ""

    def prepare_run(self) -> None:
        """Once before the first round (untimed)."""

    def mount(self, tree: Tree, scratch: Path, fresh: bool, copy_big: bool) -> Mount:
        raise NotImplementedError

    def unmount(self, m: Mount) -> None:
        raise NotImplementedError


class Native(Target):
    """A plain copy of the merged tree: the physical limit.  Read-only workloads use the cached
    copy in place; mutating ones get a private copy (big files hard-linked unless written)."""

    name = "native"

    def mount(self, tree: Tree, scratch: Path, fresh: bool, copy_big: bool) -> Mount:
        if not fresh:
            return Mount(self, tree.merged)
        m = Mount(self, scratch / "mnt", scratch)
        _ACTIVE.append(m)
        m.path.mkdir(parents=True)
        for entry in sorted(os.listdir(tree.merged)):
            src = tree.merged / entry
            if entry == "big" and not copy_big:
                (m.path / entry).mkdir()
                for name in os.listdir(src):
                    os.link(src / name, m.path / entry / name)
            else:
                subprocess.run(["cp", "-a", str(src), str(m.path)], check=True)
        return m

    def unmount(self, m: Mount) -> None:
        pass  # the copy goes with the scratch dir


class KernelOverlay(Target):
    """Kernel overlayfs with its default options (root only)."""

    name = "kernel"

    def unavailable(self) -> str | None:
        if not IS_ROOT:
            return "needs root (mount -t overlay)"
        return None

    def version(self) -> str:
        return os.uname().release

    def mount(self, tree: Tree, scratch: Path, fresh: bool, copy_big: bool) -> Mount:
        upper, work, mnt = _fresh_dirs(scratch)
        # Relative lower names (resolved against cwd by the kernel) keep 500 layers in one page.
        lowers = ":".join(p.name for p in tree.lowers)
        options = f"lowerdir={lowers},upperdir={upper},workdir={work}"
        if len(options) > MAX_MOUNT_DATA:
            raise MountError(f"mount options too long ({len(options)} bytes)")
        command = ["mount", "-t", "overlay", "overlay", "-o", options, str(mnt)]
        m = Mount(self, mnt, scratch, command=command)
        _ACTIVE.append(m)
        r = subprocess.run(command, cwd=tree.root, capture_output=True, text=True, check=False)
        if r.returncode:
            raise MountError(f"mount -t overlay failed: {r.stderr.strip()}")
        return m

    def unmount(self, m: Mount) -> None:
        if is_mounted(m.path) and _quiet(["umount", str(m.path)]):
            _quiet(["umount", "-l", str(m.path)])


class FuseTarget(Target):
    """A FUSE daemon run in the foreground as our child."""

    binaries: tuple[str, ...] = ()
    version_word = ""

    def binary(self) -> str | None:
        return next(filter(None, map(shutil.which, self.binaries)), None)

    def unavailable(self) -> str | None:
        if self.binary() is None:
            return f"{self.binaries[0]} not installed ({INSTALL_HINT})"
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            return "no read/write access to /dev/fuse"
        return None

    def version(self) -> str:
        r = subprocess.run(
            [str(self.binary()), "--version"], capture_output=True, text=True, check=False
        )
        line = next(
            (ln for ln in (r.stdout + r.stderr).splitlines() if self.version_word in ln), ""
        )
        found = re.search(r"\d+(\.\d+)+", line)
        return found.group(0) if found else line

    def argv(self, tree: Tree, upper: Path, work: Path, mnt: Path) -> list[str]:
        raise NotImplementedError

    def mount(self, tree: Tree, scratch: Path, fresh: bool, copy_big: bool) -> Mount:
        upper, work, mnt = _fresh_dirs(scratch)
        command = self.argv(tree, upper, work, mnt)
        m = Mount(self, mnt, scratch, command=command)
        _ACTIVE.append(m)
        m.proc = _spawn(command, scratch / "daemon.log")
        with watchdog(m, MOUNT_TIMEOUT):
            _wait_mounted(m)
        return m

    def unmount(self, m: Mount) -> None:
        if m.proc is not None and m.proc.poll() is None and not is_mounted(m.path):
            _stop(m.proc)  # interrupted while it was starting: it must not mount after we left
        _fusermount_u(m.path)
        if m.proc is not None:
            try:
                m.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _stop(m.proc)
            _fusermount_u(m.path)  # mounted while being stopped


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a daemon as our child, in a new session (Ctrl-C reaches only us, and we unmount in
    order).  Signals are held during the fork so that an interrupt cannot orphan a child whose
    pid we never learnt; the child gets the normal mask back before exec."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        with open(log_path, "wb") as log:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, old),
            )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM our daemon, SIGKILL it if it does not exit within 5 s."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _fusermount_u(path: Path) -> None:
    if is_mounted(path) and _quiet(["fusermount3", "-u", str(path)]):
        _quiet(["fusermount3", "-uz", str(path)])


def _wait_mounted(m: Mount) -> None:
    """Until a name inside the mount answers a stat (or the daemon dies).

    The mount point is an empty directory until the mount covers it, so the stat of
    ``PROBE`` fails with ENOENT until then and succeeds at the first LOOKUP the daemon
    answers: the moment a client can use the mount, which the start-up workload times.
    """
    assert m.proc is not None
    probe = m.path / PROBE
    while True:
        try:
            os.stat(probe)
            break
        except FileNotFoundError:
            pass
        except OSError as e:
            raise MountError(f"mounted but not answering ({e}): {daemon_log(m)}") from e
        if m.proc.poll() is not None:
            raise MountError(f"exited with status {m.proc.returncode}: {daemon_log(m)}")
        time.sleep(PROBE_EVERY)
    if not is_mounted(m.path):
        raise MountError(f"{probe} answered but {m.path} is not in the mount table")


def daemon_log(m: Mount, limit: int = 800) -> str:
    """The tail of a FUSE daemon's output, for error messages."""
    if m.scratch is None:
        return ""
    with contextlib.suppress(OSError):
        text = (m.scratch / "daemon.log").read_bytes()[-limit:].decode(errors="replace")
        return " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return ""


class FuseOverlayfs(FuseTarget):
    name = "fuse-overlayfs"
    binaries = ("fuse-overlayfs",)
    version_word = "fuse-overlayfs"

    def argv(self, tree: Tree, upper: Path, work: Path, mnt: Path) -> list[str]:
        lowers = ":".join(map(str, tree.lowers))
        opts = f"lowerdir={lowers},upperdir={upper},workdir={work}"
        return [str(self.binary()), "-f", "-o", opts, str(mnt)]


class UnionfsFuse(FuseTarget):
    """unionfs-fuse in copy-on-write mode; it does not understand overlayfs whiteouts or opaque
    dirs (it shows the char devices and the hidden files), which the workloads never touch."""

    name = "unionfs-fuse"
    binaries = ("unionfs-fuse", "unionfs")
    version_word = "unionfs-fuse"

    def argv(self, tree: Tree, upper: Path, work: Path, mnt: Path) -> list[str]:
        branches = ":".join([f"{upper}=RW", *(f"{p}=RO" for p in tree.lowers)])
        return [str(self.binary()), "-f", "-o", "cow,hide_meta_files", branches, str(mnt)]


class Unionfs(FuseTarget):
    """This project's ``unionfs-mount`` (found on PATH, next to the Python running us, or
    given with --unionfs); extra -o options from --unionfs-opts."""

    name = "unionfs"
    version_word = "unionfs"

    def __init__(self, command: str | None = None, options: str = "") -> None:
        self.command = command
        self.options = options

    def binary(self) -> str | None:
        if self.command:
            return shutil.which(self.command)
        return shutil.which("unionfs-mount") or shutil.which(
            "unionfs-mount", path=os.path.dirname(sys.executable)
        )

    def unavailable(self) -> str | None:
        if self.binary() is None:
            return (
                f"{self.command or 'unionfs-mount'} not found"
                " (pip install -e . in the venv, or pass --unionfs CMD)"
            )
        return super().unavailable()

    def prepare_run(self) -> None:
        """Byte-compile the package, as ``pip install`` does: from an editable install under
        PYTHONDONTWRITEBYTECODE (this project's environment sets it) every mount would
        compile every module again, ~90 ms of CPU that an installed unionfs never pays."""
        binary = self.binary()
        if binary is None:
            return
        with open(binary, "rb") as f:
            first = f.readline()
        if not first.startswith(b"#!"):
            return
        python = first[2:].strip().decode(errors="replace").split()[0]
        code = (
            "import compileall, os, unionfs;"
            " compileall.compile_dir(os.path.dirname(unionfs.__file__), quiet=1)"
        )
        subprocess.run([python, "-c", code], capture_output=True, check=False)

    def argv(self, tree: Tree, upper: Path, work: Path, mnt: Path) -> list[str]:
        opts = ",".join(filter(None, [f"workdir={work}", self.options]))
        lowers = ":".join(map(str, tree.lowers))
        return [str(self.binary()), "-f", "-o", opts, lowers, str(upper), str(mnt)]


class UnionfsBaseline(Unionfs):
    """Another version of unionfs (``--baseline CMD``), mounted with the same options: an
    A/B of two versions in the same rounds, side by side with the peers."""

    name = "unionfs-base"


def all_targets(
    unionfs_command: str | None, unionfs_options: str, baseline: str | None = None
) -> dict[str, Target]:
    targets: list[Target] = [
        Native(),
        KernelOverlay(),
        FuseOverlayfs(),
        UnionfsFuse(),
        Unionfs(unionfs_command, unionfs_options),
    ]
    if baseline:
        targets.append(UnionfsBaseline(baseline, unionfs_options))
    return {t.name: t for t in targets}


# -- life cycle -----------------------------------------------------------------------------


def _fresh_dirs(scratch: Path) -> tuple[Path, Path, Path]:
    """upper, work and mnt, new and empty; work on the upper's file system, as overlayfs wants."""
    dirs = scratch / "upper", scratch / "work", scratch / "mnt"
    for d in dirs:
        d.mkdir(parents=True)
    return dirs


def scratch_dir(base: Path, target: Target) -> Path:
    """A new, unique directory for one mount (never reused: a lazily unmounted one may linger)."""
    return base / f"{target.name}-{next(_counter)}"


@contextlib.contextmanager
def mounted(
    target: Target, tree: Tree, scratch_base: Path, fresh: bool, copy_big: bool = False
) -> Iterator[Mount]:
    """Mount ``target`` over ``tree`` with a fresh upper; always undone, even on Ctrl-C."""
    scratch = scratch_dir(scratch_base, target)
    try:
        m = target.mount(tree, scratch, fresh, copy_big)
    except BaseException:
        _release_scratch(scratch)
        raise
    try:
        yield m
    finally:
        release(m)


def _release_scratch(scratch: Path) -> None:
    """Undo a mount that failed half-way (it registered itself before mounting)."""
    for m in [m for m in _ACTIVE if m.scratch == scratch]:
        release(m)
    if not leftover_mounts(scratch) and not is_mounted(scratch / "mnt"):
        shutil.rmtree(scratch, ignore_errors=True)


def release(m: Mount) -> None:
    """Unmount (lazily if busy), reap the daemon, delete the scratch dir.  Signals are held
    meanwhile, so a second Ctrl-C cannot leave a mount behind."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        m.target.unmount(m)
        if m in _ACTIVE:
            _ACTIVE.remove(m)
        if m.scratch is not None:
            if is_mounted(m.path):
                print(f"warning: {m.path} is still mounted; keeping {m.scratch}", flush=True)
            else:
                set_aside(m.scratch)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def set_aside(scratch: Path) -> None:
    """Remove a scratch tree's big files now and the rest at the end of the run.

    Removing thousands of files between two measurements would tax the next one: ext4 does
    not reuse an inode for a minute or more after it is freed (``recently_deleted``), so the
    next target's creates scan past every inode the last target's upper freed (perf: 40 % of
    a copy-up's CPU in that scan), and the removal's own journal write-back lands in the
    next measurement.  Keeping the trees to the end keeps each measurement to itself.
    """
    for root, _dirs, files in os.walk(scratch):
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if st.st_size >= _BIG_FILE:
                    os.unlink(path)
    _SET_ASIDE.append(scratch)
    vfs = os.statvfs(scratch.parent)
    if vfs.f_bavail * vfs.f_frsize < _MIN_FREE_BYTES or vfs.f_favail < _MIN_FREE_INODES:
        discard_set_aside()


def discard_set_aside() -> None:
    """Delete the scratch trees kept so far (at the end of the run, or when space runs low)."""
    while _SET_ASIDE:
        shutil.rmtree(_SET_ASIDE.pop(), ignore_errors=True)


def release_all() -> None:
    """Undo every mount still registered (the last line of defence, from main's finally)."""
    while _ACTIVE:
        release(_ACTIVE[-1])


@contextlib.contextmanager
def watchdog(m: Mount, seconds: float) -> Iterator[None]:
    """Kill ``m``'s daemon if the block takes longer than ``seconds``: a blocked FUSE request
    then fails and the run goes on (native and kernel cannot hang this way)."""
    timer = threading.Timer(seconds, m.abort)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
