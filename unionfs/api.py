"""The Python API: ``with unionfs.mounted(lowers, upper, mnt) as m:``.

For CI and build tools written in Python, and the project's own tests.  The
daemon is ``unionfs-mount`` run as a child process of this interpreter (never
an in-process mount: a FUSE daemon must not share a process, and a GIL, with
a program that reads through it), in the foreground so that the PID held here
is the daemon's own, in a session of its own so that a Ctrl-C at the terminal
reaches the program and not its filesystem.  It reports on an inherited pipe
(``--ready-fd``) once a request through the mount has been answered, or its
one-line start-up error, which is raised here as :class:`MountError` before
anything is mounted.  It holds the read end of a pipe (``--parent-fd``) whose
write end only this process has: when this process ends, however it ends
(SIGTERM, SIGKILL), the daemon unmounts lazily and exits, as no signal sent to
this process's group reaches a daemon in another session.

This module imports neither pyfuse3 nor trio: tools that only start mounts
pay none of the filesystem's import time.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import site
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeAlias

from . import mountinfo
from .options import ConfigError

PathLike: TypeAlias = "str | os.PathLike[str]"

#: How long the daemon may take to exit after its mount is gone before it is
#: sent SIGTERM, then SIGKILL.  It exits at once when it works.
_EXIT_GRACE = 30.0


class MountError(ConfigError):
    """The daemon refused to start or the mount failed; nothing is left mounted.

    ``str(e)`` is the daemon's one-line message; ``code`` its exit status (2
    for a bad option, 1 for a bad path or a failed mount, as ``unionfs-mount``).
    """


def _escape_lower(path: str) -> str:
    """One lower for a ``LOWER1:LOWER2`` list (overlayfs' escapes)."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


def option_words(read_only: bool = False, **options: object) -> list[str]:
    """Turn keyword arguments into ``-o`` words.

    ``True`` gives the flag (``nonempty=True`` -> ``nonempty``), ``False`` its
    ``no`` form (``dircache=False`` -> ``nodircache``, ``allow_other=False``
    -> ``noallow_other``; the daemon refuses one that has none), ``None``
    nothing, any other value ``key=value`` (commas escaped).
    """
    words = ["ro"] if read_only else []
    for key, value in options.items():
        if key in ("lowerdir", "upperdir"):
            raise MountError(f"give the branches as arguments, not {key}=", 2)
        if value is None:
            continue
        if value is True:
            words.append(key)
        elif value is False:
            words.append(f"no{key}")
        else:
            text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
            if text.endswith("\\") or "\\," in text:
                # -o has no spelling for it: the backslash would escape the comma
                # after it, and the next option would silently become part of this.
                raise MountError(
                    f"option {key}=: a backslash before a comma or at the end of"
                    f" {text!r} cannot be passed with -o",
                    2,
                )
            words.append(f"{key}={text.replace(',', chr(92) + ',')}")
    return words


def mount_command(
    lowers: Sequence[PathLike],
    upper: PathLike | None,
    mountpoint: PathLike,
    words: Sequence[str],
    ready_fd: int,
    debug: bool = False,
    parent_fd: int | None = None,
) -> list[str]:
    """The daemon's argument vector: ``unionfs-mount -f --ready-fd N ...`` of this package.

    Run as ``python -P -m unionfs.launcher`` with this interpreter, so that the
    daemon is the same unionfs as the caller's whatever PATH says (``-P``: not
    one in the caller's working directory).  The launcher is ``unionfs-mount``:
    with a start server running (``unionfs server start``) the PID is its
    client, which passes signals on and whose end unmounts, as the daemon's.
    """
    cmd = [sys.executable, "-P", "-m", "unionfs.launcher", "-f", "--ready-fd", str(ready_fd)]
    if parent_fd is not None:
        cmd += ["--parent-fd", str(parent_fd)]
    if debug:
        cmd.append("-d")
    if words:
        cmd += ["-o", ",".join(words)]
    cmd.append(":".join(_escape_lower(os.path.abspath(os.fspath(p))) for p in lowers))
    if upper is not None:
        cmd.append(os.path.abspath(os.fspath(upper)))
    cmd.append(os.path.abspath(os.fspath(mountpoint)))
    return cmd


def _child_env() -> dict[str, str]:
    """The caller's environment; PYTHONPATH leads to this package when the site does not.

    The caller may have imported unionfs from a source tree (sys.path set by
    hand); a site-packages directory is never put on PYTHONPATH, where it
    would come before the standard library.
    """
    env = dict(os.environ)
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if top not in {*site.getsitepackages(), site.getusersitepackages()}:
        env["PYTHONPATH"] = os.pathsep.join([top, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _mount_ids(path: str) -> dict[int, str]:
    """Mount ID -> fstype of every mount whose mount point is ``path``."""
    return {e.mount_id: e.fstype for e in mountinfo.at(path)}


def _read_report(fd: int, deadline: float | None) -> str | None:
    """Everything the daemon writes to its ready pipe until it closes it; None on timeout."""
    chunks = []
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([fd], [], [], wait)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)


class Mount:
    """A union mounted by :func:`mounted`, served by the child process ``pid``."""

    def __init__(
        self, mountpoint: str, proc: subprocess.Popen[bytes], mount_id: int, lifeline: int
    ) -> None:
        self.mountpoint = Path(mountpoint)
        self.proc = proc
        self._mount_id = mount_id
        self._lifeline = lifeline
        self._done = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The daemon's exit status once it has ended, else None."""
        return self.proc.poll()

    def __repr__(self) -> str:
        return f"<unionfs.Mount {str(self.mountpoint)!r} pid={self.pid}>"

    def is_mounted(self) -> bool:
        """True while this mount (not just any mount at the path) is in the mount table."""
        return self._mount_id in _mount_ids(str(self.mountpoint))

    def unmount(self) -> int:
        """Unmount, lazily if busy, and reap the daemon; returns its exit status.

        A plain unmount ends the daemon by itself.  When the mount is busy (a
        process has a file or its working directory in it) the daemon is told
        to stop, and detaches it as it ends (a detach here first would make its
        own fail, with an error on the caller's stderr): the programs still
        inside get ENOTCONN, and no daemon stays behind serving them.  A second
        call does nothing.
        """
        if self._done:
            return self.proc.wait()
        self._done = True
        busy = self.is_mounted() and not _unmount(str(self.mountpoint), lazy=False)
        code = _reap(self.proc, terminate=busy)
        os.close(self._lifeline)
        if self.is_mounted():  # the daemon was killed before it could say goodbye
            _unmount(str(self.mountpoint), lazy=True)
        return code

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        already = self._done  # an explicit unmount() returned the status
        code = self.unmount()
        if code != 0 and exc_type is None and not already:
            # A daemon killed by a signal (the OOM killer, a stray kill) failed the
            # programs in the block as surely as one that exited with an error.
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise MountError(f"the daemon of {str(self.mountpoint)!r} {how}", 1)


def _unmount(path: str, lazy: bool) -> bool:
    """``fusermount3 -u[z]`` (``umount [-l]`` for root without it); True on success."""
    if shutil.which("fusermount3") is not None:
        cmd = ["fusermount3", "-uz" if lazy else "-u", "--", path]
    else:
        cmd = ["umount", *(["-l"] if lazy else []), "--", path]
    return subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL).returncode == 0


def _reap(proc: subprocess.Popen[bytes], terminate: bool) -> int:
    """Wait for the daemon's exit: SIGTERM first if asked, SIGKILL if it will not end."""
    if terminate and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=_EXIT_GRACE)
    except subprocess.TimeoutExpired:
        pass
    if not terminate:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=_EXIT_GRACE)
    proc.kill()
    return proc.wait()


def mount(
    lowers: Sequence[PathLike] | PathLike,
    upper: PathLike | None,
    mountpoint: PathLike,
    *,
    read_only: bool = False,
    debug: bool = False,
    start_timeout: float | None = 120.0,
    **options: object,
) -> Mount:
    """Mount and return a :class:`Mount` once the mount is served; see :func:`mounted`.

    The caller must call ``unmount()`` (or use the Mount as a context manager).
    """
    if isinstance(lowers, (str, os.PathLike)):
        lowers = [lowers]
    if not lowers:
        raise MountError("no lower directory given", 2)
    mnt = os.path.realpath(os.fspath(mountpoint))
    words = option_words(read_only, **options)
    before = set(_mount_ids(mnt))
    deadline = None if start_timeout is None else time.monotonic() + start_timeout
    r, w = os.pipe()
    life_r, life_w = os.pipe()  # both non-inheritable: no other child holds life_w
    try:
        proc = subprocess.Popen(
            mount_command(lowers, upper, mountpoint, words, w, debug, parent_fd=life_r),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(w, life_r),
            start_new_session=True,
            env=_child_env(),
        )
    except BaseException:
        for fd in (r, w, life_r, life_w):
            os.close(fd)
        raise
    os.close(w)
    os.close(life_r)
    try:
        report = _read_report(r, deadline)
    except BaseException:  # KeyboardInterrupt while waiting: leave nothing
        _abandon(proc, mnt, before, terminate=True, lifeline=life_w)
        raise
    finally:
        os.close(r)
    if report == "OK":
        new = [i for i, fstype in _mount_ids(mnt).items() if i not in before and "fuse" in fstype]
        if new:
            return Mount(mnt, proc, max(new), life_w)
        _abandon(proc, mnt, before, terminate=True, lifeline=life_w)
        raise MountError(f"cannot mount {mnt!r}: the daemon answered but nothing is mounted", 1)
    # After its error message the daemon ends by itself; a silent one is stopped.
    _abandon(proc, mnt, before, terminate=report is None, lifeline=life_w)
    if report is None:
        raise MountError(f"cannot mount {mnt!r}: no answer within {start_timeout} s", 1)
    if not report:
        report = f"unionfs-mount exited with status {proc.returncode} during start-up"
    raise MountError(report, proc.returncode if proc.returncode and proc.returncode > 0 else 1)


def _abandon(
    proc: subprocess.Popen[bytes], mnt: str, before: set[int], terminate: bool, lifeline: int
) -> None:
    """After a failed start: reap (or stop) the daemon and detach whatever it mounted."""
    _reap(proc, terminate)
    os.close(lifeline)
    for mount_id, fstype in _mount_ids(mnt).items():
        if mount_id not in before and "fuse" in fstype:
            _unmount(mnt, lazy=True)


@contextlib.contextmanager
def mounted(
    lowers: Sequence[PathLike] | PathLike,
    upper: PathLike | None,
    mountpoint: PathLike,
    *,
    read_only: bool = False,
    debug: bool = False,
    start_timeout: float | None = 120.0,
    **options: object,
) -> Iterator[Mount]:
    """Mount the union of ``lowers`` (first on top) and ``upper`` at ``mountpoint``.

    ``upper=None`` (or ``read_only=True``) gives a read-only union.  Keyword
    arguments are ``-o`` options of unionfs-mount: ``workdir="/w"``,
    ``whiteout="oci"``, ``nonempty=True``, ``dircache=False`` (see
    :func:`option_words`).  Returns once a request through the mount has been
    answered; raises :class:`MountError` with the daemon's message on bad input
    or a failed mount, with nothing mounted, created or left running.  On exit
    the mount is unmounted (detached if busy) and the daemon reaped.
    ``start_timeout`` bounds the wait for the mount to answer (None: no bound);
    ``timeout=`` is unionfs-mount's cache option, as everywhere.
    """
    m = mount(
        lowers,
        upper,
        mountpoint,
        read_only=read_only,
        debug=debug,
        start_timeout=start_timeout,
        **options,
    )
    with m:
        yield m
