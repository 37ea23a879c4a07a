"""The merged read view against kernel overlayfs, in every marker format.

One logical set of layers (``scenario``) is written twice: in the format under
test for unionfs (kernel, rootless ``user.overlay``, OCI ``.wh.`` files,
fuse-overlayfs' xattr, xattr whiteouts in both namespaces, or all of them
mixed) and in kernel format for the oracle.  Both views must be equal: every
path, type, mode, size, content, symlink target, device number, user xattr,
link count and owner, and the xattr names each entry lists.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from support import (
    FIELDS,
    MARKER_FORMATS,
    MARKER_XATTRS,
    MIXED,
    Device,
    Dir,
    Fifo,
    File,
    Hardlink,
    Layer,
    Socket,
    Symlink,
    Whiteout,
    chown_tree,
    convert_layer,
    convert_layers,
    diff_snapshots,
    errno_of,
    helper_opts,
    inode_map,
    make_layers,
    mount_entry,
    run_as,
    show_path,
    snapshot,
    tmpfs,
    unionfs_mount,
    write_layer,
    xattr_names,
)

pytestmark = [pytest.mark.oracle]

FORMATS = [*MARKER_FORMATS, MIXED]
#: read-only union of lowers (``-o ro``), or lowers under an empty upper (read-write).
MODES = ["ro", "empty-upper"]
#: Names the scenario hides (whiteouts, opaque dirs, a dir over a whiteout).
HIDDEN = [
    "deleted",
    "deleted-dir",
    "deep-white",
    "dir/gone",
    "dir/gone-dir",
    "opq/hidden",
    "opq/hidden-dir",
    "opq2/mid",
    "opq2/bottom",
    "redir/old",
    "xdir/drop",
    "xdir/drop-dir",
    "empty-opq/x",
    "white-nothing",
    os.fsdecode(b"gone \xfe"),
    "nl\nname",
    "link-over-dir/x",
]


def scenario() -> list[Layer]:
    """Three lowers, topmost first, covering every rule of the read path."""
    bottom: Layer = {
        "file": "bottom\n",
        "only-bottom": File("b\n", mode=0o751),
        "setuid": File("s\n", mode=0o4755),
        "no-perms": File("secret\n", mode=0o000),
        "owned": File("o\n", uid=1234, gid=5678),
        "dir": {"b": "b\n", "gone": "gone\n", "gone-dir": {"x": "x\n"}, "sub": {"deep": "d\n"}},
        "deleted": "x\n",
        "deleted-dir": {"inner": {"x": "x\n"}},
        "deep-white": {"x": "x\n"},
        "resurrect": "bottom\n",
        "was-dir": {"inner": "inner\n"},
        "was-file": "file\n",
        "opq": {"hidden": "hidden\n", "hidden-dir": {"x": ""}, "both": "bottom\n"},
        "opq2": {"bottom": "b\n"},
        "empty-opq": {"x": "x\n"},
        "redir": {"old": "old\n"},
        "xdir": {"keep": "k\n", "drop": "d\n", "drop-dir": {"x": "x\n"}},
        "fifo": Fifo(),
        "sock": Socket(),
        "null": Device(1, 3),
        "loop": Device(7, 0, block=True, mode=0o660),
        "hard1": "hard\n",
        "hard2": Hardlink("hard1"),
        "links": {"hard3": Hardlink("hard1")},
        "hl-a": "shadowed link\n",
        "hl-b": Hardlink("hl-a"),
        "empty": {},
        "sticky": Dir({"f": ""}, mode=0o1777),
        "setgid": Dir({}, mode=0o2755),
        "private": Dir({"p": "p\n"}, mode=0o700),
        "xattrs-bottom": File("x\n", xattrs={"user.a": b"1", "user.bin": b"\x00\xff"}),
        "big": File(bytes(range(256)) * 8192 + b"end"),
        "link-over-dir": {"x": "x\n"},
        "tree": {"a": {"b": {"c": {"d": "deep\n"}}}},
        b"odd name\n\xff": "odd\n",
        b"gone \xfe": "x\n",
        "nl\nname": "x\n",
        b"dir\xe9": {"b": "b\n"},
        "with space": {"a b": "c d\n"},
    }
    mid: Layer = {
        "file": "mid\n",
        "dir": {"m": "m\n", "gone": Whiteout(), "gone-dir": Whiteout()},
        "deleted-dir": Whiteout(),
        "deep-white": {"y": "y\n"},
        "resurrect": Whiteout(),
        "was-file": {"x": "x\n"},
        "opq": Dir({"shown": "shown\n", "both": "mid\n"}, opaque=True),
        "opq2": {"mid": "m\n"},
        "empty-opq": Dir({}, opaque=True),
        "redir": Whiteout(),
        "xdir": {"drop": Whiteout(), "drop-dir": Whiteout(), "new": "n\n"},
        "white-nothing": Whiteout(),
        b"gone \xfe": Whiteout(),
        b"dir\xe9": {"m": "m\n"},
        "tree": {"a": {"b": {"m": "m\n"}}},
    }
    top: Layer = {
        "dir": {"t": "t\n"},
        "deleted": Whiteout(),
        "deep-white": Whiteout(),
        "resurrect": "top\n",
        "was-dir": "now a file\n",
        "redir": {"new": "new\n"},
        "opq2": Dir({"top": "t\n"}, opaque=True),
        "hl-b": "shadows a link\n",
        "nl\nname": Whiteout(),
        "rel-link": Symlink("file"),
        "abs-link": Symlink("/etc/passwd"),
        "dangling": Symlink("nowhere"),
        "outside": Symlink("../../../../../../../../etc/hostname"),
        "dir-link": Symlink("dir"),
        "odd-link": Symlink(b"target \xff\n"),
        "long-link": Symlink("d/" * 2000),
        "link-over-dir": Symlink("dir"),
        "xattrs": File("x\n", xattrs={"user.colour": b"green", "user.empty": b""}),
        "xattr-dir": Dir({}, xattrs={"user.d": b"dir"}),
        "tree": {"a": {"t": "t\n"}},
    }
    return [top, mid, bottom]


def _build(tmp: Path, fmt: str, layers: list[Layer] | None = None) -> tuple[list, list]:
    """(unionfs layers in ``fmt``, kernel-format layers) of the same description."""
    layers = scenario() if layers is None else layers
    u = make_layers(tmp / f"u-{fmt}", layers, fmt)
    k = make_layers(tmp / "k", layers, "kernel")
    return u, k


def _raw(layers: list[Path]) -> list[dict]:
    return [snapshot(p, xattr_prefixes=("user.", "trusted."), include_root=True) for p in layers]


# --------------------------------------------------------------------------- the builders


def _is_char00(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@pytest.mark.parametrize("fmt", list(MARKER_FORMATS))
def test_layer_builder_writes_the_format(tmp, fmt):
    """Each format's markers are on disk as that format spells them, and nothing else."""
    top, mid, _bottom = make_layers(tmp, scenario(), fmt)
    f = MARKER_FORMATS[fmt]
    gone, opq = mid / "dir" / "gone", mid / "opq"
    if f.whiteout == "oci":
        assert not os.path.lexists(gone)
        assert (mid / "dir" / ".wh.gone").read_bytes() == b""
        assert os.path.lexists(os.fsencode(mid) + b"/.wh.gone \xfe")
        assert os.path.lexists(top / ".wh.nl\nname")
    elif f.whiteout == "char":
        assert _is_char00(gone) and _is_char00(top / "deleted")
    else:
        st = os.lstat(gone)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0
        assert os.getxattr(gone, f.whiteout) == b""
        assert os.getxattr(mid / "dir", f.opaque_x) == b"x"
        assert os.getxattr(mid, f.opaque_x) == b"x", "whiteouts in the layer root"
    if f.opaque == "oci":
        assert (opq / ".wh..wh..opq").read_bytes() == b""
        assert not [x for x in os.listxattr(opq) if "overlay" in x]
    else:
        assert os.getxattr(opq, f.opaque) == b"y"
        assert os.listxattr(opq) == [f.opaque]
        assert not [n for n in os.listdir(opq) if n.startswith(".wh.")]
    st = os.lstat(_bottom / "hard1")
    assert st.st_nlink == 3 and os.lstat(_bottom / "links" / "hard3").st_ino == st.st_ino
    assert os.major(os.lstat(_bottom / "null").st_rdev) == 1
    assert stat.S_ISSOCK(os.lstat(_bottom / "sock").st_mode)
    assert stat.S_IMODE(os.lstat(_bottom / "setuid").st_mode) == 0o4755
    assert os.lstat(_bottom / "owned").st_uid == 1234
    assert os.readlink(top / "odd-link") == "target \udcff\n"
    getfattr = subprocess.run(
        ["getfattr", "-d", "-m", "-", "--absolute-names", str(top / "xattrs")],
        capture_output=True,
        text=True,
    )
    assert 'user.colour="green"' in getfattr.stdout


@pytest.mark.parametrize("fmt", list(MARKER_FORMATS))
def test_converter_gives_the_kernel_format(tmp, fmt, kernel_overlay):
    """convert_layers(any format) is byte for byte what the kernel builder writes,
    and the kernel reads the formats it knows as their kernel-format equivalent."""
    u, k = _build(tmp, fmt)
    converted = convert_layers(u, tmp / "conv")
    assert _raw(converted) == _raw(k)
    f = MARKER_FORMATS[fmt]
    if f.userxattr:
        ku = make_layers(tmp / "ku", scenario(), "user-xattr")
        assert _raw(convert_layers(u, tmp / "conv-u", userxattr=True)) == _raw(ku)
    if fmt != "kernel":
        assert _raw(u) != _raw(k), "the format under test differs on disk"
    want = snapshot(kernel_overlay(k).mnt)
    if f.kernel_readable:
        got = snapshot(kernel_overlay(u, userxattr=f.userxattr).mnt)
        assert not diff_snapshots(want, got), diff_snapshots(want, got)
    else:  # the reason for the conversion: the kernel does not read these markers
        got = snapshot(kernel_overlay(u).mnt)
        assert diff_snapshots(want, got)


# --------------------------------------------------------------------------- the merged view


def _dtypes(root: Path) -> dict[bytes, dict[bytes, int]]:
    """dir (relative) -> {name: d_type} as readdir(3) reports them, for every directory."""
    libc = _libc()
    out: dict[bytes, dict[bytes, int]] = {}
    stack = [b""]
    base = os.fsencode(root)
    while stack:
        rel = stack.pop()
        dirp = libc.opendir(os.path.join(base, rel) if rel else base)
        assert dirp, os.strerror(ctypes.get_errno())
        entries = {}
        try:
            while ent := libc.readdir(dirp):
                entries[ent.contents.d_name] = ent.contents.d_type
        finally:
            libc.closedir(dirp)
        out[rel] = entries
        for name, d_type in entries.items():
            if d_type == 4 and name not in (b".", b".."):  # DT_DIR
                stack.append(os.path.join(rel, name) if rel else name)
    return out


def _dot_numbers(root: Path) -> list[tuple[bytes, bytes, int, int]]:
    """(dir, "." or "..", d_ino, st_ino) wherever readdir's number of "." or ".." is
    not the one stat gives the directory (or its parent), below the mount root."""
    libc = _libc()
    wrong = []
    for dirpath, _dirs, _files in os.walk(os.fsencode(root)):
        dirp = libc.opendir(dirpath)
        assert dirp, os.strerror(ctypes.get_errno())
        try:
            while ent := libc.readdir(dirp):
                name = ent.contents.d_name
                if name in (b".", b"..") and not (name == b".." and dirpath == os.fsencode(root)):
                    st_ino = os.lstat(os.path.join(dirpath, name)).st_ino
                    if ent.contents.d_ino != st_ino:
                        wrong.append((dirpath, name, ent.contents.d_ino, st_ino))
        finally:
            libc.closedir(dirp)
    return wrong


def _mount_both(tmp, fmt, mode, unionfs, kernel_overlay):
    """(kernel mount, unionfs mount, unionfs upper or None) of the scenario."""
    u, k = _build(tmp, fmt)
    if mode == "ro":
        km = kernel_overlay(k)
        um = unionfs(u, None, opts=("ro",))
        upper = None
    else:
        (tmp / "k-up").mkdir()
        km = kernel_overlay(k, tmp / "k-up")
        upper = tmp / "u-up"
        upper.mkdir()
        um = unionfs(u, upper)
    return km.mnt, um.mnt, upper


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_merged_view_matches_kernel(tmp, fmt, mode, unionfs, kernel_overlay):
    kmnt, umnt, upper = _mount_both(tmp, fmt, mode, unionfs, kernel_overlay)
    want, got = snapshot(kmnt), snapshot(umnt)
    assert not diff_snapshots(want, got, ("kernel", "unionfs")), "\n".join(
        diff_snapshots(want, got, ("kernel", "unionfs"))
    )
    # The oracle itself applied every rule (so equality means something).
    for name in HIDDEN:
        assert name not in want, show_path(name)
    for name in ("redir/new", "opq/shown", "opq2/top", "xdir/keep", "xdir/new", "tree/a/b/c/d"):
        assert name in want, name
    assert (kmnt / "opq" / "both").read_text() == "mid\n"
    assert (umnt / "resurrect").read_text() == "top\n"
    assert (umnt / "rel-link").read_text() == "mid\n"
    assert (umnt / "abs-link").read_bytes() == Path("/etc/passwd").read_bytes()
    assert sorted(os.listdir(umnt / "dir-link")) == sorted(os.listdir(kmnt / "dir"))
    assert not [p for p in got if os.path.basename(p).startswith(".wh.")], "markers shown"
    # readdir's d_type is the entry's type, never DT_UNKNOWN, as on the kernel's view.
    kd, ud = _dtypes(kmnt), _dtypes(umnt)
    assert kd == ud, [(d, kd[d], ud.get(d)) for d in kd if kd[d] != ud.get(d)][:3]
    assert not [n for d in ud.values() for n, t in d.items() if t == 0], "DT_UNKNOWN"
    # "." and ".." carry their directories' numbers (their READDIRPLUS entries carry
    # no attributes: the kernel keeps only the dirent of those two).
    assert not _dot_numbers(umnt), _dot_numbers(umnt)[:3]
    # Hard links within a layer: one inode, the kernel's link count.
    ino = {os.lstat(umnt / p).st_ino for p in ("hard1", "hard2", "links/hard3")}
    assert len(ino) == 1, "hard links of one lower file must share st_ino"
    assert got["hard1"][FIELDS.index("nlink")] == os.lstat(kmnt / "hard1").st_nlink == 3
    # Every entry lists the same xattr names; marker xattrs are not readable.
    kx, ux = xattr_names(kmnt), xattr_names(umnt)
    assert kx == ux, [(show_path(p), kx.get(p), ux.get(p)) for p in kx if kx[p] != ux.get(p)]
    for d in ("", "opq", "opq2", "xdir", "dir", "empty-opq", "xattrs"):
        for name in MARKER_XATTRS:
            e = errno_of(lambda d=d, name=name: os.getxattr(umnt / d, name))
            assert e in (errno.ENODATA, errno.EOPNOTSUPP), f"{d or '.'}: {name} readable ({e})"
    if upper is not None:
        assert os.listdir(upper) == [], "reading must not write to the upper"


def test_private_xattrs_of_lower_files_are_hidden(tmp, unionfs, kernel_overlay):
    """xattrs in the overlay namespaces on ordinary lower files are the union's, not the user's."""
    layer: Layer = {"f": File("x\n", xattrs={"user.keep": b"1"}), "d": {}}
    (u,) = make_layers(tmp / "u", [layer], "kernel")
    os.setxattr(u / "f", "trusted.overlay.anything", b"private")
    os.setxattr(u / "f", "user.overlay.anything", b"private")
    os.setxattr(u / "f", "user.fuseoverlayfs.origin", b"f")
    os.setxattr(u / "d", "user.fuseoverlayfs.override_stat", b"0:0:0755")
    umnt = unionfs([u], None, opts=("ro",)).mnt
    assert os.listxattr(umnt / "f") == ["user.keep"]
    assert os.listxattr(umnt / "d") == []
    kmnt = kernel_overlay([u]).mnt
    assert "trusted.overlay.anything" not in os.listxattr(kmnt / "f"), "the kernel hides it too"
    for name in ("trusted.overlay.anything", "user.overlay.anything", "user.fuseoverlayfs.origin"):
        assert errno_of(lambda name=name: os.getxattr(umnt / "f", name)) in (
            errno.ENODATA,
            errno.EOPNOTSUPP,
        ), name


@pytest.mark.parametrize("fmt", ["kernel", "user-xattr", "oci", "fuse-overlayfs"])
@pytest.mark.parametrize("where", ["lower", "upper"])
def test_opaque_marker_on_a_layer_root_is_ignored(tmp, fmt, where, unionfs, kernel_overlay):
    """The kernel never treats a layer's root as opaque (an OCI layer tar may carry
    ``./.wh..wh..opq``; importers turn it into the root's opaque xattr)."""
    f = MARKER_FORMATS[fmt]
    top, bottom = make_layers(tmp / "u", [{"top": "t\n"}, {"bottom": "b\n"}], fmt)
    (tmp / "up").mkdir()
    (tmp / "k-up").mkdir()
    marked = top if where == "lower" else tmp / "up"
    if f.opaque == "oci":
        (marked / ".wh..wh..opq").write_bytes(b"")
    else:
        os.setxattr(marked, f.opaque, b"y")
    kernel_lowers = convert_layers([top, bottom], tmp / "k")
    if where == "upper":
        convert_layer(tmp / "up", tmp / "k-up-conv")
        os.rmdir(tmp / "k-up")
        os.rename(tmp / "k-up-conv", tmp / "k-up")
    kmnt = kernel_overlay(kernel_lowers, tmp / "k-up").mnt
    umnt = unionfs([top, bottom], tmp / "up").mnt
    assert sorted(os.listdir(kmnt)) == ["bottom", "top"]
    assert sorted(os.listdir(umnt)) == sorted(os.listdir(kmnt))


@pytest.mark.parametrize("fmt", ["kernel", "oci", MIXED])
def test_times_and_blocks_match_kernel(tmp, fmt, unionfs, kernel_overlay):
    """mtime, size and st_blocks of every entry are the kernel's (the layer that provides it).

    The kernel side is ``convert_layers`` of the unionfs layers, which keeps times.
    """
    layers = scenario()
    layers[2]["sparse"] = File(b"")
    u = make_layers(tmp / "u", layers, fmt)
    with open(u[2] / "sparse", "r+b") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"data")
    os.utime(u[2] / "sparse", ns=(1, 1_000_000_123))
    k = convert_layers(u, tmp / "k")
    kmnt, umnt = kernel_overlay(k).mnt, unionfs(u, None, opts=("ro",)).mnt

    def times(root: Path) -> dict[str, tuple]:
        out = {}
        for path in [".", *snapshot(root)]:
            st = os.lstat(os.path.join(os.fsencode(root), os.fsencode(path)))
            out[path] = (st.st_mtime_ns, st.st_size, st.st_blocks)
        return out

    want, got = times(kmnt), times(umnt)
    bad = [(show_path(p), want[p], got.get(p)) for p in want if want[p] != got.get(p)]
    assert not bad, f"(mtime_ns, size, blocks) differ, kernel vs unionfs: {bad[:8]}"
    assert got["sparse"][0] == 1_000_000_123
    assert got["sparse"][2] * 512 < (1 << 20), "a sparse file is reported sparse"


# --------------------------------------------------------------------------- inode numbers


def _twin(prefix: str) -> Layer:
    """A layer whose inode numbers repeat in a twin written in the same order."""
    return {
        f"{prefix}-file": f"{prefix}\n",
        "shared": {f"{prefix}-x": f"{prefix}\n", "sub": {f"{prefix}-y": ""}},
        f"{prefix}-h1": f"{prefix} link\n",
        f"{prefix}-h2": Hardlink(f"{prefix}-h1"),
        f"{prefix}-dir": {"z": ""},
        f"{prefix}-link": Symlink("x"),
    }


@pytest.mark.parametrize("mode", MODES)
def test_inode_numbers_unique_consistent_and_stable(tmp, mode):
    """Layers on three filesystems (two fresh tmpfs with colliding inode numbers):
    no two files share an st_ino, readdir's d_ino is lstat's st_ino, and a
    remount gives the same numbers."""
    (tmp / "t1").mkdir()
    (tmp / "t2").mkdir()
    (tmp / "mnt").mkdir()
    disk = make_layers(tmp / "disk", scenario()[1:], "kernel")
    upper = None
    if mode == "empty-upper":
        upper = tmp / "up"
        upper.mkdir()
    with tmpfs(tmp / "t1") as t1, tmpfs(tmp / "t2") as t2:
        a = write_layer(t1 / "a", _twin("a"))
        b = write_layer(t2 / "b", _twin("b"))
        raw_a = {st.st_ino for st in map(os.lstat, a.rglob("*"))}
        raw_b = {st.st_ino for st in map(os.lstat, b.rglob("*"))}
        assert raw_a & raw_b, "precondition: the two tmpfs layers reuse inode numbers"
        lowers = [a, b, *disk]
        opts = ("ro",) if upper is None else ()
        with unionfs_mount(lowers, upper, tmp / "mnt", opts):
            first = inode_map(tmp / "mnt")
            root_ino = os.lstat(tmp / "mnt").st_ino
            devs = {os.lstat(p).st_dev for p in [tmp / "mnt", *first]}
        with unionfs_mount(lowers, upper, tmp / "mnt", opts):
            second = inode_map(tmp / "mnt")
            assert os.lstat(tmp / "mnt").st_ino == root_ino
    mnt = os.fsencode(tmp / "mnt")
    bad = [(p, s, d) for p, (s, d) in first.items() if s != d]
    assert not bad, f"d_ino != st_ino: {bad[:10]}"
    groups = [
        {b"a-h1", b"a-h2"},
        {b"b-h1", b"b-h2"},
        {b"hard1", b"hard2", b"links/hard3"},
        {b"hl-a", b"hl-b"},
    ]
    by_ino: dict[int, set[bytes]] = {}
    for path, (st_ino, _) in first.items():
        by_ino.setdefault(st_ino, set()).add(os.path.relpath(path, mnt))
    shared = [names for names in by_ino.values() if len(names) > 1]
    assert sorted(map(sorted, shared)) == sorted(map(sorted, groups)), (
        "only hard links may share an inode number"
    )
    assert root_ino not in by_ino, "the root's inode number is taken by an entry"
    assert len(devs) == 1, "every entry reports the mount's st_dev"
    assert first == second, "inode numbers must survive a remount"


# --------------------------------------------------------------------------- scale


def test_hundred_layers(tmp, unionfs, kernel_overlay):
    """100 lowers with whiteouts and opaque dirs in every format (mixed stack)."""
    n = 100
    layers: list[dict] = [
        {"common": {f"f{i}": f"{i}\n"}, "shadow": f"layer {i}\n"} for i in range(n)
    ]
    for k in range(6):  # whiteouts in layers 10..15: every format once
        layers[10 + k]["common"][f"f{50 + k}"] = Whiteout()
        layers[40 + k][f"opq{k}"] = Dir({f"o{40 + k}": ""}, opaque=True)
        layers[20][f"opq{k}"] = {"o20": ""}
        for i in range(46, n, 7):
            layers[i][f"opq{k}"] = {f"o{i}": ""}
    u = make_layers(tmp / "u", layers, MIXED)
    k = make_layers(tmp / "k", layers, "kernel")
    want = snapshot(kernel_overlay(k).mnt)
    umnt = unionfs(u, None, opts=("ro",)).mnt
    got = snapshot(umnt)
    assert not diff_snapshots(want, got, ("kernel", "unionfs")), diff_snapshots(want, got)
    assert (umnt / "shadow").read_text() == "layer 0\n"
    assert len([p for p in got if p.startswith("common/")]) == n - 6
    assert sorted(os.listdir(umnt / "opq3")) == ["o20", "o43"]


class _Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    return libc


def _big_layers() -> tuple[list[Layer], set[str]]:
    """5,000 names over 3 layers, with duplicates across layers and whiteouts."""
    top: dict = {}
    mid: dict = {}
    bottom: dict = {}
    for j in range(5000):
        name = f"n{j:05d}"
        [top, mid, bottom][j % 3][name] = ""
        if j % 10 == 0:
            mid[name] = "dup\n"
        if j % 7 == 0:
            bottom[name] = "dup\n"
        if j % 97 == 0 and j % 3 != 0:
            top[name] = Whiteout()
    expected = {f"n{j:05d}" for j in range(5000) if not (j % 97 == 0 and j % 3 != 0)}
    return [top, mid, bottom], expected


def test_big_directory_readdir_seekdir_telldir(tmp, unionfs, kernel_overlay):
    layers, expected = _big_layers()
    u = make_layers(tmp / "u", layers, ["oci", "kernel", "kernel"])
    k = make_layers(tmp / "k", layers, "kernel")
    kmnt = kernel_overlay(k).mnt
    mnt = unionfs(u, None, opts=("ro",)).mnt
    libc = _libc()

    def read_all(dirp: int) -> list[bytes]:
        names = []
        while ent := libc.readdir(dirp):
            names.append(ent.contents.d_name)
        return names

    dirp = libc.opendir(os.fsencode(mnt))
    assert dirp, os.strerror(ctypes.get_errno())
    try:
        start = libc.telldir(dirp)
        head = [libc.readdir(dirp).contents.d_name for _ in range(1000)]
        p1 = libc.telldir(dirp)
        middle = [libc.readdir(dirp).contents.d_name for _ in range(1600)]
        p2 = libc.telldir(dirp)
        tail = read_all(dirp)
        libc.seekdir(dirp, p2)
        again_tail = read_all(dirp)
        libc.seekdir(dirp, p1)
        again_middle = read_all(dirp)
        libc.seekdir(dirp, start)
        again_all = read_all(dirp)
    finally:
        libc.closedir(dirp)
    listing = head + middle + tail
    assert again_tail == tail, "seekdir to a telldir position resumes exactly there"
    assert again_middle == middle + tail
    assert again_all == listing
    names = [n.decode() for n in listing if n not in (b".", b"..")]
    assert len(names) == len(set(names)), "a name was listed twice"
    assert set(names) == expected == set(os.listdir(kmnt))
    assert listing.count(b".") == listing.count(b"..") == 1
    # Two readers interleaved, each on its own handle, each sees every name once.
    with os.scandir(mnt) as a, os.scandir(mnt) as b:
        seen_a, seen_b = [], []
        for ea, eb in zip(a, b, strict=False):
            seen_a.append(ea.name)
            seen_b.append(eb.name)
        seen_a += [e.name for e in a]
        seen_b += [e.name for e in b]
    assert sorted(seen_a) == sorted(seen_b) == sorted(expected)
    # ls -l (readdir + lstat of every entry) prints what it prints on the kernel's view.
    env = {"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TZ": "UTC"}
    ls = ["ls", "-l", "--time-style=+", "--"]
    k_ls = subprocess.run([*ls, str(kmnt)], capture_output=True, text=True, env=env, check=True)
    u_ls = subprocess.run([*ls, str(mnt)], capture_output=True, text=True, env=env, check=True)
    assert len(u_ls.stdout.splitlines()) == len(expected) + 1  # and the "total" line
    assert u_ls.stdout == k_ls.stdout


# --------------------------------------------------------------------------- other ways to run


def test_daemonized_mount_reads_the_same(tmp, unionfs, kernel_overlay):
    """``unionfs-mount`` without -f returns once mounted; the daemon serves the same view."""
    u, k = _build(tmp, "oci")
    want = snapshot(kernel_overlay(k).mnt)
    m = unionfs(u, None, opts=("ro",), foreground=False)
    assert m.proc.poll() is None, "the daemon runs on after the command returned"
    got = snapshot(m.mnt)
    assert not diff_snapshots(want, got), diff_snapshots(want, got)
    m.close()
    assert not os.path.ismount(m.mnt)
    assert m.proc.poll() is not None, "the daemon exits after fusermount3 -u"


def test_unprivileged_user_reads_the_merged_view(unpriv_tmp, unpriv_user, unionfs, kernel_overlay):
    """The user's own layers in rootless format, mounted through setuid fusermount3."""
    user = unpriv_user
    base = unpriv_tmp
    u = make_layers(base / "u", scenario(), "user-xattr")
    k = make_layers(base / "k", scenario(), "kernel")
    (base / "umnt").mkdir()
    for d in ("u", "k", "umnt"):
        chown_tree(base / d, user.uid, user.gid)
    want = run_as(user, snapshot, kernel_overlay(k).mnt)
    m = unionfs(u, None, base / "umnt", opts=("ro",), user=user)
    got = run_as(user, snapshot, m.mnt)
    assert not diff_snapshots(want, got, ("kernel", "unionfs")), diff_snapshots(want, got)
    assert got["no-perms"][FIELDS.index("sha256")] == "error:EACCES"
    with open(f"/proc/{m.proc.pid}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert set(map(int, uids)) == {user.uid}, "the daemon runs as the user"
    entry = mount_entry(m.mnt)
    assert entry is not None and entry.fstype == "fuse.unionfs"
    assert f"user_id={user.uid}" in entry.options, "mounted by the user, not root"
    assert errno_of(lambda: os.stat(m.mnt / "file")) == errno.EACCES, (
        "root is kept out of a user's mount without allow_other"
    )


def _listings_across_a_rewind(mnt: Path) -> dict[str, list[str]]:
    """One open directory read, changed through the mount, then read again from its
    start (os.listdir of a descriptor rewinds the shared stream): POSIX's rewinddir
    shows the directory as it is now."""
    d = mnt / "d"
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = sorted(os.listdir(fd))
        (d / "made").write_text("new\n")
        os.unlink(d / "lowerfile")
        (d / "other").rename(d / "renamed")
        again = sorted(os.listdir(fd))
    finally:
        os.close(fd)
    return {"first": first, "after the rewind": again}


def test_a_rewound_directory_stream_shows_the_changes(tmp, unionfs, kernel_overlay, helper_mode):
    got, want = {}, {}
    for side, out in (("k", want), ("u", got)):
        lower, upper = tmp / f"{side}-lower", tmp / f"{side}-upper"
        (lower / "d").mkdir(parents=True)
        (lower / "d" / "lowerfile").write_text("x\n")
        (lower / "d" / "other").write_text("y\n")
        upper.mkdir()
        if side == "k":
            mnt = kernel_overlay([lower], upper).mnt
        else:
            mnt = unionfs([lower], upper, opts=helper_opts(helper_mode)).mnt
        out.update(_listings_across_a_rewind(mnt))
    assert got == want
    assert want["after the rewind"] == ["made", "renamed"]
