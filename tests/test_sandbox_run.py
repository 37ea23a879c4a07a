"""``unionfs sandbox run`` and the namespace runner, as the unprivileged test user.

Each test gets a scratch home owned by ``unionfs-test`` and runs real
programs in a sandbox over it; the real tree is compared with what the
program did, and no mount or daemon may outlive a run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_support import Home, fuse_mounts_of, make_home

from unionfs import namespace

import support


@pytest.fixture
def home(unpriv_tmp: Path, unpriv_user: support.User) -> Iterator[Home]:
    h = make_home(unpriv_tmp, unpriv_user)
    (h.path / "a.txt").write_text("real\n")
    support.chown_tree(h.path, unpriv_user.uid, unpriv_user.gid)
    yield h
    assert fuse_mounts_of(h) == [], "a view outlived its sandbox"


def _wait_for(pred, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_runs_as_the_user_without_capabilities(home: Home) -> None:
    r = home.sandbox("sh", "-c", "id -u; id -g; grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == str(home.user.uid) and lines[1] == str(home.user.gid)
    caps = dict(line.split(":\t") for line in lines[2:] if line)
    assert caps == {"CapPrm": "0" * 16, "CapEff": "0" * 16, "CapBnd": "0" * 16}


def test_writes_land_in_the_upper_at_the_original_path(home: Home) -> None:
    prog = "cat a.txt; echo sandboxed > a.txt; echo new > $HOME/b.txt; rm -f a.txt.gone; pwd"
    r = home.sandbox("sh", "-c", prog)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"real\n{home.path}\n"
    assert (home.path / "a.txt").read_text() == "real\n"  # the real tree is untouched
    assert not (home.path / "b.txt").exists()
    assert (home.upper() / "a.txt").read_text() == "sandboxed\n"
    assert (home.upper() / "b.txt").read_text() == "new\n"
    # A second run of the same sandbox sees the first one's changes.
    r = home.sandbox("cat", "a.txt", "b.txt")
    assert r.stdout == "sandboxed\nnew\n", r.stderr


def test_exit_status_and_death_by_signal_pass_through(home: Home) -> None:
    assert home.sandbox("sh", "-c", "exit 3").returncode == 3
    assert home.sandbox("sh", "-c", "kill -9 $$").returncode == 128 + 9
    r = home.sandbox("no-such-program-here")
    assert r.returncode == 127 and "no-such-program-here" in r.stderr


def test_signals_are_forwarded(home: Home) -> None:
    prog = (
        "trap 'echo got-term > $HOME/sig; exit 7' TERM; touch $HOME/ready;"
        " while :; do sleep 0.05; done"
    )
    p = home.popen("sandbox", "run", "--", "sh", "-c", prog)
    try:
        assert _wait_for(lambda: (home.upper() / "ready").exists()), p.stderr
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 7
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert (home.upper() / "sig").read_text() == "got-term\n"
    assert _wait_for(lambda: not fuse_mounts_of(home), timeout=10)


def test_home_changed_outside_shows_inside(home: Home) -> None:
    """-o live in the sandbox: a file another program writes in the home meanwhile shows."""
    prog = (
        "cat a.txt; touch $HOME/ready; i=0;"
        " while [ ! -e outside.txt ] && [ $i -lt 1000 ]; do sleep 0.02; i=$((i+1)); done;"
        " cat outside.txt a.txt"
    )
    p = home.popen("sandbox", "run", "--", "sh", "-c", prog)
    try:
        assert _wait_for(lambda: (home.upper() / "ready").exists())
        support.run_as(home.user, _write_outside, home.path)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert out == "real\nfrom outside\nreal, changed\n"


def _write_outside(home: Path) -> None:
    (home / "a.txt").write_text("real, changed\n")
    (home / "outside.txt").write_text("from outside\n")


def test_cannot_undo_the_view_and_state_is_hidden(home: Home) -> None:
    prog = (
        'umount "$HOME" 2>/dev/null && echo UNMOUNTED; ls -A "$HOME/.local/state/unionfs"; echo end'
    )
    r = home.sandbox("sh", "-c", prog)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "end\n"  # umount refused, the sandboxes' state shows empty


def test_nested_mount_under_the_tree_stays_visible(home: Home, unpriv_user: support.User) -> None:
    sub = home.path / "mnt"
    sub.mkdir()
    with support.tmpfs(sub):
        (sub / "f").write_text("on tmpfs\n")
        support.chown_tree(sub, unpriv_user.uid, unpriv_user.gid)
        r = home.sandbox("sh", "-c", "cat mnt/f; echo changed > mnt/f")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "on tmpfs\n"
        assert (sub / "f").read_text() == "on tmpfs\n"
        assert (home.upper() / "mnt" / "f").read_text() == "changed\n"


def _serve_unix(path: Path, user: support.User) -> subprocess.Popen[str]:
    server = textwrap.dedent(
        f"""
        import socket, sys
        s = socket.socket(socket.AF_UNIX)
        s.bind({path.name!r})  # relative: scratch paths exceed sun_path
        s.listen(4)
        print("ready", flush=True)
        while True:
            c, _ = s.accept()
            c.sendall(b"hello from outside\\n")
            c.close()
        """
    )
    p = subprocess.Popen(
        ["python3", "-c", server],
        preexec_fn=support.as_user(user),
        stdout=subprocess.PIPE,
        text=True,
        cwd=path.parent,
    )
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return p


CONNECT = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
    " print(s.recv(100).decode(), end='')"
)


def test_unix_socket_outside_is_reachable_from_inside(home: Home) -> None:
    for where in (home.path / "app.sock", home.path / ".gnupg" / "S.agent"):
        where.parent.mkdir(exist_ok=True)
        os.chown(where.parent, home.user.uid, home.user.gid)
        server = _serve_unix(where, home.user)
        try:
            r = home.sandbox("python3", "-c", CONNECT, str(where.relative_to(home.path)))
            assert r.returncode == 0, r.stderr
            assert r.stdout == "hello from outside\n"
        finally:
            server.kill()
            server.wait()


def test_pass_through_dir_stays_real(home: Home) -> None:
    (home.path / "shared").mkdir()
    os.chown(home.path / "shared", home.user.uid, home.user.gid)
    r = home.sandbox("sh", "-c", "echo kept > shared/x", opts=("--pass", str(home.path / "shared")))
    assert r.returncode == 0, r.stderr
    assert (home.path / "shared" / "x").read_text() == "kept\n"


def _tcp_server() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)

    def serve() -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            c.sendall(b"outside\n")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return s, s.getsockname()[1]


TCP_PROBE = textwrap.dedent(
    """
    import socket, sys, threading
    outside = int(sys.argv[1])
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
    threading.Thread(target=lambda: srv.accept()[0].sendall(b"lo"), daemon=True).start()
    c = socket.create_connection(srv.getsockname(), timeout=10)
    print("loopback", c.recv(10).decode())
    try:
        socket.create_connection(("127.0.0.1", outside), timeout=10).recv(10)
        print("outside reachable")
    except OSError as e:
        print("outside unreachable")
    print("links", sorted(open("/proc/net/dev").read().split()[i].rstrip(":")
          for i in range(len(open("/proc/net/dev").read().split()))
          if open("/proc/net/dev").read().split()[i].endswith(":")))
    """
)


def test_net_none_has_loopback_and_nothing_else(home: Home) -> None:
    s, port = _tcp_server()
    try:
        r = home.sandbox("python3", "-c", TCP_PROBE, str(port), opts=("--net=none",))
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["loopback lo", "outside unreachable", "links ['lo']"]
        r = home.sandbox("python3", "-c", TCP_PROBE, str(port))
        assert r.returncode == 0, r.stderr
        assert "outside reachable" in r.stdout.splitlines()
    finally:
        s.close()


def test_sandbox_in_use_is_refused_and_listed(home: Home) -> None:
    p = home.popen("sandbox", "run", "--", "sh", "-c", "touch $HOME/ready; sleep 30")
    try:
        assert _wait_for(lambda: (home.upper() / "ready").exists())
        r = home.sandbox("true")
        assert r.returncode == 1 and "in use" in r.stderr
        r = home.unionfs("sandbox", "ls")
        assert "(running)" in r.stdout
        r = home.unionfs("sandbox", "discard", "default")
        assert r.returncode == 1 and "in use" in r.stderr
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    r = home.unionfs("sandbox", "ls")
    assert r.stdout.startswith("default\t") and "(running)" not in r.stdout
    assert home.unionfs("sandbox", "discard", "default").returncode == 0
    assert not home.state().exists()
    assert home.unionfs("sandbox", "ls").stdout == ""


def test_runner_killed_leaves_no_mount(home: Home) -> None:
    """SIGKILL of the runner: the program dies with it, the view and daemon follow."""
    p = home.popen("sandbox", "run", "--", "sh", "-c", "touch $HOME/ready; sleep 60")
    assert _wait_for(lambda: (home.upper() / "ready").exists())
    p.kill()
    p.wait()
    assert _wait_for(lambda: not fuse_mounts_of(home))
    assert _wait_for(lambda: not _sandbox_processes(home.user.uid), timeout=30)


def _sandbox_processes(uid: int) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"sandbox" in cmd or b"sleep\x0060" in cmd:
            out.append(int(pid))
    return out


def test_bad_invocations_are_one_line_errors(home: Home) -> None:
    r = home.unionfs("sandbox", "run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = home.unionfs("sandbox", "run", "--name", "../x", "--", "true")
    assert r.returncode == 1 and "bad sandbox name" in r.stderr
    r = home.unionfs("sandbox", "run", "--dir", str(home.path / "nope"), "--", "true")
    assert r.returncode == 1 and "not a directory" in r.stderr
    (home.path / "d").mkdir()
    r = home.unionfs(
        "sandbox", "run", "--dir", str(home.path), "--dir", str(home.path / "d"), "--", "true"
    )
    assert r.returncode == 1 and "overlap" in r.stderr
    assert home.unionfs("sandbox", "discard", "nothing").returncode == 1


def test_userns_disabled_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    values: dict[str, int] = {}
    monkeypatch.setattr(namespace, "_read_int", lambda p: values.get(p))
    values["/proc/sys/kernel/unprivileged_userns_clone"] = 0
    assert "kernel.unprivileged_userns_clone=1" in namespace.userns_disabled_reason()
    values.clear()
    values["/proc/sys/user/max_user_namespaces"] = 0
    assert "user.max_user_namespaces" in namespace.userns_disabled_reason()
    values.clear()
    values["/proc/sys/kernel/apparmor_restrict_unprivileged_userns"] = 1
    assert "apparmor_restrict_unprivileged_userns=0" in namespace.userns_disabled_reason()
    values.clear()
    assert "Operation not permitted" in namespace.userns_disabled_reason(PermissionError(1, "x"))


def test_subordinate_range(tmp: Path) -> None:
    f = tmp / "subuid"
    f.write_text("alice:100000:65536\n# junk\nbob:x:1\n1000:200000:10\n")
    assert namespace.subordinate_range(str(f), "alice", 1001) == (100000, 65536)
    assert namespace.subordinate_range(str(f), "carol", 1000) == (200000, 10)
    assert namespace.subordinate_range(str(f), "bob", 5) is None
    assert namespace.subordinate_range(str(tmp / "none"), "alice", 1) is None


def test_home_view_fallback(home: Home) -> None:
    r = home.unionfs(
        "sandbox", "run", "--home-view", "--", "sh", "-c", 'echo v > "$HOME/a.txt"; echo $HOME'
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() != str(home.path) and "HOME points" in r.stderr
    assert (home.path / "a.txt").read_text() == "real\n"
    assert (home.upper() / "a.txt").read_text() == "v\n"


def test_startup_benchmark_runs(unpriv_user: support.User) -> None:
    """benchmarks/sandbox.py end to end, one run (no timing is checked)."""
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "sandbox.py"
    r = subprocess.run(
        [sys.executable, str(bench), "--runs", "1", "--commit", "100", "--user", unpriv_user.name],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "| unionfs sandbox run -- true |" in r.stdout
    assert "sandbox steps (median): interpreter" in r.stdout
    assert "sandbox commit of 100 small files:" in r.stdout


def test_several_dirs_are_sandboxed_each(home: Home) -> None:
    for d in ("src", "conf"):
        (home.path / d).mkdir()
        (home.path / d / "f").write_text(f"{d}\n")
    support.chown_tree(home.path, home.user.uid, home.user.gid)
    opts = ("--name", "two", "--dir", str(home.path / "src"), "--dir", str(home.path / "conf"))
    prog = "echo S > src/f; echo C > conf/f; echo real > a.txt.new"
    r = home.sandbox("sh", "-c", prog, opts=opts)
    assert r.returncode == 0, r.stderr
    assert (home.path / "src/f").read_text() == "src\n"
    assert (home.path / "conf/f").read_text() == "conf\n"
    assert (home.path / "a.txt.new").read_text() == "real\n"  # outside the sandboxed dirs
    assert (home.upper("two", 0) / "f").read_text() == "S\n"
    assert (home.upper("two", 1) / "f").read_text() == "C\n"
    r = home.unionfs("sandbox", "commit", "two", str(home.path / "conf"))
    assert r.returncode == 0, r.stderr
    assert (home.path / "conf/f").read_text() == "C\n"
    assert (home.path / "src/f").read_text() == "src\n"


def test_gc_removes_leftovers(home: Home) -> None:
    top = home.path / ".local/state/unionfs/sandboxes"
    stale = home.runtime / "unionfs" / "x.0.999999"
    half = top / ".x.new.999999"
    support.run_as(home.user, _make_leftovers, stale, half)
    r = home.unionfs("sandbox", "gc")
    assert (r.returncode, r.stdout) == (0, "2 leftover(s) removed\n"), r.stderr
    assert not stale.exists() and not half.exists()


def _make_leftovers(stale: Path, half: Path) -> None:
    stale.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    stale.mkdir()
    half.mkdir(parents=True)
    (half / "junk").write_text("x")
