"""The union view a sandbox runs over: one daemon per sandboxed root.

The daemon is forked from the runner, not exec'd: pyfuse3 and trio are then
imported in the child only, while the runner prepares the namespace, and no
second interpreter starts (together about a third of the start-up time).  It
inherits the sandbox's lock and holds it while it serves.

Its life: it mounts the view at a private directory outside the sandboxed
trees (through setuid fusermount3, as the user); the sandbox's mount
namespace binds the view over the original path; then the runner detaches
the outside mount (``fusermount3 -u -z``).  From then on the only mounts of
the view are inside the sandbox's namespace, so the kernel ends the FUSE
connection when the last process of the sandbox is gone, and the daemon
exits by itself: it lives exactly as long as the sandbox needs it, and a
crash of the runner, the program or the daemon leaves no mount anywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..options import ConfigError


class ViewError(Exception):
    """The view could not be mounted: one line for the user."""


def runtime_dir() -> Path:
    """A private directory for mount points, outside $HOME (a view inside its own
    lower would look into itself): $XDG_RUNTIME_DIR, else /tmp/unionfs-UID."""
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.stat(base).st_uid == uid:
        path = Path(base) / "unionfs"
    else:
        path = Path(f"/tmp/unionfs-{uid}")
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise ViewError(f"cannot make {path}: {e.strerror}") from None
    if st.st_uid != uid or not os.path.isdir(path) or os.path.islink(path):
        raise ViewError(f"{path} is not a directory owned by you: remove it")
    return path


@dataclass
class View:
    """A mounted view: where it is and the daemon serving it."""

    root: str  # the real tree (the lower)
    mnt: Path  # where it is mounted outside, until detached
    pid: int  # the daemon
    detached: bool = False

    def detach(self) -> None:
        """Drop the outside mount; the namespace's binds keep the view alive."""
        if self.detached:
            return
        fusermount("-u", "-z", self.mnt)
        self.detached = True
        with contextlib.suppress(OSError):
            os.rmdir(self.mnt)

    def stop(self) -> None:
        """Unmount (the daemon then exits) if still mounted outside; reap it."""
        if not self.detached:
            with contextlib.suppress(ViewError):
                fusermount("-u", "-z", self.mnt)
            self.detached = True
            with contextlib.suppress(OSError):
                os.rmdir(self.mnt)
        self.reap(timeout=5.0)

    def reap(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the daemon to exit; True when it did."""
        import time

        end = time.monotonic() + timeout
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == self.pid:
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.01)


def fusermount(*args: str | Path) -> None:
    binary = shutil.which("fusermount3") or "fusermount3"
    r = subprocess.run([binary, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise ViewError(r.stderr.strip() or f"fusermount3 {' '.join(map(str, args))} failed")


def mount_view(
    root: str | list[str],
    upper: Path,
    work: Path,
    mnt: Path,
    options: list[str],
    log: Path,
    in_child: Callable[[], None] | None = None,
) -> View:
    """Fork a daemon serving ``root`` (+ ``upper``) at ``mnt``; return once it answers.

    ``root`` may be a list of lowers, top first (a container image's layers).

    The daemon gets the runner's descriptors (the sandbox lock among them) and
    writes its log to ``log``.  ``in_child`` runs first in the daemon's
    process (namespace.Spec.serve's set-up of a service).
    """
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(ready_r)
            if in_child is not None:
                in_child()
            lowers = [root] if isinstance(root, str) else root
            code = _daemon(lowers, upper, work, mnt, options, log, ready_w)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.write(ready_w, f"{type(e).__name__}: {e}".encode())
        finally:
            os._exit(code)
    os.close(ready_w)
    chunks = []
    while chunk := os.read(ready_r, 4096):
        chunks.append(chunk)
    os.close(ready_r)
    msg = b"".join(chunks).decode(errors="replace")
    if msg != "OK":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise ViewError(msg or "the view's daemon exited during start-up")
    return View(root if isinstance(root, str) else root[0], mnt, pid)


def _daemon(
    lowers: list[str],
    upper: Path,
    work: Path,
    mnt: Path,
    options: list[str],
    log: Path,
    ready_w: int,
) -> int:
    """The daemon's side of ``mount_view`` (in the forked child)."""
    os.setsid()
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    from .. import cli
    from ..options import build_config, check_paths
    from ..syscalls import raise_fd_limit

    try:
        spec = ":".join(p.replace("\\", "\\\\").replace(":", "\\:") for p in lowers)
        cfg = build_config([spec, str(upper), str(mnt)], [f"workdir={work}", *options], True, False)
        check_paths(cfg, upper_in_lower=True)
    except ConfigError as e:
        os.write(ready_w, str(e).encode())
        return e.code
    raise_fd_limit()
    cli.enable_session_helpers(cfg)
    os.umask(0)
    cli._setup_logging(cfg, daemon=False)
    daemon = cli.Daemon(cfg)
    try:
        daemon.mount()
    except Exception as e:
        reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
        os.write(ready_w, f"cannot mount the view at {mnt}: {reason}".encode())
        return 1
    os.chdir("/")
    daemon.serve(ready_w)
    return 0
