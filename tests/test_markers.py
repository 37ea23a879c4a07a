"""The marker rules, without a mount."""

import stat

import pytest

from unionfs import markers
from unionfs.markers import Opacity


def test_char_whiteout_is_only_0_0():
    assert markers.is_char_whiteout(stat.S_IFCHR | 0o600, 0)
    assert not markers.is_char_whiteout(stat.S_IFCHR | 0o600, (1 << 8) | 3)  # /dev/null
    assert not markers.is_char_whiteout(stat.S_IFBLK, 0)
    assert not markers.is_char_whiteout(stat.S_IFREG, 0)


@pytest.mark.parametrize(
    ("name", "target"),
    [
        (b".wh.foo", b"foo"),
        (b".wh..hidden", b".hidden"),
        (b".wh..wh..opq", None),
        (b".wh.", None),
        (b".wh..", None),
        (b".wh...", None),
        (b"foo", None),
        (b"x.wh.foo", None),
    ],
)
def test_oci_whiteout_target(name, target):
    assert markers.oci_whiteout_target(name) == target


def test_marker_names_are_never_entries():
    assert markers.is_marker_name(b".wh.foo")
    assert markers.is_marker_name(markers.OPAQUE_NAME)
    assert not markers.is_marker_name(b".whfoo")
    assert markers.oci_whiteout_name(b"a b") == b".wh.a b"


def _opacity(xattrs: dict[bytes, bytes]) -> Opacity:
    asked = []

    def get(name):
        asked.append(name)
        return xattrs.get(name)

    result = markers.opacity_from_xattrs(list(xattrs), get)
    assert set(asked) <= set(xattrs), "values are read only for names that exist"
    return result


@pytest.mark.parametrize(
    "xname", [b"trusted.overlay.opaque", b"user.overlay.opaque", b"user.fuseoverlayfs.opaque"]
)
def test_every_opaque_xattr_format(xname):
    assert _opacity({xname: b"y"}) is Opacity.OPAQUE


def test_opacity_values():
    assert _opacity({}) is Opacity.MERGE
    assert _opacity({b"user.other": b"y"}) is Opacity.MERGE
    assert _opacity({b"trusted.overlay.opaque": b"n"}) is Opacity.MERGE
    assert _opacity({b"trusted.overlay.opaque": b"x"}) is Opacity.HAS_XATTR_WHITEOUTS
    assert _opacity({b"user.overlay.opaque": b"x"}) is Opacity.HAS_XATTR_WHITEOUTS
    # fuse-overlayfs never wrote "x": only the kernel's namespaces mean it.
    assert _opacity({b"user.fuseoverlayfs.opaque": b"x"}) is Opacity.MERGE
    # y wins over x whatever the order.
    assert (
        _opacity({b"user.overlay.opaque": b"x", b"trusted.overlay.opaque": b"y"}) is Opacity.OPAQUE
    )


def test_xattr_whiteout_needs_empty_regular_file():
    wx = [b"trusted.overlay.whiteout"]
    assert markers.is_xattr_whiteout(stat.S_IFREG | 0o644, 0, wx)
    assert markers.is_xattr_whiteout(stat.S_IFREG, 0, [b"user.overlay.whiteout"])
    assert not markers.is_xattr_whiteout(stat.S_IFREG, 1, wx)
    assert not markers.is_xattr_whiteout(stat.S_IFDIR, 0, wx)
    assert not markers.is_xattr_whiteout(stat.S_IFREG, 0, [b"user.other"])


def test_private_xattrs_hidden():
    names = [
        b"user.mine",
        b"trusted.overlay.opaque",
        b"user.overlay.origin",
        b"user.fuseoverlayfs.opaque",
        b"security.capability",
        b"trusted.overlay.unionfs.origin",
    ]
    assert markers.visible_xattrs(names) == [b"user.mine", b"security.capability"]
