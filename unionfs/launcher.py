"""``unionfs-mount``'s entry point: through a start server if one answers, else itself.

With ``unionfs server start`` running (unionfs/server.py), the mount's daemon
is forked there with everything imported, and this process is a thin client
that imports neither trio nor pyfuse3: it passes its argv, working
directory, environment and inheritable descriptors, then behaves as the
``unionfs-mount`` it stands for: without ``-f`` it returns once the mount
answers (0) or with the daemon's one-line error (1); with ``-f`` it lives as
long as the daemon, passes it SIGTERM/SIGINT/SIGHUP/SIGUSR1 and exits with
its status (or its signal); its own end, however it ends, unmounts the union
(the connection is the daemon's lifeline).  Without a server, or when the
server declines (another namespace, changed code, ...), this is exactly
``unionfs.cli.main`` in this process.
"""

from __future__ import annotations

import contextlib
import os
import sys

from . import server

#: Seconds to wait for the server's first reply (it forks at once) before mounting here.
FIRST_REPLY = 30.0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    code = via_server(args)
    if code is not None:
        return code
    from . import cli

    return cli.main(args)


def _inheritable_fds() -> list[int]:
    """What an exec of the daemon would inherit: every descriptor without close-on-exec."""
    import fcntl

    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                found.append(fd)
        except OSError:
            continue  # the directory's own descriptor, closed by now
    return sorted(found)


def _connect() -> object | None:
    """A connection to this user's server, or None (no server: the common case, cheap)."""
    if os.environ.get(server.GUARD) or os.environ.get(server.DISABLE):
        return None
    path = server.socket_path()
    if path is None:
        return None
    import _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
        creds = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        if int.from_bytes(creds[4:8], sys.byteorder) != os.getuid():
            raise OSError("a server of another user")
    except OSError:
        s.close()
        return None
    return s


def via_server(argv: list[str]) -> int | None:
    """Mount through the server; None if there is none or it declined (mount here)."""
    s = _connect()
    if s is None:
        return None
    import _socket

    assert isinstance(s, _socket.socket)
    try:
        inherited = _inheritable_fds()
        if len(inherited) > server.MAX_FDS:
            raise OSError("too many descriptors to pass")
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        s.close()
        return None
    ready_r, ready_w = os.pipe()
    client = _Client(s, ready_r)
    try:
        fds = server.fd_array([cwd, ready_w, *inherited])
        s.settimeout(FIRST_REPLY)  # a stopped (SIGSTOP) server: mount here instead
        s.sendmsg(
            [server.encode_request(argv, inherited)],
            [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)],
        )
        started = client.started()
        s.settimeout(None)
    except OSError:
        started = client.pid is not None or client.detached
    finally:
        os.close(cwd)
        os.close(ready_w)
    if not started:
        os.close(ready_r)
        s.close()
        return None  # declined, or gone before forking: nothing was started
    for fd in inherited:
        if fd > 2:  # the daemon's now, as after an exec: a ready pipe must see its EOF
            os.close(fd)
    return client.wait()


class _Client:
    """The waiting side of a mount started by the server: ``cli._daemonize``'s parent
    for a background daemon, the daemon's stand-in for a foreground one."""

    def __init__(self, conn: object, ready: int) -> None:
        self.conn = conn
        self.ready = ready
        self.pid: int | None = None
        self.declined = False
        self.detached = False
        self.status: int | None = None
        self.server_gone = False

    def started(self) -> bool:
        """Read the server's answer: True once a daemon was forked, False if declined
        (or the server went away before forking: nothing runs, mount here).

        The child may say DETACHED before the server's PID reaches us: a daemon
        that runs must never be followed by a second start here.
        """
        while self.pid is None and self._message() and not self.declined:
            pass
        return self.pid is not None or self.detached

    def wait(self) -> int:
        import select
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._forward)
        conn_fd = self.conn.fileno()  # type: ignore[attr-defined]
        chunks: list[bytes] = []
        watching = {self.ready, conn_fd}
        while watching:
            for fd in select.select(list(watching), [], [])[0]:
                if fd == self.ready:
                    chunk = os.read(fd, 4096)
                    if chunk:
                        chunks.append(chunk)
                        continue
                    watching.discard(fd)
                    if b"".join(chunks) == b"OK":
                        return 0  # a background daemon serves the mount
                elif not self._message():
                    watching.discard(fd)
        os.close(self.ready)
        return self._outcome(b"".join(chunks).decode(errors="replace"))

    def _message(self) -> bool:
        """One message from the server or the child; False once the connection ends."""
        data = self.conn.recv(4096)  # type: ignore[attr-defined]
        if not data:
            self.server_gone = True
            return False
        if data == b"DETACHED":
            self.detached = True
        elif data.startswith(b"PID "):
            self.pid = int(data[4:])
        elif data.startswith(b"NO "):
            self.declined = True
            return False
        elif data.startswith(b"EXIT "):
            self.status = int(data[5:])
            return False
        return True

    def _outcome(self, msg: str) -> int:
        """The exit status ``unionfs-mount`` itself would have had."""
        if msg:
            print(f"unionfs-mount: {msg}", file=sys.stderr)
            return 1
        if self.status is None:  # killed with it: reparented daemons report to no one
            print(
                "unionfs-mount: the start server ended: the daemon's status is unknown",
                file=sys.stderr,
            )
            return 1
        if self.detached:
            print("unionfs-mount: daemon exited during start-up", file=sys.stderr)
            return 1
        if self.status < 0:  # killed: so is this stand-in, as a shell would report it
            import signal

            with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
                signal.signal(-self.status, signal.SIG_DFL)
            os.kill(os.getpid(), -self.status)
            return 128 - self.status
        return self.status

    def _forward(self, signum: int, frame: object) -> None:
        """The daemon is in the server's session: pass it what this process gets."""
        if self.pid is not None:  # none yet: only while the server's reply is on its way
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


if __name__ == "__main__":
    import errno

    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(errno.EINTR)
