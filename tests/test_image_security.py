"""Ownership metadata never gives root: what the host kernel enforces stays real.

An override (``user.containers.override_stat``) is data that any owner of a
file can write.  These tests are the review's reproducers (findings 1-3):
a user's own directory dressed up as a root-owned image with a setuid copy
of ``id``, mounted by root (also with ``suid,dev``, as mount(8) passes them)
and by the user; the user must never get euid 0 from it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import support


def _dressed_lower(user, base: Path) -> Path:
    """The reviewer's lower: the user's own dir whose root and ``id`` copy claim root."""
    lower = base / "alice"
    lower.mkdir()
    shutil.copy2("/usr/bin/id", lower / "id")
    support.chown_tree(lower, user.uid, user.gid)

    def dress() -> None:
        os.setxattr(lower, b"user.containers.override_stat", b"0:0:040755")
        os.setxattr(lower / "id", b"user.containers.override_stat", b"0:0:0104755")

    support.run_as(user, dress)  # done as the user: no privilege is needed to write them
    return lower


def _euid_through(mnt: Path, user) -> str:
    r = subprocess.run(
        [str(mnt / "id"), "-u"],
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(user),
        check=True,
    )
    return r.stdout.strip()


def _shown(mnt: Path, user) -> tuple[str, str]:
    r = subprocess.run(
        ["stat", "-c", "%A %u", str(mnt / "id")],
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(user),
        check=True,
    )
    mode, uid = r.stdout.split()
    return mode, uid


@pytest.mark.parametrize("opts", [(), ("suid", "dev")])
def test_root_mount_ignores_overrides_by_default(
    unpriv_user, unpriv_tmp: Path, unionfs, opts: tuple[str, ...]
) -> None:
    lower = _dressed_lower(unpriv_user, unpriv_tmp)
    m = unionfs([lower], opts=opts)
    assert _shown(m.mnt, unpriv_user) == ("-rwxr-xr-x", str(unpriv_user.uid))
    assert _euid_through(m.mnt, unpriv_user) == str(unpriv_user.uid)


def test_root_mount_opting_in_is_nosuid_nodev(unpriv_user, unpriv_tmp: Path, unionfs) -> None:
    lower = _dressed_lower(unpriv_user, unpriv_tmp)
    m = unionfs([lower], opts=("suid", "dev", "xattr_permissions=2"))
    assert _shown(m.mnt, unpriv_user) == ("-rwsr-xr-x", "0")  # asked for: presented
    flags = os.statvfs(m.mnt).f_flag
    assert flags & os.ST_NOSUID and flags & os.ST_NODEV
    assert _euid_through(m.mnt, unpriv_user) == str(unpriv_user.uid)


def test_root_mount_with_squash_is_nosuid(unpriv_user, unpriv_tmp: Path, unionfs) -> None:
    # squash_to_root shows the user's own u+s file as setuid root.
    lower = unpriv_tmp / "plain"
    lower.mkdir()
    shutil.copy2("/usr/bin/id", lower / "id")
    support.chown_tree(lower, unpriv_user.uid, unpriv_user.gid)
    os.chmod(lower / "id", 0o4755)
    m = unionfs([lower], opts=("suid", "squash_to_root"))
    assert _shown(m.mnt, unpriv_user) == ("-rwsr-xr-x", "0")
    assert _euid_through(m.mnt, unpriv_user) == str(unpriv_user.uid)


def test_rootless_mount_keeps_presenting_overrides(unpriv_user, unpriv_tmp: Path, unionfs) -> None:
    lower = _dressed_lower(unpriv_user, unpriv_tmp)
    mnt = unpriv_tmp / "mnt"
    mnt.mkdir()
    os.chown(mnt, unpriv_user.uid, unpriv_user.gid)
    m = unionfs([lower], mnt=mnt, user=unpriv_user)
    assert _shown(m.mnt, unpriv_user) == ("-rwsr-xr-x", "0")  # today's automatic rule
    assert _euid_through(m.mnt, unpriv_user) == str(unpriv_user.uid)  # fusermount3: nosuid


# -- finding 2: a store root writes into is private ------------------------------------

SUID_LAYER = [
    {"name": "bin", "type": "dir"},
    {"name": "bin/su", "type": "file", "data": b"#!/bin/sh\n", "mode": 0o4755},
    {"name": "dev", "type": "dir"},
    {"name": "dev/sda", "type": "block", "major": 8, "minor": 0, "mode": 0o666},
]


def _reachable_by(user, path: Path) -> bool:
    def probe() -> bool:
        try:
            os.lstat(path)
        except PermissionError:
            return False
        return True

    return support.run_as(user, probe)


def test_root_store_is_private(tmp: Path, unpriv_user) -> None:
    import imagetools as it
    from test_images import run_cli

    it.make_layout(tmp / "oci", [SUID_LAYER])
    os.chmod(tmp, 0o755)
    store = tmp / "shared"
    r = run_cli("import", "-q", str(tmp / "oci"), "s", store=store)
    assert r.returncode == 0, r.stderr
    layers = store / "layers"
    assert layers.stat().st_mode & 0o777 == 0o700
    assert (store / "tmp").stat().st_mode & 0o777 == 0o700
    (su,) = layers.glob("sha256/*/diff/bin/su")
    assert su.stat().st_mode & 0o4000 and su.stat().st_uid == 0  # real, as root imports
    assert not _reachable_by(unpriv_user, su)
    assert not _reachable_by(unpriv_user, su.parent.parent / "dev/sda")


def test_root_store_with_wider_modes_is_tightened(tmp: Path, unpriv_user) -> None:
    import imagetools as it
    from test_images import run_cli

    it.make_layout(tmp / "oci", [SUID_LAYER])
    os.chmod(tmp, 0o755)
    store = tmp / "old"
    (store / "layers").mkdir(parents=True)
    os.chmod(store, 0o755)
    os.chmod(store / "layers", 0o755)
    r = run_cli("import", "-q", str(tmp / "oci"), "s", store=store)
    assert r.returncode == 0, r.stderr
    assert "made 0700" in r.stderr
    assert (store / "layers").stat().st_mode & 0o777 == 0o700
    (su,) = (store / "layers").glob("sha256/*/diff/bin/su")
    assert not _reachable_by(unpriv_user, su)


def test_root_refuses_a_store_a_user_owns(tmp: Path, unpriv_user) -> None:
    import imagetools as it
    from test_images import run_cli

    it.make_layout(tmp / "oci", [SUID_LAYER])
    store = tmp / "users"
    (store / "layers").mkdir(parents=True)
    support.chown_tree(store, unpriv_user.uid, unpriv_user.gid)
    r = run_cli("import", "-q", str(tmp / "oci"), "s", store=store)
    assert r.returncode == 1
    assert "root imports only into a store root owns" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not list((store / "layers").iterdir())


# -- finding 3: image rm / gc keep the layers of a mounted image ------------------------


@pytest.mark.parametrize("foreground", [True, False])
def test_rm_of_a_mounted_image_keeps_its_layers(
    tmp: Path, unionfs, monkeypatch: pytest.MonkeyPatch, foreground: bool
) -> None:
    import imagetools as it
    from test_images import run_cli

    layer = [{"name": "a", "type": "file", "data": b"payload\n"}]
    it.make_layout(tmp / "oci", [layer])
    store = tmp / "store"
    assert run_cli("import", "-q", str(tmp / "oci"), "big", store=store).returncode == 0
    monkeypatch.setenv("UNIONFS_STORE", str(store))
    (tmp / "up").mkdir()
    m = unionfs(["image:big"], tmp / "up", foreground=foreground)
    r = run_cli("rm", "big", store=store)
    assert r.returncode == 0, r.stderr
    assert "removed big:latest" in r.stdout
    assert "1 unused layers kept: mounted" in r.stdout
    assert (m.mnt / "a").read_bytes() == b"payload\n"  # the reviewer saw ENOENT here
    assert run_cli("ls", "--json", store=store).stdout.strip() == "[]"  # the name is gone
    r = run_cli("gc", store=store)
    assert "0 layers removed" in r.stdout and "kept: mounted" in r.stdout
    m.close()
    r = run_cli("gc", store=store)
    assert "1 layers removed" in r.stdout, r.stdout
    assert not list((store / "layers/sha256").iterdir())
