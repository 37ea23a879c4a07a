"""Option parsing and the start-up checks, without a mount."""

import os

import pytest

from unionfs.options import (
    ConfigError,
    build_config,
    check_paths,
    default_workdir,
    split_lowerdirs,
    split_options,
)


def test_split_lowerdirs_escapes():
    assert split_lowerdirs("a:b:c") == ["a", "b", "c"]
    assert split_lowerdirs(r"a\:b:c") == ["a:b", "c"]
    assert split_lowerdirs(r"a\\:b") == ["a\\", "b"]
    with pytest.raises(ConfigError):
        split_lowerdirs("a::b")
    with pytest.raises(ConfigError):
        split_lowerdirs("a\\")


def test_split_options():
    assert split_options(["ro,workdir=/w", "timeout=1"]) == ["ro", "workdir=/w", "timeout=1"]
    assert split_options([r"fsname=a\,b"]) == ["fsname=a,b"]


def test_forms():
    cfg = build_config(["l1:l2", "up", "mnt"], [])
    assert (cfg.lowers, cfg.upper, cfg.mountpoint, cfg.read_only) == (
        ["l1", "l2"],
        "up",
        "mnt",
        False,
    )
    cfg = build_config(["l1", "mnt"], [])
    assert cfg.upper is None and cfg.read_only
    cfg = build_config(["mnt"], ["lowerdir=a:b,upperdir=u,workdir=w"])
    assert (cfg.lowers, cfg.upper, cfg.workdir) == (["a", "b"], "u", "w")
    cfg = build_config(["l", "u", "m"], ["ro"])
    assert cfg.read_only and cfg.upper == "u"
    assert build_config(["l", "u", "m"], []).spin_us == 30
    assert build_config(["l", "u", "m"], ["spin_us=0"]).spin_us == 0


@pytest.mark.parametrize(
    ("positional", "opts", "fragment"),
    [
        (["l", "u", "m"], ["bogus"], "unknown option 'bogus'"),
        (["l", "u", "m"], ["bogus=1"], "unknown option 'bogus='"),
        (["l", "u", "m"], ["timeout=abc"], "needs a number"),
        (["l", "u", "m"], ["timeout=-1"], ">= 0"),
        (["l", "u", "m"], ["timeout=nan"], ">= 0"),
        (["l", "u", "m"], ["whiteout=aufs"], "whiteout="),
        (["l", "u", "m"], ["fsname="], "fsname"),
        (["l", "u", "m"], ["read_ahead_kb=lots"], "whole number"),
        (["l", "u", "m"], ["spin_us=-5"], "spin_us= needs a whole number"),
        (["l", "u", "m"], ["spin_us=2000000"], "spin_us= needs a whole number"),
        (["m"], ["upperdir=u"], "needs -o lowerdir"),
        (["a", "b", "m"], ["lowerdir=l"], "only [SOURCE] MNT"),
        (["a", "b", "c", "d"], [], "usage"),
        (["l", "m"], ["workdir=w"], "needs an upper"),
        (["l", "m"], ["volatile"], "volatile needs a writable upper"),
        (["l", "u", "m"], ["volatile", "ro"], "volatile needs a writable upper"),
    ],
)
def test_bad_options(positional, opts, fragment):
    with pytest.raises(ConfigError) as info:
        build_config(positional, opts)
    assert fragment in str(info.value)
    assert info.value.code == 2


def test_fuse_options():
    cfg = build_config(["l", "u", "m"], ["nosuid,noatime"])
    root = cfg.fuse_options(is_root=True)
    assert {"default_permissions", "allow_other", "nosuid", "noatime", "subtype=unionfs"} <= root
    assert "allow_other" not in cfg.fuse_options(is_root=False)
    ro = build_config(["l", "m"], []).fuse_options(is_root=False)
    assert "ro" in ro


def test_default_workdir_is_a_sibling():
    assert default_workdir("/a/b/upper") == "/a/b/.upper.unionfs-work"
    assert default_workdir("/a/b/upper/") == "/a/b/.upper.unionfs-work"


@pytest.fixture
def tree(tmp_path):
    for d in ("l1", "l2", "up", "mnt", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "file").write_text("x")
    return tmp_path


def _check(tree, lowers, upper, mnt, opts=()):
    cfg = build_config(
        [
            ":".join(str(tree / x) for x in lowers),
            *([str(tree / upper)] if upper else []),
            str(tree / mnt),
        ],
        list(opts),
    )
    check_paths(cfg, is_root=True)
    return cfg


def test_good_paths_resolve(tree):
    os.symlink(tree / "l1", tree / "l1link")
    cfg = _check(tree, ["l1link", "l2"], "up", "mnt")
    assert cfg.lowers[0] == str(tree / "l1")
    assert cfg.workdir == str(tree / ".up.unionfs-work")


@pytest.mark.parametrize(
    ("lowers", "upper", "mnt", "opts", "fragment"),
    [
        (["missing"], "up", "mnt", (), "does not exist"),
        (["file"], "up", "mnt", (), "is not a directory"),
        (["l1"], "missing", "mnt", (), "does not exist"),
        (["l1"], "up", "missing", (), "does not exist"),
        (["l1", "l1"], "up", "mnt", (), "given twice"),
        (["l1"], "l1/sub", "mnt", (), "inside lower"),
        (["l1"], "l1", "mnt", (), "inside lower"),
        (["up/inner"], "up", "mnt", (), "inside upper"),
        (["l1"], "up", "l1/sub", (), "inside branch"),
        (["mnt/sub"], "up", "mnt", (), "inside the mount point"),
        (["l1"], "up", "mnt", ("workdir=up/w",), "overlaps"),
        (["l1"], "up", "mnt", ("workdir=missing",), "work dir"),
    ],
)
def test_bad_paths(tree, lowers, upper, mnt, opts, fragment):
    for rel in ("l1/sub", "up/inner", "mnt/sub", "up/w"):
        (tree / rel).mkdir(exist_ok=True)
    if mnt == "mnt" and not any(x.startswith("mnt/") for x in lowers):
        for entry in (tree / "mnt").iterdir():
            entry.rmdir()
    opts = tuple(o.replace("=", f"={tree}/", 1) for o in opts)
    with pytest.raises(ConfigError) as info:
        _check(tree, lowers, upper, mnt, opts)
    assert fragment in str(info.value)
    assert info.value.code == 1


def test_nonempty_mountpoint(tree):
    (tree / "mnt" / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        _check(tree, ["l1"], "up", "mnt")
    _check(tree, ["l1"], "up", "mnt", ("nonempty",))


def test_missing_fuse_device_or_fusermount(tree, monkeypatch):
    import unionfs.options as options

    real_exists = os.path.exists
    monkeypatch.setattr(options.os.path, "exists", lambda p: p != "/dev/fuse" and real_exists(p))
    with pytest.raises(ConfigError, match="/dev/fuse is missing"):
        _check(tree, ["l1"], "up", "mnt")
    monkeypatch.setattr(options.os.path, "exists", real_exists)
    monkeypatch.setattr(options.shutil, "which", lambda name: None)
    cfg = build_config([str(tree / "l1"), str(tree / "up"), str(tree / "mnt")], [])
    with pytest.raises(ConfigError, match="fusermount3 not found"):
        check_paths(cfg, is_root=False)
