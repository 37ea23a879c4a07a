"""``unionfs server start|stop|status``: an opt-in resident start server for mounts.

Most of a mount's start is CPython's and its imports (trio, pyfuse3, unionfs:
about 0.1 s warm, 0.15 s after ``drop_caches``; docs/performance.md).  This
server imports them once and forks a daemon per mount; ``unionfs-mount``
(unionfs/launcher.py) is then a thin client that imports none of them.  The
forked child is the mount's daemon: the same ``cli.main`` as an exec'd one,
in the client's working directory, environment and inherited descriptors,
its errors on the client's stderr, its exit status the client's.

Protocol (``SOCK_SEQPACKET``, one message a line of it):

- client -> server: ``MOUNT`` request, NUL-separated fields (see
  ``encode_request``), with the descriptors in ``SCM_RIGHTS``: the client's
  working directory, its ready pipe, then every descriptor an exec would
  have inherited; ``STATUS``; ``STOP``.
- server -> client: ``NO reason`` (the client mounts by itself), ``PID n``
  (the daemon), later ``EXIT n`` (its status, negative for a signal); the
  child itself sends ``DETACHED`` when it becomes a background daemon.

Safety: the socket is in a 0700 directory of the user's, and the server
serves only a peer of its own uid, groups, capabilities, namespaces and root
(anything else mounts by itself: a daemon forked here would not see the
peer's world); a server whose unionfs files changed since it started refuses
and ends.  A forked child never returns into the server's loop (it ends in
``os._exit``), carries ``UNIONFS_SERVER_CHILD`` in its environment, and
neither serves nor uses a server while it is set.  The server exits after
``--idle`` seconds with no mount running.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import sys
from collections.abc import Callable

#: Set in every child of a server (its PID): such a process never serves nor asks a server.
GUARD = "UNIONFS_SERVER_CHILD"
#: Set to anything to make ``unionfs-mount`` never use a server.
DISABLE = "UNIONFS_NO_SERVER"
SOCKET_NAME = "server.sock"
#: Idle seconds (no mount running, no request) after which the server exits.
IDLE_DEFAULT = 900.0
#: The largest request (argv and environment) and descriptor count accepted.
MAX_REQUEST = 1 << 20
MAX_FDS = 250  # below the kernel's SCM_MAX_FD (253), with the two of the protocol
#: How long a connected client may take to send its request (s).
REQUEST_TIMEOUT = 5.0


def socket_dir(create: bool = False) -> str | None:
    """The user's private directory of the socket, or None if there is no safe one.

    ``$XDG_RUNTIME_DIR/unionfs``, else ``/run/user/UID/unionfs``, else
    ``/tmp/unionfs-UID``; it must be a directory of ours that nobody else can
    write or search (another user's socket there would get our mounts).
    """
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{uid}"
    path = f"{base}/unionfs" if _private_dir(base, uid) else f"/tmp/unionfs-{uid}"
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
    return path if _private_dir(path, uid) else None


def _private_dir(path: str, uid: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid == uid and (st.st_mode & 0o170077) == 0o040000


def socket_path(create: bool = False) -> str | None:
    d = socket_dir(create)
    return None if d is None else f"{d}/{SOCKET_NAME}"


def encode_request(argv: list[str], fd_numbers: list[int]) -> bytes:
    """``MOUNT``, the package dir, the interpreter, argv, the inherited fd numbers, environ."""
    from . import __file__ as init

    fields = [
        b"MOUNT",
        os.fsencode(os.path.dirname(os.path.abspath(init))),
        os.fsencode(sys.executable),
        b"%d" % len(argv),
        *map(os.fsencode, argv),
        b",".join(b"%d" % fd for fd in fd_numbers),
        *(k + b"=" + v for k, v in os.environb.items()),
    ]
    return b"\0".join(fields)


def decode_request(data: bytes) -> tuple[str, str, list[str], list[int], dict[bytes, bytes]]:
    """The inverse of ``encode_request``; ValueError on a malformed one."""
    fields = data.split(b"\0")
    if fields[0] != b"MOUNT" or len(fields) < 5:
        raise ValueError("not a MOUNT request")
    n = int(fields[3])
    argv = [os.fsdecode(a) for a in fields[4 : 4 + n]]
    if len(argv) != n or len(fields) < 5 + n:
        raise ValueError("truncated request")
    numbers = [int(x) for x in fields[4 + n].split(b",") if x]
    env = dict(item.partition(b"=")[::2] for item in fields[5 + n :] if b"=" in item)
    return os.fsdecode(fields[1]), os.fsdecode(fields[2]), argv, numbers, env


def fd_array(fds: list[int]) -> array.array[int]:
    return array.array("i", fds)


# -- the server --------------------------------------------------------------------------


def _fingerprint(top: str) -> tuple[tuple[str, int, int], ...]:
    """Name, mtime and size of every module file of the package: a change means
    the server runs old code, and must not serve."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith((".py", ".so")):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                found.append((path, st.st_mtime_ns, st.st_size))
    return tuple(sorted(found))


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


#: What a peer must share with the server for a daemon forked here to act as its own would.
_SAME_STATUS = (
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
)
_SAME_NS = ("mnt", "user", "pid", "net", "ipc", "uts")


def peer_difference(pid: int) -> str | None:
    """Why a daemon forked here would differ from one the peer ``pid`` would exec; None if not."""
    try:
        mine, theirs = _status_fields(os.getpid()), _status_fields(pid)
        for key in _SAME_STATUS:
            if mine.get(key) != theirs.get(key):
                return key
        for ns in _SAME_NS:
            if os.stat(f"/proc/self/ns/{ns}").st_ino != os.stat(f"/proc/{pid}/ns/{ns}").st_ino:
                return f"{ns} namespace"
        a, b = os.stat("/"), os.stat(f"/proc/{pid}/root")
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            return "root directory"
        with open("/proc/self/cgroup", "rb") as f, open(f"/proc/{pid}/cgroup", "rb") as g:
            if f.read() != g.read():
                return "cgroup"
    except OSError as e:
        return f"peer unreadable: {e.strerror}"
    return None


class Server:
    """The accept loop, the forks and the reaping of their daemons."""

    def __init__(self, path: str, idle: float) -> None:
        import socket

        self.socket = socket
        self.path = path
        self.idle = idle
        self.pid = os.getpid()
        os.close(os.pidfd_open(self.pid))  # Linux 5.3+: without pidfds, no server (OSError)
        self.top = os.path.dirname(os.path.abspath(__file__))
        self.fingerprint = _fingerprint(self.top)
        #: pidfd -> (pid, connection to its client)
        self.children: dict[int, tuple[int, socket.socket]] = {}
        self.listener: socket.socket | None = None
        self.inode = 0
        self.lock = -1
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()

    def bind(self) -> None:
        """Listen at ``path``, holding ``path.lock`` for life: of two servers started at
        once, one fails (EWOULDBLOCK); a stale socket (its server gone) is replaced."""
        import fcntl

        self.lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        s = self.socket.socket(self.socket.AF_UNIX, self.socket.SOCK_SEQPACKET)
        try:
            s.bind(self.path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            os.unlink(self.path)  # we hold the lock: its server is gone
            s.bind(self.path)
        s.listen(64)
        self.inode = os.lstat(self.path).st_ino
        self.listener = s

    def run(self) -> None:
        import select
        import signal
        import time

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno())
        last = time.monotonic()
        while True:
            if self.stopping and self.listener is not None:
                self._close_listener()
            if self.listener is None and not self.children:
                return
            poller = select.poll()  # not select(): a busy server holds more than 1024 fds
            for fd in [self._wake_r.fileno(), *self.children]:
                poller.register(fd, select.POLLIN)
            if self.listener is not None:
                poller.register(self.listener.fileno(), select.POLLIN)
            timeout = None if self.children else max(0.0, last + self.idle - time.monotonic())
            ready = [fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)]
            if not ready and not self.children:
                self.stopping = True  # idle
                continue
            last = time.monotonic()
            for fd in ready:
                if fd == self._wake_r.fileno():
                    self._wake_r.recv(64)
                elif self.listener is not None and fd == self.listener.fileno():
                    self._accept()
                elif fd in self.children:
                    self._reap(fd)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _close_listener(self) -> None:
        """Accept no more (the socket goes, unless another server's replaced it); the
        mounts running still get their status reported."""
        assert self.listener is not None
        self.listener.close()
        self.listener = None
        try:
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass

    def _reap(self, pidfd: int) -> None:
        """A daemon ended: tell its client how (``EXIT n``, negative for a signal)."""
        pid, conn = self.children.pop(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 1
        with contextlib.suppress(OSError):  # a background mount's client is long gone
            conn.sendall(b"EXIT %d" % code)
        conn.close()

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        received: list[int] = []
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            data, received = self._receive(conn)
            self._answer(conn, data, received)
        except OSError:
            conn.close()
        finally:
            for fd in received:
                os.close(fd)

    def _receive(self, conn: object) -> tuple[bytes, list[int]]:
        socket = self.socket
        assert isinstance(conn, socket.socket)
        size = socket.CMSG_SPACE((MAX_FDS + 2) * 4)
        data, ancdata, flags, _ = conn.recvmsg(MAX_REQUEST, size, socket.MSG_CMSG_CLOEXEC)
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        received = list(fds)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            conn.sendall(b"NO request too big")
            raise OSError("truncated")
        return data, received

    def _answer(self, conn: object, data: bytes, received: list[int]) -> None:
        """Reply to one request; a mount request forks (and keeps ``conn``)."""
        socket = self.socket
        assert isinstance(conn, socket.socket)
        if data == b"STATUS":
            conn.sendall(b"RUNNING pid=%d mounts=%d" % (self.pid, len(self.children)))
            conn.close()
            return
        if data == b"STOP":
            self.stopping = True
            conn.sendall(b"STOPPING mounts=%d" % len(self.children))
            conn.close()
            return
        reason = self._refusal(conn, data, received)
        if reason is not None:
            conn.sendall(b"NO " + reason.encode())
            conn.close()
            return
        _, _, argv, numbers, env = decode_request(data)
        pid = self._fork(lambda: self._child(conn, argv, received, numbers, env))
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (pid, conn)
        with contextlib.suppress(OSError):  # the client is gone: the child's lifeline tells it
            conn.sendall(b"PID %d" % pid)

    def _refusal(self, conn: object, data: bytes, received: list[int]) -> str | None:
        """Why this request is not served here (the client then mounts by itself)."""
        socket = self.socket
        assert isinstance(conn, socket.socket)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        peer, uid, gid = array.array("i", creds)
        if uid != os.getuid() or gid != os.getgid():
            return "another user"
        if self.stopping:
            return "stopping"
        try:
            top, exe, _, numbers, _ = decode_request(data)
        except ValueError as e:
            return f"bad request: {e}"
        if len(received) != len(numbers) + 2:
            return "descriptors missing"
        if os.path.realpath(top) != os.path.realpath(self.top):
            return "another unionfs"
        if os.path.realpath(exe) != os.path.realpath(sys.executable):
            return "another interpreter"
        if _fingerprint(self.top) != self.fingerprint:
            self.stopping = True  # old code: end, the next start imports the new one
            return "unionfs changed since the server started"
        return peer_difference(peer)

    def _fork(self, child: Callable[[], int]) -> int:
        """Fork; the child runs ``child`` and exits with its status, never returning
        into the accept loop (the guard against forked servers)."""
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:  # the child: never back into the loop, whatever happens
            code = child()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            code = 4  # errno.EINTR, as unionfs.cli's __main__
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        return 0  # not reached

    def _child(
        self,
        conn: object,
        argv: list[str],
        received: list[int],
        numbers: list[int],
        env: dict[bytes, bytes],
    ) -> int:
        """The daemon's start in the forked child: the client's world, then ``cli.main``."""
        import signal

        socket = self.socket
        assert isinstance(conn, socket.socket)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if self.listener is not None:
            self.listener.close()
        self._wake_r.close()
        self._wake_w.close()
        os.close(self.lock)  # a daemon must not keep the next server from starting
        for pidfd, (_, other) in self.children.items():
            os.close(pidfd)
            other.close()
        os.setsid()
        cwd, ready, *inherited = received
        cwd, ready, lifeline = _place(inherited, numbers, keep=[cwd, ready, conn.detach()])
        os.fchdir(cwd)
        os.close(cwd)
        os.environb.clear()
        os.environb.update(env)
        os.environ[GUARD] = str(self.pid)
        sys.argv = ["unionfs-mount", *argv]
        os.set_blocking(lifeline, True)

        def detach() -> int:
            """As ``cli._daemonize``, but the client is the one waiting for ``ready``."""
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            os.write(lifeline, b"DETACHED")
            return ready

        from . import cli

        return cli.main(argv, detach=detach, lifelines=[lifeline])


def _place(fds: list[int], numbers: list[int], keep: list[int]) -> list[int]:
    """Put each received descriptor at the number the client had it at (inheritable);
    move the ``keep`` ones out of the way; return their new numbers.

    Everything is first moved above every target number, so that no dup2
    closes a descriptor still needed (the connection, a received one not yet
    placed): the client's numbers may be any.
    """
    import fcntl

    low = max([*numbers, 2]) + 1

    def above(fd: int) -> int:
        new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
        os.close(fd)
        return new

    kept = [above(fd) for fd in keep]
    for fd, number in zip([above(fd) for fd in fds], numbers, strict=True):
        os.dup2(fd, number)  # inheritable, as after an exec
        os.close(fd)
    return kept


def _ask(path: str, request: bytes, timeout: float = 5.0) -> bytes | None:
    """Send a control request; the reply, or None if no server answers at ``path``."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(request)
        return s.recv(4096)
    except OSError:
        return None
    finally:
        s.close()


def _until_gone(path: str, timeout: float = 5.0) -> None:
    """Wait until the server no longer accepts (a ``start`` right after then starts anew)."""
    import time

    end = time.monotonic() + timeout
    while _ask(path, b"STATUS", timeout=1.0) is not None and time.monotonic() < end:
        time.sleep(0.01)


def preimport() -> None:
    """Everything a mount imports, imported once here (the point of the server)."""
    import logging.handlers  # noqa: F401  a background daemon's syslog

    from . import cli, identity, stackinfo, watch  # noqa: F401


def start(path: str, idle: float) -> int:
    """Fork the server; return once it listens (0) or with its one-line error (1)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        os.close(r)
        os.waitpid(pid, 0)  # the first child: the server is its child, in a session of its own
        msg = b"".join(chunks).decode(errors="replace")
        if msg.startswith("OK"):
            return 0
        print(f"unionfs server: {msg or 'the server exited during start-up'}", file=sys.stderr)
        return 1
    code = 1
    try:  # the server: ends in os._exit, never back into the caller
        os.close(r)
        os.setsid()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        os.closerange(3, w)  # nothing the caller passed down stays open for good
        os.closerange(w + 1, 1 << 20)
        if os.fork():  # not a session leader: it can never get a terminal
            code = 0
            return 0
        preimport()
        try:
            server = Server(path, idle)
            server.bind()
        except BlockingIOError:  # the lock: another server is starting or running
            os.write(w, b"OK another server runs")
            return 1
        except OSError as e:
            os.write(w, f"cannot listen at {path}: {e.strerror}".encode())
            return 1
        os.write(w, b"OK")
        os.close(w)
        server.run()
        code = 0
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(w, f"{type(e).__name__}: {e}".encode())
    finally:
        os._exit(code)
    return code  # not reached


def main(prog: str, argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        description="A resident server that forks mount daemons with everything imported:"
        " unionfs-mount then starts in milliseconds (opt-in; see docs/performance.md).",
    )
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument(
        "--idle",
        type=float,
        default=IDLE_DEFAULT,
        metavar="S",
        help=f"start: exit after S seconds with no mount running (default {IDLE_DEFAULT:g})",
    )
    args = parser.parse_args(argv)
    if os.environ.get(GUARD):
        print(f"{prog}: not inside a server's daemon", file=sys.stderr)
        return 2
    path = socket_path(create=args.action == "start")
    if path is None and args.action == "start":
        print(f"{prog}: no private directory for the socket", file=sys.stderr)
        return 1
    reply = None if path is None else _ask(path, b"STATUS")
    if args.action == "status":
        print(reply.decode() if reply else "not running")
        return 0 if reply else 3
    if args.action == "stop":
        if reply is None:
            print("not running")
            return 0
        print((_ask(path, b"STOP") or b"stopped").decode())
        _until_gone(path)
        return 0
    if reply is not None or path is None:
        print(f"already {reply.decode()}")
        return 0
    return start(path, args.idle)
