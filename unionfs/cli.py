"""``unionfs-mount``: the command line and the mount's life cycle.

Without ``-f`` the command forks a daemon and returns only once the mount
answers a ``stat`` (or with the daemon's one-line error), like every FUSE
tool.  The daemon unmounts cleanly on SIGTERM/SIGINT/SIGHUP and exits by
itself after ``fusermount3 -u``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pyfuse3
import trio

from . import __version__, loop, ownership, stackinfo
from .copyup import CopyUp
from .inodes import InodeTable
from .layers import LayerStack
from .markers import Writer, probe_opaque, probe_whiteout
from .operations import UnionOperations
from .options import ConfigError, MountConfig, build_config, check_paths, volatile_marker
from .syscalls import raise_fd_limit, syncfs
from .upper import Upper

log = logging.getLogger("unionfs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unionfs-mount",
        description=(
            "Mount a union of read-only LOWER directories (leftmost on top, as in overlayfs'"
            " lowerdir=) and a writable UPPER directory at MNT, without root."
        ),
        epilog=(
            "Options for -o: ro, workdir=DIR, timeout=S, entry_timeout=S, attr_timeout=S,"
            " negative_timeout=S, whiteout=kernel|oci, metacopy=on|off, nonempty, allow_other,"
            " noallow_other,"
            " fsname=NAME, lowerdir=L1:L2, upperdir=DIR, uidmapping=C:H:S, gidmapping=C:H:S,"
            " squash_to_root, squash_to_uid=U, squash_to_gid=G, xattr_permissions=0|2, and the"
            " mount flags nosuid, nodev, noexec, noatime, ... (see README). LOWER may be"
            " image:NAME[:TAG], an image of the store (unionfs image). With -o lowerdir= the"
            " form is [SOURCE] MNT, as mount(8) runs it (mount -t fuse.unionfs-mount SOURCE MNT"
            " -o lowerdir=...). Unmount with: fusermount3 -u MNT"
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="LOWER1[:LOWER2...] [UPPER] MNT")
    parser.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("-d", "--debug", action="store_true", help="log every request (implies -f)")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]")
    parser.add_argument(
        "--ready-fd",
        type=int,
        metavar="N",
        help="with -f: write OK (or the start-up error) to inherited descriptor N once the"
        " mount answers, then close it",
    )
    parser.add_argument(
        "--parent-fd",
        type=int,
        metavar="N",
        help="with -f: unmount (lazily) and exit once inherited descriptor N, the read end of a"
        " pipe its supervisor holds, reaches end of file (the supervisor ended)",
    )
    parser.add_argument("--version", action="version", version=f"unionfs {__version__}")
    return parser


def parse_args(argv: list[str]) -> MountConfig:
    return _config(_parser().parse_args(argv))


def _config(args: argparse.Namespace) -> MountConfig:
    cfg = build_config(args.paths, args.options, args.foreground or args.debug, args.debug)
    resolve_images(cfg)
    return cfg


def resolve_images(cfg: MountConfig) -> None:
    """``image:NAME[:TAG]`` lowers become the image's layer dirs from the store
    (``$UNIONFS_STORE`` or the default one); plain directories stay."""
    if not any(lower.startswith("image:") for lower in cfg.lowers):
        return
    from .image.store import resolve_lowers
    from .oci.layout import ImageError

    try:
        cfg.lowers = resolve_lowers(cfg.lowers)
    except ImageError as e:
        raise ConfigError(str(e)) from None


def _inherited_fd(args: argparse.Namespace, option: str) -> int | None:
    """The validated descriptor of ``--ready-fd`` or ``--parent-fd``, made non-inheritable.

    A supervisor (unionfs.api) starts the daemon in the foreground, so the PID it
    holds is the daemon's.  ``--ready-fd`` tells it when the mount is served;
    ``--parent-fd`` is its lifeline: the API starts the daemon in a session of
    its own (a Ctrl-C at the terminal must reach the program, not its
    filesystem), so a SIGTERM or SIGKILL of the program's process group never
    reaches the daemon, which must see the program's end another way.  No child
    of the daemon (fusermount3 may stay, with auto_unmount) may hold either, or
    the other end would not see it close.
    """
    fd = getattr(args, option.removeprefix("--").replace("-", "_"))
    if fd is None:
        return None
    if not (args.foreground or args.debug):
        raise ConfigError(f"{option} needs -f (without it, the exit status reports)", 2)
    try:
        os.fstat(fd)
        os.set_inheritable(fd, False)
    except OSError as e:
        raise ConfigError(f"{option} {fd}: {e.strerror}", 2) from None
    return fd


def _session_helper() -> Any:
    """The C session helper (unionfs/_dircache.c), or None when it was not built.

    The package loaded it before pyfuse3; the mount works without it.
    """
    try:
        from . import _dircache  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _dircache


def enable_kernel_dircache() -> bool:
    """Let the kernel cache directory listings; False when the helper is missing."""
    helper = _session_helper()
    if helper is not None:
        helper.enable()
    return helper is not None


def enable_posix_acl() -> bool:
    """Ask the kernel to enforce and cache POSIX ACLs; False when the helper is missing."""
    helper = _session_helper()
    if helper is not None:
        helper.enable_acl()
    return helper is not None


def enable_fast_read() -> bool:
    """Answer READs of registered handles in C; False when the helper is missing."""
    helper = _session_helper()
    if helper is not None:
        helper.enable_read()
    return helper is not None


def enable_session_helpers(cfg: MountConfig) -> None:
    """Turn on what the C session helper does for this mount, before the session starts."""
    if cfg.dircache:
        enable_kernel_dircache()
    if cfg.acl:
        enable_posix_acl()
    if cfg.fastpath:
        enable_fast_read()


def _fast_read_helper(cfg: MountConfig) -> Any:
    """The helper when the session started answers READs in C, else None."""
    helper = _session_helper()
    if cfg.fastpath and helper is not None and helper.read_active():
        return helper
    return None


def _dircache_active() -> bool:
    helper = _session_helper()
    return helper is not None and bool(helper.active())


def _setup_logging(cfg: MountConfig, daemon: bool) -> None:
    level = logging.DEBUG if cfg.debug else logging.INFO
    handler: logging.Handler
    if daemon and os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler  # a daemon's only: not on every start

        handler = SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("unionfs[%(process)d]: %(message)s"))
    elif daemon:
        handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("unionfs: %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class Daemon:
    """One mounted union: builds the operations, serves, and tears down."""

    def __init__(
        self, cfg: MountConfig, parent_fd: int | None = None, lifelines: Sequence[int] = ()
    ) -> None:
        self.cfg = cfg
        #: Descriptors whose end of file means the supervisor ended: ``--parent-fd``,
        #: and a start server's connection to its client (unionfs/server.py).
        self.lifelines = [fd for fd in (parent_fd, *lifelines) if fd is not None]
        self.stopped_by_signal = False
        self.waiter: loop._Waiter | None = None

    def mount(self) -> None:
        cfg = self.cfg
        is_root = os.geteuid() == 0
        self.stack = LayerStack(cfg.lowers, cfg.upper)
        self.copyup: CopyUp | None = None
        try:
            upper = None
            if cfg.upper is not None:
                ns = ownership.marker_xattr_ns()
                self.stack.origin_xattr = ns + b"overlay.unionfs.origin"
            table = InodeTable(self.stack)
            if cfg.upper is not None and not cfg.read_only:
                assert cfg.workdir is not None
                writer = Writer(cfg.whiteout, ns)
                self.copyup = CopyUp(
                    self.stack,
                    cfg.workdir,
                    writer,
                    durable=not cfg.volatile,
                    metacopy=cfg.metacopy,
                )
                if cfg.identities:
                    from .identity import IdentityLog

                    self.copyup.on_replace = IdentityLog(cfg.workdir).record
                work_fd = self.copyup.work_fd
                if writer.fmt == "kernel" and not (
                    probe_whiteout(work_fd) and probe_opaque(writer, work_fd)
                ):
                    log.warning("cannot write kernel-format markers here: writing OCI .wh. files")
                    writer.fmt = "oci"
                stackinfo.record_mount(cfg, writer.fmt, ns)
                upper = Upper(self.stack, table, self.copyup, writer)
            self.ops = UnionOperations(self.stack, table, cfg, upper)
            self.ops.branches = _branches(cfg)
            # Before init: pyfuse3 before 3.5 makes its read lock there.
            helper = _session_helper() if cfg.fastpath else None
            spun_out = getattr(helper, "burst_spun_out", None)
            self.waiter = loop.install(cfg.spin_us, spun_out)
            if self.waiter is None:
                log.warning("this pyfuse3 has no trio hook: requests take trio's longer wait")
            if helper is not None and not (
                self.ops.dispatch_in_c(helper) and self.ops.entry_in_c(helper)
            ):
                log.warning("unknown EntryAttributes layout: requests dispatched in Python")
            pyfuse3.init(self.ops, cfg.mountpoint, cfg.fuse_options(is_root))
            fast = _fast_read_helper(cfg)
            if fast is not None:
                self.ops.read_in_c(fast)
            if helper is not None and cfg.dir_readahead_us is not None:
                self.ops.read_ahead_in_c(helper, cfg.dir_readahead_us)
            if cfg.dircache and not _dircache_active():
                log.warning("the kernel will not cache directory listings (_dircache inactive)")
        except BaseException:
            self._close_branches()
            raise

    def _close_branches(self) -> None:
        if self.copyup is not None:
            self.copyup.close()
        self.stack.close()

    async def _watch_signals(self) -> None:
        stop = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*stop, signal.SIGUSR1) as sigs:
            async for signum in sigs:
                if signum == signal.SIGUSR1:
                    log.warning("stats: %s", self.ops.stats())
                    continue
                log.info("signal %d: unmounting", signum)
                self.stopped_by_signal = True
                pyfuse3.terminate()
                return

    async def _serve(self, ready_fd: int | None) -> None:
        async with trio.open_nursery() as nursery:
            if self.cfg.live:
                from .watch import LowerWatch

                nursery.start_soon(LowerWatch(self.ops).run)
            nursery.start_soon(self._watch_signals)
            nursery.start_soon(self._when_ready, ready_fd)
            for fd in self.lifelines:
                nursery.start_soon(self._watch_parent, fd)
            helper = self._dispatching_helper()
            if helper is not None:
                wakeup = loop.trio_wakeup_fd()
                probe = None if self.waiter is None else self.waiter.others_ready
                fd = -1 if wakeup is None else wakeup
                helper.set_burst(self.cfg.spin_us, fd, probe, loop.BURST_WAIT_MS)
            try:
                await pyfuse3.main()
            except* ConnectionAbortedError:
                # The kernel ended the connection instead of reporting the
                # unmount (seen when the last file of a lazily unmounted union
                # closes): the session is over either way.
                log.info("the kernel closed the FUSE connection")
            finally:
                if helper is not None:
                    helper.set_burst(0, -1)  # trio's wake-up socket closes with trio.run
            nursery.cancel_scope.cancel()

    def _dispatching_helper(self) -> Any:
        """The C session helper if the session dispatches requests in C, else None."""
        helper = _session_helper() if self.cfg.fastpath else None
        return helper if helper is not None and helper.dispatch_active() else None

    async def _watch_parent(self, fd: int) -> None:
        """Unmount, as on SIGTERM, once the supervisor's end of the lifeline is closed."""
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                if not os.read(fd, 4096):
                    break
            except BlockingIOError:
                continue
        log.info("the supervisor ended: unmounting")
        self.stopped_by_signal = True
        pyfuse3.terminate()

    async def _when_ready(self, ready_fd: int | None) -> None:
        """Once a stat through the mount answers: tune it, and tell a waiting parent."""
        try:
            st = await trio.to_thread.run_sync(os.stat, self.cfg.mountpoint, abandon_on_cancel=True)
        except OSError as e:
            msg = f"mount does not answer: {e.strerror}"
        else:
            msg = "OK"
            set_read_ahead(st.st_dev, self.cfg.read_ahead_kb)
        if ready_fd is not None:
            try:
                os.write(ready_fd, msg.encode())
            except OSError as e:  # the waiter is gone (interrupted): serve on regardless
                log.warning(
                    "could not report %r to the one that started the mount: %s", msg, e.strerror
                )
            os.close(ready_fd)

    def serve(self, ready_fd: int | None = None) -> None:
        marker = self._mark_volatile()
        try:
            trio.run(self._serve, ready_fd)
        finally:
            pyfuse3.close(unmount=self.stopped_by_signal)
            self.ops.close()
            if marker is not None:
                self._sync_volatile(marker)
            self._close_branches()

    def _mark_volatile(self) -> str | None:
        """Under -o volatile, leave a marker that only a synced, clean end removes."""
        if not self.cfg.volatile or self.cfg.workdir is None:
            return None
        marker = volatile_marker(self.cfg.workdir)
        os.makedirs(marker, mode=0o700, exist_ok=True)
        return marker

    def _sync_volatile(self, marker: str) -> None:
        """One syncfs of the upper for all the syncs skipped; then drop the marker.

        Unlike kernel overlayfs, which keeps the marker for good, a clean
        unmount here knows everything written reached the disk.
        """
        assert self.stack.upper is not None
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.stack.upper.fd)
            try:
                syncfs(fd)  # not on the O_PATH descriptor: EBADF
            finally:
                os.close(fd)
            os.rmdir(marker)
        except OSError as e:
            log.error("volatile mount: %s; %s stays", e.strerror, marker)
            return
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(marker))


def _branches(cfg: MountConfig) -> dict[str, Any]:
    """The branches as absolute paths, taken before the daemon leaves its start directory."""

    def absolute(path: str | None) -> str | None:
        return None if path is None else os.path.abspath(path)

    return {
        "upper": absolute(cfg.upper),
        "workdir": absolute(cfg.workdir),
        "lowers": [os.path.abspath(p) for p in cfg.lowers],
    }


def set_read_ahead(dev: int, kib: int | None) -> None:
    """Raise the mount's read-ahead (root only), for fewer and bigger READs.

    FUSE mounts start at 128 KiB; 1 MiB makes cold sequential reads 1.65-1.8x
    faster with pyfuse3 (see docs/performance.md).  Without root the kernel
    refuses the write, and the default stays.
    """
    if not kib:
        return
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.debug("read_ahead_kb not set: %s", e.strerror)


def _daemonize() -> int:
    """Fork; the parent waits for the child's first message and exits with it.

    Returns the write end of the status pipe in the child.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        msg = b"".join(chunks).decode(errors="replace")
        if msg == "OK":
            os._exit(0)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        print(f"unionfs-mount: {msg or 'daemon exited during start-up'}", file=sys.stderr)
        os._exit(1)
    os.close(r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return w


def main(
    argv: list[str] | None = None,
    detach: Callable[[], int] | None = None,
    lifelines: Sequence[int] = (),
) -> int:
    """Mount as ``unionfs-mount`` does; returns the exit status.

    A start server's child (unionfs/server.py) gives ``detach``, its
    replacement for ``_daemonize`` (its client waits instead of a parent), and
    ``lifelines``, its connection to the client: a foreground daemon unmounts
    when the client ends; a background one closes them.
    """
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    given_fd = None
    try:
        given_fd = _inherited_fd(args, "--ready-fd")
        parent_fd = _inherited_fd(args, "--parent-fd")
        cfg = _config(args)
        check_paths(cfg)
    except ConfigError as e:
        if given_fd is None:
            print(f"unionfs-mount: {e}", file=sys.stderr)
        else:  # the one waiting on the descriptor reports it
            os.write(given_fd, str(e).encode())
            os.close(given_fd)
        return e.code

    raise_fd_limit()
    enable_session_helpers(cfg)
    # New objects get exactly the mode the kernel sends, less the caller's umask
    # (operations.py), never the daemon's own.
    os.umask(0)
    if cfg.foreground:
        ready_fd = given_fd
    else:
        ready_fd = (detach or _daemonize)()
        for fd in lifelines:
            os.close(fd)
        lifelines = ()
    _setup_logging(cfg, daemon=not cfg.foreground)
    daemon = Daemon(cfg, parent_fd, lifelines)
    try:
        if cfg.workdir is not None:
            os.makedirs(cfg.workdir, mode=0o700, exist_ok=True)
        daemon.mount()
    except Exception as e:
        log.exception("start-up failed")
        reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
        msg = f"cannot mount {cfg.mountpoint!r}: {reason}"
        if ready_fd is not None:
            os.write(ready_fd, msg.encode())
            os.close(ready_fd)
        else:
            print(f"unionfs-mount: {msg}", file=sys.stderr)
        return 1
    os.chdir("/")
    try:
        daemon.serve(ready_fd)
    except Exception:
        log.exception("daemon failed")
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(errno.EINTR)
