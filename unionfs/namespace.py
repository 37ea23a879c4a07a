"""The rootless runner the sandbox and the container runner share.

A command is run in an unprivileged user namespace with a mount namespace of
its own (and optionally a network namespace with loopback up), after a
``setup`` step that makes the mounts it needs as the namespace's root.  The
runner waits for it, forwards the signals it is sent, and returns its exit
status the way a shell does (128+N for a death by signal N).

Why ctypes and not the ``unshare`` binary: the steps between the namespace
calls (bind mounts of the view, sockets passed through, the nested user
namespace) must run in the same process, and every ``exec`` of a helper costs
start-up time the sandbox cannot spare.  ``unshare``/``mount``/``umount2``/
``prctl`` are one libc call each; Python 3.11 has no ``os.unshare`` (3.12+).
The one helper exec'd is ``newuidmap``/``newgidmap``, the setuid programs
that alone may map the user's subordinate ids from /etc/subuid.

Identities:
- ``ROOT``: the user mapped to root (uid 0 inside = the user outside), for
  container runs when no subordinate ids are configured;
- ``SUBIDS``: root plus the user's subordinate ids (uid 1.. inside) through
  newuidmap/newgidmap, falling back to ``ROOT`` when /etc/subuid has none;
- ``nested=True`` (the sandbox): after the setup, a second user namespace maps
  the real uid and gid back, and the capability bounding set is emptied, so the
  program runs as the user with no capability at all and cannot undo the
  mounts made for it.

A service inside (``Spec.serve``: the union's daemon of ``unionfs run`` with
subordinate ids, which must mount inside the user namespace for the kernel to
take the container's ids): the namespace's first process starts it right after
the id maps, as root of the user namespace and in the mount namespace A made
with it, then makes the PID namespace, and the init it forks unshares a mount
namespace B of its own before the setup.  pivot_root changes the root of every
process of the namespace that pivots, so only B pivots and the service keeps
A's root.  The first process stops the service by its pid (SIGTERM, then
SIGKILL) once the init has exited, and waits for it; if that process dies, the
service gets SIGTERM from the kernel (PR_SET_PDEATHSIG).  Every mount the
service made is in A or B, so nothing outlives the run.

Process tree (``pid=True``): runner -> first process (A; relays signals,
stops the service) -> [service (A)], init (B, PID 1) -> program.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import pwd
import select
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]

#: Signals the runner passes on to the program (SIGCHLD ends the wait).
FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
#: si_code of a signal the kernel sent (a terminal's ^C): the program's process
#: group gets it too, so passing it on would deliver it twice.
_SI_KERNEL = 0x80


class NamespaceError(Exception):
    """The namespaces could not be set up: one line for the user."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(_libc.unshare(flags), "unshare")


def _b(path: str | bytes | None) -> bytes | None:
    return os.fsencode(path) if path is not None else None


def mount(
    source: str | bytes | None,
    target: str | bytes,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2); the error names the target."""
    ret = _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data))
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {os.fsdecode(target)}: {os.strerror(err)}")


def bind(source: str | bytes, target: str | bytes, recursive: bool = True) -> None:
    """A bind mount; recursive by default, since a plain bind of a tree with
    submounts is refused inside a user namespace (they are locked to it)."""
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))


def bind_readonly(source: str | bytes, target: str | bytes) -> None:
    """A read-only bind (one mount; its submounts keep their own flags)."""
    bind(source, target, recursive=False)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def umount(target: str | bytes, lazy: bool = True) -> None:
    _check(_libc.umount2(_b(target), MNT_DETACH if lazy else 0), f"umount {target!r}")


def mount_proc(target: str) -> None:
    """A procfs of the PID namespace this process is in."""
    mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def loopback_up() -> None:
    """Bring ``lo`` up in a new network namespace (it starts down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def drop_capabilities() -> None:
    """Empty the bounding set: no exec can give a capability back, even to uid 0."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 40
    for cap in range(last + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def map_self(inner_uid: int, outer_uid: int, inner_gid: int, outer_gid: int) -> None:
    """Map one uid and one gid of the namespace just entered to our ids outside.

    The kernel allows an unprivileged process exactly this: its own ids, with
    setgroups(2) denied (the groups it has stay in effect).
    """
    with contextlib.suppress(FileNotFoundError):
        _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inner_uid} {outer_uid} 1\n")
    _write("/proc/self/gid_map", f"{inner_gid} {outer_gid} 1\n")


# --------------------------------------------------------------------------- diagnosis


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def userns_disabled_reason(err: OSError | None = None) -> str:
    """Why an unprivileged user namespace is refused here, and what to enable."""
    if _read_int("/proc/sys/kernel/unprivileged_userns_clone") == 0:
        return (
            "unprivileged user namespaces are disabled"
            " (enable: sysctl kernel.unprivileged_userns_clone=1)"
        )
    if _read_int("/proc/sys/user/max_user_namespaces") == 0:
        return "user namespaces are disabled (enable: sysctl user.max_user_namespaces=15000)"
    if _read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == 1:
        return (
            "AppArmor restricts unprivileged user namespaces"
            " (enable: sysctl kernel.apparmor_restrict_unprivileged_userns=0,"
            " or an AppArmor profile with 'userns,' for this interpreter)"
        )
    why = f": {os.strerror(err.errno)}" if err is not None and err.errno else ""
    return (
        f"cannot create an unprivileged user namespace{why}"
        " (inside a container? it needs a seccomp profile that allows unshare(CLONE_NEWUSER))"
    )


def userns_available() -> str | None:
    """None when this user can make a user + mount namespace, else the reason (one line).

    Tries it for real in a short-lived child: the sysctls alone do not tell
    (seccomp filters, LSMs and container runtimes refuse it too).
    """
    pid = os.fork()
    if pid == 0:
        try:
            unshare(CLONE_NEWUSER | CLONE_NEWNS)
        except OSError as e:
            os._exit(e.errno or 1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return None
    return userns_disabled_reason(OSError(code, os.strerror(code)) if code > 0 else None)


# --------------------------------------------------------------------------- ids


class Ids(Enum):
    ROOT = "root"  # the user is root inside, nobody else is mapped
    SUBIDS = "subids"  # root plus /etc/subuid ranges, through newuidmap


def subordinate_range(path: str, user: str, uid: int) -> tuple[int, int] | None:
    """The first ``START:COUNT`` range for ``user`` (by name or uid) in /etc/subuid or
    /etc/subgid, or None."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (user, str(uid)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if count > 0:
            return start, count
    return None


SubIds = tuple[tuple[int, int], tuple[int, int]]


def subordinate_ids(
    uid: int | None = None, subuid: str = "/etc/subuid", subgid: str = "/etc/subgid"
) -> SubIds | None:
    """The user's (uid range, gid range) from /etc/subuid and /etc/subgid, or None
    when either has none (or for root, which needs none)."""
    uid = os.getuid() if uid is None else uid
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    su = subordinate_range(subuid, name, uid)
    sg = subordinate_range(subgid, name, uid)
    if su is None or sg is None or uid == 0:
        return None
    return su, sg


def _newidmap(tool: str, pid: int, own: int, sub: tuple[int, int]) -> None:
    binary = shutil.which(tool)
    if binary is None:
        raise NamespaceError(f"{tool} not found: install the uidmap package")
    r = subprocess.run(
        [binary, str(pid), "0", str(own), "1", "1", str(sub[0]), str(sub[1])],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"status {r.returncode}"
        raise NamespaceError(f"{tool}: {msg}")


# --------------------------------------------------------------------------- the run


@dataclass
class Spec:
    """What to run and in which namespaces."""

    argv: Sequence[str]
    env: dict[str, str] | None = None
    cwd: str | None = None  # resolved again inside, after the setup's mounts
    ids: Ids = Ids.ROOT
    nested: bool = False  # map the real uid back and drop every capability
    net: bool = False  # a network namespace of its own, loopback up
    #: A PID namespace with an init of ours and a new /proc: when the program
    #: ends, every process it left behind ends too.
    pid: bool = True
    #: Where the PID namespace's /proc goes, after the setup (None: the setup
    #: mounts it, e.g. under a new root before pivot_root, with mount_proc: the
    #: kernel allows a procfs only while another one is fully visible).
    proc: str | None = "/proc"
    #: Runs in the child as the namespace's root, after the namespaces are made
    #: and / is made private, before the nested user namespace: the mounts.
    setup: Callable[[], None] | None = None
    #: Runs in the runner once the setup is done and before the program is
    #: exec'd (the child waits for it): e.g. detach the view outside.
    after_setup: Callable[[int], None] | None = None
    #: A service the program uses (see the module docstring), started in the
    #: user namespace before the PID namespace and the program's own mount
    #: namespace exist.  Called with the function the service's forked process
    #: must run first (it drops the runner's pipes and arranges the SIGTERM on
    #: the first process's death); returns that process's pid.
    serve: Callable[[Callable[[], None]], int] | None = None
    #: How long a stopped service may take to exit before it is killed.
    serve_stop_timeout: float = 10.0
    #: Also exec as this uid/gid inside (container images' User), after setup.
    user: tuple[int, int, list[int]] | None = None
    pass_fds: tuple[int, ...] = field(default_factory=tuple)


def _die_with_parent(parent: int | None) -> None:
    """SIGKILL when the parent dies (set after every credential change, which resets it).

    ``parent`` None: a PID namespace's init, whose parent is outside and shows as 0.
    """
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:  # it died before the line above
        os._exit(137)


def _fail(status_w: int, e: BaseException) -> None:
    if isinstance(e, NamespaceError):
        msg = str(e)
    elif isinstance(e, OSError):
        msg = e.strerror or str(e)
    else:
        msg = f"{type(e).__name__}: {e}"
    with contextlib.suppress(OSError):
        os.write(status_w, f"X{msg}".encode())
    os._exit(125)


def _child(spec: Spec, ids: Ids, go: int, status_w: int) -> None:
    """In the forked child: the namespaces and the id maps, the service, then the init.

    This process stays outside the new PID namespace (unshare puts only its
    children in it) and relays: it waits for the init and passes signals on;
    then it stops the service.  Never returns.
    """
    service: int | None = None
    try:
        uid, gid, runner = os.getuid(), os.getgid(), os.getppid()
        flags = CLONE_NEWUSER | CLONE_NEWNS | (CLONE_NEWNET if spec.net else 0)
        # With a service, the PID namespace comes after it: the service's
        # process must not be in it (its init's end kills the whole namespace).
        later = CLONE_NEWPID if spec.pid and spec.serve is not None else 0
        flags |= CLONE_NEWPID if spec.pid and not later else 0
        try:
            unshare(flags)
        except OSError as e:
            raise NamespaceError(userns_disabled_reason(e)) from None
        if ids is Ids.SUBIDS:
            os.write(status_w, b"M")  # the parent runs newuidmap/newgidmap now
            if os.read(go, 1) != b"G":
                os._exit(127)
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            with contextlib.suppress(OSError):
                os.setgroups([])
        else:
            map_self(0, uid, 0, gid)
        _die_with_parent(runner)
        if spec.serve is not None:
            mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates in or out
            me = os.getpid()
            service = spec.serve(lambda: _service_child(me, go, status_w))
            if later:
                unshare(later)
        elif not spec.pid:
            _init(spec, go, status_w, uid, gid)
        relay = os.getpid()
        init = os.fork()
        if init == 0:
            _die_with_parent(None if spec.pid else relay)
            _init(spec, go, status_w, uid, gid)
        os.close(go)
        os.close(status_w)
        code = _relay(init)
        if service is not None:
            stop_service(service, spec.serve_stop_timeout)
        os._exit(code)
    except BaseException as e:
        if service is not None:
            stop_service(service, spec.serve_stop_timeout)
        _fail(status_w, e)


def _service_child(parent: int, go: int, status_w: int) -> None:
    """First steps of a service's process: the runner's pipes are not its to
    hold (the runner reads the status pipe to its end), and it stops (SIGTERM:
    a clean unmount) when the namespace's first process dies."""
    for fd in (go, status_w):
        with contextlib.suppress(OSError):
            os.close(fd)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(137)


def stop_service(pid: int, timeout: float) -> int | None:
    """SIGTERM ``pid`` (a child of this process), SIGKILL it after ``timeout`` s;
    reaped.  Its exit status as a shell shows it, None when already reaped."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = -1
    try:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if fd >= 0 and not select.select([fd], [], [], timeout)[0]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            return exit_code(os.waitpid(pid, 0)[1])
        except ChildProcessError:
            return None
    finally:
        if fd >= 0:
            os.close(fd)


def _init(spec: Spec, go: int, status_w: int, uid: int, gid: int) -> None:
    """PID 1 of the sandbox (or the child itself without ``pid``): the mounts, then
    the program; as init it reaps orphans and passes signals on, and when the
    program ends it exits with its status, which ends every process left in the
    namespace.  Never returns."""
    try:
        if spec.serve is not None:
            unshare(CLONE_NEWNS)  # B: what pivots here leaves the service's A alone
        if spec.net:
            loopback_up()
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        if spec.setup is not None:
            spec.setup()
        if spec.pid and spec.proc is not None:
            mount_proc(spec.proc)
        os.write(status_w, b"S")  # setup done: the parent's after_setup runs
        if os.read(go, 1) != b"G":
            os._exit(127)
        os.close(go)
        if not spec.pid:
            _program(spec, status_w, uid, gid)
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            _die_with_parent(me)
            _program(spec, status_w, uid, gid)
        os.close(status_w)
        os._exit(_relay(pid, reap_all=True))
    except BaseException as e:
        _fail(status_w, e)


def _program(spec: Spec, status_w: int, uid: int, gid: int) -> None:
    """The program's process: its identity, working directory, then exec."""
    try:
        if spec.nested:
            unshare(CLONE_NEWUSER)
            map_self(uid, 0, gid, 0)
            drop_capabilities()
        elif spec.user is not None:
            u, g, groups = spec.user
            with contextlib.suppress(OSError):
                os.setgroups(groups)
            os.setresgid(g, g, g)
            os.setresuid(u, u, u)
        if spec.cwd is not None:
            try:
                os.chdir(spec.cwd)
            except OSError:
                os.chdir("/")
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        env = spec.env if spec.env is not None else dict(os.environ)
        prog = spec.argv[0]
        if "/" not in prog:  # as a shell does: 127 when no PATH entry has it
            found = shutil.which(prog, path=env.get("PATH", os.defpath))
            if found is None:
                os.write(status_w, f"E127 {prog}: command not found".encode())
                os._exit(127)
            prog = found
        try:
            os.execve(prog, list(spec.argv), env)
        except OSError as e:
            code = 126 if e.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR) else 127
            os.write(status_w, f"E{code} {spec.argv[0]}: {e.strerror}".encode())
            os._exit(code)
    except BaseException as e:
        _fail(status_w, e)


def _relay(pid: int, reap_all: bool = False) -> int:
    """Wait for ``pid`` passing signals on; with ``reap_all`` (an init) also reap
    every orphan.  The status as a shell shows it."""
    wanted = {signal.SIGCHLD, *FORWARDED}
    while True:
        while True:
            try:
                got, status = os.waitpid(-1 if reap_all else pid, os.WNOHANG)
            except ChildProcessError:
                return 127
            if got == pid:
                return exit_code(status)
            if got == 0:
                break
        info = signal.sigwaitinfo(wanted)
        if info.si_signo != signal.SIGCHLD and not _from_terminal(info):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, info.si_signo)


def _from_terminal(info: signal.struct_siginfo) -> bool:
    """A ^C, ^\\ or resize the kernel sent to the whole foreground group: the
    program got it too, so passing it on would deliver it twice."""
    return info.si_code == _SI_KERNEL and info.si_signo in (
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGWINCH,
    )


def _read_msg(fd: int) -> bytes:
    """One message from the child: a single status byte, or the rest after E/X."""
    first = os.read(fd, 1)
    if first in (b"E", b"X"):
        chunks = [first]
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
        return b"".join(chunks)
    return first


class Running:
    """A started program: its pid, and the wait that forwards signals."""

    def __init__(self, pid: int, status_r: int) -> None:
        self.pid = pid
        self._status_r = status_r
        self.exec_error: str | None = None

    def wait(self) -> int:
        """Wait for the program, forwarding signals; its status as a shell gives it.

        Signals are blocked in the runner (see ``start``) and taken one by one
        with sigwaitinfo: no handler races with the wait, and a terminal's ^C
        (sent by the kernel to the whole foreground group) is not doubled.
        """
        wanted = {signal.SIGCHLD, *FORWARDED}
        try:
            code = _relay(self.pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
        tail = os.read(self._status_r, 4096) if _readable(self._status_r) else b""
        os.close(self._status_r)
        if tail.startswith(b"E"):
            self.exec_error = tail[1:].decode(errors="replace").split(" ", 1)[-1]
        elif tail.startswith(b"X"):  # the program's set-up failed (its identity, cwd)
            self.exec_error = tail[1:].decode(errors="replace")
        return code


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the code, or 128+N for signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 128


def start(spec: Spec) -> Running:
    """Fork the child, map its ids, run the setup; raise NamespaceError with the
    child's one-line reason if any step fails (the child is then reaped)."""
    ids = spec.ids
    sub = subordinate_ids() if ids is Ids.SUBIDS else None
    if sub is None:
        ids = Ids.ROOT
    go_r, go_w = os.pipe()
    status_r, status_w = os.pipe()
    for fd in (go_r, go_w, status_r, status_w):
        os.set_inheritable(fd, False)
    wanted = {signal.SIGCHLD, *FORWARDED}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.close(status_r)
        _child(spec, ids, go_r, status_w)
    os.close(go_r)
    os.close(status_w)
    try:
        msg = _read_msg(status_r)
        if msg == b"M" and sub is not None:
            _newidmap("newuidmap", pid, os.getuid(), sub[0])
            _newidmap("newgidmap", pid, os.getgid(), sub[1])
            os.write(go_w, b"G")
            msg = _read_msg(status_r)
        if msg != b"S":
            if msg.startswith(b"X"):
                raise NamespaceError(msg[1:].decode(errors="replace"))
            raise NamespaceError("the namespace set-up ended early")
        if spec.after_setup is not None:
            spec.after_setup(pid)
        os.write(go_w, b"G")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(status_r)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
        raise
    finally:
        os.close(go_w)
    return Running(pid, status_r)


def run(spec: Spec) -> int:
    """Start and wait: the program's exit status (127 when it could not be exec'd)."""
    return start(spec).wait()
