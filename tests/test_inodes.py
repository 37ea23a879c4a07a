"""Inode numbering, without a mount."""

from unionfs.inodes import ROOT_INODE, compose


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
