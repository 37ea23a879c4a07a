"""Inode numbering, without a mount."""

import os

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
