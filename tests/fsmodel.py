"""A pure-Python model of an overlay's merged view, the oracle where kernel overlayfs is missing.

Two parts:

- Layer specs (``Entry``, ``build_layer``): a lower layer described as data
  (files, directories, symlinks, hard links, char 0/0 whiteouts, opaque
  directories, user xattrs), written to disk the same way for every mount
  that uses it.
- ``Model``: the merged view those layers give under overlay rules (upper
  over lowers, a whiteout hides the name in the layers below its own, an
  opaque directory hides everything below it, only directories merge, and a
  non-directory stops the merge), then the same system calls a test runs on
  a mount, applied to that view with Linux' answers (errno precedence of the
  VFS, symlinks followed as namei does, the overlay's link count of
  hard-linked lower files with ``index=on``).  Directory renames always
  succeed, as in unionfs: the kernel's EXDEV (no ``redirect_dir``) is not
  modelled.

``Model.snapshot()`` answers in the format of ``support.snapshot``, so the
model compares directly with a mounted view.  Times are not part of it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = os.XATTR_CREATE
XATTR_REPLACE = os.XATTR_REPLACE

#: Linux' MAXSYMLINKS: symlinks followed in one path walk before ELOOP.
MAX_SYMLINKS = 40


# --------------------------------------------------------------------------- layer specs


@dataclass(frozen=True)
class Entry:
    """One object of a lower layer.

    ``kind``: ``file``, ``dir``, ``symlink``, ``whiteout`` or ``link`` (a hard
    link to the ``file`` at path ``target`` of the same layer).
    """

    kind: str
    mode: int = 0o644
    data: bytes = b""
    target: str = ""
    opaque: bool = False
    xattrs: tuple[tuple[str, bytes], ...] = ()


#: A layer: (path, entry) pairs, parents before children.
Layer = tuple[tuple[str, Entry], ...]


def build_layer(layer: Layer, root: Path, opaque_xattr: str = "trusted.overlay.opaque") -> None:
    """Write ``layer`` under ``root`` (which must exist)."""
    dir_modes = []
    for path, e in layer:
        p = root / path
        if e.kind == "file":
            p.write_bytes(e.data)
            os.chmod(p, e.mode)
        elif e.kind == "dir":
            p.mkdir()
            if e.opaque:
                os.setxattr(p, opaque_xattr, b"y")
            dir_modes.append((p, e.mode))  # set last: a 0500 dir takes no children
        elif e.kind == "symlink":
            os.symlink(e.target, p)
        elif e.kind == "whiteout":
            os.mknod(p, stat.S_IFCHR | 0o600, 0)
        elif e.kind == "link":
            os.link(root / e.target, p)
        else:
            raise ValueError(e.kind)
        for name, value in e.xattrs:
            os.setxattr(p, name, value)
    for p, mode in reversed(dir_modes):
        os.chmod(p, mode)


def prune_whiteouts(layers: list[Layer]) -> list[Layer]:
    """Drop the whiteouts kernel overlayfs would list: those in a directory one layer holds.

    A lower directory that merges with nothing (it exists in one layer, or is
    opaque there) is read by the kernel as it is, whiteouts included, while a
    lookup of such a name answers ENOENT; once copied up it merges and they
    vanish.  Only whiteouts in directories merging 2+ lower layers (or at the
    top, where the upper always merges) are kept: they are the ones that hide
    something, and they are read the same by every implementation.
    """
    while True:
        merged = Model(layers, 0, 0).merged_dirs
        pruned = []
        for i, layer in enumerate(layers):
            keep = []
            for path, e in layer:
                parent = posixpath.dirname(path)
                if (
                    e.kind == "whiteout"
                    and parent
                    and (i not in merged.get(parent, ()) or len(merged[parent]) < 2)
                ):
                    continue
                keep.append((path, e))
            pruned.append(tuple(keep))
        if pruned == layers:
            return layers
        layers = pruned


# --------------------------------------------------------------------------- the model


@dataclass(eq=False)
class Inode:
    kind: str  # "file", "dir", "symlink"
    mode: int  # permission bits, 0o7777
    uid: int
    gid: int
    data: bytearray = field(default_factory=bytearray)
    target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    nlink: int = 1
    #: A lower file with one link that nothing has changed yet: removing its
    #: name leaves it in the lower, so an open descriptor still counts 1.
    lower_sole: bool = False
    children: dict[str, Inode] = field(default_factory=dict)
    parent: Inode | None = None  # directories only (they have one name)

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    def type_bits(self) -> int:
        return {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}[self.kind]


def _resize(data: bytearray, size: int) -> None:
    """truncate(2): cut, or extend with zeros."""
    if size <= len(data):
        del data[size:]
    else:
        data.extend(bytes(size - len(data)))


def _write(data: bytearray, offset: int, payload: bytes) -> None:
    """pwrite(2): a hole up to ``offset`` reads as zeros; an empty write changes nothing."""
    if payload:
        if len(data) < offset:
            _resize(data, offset)
        data[offset : offset + len(payload)] = payload


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Model:
    """The merged view of ``layers`` (topmost first) over an empty upper."""

    def __init__(
        self,
        layers: list[Layer],
        uid: int,
        gid: int,
        umask: int = 0o022,
        root_mode: int = 0o755,
    ) -> None:
        self.uid, self.gid, self.umask = uid, gid, umask
        self.root = Inode("dir", root_mode, uid, gid)
        self.fds: dict[int, tuple[Inode, str]] = {}
        #: merged directory -> the lower layers it merges, topmost first
        self.merged_dirs: dict[str, list[int]] = {"": list(range(len(layers)))}
        self._layers = [dict(layer) for layer in layers]
        self._shared: dict[tuple[int, str], Inode] = {}
        self._links: list[dict[str, int]] = []
        for layer in self._layers:
            counts: dict[str, int] = {}
            for path, e in layer.items():
                src = e.target if e.kind == "link" else path
                if e.kind in ("file", "link"):
                    counts[src] = counts.get(src, 0) + 1
            self._links.append(counts)
        self._merge(self.root, "", list(range(len(layers))))
        del self._layers, self._shared, self._links

    # ---------------------------------------------------------------- merging

    def _merge(self, node: Inode, path: str, layer_ids: list[int]) -> None:
        names: dict[str, None] = {}
        for li in layer_ids:
            for p in self._layers[li]:
                if posixpath.dirname(p) == path:
                    names.setdefault(posixpath.basename(p), None)
        for name in names:
            p = posixpath.join(path, name) if path else name
            top: tuple[int, Entry] | None = None
            dirs: list[int] = []
            for li in layer_ids:
                e = self._layers[li].get(p)
                if e is None:
                    continue
                if e.kind == "whiteout":
                    break  # hides the name below; the top (if any) stays
                if top is None:
                    top = (li, e)
                elif e.kind != "dir":
                    break  # a non-directory ends the merge
                if e.kind != "dir":
                    break
                dirs.append(li)
                if e.opaque:
                    break
            if top is None:
                continue
            child = self._inode_of(top[0], p, top[1])
            node.children[name] = child
            if child.is_dir:
                child.parent = node
                self.merged_dirs[p] = dirs
                self._merge(child, p, dirs)

    def _inode_of(self, li: int, path: str, e: Entry) -> Inode:
        xattrs = {k: v for k, v in e.xattrs}
        if e.kind == "dir":
            return Inode("dir", e.mode, self.uid, self.gid, xattrs=xattrs)
        if e.kind == "symlink":
            return Inode("symlink", 0o777, self.uid, self.gid, target=e.target)
        src = e.target if e.kind == "link" else path
        key = (li, src)
        if key not in self._shared:
            se = self._layers[li][src]
            self._shared[key] = Inode(
                "file",
                se.mode,
                self.uid,
                self.gid,
                data=bytearray(se.data),
                xattrs={k: v for k, v in se.xattrs},
                nlink=self._links[li][src],  # the lower's st_nlink, hidden links included
                lower_sole=self._links[li][src] == 1,
            )
        return self._shared[key]

    # ---------------------------------------------------------------- path walk

    def _walk(
        self, start: Inode, path: str, follow: bool, budget: list[int]
    ) -> tuple[Inode, str, Inode | None]:
        """namei: (parent dir, last name, object or None); intermediate symlinks followed.

        ``budget`` counts the symlinks still allowed in this walk (ELOOP past it).
        The last name is ``"."`` when the path ends at a directory itself.
        """
        parts = [c for c in path.split("/") if c]
        cur = start
        for comp in parts[:-1]:
            cur = self._step(cur, comp, budget)
        last = parts[-1] if parts else "."
        if last == ".":
            return cur, ".", cur
        node = cur.children.get(last)
        if follow and node is not None and node.kind == "symlink":
            budget[0] -= 1
            if budget[0] < 0:
                raise _err(errno.ELOOP)
            return self._walk(cur, node.target, True, budget)
        return cur, last, node

    def _step(self, cur: Inode, comp: str, budget: list[int]) -> Inode:
        if comp == ".":
            return cur
        node = cur.children.get(comp)
        if node is None:
            raise _err(errno.ENOENT)
        if node.kind == "symlink":
            budget[0] -= 1
            if budget[0] < 0:
                raise _err(errno.ELOOP)
            _, _, node = self._walk(cur, node.target, True, budget)
            if node is None:
                raise _err(errno.ENOENT)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        return node

    def _lookup(self, path: str, follow: bool) -> tuple[Inode, str, Inode | None]:
        return self._walk(self.root, path, follow, [MAX_SYMLINKS])

    def _existing(self, path: str, follow: bool = True) -> Inode:
        _, _, node = self._lookup(path, follow)
        if node is None:
            raise _err(errno.ENOENT)
        return node

    def _new_inode(self, parent: Inode, kind: str, mode: int) -> Inode:
        gid = self.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if kind == "dir":
                mode |= stat.S_ISGID
        return Inode(kind, mode, self.uid, gid)

    def _attach(self, parent: Inode, name: str, node: Inode) -> None:
        parent.children[name] = node
        if node.is_dir:
            node.parent = parent

    def _detach(self, parent: Inode, name: str) -> Inode:
        node = parent.children.pop(name)
        if not node.is_dir and not node.lower_sole:
            node.nlink -= 1
        return node

    @staticmethod
    def _changed(node: Inode) -> Inode:
        """``node`` is about to change: from now on it is an upper copy."""
        node.lower_sole = False
        return node

    # ---------------------------------------------------------------- operations
    # Each raises OSError as the system call would, or returns what the
    # test's real-file-system counterpart returns.

    def create(self, path: str, data: bytes, mode: int, excl: bool) -> None:
        """open(O_CREAT|O_WRONLY|(O_EXCL or O_TRUNC), mode) then write(data)."""
        parent, name, node = self._lookup(path, follow=not excl)
        if node is not None:
            if excl:
                raise _err(errno.EEXIST)
            if node.is_dir:
                raise _err(errno.EISDIR)
            self._changed(node).data[:] = b""
        else:
            if name == ".":
                raise _err(errno.EISDIR)
            node = self._new_inode(parent, "file", mode & ~self.umask & 0o777)
            self._attach(parent, name, node)
        node.data[:] = data

    def _open_write(self, path: str) -> Inode:
        node = self._existing(path)
        if node.is_dir:
            raise _err(errno.EISDIR)
        return self._changed(node)

    def write_at(self, path: str, offset: int, data: bytes) -> int:
        node = self._open_write(path)
        _write(node.data, offset, data)
        return len(data)

    def append(self, path: str, data: bytes) -> int:
        node = self._open_write(path)
        node.data.extend(data)
        return len(data)

    def truncate(self, path: str, size: int) -> None:
        node = self._existing(path)
        if node.is_dir:
            raise _err(errno.EISDIR)
        _resize(self._changed(node).data, size)

    def read(self, path: str) -> bytes:
        node = self._existing(path)
        if node.is_dir:
            raise _err(errno.EISDIR)
        return bytes(node.data)

    def listdir(self, path: str) -> list[str]:
        node = self._existing(path)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        return sorted(node.children)

    def mkdir(self, path: str, mode: int) -> None:
        parent, name, node = self._lookup(path, follow=False)
        if node is not None:
            raise _err(errno.EEXIST)
        self._attach(parent, name, self._new_inode(parent, "dir", mode & ~self.umask & 0o1777))

    def symlink(self, target: str, path: str) -> None:
        parent, name, node = self._lookup(path, follow=False)
        if node is not None:
            raise _err(errno.EEXIST)
        new = self._new_inode(parent, "symlink", 0o777)
        new.target = target
        self._attach(parent, name, new)

    def rmdir(self, path: str) -> None:
        parent, name, node = self._lookup(path, follow=False)
        if node is None:
            raise _err(errno.ENOENT)
        if name == ".":
            raise _err(errno.EINVAL)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        if node.children:
            raise _err(errno.ENOTEMPTY)
        self._detach(parent, name)

    def unlink(self, path: str) -> None:
        parent, name, node = self._lookup(path, follow=False)
        if node is None:
            raise _err(errno.ENOENT)
        if node.is_dir:
            raise _err(errno.EISDIR)
        self._detach(parent, name)

    def link(self, src: str, dst: str) -> None:
        """link(2): the source is not followed."""
        _, _, node = self._lookup(src, follow=False)
        if node is None:
            raise _err(errno.ENOENT)
        parent, name, existing = self._lookup(dst, follow=False)
        if existing is not None:
            raise _err(errno.EEXIST)
        if node.is_dir:
            raise _err(errno.EPERM)
        self._changed(node).nlink += 1
        self._attach(parent, name, node)

    @staticmethod
    def _is_ancestor(a: Inode, d: Inode) -> bool:
        """a is d or one of d's ancestors."""
        n: Inode | None = d
        while n is not None:
            if n is a:
                return True
            n = n.parent
        return False

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        """renameat2(2) with the VFS' order of checks."""
        if flags & RENAME_EXCHANGE and flags & RENAME_NOREPLACE:
            raise _err(errno.EINVAL)
        old_dir, old_name, old = self._lookup(src, follow=False)
        new_dir, new_name, new = self._lookup(dst, follow=False)
        if old_name == "." or new_name == ".":
            raise _err(errno.EBUSY)
        if old is None:
            raise _err(errno.ENOENT)
        if flags & RENAME_NOREPLACE and new is not None:
            raise _err(errno.EEXIST)
        exchange = bool(flags & RENAME_EXCHANGE)
        if exchange and new is None:
            raise _err(errno.ENOENT)
        if old_dir is not new_dir:
            if self._is_ancestor(old, new_dir):
                raise _err(errno.EINVAL)  # source is an ancestor of the target
            if new is not None and self._is_ancestor(new, old_dir):
                raise _err(errno.EINVAL if exchange else errno.ENOTEMPTY)
        if old is new:
            return
        self._changed(old)
        if new is not None and not exchange:
            if old.is_dir and not new.is_dir:
                raise _err(errno.ENOTDIR)
            if not old.is_dir and new.is_dir:
                raise _err(errno.EISDIR)
            if new.is_dir and new.children:
                raise _err(errno.ENOTEMPTY)
        if exchange:
            assert new is not None
            old_dir.children[old_name] = new
            new_dir.children[new_name] = old
            if new.is_dir:
                new.parent = old_dir
            if old.is_dir:
                old.parent = new_dir
            return
        if new is not None:
            self._detach(new_dir, new_name)
        del old_dir.children[old_name]
        self._attach(new_dir, new_name, old)

    # Descriptors held across steps (slot -> object, open mode), no O_CREAT.

    def open(self, path: str, slot: int, mode: str) -> None:
        self.fds.pop(slot, None)
        node = self._existing(path)
        if node.is_dir and mode != "r":
            raise _err(errno.EISDIR)
        if mode != "r":
            self._changed(node)  # opening for writing copies up
        self.fds[slot] = (node, mode)

    def _fd(self, slot: int) -> tuple[Inode, str]:
        if slot not in self.fds:
            raise _err(errno.EBADF)
        return self.fds[slot]

    def fd_read(self, slot: int) -> bytes:
        node, mode = self._fd(slot)
        if mode in ("w", "a"):
            raise _err(errno.EBADF)
        if node.is_dir:
            raise _err(errno.EISDIR)
        return bytes(node.data[:4096])

    def fd_write(self, slot: int, offset: int, data: bytes) -> int:
        node, mode = self._fd(slot)
        if mode == "r":
            raise _err(errno.EBADF)
        if mode == "a":
            offset = len(node.data)  # pwrite on O_APPEND appends (Linux)
        _write(node.data, offset, data)
        return len(data)

    def fd_truncate(self, slot: int, size: int) -> None:
        node, mode = self._fd(slot)
        if mode == "r" or node.is_dir:
            raise _err(errno.EINVAL)
        _resize(node.data, size)

    def fd_stat(self, slot: int) -> tuple:
        node, _ = self._fd(slot)
        if node.is_dir:
            return (stat.filemode(node.type_bits() | node.mode), None, None)
        return (stat.filemode(node.type_bits() | node.mode), len(node.data), node.nlink)

    def fd_close(self, slot: int) -> None:
        self._fd(slot)
        del self.fds[slot]

    def close_all(self) -> None:
        self.fds.clear()

    def chmod(self, path: str, mode: int) -> None:
        self._changed(self._existing(path)).mode = mode & 0o7777

    def chown(self, path: str, uid: int, gid: int, follow: bool = True) -> None:
        node = self._changed(self._existing(path, follow))
        if not node.is_dir and node.kind != "symlink":
            node.mode &= ~stat.S_ISUID
            if node.mode & stat.S_IXGRP:
                node.mode &= ~stat.S_ISGID
        node.uid, node.gid = uid, gid

    def utime(self, path: str, ns: int, follow: bool = True) -> int:
        self._changed(self._existing(path, follow))
        return ns

    def setxattr(self, path: str, name: str, value: bytes, flags: int, follow: bool) -> None:
        node = self._existing(path, follow)
        if node.kind == "symlink":
            raise _err(errno.EPERM)  # user.* only on files and directories
        self._changed(node)
        if flags & XATTR_CREATE and name in node.xattrs:
            raise _err(errno.EEXIST)
        if flags & XATTR_REPLACE and name not in node.xattrs:
            raise _err(errno.ENODATA)
        node.xattrs[name] = value

    def removexattr(self, path: str, name: str, follow: bool) -> None:
        node = self._existing(path, follow)
        if node.kind == "symlink":
            raise _err(errno.EPERM)
        if name not in node.xattrs:
            raise _err(errno.ENODATA)
        self._changed(node)
        del node.xattrs[name]

    # ---------------------------------------------------------------- the view

    def snapshot(self) -> dict[str, tuple]:
        """The view in ``support.snapshot``'s format."""
        out: dict[str, tuple] = {}

        def visit(node: Inode, rel: str) -> None:
            for name, child in node.children.items():
                path = posixpath.join(rel, name) if rel else name
                is_dir = child.is_dir
                if child.kind == "file":
                    size: int | None = len(child.data)
                    digest = hashlib.sha256(child.data).hexdigest()
                elif child.kind == "symlink":
                    size, digest = len(os.fsencode(child.target)), None
                else:
                    size, digest = None, None
                out[path] = (
                    stat.filemode(child.type_bits() | child.mode),
                    size,
                    digest,
                    os.fsencode(child.target) if child.kind == "symlink" else None,
                    0,
                    tuple(sorted((k, v) for k, v in child.xattrs.items() if k.startswith("user."))),
                    None if is_dir else child.nlink,
                    child.uid,
                    child.gid,
                )
                if is_dir:
                    visit(child, path)

        visit(self.root, "")
        return out
