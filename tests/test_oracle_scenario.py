"""A package-manager-like session on a small root filesystem, against kernel overlayfs.

The lower is a little Debian-like tree (real ELF binaries, symlinks, hard
links, a setuid file, config files, a second layer with a whiteout); the
session unpacks a tarball, edits files the way sed -i and dpkg do (write a
temporary, rename over), deletes and renames directories, changes owners
and modes, all with the real tools.  Both mounts must end in the same view,
unionfs must show it again after a remount, and the kernel must show it
from the upper unionfs wrote.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from support import diff_snapshots, kernel_overlay, snapshot, unionfs_mount

pytestmark = [
    pytest.mark.oracle,
    pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlayfs needs root"),
]

BINARIES = ["/bin/ls", "/bin/cat", "/usr/bin/env", "/bin/sed", "/bin/tar"]


def build_rootfs(base: Path) -> list[Path]:
    base_layer, app_layer = base / "base", base / "app"
    for sub in (
        "bin",
        "etc",
        "usr/bin",
        "usr/lib/old",
        "usr/share/doc/pkg",
        "var/lib/dpkg",
        "etc/skel",
    ):
        (base_layer / sub).mkdir(parents=True, exist_ok=True)
    for b in BINARIES:
        if os.path.exists(b):
            shutil.copy2(b, base_layer / "usr/bin" / os.path.basename(b))
    os.symlink("usr/bin", base_layer / "sbin")
    os.symlink("cat", base_layer / "usr/bin/dog")
    os.link(base_layer / "usr/bin/ls", base_layer / "usr/bin/dir")
    (base_layer / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (base_layer / "etc/hostname").write_text("base\n")
    (base_layer / "etc/skel/.profile").write_text("# profile\n")
    (base_layer / "usr/lib/old/libold.so").write_bytes(b"\x7fELF" + b"\0" * 1000)
    (base_layer / "usr/lib/old/README").write_text("old\n")
    (base_layer / "usr/share/doc/pkg/copyright").write_text("MIT\n")
    (base_layer / "var/lib/dpkg/status").write_text("Package: base\n")
    su = base_layer / "usr/bin/su"
    su.write_bytes(b"\x7fELF" + b"\1" * 100)
    os.chmod(su, 0o4755)
    os.chown(base_layer / "etc/skel/.profile", 1000, 1000)
    # The app layer overrides and deletes a few things.
    (app_layer / "etc").mkdir(parents=True)
    (app_layer / "etc/hostname").write_text("app\n")
    (app_layer / "usr/share/doc").mkdir(parents=True)
    os.mknod(app_layer / "usr/share/doc/pkg", stat.S_IFCHR, 0)  # whiteout
    (app_layer / "opt/app").mkdir(parents=True)
    (app_layer / "opt/app/run").write_text("#!/bin/sh\necho app\n")
    os.chmod(app_layer / "opt/app/run", 0o755)
    return [app_layer, base_layer]


def make_package(path: Path, src: Path) -> None:
    """A tarball of a new package, with the shapes tar has to restore."""
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/share/tool").mkdir(parents=True)
    (src / "etc").mkdir()
    (src / "usr/bin/tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(src / "usr/bin/tool", 0o755)
    os.link(src / "usr/bin/tool", src / "usr/bin/tool2")
    os.symlink("tool", src / "usr/bin/t")
    (src / "usr/share/tool/data").write_bytes(os.urandom(50_000))
    (src / "etc/tool.conf").write_text("setting=1\n")
    os.chown(src / "etc/tool.conf", 123, 456)
    os.utime(src / "etc/tool.conf", (1_000_000, 1_000_000))
    with tarfile.open(path, "w") as tar:
        tar.add(src, arcname=".")


def session(root: Path, package: Path) -> None:
    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, cwd=root)

    sh("tar", "-xpf", str(package), "--same-owner")
    sh("sed", "-i", "s/root/toor/", "etc/passwd")
    (root / "etc/hostname.new").write_text("configured\n")
    os.rename(root / "etc/hostname.new", root / "etc/hostname")
    with open(root / "var/lib/dpkg/status", "a") as f:
        f.write("Package: tool\n")
    sh("rm", "-rf", "usr/lib/old")
    sh("mkdir", "-p", "usr/lib/new")
    sh("cp", "-a", "usr/bin/cat", "usr/lib/new/cat-copy")
    sh("mv", "usr/share/tool", "usr/share/tool-data")
    sh("mv", "opt/app", "opt/app2")
    sh("chmod", "-R", "go-w", "usr/bin")
    sh("chown", "-R", "42:42", "etc/skel")
    sh("ln", "-sf", "tool2", "usr/bin/t")
    sh("touch", "-d", "2001-02-03", "usr/bin/dir")
    sh("rm", "usr/bin/dog")
    os.mkdir(root / "usr/share/doc/pkg")  # re-created over the whiteout
    (root / "usr/share/doc/pkg/NEWS").write_text("news\n")


def test_package_session_matches_kernel(tmp_path):
    lowers = build_rootfs(tmp_path / "layers")
    package = tmp_path / "pkg.tar"
    make_package(package, tmp_path / "pkgsrc")
    for d in ("k-up", "k-work", "k-mnt", "u-up", "u-mnt", "k2-work", "k2-mnt"):
        (tmp_path / d).mkdir()

    with kernel_overlay(lowers, tmp_path / "k-up", tmp_path / "k-work", tmp_path / "k-mnt"):
        session(tmp_path / "k-mnt", package)
        expected = snapshot(tmp_path / "k-mnt")
    with unionfs_mount(lowers, tmp_path / "u-up", tmp_path / "u-mnt"):
        session(tmp_path / "u-mnt", package)
        got = snapshot(tmp_path / "u-mnt")
        assert (
            subprocess.run([tmp_path / "u-mnt/usr/bin/ls", "/"], capture_output=True).returncode
            == 0
        )
    assert not diff_snapshots(expected, got), diff_snapshots(expected, got)
    with unionfs_mount(lowers, tmp_path / "u-up", tmp_path / "u-mnt"):
        again = snapshot(tmp_path / "u-mnt")
    assert not diff_snapshots(expected, again), diff_snapshots(expected, again)
    shutil.rmtree(tmp_path / ".u-up.unionfs-work")  # handing the upper over (README)
    with kernel_overlay(lowers, tmp_path / "u-up", tmp_path / "k2-work", tmp_path / "k2-mnt"):
        by_kernel = snapshot(tmp_path / "k2-mnt")
    assert not diff_snapshots(expected, by_kernel), diff_snapshots(expected, by_kernel)
    assert "usr/share/tool-data/data" in got and "usr/lib/old" not in got
