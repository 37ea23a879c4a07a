"""A real Debian root filesystem as a two-layer image, imported without root.

The rootfs comes from ``debootstrap --variant=minbase bookworm`` (built once
per machine by tests/debian.py, skipped with the reason when it cannot be).
Layer 1 is the rootfs without ``var``; layer 2 brings ``var``, replaces
``etc/hostname`` and deletes ``etc/issue.net``.  The unprivileged user imports
it and mounts it; every entry it can see through the mount must show the
owner, mode, device numbers, size, mtime and link target that root sees in
the rootfs itself.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import debian
import imagetools as it
import pytest

import support

HOSTNAME = b"unionfs-image\n"


def _strip(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    ti.uname = ti.gname = ""
    return ti


def layer_tar(root: Path, out: Path, keep: Callable[[str], bool], extra=()) -> None:
    """Tar the part of ``root`` that ``keep`` accepts (relative names), plus ``extra``."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            dirnames.sort()
            for name in [*sorted(dirnames), *sorted(filenames)]:
                rel = os.path.normpath(os.path.join(rel_dir, name))
                if keep(rel):
                    tf.add(os.path.join(dirpath, name), arcname=rel, recursive=False, filter=_strip)
        for ti, data in extra:
            tf.addfile(ti, io.BytesIO(data) if data else None)


def make_image(rootfs: Path, dest: Path, compression: str = "none", top_extra=()) -> None:
    """An OCI layout of the two layers, uncompressed (fast to make; gzip is tested elsewhere)."""
    base = dest.parent / "base.tar"
    top = dest.parent / "top.tar"
    layer_tar(rootfs, base, lambda rel: rel != "var" and not rel.startswith("var/"))
    etc = rootfs / "etc"
    etc_ti = tarfile.TarInfo("etc")
    st = etc.lstat()
    etc_ti.type, etc_ti.mode, etc_ti.mtime = tarfile.DIRTYPE, stat.S_IMODE(st.st_mode), st.st_mtime
    host = tarfile.TarInfo("etc/hostname")
    host.size, host.mode, host.mtime = len(HOSTNAME), 0o644, 1700000000
    wh = tarfile.TarInfo("etc/.wh.issue.net")
    layer_tar(
        rootfs,
        top,
        lambda rel: rel == "var" or rel.startswith("var/"),
        [(etc_ti, b""), (host, HOSTNAME), (wh, b""), *top_extra],
    )
    dest.mkdir()
    blobs = dest / "blobs/sha256"
    blobs.mkdir(parents=True)
    descs, diff_ids = [], []
    for path in (base, top):
        diff_ids.append(_sha256_file(path))
        if compression == "gzip":
            with (
                open(path, "rb") as f,
                open(f"{path}.gz", "wb") as out,
                gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as g,
            ):
                shutil.copyfileobj(f, g, 1 << 20)
            os.rename(f"{path}.gz", path)
        digest = _sha256_file(path)
        os.rename(path, blobs / digest.split(":")[1])
        suffix = "+gzip" if compression == "gzip" else ""
        descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar" + suffix,
                "digest": digest,
                "size": (blobs / digest.split(":")[1]).stat().st_size,
            }
        )
    cfg = it.config_for(diff_ids, cfg={"Cmd": ["/bin/bash"], "Env": ["PATH=/usr/bin:/bin"]})
    (blobs / it.sha256(cfg).split(":")[1]).write_bytes(cfg)
    man = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": it.sha256(cfg),
                "size": len(cfg),
            },
            "layers": descs,
        }
    ).encode()
    (blobs / it.sha256(man).split(":")[1]).write_bytes(man)
    it.write_index(
        dest,
        [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": it.sha256(man),
                "size": len(man),
                "annotations": {"org.opencontainers.image.ref.name": "bookworm"},
            }
        ],
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def meta(path: Path, st: os.stat_result) -> tuple:
    kind = stat.S_IFMT(st.st_mode)
    return (
        stat.filemode(st.st_mode),
        st.st_uid,
        st.st_gid,
        st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else None,
        None if kind == stat.S_IFDIR else st.st_size,
        None if kind == stat.S_IFDIR else st.st_nlink,
        int(st.st_mtime),
        os.readlink(path) if kind == stat.S_IFLNK else None,
    )


def walk(root: Path) -> tuple[dict[str, tuple], list[str]]:
    """Metadata of every entry reachable below ``root``, and the dirs it could not list."""
    out, closed = {}, []
    stack = [""]
    while stack:
        rel = stack.pop()
        d = root / rel if rel else root
        try:
            names = os.listdir(d)
        except PermissionError:
            closed.append(rel)
            continue
        for n in names:
            r = f"{rel}/{n}" if rel else n
            st = os.lstat(d / n)
            out[r] = meta(d / n, st)
            if stat.S_ISDIR(st.st_mode):
                stack.append(r)
    return out, closed


@pytest.fixture(scope="module")
def rootfs() -> Path:
    path, why = debian.rootfs()
    if path is None:
        pytest.skip(why)
    return path


def test_debian_rootfs_as_a_rootless_image(
    rootfs: Path, tmp: Path, unpriv_user, unpriv_tmp: Path, unionfs, monkeypatch
) -> None:
    image = unpriv_tmp / "bookworm"
    make_image(rootfs, image)
    support.chown_tree(image, unpriv_user.uid, unpriv_user.gid)
    store = unpriv_tmp / "store"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "unionfs.command",
            "image",
            "--store",
            str(store),
            "import",
            str(image),
            "debian:bookworm",
        ],
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(unpriv_user),
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("UNIONFS_STORE", str(store))
    mnt = unpriv_tmp / "mnt"
    mnt.mkdir()
    os.chown(mnt, unpriv_user.uid, unpriv_user.gid)
    unionfs(["image:debian:bookworm"], mnt=mnt, user=unpriv_user)

    seen, closed = support.run_as(unpriv_user, walk, mnt)
    want, _ = walk(rootfs)
    want.pop("etc/issue.net")
    want["etc/hostname"] = ("-rw-r--r--", 0, 0, None, len(HOSTNAME), 1, 1700000000, None)
    wrong = [(p, seen[p], want.get(p)) for p in sorted(seen) if seen[p] != want.get(p)]
    assert wrong == [], wrong[:10]
    # What the user did not see is below directories the image closes to it.
    unseen = [p for p in want if p not in seen]
    assert all(any(p.startswith(c + "/") for c in closed) for p in unseen), unseen[:10]
    assert len(seen) > 4000 and len(unseen) < len(seen) // 10
    # What ls -l shows, as the issue asks: root owners, setuid bits, devices.
    ls = subprocess.run(
        ["ls", "-ln", str(mnt / "usr/bin/su"), str(mnt / "etc/shadow")],
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(unpriv_user),
        check=True,
    ).stdout.splitlines()
    assert ls[0].split()[:4] == ["-rw-r-----", "1", "0", "42"]
    assert ls[1].split()[:4] == ["-rwsr-xr-x", "1", "0", "0"]
    devs = [p for p, m in seen.items() if m[0][0] in "cb"]
    if any(m[0][0] in "cb" for m in want.values()):
        assert devs, "the rootfs has device nodes and the mount shows none"
    # A real program reads the image: dpkg's database through the mount.
    q = subprocess.run(
        ["dpkg-query", f"--admindir={mnt}/var/lib/dpkg", "-W", "-f", "${Package}\n"],
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(unpriv_user),
    )
    assert q.returncode == 0, q.stderr
    assert "base-files" in q.stdout.split() and len(q.stdout.split()) > 50
