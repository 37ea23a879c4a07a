"""Owners, modes and devices without root: the formats, and the mount presenting them.

The mount tests run as the unprivileged test user: it imports an image into
its own store, mounts ``image:NAME`` and sees root-owned files, setuid bits
and device nodes as the image has them; chown/chmod through the mount, done
as root of a user namespace (what ``unionfs run`` does), are recorded in the
upper and survive a remount.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import imagetools as it
import pytest

from unionfs import ownership
from unionfs.ownership import Override

import support

# -- formats (pure) ---------------------------------------------------------------

#: umoci's test vectors (test/pack_mapping.bats), containers.md §3.3.
UMOCI_VECTORS = [
    ((992, 123), "08e007107b"),
    ((0, 456), "08ffffffff0f10c803"),
    ((98, 0), "086210ffffffff0f"),
    ((492, 218), "08ec0310da01"),
    ((123, 456), "087b10c803"),
    ((3195, 2318), "08fb18108e12"),
    ((1000, 1000), "08e80710e807"),
]


@pytest.mark.parametrize(("ids", "hexval"), UMOCI_VECTORS)
def test_rootlesscontainers_matches_umoci(ids: tuple[int, int], hexval: str) -> None:
    assert ownership.encode_rootless(*ids) == bytes.fromhex(hexval)
    assert ownership.decode_rootless(bytes.fromhex(hexval)) == ids


def test_rootlesscontainers_edge_cases() -> None:
    assert ownership.encode_rootless(0, 0) is None  # umoci omits the xattr
    assert ownership.decode_rootless(b"") == (0, 0)
    for bad in (b"\x08", b"\x0a\x01\x00", b"\x08\x80"):
        with pytest.raises(ValueError):
            ownership.decode_rootless(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"0:0:0755:dir", Override(0, 0, 0o755, "dir")),
        (b"0:0:40755", Override(0, 0, 0o755, "dir")),  # fuse-overlayfs C, S_IFMT bits
        (b"7:8:100644", Override(7, 8, 0o644, "file")),
        (b"0:0:104711", Override(0, 0, 0o4711, "file")),
        (b"0:0:755", Override(0, 0, 0o755, None)),  # type from the real file
        (b"0:5:0660:block-8-1", Override(0, 5, 0o660, "block", os.makedev(8, 1))),
        (b"0:0:0666:char-1-3", Override(0, 0, 0o666, "char", os.makedev(1, 3))),
        (b"1:2:0777:symlink", Override(1, 2, 0o777, "symlink")),
    ],
)
def test_override_stat_values(value: bytes, expected: Override) -> None:
    assert ownership.parse_override(value) == expected


def test_override_stat_written_as_containers_storage_does() -> None:
    assert ownership.format_override(Override(0, 0, 0o755, "dir")) == b"0:0:0755:dir"
    dev = Override(0, 0, 0o666, "char", os.makedev(1, 3))
    assert ownership.format_override(dev) == b"0:0:0666:char-1-3"
    for bad in (b"0:0", b"a:0:0755", b"0:0:0755:frob", b"0:0:0755:dir:x"):
        with pytest.raises(ValueError):
            ownership.parse_override(bad)


def test_id_mappings_as_fuse_overlayfs() -> None:
    m = ownership.parse_idmap("0:1000:1:1:110000:65536")
    assert ownership.to_container(m, 1000) == 0
    assert ownership.to_container(m, 110004) == 5
    assert ownership.to_container(m, 7) == ownership.OVERFLOW_ID
    assert ownership.to_host(m, 5) == 110004 and ownership.to_host(m, 70000) is None
    for bad in ("", "0:1", "0:1:0", "a:b:c"):
        with pytest.raises(ValueError):
            ownership.parse_idmap(bad)
    squash = ownership.Mapping(squash_uid=0, squash_gid=0)
    assert squash.shown(1234, 99) == (0, 0)


def test_chown_clears_setuid_as_the_kernel_does() -> None:
    import stat

    ov = ownership.after_chown(Override(0, 0, 0o6755), stat.S_IFREG | 0o755)
    assert ov.mode == 0o755
    locking = ownership.after_chown(Override(0, 0, 0o2644), stat.S_IFREG | 0o644)
    assert locking.mode == 0o2644  # setgid without group-x is mandatory locking: kept
    d = ownership.after_chown(Override(0, 0, 0o2755), stat.S_IFDIR | 0o755)
    assert d.mode == 0o2755


def test_umoci_and_fuse_overlayfs_xattrs_are_read(tmp: Path) -> None:
    f = tmp / "f"
    f.write_bytes(b"")
    fd = os.open(tmp, os.O_PATH | os.O_DIRECTORY)
    try:
        os.setxattr(f, "user.rootlesscontainers", bytes.fromhex("087b10c803"))
        assert ownership.read_override_xattrs(fd, b"f") == Override(123, 456)
        os.setxattr(f, "user.fuseoverlayfs.override_stat", b"1:2:100600")
        assert ownership.read_override_xattrs(fd, b"f") == Override(1, 2, 0o600, "file")
        ownership.write_override_xattr(fd, b"f", Override(3, 4, 0o640, "file"))
        assert os.listxattr(f) == ["user.containers.override_stat"]  # one value left
    finally:
        os.close(fd)


# -- through a rootless mount -------------------------------------------------------

#: A v2 file capability: cap_net_raw, effective (what iputils' ping carries).
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")

IMAGE = [
    [
        {"name": "etc", "type": "dir"},
        {"name": "etc/passwd", "type": "file", "data": b"root:x:0:0\n"},
        {"name": "etc/shadow", "type": "file", "data": b"root:*:\n", "mode": 0o640, "gid": 42},
        {"name": "bin", "type": "dir"},
        {"name": "bin/su", "type": "file", "data": b"#!/bin/sh\n", "mode": 0o4755},
        {"name": "dev", "type": "dir"},
        {"name": "dev/null", "type": "char", "major": 1, "minor": 3, "mode": 0o666},
        {"name": "dev/sda", "type": "block", "major": 8, "minor": 0, "mode": 0o660, "gid": 6},
        {"name": "home/user", "type": "dir", "uid": 1000, "gid": 1000, "mode": 0o700},
        {"name": "sh", "type": "symlink", "target": "bin/su"},
        {"name": "tmp", "type": "dir", "mode": 0o1777},
        {
            "name": "bin/ping",
            "type": "file",
            "data": b"\x7fELF",
            "xattrs": {"security.capability": CAP_NET_RAW.decode("utf-8", "surrogateescape")},
        },
    ],
    [{"name": "etc/motd", "type": "file", "data": b"hi\n", "uid": 33, "gid": 33}],
]


def ls_ln(path: Path, user) -> dict[str, tuple[str, ...]]:
    """``ls -ln`` of a directory as ``user``: name -> (mode, uid, gid, size or rdev)."""
    r = subprocess.run(
        ["ls", "-lnA", "--time-style=+", str(path)],
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(user),
        check=True,
    )
    out = {}
    for line in r.stdout.splitlines()[1:]:
        f = line.split()
        if f[0].startswith(("c", "b")):
            out[f[-1] if not f[0].startswith("l") else f[-3]] = (f[0], f[2], f[3], f[4] + f[5])
        else:
            name = f[-3] if f[0].startswith("l") else f[-1]
            out[name] = (f[0], f[2], f[3], f[4])
    return out


def _import_as(user, base: Path, *flags: str) -> Path:
    """The test image imported by ``user`` into a store of its own in ``base``."""
    src = base / "oci"
    it.make_layout(src, IMAGE)
    support.chown_tree(src, user.uid, user.gid)
    store = base / "store"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "unionfs.command",
            "image",
            "--store",
            str(store),
            "import",
            *flags,
            str(src),
            "img:1",
        ],
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(user),
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    return store


@pytest.fixture
def user_image(unpriv_user, unpriv_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test image imported by the unprivileged user into its own store."""
    store = _import_as(unpriv_user, unpriv_tmp)
    monkeypatch.setenv("UNIONFS_STORE", str(store))
    return store


def _dirs(base: Path, user, *names: str) -> list[Path]:
    out = []
    for n in names:
        (base / n).mkdir()
        os.chown(base / n, user.uid, user.gid)
        out.append(base / n)
    return out


def test_rootless_mount_shows_the_images_owners(
    user_image: Path, unpriv_user, unpriv_tmp: Path, unionfs
) -> None:
    (mnt,) = _dirs(unpriv_tmp, unpriv_user, "mnt")
    unionfs(["image:img:1"], mnt=mnt, user=unpriv_user)
    top = ls_ln(mnt, unpriv_user)
    assert top["bin"][:3] == ("drwxr-xr-x", "0", "0")
    assert top["tmp"][0] == "drwxrwxrwt"
    assert top["sh"][:3] == ("lrwxrwxrwx", "0", "0")  # a symlink: from the side table
    etc = ls_ln(mnt / "etc", unpriv_user)
    assert etc["passwd"][:3] == ("-rw-r--r--", "0", "0")
    assert etc["shadow"][:3] == ("-rw-r-----", "0", "42")
    assert etc["motd"][:3] == ("-rw-r--r--", "33", "33")
    assert ls_ln(mnt / "bin", unpriv_user)["su"][:3] == ("-rwsr-xr-x", "0", "0")
    dev = ls_ln(mnt / "dev", unpriv_user)
    assert dev["null"] == ("crw-rw-rw-", "0", "0", "1,3")
    assert dev["sda"] == ("brw-rw----", "0", "6", "8,0")
    assert ls_ln(mnt / "home", unpriv_user)["user"][:3] == ("drwx------", "1000", "1000")
    # The kernel enforces what is shown: the user may not read root's shadow file.
    r = subprocess.run(
        ["cat", str(mnt / "etc/shadow")],
        capture_output=True,
        preexec_fn=support.as_user(unpriv_user),
    )
    assert r.returncode != 0 and b"Permission denied" in r.stderr
    # The store's files themselves belong to the user, with no setuid bit.
    real = Path(store_layer(user_image)) / "bin/su"
    st = real.stat()
    assert st.st_uid == unpriv_user.uid and not st.st_mode & 0o4000
    # Ownership xattrs are the union's: not listed through the mount.
    r = subprocess.run(
        ["getfattr", "-d", "-m", "-", str(mnt / "bin/su")],
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(unpriv_user),
    )
    assert "override_stat" not in r.stdout


def store_layer(store: Path) -> str:
    from unionfs.image import Store

    return Store.open(str(store)).image("img:1").layers[-1]


def _userns(user, script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as root of a new user namespace with the user's subordinate ids."""
    cmd = [
        "unshare",
        "--map-root-user",
        "--map-users=400000,1,65536",
        "--map-groups=400000,1,65536",
        "--mount",
        "sh",
        "-ec",
        script,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(user),
        env=env,
        cwd="/",
        timeout=120,
    )


def test_chown_chmod_in_a_user_namespace_are_recorded_and_survive_a_remount(
    user_image: Path, unpriv_user, unpriv_tmp: Path, unionfs, subids
) -> None:
    up, mnt = _dirs(unpriv_tmp, unpriv_user, "up", "mnt")
    mount = " ".join(support.unionfs_command())
    script = f"""
        {mount} image:img:1 {up} {mnt}
        trap 'umount {mnt}' EXIT
        chown 123:456 {mnt}/etc/passwd
        chmod 4711 {mnt}/etc/motd
        chown 7:8 {mnt}/home/user
        touch {mnt}/new && chown 5:6 {mnt}/new && chmod 600 {mnt}/new
        chown 1:1 {mnt}/bin/su
        ls -ln {mnt}/etc/passwd {mnt}/bin/su
    """
    r = _userns(unpriv_user, script, dict(os.environ))
    assert r.returncode == 0, r.stderr
    shown = sorted((f[0], f[2], f[3]) for f in map(str.split, r.stdout.splitlines()))
    # Inside: ids 1..65536 are the subordinate ones, shown as they are; chown
    # of a setuid file clears the bit, as the kernel does.
    assert shown == [("-rw-r--r--", "123", "456"), ("-rwxr-xr-x", "1", "1")]
    assert not support.is_mounted(mnt)
    # The upper holds metadata, not real owners: the user owns every real file.
    assert all(p.lstat().st_uid == unpriv_user.uid for p in up.rglob("*"))
    # A plain rootless remount (no namespace) shows what was recorded.
    unionfs(["image:img:1"], up, mnt, user=unpriv_user)
    etc = ls_ln(mnt / "etc", unpriv_user)
    assert etc["passwd"][:3] == ("-rw-r--r--", "123", "456")
    assert etc["motd"][:3] == ("-rws--x--x", "33", "33")
    assert ls_ln(mnt / "home", unpriv_user)["user"][:3] == ("drwx------", "7", "8")
    assert ls_ln(mnt, unpriv_user)["new"][:3] == ("-rw-------", "5", "6")
    assert ls_ln(mnt / "bin", unpriv_user)["su"][:3] == ("-rwxr-xr-x", "1", "1")


def test_mapping_options(user_image: Path, unpriv_user, unpriv_tmp: Path, unionfs) -> None:
    (mnt,) = _dirs(unpriv_tmp, unpriv_user, "mnt")
    unionfs(
        ["image:img:1"], mnt=mnt, user=unpriv_user, opts=["uidmapping=0:33:1,gidmapping=0:33:1"]
    )
    etc = ls_ln(mnt / "etc", unpriv_user)
    assert etc["motd"][1:3] == ("0", "0")  # host 33 is container 0
    assert etc["passwd"][1:3] == ("65534", "65534")  # unmapped: the overflow id
    unionfs(
        ["image:img:1"],
        mnt=_dirs(unpriv_tmp, unpriv_user, "m2")[0],
        user=unpriv_user,
        opts=["squash_to_uid=77", "squash_to_root"],
    )
    etc = ls_ln(unpriv_tmp / "m2/etc", unpriv_user)
    assert etc["motd"][1:3] == ("77", "0") and etc["passwd"][1:3] == ("77", "0")


@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="fuse-overlayfs missing")
def test_fuse_overlayfs_reads_our_layers(user_image: Path, unpriv_user, unpriv_tmp: Path) -> None:
    """The peer stacks layers we extracted and shows the same owners (it reads
    user.containers.override_stat since 1.3, and OCI .wh. whiteouts)."""
    from unionfs.image import Store

    layers = Store.open(str(user_image)).image("img:1").layers
    (mnt,) = _dirs(unpriv_tmp, unpriv_user, "fmnt")
    # In the foreground, so that the daemon is ours to stop by its PID (a
    # daemonized peer may still be exiting when the test ends).
    peer = subprocess.Popen(
        ["fuse-overlayfs", "-f", "-o", "lowerdir=" + ":".join(layers), str(mnt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=support.as_user(unpriv_user),
    )
    try:
        deadline = time.monotonic() + 30
        while not support.is_mounted(mnt):
            assert peer.poll() is None, peer.stderr.read() if peer.stderr else ""
            assert time.monotonic() < deadline, "fuse-overlayfs did not mount"
            time.sleep(0.05)
        etc = ls_ln(mnt / "etc", unpriv_user)
        assert etc["passwd"][1:3] == ("0", "0") and etc["motd"][1:3] == ("33", "33")
        assert ls_ln(mnt / "bin", unpriv_user)["su"][0] == "-rwsr-xr-x"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], preexec_fn=support.as_user(unpriv_user))
        support.wait_unmounted(mnt)
        try:
            peer.wait(timeout=15)
        except subprocess.TimeoutExpired:
            peer.kill()
            peer.wait()


def test_file_capability_kept_without_root_and_shown(
    user_image: Path, unpriv_user, unpriv_tmp: Path, unionfs
) -> None:
    """security.capability cannot be set by a user: the layer keeps it as
    user.containers.override_security.capability (fuse-overlayfs' name) and the
    mount shows it under its own name; the saved name cannot be forged through it."""
    from unionfs.image import Store

    lower = Path(Store.open(str(user_image)).image("img:1").layers[-1])
    assert os.getxattr(lower / "bin/ping", "user.containers.override_security.capability") == (
        CAP_NET_RAW
    )
    up, mnt = _dirs(unpriv_tmp, unpriv_user, "up", "mnt")
    unionfs(["image:img:1"], up, mnt, user=unpriv_user)

    def look() -> tuple[bytes, list[str], int]:
        value = os.getxattr(mnt / "bin/ping", "security.capability")
        names = os.listxattr(mnt / "bin/ping")
        (mnt / "tmp/mine").write_bytes(b"")  # the root is root's: only /tmp is open
        try:
            os.setxattr(
                mnt / "tmp/mine", "user.containers.override_security.capability", CAP_NET_RAW
            )
        except OSError as e:
            return value, names, e.errno
        return value, names, 0

    value, names, err = support.run_as(unpriv_user, look)
    assert value == CAP_NET_RAW
    assert names == ["security.capability"]
    assert err != 0


def test_pure_api_for_the_layer_exporter(tmp: Path) -> None:
    """from_xattrs/shown_stat: what a tool that read the xattrs itself applies."""
    f = tmp / "dev"
    f.write_bytes(b"")
    st = f.lstat()
    values = {b"user.containers.override_stat": b"0:6:0660:block-8-1", b"user.other": b"x"}
    ov = ownership.from_xattrs(values)
    assert ov == Override(0, 6, 0o660, "block", os.makedev(8, 1))
    import stat as st_mod

    mode, uid, gid, rdev = ownership.shown_stat(st, ov)
    assert st_mod.S_ISBLK(mode) and st_mod.S_IMODE(mode) == 0o660
    assert (uid, gid, rdev) == (0, 6, os.makedev(8, 1))
    assert ownership.shown_stat(st, None) == (st.st_mode, st.st_uid, st.st_gid, st.st_rdev)
    assert ownership.from_xattrs({b"user.containers.override_stat": b"junk"}) is None
    assert ownership.from_xattrs({b"user.rootlesscontainers": bytes.fromhex("087b10c803")}) == (
        Override(123, 456)
    )


def test_owners_from_the_side_table(
    unpriv_user, unpriv_tmp: Path, unionfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store imported with --side-table (bound for NFS): no ownership xattr at
    all, the same view through the mount."""
    store = _import_as(unpriv_user, unpriv_tmp, "--side-table")
    monkeypatch.setenv("UNIONFS_STORE", str(store))
    from unionfs.image import Store

    for layer in Store.open(str(store)).image("img:1").layers:
        for p in [Path(layer), *Path(layer).rglob("*")]:
            if not p.is_symlink():
                assert not any("override" in x or "rootless" in x for x in os.listxattr(p))
    (mnt,) = _dirs(unpriv_tmp, unpriv_user, "mnt")
    unionfs(["image:img:1"], mnt=mnt, user=unpriv_user)
    etc = ls_ln(mnt / "etc", unpriv_user)
    assert etc["shadow"][:3] == ("-rw-r-----", "0", "42")
    assert etc["motd"][:3] == ("-rw-r--r--", "33", "33")
    assert ls_ln(mnt / "bin", unpriv_user)["su"][:3] == ("-rwsr-xr-x", "0", "0")
    assert ls_ln(mnt / "dev", unpriv_user)["null"] == ("crw-rw-rw-", "0", "0", "1,3")
    assert ls_ln(mnt, unpriv_user)["bin"][:3] == ("drwxr-xr-x", "0", "0")


def test_getattr_reads_an_objects_override_once(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding 12: the override is remembered per node; a getattr of a
    known object reads no xattr (before: one listxattr and more per call)."""
    import pyfuse3
    import trio

    from unionfs.inodes import InodeTable
    from unionfs.layers import LayerStack
    from unionfs.operations import UnionOperations
    from unionfs.options import MountConfig

    (tmp / "lower").mkdir()
    (tmp / "up").mkdir()
    os.setxattr(tmp / "lower", ownership.CONTAINERS_XATTR, b"0:0:0755:dir")
    (tmp / "up/f").write_bytes(b"")
    os.setxattr(tmp / "up/f", ownership.CONTAINERS_XATTR, b"7:8:0640:file")
    stack = LayerStack([str(tmp / "lower")], str(tmp / "up"))
    try:
        cfg = MountConfig(
            lowers=[str(tmp / "lower")],
            upper=str(tmp / "up"),
            mountpoint=str(tmp),
            read_only=True,
            xattr_permissions=2,
        )
        ops = UnionOperations(stack, InodeTable(stack), cfg, None)
        reads = []
        real = ownership.read_override_xattrs
        monkeypatch.setattr(
            ownership, "read_override_xattrs", lambda *a: reads.append(a) or real(*a)
        )

        async def main() -> list[tuple[int, int, int]]:
            a = await ops.lookup(pyfuse3.ROOT_INODE, b"f", None)
            seen = []
            for _ in range(5):
                g = await ops.getattr(a.st_ino, None)
                seen.append((g.st_uid, g.st_gid, g.st_mode & 0o7777))
            assert len(reads) == 1
            os.setxattr(tmp / "up/f", ownership.CONTAINERS_XATTR, b"9:9:0600:file")
            assert ops.owners is not None
            ops.owners.forget_node(a.st_ino)  # what setattr/setxattr do
            g = await ops.getattr(a.st_ino, None)
            seen.append((g.st_uid, g.st_gid, g.st_mode & 0o7777))
            return seen

        seen = trio.run(main)
        assert seen == [(7, 8, 0o640)] * 5 + [(9, 9, 0o600)]
    finally:
        stack.close()
