"""``unionfs sandbox run``: a program over a union view of $HOME, at the original paths.

Steps (timed with ``UNIONFS_SANDBOX_TIMES=1``):

1. one daemon per sandboxed root mounts its view at a private directory
   (see view.py);
2. the namespace runner (namespace.py) makes a user + mount namespace (and a
   network namespace with ``--net=none``) and, as its root: binds real Unix
   sockets and the pass-through paths over the view (a FUSE view of a socket
   cannot be connected to), covers the sandbox state directory, and binds
   each view over its root, recursively;
3. the runner detaches the outside mounts, so only the namespace holds the views;
4. a nested user namespace maps the real uid and gid back, the capability
   bounding set is emptied, and the program is exec'd in its working directory
   as seen through the view.

The runner waits, passes signals on, and exits with the program's status.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import time
from collections.abc import Iterator

from .. import namespace
from . import state
from .view import View, ViewError, mount_view, runtime_dir

#: Paths kept real when they lie inside a sandboxed root: sockets and
#: runtime directories GUI programs and agents need.  Each is bound from the
#: real tree over the view (when it exists), so what happens there is not
#: sandboxed: it is not part of the tree's contents.
PASS_THROUGH = ("/run", "/tmp/.X11-unix", "/tmp/.ICE-unix", "/dev", "/proc", "/sys")
#: Directories below a root scanned (one level) for Unix sockets to pass through.
SOCKET_DIRS = (".", ".gnupg", ".ssh", ".ssh/sockets", ".ssh/cm", ".mozilla", ".local/share")
#: Mount options of every view.
VIEW_OPTIONS = ["live", "identities"]


class RunError(Exception):
    """A one-line error before the program started."""


#: When this module was imported: the interpreter's own start is not counted.
_STARTED = time.monotonic()


def _since_exec() -> float:
    """Seconds from this process's start to this module's import (/proc/self/stat)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return _BOOT_AT_IMPORT - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


_BOOT_AT_IMPORT = time.clock_gettime(time.CLOCK_BOOTTIME)


class Timer:
    """Where start-up time goes (printed to stderr with UNIONFS_SANDBOX_TIMES=1)."""

    def __init__(self) -> None:
        self.t0 = _STARTED
        self.last = self.t0
        self.steps: list[tuple[str, float]] = [("interpreter", _since_exec())]
        self.on = bool(os.environ.get("UNIONFS_SANDBOX_TIMES"))

    def mark(self, step: str) -> None:
        now = time.monotonic()
        self.steps.append((step, now - self.last))
        self.last = now

    def report(self) -> None:
        if self.on:
            parts = ", ".join(f"{s} {d * 1000:.1f} ms" for s, d in self.steps)
            print(f"unionfs sandbox: start-up {parts}", file=sys.stderr)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def session_sockets(env: dict[str, str]) -> list[str]:
    """The session bus, Wayland and PulseAudio/PipeWire sockets named by the environment."""
    out = []
    bus = env.get("DBUS_SESSION_BUS_ADDRESS", "")
    for part in bus.split(";"):
        if part.startswith("unix:"):
            for kv in part[5:].split(","):
                if kv.startswith("path="):
                    out.append(kv[5:])
    runtime = env.get("XDG_RUNTIME_DIR")
    wayland = env.get("WAYLAND_DISPLAY")
    if wayland:
        out.append(wayland if wayland.startswith("/") else os.path.join(runtime or "/", wayland))
    if runtime:
        out.append(runtime)
    return out


def find_sockets(root: str) -> Iterator[str]:
    """Unix sockets in a root's usual socket places (one directory level each).

    A whole-tree walk would cost seconds in a big home; sockets elsewhere are
    passed with ``--pass PATH``.
    """
    for rel in SOCKET_DIRS:
        d = os.path.normpath(os.path.join(root, rel))
        try:
            with os.scandir(d) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        if stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode):
                            yield e.path
        except OSError:
            continue


def pass_through_paths(roots: list[str], extra: list[str], env: dict[str, str]) -> list[str]:
    """Every real path to bind over the views, outermost first, deduplicated."""
    wanted = [*PASS_THROUGH, *session_sockets(env), *extra]
    for root in roots:
        wanted.extend(find_sockets(root))
    out: list[str] = []
    for p in wanted:
        p = os.path.normpath(p)
        if not any(_inside(p, r) and p != r for r in roots):
            continue
        if any(_inside(p, q) for q in out):
            continue  # already passed through with a parent
        if not os.path.lexists(p):
            continue
        out = [q for q in out if not _inside(q, p)]
        out.append(p)
    return sorted(out)


def _setup(views: list[View], passes: list[str], hide: list[str]) -> None:
    """In the namespace, as its root: the binds, before the program starts."""
    for v in views:
        for p in passes:
            if _inside(p, v.root):
                rel = os.path.relpath(p, v.root)
                # FileNotFoundError: removed in the sandbox earlier, it stays removed there.
                with contextlib.suppress(FileNotFoundError):
                    namespace.bind(p, os.path.join(v.mnt, rel))
        for h in hide:
            if _inside(h, v.root) and os.path.isdir(h):
                rel = os.path.relpath(h, v.root)
                namespace.mount(
                    "unionfs-hidden",
                    os.path.join(v.mnt, rel),
                    "tmpfs",
                    namespace.MS_RDONLY | namespace.MS_NOSUID | namespace.MS_NODEV,
                    "size=4k,mode=0755",
                )
    for v in views:
        namespace.bind(v.mnt, v.root)


def check_roots(dirs: list[str]) -> list[str]:
    """Real absolute roots, existing directories, none inside another."""
    roots = []
    for d in dirs:
        if not os.path.isdir(d):
            raise RunError(f"{d!r} is not a directory")
        roots.append(os.path.realpath(d))
    for i, a in enumerate(roots):
        for b in roots[i + 1 :]:
            if _inside(a, b) or _inside(b, a):
                raise RunError(f"sandboxed directories overlap: {a!r} and {b!r}")
        if a == "/":
            raise RunError("cannot sandbox / itself: give the directories to sandbox with --dir")
    return roots


def run(
    name: str,
    dirs: list[str],
    argv: list[str],
    net_none: bool = False,
    passes: list[str] | None = None,
) -> int:
    """Run ``argv`` in sandbox ``name``; its exit status."""
    timer = Timer()
    roots = check_roots(dirs)
    why = namespace.userns_available()
    if why is not None:
        raise RunError(f"{why}; or run with --home-view (the view elsewhere, HOME pointing at it)")
    timer.mark("userns check")
    try:
        sb = state.open_or_create(name, roots)
    except OSError as e:
        raise RunError(f"cannot create the sandbox state in {state.state_root()}: {e}") from None
    lock = sb.lock()
    views: list[View] = []
    try:
        rt = runtime_dir()
        for i, root in enumerate(roots):
            mnt = rt / f"{name}.{i}.{os.getpid()}"
            mnt.mkdir(mode=0o700)
            try:
                views.append(
                    mount_view(root, sb.upper(i), sb.work(i), mnt, VIEW_OPTIONS, sb.path / "log")
                )
            except BaseException:
                mnt.rmdir()
                raise
        timer.mark(f"mount {len(views)} view(s)")
        env = dict(os.environ)
        through = pass_through_paths(roots, passes or [], env)
        hide = [str(state.state_root().parent)]
        timer.mark("find sockets")

        def detach(_pid: int) -> None:
            for v in views:
                v.detach()
            timer.mark("bind + detach")

        spec = namespace.Spec(
            argv=argv,
            cwd=os.getcwd(),
            nested=True,
            net=net_none,
            setup=lambda: _setup(views, through, hide),
            after_setup=detach,
        )
        running = namespace.start(spec)
        os.close(lock)
        lock = -1
        code = running.wait()
        timer.mark("program")
        if running.exec_error:
            print(f"unionfs sandbox: {running.exec_error}", file=sys.stderr)
        for v in views:
            if not v.reap(timeout=5.0):
                print(
                    f"unionfs sandbox: the view of {v.root} stays while processes the"
                    " program started still run in the sandbox",
                    file=sys.stderr,
                )
        timer.mark("daemon exit")
        timer.report()
        return code
    except namespace.NamespaceError as e:
        raise RunError(str(e)) from None
    except ViewError as e:
        raise RunError(str(e)) from None
    finally:
        for v in views:
            if not v.detached:
                v.stop()
        if lock >= 0:
            os.close(lock)


def run_home_view(name: str, argv: list[str]) -> int:
    """The fallback without user namespaces: the view of $HOME mounted elsewhere,
    the program started with HOME (and the XDG dirs under it) pointing there.

    Only programs that honour $HOME follow it: anything using getpwuid() or an
    absolute path writes to the real home.
    """
    home = os.path.realpath(os.path.expanduser("~"))
    sb = state.open_or_create(name, [home])
    lock = sb.lock()
    mnt = runtime_dir() / f"{name}.home.{os.getpid()}"
    mnt.mkdir(mode=0o700)
    try:
        view = mount_view(home, sb.upper(0), sb.work(0), mnt, VIEW_OPTIONS, sb.path / "log")
    except BaseException:
        mnt.rmdir()
        os.close(lock)
        raise
    try:
        env = dict(os.environ)
        for k, v in env.items():
            is_home = k == "HOME" or (k.startswith("XDG_") and k.endswith("_HOME"))
            if is_home and _inside(os.path.realpath(v), home):
                env[k] = str(mnt) + os.path.realpath(v)[len(home) :]
        env["HOME"] = str(mnt)
        cwd = os.getcwd()
        if _inside(cwd, home):
            cwd = str(mnt) + cwd[len(home) :]
        print(
            f"unionfs sandbox: no user namespace: the view is at {mnt} and HOME points"
            " there; programs using absolute paths or getpwuid() still reach the real home",
            file=sys.stderr,
        )
        import signal
        import subprocess

        wanted = {signal.SIGCHLD, *namespace.FORWARDED}
        signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, set()),
            )
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
            print(f"unionfs sandbox: {argv[0]}: {e.strerror}", file=sys.stderr)
            return 127
        return namespace.Running(proc.pid, os.open(os.devnull, os.O_RDONLY)).wait()
    finally:
        view.stop()
        os.close(lock)
