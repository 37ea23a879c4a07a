"""The Python API: ``with unionfs.mounted(lowers, upper, mnt) as m:``."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import unionfs
from unionfs.api import option_words
from unionfs.options import ConfigError, split_options

import support

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "init.defaultBranch=m"]


def _children() -> set[int]:
    """This process's live (or unreaped) children."""
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            out.update(int(p) for p in f.read().split())
    return out


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture
def layers(tmp: Path) -> tuple[Path, Path, Path]:
    lower, up, mnt = tmp / "lower", tmp / "upper", tmp / "mnt"
    for d in (lower, up, mnt):
        d.mkdir()
    (lower / "README").write_text("from the lower\n")
    return lower, up, mnt


def test_option_words() -> None:
    assert option_words(read_only=True, nonempty=True, dircache=False, spin_us=0) == [
        "ro",
        "nonempty",
        "nodircache",
        "spin_us=0",
    ]
    assert option_words(fsname="a,b", workdir=Path("/w"), timeout=None) == [
        "fsname=a\\,b",
        "workdir=/w",
    ]


@pytest.mark.parametrize("value", ["a,b", "C:\\dir", "x\\y,z", "=,=", "sp ace", "\\\\x"])
def test_option_words_reach_the_parser_as_given(value: str) -> None:
    # Each value comes out of unionfs-mount's -o parsing exactly as given, and the
    # option after it stays an option of its own.
    words = option_words(fsname=value, whiteout="oci")
    assert split_options([",".join(words)]) == [f"fsname={value}", "whiteout=oci"]


@pytest.mark.parametrize("value", ["back\\", "a\\,b", "a\\\\,b"])
def test_option_words_refuse_what_o_cannot_spell(value: str) -> None:
    # A backslash before a comma escaped the separator: whiteout=oci became part of
    # fsname, silently.  Refused in one line instead.
    with pytest.raises(unionfs.MountError, match="cannot be passed") as info:
        option_words(fsname=value, whiteout="oci")
    assert info.value.code == 2 and "\n" not in str(info.value)


def test_import_does_not_load_the_filesystem() -> None:
    code = (
        "import sys, unionfs; unionfs.mounted; unionfs.MountError; unionfs.Mount;"
        "print(sorted(m for m in ('pyfuse3', 'trio') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
    assert issubclass(unionfs.MountError, ConfigError)
    with pytest.raises(AttributeError):
        _ = unionfs.no_such_name  # type: ignore[attr-defined]


def test_git_in_a_mount_then_nothing_left(layers: tuple[Path, Path, Path]) -> None:
    lower, up, mnt = layers
    children, fds = _children(), _fds()
    with unionfs.mounted([lower], up, mnt) as m:
        # Returned only once served: the first access needs no waiting.
        assert (mnt / "README").read_text() == "from the lower\n"
        assert m.mountpoint == mnt and m.pid in _children() and m.returncode is None
        subprocess.run([*GIT, "init", "-q"], cwd=mnt, check=True)
        subprocess.run([*GIT, "add", "README"], cwd=mnt, check=True)
        subprocess.run([*GIT, "commit", "-qm", "first"], cwd=mnt, check=True)
        log = subprocess.run(
            [*GIT, "log", "--format=%s"], cwd=mnt, check=True, capture_output=True, text=True
        )
        assert log.stdout == "first\n"
        assert (up / ".git" / "HEAD").is_file()
    assert m.returncode == 0, "the daemon is reaped, and ended cleanly"
    assert not support.is_mounted(mnt) and not m.is_mounted()
    assert _children() == children and _fds() == fds
    assert m.unmount() == 0, "a second unmount does nothing"


def test_read_only_and_options(layers: tuple[Path, Path, Path]) -> None:
    lower, _, mnt = layers
    with unionfs.mounted(lower, None, mnt, fsname="api,test", dircache=False) as m:
        entry = support.mount_entry(mnt)
        assert entry is not None and entry.source == "api,test"
        assert support.errno_of(lambda: (mnt / "new").write_text("x")) == errno.EROFS
        assert m.unmount() == 0
        assert not support.is_mounted(mnt)


@pytest.mark.parametrize(
    ("make", "code", "fragment"),
    [
        (lambda t: ([t / "missing"], t / "upper", t / "mnt", {}), 1, "does not exist"),
        (lambda t: ([t / "lower"], t / "upper", t / "lower" / "README", {}), 1, "not a directory"),
        (lambda t: ([t / "lower"], t / "upper", t / "mnt", {"frob": 1}), 2, "unknown option"),
        (lambda t: ([t / "lower"], t / "upper", t / "mnt", {"timeout": "x"}), 2, "number"),
        (lambda t: ([t], t / "upper", t / "mnt", {}), 1, "inside branch"),
        (lambda t: ([t / "lower"], t / "upper", t / "mnt", {"lowerdir": "/x"}), 2, "arguments"),
        (lambda t: ([], t / "upper", t / "mnt", {}), 2, "no lower"),
    ],
)
def test_bad_input_raises_before_anything_is_mounted(
    tmp: Path, layers: tuple[Path, Path, Path], make, code, fragment
) -> None:
    lowers, upper, mnt, options = make(tmp)
    before = sorted(p.name for p in tmp.iterdir())
    children, fds = _children(), _fds()
    with pytest.raises(unionfs.MountError) as info, unionfs.mounted(lowers, upper, mnt, **options):
        raise AssertionError("mounted")
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    assert info.value.code == code
    assert not support.mounts_under(tmp)
    assert sorted(p.name for p in tmp.iterdir()) == before, "nothing may be created"
    assert _children() == children and _fds() == fds, "the daemon is reaped, no fd leaks"


def test_busy_mount_is_detached_and_the_daemon_reaped(layers: tuple[Path, Path, Path]) -> None:
    lower, up, mnt = layers
    with unionfs.mounted([lower], up, mnt) as m:
        busy = subprocess.Popen(["sleep", "infinity"], cwd=mnt)
    try:
        assert m.returncode is not None, "the daemon is reaped although the mount was busy"
        assert not support.is_mounted(mnt)
        # The program still inside sees a filesystem that no daemon serves any more.
        assert support.errno_of(lambda: os.listdir(f"/proc/{busy.pid}/cwd")) == errno.ENOTCONN
    finally:
        busy.kill()
        busy.wait()


def test_killed_daemon_leaves_no_dead_mount(layers: tuple[Path, Path, Path]) -> None:
    lower, up, mnt = layers
    with (
        pytest.raises(unionfs.MountError, match="killed by signal 9"),
        unionfs.mounted([lower], up, mnt) as m,
    ):
        os.kill(m.pid, signal.SIGKILL)
        m.proc.wait()
        assert support.errno_of(lambda: os.listdir(mnt)) == errno.ENOTCONN
    assert m.returncode == -signal.SIGKILL
    assert not support.is_mounted(mnt)


_USER_SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys
    import unionfs

    lower, upper, mnt = sys.argv[1:4]
    with unionfs.mounted([lower], upper, mnt) as m:
        db = os.path.join(mnt, "t.db")
        subprocess.run(["sqlite3", db, "create table t(x); insert into t values (42);"], check=True)
        out = subprocess.run(
            ["sqlite3", db, "select x from t"], check=True, capture_output=True, text=True
        ).stdout
        names = sorted(os.listdir(mnt))
        mounted_as = open("/proc/self/mountinfo").read().count(" " + mnt + " ")
    print(json.dumps({"out": out, "names": names, "mounted": mounted_as, "code": m.returncode,
                      "after": open("/proc/self/mountinfo").read().count(" " + mnt + " ")}))
    """
)


def test_unprivileged_user(tmp: Path, unpriv_user: support.User) -> None:
    lower = tmp / "lower"
    (lower / "private").mkdir(parents=True)
    (lower / "README").write_text("x\n")
    (lower / "private").chmod(0o700)
    home = tmp / "home"
    (home / "upper").mkdir(parents=True)
    (home / "mnt").mkdir()
    support.chown_tree(home, unpriv_user.uid, unpriv_user.gid)
    r = subprocess.run(
        [sys.executable, "-c", _USER_SCRIPT, str(lower), str(home / "upper"), str(home / "mnt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        preexec_fn=support.as_user(unpriv_user),
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == {
        "out": "42\n",
        "names": ["README", "private", "t.db"],
        "mounted": 1,
        "code": 0,
        "after": 0,
    }
    assert (home / "upper" / "t.db").stat().st_uid == unpriv_user.uid


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--ready-fd", "0"], "--ready-fd needs -f"),
        (["-f", "--ready-fd", "97"], "--ready-fd 97"),
        (["--parent-fd", "0"], "--parent-fd needs -f"),
        (["-f", "--parent-fd", "97"], "--parent-fd 97"),
    ],
)
def test_ready_fd_misuse_is_one_line(layers: tuple[Path, Path, Path], args, fragment) -> None:
    lower, up, mnt = layers
    r = subprocess.run(
        [*support.unionfs_command(), *args, str(lower), str(up), str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("unionfs-mount: ") and fragment in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and not support.is_mounted(mnt)


_KILLED_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import unionfs

    lower, upper, mnt = sys.argv[1:4]
    m = unionfs.mount([lower], upper, mnt)
    print(m.pid, flush=True)
    time.sleep(3600)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_program_leaves_no_mount_and_no_daemon(
    layers: tuple[Path, Path, Path], sig: signal.Signals
) -> None:
    # The daemon is in a session of its own, so the signal that ends the program (or its
    # process group, as a CI runner's timeout does) never reaches it; it must see its
    # supervisor's end anyway, through the lifeline pipe, and unmount.
    lower, up, mnt = layers
    prog = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SCRIPT, str(lower), str(up), str(mnt)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert prog.stdout is not None
    daemon = support.DetachedDaemon(int(prog.stdout.readline()))
    try:
        assert support.is_mounted(mnt) and daemon.poll() is None
        prog.send_signal(sig)
        assert prog.wait() == -sig
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the daemon outlived the program that mounted") from None
        assert not support.is_mounted(mnt)
    finally:
        daemon.kill()
        daemon.close()
        for entry in support.mounts_under(mnt):
            support.force_unmount(entry)


_BUSY_SCRIPT = textwrap.dedent(
    """
    import subprocess, sys
    import unionfs

    lower, upper, mnt = sys.argv[1:4]
    with unionfs.mounted([lower], upper, mnt) as m:
        busy = subprocess.Popen(["sleep", "infinity"], cwd=mnt)
    busy.kill()
    busy.wait()
    print(m.returncode)
    """
)


def test_a_busy_unmount_prints_no_error(layers: tuple[Path, Path, Path]) -> None:
    # The API detached the busy mount, then told the daemon to stop, which tried to
    # unmount it again: "fuse: failed to unmount MNT: Invalid argument" on the
    # caller's stderr at every busy exit, an error where nothing went wrong.
    lower, up, mnt = layers
    r = subprocess.run(
        [sys.executable, "-c", _BUSY_SCRIPT, str(lower), str(up), str(mnt)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout == "0\n", r.stderr
    assert "failed to unmount" not in r.stderr, r.stderr
    assert not support.is_mounted(mnt)
