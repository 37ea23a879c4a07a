"""``unionfs run``: an image from the store (and a plain rootfs) run rootless, as the
unprivileged test user, with a tiny image built from the host's dash and libc.

Every test runs in both identity modes: ``--userns=subids`` (the user's
subordinate ids mapped, the union's daemon inside the user namespace) and
``--userns=root`` (only the user mapped, as root; the union mounted outside),
the fallback where no subordinate ids are configured."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagetools
import pytest
from sandbox_support import Home, fuse_mounts_of, make_home

import support

PROGRAMS = {"bin/sh": "/bin/dash", "bin/cat": "/bin/cat"}


def _libs() -> dict[str, str]:
    out = {}
    for prog in PROGRAMS.values():
        for line in subprocess.run(
            ["ldd", prog], capture_output=True, text=True
        ).stdout.splitlines():
            path = line.split("=>")[-1].split("(")[0].strip()
            if path.startswith("/"):
                out[path.lstrip("/")] = os.path.realpath(path)
    return out


def _entries() -> list[imagetools.Entry]:
    files = {**PROGRAMS, **_libs()}
    dirs = {"etc", "root", "tmp", "srv", "data"}
    for name in files:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    ents: list[imagetools.Entry] = [
        {"name": d, "type": "dir", "mode": 0o1777 if d == "tmp" else 0o755} for d in sorted(dirs)
    ]
    for name, src in files.items():
        ents.append({"name": name, "type": "file", "mode": 0o755, "data": Path(src).read_bytes()})
    ents.append({"name": "etc/motd", "type": "file", "data": b"from the image\n"})
    return ents


CONFIG = {
    "Env": ["PATH=/bin", "GREETING=hello"],
    "WorkingDir": "/srv",
    "Cmd": ["sh", "-c", "echo $GREETING from $(pwd); exit 3"],
}


@pytest.fixture
def home(unpriv_tmp: Path, unpriv_user: support.User) -> Home:
    h = make_home(unpriv_tmp, unpriv_user)
    layout = unpriv_tmp / "layout"
    imagetools.make_layout(layout, [_entries()], tag="tiny", cfg=CONFIG)
    support.chown_tree(layout, unpriv_user.uid, unpriv_user.gid)
    r = h.unionfs("image", "import", str(layout), "tiny:1")
    assert r.returncode == 0, r.stderr
    return h


@dataclass
class Runner:
    """``unionfs run --userns=MODE ...`` as the test user."""

    home: Home
    mode: str

    def __call__(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.home.unionfs("run", f"--userns={self.mode}", *args, **kw)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return self.home.popen("run", f"--userns={self.mode}", *args)


@pytest.fixture(params=["subids", "root"])
def run(request: pytest.FixtureRequest, home: Home) -> Runner:
    if request.param == "subids":
        request.getfixturevalue("subids")
    return Runner(home, request.param)


def test_runs_the_image_config_and_passes_the_status(home: Home, run: Runner) -> None:
    r = run("--rm", "tiny:1")
    assert (r.returncode, r.stdout) == (3, "hello from /srv\n"), r.stderr
    prog = (
        "while read k v; do case $k in Uid:) echo uid $v;; esac; done < /proc/self/status;"
        " [ -O /bin/sh ] && echo root-owned; echo $$; cat /etc/motd; echo x > /dev/null && echo dev"
    )
    r = run("--rm", "tiny:1", "--", "sh", "-c", prog)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "uid 0 0 0 0\nroot-owned\n2\nfrom the image\ndev\n"
    assert run("--rm", "tiny:1", "--", "sh", "-c", "kill -9 $$").returncode == 137
    assert not any((home.path / ".local/share/unionfs/containers").iterdir())


def test_upper_is_kept_under_the_name(home: Home, run: Runner) -> None:
    r = run("--name", "c1", "tiny:1", "--", "sh", "-c", "echo kept > /root/x")
    assert r.returncode == 0, r.stderr
    cdir = home.path / ".local/share/unionfs/containers/c1"
    assert (cdir / "upper/root/x").read_text() == "kept\n"
    assert json.loads((cdir / "container.json").read_text())["image"] == "tiny:1"
    r = run("--name", "c1", "tiny:1", "--", "cat", "/root/x")
    assert (r.returncode, r.stdout) == (0, "kept\n"), r.stderr


def test_volume_and_signals(home: Home, run: Runner) -> None:
    vol = home.path.parent / "vol"
    vol.mkdir()
    os.chown(vol, home.user.uid, home.user.gid)
    r = run("--rm", "-v", f"{vol}:/data/v", "tiny:1", "--", "sh", "-c", "echo in > /data/v/f")
    assert r.returncode == 0, r.stderr
    assert (vol / "f").read_text() == "in\n"
    # A busy loop of builtins: the trap runs at once (no child to wait for).
    prog = "trap 'exit 9' TERM; echo ready > /data/v/ready; while :; do :; done"
    p = run.popen("--rm", "-v", f"{vol}:/data/v", "tiny:1", "--", "sh", "-c", prog)
    try:
        end = time.monotonic() + 30
        while not (vol / "ready").exists() and time.monotonic() < end:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 9
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_rootfs_dirs_and_errors(home: Home, run: Runner, tmp: Path) -> None:
    rootfs = tmp / "rootfs"
    rootfs.mkdir()
    for name, src in {**PROGRAMS, **_libs()}.items():
        (rootfs / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, rootfs / name)
    (rootfs / "etc").mkdir()
    (rootfs / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nbob:x:1000:1001::/home/bob:\n")
    if run.mode == "subids":
        # Root's files show as nobody in a user namespace (host root is not
        # mapped there); the user's own show as root.  Without subordinate
        # ids, uidmapping shows disk id 0 as the user, so root's files work.
        support.chown_tree(rootfs, home.user.uid, home.user.gid)
    r = run("--rm", "--rootfs", str(rootfs), "--", "sh", "-c", "[ -O /bin/sh ] && echo root")
    assert (r.returncode, r.stdout) == (0, "root\n"), r.stderr
    # The image's User: resolved in its /etc/passwd, when other ids are mapped.
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps({"config": {"User": "bob"}}))
    prog = "while read k v; do case $k in Uid:|Gid:) echo $k $v;; esac; done < /proc/self/status"
    r = run(
        "--rm",
        "--rootfs",
        str(rootfs),
        "--config",
        str(cfg),
        "--",
        "sh",
        "-c",
        prog + "; echo $HOME",
    )
    if run.mode == "subids":
        want = "Uid: 1000 1000 1000 1000\nGid: 1001 1001 1001 1001\n/home/bob\n"
        assert (r.returncode, r.stdout) == (0, want), r.stderr
    else:
        assert r.returncode == 125 and "only root is mapped" in r.stderr
    r = run("--rm", "nope:1")
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "nope" in r.stderr
    r = run("--rm", "-v", "relative:/x", "tiny:1")
    assert r.returncode == 125 and "volume" in r.stderr
    r = run("--rm", "tiny:1", "--", "no-such-cmd")
    assert r.returncode == 127


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (by parent links in /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in out]
        out.update(kids)
        todo.extend(kids)
    return out


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(pid)
        except FileNotFoundError:
            pass
    return out


def test_a_killed_runner_leaves_no_process_and_no_mount(home: Home, run: Runner) -> None:
    """SIGKILL of ``unionfs run`` ends the program, the namespace and the union's
    daemon (inside the namespace with subordinate ids: by its parent-death
    signal); the container is free again and kept what was written."""
    vol = home.path.parent / "vol"
    vol.mkdir()
    os.mkfifo(vol / "fifo")
    support.chown_tree(vol, home.user.uid, home.user.gid)
    prog = "echo kept > /root/x; echo ready > /data/v/ready; exec cat /data/v/fifo"
    p = run.popen("--name", "k", "-v", f"{vol}:/data/v", "tiny:1", "--", "sh", "-c", prog)
    try:
        end = time.monotonic() + 60
        while not (vol / "ready").exists() and time.monotonic() < end:
            time.sleep(0.05)
        assert (vol / "ready").exists(), p.stderr.read() if p.poll() is not None else "no start"
        tree = _descendants(p.pid)
        # The relay, the init, the program (and with subids the daemon).
        assert len(tree) >= (4 if run.mode == "subids" else 3), tree
        p.kill()
        p.wait()
        end = time.monotonic() + 60
        while _alive(tree) and time.monotonic() < end:
            time.sleep(0.05)
        assert not _alive(tree)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert fuse_mounts_of(home) == []
    r = run("--name", "k", "tiny:1", "--", "cat", "/root/x")
    assert (r.returncode, r.stdout) == (0, "kept\n"), r.stderr


def test_identity_mode_falls_back_and_says_so() -> None:
    from unionfs.container import RunError, id_mode

    sub = ((400000, 65536), (400000, 65536))
    assert id_mode("auto", sub, True) == ("subids", None)
    assert id_mode("root", sub, True) == ("root", None)
    mode, note = id_mode("auto", None, True)
    assert mode == "root" and note is not None and "subordinate ids" in note
    mode, note = id_mode("auto", sub, False)
    assert mode == "root" and note is not None and "newuidmap" in note
    with pytest.raises(RunError, match="subuid"):
        id_mode("subids", None, True)
    with pytest.raises(RunError, match="newuidmap"):
        id_mode("subids", sub, False)


def test_subordinate_ids_need_both_files(tmp: Path) -> None:
    from unionfs.namespace import subordinate_ids

    (tmp / "u").write_text("other:1:5\n4242:100000:65536\n")
    (tmp / "g").write_text("4242:200000:1000\n")
    (tmp / "none").write_text("")
    got = subordinate_ids(4242, str(tmp / "u"), str(tmp / "g"))
    assert got == ((100000, 65536), (200000, 1000))
    assert subordinate_ids(4242, str(tmp / "u"), str(tmp / "none")) is None
    assert subordinate_ids(0, str(tmp / "u"), str(tmp / "g")) is None


PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34::/var/www:/bin/sh\nbob:x:1000:1000::/home/bob:\n"
)
GROUP = "root:x:0:\nwww:x:34:\nstaff:x:50:bob,www\nbob:x:1000:\n"


def test_the_image_user_is_resolved_in_its_own_files() -> None:
    from unionfs.container import RunError, user_of

    assert user_of("", PASSWD, GROUP) is None
    assert user_of("root", PASSWD, GROUP) is None
    assert user_of("www", PASSWD, GROUP) == (33, 34, [34, 50], "/var/www")
    assert user_of("bob:staff", PASSWD, GROUP) == (1000, 50, [50], "/home/bob")
    assert user_of("1000", PASSWD, GROUP) == (1000, 1000, [50, 1000], "/home/bob")
    assert user_of("777:778", PASSWD, GROUP) == (777, 778, [778], "/")
    assert user_of("0:staff", PASSWD, GROUP) == (0, 50, [50], "/root")
    with pytest.raises(RunError, match="passwd"):
        user_of("nobody-here", PASSWD, GROUP)
    with pytest.raises(RunError, match="group"):
        user_of("bob:nogroup", PASSWD, GROUP)


def test_root_of_a_user_namespace_is_not_real_root(unpriv_user: support.User) -> None:
    """ownership.real_root(): the one test of privilege (trusted.* markers, metacopy,
    the extractor's real chown) is false for root of any other user namespace."""
    import sys

    from unionfs import ownership

    assert ownership.real_root() == (os.geteuid() == 0)
    code = (
        "import os; from unionfs import ownership as o;"
        " print(os.geteuid(), o.real_root(), o.in_user_namespace(), o.marker_xattr_ns())"
    )
    r = subprocess.run(
        ["unshare", "--map-root-user", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(unpriv_user),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=60,
    )
    assert (r.returncode, r.stdout) == (0, "0 False True b'user.'\n"), r.stderr
