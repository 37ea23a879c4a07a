"""The sandbox review's decisions: ignore patterns, selection, conflicts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unionfs.identity import Identity
from unionfs.sandbox.review import (
    ADDED,
    CHANGED,
    DELETED,
    METADATA,
    Change,
    Ignore,
    conflicts,
    glob_regex,
    normalize_selection,
    select,
)

CHANGES = [
    Change("keep.txt", CHANGED),
    Change("keep.txt.bak", ADDED),
    Change("new", ADDED, True),
    Change("new/sub", ADDED, True),
    Change("new/sub/f.py", ADDED),
    Change("new/sub/g.c", ADDED),
    Change("old", METADATA, True),
    Change("old/x.py", CHANGED),
    Change("gone", DELETED, True),
    Change(".cache/pip/wheel", ADDED),
    Change("src/__pycache__/m.cpython-311.pyc", ADDED),
    Change("src/m.py", CHANGED),
]


def _paths(cs: list[Change]) -> list[str]:
    return [c.path for c in cs]


def test_default_ignores_hide_caches_and_count_them() -> None:
    kept, n = Ignore().split(CHANGES)
    assert n == 2
    assert ".cache/pip/wheel" not in _paths(kept)
    assert "src/__pycache__/m.cpython-311.pyc" not in _paths(kept)
    assert "src/m.py" in _paths(kept)


def test_user_ignore_file_adds_and_negates(tmp: Path) -> None:
    f = tmp / "ignore"
    f.write_text("*.bak\n!.cache/pip/\n")
    kept, n = Ignore.from_files(f).split(CHANGES)
    assert n == 2  # *.bak and __pycache__ now; .cache/pip/ is brought back
    assert "keep.txt.bak" not in _paths(kept)
    assert ".cache/pip/wheel" in _paths(kept)
    kept, n = Ignore.from_files(f, defaults=False).split(CHANGES)
    assert n == 1 and "keep.txt.bak" not in _paths(kept)


def test_exact_path_is_not_a_substring_match() -> None:
    assert _paths(select(CHANGES, ["keep.txt"])) == ["keep.txt"]


def test_selected_file_brings_its_new_parents() -> None:
    assert _paths(select(CHANGES, ["new/sub/f.py"])) == ["new", "new/sub", "new/sub/f.py"]
    # A metadata-only parent is not brought along: it is not needed.
    assert _paths(select(CHANGES, ["old/x.py"])) == ["old/x.py"]


def test_selected_directory_brings_its_contents() -> None:
    assert _paths(select(CHANGES, ["new/sub"])) == ["new", "new/sub", "new/sub/f.py", "new/sub/g.c"]


def test_globs_match_whole_paths() -> None:
    assert _paths(select(CHANGES, ["*.py"])) == []  # '*' stays in one component
    assert _paths(select(CHANGES, ["**/*.py"])) == [
        "new",
        "new/sub",
        "new/sub/f.py",
        "old/x.py",
        "src/m.py",
    ]
    assert _paths(select(CHANGES, ["new/*/g.?"])) == ["new", "new/sub", "new/sub/g.c"]
    assert _paths(select(CHANGES, [])) == _paths(CHANGES)
    assert glob_regex("a[bc]d").match("acd") and not glob_regex("a[bc]d").match("a/d")


def test_normalize_selection() -> None:
    root = "/home/u"
    assert normalize_selection(["/home/u/a", "b/c", "."], root, "/home/u/d") == ["a", "d/b/c", "d"]
    assert normalize_selection(["x/y"], root, "/elsewhere") == ["x/y"]  # from the root
    with pytest.raises(ValueError, match="not inside"):
        normalize_selection(["../../etc"], root, "/home/u/d")
    with pytest.raises(ValueError, match="not inside"):
        normalize_selection(["/home/user2/x"], root, "/home/u")


def test_conflicts_against_the_live_tree(tmp: Path) -> None:
    live = tmp / "live"
    live.mkdir()
    for name in ("same", "edited", "removed"):
        (live / name).write_text(name)
    (live / "tree").mkdir()
    (live / "tree" / "a").write_text("a")
    records = {
        p: Identity.of(os.lstat(live / p)) for p in ("same", "edited", "removed", "tree", "tree/a")
    }
    changes = [
        Change("same", CHANGED),
        Change("edited", CHANGED),
        Change("removed", DELETED),
        Change("made", ADDED),
        Change("made-too", ADDED),
        Change("both-dirs", ADDED, True),
        Change("tree", DELETED, True),
    ]
    fd = os.open(live, os.O_PATH | os.O_DIRECTORY)
    try:
        assert conflicts(changes, records, fd) == {}
        # Now others change the live tree while the sandbox ran.
        os.utime(live / "edited", ns=(5, 5))
        (live / "removed").unlink()
        (live / "made").write_text("outside")
        (live / "both-dirs").mkdir()
        (live / "tree" / "b").write_text("new outside")
        assert conflicts(changes, records, fd) == {
            "edited": "changed outside meanwhile",
            "removed": "deleted outside meanwhile",
            "made": "created outside meanwhile",
            "tree": "tree/b changed outside meanwhile",
        }
        # A symlink swapped in for a directory is never followed.
        os.rename(live / "tree", live / "tree.real")
        os.symlink("tree.real", live / "tree")
        assert conflicts([Change("tree/a", CHANGED)], records, fd) == {
            "tree/a": "deleted outside meanwhile"
        }
    finally:
        os.close(fd)
