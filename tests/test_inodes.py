"""Inode numbering, without a mount."""

import os

import pytest

from unionfs.inodes import ROOT_INODE, InodeTable, compose
from unionfs.layers import Entry, LayerStack


def test_single_filesystem_uses_real_numbers():
    assert compose(0, 12345, tagged=False) == 12345


def test_root_number_is_never_reused():
    assert compose(0, ROOT_INODE, tagged=False) != ROOT_INODE
    assert compose(0, ROOT_INODE, tagged=True) != ROOT_INODE


def test_layers_on_different_filesystems_do_not_collide():
    a = compose(0, 42, tagged=True, dev=1)
    b = compose(1, 42, tagged=True, dev=2)
    assert a != b
    assert a & ((1 << 48) - 1) == 42


def test_huge_real_numbers_are_hashed_stably_and_apart():
    big = 1 << 50
    x = compose(0, big, tagged=True, dev=7)
    assert x == compose(0, big, tagged=True, dev=7)
    assert x != compose(1, big, tagged=True, dev=8)
    assert x >> 63 == 1


def test_a_freed_number_given_to_a_new_object_is_renumbered_while_either_lives(tmp_path):
    (tmp_path / "lower").mkdir()
    (tmp_path / "upper").mkdir()
    (tmp_path / "upper" / "f").write_text("f")
    stack = LayerStack([str(tmp_path / "lower")], str(tmp_path / "upper"))
    try:
        table = InodeTable(stack)
        st = os.lstat(tmp_path / "upper" / "f")
        entry = Entry(0, st, ino_layer=0, ino_st=st)  # the new object got the same inode

        old = table.node_for(table.root, b"a", entry)
        table.ref(old)
        assert old.ino == st.st_ino
        # removed, its last link, but the kernel still holds it
        table.detach(old, table.root, b"a", lambda p, n: False, st)
        assert old.freed

        new = table.node_for(table.root, b"b", entry)
        table.ref(new)
        assert new.ino != old.ino and new.ino >> 63
        assert table.node_for(table.root, b"b", entry) is new, "stable while it lives"
        table.forget(old.ino, 1)
        assert table.node_for(table.root, b"b", entry) is new, "also once the old one is gone"
        table.forget(new.ino, 1)
        assert table.node_for(table.root, b"b", entry).ino == st.st_ino, "then the real one"
    finally:
        stack.close()


def test_an_object_with_another_link_keeps_its_number(tmp_path):
    (tmp_path / "lower").mkdir()
    (tmp_path / "upper").mkdir()
    (tmp_path / "upper" / "f").write_text("f")
    os.link(tmp_path / "upper" / "f", tmp_path / "upper" / "g")
    stack = LayerStack([str(tmp_path / "lower")], str(tmp_path / "upper"))
    try:
        table = InodeTable(stack)
        st = os.lstat(tmp_path / "upper" / "f")
        entry = Entry(0, st, ino_layer=0, ino_st=st)
        node = table.node_for(table.root, b"f", entry)
        table.ref(node)
        # one of two links removed: the object lives on
        table.detach(node, table.root, b"f", lambda p, n: False, st)
        assert not node.freed
        assert table.node_for(table.root, b"g", entry) is node
    finally:
        stack.close()


def test_kept_paths_follow_every_move(tmp_path):
    """Node.path() is kept between requests: a rename of an ancestor, a hard link
    readdressed to its other name, and an unlinked node must all show at once."""
    for d in ("lower/a/b", "lower/c", "upper"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "lower" / "a" / "b" / "f").write_text("f")
    os.link(tmp_path / "lower" / "a" / "b" / "f", tmp_path / "lower" / "c" / "g")
    stack = LayerStack([str(tmp_path / "lower")], str(tmp_path / "upper"))
    try:
        table = InodeTable(stack)

        def node(parent, name, rel, is_dir):
            st = os.lstat(tmp_path / "lower" / rel)
            layers = (1,) if is_dir else None
            n = table.node_for(parent, name, Entry(1, st, layers, ino_layer=1, ino_st=st))
            table.ref(n)
            return n

        a = node(table.root, b"a", "a", True)
        b = node(a, b"b", "a/b", True)
        c = node(table.root, b"c", "c", True)
        f = node(b, b"f", "a/b/f", False)
        assert f.path() == (b"a", b"b", b"f") and f.dirpath() == (b"a", b"b")
        assert f.path() is f.path(), "kept, not walked again"

        table.move(a, (table.root, b"a"), table.root, b"z")  # mv a z
        assert f.path() == (b"z", b"b", b"f") and b.path() == (b"z", b"b")

        g = node(c, b"g", "c/g", False)  # the other name of f's file
        assert g is f and f.path() == (b"c", b"g")
        table.detach(f, c, b"g", lambda p, n: (p, n) == (b, b"f"))
        assert f.path() == (b"z", b"b", b"f"), "back to its remaining name"

        table.detach(b, a, b"b", lambda p, n: False)  # rmdir z/b
        with pytest.raises(OSError):
            b.path()
    finally:
        stack.close()
