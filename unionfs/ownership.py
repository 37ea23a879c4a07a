"""Owners, modes and device numbers kept as metadata, for users who cannot chown.

An unprivileged user who unpacks an image owns every file it makes and cannot
create device nodes.  The image's real ``uid:gid:mode`` (and the device type)
is kept beside each object instead, in the formats the rootless container
tools already use, so a layer unpacked here stacks under fuse-overlayfs or
podman's ``force_mask`` and a layer unpacked by umoci stacks here:

- ``user.containers.override_stat`` = ``"UID:GID:MODE[:TYPE]"`` (containers/
  storage and fuse-overlayfs >= 1.14; TYPE is ``file``, ``dir``, ``symlink``,
  ``pipe``, ``socket``, ``block-MAJ-MIN`` or ``char-MAJ-MIN``).  Written here.
- ``user.fuseoverlayfs.override_stat`` (fuse-overlayfs <= 1.13, ``"%d:%d:%o"``
  whose mode may carry S_IFMT bits) and ``security.fuseoverlayfs.override_stat``:
  read.
- ``user.rootlesscontainers`` (umoci, PRoot forks, Apptainer): a protobuf of
  two varint fields, uid = 1 and gid = 2, where 0xFFFFFFFF stands for 0.  Read.
- A side table where an xattr cannot be set: Linux allows ``user.*`` xattrs
  only on regular files and directories, so symlinks, FIFOs and sockets (and
  every object on a filesystem without user xattrs, such as NFS) are recorded
  in ``.wh..wh.unionfs.ownership`` at the layer's root.  That name begins with
  ``.wh.``, so the union never shows it, and a kernel mount of the layer hides
  nothing real with it.

One implementation for the extractor (writes), the mount (reads and, on
chown/chmod/mknod through a rootless mount, writes) and the layer exporter
(reads).  The functions below are pure except the ``read_*``/``write_*``
ones, which touch exactly one object through a directory descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
from collections import abc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

#: containers/storage and fuse-overlayfs >= 1.14: the format written here.
CONTAINERS_XATTR = b"user.containers.override_stat"
#: fuse-overlayfs <= 1.13 with xattr_permissions=2.
FUSEOVERLAYFS_XATTR = b"user.fuseoverlayfs.override_stat"
#: fuse-overlayfs with xattr_permissions=1 (needs privilege to write).
SECURITY_XATTR = b"security.fuseoverlayfs.override_stat"
#: umoci --rootless, PRoot forks, Apptainer --fakeroot.
ROOTLESS_XATTR = b"user.rootlesscontainers"
#: Read in this order: the first present wins.
OVERRIDE_XATTRS = (CONTAINERS_XATTR, SECURITY_XATTR, FUSEOVERLAYFS_XATTR)
#: Every xattr that carries ownership: hidden from the merged view and never
#: set from an image (a layer must not forge the owner of its own files).
OWNERSHIP_XATTRS = frozenset((*OVERRIDE_XATTRS, ROOTLESS_XATTR))
#: fuse-overlayfs (containers mode) keeps xattrs the process may not set under
#: this prefix, e.g. ``user.containers.override_security.capability``.
SAVED_XATTR_PREFIX = b"user.containers.override_"

#: The side table's name at the layer root.
SIDE_TABLE = b".wh..wh.unionfs.ownership"

#: The id fuse-overlayfs shows for an id outside every mapping.
OVERFLOW_ID = 65534

_KIND_BITS = {
    "file": stat_mod.S_IFREG,
    "dir": stat_mod.S_IFDIR,
    "symlink": stat_mod.S_IFLNK,
    "pipe": stat_mod.S_IFIFO,
    "socket": stat_mod.S_IFSOCK,
    "block": stat_mod.S_IFBLK,
    "char": stat_mod.S_IFCHR,
}
_BITS_KIND = {v: k for k, v in _KIND_BITS.items()}


@dataclass(frozen=True, slots=True)
class Override:
    """What an object shows instead of its real owner, mode and type.

    ``mode`` holds permission bits only (07777); None means "the real file's"
    (``user.rootlesscontainers`` records owners only).  ``kind`` None means
    the real file's type.  ``rdev`` is meaningful for ``block``/``char``.
    """

    uid: int
    gid: int
    mode: int | None = None
    kind: str | None = None
    rdev: int = 0

    def st_mode(self, real_mode: int) -> int:
        """The full st_mode shown: the recorded type and bits over the real ones."""
        fmt = _KIND_BITS[self.kind] if self.kind else stat_mod.S_IFMT(real_mode)
        perm = stat_mod.S_IMODE(real_mode) if self.mode is None else self.mode
        return fmt | perm


# -- value formats (pure) ------------------------------------------------------


def kind_of(st_mode: int) -> str:
    """The override TYPE word of a file type (S_IFMT bits)."""
    return _BITS_KIND[stat_mod.S_IFMT(st_mode)]


def format_override(ov: Override) -> bytes:
    """``"UID:GID:MODE:TYPE"`` as containers/storage writes it (``"%d:%d:%04o:%s"``)."""
    mode = 0 if ov.mode is None else ov.mode
    value = f"{ov.uid}:{ov.gid}:{mode:04o}"
    if ov.kind in ("block", "char"):
        value += f":{ov.kind}-{os.major(ov.rdev)}-{os.minor(ov.rdev)}"
    elif ov.kind:
        value += f":{ov.kind}"
    return value.encode()


def parse_override(value: bytes) -> Override:
    """Parse any override_stat value (3 or 4 fields); ValueError when malformed.

    fuse-overlayfs C writes the mode with its S_IFMT bits (``0:0:40755``); the
    type then comes from those bits when there is no fourth field.
    """
    fields = value.rstrip(b"\0").decode("ascii").split(":")
    if len(fields) not in (3, 4):
        raise ValueError(f"override_stat needs 3 or 4 fields: {value!r}")
    uid, gid = int(fields[0]), int(fields[1])
    raw_mode = int(fields[2], 8)
    if not (0 <= uid < 2**32 and 0 <= gid < 2**32 and 0 <= raw_mode < 2**32):
        raise ValueError(f"override_stat out of range: {value!r}")
    kind: str | None = None
    rdev = 0
    if len(fields) == 4:
        word, _, dev = fields[3].partition("-")
        if word not in _KIND_BITS:
            raise ValueError(f"override_stat has an unknown type: {value!r}")
        kind = word
        if word in ("block", "char"):
            major, _, minor = dev.partition("-")
            rdev = os.makedev(int(major), int(minor))
    elif stat_mod.S_IFMT(raw_mode) in _BITS_KIND:
        kind = _BITS_KIND[stat_mod.S_IFMT(raw_mode)]
    return Override(uid, gid, raw_mode & 0o7777, kind, rdev)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_rootless(uid: int, gid: int) -> bytes | None:
    """umoci's ``user.rootlesscontainers`` value; None when both are 0 (it omits it)."""
    if uid == 0 and gid == 0:
        return None
    return b"\x08" + _varint(uid or 0xFFFFFFFF) + b"\x10" + _varint(gid or 0xFFFFFFFF)


def decode_rootless(value: bytes) -> tuple[int, int]:
    """``(uid, gid)`` from a ``user.rootlesscontainers`` protobuf; ValueError if malformed.

    Field 1 is the uid, field 2 the gid, both varints; 0xFFFFFFFF means 0 and
    an absent field means 0 too.  Unknown varint fields are skipped.
    """
    ids = {1: 0, 2: 0}
    i = 0
    while i < len(value):
        key, i = _read_varint(value, i)
        if key & 7 != 0:
            raise ValueError("user.rootlesscontainers: only varint fields are expected")
        n, i = _read_varint(value, i)
        if key >> 3 in ids:
            ids[key >> 3] = 0 if n == 0xFFFFFFFF else n
    return ids[1], ids[2]


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("user.rootlesscontainers: truncated varint")
        byte = data[i]
        i += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, i


# -- id mapping (pure) ---------------------------------------------------------

IdMap = tuple[tuple[int, int, int], ...]


def parse_idmap(spec: str) -> IdMap:
    """fuse-overlayfs' ``uidmapping=C:H:S[:C:H:S...]``; ValueError when malformed."""
    parts = spec.split(":")
    if not spec or len(parts) % 3:
        raise ValueError(f"a mapping is CONTAINER:HOST:SIZE[:...], not {spec!r}")
    if not all(p.isdigit() and p.isascii() for p in parts):
        raise ValueError(f"a mapping is CONTAINER:HOST:SIZE[:...] of whole numbers, not {spec!r}")
    nums = [int(p) for p in parts]
    ranges = tuple((nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3))
    if any(size == 0 for _, _, size in ranges):
        raise ValueError(f"empty range in mapping {spec!r}")
    return ranges


def to_container(idmap: IdMap, host_id: int) -> int:
    """An on-disk (host) id as the mount shows it; OVERFLOW_ID when unmapped."""
    for cont, host, size in idmap:
        if host <= host_id < host + size:
            return cont + host_id - host
    return OVERFLOW_ID


def to_host(idmap: IdMap, cont_id: int) -> int | None:
    """A shown (container) id as it goes to disk; None when no range holds it."""
    for cont, host, size in idmap:
        if cont <= cont_id < cont + size:
            return host + cont_id - cont
    return None


# -- reading and writing one object ---------------------------------------------


def _proc(dir_fd: int, name: bytes | None) -> bytes:
    """The /proc path of an object for the xattr calls, which take no dir_fd.

    Use with ``follow_symlinks=name is None``: the magic link itself must be
    followed (to the object, never further), a final name must not.
    """
    base = b"/proc/self/fd/%d" % dir_fd
    return base if name is None else base + b"/" + name


def read_override_xattrs(dir_fd: int, name: bytes | None) -> Override | None:
    """The override recorded in an object's xattrs, in any format, or None.

    ``name`` None means the directory ``dir_fd`` itself.  A malformed value
    counts as absent (the real attributes show), never as an error.
    """
    path = _proc(dir_fd, name)
    try:  # one listing, then only the values present: most objects have none
        present = set(map(os.fsencode, os.listxattr(path, follow_symlinks=name is None)))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise
    values: dict[bytes, bytes] = {}
    for xname in (*OVERRIDE_XATTRS, ROOTLESS_XATTR):
        if xname not in present:
            continue
        try:
            values[xname] = os.getxattr(path, xname, follow_symlinks=name is None)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                continue
            raise
    return from_xattrs(values)


def from_xattrs(values: abc.Mapping[bytes, bytes]) -> Override | None:
    """The override among xattr values already read (name -> value), or None.

    For tools that list and read an object's xattrs themselves (the layer
    exporter): the same precedence and the same tolerance as the mount.
    """
    for xname in (*OVERRIDE_XATTRS, ROOTLESS_XATTR):
        value = values.get(xname)
        if value is None:
            continue
        try:
            if xname == ROOTLESS_XATTR:
                uid, gid = decode_rootless(value)
                return Override(uid, gid)
            return parse_override(value)
        except (ValueError, UnicodeDecodeError):
            continue
    return None


def shown_stat(st: os.stat_result, ov: Override | None) -> tuple[int, int, int, int]:
    """(st_mode, st_uid, st_gid, st_rdev) an object shows, its override applied."""
    if ov is None:
        return st.st_mode, st.st_uid, st.st_gid, st.st_rdev
    rdev = ov.rdev if ov.kind in ("block", "char") else st.st_rdev
    return ov.st_mode(st.st_mode), ov.uid, ov.gid, rdev


def write_override_xattr(dir_fd: int, name: bytes | None, ov: Override) -> None:
    """Record ``ov`` in ``user.containers.override_stat``; OSError when impossible.

    Older names an object may carry are removed so that one value is read.
    """
    path = _proc(dir_fd, name)
    follow = name is None
    os.setxattr(path, CONTAINERS_XATTR, format_override(ov), follow_symlinks=follow)
    for old in (FUSEOVERLAYFS_XATTR, ROOTLESS_XATTR):
        with contextlib.suppress(OSError):
            os.removexattr(path, old, follow_symlinks=follow)


def xattr_capable(st_mode: int) -> bool:
    """Linux permits ``user.*`` xattrs on regular files and directories only."""
    return stat_mod.S_ISREG(st_mode) or stat_mod.S_ISDIR(st_mode)


# -- the side table ------------------------------------------------------------


def encode_table(records: Iterable[tuple[bytes, Override]]) -> bytes:
    """Side-table bytes: ``VALUE NUL PATH NUL`` per record (paths hold no NUL)."""
    return b"".join(format_override(ov) + b"\0" + path + b"\0" for path, ov in records)


def decode_table(data: bytes) -> dict[bytes, Override]:
    """The side table's records by path; a malformed record is skipped.

    A later record for the same path wins, so appending is an update.
    """
    out: dict[bytes, Override] = {}
    fields = data.split(b"\0")
    for value, path in zip(fields[0::2], fields[1::2], strict=False):
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            out[path] = parse_override(value)
    return out


def read_table(root_fd: int) -> dict[bytes, Override] | None:
    """A layer's side table (``root_fd`` its root directory), or None if it has none."""
    try:
        fd = os.open(SIDE_TABLE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return decode_table(f.read())


class TableWriter:
    """Appends records to a layer's side table (one open file for a whole extraction)."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._f: object | None = None
        self.count = 0

    def add(self, path: bytes, ov: Override) -> None:
        if self._f is None:
            fd = os.open(
                SIDE_TABLE,
                os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self.root_fd,
            )
            self._f = os.fdopen(fd, "ab")
        self._f.write(encode_table([(path, ov)]))  # type: ignore[attr-defined]
        self.count += 1

    def close(self, durable: bool = False) -> None:
        if self._f is not None:
            self._f.flush()  # type: ignore[attr-defined]
            if durable:
                os.fsync(self._f.fileno())  # type: ignore[attr-defined]
            self._f.close()  # type: ignore[attr-defined]
            self._f = None


def layer_has_ownership(root_fd: int) -> bool:
    """Does a layer carry ownership metadata? (Its root's xattr, or a side table.)

    fuse-overlayfs decides the same way, from the layer's root directory.
    """
    with contextlib.suppress(OSError):
        if read_override_xattrs(root_fd, None) is not None:
            return True
    try:
        os.stat(SIDE_TABLE, dir_fd=root_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _ids_are_the_hosts() -> bool:
    """Is this process in the initial user namespace (every id mapped to itself)?

    Inside any other one the ids it sees (stat, the FUSE request's caller) are
    that namespace's, and its root is not the host's root.
    """
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True  # no /proc to tell: no user namespace either


def real_root() -> bool:
    """Root of the initial user namespace: THE test for real privilege.

    Only that root may set ``trusted.*`` xattrs (the kernel overlayfs format),
    make device nodes and chown to any id; the host kernel honours the setuid
    bits and devices of its mounts.  Root of another user namespace (``unshare
    -r``, ``unionfs run``) may chown to the ids mapped there and make whiteouts
    (0/0, Linux >= 5.8), nothing more: it is rootless for every format choice.
    Not cached: a process may enter a user namespace after an earlier call.
    """
    return os.geteuid() == 0 and _ids_are_the_hosts()


def marker_xattr_ns() -> bytes:
    """The namespace of the overlay xattrs (opaque, origin) this process writes:
    ``trusted.`` for real root (kernel overlayfs' default), else ``user.``
    (overlayfs' ``userxattr``, what a rootless or user-namespace mount reads)."""
    return b"trusted." if real_root() else b"user."


def in_user_namespace() -> bool:
    """Are the ids this process sees another namespace's (not the host's)?"""
    return not _ids_are_the_hosts()


def after_chown(ov: Override, st_mode: int) -> Override:
    """A chown's effect on the mode bits, as the kernel's (Linux >= 2.2.13).

    Changing a regular file's owner or group clears setuid, and setgid when
    the group may execute (setgid without group-execute means mandatory
    locking and stays).
    """
    if ov.mode is None or not stat_mod.S_ISREG(ov.st_mode(st_mode)):
        return ov
    mode = ov.mode & ~stat_mod.S_ISUID
    if mode & stat_mod.S_IXGRP:
        mode &= ~stat_mod.S_ISGID
    return replace(ov, mode=mode)


def visible(names: Iterable[bytes]) -> Iterator[bytes]:
    """Drop the ownership xattrs from a listing shown through a mount."""
    return (n for n in names if n not in OWNERSHIP_XATTRS)


# -- presenting through a mount ------------------------------------------------


@dataclass(frozen=True)
class Mapping:
    """fuse-overlayfs' id options: mappings (shown = container ids) and squashes."""

    uidmap: IdMap = ()
    gidmap: IdMap = ()
    squash_uid: int | None = None
    squash_gid: int | None = None

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        """On-disk ids (real or recorded) as the mount shows them."""
        if self.squash_uid is not None:
            uid = self.squash_uid
        elif self.uidmap:
            uid = to_container(self.uidmap, uid)
        if self.squash_gid is not None:
            gid = self.squash_gid
        elif self.gidmap:
            gid = to_container(self.gidmap, gid)
        return uid, gid

    def disk(self, uid: int, gid: int) -> tuple[int, int]:
        """Ids a caller gives (chown, create) as they go to disk; EINVAL if unmapped."""
        if self.uidmap and uid != -1:
            host = to_host(self.uidmap, uid)
            if host is None:
                raise OSError(errno.EINVAL, f"uid {uid} is outside uidmapping")
            uid = host
        if self.gidmap and gid != -1:
            host = to_host(self.gidmap, gid)
            if host is None:
                raise OSError(errno.EINVAL, f"gid {gid} is outside gidmapping")
            gid = host
        return uid, gid

    @property
    def squashing(self) -> bool:
        return self.squash_uid is not None or self.squash_gid is not None


class Presenter:
    """A mount's view of ownership metadata: which layers carry it, and lookups.

    ``layer_fds`` are the stack's root descriptors, upper first when
    ``has_upper``.  Lower layers never change while mounted, so their answers
    are cached; the upper's are read afresh (chown through the mount changes
    them).  ``record``: chown/chmod/mknod write overrides instead of real
    owners (the daemon cannot chown freely).
    """

    CACHE = 65536

    def __init__(
        self, layer_fds: list[int], has_upper: bool, mapping: Mapping, record: bool, force: bool
    ) -> None:
        self.mapping = mapping
        self.record = record
        #: In a user namespace (unionfs run with subordinate ids) the real owner
        #: the daemon sees (0: the user) is not the one a reader outside sees
        #: (the user's uid): every new object is then recorded, so the upper
        #: reads the same outside (a remount, ``unionfs commit``) as inside.
        self.record_all = in_user_namespace()
        self.upper = 0 if has_upper else None
        self.marked = {i for i, fd in enumerate(layer_fds) if layer_has_ownership(fd)}
        if force and self.upper is not None:
            self.marked.add(self.upper)
        self.active = bool(self.marked) or force
        self.tables: dict[int, dict[bytes, Override]] = {}
        for i in self.marked:
            table = read_table(layer_fds[i])
            if table:
                self.tables[i] = table
        self._cache: dict[tuple[int, bytes], Override | None] = {}
        #: The override each merged object shows, by inode: (node, layer, override).
        #: The node itself is checked (a recycled inode number is another
        #: object) and the layer too (a copy-up moves the object); setattr and
        #: xattr changes drop the entry (forget_node).
        self._nodes: dict[int, tuple[object, int, Override | None]] = {}
        if self.active and self.record and self.upper is not None:
            self._mark_upper_root(layer_fds)

    def _mark_upper_root(self, layer_fds: list[int]) -> None:
        """Give the upper's root the top lower root's override (fuse-overlayfs does
        this at mount), so the merged root shows the image's owner, not the user."""
        if read_override_xattrs(layer_fds[0], None) is not None:
            return
        for i in sorted(self.marked - {0}):
            ov = self.lookup(i, layer_fds[i], None, b"")
            if ov is not None:
                with contextlib.suppress(OSError):
                    write_override_xattr(layer_fds[0], None, ov)
                self.marked.add(0)
                return

    def lookup(self, layer: int, dir_fd: int, name: bytes | None, key: bytes) -> Override | None:
        """The override of one object (``name`` None: the directory ``dir_fd``)."""
        if layer not in self.marked and layer != self.upper:
            return None
        table = self.tables.get(layer)
        if table is not None and key in table:
            return table[key]
        if layer == self.upper:
            return read_override_xattrs(dir_fd, name)
        ck = (layer, key)
        try:
            return self._cache[ck]
        except KeyError:
            pass
        ov = read_override_xattrs(dir_fd, name)
        if len(self._cache) >= self.CACHE:
            self._cache.clear()
        self._cache[ck] = ov
        return ov

    def node_override(
        self, node: Any, where: Callable[[], tuple[int, bytes | None, bytes]]
    ) -> Override | None:
        """The override a merged object (an inodes.Node) shows, remembered per node.

        ``where()`` gives (dir_fd, name, key) for a lookup and is called only
        on a miss, so a getattr of a cached or unmarked object builds no path
        and opens no directory.
        """
        layer = node.layer
        if not self.active or (layer not in self.marked and layer != self.upper):
            return None
        hit = self._nodes.get(node.ino)
        if hit is not None and hit[0] is node and hit[1] == layer:
            return hit[2]
        dir_fd, name, key = where()
        ov = self.lookup(layer, dir_fd, name, key)
        if len(self._nodes) >= self.CACHE:
            self._nodes.clear()
        self._nodes[node.ino] = (node, layer, ov)
        return ov

    def forget_node(self, ino: int) -> None:
        """Drop what is remembered of an object (its override may have changed)."""
        self._nodes.pop(ino, None)

    def present_override(
        self, ov: Override | None, st: os.stat_result
    ) -> tuple[int, int, int, int]:
        """(st_mode, st_uid, st_gid, st_rdev) shown for a real ``st`` and its override."""
        mode, uid, gid, rdev = shown_stat(st, ov)
        uid, gid = self.mapping.shown(uid, gid)
        return mode, uid, gid, rdev

    def present(
        self, layer: int, dir_fd: int, name: bytes | None, key: bytes, st: os.stat_result
    ) -> tuple[int, int, int, int]:
        """(st_mode, st_uid, st_gid, st_rdev) shown for a real ``st``."""
        ov = self.lookup(layer, dir_fd, name, key) if self.active else None
        mode, uid, gid, rdev = shown_stat(st, ov)
        uid, gid = self.mapping.shown(uid, gid)
        return mode, uid, gid, rdev

    def change(
        self, ofd: int, st: os.stat_result, uid: int | None, gid: int | None, mode: int | None
    ) -> Override:
        """Record a chown/chmod of an upper object (``ofd`` an O_PATH descriptor of it).

        Ids are the caller's (shown) ids; returns what was written.
        """
        cur = read_override_xattrs(ofd, None) or Override(
            st.st_uid, st.st_gid, stat_mod.S_IMODE(st.st_mode)
        )
        if cur.mode is None:
            cur = replace(cur, mode=stat_mod.S_IMODE(st.st_mode))
        new = cur
        if uid is not None or gid is not None:
            duid, dgid = self.mapping.disk(-1 if uid is None else uid, -1 if gid is None else gid)
            new = replace(
                new, uid=cur.uid if duid == -1 else duid, gid=cur.gid if dgid == -1 else dgid
            )
            new = after_chown(new, st.st_mode)
        if mode is not None:
            new = replace(new, mode=stat_mod.S_IMODE(mode))
        write_override_xattr(ofd, None, new)
        return new

    def new_object(
        self,
        dir_fd: int,
        name: bytes,
        uid: int,
        gid: int,
        kind: str | None = None,
        rdev: int = 0,
        mode: int | None = None,
    ) -> None:
        """Record the owner of an object just created for a caller (ids shown)."""
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        duid, dgid = self.mapping.disk(uid, gid)
        if kind is None and (duid, dgid) == (st.st_uid, st.st_gid) and not self.record_all:
            return
        if not xattr_capable(st.st_mode):
            return  # a symlink, FIFO or socket: no xattr; it keeps the daemon's owner
        perm = stat_mod.S_IMODE(st.st_mode) if mode is None else mode
        write_override_xattr(dir_fd, name, Override(duid, dgid, perm, kind, rdev))


def effective_xattr_permissions(requested: int | None, initial_root: bool) -> int | None:
    """The ``xattr_permissions`` a mount uses: real root never trusts overrides by default.

    An override is data: any user who owns a file (or a layer's root) can set
    ``user.containers.override_stat`` on it.  A mount by root of the initial
    user namespace is one whose setuid bits and device nodes the host kernel
    honours, so a presented ``0:0:4755`` would hand that user real root.
    Such a mount therefore reads no override unless asked (``2``), and then
    it is made ``nosuid,nodev`` (see confine_flags).  A rootless mount is
    nosuid,nodev anyway (fusermount3), and root of another user namespace is
    confined by the kernel to that namespace: both keep the automatic rule.
    """
    if requested is None and initial_root:
        return 0
    return requested


def shows_other_owners(
    xattr_permissions: int | None, has_mapping: bool, initial_root: bool
) -> bool:
    """Can the mount show an owner or mode the object does not really have?"""
    return effective_xattr_permissions(xattr_permissions, initial_root) == 2 or has_mapping


def confine_flags(opts: set[str]) -> set[str]:
    """A mount option set made ``nosuid,nodev``: what the kernel then enforces.

    Owners and modes shown from metadata (or from an id mapping or squash:
    ``squash_to_root`` shows a user's own ``u+s`` file as setuid root) must
    never decide what the kernel executes as root or which device it opens.
    """
    return (opts - {"suid", "dev"}) | {"nosuid", "nodev"}


def presenter_for(
    layer_fds: list[int],
    has_upper: bool,
    mapping: Mapping,
    xattr_permissions: int | None,
) -> Presenter | None:
    """The mount's Presenter, or None when ownership is plain (no cost at all).

    ``xattr_permissions`` None: overrides are read from the layers that carry
    them (their root says so, fuse-overlayfs' rule), except for real root
    (see effective_xattr_permissions); 2: also record them in an upper
    without such lowers; 0: never.  Recording (chown/chmod/mknod write
    metadata) happens only when the daemon cannot chown freely.
    """
    xattr_permissions = effective_xattr_permissions(xattr_permissions, real_root())
    force = xattr_permissions == 2
    view = Presenter(
        layer_fds if xattr_permissions != 0 else [],
        has_upper,
        mapping,
        record=not real_root(),
        force=force,
    )
    if not view.active and mapping == Mapping():
        return None
    return view


# -- xattrs the process may not set, kept under a user. name --------------------


def shown_xattrs(names: Iterable[bytes]) -> list[bytes]:
    """A listing as the mount shows it: ownership xattrs hidden, saved ones
    (``user.containers.override_security.capability``) under their own name."""
    out = []
    for n in names:
        if n in OWNERSHIP_XATTRS:
            continue
        if n.startswith(SAVED_XATTR_PREFIX):
            orig = n[len(SAVED_XATTR_PREFIX) :]
            if orig.startswith((b"security.", b"trusted.")) and orig not in OWNERSHIP_XATTRS:
                out.append(orig)
            continue
        out.append(n)
    return out


def saved_name(name: bytes) -> bytes | None:
    """Where a ``security.*``/``trusted.*`` xattr is kept when it cannot be set for real."""
    if name.startswith((b"security.", b"trusted.")) and name not in OWNERSHIP_XATTRS:
        return SAVED_XATTR_PREFIX + name
    return None
