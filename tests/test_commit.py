"""``unionfs commit`` and ``unionfs image export`` against skopeo, umoci and a second mount.

A small image is built with the standard library (tests/imagetools.py) and
imported; ``image:NAME`` is mounted with an upper and changed by real
programs (a shell's rm/mv/chmod/ln, sqlite3); after the unmount:

- ``unionfs commit`` makes a new image whose mount by name shows exactly the
  merged view the old mount showed;
- ``unionfs image export`` writes it as an OCI layout that ``skopeo inspect``
  and ``umoci unpack --rootless`` accept (the unpacked rootfs is the merged
  view, ownership aside), a docker-archive and an oci-archive that skopeo
  accepts; a second export gives the same digests and bytes;
- bad input is one line on stderr and leaves the store and the output as
  they were.

All of it as root and as the unprivileged user (a store of the user's own,
ownership kept as metadata).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import imagetools as it
import pytest

from support import User, as_user, chown_tree, diff_snapshots, run_as, snapshot

BASE = [
    {"name": "etc", "type": "dir"},
    {"name": "etc/passwd", "type": "file", "data": b"root:x:0:0::/root:/bin/sh\n"},
    {"name": "etc/old.conf", "type": "file", "data": b"old\n"},
    {"name": "bin", "type": "dir"},
    {"name": "bin/tool", "type": "file", "data": b"#!/bin/sh\necho tool\n", "mode": 0o4755},
    {"name": "bin/tool2", "type": "link", "target": "bin/tool"},
    {"name": "bin/sh-link", "type": "symlink", "target": "tool"},
    {"name": "opt", "type": "dir"},
    {"name": "opt/a", "type": "file", "data": b"a"},
    {"name": "opt/sub", "type": "dir"},
    {"name": "opt/sub/deep", "type": "file", "data": b"deep"},
    {"name": "srv", "type": "dir"},
    {"name": "srv/data", "type": "file", "data": b"data\n" * 100},
    {"name": "home", "type": "dir"},
    {"name": "home/user", "type": "dir", "uid": 1000, "gid": 1000, "mode": 0o755},
    {"name": "home/user/notes", "type": "file", "data": b"n", "uid": 1000, "gid": 1000},
]
TOP = [
    {"name": "etc/.wh.old.conf", "type": "file"},
    {"name": "etc/new.conf", "type": "file", "data": b"new\n", "xattrs": {"user.test": "v"}},
    {"name": "var", "type": "dir"},
    {"name": "var/log", "type": "file", "data": b"log\n"},
]

#: What the container "does": every kind of change an upper can hold.
SCRIPT = """
set -e
rm etc/passwd
echo changed > etc/new.conf
mv opt/sub srv/moved
rm -rf var && mkdir var && echo fresh > var/only
chmod 0600 srv/data
chmod 0750 bin
ln bin/tool bin/tool3
ln -s ../srv/data etc/data-link
mkfifo srv/fifo
mkdir -p app/db
sqlite3 app/db/test.db 'create table t(x); insert into t values (1), (2);'
sqlite3 app/db/test.db 'update t set x = 3 where x = 1;'
rm home/user/notes
"""


def run_unionfs(
    *args: str, store: Path, user: User | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, UNIONFS_STORE=str(store), SOURCE_DATE_EPOCH="1700000000")
    return subprocess.run(
        [sys.executable, "-m", "unionfs.command", *args],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=as_user(user) if user else None,
        cwd="/",
    )


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, r.stderr
    return r


def one_line_error(r: subprocess.CompletedProcess[str], words: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


def tree_of(root: Path) -> dict[str, tuple[str, int]]:
    """Every path below ``root`` with its type and size: "changed nothing" checks."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (oct(st.st_mode), st.st_size)
    return out


def view(root: Path, *, exclude: tuple[str, ...] = ()) -> dict:
    """The snapshot compared everywhere: user.test xattrs only (umoci --rootless adds
    user.rootlesscontainers, which is ownership metadata, not content)."""
    return snapshot(root, exclude=exclude, xattr_prefixes=("user.test",))


@pytest.fixture
def env(request: pytest.FixtureRequest, tmp: Path, monkeypatch: pytest.MonkeyPatch):
    """(work dir, store, user or None): parametrized as root and as the test user."""
    user = request.getfixturevalue("unpriv_user") if request.param == "user" else None
    if request.param == "root" and os.geteuid() != 0:
        pytest.skip("as root")
    work = tmp / "w"
    work.mkdir()
    if user is not None:
        os.chown(work, user.uid, user.gid)
    store = work / "store"
    monkeypatch.setenv("UNIONFS_STORE", str(store))  # the daemon resolves image:NAME there
    return work, store, user


def mapping(user: User) -> list[str]:
    """unionfs run's options: disk id 0 (the image's root) and the user's own show as the user."""
    u, g = user.uid, user.gid
    return [f"uidmapping={u}:0:1:{u}:{u}:1", f"gidmapping={g}:0:1:{g}:{g}:1"]


def _sh(user: User | None, script: str, cwd: Path) -> None:
    """Run a shell script in ``cwd`` as ``user`` (cd'ing as the user: root cannot enter
    a user's FUSE mount, and subprocess's cwd= changes directory before dropping ids)."""
    r = subprocess.run(
        ["sh", "-c", f'cd "$1" && {script}', "sh", str(cwd)],
        cwd="/",
        capture_output=True,
        text=True,
        preexec_fn=as_user(user) if user else None,
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
@pytest.mark.parametrize("env", ["root", "user"], indirect=True)
def test_commit_and_export_round_trip(env, unionfs) -> None:
    work, store, user = env
    src = work / "src"
    it.make_layout(src, [BASE, TOP], tag="base")
    if user is not None:
        chown_tree(src, user.uid, user.gid)
    ok(run_unionfs("image", "import", "-q", str(src), "base:1", store=store, user=user))

    upper = work / "upper"
    upper.mkdir()
    if user is not None:
        os.chown(upper, user.uid, user.gid)
    # As the user, the image's root shows as the user (as under 'unionfs run'), so that
    # the programs may change what root owns; home/user (uid 1000) stays out of reach.
    opts = [] if user is None else mapping(user)
    script = SCRIPT if user is None else SCRIPT.replace("rm home/user/notes", "")
    m = unionfs(["image:base:1"], upper, opts=opts, user=user)
    _sh(user, script, m.mnt)
    before = run_as(user, view, m.mnt)
    m.close()
    assert "etc/passwd" not in before and "srv/moved/deep" in before
    assert "var/log" not in before and "app/db/test.db" in before

    r = ok(
        run_unionfs(
            "commit", "--json", "-m", "the test", str(upper), "new:2", store=store, user=user
        )
    )
    doc = json.loads(r.stdout)
    assert doc["ref"] == "new:2" and len(doc["diff_ids"]) == 3
    rec = json.loads(ok(run_unionfs("image", "inspect", "new:2", store=store, user=user)).stdout)
    config = rec["image_config"]
    assert config["rootfs"]["diff_ids"] == doc["diff_ids"]
    assert config["history"][-1]["comment"] == "the test"
    assert config["history"][-1]["created"] == "2023-11-14T22:13:20Z"  # SOURCE_DATE_EPOCH
    layer = rec["manifest"]["layers"][-1]
    assert layer["mediaType"].endswith("tar+gzip") and layer["digest"] == doc["layer"]["digest"]

    # The new image, mounted by name (no upper), shows the old merged view.
    m2 = unionfs(["image:new:2"], opts=opts, user=user)
    after = run_as(user, view, m2.mnt)
    m2.close()
    problems = diff_snapshots(before, after, ("old mount", "new image"))
    assert problems == [], "\n".join(problems)

    # OCI layout: skopeo and umoci accept it, umoci's rootfs is the merged view.
    out = work / "out"
    e1 = json.loads(
        ok(
            run_unionfs(
                "image", "export", "--json", "new:2", "-o", str(out), store=store, user=user
            )
        ).stdout
    )
    info = json.loads(
        ok(
            subprocess.run(["skopeo", "inspect", f"oci:{out}:2"], capture_output=True, text=True)
        ).stdout
    )
    assert info["Digest"] == e1["manifest"] and len(info["Layers"]) == 3
    bundle = work / "bundle"
    ok(
        subprocess.run(
            ["umoci", "unpack", "--rootless", "--image", f"{out}:2", str(bundle)],
            capture_output=True,
            text=True,
        )
    )
    # ownership aside (umoci --rootless owns everything); nlink: bin/tool3 links
    # bin/tool whose lower inode keeps bin/tool2 too, which only a union counts.
    aside = ("uid", "gid", "nlink")
    theirs = view(bundle / "rootfs", exclude=aside)
    assert diff_snapshots(snapshot_without(before, aside), theirs, ("mount", "umoci")) == []

    # The new layer as a tar: owners and set-id bits as the image has them (a rootless
    # mount keeps them as metadata), the deletions as .wh. entries.
    top = e1["layers"][-1]
    blob = out / "blobs/sha256" / top["digest"].split(":", 1)[1]
    with tarfile.open(blob) as t:
        entries = {m.name: m for m in t.getmembers()}
    assert entries["bin/tool"].mode == 0o4755 and entries["bin/tool"].uid == 0
    assert entries["bin/tool3"].islnk() or entries["bin/tool"].islnk()
    assert "etc/.wh.passwd" in entries and "var/.wh..wh..opq" in entries
    assert not any("override" in k for m in entries.values() for k in m.pax_headers)
    # The re-tarred layer is the one commit streamed into the store.
    assert top["diffID"] == doc["diff_ids"][-1]

    # Twice: the same digests, the same bytes.
    out2 = work / "out2"
    e2 = json.loads(
        ok(
            run_unionfs(
                "image", "export", "--json", "new:2", "-o", str(out2), store=store, user=user
            )
        ).stdout
    )
    assert {k: v for k, v in e1.items() if k != "output"} == {
        k: v for k, v in e2.items() if k != "output"
    }
    assert (out / "index.json").read_bytes() == (out2 / "index.json").read_bytes()

    # The archives.
    for fmt, transport in (("docker-archive", "docker-archive"), ("oci-archive", "oci-archive")):
        path = work / f"image.{fmt}.tar"
        e = json.loads(
            ok(
                run_unionfs(
                    "image",
                    "export",
                    "--json",
                    "--format",
                    fmt,
                    "new:2",
                    "-o",
                    str(path),
                    store=store,
                    user=user,
                )
            ).stdout
        )
        r = ok(
            subprocess.run(
                ["skopeo", "inspect", f"{transport}:{path}"], capture_output=True, text=True
            )
        )
        info = json.loads(r.stdout)
        assert len(info["Layers"]) == 3
        assert [x["diffID"] for x in e["layers"]] == [x["diffID"] for x in e1["layers"]]
        again = work / f"again.{fmt}.tar"
        ok(
            run_unionfs(
                "image",
                "export",
                "--format",
                fmt,
                "new:2",
                "-o",
                str(again),
                store=store,
                user=user,
            )
        )
        assert path.read_bytes() == again.read_bytes()
        # and it imports back as the same tree
        ok(run_unionfs("image", "import", "-q", str(path), f"back-{fmt}:1", store=store, user=user))
        m3 = unionfs([f"image:back-{fmt}:1"], opts=opts, user=user)
        back = run_as(user, view, m3.mnt)
        m3.close()
        assert diff_snapshots(before, back, ("old mount", fmt)) == []


def snapshot_without(snap: dict, fields: tuple[str, ...]) -> dict:
    from support import FIELDS

    drop = {FIELDS.index(f) for f in fields}
    return {k: tuple(None if i in drop else x for i, x in enumerate(v)) for k, v in snap.items()}


def test_bad_input_is_one_line_and_changes_nothing(tmp: Path, monkeypatch) -> None:
    store = tmp / "store"
    src = tmp / "src"
    it.make_layout(src, [BASE], tag="base")
    ok(run_unionfs("image", "import", "-q", str(src), "base:1", store=store))
    exists = tmp / "exists"
    exists.mkdir()
    (exists / "keep").write_text("mine")
    before_store, before_tmp = tree_of(store), tree_of(tmp)

    one_line_error(
        run_unionfs("image", "export", "nope", "-o", str(tmp / "o"), store=store), "no image"
    )
    one_line_error(
        run_unionfs("image", "export", "base:1", "-o", str(exists), store=store), "already exists"
    )
    one_line_error(
        run_unionfs("image", "export", "base:1", "-o", str(tmp / "no/such/dir"), store=store),
        "no such directory",
    )
    # an upper without a recorded stack, and lowers that are no store image
    upper = tmp / "upper"
    upper.mkdir()
    one_line_error(run_unionfs("commit", str(upper), "x:1", store=store), "no lower stack")
    one_line_error(
        run_unionfs("commit", "--lower", str(src), str(upper), "x:1", store=store),
        "not the layers of an image",
    )
    one_line_error(run_unionfs("commit", "no-such-ctr", "x:1", store=store), "not a directory")
    upper.rmdir()
    assert tree_of(store) == before_store and tree_of(tmp) == before_tmp


def test_unwritable_output_as_the_user(tmp: Path, unpriv_user: User) -> None:
    store = tmp / "store"
    src = tmp / "src"
    it.make_layout(src, [BASE], tag="base")
    tmp.chmod(0o755)
    chown_tree(src, unpriv_user.uid, unpriv_user.gid)
    os.chown(tmp, 0, 0)
    store.mkdir()
    os.chown(store, unpriv_user.uid, unpriv_user.gid)
    ok(run_unionfs("image", "import", "-q", str(src), "base:1", store=store, user=unpriv_user))
    before = tree_of(tmp)
    one_line_error(
        run_unionfs(
            "image", "export", "base:1", "-o", str(tmp / "o"), store=store, user=unpriv_user
        ),
        "not writable",
    )
    assert tree_of(tmp) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="as root")
def test_commit_a_container_by_name(tmp: Path, unionfs, monkeypatch) -> None:
    """A CONTAINER argument is ``unionfs run``'s container dir (containers_root()/NAME):
    its upper, the stack its mount recorded in its work dir, and its recorded image."""
    store = tmp / "store"
    monkeypatch.setenv("UNIONFS_STORE", str(store))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp / "data"))
    src = tmp / "src"
    it.make_layout(src, [BASE, TOP], tag="base")
    ok(run_unionfs("image", "import", "-q", str(src), "base:1", store=store))
    cdir = tmp / "data/unionfs/containers/ctr1"
    (cdir / "upper").mkdir(parents=True)
    (cdir / "work").mkdir()
    (cdir / "container.json").write_text(json.dumps({"image": "base:1"}))
    m = unionfs(["image:base:1"], cdir / "upper", opts=[f"workdir={cdir / 'work'}"])
    _sh(None, "echo hi > hello && rm etc/new.conf", m.mnt)
    before = view(m.mnt)
    m.close()
    r = ok(run_unionfs("commit", "--json", "ctr1", "fromctr", store=store))
    assert json.loads(r.stdout)["ref"] == "fromctr:latest"
    m2 = unionfs(["image:fromctr"])
    assert diff_snapshots(before, view(m2.mnt)) == []
