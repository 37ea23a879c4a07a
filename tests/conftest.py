"""Fixtures for mounted tests: scratch dirs every user can enter, mounts undone at
test end, an unprivileged user, root-only skips and a leak check for the session.

- ``tmp``: a fresh directory per test under a session dir in /tmp (mode 0755
  all the way down, unlike pytest's 0700 tmp_path), removed afterwards; any
  mount a test left in it fails that test and is detached first.
- ``unionfs``: ``unionfs(lowers, upper, mnt, opts=(), user=None, foreground=True)``
  mounts and returns a ``Mounted`` (``.proc``, ``.mnt``, ``.close()``); every
  mount still up at test end is undone.
- ``kernel_overlay``: the same for kernel overlayfs (``lowers, upper, work, mnt``).
- ``unpriv_user`` (session): the account ``unionfs-test``, with /dev/fuse 0666
  for the session; ``unpriv_tmp``: a ``tmp`` subdirectory owned by it;
  ``subids`` (session): its subordinate ids 400000-465535 (/etc/subuid).
- Tests marked ``oracle`` or ``root`` are skipped unless run as root.
- At session end no mount may remain and no unionfs daemon may still run
  below the session's scratch dirs or pytest's tmp_path base.
- ``helper_mode`` (parametrized): ``"fastpath"`` (the C session helper serves,
  skipped when it is not built) and ``"nofastpath"`` (pyfuse3 in Python), with
  ``support.helper_opts(mode)`` the mount options that ask for it.
- ``UNIONFS_NO_SERVER=1``: no mount goes through a user's start server.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import support

# Every daemon the suite starts is exec'd, whether or not the user has a start server
# (unionfs/server.py) running: tests find daemons by PID and command line.
# tests/test_server.py runs servers of its own, with this removed.
os.environ["UNIONFS_NO_SERVER"] = "1"
from support import User

TEST_USER = "unionfs-test"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root (skipped otherwise)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (kernel overlayfs, mknod, trusted.* xattrs)")
    for item in items:
        if item.get_closest_marker("oracle") or item.get_closest_marker("root"):
            item.add_marker(skip)


# --------------------------------------------------------------------------- scratch dirs


@pytest.fixture(params=["fastpath", "nofastpath"])
def helper_mode(request: pytest.FixtureRequest) -> str:
    if request.param == "fastpath":
        try:
            from unionfs import _dircache  # type: ignore[attr-defined]  # noqa: F401
        except ImportError:
            pytest.skip("the C session helper is not built")
    return str(request.param)


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    """/tmp/unionfs-tests-XXXX, mode 0755, removed at session end."""
    path = Path(tempfile.mkdtemp(prefix="unionfs-tests-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    if not support.mounts_under(path):  # never remove through a live mount
        shutil.rmtree(path, ignore_errors=True)


def _undo_leftovers(path: Path) -> tuple[list[str], list[str]]:
    """Detach every mount and kill every unionfs daemon below ``path``; describe them."""
    left = support.mounts_under(path)
    for m in left:
        support.force_unmount(m)
    procs = support.daemon_processes(path)
    for pid, _ in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return [f"{m.fstype} on {m.mountpoint}" for m in left], [f"{p}: {c}" for p, c in procs]


@pytest.fixture
def tmp(session_dir: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A scratch dir every user can traverse; a mount left in it fails the test."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=session_dir))
    os.chmod(path, 0o755)
    yield path
    mounts, procs = _undo_leftovers(path)
    if not support.mounts_under(path):
        shutil.rmtree(path, ignore_errors=True)
    assert not mounts and not procs, f"test left behind mounts {mounts} and daemons {procs}"


@pytest.fixture
def world_tmp(tmp: Path) -> Path:
    """The older name of ``tmp``."""
    return tmp


# --------------------------------------------------------------------------- mounts


@dataclass
class Mounted:
    """A mount made by the ``unionfs``/``kernel_overlay`` fixtures."""

    mnt: Path
    proc: Any = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def close(self) -> None:
        """Unmount now (and stop the daemon); later calls do nothing."""
        self._stack.close()

    def __iter__(self) -> Iterator[Any]:
        return iter((self.proc, self.mnt))


@pytest.fixture
def unionfs(tmp: Path) -> Iterator[Callable[..., Mounted]]:
    """Factory: ``unionfs(lowers, upper=None, mnt=None, opts=(), user=None, foreground=True)``.

    ``mnt`` defaults to a new directory in ``tmp``.  Every mount is undone at
    the end of the test (in reverse order), whatever happened.
    """
    made: list[Mounted] = []

    def mount(
        lowers: Sequence[support.PathLike],
        upper: support.PathLike | None = None,
        mnt: support.PathLike | None = None,
        opts: Sequence[str] = (),
        user: User | None = None,
        foreground: bool = True,
        **kwargs: Any,
    ) -> Mounted:
        if mnt is None:
            mnt = Path(tempfile.mkdtemp(prefix="mnt-", dir=tmp))
            if user is not None:
                os.chown(mnt, user.uid, user.gid)
        m = Mounted(Path(mnt))
        try:
            m.proc, _ = m._stack.enter_context(
                support.unionfs_mount(lowers, upper, mnt, opts, user, foreground, **kwargs)
            )
        except BaseException:
            m.close()
            raise
        made.append(m)
        return m

    try:
        yield mount
    finally:
        errors = []
        for m in reversed(made):
            try:
                m.close()
            except Exception as e:  # keep undoing the others
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def kernel_overlay(tmp: Path) -> Iterator[Callable[..., Mounted]]:
    """Factory: ``kernel_overlay(lowers, upper=None, work=None, mnt=None, userxattr=False, ...)``.

    Root only.  Unmounted at the end of the test at the latest.
    """
    if os.geteuid() != 0:
        pytest.skip("kernel overlayfs needs root")
    made: list[Mounted] = []

    def mount(
        lowers: Sequence[support.PathLike],
        upper: support.PathLike | None = None,
        work: support.PathLike | None = None,
        mnt: support.PathLike | None = None,
        userxattr: bool = False,
        **kwargs: Any,
    ) -> Mounted:
        if mnt is None:
            mnt = Path(tempfile.mkdtemp(prefix="kmnt-", dir=tmp))
        if upper is not None and work is None:
            work = Path(tempfile.mkdtemp(prefix="kwork-", dir=Path(upper).parent))
        m = Mounted(Path(mnt))
        m._stack.enter_context(
            support.kernel_overlay(lowers, upper, work, mnt, userxattr=userxattr, **kwargs)
        )
        made.append(m)
        return m

    try:
        yield mount
    finally:
        for m in reversed(made):
            m.close()


# --------------------------------------------------------------------------- the test user


def _user_can_run_unionfs(user: User) -> str | None:
    """None when ``user`` can start unionfs-mount, else the error."""
    cmd = [*support.unionfs_command(), "--version"]
    try:
        r = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, preexec_fn=support.as_user(user)
        )
    except OSError as e:
        return f"{cmd[0]}: {e.strerror}"
    return None if r.returncode == 0 else (r.stderr.strip() or f"exit status {r.returncode}")


@pytest.fixture(scope="session")
def unpriv_user() -> Iterator[User]:
    """An unprivileged account that mounts through setuid fusermount3.

    ``unionfs-test`` (a system user without a home), created when missing and
    reused otherwise.  /dev/fuse is made 0666, as distributions ship it, for
    the session, and its mode is restored afterwards.  Skipped when not root,
    or when that user cannot run this interpreter (a venv below /root).
    """
    if os.geteuid() != 0:
        pytest.skip("creating a user needs root")
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            check=True,
            capture_output=True,
        )
        pw = pwd.getpwnam(TEST_USER)
    user = User(TEST_USER, pw.pw_uid, grp.getgrgid(pw.pw_gid).gr_gid)
    assert user.uid != 0 and user.gid != 0
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    try:
        why = _user_can_run_unionfs(user)
        if why is not None:
            pytest.skip(f"{TEST_USER} cannot run {support.unionfs_command()}: {why}")
        yield user
    finally:
        os.chmod("/dev/fuse", mode)


@pytest.fixture
def unpriv_tmp(tmp: Path, unpriv_user: User) -> Path:
    """A directory in ``tmp`` owned by the unprivileged user (give it subdirs with
    ``support.chown_tree``)."""
    path = tmp / "user"
    path.mkdir()
    os.chown(path, unpriv_user.uid, unpriv_user.gid)
    return path


#: The test user's subordinate ids (what newuidmap gives its containers).
SUBIDS = (400000, 65536)


def _with_subids(user: User, script: str) -> subprocess.CompletedProcess[str]:
    """``script`` as root of a user namespace mapping the user's subordinate ids."""
    start, count = SUBIDS
    return subprocess.run(
        [
            "unshare",
            "--map-root-user",
            f"--map-users={start},1,{count}",
            f"--map-groups={start},1,{count}",
            "--mount",
            "sh",
            "-ec",
            script,
        ],
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(user),
        cwd="/",
        timeout=120,
    )


@pytest.fixture(scope="session")
def subids(unpriv_user: User) -> tuple[int, int]:
    """Subordinate ids 400000-465535 for the test user in /etc/subuid and /etc/subgid
    (added once, kept: other runs use them too); skipped where newuidmap or user
    namespaces with them are not available.  Returns (start, count)."""
    if shutil.which("newuidmap") is None or shutil.which("unshare") is None:
        pytest.skip("newuidmap/unshare missing (uidmap, util-linux)")
    start, count = SUBIDS
    with open("/etc/subuid") as f:
        have = any(line.startswith(f"{unpriv_user.name}:{start}:") for line in f)
    if not have:
        subprocess.run(
            [
                "usermod",
                "--add-subuids",
                f"{start}-{start + count - 1}",
                "--add-subgids",
                f"{start}-{start + count - 1}",
                unpriv_user.name,
            ],
            check=True,
            capture_output=True,
        )
    probe = _with_subids(unpriv_user, "true")
    if probe.returncode != 0:
        pytest.skip(f"no user namespace with subordinate ids here: {probe.stderr.strip()}")
    return SUBIDS


# --------------------------------------------------------------------------- leak check


@pytest.fixture(scope="session", autouse=True)
def no_leaked_mounts(session_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the run if a mount or a unionfs daemon outlives the tests.

    Looks below this session's scratch dir and pytest's tmp_path base (not the
    whole machine: other work may mount unionfs elsewhere at the same time),
    and also reports any fuse.unionfs mount that appeared anywhere during the
    session.  Leftovers are detached and killed, then the run fails.
    """
    base = tmp_path_factory.getbasetemp()
    before = {(m.mountpoint, m.fstype) for m in support.mounts()}
    yield
    mounts, procs = [], []
    for where in (session_dir, base):
        m, p = _undo_leftovers(where)
        mounts += m
        procs += p
    elsewhere = [
        f"{m.fstype} on {m.mountpoint}"
        for m in support.mounts()
        if m.fstype == "fuse.unionfs" and (m.mountpoint, m.fstype) not in before
    ]
    if mounts or procs or elsewhere:
        msg = (
            f"LEAK: mounts left behind {mounts}, daemons still running {procs},"
            f" new fuse.unionfs mounts elsewhere (maybe not ours) {elsewhere}"
        )
        print(f"\n{msg}", file=sys.stderr)
        assert not mounts and not procs, msg
