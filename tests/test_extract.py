"""Hostile layer tars: one test per trick, and nothing is ever written outside.

Each test extracts into ``tmp/layer`` next to ``tmp/outside`` (which holds a
``secret``); absolute names in the tars point at ``outside`` itself.  After
every test the outside tree must be exactly as it was.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import imagetools as it
import pytest

from unionfs import ownership
from unionfs.oci.extract import ExtractStats, LayerError, extract_tar


@pytest.fixture
def sandbox(tmp: Path):
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    layer = tmp / "layer"
    layer.mkdir()
    before = sorted((str(p), p.lstat().st_size, p.lstat().st_nlink) for p in outside.rglob("*"))
    yield layer, outside
    after = sorted((str(p), p.lstat().st_size, p.lstat().st_nlink) for p in outside.rglob("*"))
    assert after == before, "something was written outside the layer"
    assert (outside / "secret").read_bytes() == b"secret"


def extract(layer: Path, entries, privileged: bool = False, use_xattrs: bool = True):
    data = it.tar_bytes(entries) if isinstance(entries, list) else entries
    fd = os.open(layer, os.O_PATH | os.O_DIRECTORY)
    try:
        return extract_tar(io.BytesIO(data), fd, privileged=privileged, use_xattrs=use_xattrs)
    finally:
        os.close(fd)


def override(path: Path) -> ownership.Override | None:
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        return ownership.read_override_xattrs(fd, os.fsencode(path.name))
    finally:
        os.close(fd)


def raw(name: str, type_: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


# -- names --------------------------------------------------------------------------


def test_absolute_name_lands_inside_the_layer(sandbox) -> None:
    layer, outside = sandbox
    extract(layer, [{"name": f"{outside}/pwned", "type": "file", "data": b"x"}])
    assert (layer / str(outside).lstrip("/") / "pwned").read_bytes() == b"x"


@pytest.mark.parametrize("name", ["../pwned", "a/../../pwned", "./../outside/pwned", "a/.."])
def test_dotdot_is_refused(sandbox, name: str) -> None:
    layer, _ = sandbox
    with pytest.raises(LayerError, match=r"'\.\.' component"):
        extract(layer, [{"name": "a", "type": "dir"}, {"name": name, "type": "file"}])


def test_file_through_a_symlink_is_refused(sandbox) -> None:
    layer, outside = sandbox
    for target in (str(outside), "../outside"):
        with pytest.raises(LayerError, match="not a directory"):
            extract(
                layer,
                [
                    {"name": "link", "type": "symlink", "target": target},
                    {"name": "link/pwned", "type": "file", "data": b"x"},
                ],
            )
        (layer / "link").unlink()
    assert not (outside / "pwned").exists()


def test_symlink_replaced_by_a_directory_is_a_directory(sandbox) -> None:
    layer, outside = sandbox
    extract(
        layer,
        [
            {"name": "x", "type": "symlink", "target": str(outside)},
            {"name": "x", "type": "dir"},
            {"name": "x/f", "type": "file", "data": b"in"},
        ],
    )
    assert (layer / "x").is_dir() and not (layer / "x").is_symlink()
    assert (layer / "x/f").read_bytes() == b"in"


def test_symlink_pointing_outside_is_kept_as_text(sandbox) -> None:
    layer, outside = sandbox
    extract(layer, [{"name": "s", "type": "symlink", "target": f"{outside}/secret"}])
    assert os.readlink(layer / "s") == f"{outside}/secret"


def test_over_long_name_is_refused(sandbox) -> None:
    layer, _ = sandbox
    with pytest.raises(LayerError, match="over 255 bytes"):
        extract(layer, [{"name": "d/" + "n" * 300, "type": "file"}])


def test_path_longer_than_path_max_is_extracted(sandbox) -> None:
    """Component by component, a path of 5000 bytes is no problem (GNU longname)."""
    layer, _ = sandbox
    deep = "/".join(["d" * 100] * 50)
    data = it.tar_bytes(
        [{"name": deep + "/f", "type": "file", "data": b"deep"}], tarfile.GNU_FORMAT
    )
    extract(layer, data)
    fd = os.open(layer, os.O_PATH | os.O_DIRECTORY)
    for part in deep.split("/"):
        nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    f = os.open("f", os.O_RDONLY, dir_fd=fd)
    assert os.read(f, 10) == b"deep"
    os.close(f)
    os.close(fd)


def test_invalid_utf8_name_keeps_its_bytes(sandbox) -> None:
    layer, _ = sandbox
    name = os.fsdecode(b"caf\xe9")
    extract(layer, [{"name": name, "type": "file", "data": b"x"}])
    assert os.listdir(os.fsencode(layer)) == [b"caf\xe9"]


def test_pax_global_header_is_not_an_entry(sandbox) -> None:
    layer, _ = sandbox
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"x": "y"}) as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"1"))
    extract(layer, b.getvalue())
    assert sorted(os.listdir(layer)) == ["f"]


# -- hard links ----------------------------------------------------------------------


def test_hard_link_to_outside_is_refused(sandbox) -> None:
    layer, outside = sandbox
    with pytest.raises(LayerError, match=r"'\.\.' component"):
        extract(layer, [{"name": "hl", "type": "link", "target": "../outside/secret"}])
    with pytest.raises(LayerError, match="not in this layer"):
        extract(layer, [{"name": "hl", "type": "link", "target": f"{outside}/secret"}])


def test_hard_link_to_a_missing_target_is_refused(sandbox) -> None:
    layer, _ = sandbox
    with pytest.raises(LayerError, match="not in this layer"):
        extract(
            layer, [{"name": "d", "type": "dir"}, {"name": "hl", "type": "link", "target": "d/x"}]
        )


def test_hard_link_through_a_symlink_is_refused(sandbox) -> None:
    layer, outside = sandbox
    with pytest.raises(LayerError, match="not a directory"):
        extract(
            layer,
            [
                {"name": "s", "type": "symlink", "target": str(outside)},
                {"name": "hl", "type": "link", "target": "s/secret"},
            ],
        )


def test_hard_link_to_a_directory_or_itself_is_refused(sandbox) -> None:
    layer, _ = sandbox
    with pytest.raises(LayerError, match="to a directory"):
        extract(
            layer, [{"name": "d", "type": "dir"}, {"name": "hl", "type": "link", "target": "d"}]
        )
    with pytest.raises(LayerError, match="to itself"):
        extract(layer, [{"name": "me", "type": "link", "target": "me"}])


def test_hard_link_inside_the_layer_shares_the_inode(sandbox) -> None:
    layer, _ = sandbox
    extract(
        layer,
        [
            {"name": "a", "type": "file", "data": b"x"},
            {"name": "d/b", "type": "link", "target": "./a"},
        ],
    )
    assert os.stat(layer / "a").st_ino == os.stat(layer / "d/b").st_ino


# -- whiteouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", "d/.wh.."])
def test_whiteout_of_no_name_dot_or_dotdot_is_refused(sandbox, name: str) -> None:
    layer, _ = sandbox
    with pytest.raises(LayerError, match="whiteout of no valid name"):
        extract(layer, [{"name": name, "type": "file"}])


def test_whiteout_of_an_outside_name_is_refused_or_inside(sandbox) -> None:
    layer, outside = sandbox
    with pytest.raises(LayerError, match=r"'\.\.' component"):
        extract(layer, [{"name": "../.wh.outside", "type": "file"}])
    extract(layer, [{"name": f"{outside}/.wh.secret", "type": "file"}])
    assert (layer / str(outside).lstrip("/") / ".wh.secret").exists()


def test_entry_inside_a_whiteout_is_refused(sandbox) -> None:
    layer, _ = sandbox
    with pytest.raises(LayerError, match="inside the marker"):
        extract(layer, [{"name": ".wh.d/x", "type": "file"}])


def test_whiteout_stored_as_a_hard_link(sandbox) -> None:
    """Seen in the wild (smolvm#397): the name makes it a whiteout, not the type."""
    layer, _ = sandbox
    extract(
        layer,
        [
            {"name": "d/.wh.a", "type": "file"},
            {"name": "d/.wh.b", "type": "link", "target": "d/.wh.a"},
        ],
    )
    assert sorted(os.listdir(layer / "d")) == [".wh.a", ".wh.b"]
    assert (layer / "d/.wh.b").stat().st_size == 0


def test_recreated_directory_is_opaque(sandbox) -> None:
    """``.wh.d`` plus a new ``d/``: lower contents of d must not show through."""
    layer, _ = sandbox
    extract(layer, [{"name": ".wh.d", "type": "file"}, {"name": "d/new", "type": "file"}])
    assert (layer / "d/.wh..wh..opq").exists()
    assert (layer / "d/new").exists()


def test_opaque_marker_after_the_new_children_keeps_them(sandbox) -> None:
    layer, _ = sandbox
    extract(layer, [{"name": "d/new", "type": "file"}, {"name": "d/.wh..wh..opq", "type": "file"}])
    assert sorted(os.listdir(layer / "d")) == [".wh..wh..opq", "new"]


def test_redundant_and_duplicate_whiteouts(sandbox) -> None:
    layer, _ = sandbox
    stats = extract(layer, [{"name": ".wh.gone", "type": "file"}] * 2)
    assert isinstance(stats, ExtractStats) and stats.whiteouts == 2
    assert os.listdir(layer) == [".wh.gone"]


# -- duplicates -------------------------------------------------------------------------------


def test_duplicate_entries_the_last_wins(sandbox) -> None:
    layer, _ = sandbox
    extract(
        layer,
        [
            {"name": "f", "type": "file", "data": b"first"},
            {"name": "f", "type": "file", "data": b"second"},
            {"name": "d", "type": "dir", "mode": 0o700},
            {"name": "d/x", "type": "file"},
            {"name": "d", "type": "dir", "mode": 0o755},
        ],
        privileged=True,
    )
    assert (layer / "f").read_bytes() == b"second"
    assert (layer / "d/x").exists() and stat.S_IMODE((layer / "d").stat().st_mode) == 0o755


def test_a_file_replacing_a_directory_is_refused(sandbox) -> None:
    layer, _ = sandbox
    with pytest.raises(LayerError, match="would replace a directory"):
        extract(layer, [{"name": "d/x", "type": "file"}, {"name": "d", "type": "file"}])


# -- devices, setuid, xattrs -------------------------------------------------------------------


def test_device_nodes_without_privilege_are_recorded(sandbox) -> None:
    layer, _ = sandbox
    extract(
        layer,
        [
            {"name": "null", "type": "char", "major": 1, "minor": 3, "mode": 0o666},
            {"name": "sda", "type": "block", "major": 8, "minor": 0, "mode": 0o660, "gid": 6},
            {"name": "fifo", "type": "fifo", "mode": 0o644, "uid": 5},
        ],
    )
    st = (layer / "null").lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    assert override(layer / "null") == ownership.Override(0, 0, 0o666, "char", os.makedev(1, 3))
    assert override(layer / "sda") == ownership.Override(0, 6, 0o660, "block", os.makedev(8, 0))
    assert stat.S_ISFIFO((layer / "fifo").lstat().st_mode)
    fd = os.open(layer, os.O_PATH | os.O_DIRECTORY)
    table = ownership.read_table(fd)
    os.close(fd)
    assert table == {b"fifo": ownership.Override(5, 0, 0o644, "pipe")}


@pytest.mark.skipif(os.geteuid() != 0, reason="real devices need root")
def test_device_nodes_as_root_are_real(sandbox) -> None:
    layer, _ = sandbox
    extract(layer, [{"name": "null", "type": "char", "major": 1, "minor": 3}], privileged=True)
    st = (layer / "null").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_setuid_file_without_privilege(sandbox) -> None:
    layer, _ = sandbox
    extract(layer, [{"name": "su", "type": "file", "mode": 0o4755, "data": b"x"}])
    assert stat.S_IMODE((layer / "su").stat().st_mode) == 0o755  # no real setuid bit
    assert override(layer / "su") == ownership.Override(0, 0, 0o4755, "file")


def _acl() -> bytes:
    """A POSIX ACL xattr with a named user (a minimal one is folded into the mode)."""
    entries = [
        (0x01, 6, 0xFFFFFFFF),
        (0x02, 4, 1234),
        (0x04, 4, 0xFFFFFFFF),
        (0x10, 4, 0xFFFFFFFF),
        (0x20, 4, 0xFFFFFFFF),
    ]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_pax_xattrs_of_every_namespace(sandbox) -> None:
    layer, _ = sandbox
    xattrs = {
        "user.keep": "v",
        "user.overlay.opaque": "y",
        "trusted.overlay.opaque": "y",
        "user.fuseoverlayfs.override_stat": "0:0:4755",
        "user.containers.override_stat": "0:0:4755",
        "user.rootlesscontainers": "\x08\x01",
        "security.capability": "\x01\x00\x00\x02",
        "security.selinux": "system_u:object_r:bin_t:s0",
        "trusted.foo": "t",
        "system.posix_acl_access": _acl().decode("latin-1"),
        "system.weird": "w",
        "weird.ns": "w",
    }
    ti = raw("f", size=0, uid=5)
    ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
    ti.pax_headers["SCHILY.xattr.system.posix_acl_access"] = _acl().decode(
        "utf-8", "surrogateescape"
    )
    stats = extract(layer, it.tar_bytes([ti]))
    names = set(os.listxattr(layer / "f"))
    assert "user.keep" in names
    assert "user.containers.override_security.capability" in names  # saved, fuse-overlayfs' way
    assert "user.containers.override_trusted.foo" in names
    assert "system.posix_acl_access" in names
    for dropped in ("user.overlay.opaque", "trusted.overlay.opaque", "security.selinux"):
        assert dropped not in names
    assert (
        "user.rootlesscontainers" not in names and "user.fuseoverlayfs.override_stat" not in names
    )
    # The layer's own ownership claim was dropped: the override is the tar header's.
    assert override(layer / "f") == ownership.Override(5, 0, 0o644, "file")
    assert {"system.weird", "weird.ns", "user.overlay.opaque"} <= set(stats.dropped_xattrs)


@pytest.mark.skipif(os.geteuid() != 0, reason="security.* and trusted.* xattrs need root")
def test_privileged_xattrs_as_root(sandbox) -> None:
    layer, _ = sandbox
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    ti = raw("f", size=0, mode=0o755)
    ti.pax_headers = {
        "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.trusted.foo": "t",
        "SCHILY.xattr.trusted.overlay.whiteout": "y",
    }
    extract(layer, it.tar_bytes([ti]), privileged=True)
    assert os.getxattr(layer / "f", "security.capability") == cap
    assert os.getxattr(layer / "f", "trusted.foo") == b"t"
    assert "trusted.overlay.whiteout" not in os.listxattr(layer / "f")


def test_ownership_goes_to_the_side_table_without_user_xattrs(sandbox) -> None:
    layer, _ = sandbox
    extract(
        layer,
        [
            {"name": "etc", "type": "dir", "mode": 0o755},
            {"name": "etc/shadow", "type": "file", "mode": 0o640, "gid": 42},
            {"name": "lnk", "type": "symlink", "target": "etc/shadow", "uid": 7},
        ],
        use_xattrs=False,
    )
    assert override(layer / "etc/shadow") is None
    fd = os.open(layer, os.O_PATH | os.O_DIRECTORY)
    table = ownership.read_table(fd)
    os.close(fd)
    assert table is not None
    assert table[b"etc/shadow"] == ownership.Override(0, 42, 0o640, "file")
    assert table[b"lnk"] == ownership.Override(7, 0, 0o777, "symlink")
    assert table[b""] == ownership.Override(0, 0, 0o755, "dir")


def test_not_a_tar(sandbox) -> None:
    layer, _ = sandbox
    with pytest.raises(LayerError):
        extract(layer, b"this is not a tar archive at all" * 40)


def test_unsupported_entry_type(sandbox) -> None:
    layer, _ = sandbox
    with pytest.raises(LayerError, match="unsupported type"):
        extract(layer, it.tar_bytes([raw("x", b"V")]))  # a GNU volume header


def test_hard_link_whose_target_walk_outgrows_the_descriptor_cache(sandbox) -> None:
    """Walking to a deep target opens more directories than the extractor keeps
    open; the link's own directory must stay open (and be the right one)."""
    layer, _ = sandbox
    chain = "/".join(["c"] * 150)
    entries = [{"name": f"{chain}/f", "type": "file", "data": b"deep"}]
    entries += [{"name": f"x{i:03d}/g", "type": "file"} for i in range(130)]
    entries += [{"name": "x000/hl", "type": "link", "target": f"{chain}/f"}]
    extract(layer, entries)
    assert (layer / "x000/hl").read_bytes() == b"deep"
    assert os.stat(layer / "x000/hl").st_ino == os.stat(layer / chain / "f").st_ino


def test_whiteout_below_a_whited_out_directory(sandbox) -> None:
    """``rm -rf /foo/bar`` seen by a naive differ: ``.wh.foo`` plus
    ``foo/.wh.bar``.  foo is deleted, not shown as an empty directory."""
    layer, _ = sandbox
    extract(layer, [{"name": "foo/.wh.bar", "type": "file"}, {"name": ".wh.foo", "type": "file"}])
    assert os.listdir(layer) == [".wh.foo"]
    # But a directory the tar itself re-creates stays, opaque.
    extract(
        layer,
        [
            {"name": "d", "type": "dir"},
            {"name": "d/.wh.x", "type": "file"},
            {"name": ".wh.d", "type": "file"},
        ],
    )
    assert sorted(os.listdir(layer / "d")) == [".wh..wh..opq", ".wh.x"]


def test_short_data_stream_is_a_layer_error(sandbox) -> None:
    # The header says 10000 bytes, 2000 follow: tarfile raises ReadError from the
    # member's read(), which must become the one-line LayerError too.
    layer, _ = sandbox
    ti = tarfile.TarInfo("big")
    ti.size = 10000
    data = ti.tobuf(tarfile.PAX_FORMAT) + b"x" * 2000
    with pytest.raises(LayerError, match="corrupt tar: entry 'big'"):
        extract(layer, data)


@pytest.mark.parametrize("fmt", [["--format=gnu"], ["--format=pax", "--sparse-version=1.0"]])
def test_sparse_entries_keep_their_holes(sandbox, tmp: Path, fmt: list[str]) -> None:
    """Review finding 5: ``tar --sparse`` of a 100 MiB file holding 8 KiB of data
    is extracted with its holes (umoci keeps them), the same bytes read back."""
    layer, _ = sandbox
    src = tmp / "src"
    src.mkdir()
    with open(src / "f", "wb") as f:
        f.truncate(100 << 20)
        f.seek(50 << 20)
        f.write(b"a" * 4096)
        f.seek((100 << 20) - 4096)
        f.write(b"z" * 4096)
    (src / "g").write_bytes(b"plain")
    tar = tmp / "s.tar"
    subprocess.run(["tar", "--sparse", *fmt, "-cf", str(tar), "-C", str(src), "f", "g"], check=True)
    extract(layer, tar.read_bytes())
    st = os.stat(layer / "f")
    assert st.st_size == 100 << 20
    assert st.st_blocks * 512 < 1 << 20  # holes, not 100 MiB of zeros
    with open(layer / "f", "rb") as f:
        assert f.read(4096) == b"\0" * 4096
        f.seek(50 << 20)
        assert f.read(4097) == b"a" * 4096 + b"\0"
        f.seek((100 << 20) - 4096)
        assert f.read() == b"z" * 4096
    assert (layer / "g").read_bytes() == b"plain"
