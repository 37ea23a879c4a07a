"""Whiteout and opaque-directory markers, in every on-disk format in use.

This module is the single owner of the marker formats: what counts as a
whiteout or an opaque directory when *reading* a layer, and which names and
extended attributes are private to the union and must never show through the
merged view.  Layers unpacked by Docker/podman (OCI ``.wh.`` files), written by
kernel overlayfs (char device 0/0, ``overlay.opaque`` xattrs, xattr whiteouts)
or by fuse-overlayfs (``user.fuseoverlayfs.opaque``) all stack as they are.

Everything here is pure: callers pass in what they already read (a stat
result, a name, a list of xattr names, an xattr value), so the rules test
without a mount.  See docs/markers.md for the table of formats.
"""

from __future__ import annotations

import enum
import os
import stat as stat_mod
from collections.abc import Callable, Iterable

#: OCI/AUFS whiteout prefix: an entry ``.wh.NAME`` hides ``NAME`` in lower layers.
WHITEOUT_PREFIX = b".wh."
#: OCI/AUFS opaque marker: a file of this name makes its directory opaque.
OPAQUE_NAME = b".wh..wh..opq"

#: Opaque-directory xattrs, kernel (rootful, rootless) and fuse-overlayfs C.
OPAQUE_XATTRS = (
    b"trusted.overlay.opaque",
    b"user.overlay.opaque",
    b"user.fuseoverlayfs.opaque",
)
#: Xattrs that turn a zero-size regular file into a whiteout, but only inside a
#: directory whose ``overlay.opaque`` is ``x`` (the kernel's rule).
WHITEOUT_XATTRS = (b"trusted.overlay.whiteout", b"user.overlay.whiteout")

#: A regular file in the upper carrying one of these holds metadata only: its
#: data is the lower file's (kernel overlayfs' ``metacopy=on``).  The value is
#: empty, or the kernel's v2 form (version, length, flags, fs-verity digest).
METACOPY_XATTRS = (b"trusted.overlay.metacopy", b"user.overlay.metacopy")
#: Where kernel overlayfs records the lower path of a renamed metacopy file
#: (absolute from the layer root when it starts with ``/``, else a name in the
#: same directory).
REDIRECT_XATTRS = (b"trusted.overlay.redirect", b"user.overlay.redirect")

#: Xattr namespaces owned by union filesystems: hidden from the merged view and
#: refused when a user tries to set them through the mount.
PRIVATE_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.")


class Opacity(enum.Enum):
    """How a directory in one layer relates to the layers below it."""

    #: Merges with the same directory in lower layers.
    MERGE = "merge"
    #: Hides everything below it (``overlay.opaque=y`` or ``.wh..wh..opq``).
    OPAQUE = "opaque"
    #: Merges, but may contain xattr whiteouts (``overlay.opaque=x``).
    HAS_XATTR_WHITEOUTS = "x"


def is_char_whiteout(st_mode: int, st_rdev: int) -> bool:
    """A character device 0/0 is a whiteout (kernel overlayfs, fuse-overlayfs)."""
    return stat_mod.S_ISCHR(st_mode) and st_rdev == 0


def is_marker_name(name: bytes) -> bool:
    """Names starting with ``.wh.`` are OCI markers and never merged-view entries.

    This also covers ``.wh..wh..opq``.  Such names cannot be represented in an
    OCI layer, so the union never shows or creates them.
    """
    return name.startswith(WHITEOUT_PREFIX)


def oci_whiteout_target(name: bytes) -> bytes | None:
    """The name hidden by an OCI whiteout entry, or None if ``name`` is not one.

    ``.wh..wh..opq`` is the opaque marker, and ``.wh.``, ``.wh..``, ``.wh...``
    hide nothing real (moby rejects them as invalid), so they return None.
    """
    if not name.startswith(WHITEOUT_PREFIX) or name == OPAQUE_NAME:
        return None
    target = name[len(WHITEOUT_PREFIX) :]
    if target in (b"", b".", b".."):
        return None
    return target


def oci_whiteout_name(name: bytes) -> bytes:
    """The OCI whiteout entry that hides ``name``."""
    return WHITEOUT_PREFIX + name


def opacity_from_xattrs(names: Iterable[bytes], get: Callable[[bytes], bytes | None]) -> Opacity:
    """Classify a directory from its xattrs.

    ``names`` is the directory's xattr list (one listxattr call) and ``get``
    reads one value; values are only fetched for marker names that are
    present, so an unmarked directory costs no getxattr at all.  The value must
    start with ``y`` (fuse-overlayfs accepts ``y`` followed by anything, the
    kernel writes exactly ``y``); ``x`` means "merge, but look for xattr
    whiteouts".
    """
    present = set(names)
    result = Opacity.MERGE
    for xname in OPAQUE_XATTRS:
        if xname not in present:
            continue
        value = get(xname) or b""
        if value.startswith(b"y"):
            return Opacity.OPAQUE
        if value.startswith(b"x") and not xname.startswith(b"user.fuseoverlayfs."):
            result = Opacity.HAS_XATTR_WHITEOUTS
    return result


def is_xattr_whiteout(st_mode: int, st_size: int, xattr_names: Iterable[bytes]) -> bool:
    """A zero-size regular file carrying an ``overlay.whiteout`` xattr.

    Only meaningful inside a directory classified HAS_XATTR_WHITEOUTS; the
    caller checks that, so that ordinary empty files cost nothing.
    """
    if not stat_mod.S_ISREG(st_mode) or st_size != 0:
        return False
    return any(x in WHITEOUT_XATTRS for x in xattr_names)


def metacopy_marker(st_mode: int, xattr_names: Iterable[bytes]) -> bytes | None:
    """The metacopy xattr a regular file carries (None: its data is its own)."""
    if not stat_mod.S_ISREG(st_mode):
        return None
    present = set(xattr_names)
    return next((x for x in METACOPY_XATTRS if x in present), None)


def valid_metacopy_value(value: bytes) -> bool:
    """Is this a metacopy value kernel overlayfs accepts? Empty, or its v2 form:
    version 0, a length byte equal to the value's length (4 header bytes, then
    an optional fs-verity digest of at most 64 bytes), flags, digest algorithm."""
    if not value:
        return True
    return 4 <= len(value) <= 68 and value[0] == 0 and value[1] == len(value)


def redirect_path(value: bytes, dirpath: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
    """The merged path a redirect xattr names, or None when it is malformed.

    Absolute values (``/a/b``) count from the root, relative ones are a name in
    ``dirpath``; empty components, ``.`` and ``..`` are refused, so a redirect
    can never climb out of the layers.
    """
    if not value:
        return None
    parts = value.strip(b"/").split(b"/") if value.startswith(b"/") else [value]
    if any(p in (b"", b".", b"..") or b"\0" in p for p in parts):
        return None
    if not value.startswith(b"/") and len(parts) != 1:
        return None
    return tuple(parts) if value.startswith(b"/") else (*dirpath, parts[0])


def is_private_xattr(name: bytes) -> bool:
    """True for union-owned xattrs, which the merged view neither shows nor sets."""
    return name.startswith(PRIVATE_XATTR_PREFIXES)


def visible_xattrs(names: Iterable[bytes]) -> list[bytes]:
    """Filter a listxattr result down to what a user of the mount may see."""
    return [n for n in names if not is_private_xattr(n)]


# -- writing -------------------------------------------------------------------


class Writer:
    """How this mount writes markers into the upper.

    ``kernel`` (the default) writes what kernel overlayfs writes: char device
    0/0 whiteouts and ``overlay.opaque=y``, in ``trusted.`` when root and
    ``user.`` otherwise (kernel overlayfs reads the latter with ``-o
    userxattr``).  ``oci`` writes ``.wh.NAME`` files and ``.wh..wh..opq``.
    """

    def __init__(self, fmt: str, xattr_ns: bytes) -> None:
        self.fmt = fmt
        self.xattr_ns = xattr_ns
        self.opaque_xattr = xattr_ns + b"overlay.opaque"
        #: Where a copied-up object's original inode number is kept, so that
        #: st_ino survives remounts.  Inside the overlay namespace, which kernel
        #: overlayfs hides from its users and otherwise ignores.
        self.origin_xattr = xattr_ns + b"overlay.unionfs.origin"
        #: On an indexed copy of a hard-linked lower file: its lower names not
        #: linked to the copy yet, so that st_nlink counts every merged name.
        self.lower_links_xattr = xattr_ns + b"overlay.unionfs.lowerlinks"
        #: Marks a metadata-only copy (see METACOPY_XATTRS); written only by root
        #: mounts with ``-o metacopy=on``, the only kind the kernel can read.
        self.metacopy_xattr = xattr_ns + b"overlay.metacopy"

    def make_whiteout(self, dir_fd: int, name: bytes) -> None:
        """Create a whiteout for ``name`` in the directory ``dir_fd``."""
        if self.fmt == "oci":
            fd = os.open(
                oci_whiteout_name(name),
                os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
                dir_fd=dir_fd,
            )
            os.close(fd)
        else:
            os.mknod(name, stat_mod.S_IFCHR, 0, dir_fd=dir_fd)

    def set_opaque(self, dir_fd: int) -> None:
        """Mark the directory ``dir_fd`` (an O_PATH descriptor) opaque."""
        if self.fmt == "oci":
            fd = os.open(
                OPAQUE_NAME,
                os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
                dir_fd=dir_fd,
            )
            os.close(fd)
        else:
            os.setxattr(b"/proc/self/fd/%d" % dir_fd, self.opaque_xattr, b"y")


def probe_opaque(writer: Writer, dir_fd: int) -> bool:
    """Can the opaque xattr be set in this filesystem (user xattrs may be missing)?"""
    name = b"#opaque-probe.%d" % os.getpid()
    os.mkdir(name, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=dir_fd)
        try:
            writer.set_opaque(fd)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        os.rmdir(name, dir_fd=dir_fd)


def probe_whiteout(dir_fd: int) -> bool:
    """Can this process create char-0/0 whiteouts here? (Linux >= 5.8 lets anyone.)"""
    name = b"#whiteout-probe.%d" % os.getpid()
    try:
        os.mknod(name, stat_mod.S_IFCHR, 0, dir_fd=dir_fd)
    except OSError:
        return False
    os.unlink(name, dir_fd=dir_fd)
    return True
