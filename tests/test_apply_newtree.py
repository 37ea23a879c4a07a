"""``apply`` of wholly new directories: built under one temporary name, renamed once.

A directory TARGET has nothing at is made under ``.#ufa-PLANID-N`` with its
whole subtree inside at the final names, then renamed into place: these tests
check that the result is exactly the upper's tree (modes, set-id bits, owners,
a set-group-ID directory's group rule, xattrs, times, hard links, symlinks,
fifos, a read-only directory), also when the run is SIGKILLed while the tree
is half built or right after a rename and then resumed or undone, when the
temporary name is taken in TARGET, and when something appears at the new
directory's name meanwhile.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
from pathlib import Path

import pytest
from test_layertools import _apply_killed_at

from unionfs.changes import apply as apply_mod
from unionfs.changes.scan import Scanner

from support import diff_snapshots, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="other owners need root")

XATTRS = ("user.",)
MANY = 40


def _file(path: Path, data: str, mode: int = 0o644, mtime_ns: int = 1_000_000_123) -> None:
    path.write_text(data)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def make_scene(tmp: Path) -> tuple[Path, Path]:
    """A base (TARGET's copy and the lower) and an upper adding two new trees
    and changing one file in an existing directory."""
    base = tmp / "base"
    (base / "keep").mkdir(parents=True)
    _file(base / "keep" / "changed", "old\n")
    _file(base / "keep" / "same", "same\n")
    upper = tmp / "upper"
    (upper / "keep").mkdir(parents=True)
    shutil.copystat(base / "keep", upper / "keep")
    _file(upper / "keep" / "changed", "new\n", 0o640, 2_000_000_001)
    new = upper / "new"
    (new / "a" / "b" / "ro").mkdir(parents=True)
    _file(new / "a" / "b" / "file1", "one\n")
    _file(new / "a" / "b" / "ro" / "inside", "in a read-only dir\n", 0o444)
    _file(new / "a" / "exec", "#!/bin/sh\n", 0o4755)
    _file(new / "a" / "secret", "s\n", 0o600)
    _file(new / "a" / "owned", "theirs\n")
    os.chown(new / "a" / "owned", 1234, 1235)
    _file(new / "a" / "xa", "x\n")
    os.setxattr(new / "a" / "xa", "user.test", b"value")
    os.symlink("b/file1", new / "a" / "link")
    _file(new / "a" / "hl1", "linked\n")
    os.link(new / "a" / "hl1", new / "a" / "b" / "hl2")
    os.mkfifo(new / "a" / "fifo")
    # A set-group-ID directory: a file made in it gets the directory's group, so a
    # file of another group must be chowned.
    (new / "sgid").mkdir()
    os.chown(new / "sgid", 0, 1234)
    os.chmod(new / "sgid", 0o2775)
    _file(new / "sgid" / "f", "root's group\n")
    os.chown(new / "sgid" / "f", 0, 0)
    (new / "many").mkdir()
    for i in range(MANY):
        _file(new / "many" / f"f{i:03d}", f"{i}\n", 0o644, 3_000_000_000 + i)
    os.chmod(new / "a" / "b" / "ro", 0o555)
    (upper / "new2").mkdir()
    _file(upper / "new2" / "x", "x\n")
    for d in (new / "a" / "b" / "ro", new / "a" / "b", new / "a", new, upper / "new2"):
        os.utime(d, ns=(5_000_000_007, 5_000_000_007), follow_symlinks=False)
    return base, upper


def expected(base: Path, upper: Path) -> dict:
    """TARGET after the apply: the base with the upper's tree over it (every entry
    of the upper is added or replaces a file: the upper is the truth there)."""
    want = snapshot(base, xattr_prefixes=XATTRS)
    want.update(snapshot(upper, xattr_prefixes=XATTRS))
    return want


def times(root: Path, under: str) -> dict[str, int]:
    out = {}
    for p in sorted((root / under).rglob("*")):
        st = os.lstat(p)
        if not stat.S_ISLNK(st.st_mode):
            out[str(p.relative_to(root))] = st.st_mtime_ns
    return out


def leftovers(target: Path) -> list[Path]:
    return list(target.rglob(".#ufa-*"))


def planned(base: Path, upper: Path, target: Path) -> list[apply_mod.Step]:
    """The steps apply would take (nothing done)."""
    tree = apply_mod.Tree(str(target))
    try:
        with Scanner(str(upper), [str(base)]) as scanner:
            return apply_mod.plan(list(scanner.changes()), tree)[0]
    finally:
        tree.close()


def test_new_trees_are_applied_whole(tmp: Path):
    base, upper = make_scene(tmp)
    for durable in (False, True):
        target = tmp / f"target-{durable}"
        shutil.copytree(base, target, symlinks=True)
        # A mode the umask would mask is set all the same (chmod'ed, not created so).
        old = os.umask(0o077 if durable else 0o022)
        try:
            actions = apply_mod.apply(str(upper), [str(base)], str(target), durable=durable)
        finally:
            os.umask(old)
        got = snapshot(target, xattr_prefixes=XATTRS)
        assert diff_snapshots(expected(base, upper), got, ("want", "applied")) == []
        assert times(target, "new") == times(upper, "new")
        assert os.path.samefile(target / "new" / "a" / "hl1", target / "new" / "a" / "b" / "hl2")
        assert os.stat(target / "new" / "sgid" / "f").st_gid == 0
        assert leftovers(target) == []
        # One step per object still, for the report; the journal is gone.
        assert {a.path for a in actions} >= {"/new", "/new/many/f000", "/new2/x"}
        assert not (tmp / f".target-{durable}.unionfs-apply").exists()


def test_plan_marks_the_steps_inside_a_new_tree(tmp: Path):
    base, upper = make_scene(tmp)
    target = tmp / "target"
    shutil.copytree(base, target, symlinks=True)
    steps = planned(base, upper, target)
    by_path = {("/".join(s.path), s.op): s for s in steps}
    top = by_path[("new", "mkdir")]
    assert top.within == top.n
    assert by_path[("new/a/b/file1", "put")].within == top.n
    assert by_path[("new/a", "mkdir")].within == top.n
    assert by_path[("new2", "mkdir")].within == by_path[("new2", "mkdir")].n
    assert by_path[("keep/changed", "put")].within is None
    # The journal form round-trips.
    for s in steps:
        assert apply_mod.Step.from_doc(s.doc()).doc() == s.doc()


@pytest.mark.parametrize("durable", [False, True])
@pytest.mark.parametrize(
    ("point", "at"),
    # 50 copies: keep/changed, 48 in new (40 in new/many), new2/x ("build" counts
    # them); renames and links: the plan's, keep/changed's two, new's, new2's.
    [("build", n) for n in (1, 4, 30, 45, 50)] + [("rename", 4), ("rename", 5)],
)
def test_sigkill_while_a_new_tree_is_built_then_resume_or_undo(
    tmp: Path, point: str, at: int, durable: bool
):
    base, upper = make_scene(tmp)
    want = expected(base, upper)
    orig = snapshot(base, xattr_prefixes=XATTRS)
    for mode in ("resume", "undo"):
        target = tmp / f"target-{mode}"
        shutil.copytree(base, target, symlinks=True)
        status = _apply_killed_at(upper, [base], target, at, point, durable)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert (tmp / f".target-{mode}.unionfs-apply" / "plan.json").exists()
        if point == "build":
            # Killed while building: the new tree is nowhere under its own name yet
            # (or, past the first tree, the first one is whole).
            if not (target / "new").exists():
                assert leftovers(target)
            else:
                assert times(target, "new") == times(upper, "new")
        if mode == "resume":
            apply_mod.apply(str(upper), [str(base)], str(target), durable=durable)
            got = snapshot(target, xattr_prefixes=XATTRS)
            assert diff_snapshots(want, got, ("want", "resumed")) == []
            assert times(target, "new") == times(upper, "new")
        else:
            apply_mod.undo(str(target))
            got = snapshot(target, xattr_prefixes=XATTRS)
            assert diff_snapshots(orig, got, ("base", "undone")) == []
        assert leftovers(target) == []
        assert not (tmp / f".target-{mode}.unionfs-apply").exists()


def test_a_taken_temporary_name_is_not_used(tmp: Path, monkeypatch):
    base, upper = make_scene(tmp)
    target = tmp / "target"
    shutil.copytree(base, target, symlinks=True)
    steps = planned(base, upper, target)
    top = next(s for s in steps if s.path == ["new"] and s.op == "mkdir")
    # Someone's directory under the name the first plan id would build "new" in.
    taken = target / f".#ufa-aaaaaaaa-{top.n}"
    taken.mkdir()
    (taken / "theirs").write_text("precious\n")
    ids = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda _n: next(ids))
    apply_mod.apply(str(upper), [str(base)], str(target))
    assert (taken / "theirs").read_text() == "precious\n"
    shutil.rmtree(taken)
    got = snapshot(target, xattr_prefixes=XATTRS)
    assert diff_snapshots(expected(base, upper), got, ("want", "applied")) == []


def test_a_directory_that_appears_meanwhile_is_left_alone(tmp: Path, monkeypatch):
    base, upper = make_scene(tmp)
    target = tmp / "target"
    shutil.copytree(base, target, symlinks=True)
    write = apply_mod._write_atomic

    def plan_written_then_someone_makes_new(*a, **k):
        write(*a, **k)
        (target / "new").mkdir()
        (target / "new" / "many").mkdir()
        (target / "new" / "many" / "f000").write_text("someone else's\n")

    monkeypatch.setattr(apply_mod, "_write_atomic", plan_written_then_someone_makes_new)
    with pytest.raises(apply_mod.ApplyError, match="new"):
        apply_mod.apply(str(upper), [str(base)], str(target), durable=False)
    monkeypatch.setattr(apply_mod, "_write_atomic", write)
    theirs = snapshot(target / "new")
    assert theirs == {"many": theirs["many"], "many/f000": theirs["many/f000"]}
    # A resume meets it again: the same clear error, nothing merged into it.
    with pytest.raises(apply_mod.ApplyError, match="new"):
        apply_mod.apply(str(upper), [str(base)], str(target), durable=False)
    assert snapshot(target / "new") == theirs
    # Undo removes what was built aside and leaves their directory as it is.
    apply_mod.undo(str(target))
    assert snapshot(target / "new") == theirs
    got = snapshot(target, xattr_prefixes=XATTRS)
    orig = snapshot(base, xattr_prefixes=XATTRS)
    rest = {k: v for k, v in got.items() if k != "new" and not k.startswith("new/")}
    assert diff_snapshots(orig, rest, ("base", "undone")) == []
    assert leftovers(target) == []


#: A POSIX ACL (u::rwx,u:1000:r,g::r,m::r,o::r) as its xattr value.
ACL = bytes.fromhex(
    "0200000001000700ffffffff02000400e803000004000400ffffffff10000400ffffffff20000400ffffffff"
)
ACL_XATTRS = ("user.", "system.posix_acl_access", "system.posix_acl_default")


def test_a_new_directory_with_a_default_acl_gives_its_files_the_upper_s_acls(tmp: Path):
    """A file created in a directory with a default ACL gets an ACL and a mode from it:
    there, what creating gives is not taken for the upper's (everything is set)."""
    base = tmp / "base"
    base.mkdir()
    upper = tmp / "upper"
    acl = upper / "new" / "acl"
    acl.mkdir(parents=True)
    _file(acl / "plain", "no ACL of its own\n", 0o640)
    _file(acl / "own", "an ACL of its own\n", 0o644)
    os.setxattr(acl / "own", "system.posix_acl_access", ACL)
    # Set after its files were made: they have none from it.
    os.setxattr(acl, "system.posix_acl_default", ACL)
    target = tmp / "target"
    target.mkdir()
    apply_mod.apply(str(upper), [str(base)], str(target))
    want = snapshot(upper, xattr_prefixes=ACL_XATTRS)
    got = snapshot(target, xattr_prefixes=ACL_XATTRS)
    assert diff_snapshots(want, got, ("upper", "applied")) == []
    assert not [x for x in os.listxattr(target / "new" / "acl" / "plain") if "acl" in x]
