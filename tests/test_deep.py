"""Deep stacks: the per-layer name index must give the same answers as probing."""

from __future__ import annotations

import os
import stat

import pytest

from support import diff_snapshots, kernel_overlay, snapshot, unionfs_mount

LAYERS = 12


def build(base):
    """Twelve lowers; names spread over them, whiteouts and an opaque dir in between."""
    lowers = []
    for i in range(LAYERS):
        layer = base / f"l{i:02d}"
        (layer / "usr/lib").mkdir(parents=True)
        (layer / "usr/lib" / f"only{i}").write_text(f"{i}\n")
        (layer / "usr/lib" / "shared").write_text(f"top is {i}\n")
        (layer / "etc").mkdir()
        (layer / "etc" / f"conf{i}").write_text(f"{i}\n")
        lowers.append(layer)
    # Layer 3 deletes names that layers below it hold.
    os.mknod(lowers[3] / "usr/lib" / "only7", stat.S_IFCHR, 0)
    os.mknod(lowers[3] / "usr/lib" / "only9", stat.S_IFCHR, 0)
    # Layer 5 makes etc opaque: conf6.. are gone, conf0..5 stay.
    os.setxattr(lowers[5] / "etc", "trusted.overlay.opaque", b"y")
    return lowers


def expected_names():
    lib = {f"only{i}" for i in range(LAYERS)} - {"only7", "only9"} | {"shared"}
    etc = {f"conf{i}" for i in range(6)}
    return lib, etc


@pytest.mark.skipif(os.geteuid() != 0, reason="trusted xattrs and kernel overlayfs need root")
def test_deep_stack_matches_kernel_and_lookups_agree(tmp_path):
    lowers = build(tmp_path / "layers")
    for d in ("u", "m", "ku", "kw", "km"):
        (tmp_path / d).mkdir()
    lib, etc = expected_names()
    with unionfs_mount(lowers, tmp_path / "u", tmp_path / "m"):
        m = tmp_path / "m"
        # Lookups before any listing (the index is built by lookup), then after.
        for round_ in range(2):
            for i in range(LAYERS + 2):
                assert (m / "usr/lib" / f"only{i}").exists() == (f"only{i}" in lib), (round_, i)
                assert (m / "etc" / f"conf{i}").exists() == (f"conf{i}" in etc), (round_, i)
            assert (m / "usr/lib/shared").read_text() == "top is 0\n"
            assert set(os.listdir(m / "usr/lib")) == lib
            assert set(os.listdir(m / "etc")) == etc
        # A name created and deleted through the mount is seen at once.
        (m / "usr/lib/only7").write_text("back\n")
        assert (m / "usr/lib/only7").read_text() == "back\n"
        (m / "usr/lib/only3").unlink()
        assert not (m / "usr/lib/only3").exists()
        got = snapshot(m)
    with kernel_overlay(lowers, tmp_path / "ku", tmp_path / "kw", tmp_path / "km"):
        k = tmp_path / "km"
        (k / "usr/lib/only7").write_text("back\n")
        (k / "usr/lib/only3").unlink()
        want = snapshot(k)
    assert not diff_snapshots(want, got), diff_snapshots(want, got)
