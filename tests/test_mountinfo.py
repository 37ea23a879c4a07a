"""unionfs.mountinfo: the kernel's mount table, escapes undone."""

from __future__ import annotations

import os

from unionfs import mountinfo


def test_a_line_with_optional_fields_and_escapes() -> None:
    line = (
        r"36 35 98:0 /mnt1 /mnt/my\040dir rw,noatime master:1 shared:2 - fuse.unionfs"
        r" a\134b\040c rw,user_id=0"
    )
    e = mountinfo.parse_line(line)
    assert e == mountinfo.MountEntry(36, "/mnt/my dir", "fuse.unionfs", "a\\b c", "rw,user_id=0")


def test_malformed_lines_are_skipped() -> None:
    assert mountinfo.parse_line("") is None
    assert mountinfo.parse_line("36 35 98:0 / /x rw") is None  # no separator
    assert mountinfo.parse_line("x 35 98:0 / /x rw - ext4 /dev/x rw") is None


def test_the_root_is_mounted_and_found_at_its_path() -> None:
    root = mountinfo.at("/")
    assert root, "/ is always a mount point"
    assert all(e.mountpoint == "/" for e in root)
    assert os.stat("/").st_dev != 0
    assert mountinfo.at("/no/such/mount/point") == []
