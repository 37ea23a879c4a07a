"""The opt-in start server (unionfs/server.py) and unionfs-mount as its client.

Every test runs a real server in a private $XDG_RUNTIME_DIR, mounts through
it, and checks that no process it forked is left (``guarded``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from unionfs import server

HERE = os.path.dirname(sys.executable)
MOUNT = shutil.which("unionfs-mount", path=HERE) or ""
pytestmark = pytest.mark.skipif(not MOUNT, reason="unionfs-mount is not installed beside python")
UNIONFS = [sys.executable, "-m", "unionfs.command"]


def guarded(srv: Running) -> list[int]:
    """PIDs of the live processes the server forked, whether it still runs or not.

    A fork shares the server's command line and its exec-time environment
    (what /proc/PID/environ shows, whatever the child sets later), which holds
    this test's own $XDG_RUNTIME_DIR: no other process has both.
    """
    cmdline, runtime = srv.cmdline, srv.runtime
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == srv.pid:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read() != cmdline:
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if runtime + b"\0" in f.read() and alive(int(entry)):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class Running:
    """A started server: its PID and how to ask it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        r = self.unionfs("server", "start", "--idle", "120")
        assert r.returncode == 0, r.stderr
        status = self.unionfs("server", "status")
        assert status.returncode == 0, status.stdout
        self.pid = int(status.stdout.split("pid=")[1].split()[0])
        with open(f"/proc/{self.pid}/cmdline", "rb") as f:
            self.cmdline = f.read()
        self.runtime = f"XDG_RUNTIME_DIR={env['XDG_RUNTIME_DIR']}".encode()

    def unionfs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*UNIONFS, *args], env=self.env, capture_output=True, text=True, timeout=60
        )

    def mount(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MOUNT, *args], env=self.env, capture_output=True, text=True, timeout=60, **kw
        )

    def mounts(self) -> int:
        out = self.unionfs("server", "status").stdout
        return int(out.split("mounts=")[1].split()[0])


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Running]:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    env.pop(server.DISABLE, None)
    for d in ("low", "up", "work", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "low" / "f").write_text("lower")
    running = Running(env)
    try:
        yield running
    finally:
        mnt = tmp_path / "mnt"
        if mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        running.unionfs("server", "stop")
        stopped = wait_for(lambda: not alive(running.pid))
        left = guarded(running)
        for pid in [*left, *([] if stopped else [running.pid])]:
            os.kill(pid, signal.SIGKILL)
        assert stopped, "the server did not exit after stop"
        assert not left, f"processes of the server left: {left}"
        assert not (runtime / "unionfs" / server.SOCKET_NAME).exists()


def branches(tmp_path: Path) -> list[str]:
    return [
        "-o",
        f"workdir={tmp_path / 'work'}",
        *(str(tmp_path / d) for d in ("low", "up", "mnt")),
    ]


def test_background_mount_is_forked_by_the_server(srv: Running, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    r = srv.mount(*branches(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert (mnt / "f").read_text() == "lower"
    (mnt / "new").write_text("upper")
    assert (tmp_path / "up" / "new").read_text() == "upper"
    daemons = guarded(srv)
    assert len(daemons) == 1  # the detector sees the daemon: the leak check can fail
    with open(f"/proc/{daemons[0]}/status") as f:
        ppid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
    assert ppid == srv.pid
    assert srv.mounts() == 1
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert wait_for(lambda: not guarded(srv))
    assert wait_for(lambda: srv.mounts() == 0)


@contextlib.contextmanager
def foreground(
    srv: Running, tmp_path: Path, wrapper: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``unionfs-mount -f`` through the server, once it answers: the client and the daemon."""
    client = subprocess.Popen([*wrapper, MOUNT, "-f", *branches(tmp_path)], env=srv.env)
    try:
        assert wait_for(lambda: (tmp_path / "mnt" / "f").exists())
        (daemon,) = guarded(srv)
        assert daemon != client.pid
        yield client, daemon
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_foreground_client_passes_sigterm_and_exit_status(srv: Running, tmp_path: Path) -> None:
    with foreground(srv, tmp_path) as (client, daemon):
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=30) == 0
    assert not mounted(tmp_path / "mnt")
    assert wait_for(lambda: not alive(daemon))


def test_killed_foreground_client_unmounts(srv: Running, tmp_path: Path) -> None:
    """SIGKILL of the client: the connection was the daemon's lifeline."""
    with foreground(srv, tmp_path) as (client, daemon):
        client.kill()
        client.wait()
        assert wait_for(lambda: not alive(daemon))
        assert wait_for(lambda: not mounted(tmp_path / "mnt"))


def test_daemon_killed_by_a_signal_kills_the_client_alike(srv: Running, tmp_path: Path) -> None:
    with foreground(srv, tmp_path) as (client, daemon):
        os.kill(daemon, signal.SIGKILL)
        assert client.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["-o", "nosuchoption", "LOW", "UP", "MNT"], 2),
        (["/nonexistent-lower", "UP", "MNT"], 1),
        (["-f", "/nonexistent-lower", "UP", "MNT"], 1),
        (["--version"], 0),
    ],
)
def test_errors_are_the_same_lines_and_codes(
    srv: Running, tmp_path: Path, args: list[str], code: int
) -> None:
    names = {"LOW": "low", "UP": "up", "MNT": "mnt"}
    argv = [str(tmp_path / names[a]) if a in names else a for a in args]
    via = srv.mount(*argv)
    alone = subprocess.run(
        [MOUNT, *argv],
        env={**srv.env, server.DISABLE: "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (via.returncode, via.stdout, via.stderr) == (
        alone.returncode,
        alone.stdout,
        alone.stderr,
    )
    assert via.returncode == code
    assert len(via.stderr.splitlines()) == (1 if code else 0)
    assert wait_for(lambda: not guarded(srv))


def test_relative_paths_and_inherited_fd_are_the_clients(srv: Running, tmp_path: Path) -> None:
    """The daemon starts in the client's directory and gets its descriptors (--ready-fd)."""
    r, w = os.pipe()
    try:
        client = subprocess.Popen(
            [MOUNT, "-f", "--ready-fd", str(w), "-o", "workdir=work", "low", "up", "mnt"],
            env=srv.env,
            cwd=tmp_path,
            pass_fds=(w,),
        )
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"OK"
        assert (tmp_path / "mnt" / "f").read_text() == "lower"
        assert len(guarded(srv)) == 1
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=30) == 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert not mounted(tmp_path / "mnt")


def test_another_mount_namespace_mounts_by_itself(srv: Running, tmp_path: Path) -> None:
    """A client the server's daemon would not serve alike is declined, and mounts itself."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root")
    mnt = tmp_path / "mnt"
    script = f'"{MOUNT}" "$@" && cat "{mnt}/f" && fusermount3 -u "{mnt}"'
    r = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            *branches(tmp_path),
        ],
        env=srv.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "lower"
    assert srv.mounts() == 0
    assert not mounted(mnt)


def test_status_and_stop_without_a_server(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    r = subprocess.run([*UNIONFS, "server", "status"], env=env, capture_output=True, text=True)
    assert (r.returncode, r.stdout.strip()) == (3, "not running")
    r = subprocess.run([*UNIONFS, "server", "stop"], env=env, capture_output=True, text=True)
    assert r.returncode == 0


def test_socket_dir_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert server.socket_dir(create=True) == f"{runtime}/unionfs"
    os.chmod(runtime / "unionfs", 0o755)
    assert server.socket_dir() is None  # searchable by others: not used


def test_request_round_trip() -> None:
    data = server.encode_request(["-o", "a,b", "l", "m"], [0, 1, 2, 7])
    _, exe, argv, numbers, env = server.decode_request(data)
    assert argv == ["-o", "a,b", "l", "m"]
    assert numbers == [0, 1, 2, 7]
    assert exe == sys.executable
    assert env == dict(os.environb)
    with pytest.raises(ValueError):
        server.decode_request(b"MOUNT\0x\0y\x005\0a")


def test_idle_server_exits_by_itself(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    r = subprocess.run([*UNIONFS, "server", "start", "--idle", "0.3"], env=env, timeout=60)
    assert r.returncode == 0
    sock = runtime / "unionfs" / server.SOCKET_NAME
    assert sock.exists()
    assert wait_for(lambda: not sock.exists())
    status = [*UNIONFS, "server", "status"]
    assert wait_for(lambda: subprocess.run(status, env=env, capture_output=True).returncode == 3)


def test_fingerprint_sees_a_changed_module(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.py").write_text("x = 1\n")
    before = server._fingerprint(str(tmp_path))
    assert before == server._fingerprint(str(tmp_path))
    (tmp_path / "sub" / "m.py").write_text("x = 22\n")
    assert server._fingerprint(str(tmp_path)) != before


def test_two_starts_at_once_make_one_server(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    argv = [*UNIONFS, "server", "start", "--idle", "120"]  # Running's: guarded() finds both
    starts = [subprocess.Popen(argv, env=env) for _ in range(3)]
    assert [p.wait(timeout=60) for p in starts] == [0, 0, 0]
    running = Running(env)
    others = guarded(running)
    try:
        assert others == []  # no second server
    finally:
        for pid in others:
            os.kill(pid, signal.SIGTERM)
        running.unionfs("server", "stop")
        assert wait_for(lambda: not alive(running.pid))


def test_client_descriptors_at_any_number(srv: Running, tmp_path: Path) -> None:
    """Inherited descriptors at the numbers the server's own use (its connection, the
    received ones: all small) reach the daemon as they were, and the mount still works."""
    numbers = range(3, 20)  # bash: dash opens only single-digit ones
    opens = " ".join(f"{n}</dev/null" for n in numbers)
    wrapper = ("bash", "-c", f'exec "$@" {opens}', "bash")
    with foreground(srv, tmp_path, wrapper) as (client, daemon):
        for n in numbers:
            assert os.readlink(f"/proc/{daemon}/fd/{n}") == "/dev/null"
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=30) == 0
    assert not mounted(tmp_path / "mnt")


def test_server_killed_under_a_foreground_mount(srv: Running, tmp_path: Path) -> None:
    """The daemon outlives a killed server; the client still stops it, and says the status
    is unknown (no one reaps the daemon for it now)."""
    with foreground(srv, tmp_path) as (client, daemon):
        os.kill(srv.pid, signal.SIGKILL)
        assert wait_for(lambda: not alive(srv.pid))
        Path(srv.env["XDG_RUNTIME_DIR"], "unionfs", server.SOCKET_NAME).unlink()  # stale now
        assert (tmp_path / "mnt" / "f").read_text() == "lower"  # still served
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=30) == 1
        assert wait_for(lambda: not alive(daemon))
    assert not mounted(tmp_path / "mnt")


def test_python_api_through_the_server(
    srv: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """unionfs.mount runs the launcher with --ready-fd and --parent-fd: the client must
    not keep them open (the API waits for the ready pipe's end of file)."""
    import unionfs

    monkeypatch.setenv("XDG_RUNTIME_DIR", srv.env["XDG_RUNTIME_DIR"])
    monkeypatch.delenv(server.DISABLE, raising=False)
    m = unionfs.mount(
        [tmp_path / "low"],
        tmp_path / "up",
        tmp_path / "mnt",
        workdir=tmp_path / "work",
        start_timeout=20,
    )
    try:
        assert (tmp_path / "mnt" / "f").read_text() == "lower"
        (daemon,) = guarded(srv)
        assert daemon != m.pid
    finally:
        assert m.unmount() == 0
    assert not mounted(tmp_path / "mnt")
    assert wait_for(lambda: not alive(daemon))


@pytest.mark.parametrize(
    ("messages", "started", "pid"),
    [
        ([b"PID 7"], True, 7),
        ([b"DETACHED", b"PID 8"], True, 8),  # the child ran ahead of the server's reply
        ([b"DETACHED"], True, None),  # then the server died: still never a second start
        ([b"NO another user"], False, None),
        ([], False, None),  # the server closed without an answer
    ],
)
def test_client_reads_the_answer_in_any_order(
    messages: list[bytes], started: bool, pid: int | None
) -> None:
    import socket

    from unionfs import launcher

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for m in messages:
        theirs.send(m)
    theirs.close()
    client = launcher._Client(ours, -1)
    try:
        assert client.started() is started
        assert client.pid == pid
    finally:
        ours.close()
