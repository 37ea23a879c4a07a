"""Session fixtures: an unprivileged user, world-traversable scratch dirs, leak checks."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from support import User

TEST_USER = "unionfs-test"


def _leftover_mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [line.strip() for line in f if " fuse.unionfs " in line]


@pytest.fixture(scope="session", autouse=True)
def no_leaked_mounts():
    """Fail the run if any test left a unionfs mount behind."""
    before = set(_leftover_mounts())
    yield
    leaked = [m for m in _leftover_mounts() if m not in before]
    for line in leaked:
        subprocess.run(["fusermount3", "-uz", line.split()[1]], capture_output=True)
    assert not leaked, f"tests left mounts behind: {leaked}"


@pytest.fixture(scope="session")
def unpriv_user():
    """An unprivileged user that mounts through setuid fusermount3.

    Created when missing (as root); /dev/fuse is made 0666, as distributions
    ship it, for the session and restored afterwards.
    """
    if os.geteuid() != 0:
        pytest.skip("creating a user needs root")
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", TEST_USER], check=True
        )
        pw = pwd.getpwnam(TEST_USER)
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    try:
        yield User(TEST_USER, pw.pw_uid, grp.getgrgid(pw.pw_gid).gr_gid)
    finally:
        os.chmod("/dev/fuse", mode)


@pytest.fixture
def world_tmp():
    """A scratch dir every user can traverse (pytest's own are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="unionfs-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for line in _leftover_mounts():
            if line.split()[1].startswith(str(path)):
                subprocess.run(["fusermount3", "-uz", line.split()[1]], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
