"""The inode table: what the kernel has looked up, and how inodes are numbered.

pyfuse3 makes the FUSE node id and ``st_ino`` the same number, so the number
must be unique within the mount, stable for a file's life (also across
copy-up and remount) and free of collisions between layers on different
filesystems.  ``InodeNumbers`` derives it from the real inode of the object's
*origin* (see docs/inodes.md):

* all branches on one filesystem: the real inode number, as overlayfs does;
* otherwise: the real number tagged with the filesystem's index in the high
  16 bits, like overlayfs' ``xino``.

The table holds a node while the kernel's lookup count for it is positive
(``forget`` honoured), so memory follows the kernel's own inode cache.  Each
directory node keeps its live children by name: a repeated lookup of a name
the kernel still knows does not walk the layers again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat as stat_mod
from collections.abc import Callable

import pyfuse3

from .layers import Entry, LayerStack, Path

ROOT_INODE: int = pyfuse3.ROOT_INODE
_TAG_SHIFT = 48
_LOW_MASK = (1 << _TAG_SHIFT) - 1
#: Other names remembered per hard-linked node: enough for real link farms'
#: churn; a node whose remembered names are all gone answers through its
#: open descriptors only.
_MAX_ALIASES = 8
#: Bumped whenever any node is given another parent or name: every path
#: cached on a node (``Node.path``) is valid while this has not changed.
_moves = 0


class Node:
    """One merged object the kernel knows.

    ``parent``/``name`` is one merged name of the object (any one of them, for
    hard links).  ``layer`` is the topmost layer that holds it.  Directories
    also carry the merge set from ``Entry``; ``dir_layers is None`` marks a
    non-directory.
    """

    __slots__ = (
        "_path",
        "_path_at",
        "aliases",
        "children",
        "dir_layers",
        "freed",
        "ino",
        "last_st",
        "layer",
        "listing",
        "listing_gen",
        "lower_links",
        "metacopy",
        "name",
        "nlookup",
        "parent",
        "unlinked",
        "xattrs",
        "xwh_layers",
    )

    def __init__(self, ino: int, parent: Node | None, name: bytes, entry: Entry) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        #: The merged path, computed at ``_path_at`` (a value of ``_moves``).
        self._path: Path = ()
        self._path_at = -1
        self.nlookup = 0
        #: Other merged names the object is known by (hard links), so that
        #: it keeps a name when the one it is addressed by is removed.
        self.aliases: list[tuple[Node, bytes]] | None = None
        #: No name left (unlinked while the kernel still holds it, e.g. open):
        #: only its open descriptors reach it, never whatever now has its name.
        self.unlinked = False
        #: Its upper object is gone for good (last link removed): the upper
        #: filesystem may give its number to a new object while the kernel
        #: still holds this one (open, a cwd), see InodeTable.node_for.
        self.freed = False
        #: The attributes it had when its last name went, with no link left
        #: (served to descriptors that outlive the name).
        self.last_st: os.stat_result | None = None
        #: The merged listing of a directory, valid while the stack's
        #: generation equals ``listing_gen`` (no upper change since).
        self.listing: list[tuple[bytes, int, bool]] | None = None
        self.listing_gen = -1
        #: Live children by name (directories only; the entry cache).
        self.children: dict[bytes, Node] = {} if entry.dir_layers is not None else _NO_CHILDREN
        self.update(entry)

    def update(self, entry: Entry) -> None:
        self.layer = entry.layer
        self.dir_layers = entry.dir_layers
        self.xwh_layers = entry.xwh_layers
        #: For a copied-up hard-linked lower file: how many of its lower names
        #: are not linked to the copy yet (None for everything else).  The
        #: copy's own link count includes the index link, and misses those.
        self.lower_links = entry.lower_links
        #: An upper file holding metadata only; its data is read from below.
        self.metacopy = entry.metacopy
        #: Names of the object's visible xattrs, read once (None: not read yet);
        #: dropped whenever the union changes them (setxattr, copy-up).
        self.xattrs: frozenset[bytes] | None = None

    @property
    def is_dir(self) -> bool:
        return self.dir_layers is not None

    def path(self) -> Path:
        """The merged path, walked up through the parents (renames just relink).

        Every request needs it, so it is kept until a node anywhere moves
        (``readdress``/``detach``/``move``, rare next to lookups).  Raises
        ESTALE for an unlinked node, as ``dirpath`` does.
        """
        if self.unlinked:
            raise OSError(errno.ESTALE, "the object has no name left")
        if self._path_at == _moves:
            return self._path
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        parts.reverse()
        self._path = path = tuple(parts)
        self._path_at = _moves
        return path

    def dirpath(self) -> Path:
        """Path of the directory holding this node's name.

        Raises ESTALE for an unlinked node: its old name may hold a whiteout or
        a new object by now, and nothing may be done to those in its stead.
        """
        if self.unlinked:
            raise OSError(errno.ESTALE, "the object has no name left")
        return self.parent.path() if self.parent is not None else ()

    def __repr__(self) -> str:
        where = b"(unlinked)" if self.unlinked else b"/".join(self.path())
        return f"<Node {self.ino} {where!r} layer={self.layer}>"


def _readdressed(node: Node, parent: Node, name: bytes) -> None:
    """Give ``node`` the address ``parent/name``: cached paths are then stale."""
    global _moves
    node.parent, node.name = parent, name
    _moves += 1


def _addressed_by(node: Node, parent: Node | None, name: bytes) -> bool:
    """Is ``parent/name`` the name the daemon reaches ``node`` by?"""
    return node.parent is parent and node.name == name


def _without(
    aliases: list[tuple[Node, bytes]] | None, parent: Node | None, name: bytes
) -> list[tuple[Node, bytes]]:
    """``aliases`` less ``parent/name`` (a new list)."""
    return [(p, n) for p, n in aliases or () if not (p is parent and n == name)]


#: Shared by every non-directory: saves a dict per file node.  Never written
#: to, because only directories are ever parents.
_NO_CHILDREN: dict[bytes, Node] = {}


class InodeNumbers:
    """Maps (layer, real inode) to the inode number the merged view reports."""

    def __init__(self, stack: LayerStack) -> None:
        self._fsid: dict[int, int] = {}
        for layer in stack.layers:
            self._fsid.setdefault(layer.dev, len(self._fsid))
        self._layer_dev = [layer.dev for layer in stack.layers]
        self.tagged = len(self._fsid) > 1

    def number(self, layer: int, real_ino: int) -> int:
        if not self.tagged and real_ino != ROOT_INODE:  # compose's first case, inline
            return real_ino
        dev = self._layer_dev[layer]
        return compose(self._fsid[dev], real_ino, self.tagged, dev)


def compose(fsid: int, real_ino: int, tagged: bool, dev: int = 0) -> int:
    """The reported inode number for a real inode on filesystem ``fsid``.

    Numbers that do not fit the tagged layout (or would collide with the
    root's fixed id 1) are hashed from (dev, ino) into the range with the top
    bit set, which no tagged or real number on common filesystems uses.
    """
    if not tagged and real_ino != ROOT_INODE:
        return real_ino
    if tagged and real_ino <= _LOW_MASK and fsid < 0x7FFF:
        return ((fsid + 1) << _TAG_SHIFT) | real_ino
    return _hashed(b"%d:%d" % (dev, real_ino))


def _hashed(key: bytes) -> int:
    """A number in the range with the top bit set, which real inode numbers do not use."""
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) | (1 << 63)


def _stand_in(number: int, k: int) -> int:
    """The ``k``-th stand-in for ``number``, in the hashed range (top bit set)."""
    return _hashed(b"renumbered:%d:%d" % (number, k))


def _without_links(st: os.stat_result) -> os.stat_result:
    """``st`` with a link count of 0: how a removed object looks to its descriptors."""
    names = ("atime", "mtime", "ctime", "atime_ns", "mtime_ns", "ctime_ns", "blksize", "blocks")
    extra = {f"st_{n}": getattr(st, f"st_{n}") for n in (*names, "rdev")}
    return os.stat_result((*st[:3], 0, *st[4:10]), extra)


class InodeTable:
    """Nodes by inode number, with the kernel's lookup counts."""

    def __init__(self, stack: LayerStack) -> None:
        self.numbers = InodeNumbers(stack)
        root_entry = stack.root_entry()
        self.root = Node(ROOT_INODE, None, b"", root_entry)
        self.root.nlookup = 1
        self._nodes: dict[int, Node] = {ROOT_INODE: self.root}
        #: Real number -> the number a new object got instead (see node_for),
        #: and back, while that object's node lives.
        self._renumbered: dict[int, int] = {}
        self._renumbered_from: dict[int, int] = {}
        #: [hits, misses] of ``cached_child`` (``unionfs stats`` shares its list).
        self.child_counts = [0, 0]

    def __len__(self) -> int:
        return len(self._nodes)

    def __getitem__(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise OSError(errno.ESTALE, "unknown inode") from None

    def number_of(self, entry: Entry) -> int:
        if entry.origin is not None:
            return entry.origin
        assert entry.ino_st is not None
        return self.numbers.number(entry.ino_layer, entry.ino_st.st_ino)

    def cached_child(self, parent: Node, name: bytes) -> Node | None:
        """The live node last seen at ``parent/name``, if the kernel still holds it."""
        node = parent.children.get(name)
        if node is None:
            self.child_counts[1] += 1
            return None
        if self._nodes.get(node.ino) is not node:
            del parent.children[name]
            self.child_counts[1] += 1
            return None
        self.child_counts[0] += 1
        return node

    def node_for(self, parent: Node, name: bytes, entry: Entry) -> Node:
        """The node for a resolved entry, reusing a live one with the same number.

        The node is not counted yet: ``ref`` does that once the kernel has
        really been told about it (a readdir reply can be refused).

        A live node whose object was freed cannot be the entry's object: the
        upper filesystem reused the inode number.  The kernel knows inodes by
        number only, so it would take the new object for the dead one (a
        removed directory that is still someone's cwd refuses new entries, a
        symlink shows the old cached target); the new object gets another
        number for as long as it lives.
        """
        ino = self.number_of(entry)
        ino = self._renumbered.get(ino, ino)
        node = self._nodes.get(ino)
        if node is not None and node.freed:
            ino, node = self._renumber(ino), None
        if node is None:
            return Node(ino, parent, name, entry)
        if node.layer == 0 and entry.layer != 0:
            # Another name of a hard-linked lower file that was copied up
            # through its first name: keep serving the copy.
            self.add_alias(node, parent, name)
            return node
        self.readdress(node, parent, name)
        node.update(entry)
        return node

    def _renumber(self, number: int) -> int:
        """A number for a new object whose real one a freed live node still has."""
        k = 0
        while (alt := _stand_in(number, k)) in self._nodes:
            k += 1
        self._renumbered[number] = alt
        self._renumbered_from[alt] = number
        return alt

    def _retire(self, node: Node, gone: os.stat_result) -> None:
        """``node``, last seen as ``gone``, lost its last name: keep what outlives it.

        Its attributes with no link left, for descriptors still open on it;
        and whether the upper filesystem may give its number to a new object
        (its last link in the upper is gone), see ``node_for``.
        """
        node.last_st = _without_links(gone)
        if node.layer != 0 or (gone.st_nlink > 1 and not stat_mod.S_ISDIR(gone.st_mode)):
            return  # a lower object stays where it is; another link keeps it
        if self.numbers.number(0, gone.st_ino) == node.ino:
            node.freed = True

    def readdress(self, node: Node, parent: Node, name: bytes) -> None:
        """Address ``node`` by ``parent/name``, keeping a hard link's other name."""
        if not _addressed_by(node, parent, name):
            old = (node.parent, node.name)
            _readdressed(node, parent, name)
            if not node.is_dir and not node.unlinked and old[0] is not None:
                self.add_alias(node, *old)
        node.unlinked = False

    def add_alias(self, node: Node, parent: Node, name: bytes) -> None:
        """Remember another name of a hard-linked ``node`` (a few at most)."""
        if node.is_dir or _addressed_by(node, parent, name):
            return
        aliases = _without(node.aliases, parent, name)
        aliases.append((parent, name))
        node.aliases = aliases[-_MAX_ALIASES:]

    def detach(
        self,
        node: Node,
        parent: Node,
        name: bytes,
        still_names: Callable[[Node, bytes], bool],
        gone: os.stat_result | None = None,
    ) -> None:
        """``parent/name`` (whose object was ``gone``) no longer names ``node``.

        A node addressed by that name moves to another of its names that
        ``still_names`` confirms (in the merged view), or is marked unlinked
        (a directory always: it has one name): its old name may now hold a
        whiteout (whose type change the kernel answers with EIO) or a new
        object (which must not be changed in its stead).
        """
        node.aliases = _without(node.aliases, parent, name) or None  # directories: None
        if not _addressed_by(node, parent, name):
            return
        for p, n in node.aliases or ():
            if still_names(p, n):
                _readdressed(node, p, n)
                node.aliases = _without(node.aliases, p, n) or None
                if self._nodes.get(node.ino) is node:
                    p.children[n] = node
                return
        node.unlinked = True
        if gone is not None:
            self._retire(node, gone)

    def ref(self, node: Node) -> None:
        """Count one kernel lookup of ``node`` (lookup, readdirplus, create...)."""
        node.nlookup += 1
        self._nodes.setdefault(node.ino, node)
        if node.parent is not None:
            node.parent.children[node.name] = node

    def move(self, node: Node, old: tuple[Node, bytes], parent: Node, name: bytes) -> None:
        """Record that the name ``old`` of ``node`` is now ``parent/name`` (after a rename).

        A hard link renamed under another of its names keeps its address and
        has that other name changed in its aliases.
        """
        if not node.is_dir and not _addressed_by(node, *old):
            node.aliases = _without(node.aliases, *old)
            self.add_alias(node, parent, name)
        else:
            _readdressed(node, parent, name)
            node.unlinked = False
        if self._nodes.get(node.ino) is node:
            parent.children[name] = node

    def forget(self, ino: int, n: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.nlookup -= n
        if node.nlookup > 0:
            return
        del self._nodes[ino]
        number = self._renumbered_from.pop(ino, None)
        if number is not None:
            del self._renumbered[number]
        parent = node.parent
        if parent is not None and parent.children.get(node.name) is node:
            del parent.children[node.name]

    def unlink_name(self, parent: Node, name: bytes) -> None:
        """Forget the cached name->node mapping (the name was removed or replaced)."""
        parent.children.pop(name, None)

    def all_nodes(self) -> list[Node]:
        return list(self._nodes.values())
