"""Importing images into the layer store: every layout, verification, sharing, gc.

Images are built here with the standard library (tests/imagetools.py); skopeo
and umoci, where installed, check that they are real images and make a real
docker-archive for us to import.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imagetools as it
import pytest

from unionfs.image import Store, StoreError
from unionfs.oci.layout import ImageError, Platform

BASE = [
    {"name": "etc", "type": "dir"},
    {"name": "etc/passwd", "type": "file", "data": b"root:x:0:0::/root:/bin/sh\n"},
    {"name": "etc/old.conf", "type": "file", "data": b"old\n"},
    {"name": "bin", "type": "dir"},
    {"name": "bin/tool", "type": "file", "data": b"#!/bin/sh\necho tool\n", "mode": 0o4755},
    {"name": "bin/tool2", "type": "link", "target": "bin/tool"},
    {"name": "opt/a", "type": "file", "data": b"a"},
    {"name": "home/user", "type": "dir", "uid": 1000, "gid": 1000, "mode": 0o700},
]
TOP = [
    {"name": "etc/.wh.old.conf", "type": "file"},
    {"name": "etc/new.conf", "type": "file", "data": b"new\n", "xattrs": {"user.test": "v"}},
    {"name": "opt/.wh..wh..opq", "type": "file"},
    {"name": "opt/b", "type": "file", "data": b"b"},
]


def run_cli(*args: str, store: Path, user=None) -> subprocess.CompletedProcess[str]:
    from support import as_user

    env = dict(os.environ, UNIONFS_STORE=str(store))
    return subprocess.run(
        [sys.executable, "-m", "unionfs.command", "image", *args],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=as_user(user) if user else None,
        cwd="/",
    )


def tree(root: Path) -> list[tuple[str, str, int]]:
    """(path, type, size) of everything below ``root``: a store "as it was"."""
    out = []
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        kind = "d" if p.is_dir() and not p.is_symlink() else ("l" if p.is_symlink() else "f")
        out.append((str(p.relative_to(root)), kind, 0 if kind == "d" else st.st_size))
    return out


def check_layers(img, store: Store) -> None:
    """The two test layers, extracted as the tars say."""
    assert len(img.layers) == 2
    top, base = (Path(p) for p in img.layers)
    assert (base / "etc/passwd").read_bytes().startswith(b"root:x:0:0")
    assert os.stat(base / "bin/tool").st_ino == os.stat(base / "bin/tool2").st_ino
    assert (top / "etc/.wh.old.conf").exists()
    assert (top / "opt/.wh..wh..opq").exists()
    assert (top / "opt/b").read_bytes() == b"b"
    assert os.getxattr(top / "etc/new.conf", "user.test") == b"v"
    assert img.config["Cmd"] == ["/bin/sh"]


@pytest.fixture
def store(tmp: Path) -> Store:
    return Store.open(str(tmp / "store"))


# -- every layout ------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_oci_layout(tmp: Path, store: Store, compression: str) -> None:
    it.make_layout(tmp / "oci", [BASE, TOP], compression=compression)
    img = store.import_image(str(tmp / "oci"), "app:1")
    check_layers(img, store)
    assert store.layer_info(img.diff_ids[0])["compression"] == compression
    assert store.image("app:1").layers == img.layers


def test_oci_archive_named_from_the_layout(tmp: Path, store: Store) -> None:
    it.make_layout(tmp / "oci", [BASE, TOP], tag="v2")
    it.tar_dir(tmp / "oci", tmp / "oci.tar")
    # ref.name 'v2' is a tag (skopeo, umoci): not a name, so one must be given.
    with pytest.raises(ImageError, match="names only the tag 'v2': give a NAME"):
        store.import_image(str(tmp / "oci.tar"))
    assert store.images() == []
    img = store.import_image(str(tmp / "oci.tar"), "app:v2")
    check_layers(img, store)
    # A full reference in ref.name names the image.
    it.make_layout(tmp / "named", [BASE, TOP], tag="localhost/app:v3")
    assert store.import_image(str(tmp / "named")).ref == "localhost/app:v3"


@pytest.mark.parametrize("style", ["legacy", "hybrid", "hybrid-gzip", "skopeo"])
def test_docker_save_layouts(tmp: Path, store: Store, style: str) -> None:
    diff_ids = it.docker_save(tmp / "save", [BASE, TOP], style)
    it.tar_dir(tmp / "save", tmp / "save.tar")
    img = store.import_image(str(tmp / "save.tar"))
    assert img.diff_ids == diff_ids
    assert img.name.endswith("example/app") and img.tag == "1"
    check_layers(img, store)


def test_unpacked_docker_save_directory(tmp: Path, store: Store) -> None:
    it.docker_save(tmp / "save", [BASE, TOP], "skopeo")
    check_layers(store.import_image(str(tmp / "save"), "x"), store)


def test_blob_files_that_are_symlinks(tmp: Path, store: Store) -> None:
    it.make_layout(tmp / "oci", [BASE, TOP])
    shared = tmp / "shared-blobs"
    shutil.move(tmp / "oci/blobs/sha256", shared)
    (tmp / "oci/blobs/sha256").mkdir()
    for blob in shared.iterdir():
        os.symlink(blob, tmp / "oci/blobs/sha256" / blob.name)
    check_layers(store.import_image(str(tmp / "oci"), "x"), store)


def test_platform_of_this_machine_or_asked(tmp: Path, store: Store) -> None:
    arm = [[{"name": "arch", "type": "file", "data": b"arm64"}]]
    amd = [[{"name": "arch", "type": "file", "data": b"amd64"}]]
    it.make_multiplatform(tmp / "multi", {"arm64": arm, "amd64": amd}, "multi")
    a = store.import_image(str(tmp / "multi"), "m:arm", platform=Platform.parse("linux/arm64"))
    assert (Path(a.layers[0]) / "arch").read_bytes() == b"arm64"
    b = store.import_image(str(tmp / "multi"), "m:amd", platform=Platform.parse("linux/amd64"))
    assert (Path(b.layers[0]) / "arch").read_bytes() == b"amd64"
    with pytest.raises(ImageError, match="no image for linux/s390x"):
        store.import_image(str(tmp / "multi"), "m:s", platform=Platform.parse("linux/s390x"))


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_real_docker_archive_from_skopeo(tmp: Path, store: Store) -> None:
    """skopeo writes docker-archive: symlinked layer.tar, decompressed layers."""
    it.make_layout(tmp / "oci", [BASE, TOP])
    r = subprocess.run(
        [
            "skopeo",
            "copy",
            "oci:" + str(tmp / "oci") + ":test",
            "docker-archive:" + str(tmp / "da.tar") + ":example/real:7",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    img = store.import_image(str(tmp / "da.tar"))
    assert img.ref == "docker.io/example/real:7"
    check_layers(img, store)
    # And an oci-archive skopeo wrote (it re-gzips: new digests, same diff_ids).
    r = subprocess.run(
        [
            "skopeo",
            "copy",
            "docker-archive:" + str(tmp / "da.tar"),
            "oci-archive:" + str(tmp / "oa.tar") + ":again",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    again = store.import_image(str(tmp / "oa.tar"), "again")
    assert again.diff_ids == img.diff_ids and again.layers == img.layers


def test_cli_import_ls_inspect_rm_gc(tmp: Path) -> None:
    it.make_layout(tmp / "oci", [BASE, TOP])
    st = tmp / "cli-store"
    r = run_cli("import", str(tmp / "oci"), "demo:1", store=st)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("demo:1 sha256:")
    rows = json.loads(run_cli("ls", "--json", store=st).stdout)
    assert [(x["ref"], x["layers"]) for x in rows] == [("demo:1", 2)]
    info = json.loads(run_cli("inspect", "demo:1", store=st).stdout)
    assert len(info["layer_dirs"]) == 2 and all(os.path.isdir(d) for d in info["layer_dirs"])
    r = run_cli("inspect", "nope", store=st)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no image 'nope:latest'" in r.stderr
    r = run_cli("rm", "demo:1", store=st)
    assert r.returncode == 0 and "2 layers no longer used removed" in r.stdout
    assert Store.open(str(st)).layers() == []
    assert run_cli("gc", store=st).stdout.startswith("0 layers removed")


# -- verification: a mismatch is one line and the store stays as it was --------


def _index_manifest(root: Path) -> tuple[dict, Path]:
    index = json.loads((root / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    return json.loads((root / "blobs/sha256" / digest).read_bytes()), root / "index.json"


def _rewrite(root: Path, manifest: dict) -> None:
    data = json.dumps(manifest).encode()
    digest = it.sha256(data)
    (root / "blobs/sha256" / digest.split(":")[1]).write_bytes(data)
    index = json.loads((root / "index.json").read_text())
    index["manifests"][0].update(digest=digest, size=len(data))
    (root / "index.json").write_text(json.dumps(index))


def _bad_digest(root: Path) -> None:
    man, _ = _index_manifest(root)
    blob = root / "blobs/sha256" / man["layers"][1]["digest"].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[data.index(b"new\n")] = ord("N")  # still a valid tar: only the digest tells
    blob.write_bytes(bytes(data))


def _bad_size(root: Path) -> None:
    man, _ = _index_manifest(root)
    man["layers"][1]["size"] -= 1
    _rewrite(root, man)


def _bad_diff_id(root: Path) -> None:
    man, _ = _index_manifest(root)
    cpath = root / "blobs/sha256" / man["config"]["digest"].split(":")[1]
    cfg = json.loads(cpath.read_bytes())
    cfg["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    data = json.dumps(cfg).encode()
    digest = it.sha256(data)
    (root / "blobs/sha256" / digest.split(":")[1]).write_bytes(data)
    man["config"].update(digest=digest, size=len(data))
    _rewrite(root, man)


def _bad_config_digest(root: Path) -> None:
    man, _ = _index_manifest(root)
    cpath = root / "blobs/sha256" / man["config"]["digest"].split(":")[1]
    cpath.write_bytes(cpath.read_bytes().replace(b"/bin/sh", b"/bin/xx"))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_bad_digest, "digest mismatch"),
        (_bad_size, "more than the"),
        (_bad_diff_id, "digest mismatch"),
        (_bad_config_digest, "digest mismatch"),
    ],
    ids=["blob-digest", "blob-size", "diff-id", "config-digest"],
)
def test_mismatch_is_one_line_and_store_unchanged(tmp: Path, tamper, message: str) -> None:
    st = tmp / "store"
    it.make_layout(tmp / "good", [[{"name": "keep", "type": "file", "data": b"k"}]])
    assert run_cli("import", str(tmp / "good"), "good", store=st).returncode == 0
    before = tree(st)
    it.make_layout(tmp / "bad", [BASE, TOP], compression="none")
    tamper(tmp / "bad")
    r = run_cli("import", str(tmp / "bad"), "bad", store=st)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert tree(st) == before
    assert Store.open(str(st)).image("good").diff_ids


def test_truncated_gzip_layer_is_refused(tmp: Path, store: Store) -> None:
    it.make_layout(tmp / "oci", [BASE])
    man, _ = _index_manifest(tmp / "oci")
    blob = tmp / "oci/blobs/sha256" / man["layers"][0]["digest"].split(":")[1]
    blob.write_bytes(blob.read_bytes()[:-20])
    with pytest.raises(ImageError):
        store.import_image(str(tmp / "oci"), "t")
    assert store.layers() == [] and os.listdir(tmp / "store/tmp") == []


def test_gzip_of_many_members(tmp: Path, store: Store) -> None:
    """A layer blob of two gzip members (pigz, concatenated streams) is one tar."""
    raw = it.tar_bytes(BASE)
    half = len(raw) // 2
    blob = gzip.compress(raw[:half]) + gzip.compress(raw[half:])
    root = tmp / "oci"
    it.make_layout(root, [BASE], compression="none")
    man, _ = _index_manifest(root)
    (root / "blobs/sha256" / it.sha256(blob).split(":")[1]).write_bytes(blob)
    man["layers"][0].update(digest=it.sha256(blob), size=len(blob))
    _rewrite(root, man)
    img = store.import_image(str(root), "multi")
    assert (Path(img.layers[0]) / "etc/passwd").exists()


# -- sharing ------------------------------------------------------------------------


def _disk_use(root: Path) -> int:
    seen, total = set(), 0
    for p in root.rglob("*"):
        st = p.lstat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def test_shared_base_layer_is_stored_once(tmp: Path, store: Store) -> None:
    base = [*BASE, {"name": "big", "type": "file", "data": os.urandom(1 << 20)}]
    it.make_layout(tmp / "a", [base, TOP])
    it.make_layout(tmp / "b", [base, [{"name": "only-b", "type": "file", "data": b"b"}]])
    a = store.import_image(str(tmp / "a"), "a")
    use_a = _disk_use(tmp / "store")
    b = store.import_image(str(tmp / "b"), "b")
    use_b = _disk_use(tmp / "store")
    assert a.layers[1] == b.layers[1]  # one directory for the shared base
    assert len(store.layers()) == 3
    assert use_b - use_a < 256 << 10, (use_a, use_b)  # the 1 MiB base was not stored again
    # A second tag of the same image costs nothing but its record.
    store.import_image(str(tmp / "a"), "a:again")
    assert len(store.layers()) == 3
    store.remove("a")
    store.remove("a:again")
    removed, _ = store.gc()
    assert removed == 1  # TOP only; the base is still b's
    assert store.image("b").layers == b.layers


def test_read_only_store_serves_but_refuses_imports(tmp: Path, unpriv_user) -> None:
    from support import run_as

    it.make_layout(tmp / "oci", [BASE, TOP])
    st = Store.open(str(tmp / "ro-store"))
    st.import_image(str(tmp / "oci"), "shared")
    os.chmod(tmp, 0o755)
    subprocess.run(["chmod", "-R", "a+rX,go-w", str(tmp / "ro-store")], check=True)

    def as_user() -> tuple[int, str]:
        s = Store.open(str(tmp / "ro-store"))
        n = len(s.image("shared").layers)
        try:
            s.import_image(str(tmp / "oci"), "mine")
        except StoreError as e:
            return n, str(e)
        return n, ""

    n, err = run_as(unpriv_user, as_user)
    assert n == 2 and "is read-only" in err


def test_bad_references(store: Store) -> None:
    for bad in ("", "a b", "-x", "name@sha256:00", "x:"):
        with pytest.raises(StoreError):
            store.image(bad)
    from unionfs.image import parse_ref

    assert parse_ref("localhost:5000/app") == ("localhost:5000/app", "latest")
    assert parse_ref("docker.io/library/debian:12") == ("docker.io/library/debian", "12")


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
def test_our_test_layout_is_an_image_for_umoci(tmp: Path) -> None:
    """The peer accepts what the tests build, so the tests exercise real images."""
    it.make_layout(tmp / "oci", [BASE, TOP])
    r = subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp / 'oci'}:test", str(tmp / "bundle")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    rootfs = tmp / "bundle/rootfs"
    assert not (rootfs / "etc/old.conf").exists() and (rootfs / "opt/b").exists()
    assert not (rootfs / "opt/a").exists()


def test_several_images_in_one_layout_need_a_ref(tmp: Path, store: Store) -> None:
    root = tmp / "two"
    root.mkdir()
    d1, _ = it.make_manifest(root, [[{"name": "one", "type": "file"}]])
    d2, _ = it.make_manifest(root, [[{"name": "two", "type": "file"}]])
    d1["annotations"] = {"org.opencontainers.image.ref.name": "one"}
    d2["annotations"] = {"org.opencontainers.image.ref.name": "two"}
    it.write_index(root, [d1, d2])
    with pytest.raises(ImageError, match="several images"):
        store.import_image(str(root), "x")
    img = store.import_image(str(root), "x", source_ref="two")
    assert os.listdir(img.layers[0]) == ["two"]
    with pytest.raises(ImageError, match="no image named 'three'"):
        store.import_image(str(root), "x", source_ref="three")


def test_add_layer_from_tar_for_commit(tmp: Path, store: Store) -> None:
    raw = it.tar_bytes(TOP)
    import io

    diff_id = store.add_layer_from_tar(io.BytesIO(gzip.compress(raw)))
    assert diff_id == it.sha256(raw)
    assert (Path(store.layer_dir(diff_id)) / "opt/b").read_bytes() == b"b"
    assert store.add_layer_from_tar(io.BytesIO(raw), diff_id) == diff_id  # idempotent
    with pytest.raises(ImageError, match="digest mismatch"):
        store.add_layer_from_tar(io.BytesIO(raw), "sha256:" + "1" * 64)
    assert store.layers() == [diff_id] and os.listdir(tmp / "store/tmp") == []


def test_image_lowers_on_the_mount_command_line() -> None:
    from unionfs.options import ConfigError, build_config

    cfg = build_config(["image:debian:12", "up", "mnt"], [])
    assert cfg.lowers == ["image:debian:12"] and cfg.upper == "up"
    assert build_config(["image:x", "mnt"], []).lowers == ["image:x"]
    assert build_config(["mnt"], ["lowerdir=image:a:1"]).lowers == ["image:a:1"]
    cfg = build_config(["l", "m"], ["uidmapping=0:1000:1:1:100000:65536,squash_to_root"])
    assert cfg.uidmapping == ((0, 1000, 1), (1, 100000, 65536))
    assert (cfg.squash_uid, cfg.squash_gid) == (0, 0)
    cfg = build_config(["l", "m"], ["squash_to_root,squash_to_uid=5"])
    assert (cfg.squash_uid, cfg.squash_gid) == (5, 0)
    for bad in ("uidmapping=0:1", "squash_to_gid=x", "xattr_permissions=1"):
        with pytest.raises(ConfigError):
            build_config(["l", "m"], [bad])


def test_progress_on_a_terminal(tmp: Path) -> None:
    import pty

    it.make_layout(tmp / "oci", [BASE, TOP])
    master, slave = pty.openpty()
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "unionfs.command",
                "image",
                "--store",
                str(tmp / "s"),
                "import",
                str(tmp / "oci"),
                "p",
            ],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
        )
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert r.returncode == 0
    assert b"layer 1/2 sha256:" in out and b"layer 2/2" in out
    # Not a terminal: no progress line at all.
    r = run_cli("import", str(tmp / "oci"), "q", store=tmp / "s2")
    assert r.returncode == 0 and r.stderr == ""


ODD = [
    # A second layer with the odd but legal shapes of containers.md §2.3/§6.2: a
    # re-created deleted dir, a whiteout of a missing name, a whiteout and a new
    # file of the same name in one layer (the whiteout only hides lower layers).
    {"name": ".wh.home", "type": "file"},
    {"name": "home/new", "type": "file", "data": b"new"},
    {"name": ".wh.never-existed", "type": "file"},
    {"name": "bin/.wh.tool2", "type": "file"},
    {"name": "bin/tool2", "type": "file", "data": b"replaced"},
]


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="umoci unpack (rootful) and the mount as root")
def test_merged_view_equals_umoci_unpack(tmp: Path, store: Store, unionfs) -> None:
    """umoci flattens the image; our per-layer store stacked by the mount must
    show exactly the same tree (owners, modes, contents, links, xattrs)."""
    from support import FIELDS, diff_snapshots, snapshot

    it.make_layout(tmp / "oci", [BASE, TOP, ODD])
    r = subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp / 'oci'}:test", str(tmp / "bundle")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    img = store.import_image(str(tmp / "oci"), "cmp")
    m = unionfs(img.layers)
    ours, theirs = snapshot(m.mnt), snapshot(tmp / "bundle/rootfs")
    assert "home/new" in ours and "home/user" not in ours and "etc/old.conf" not in ours
    # One known difference: bin/tool's lower inode keeps the link of bin/tool2, which a
    # later layer replaced, so a union (kernel overlayfs too) counts 2 where umoci's
    # flattened copy counts 1 (the caveat of image-spec PR #1211).
    assert ours["bin/tool"][FIELDS.index("nlink")] == 2
    assert theirs["bin/tool"][FIELDS.index("nlink")] == 1
    exclude = ("nlink",)
    ours, theirs = (
        snapshot(m.mnt, exclude=exclude),
        snapshot(tmp / "bundle/rootfs", exclude=exclude),
    )
    assert diff_snapshots(ours, theirs, ("unionfs", "umoci")) == []


def test_one_line_errors_for_bad_refs_mappings_and_lowers(tmp: Path) -> None:
    """Review finding 10: Docker names are lowercase; a mapping's non-number and a
    lower below a file are said as such, not as Python's int() or 'does not exist'."""
    from unionfs.image import parse_ref
    from unionfs.options import ConfigError, build_config, check_paths

    with pytest.raises(StoreError, match="must be lowercase"):
        parse_ref("UPPER:x")
    with pytest.raises(StoreError, match="must be lowercase"):
        parse_ref("docker.io/Library/debian")
    assert parse_ref("Registry.Example:5000/app:V1") == ("Registry.Example:5000/app", "V1")
    with pytest.raises(ConfigError, match="of whole numbers, not '0:x:1'"):
        build_config(["l", "m"], ["uidmapping=0:x:1"])
    with pytest.raises(ConfigError, match="of whole numbers"):
        build_config(["l", "m"], ["gidmapping=0:-1:1"])
    (tmp / "file").write_text("x")
    (tmp / "mnt").mkdir()
    for lower in ("file", "file/sub"):
        cfg = build_config([str(tmp / lower), str(tmp / "mnt")], [])
        with pytest.raises(ConfigError, match="is not a directory"):
            check_paths(cfg)
