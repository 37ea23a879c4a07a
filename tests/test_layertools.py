"""The layer tools (diff, export-layer, apply) against independent references.

An upper is made by running real programs (a shell's rm -rf/mv/chmod/ln,
git, sqlite3) through a unionfs mount over lowers that hold whiteouts, an
opaque directory, hard links, set-id files, xattrs and other owners.  Then:

- ``diff`` equals a naive full-tree comparison of the lowers' merged view
  (kernel overlayfs of the lowers alone) with the merged view of lowers +
  upper (kernel overlayfs again);
- the exported layer, extracted with the OCI whiteout rules (a small
  extractor written here from the spec) onto a copy of the lowers' view, and
  unpacked by ``umoci`` on top of a base layer of that view, gives exactly
  the merged view unionfs showed;
- ``apply`` onto a copy of the lowers' view gives the merged view, also after
  SIGKILL at several points of the run and a resume, and ``--undo`` gives the
  copy back;
- bad input is a one-line error that changes nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from unionfs import stackinfo
from unionfs.changes import apply as apply_mod
from unionfs.changes.scan import Kind, scan

from support import (
    Dir,
    File,
    Hardlink,
    Symlink,
    Whiteout,
    diff_snapshots,
    kernel_overlay,
    make_layers,
    snapshot,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlayfs oracle needs root")

UNIONFS = [sys.executable, "-m", "unionfs.command"]
#: What a merged view is compared on (times differ between any two copies).
XATTRS = ("user.", "security.capability", "system.posix_acl_access")
#: A file capability (v2, cap_net_bind_service) and an access ACL (u::rwx,u:1000:r,g::r,m::r,o::r).
CAP = "0x0100000200040000000000000000000000000000"
ACL = "0x0200000001000700ffffffff02000400e803000004000400ffffffff10000400ffffffff20000400ffffffff"


def run_unionfs(*args: str, **kw) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*UNIONFS, *args], capture_output=True, **kw)


def lower_layers(base: Path, fmt: str | tuple[str, ...] = "kernel") -> list[Path]:
    """Two lowers (kernel format by default): a whiteout and an opaque dir in the top one."""
    top = {
        "etc": {"motd": "top motd\n", "gone": Whiteout()},
        "opt": Dir({"keep": "kept\n"}, opaque=True),
        "bin": {"tool": File("#!/bin/sh\n", mode=0o4755)},
    }
    bottom = {
        "etc": {
            "passwd": "root:x:0:0\n",
            "hostname": "box\n",
            "gone": "deleted below\n",
            "motd": "old motd\n",
            "owned": File("someone's\n", uid=1234, gid=1234),
            "attr": File("with xattr\n", xattrs={"user.colour": b"blue"}),
        },
        "opt": {"hidden": "hidden by opaque\n", "sub": {"deep": "deep\n"}},
        "data": {"a": "a\n", "sub": {"b": "b\n", "c": "c\n"}},
        "hl": {"one": "linked\n", "two": Hardlink("hl/one"), "three": Hardlink("hl/one")},
        "lnk": Symlink("etc/passwd"),
        "usr": {"lib": {"x.so": "elf\n"}, "share": {"doc": "doc\n"}},
    }
    return make_layers(base, [top, bottom], list(fmt) if isinstance(fmt, tuple) else fmt)


WORKLOAD = r"""
set -e
echo more >> etc/passwd
chmod 600 etc/hostname
chown 4321:4321 etc/owned
setfattr -n user.colour -v red etc/attr
touch -d 2001-02-03 etc/motd
rm -rf usr/lib
rm lnk
ln -s etc/hostname lnk2
mv data data2
mkdir data
echo fresh > data/new
rm -rf opt/keep
echo again > opt/keep2
echo changed >> hl/one
stat hl/two hl/three > /dev/null
rm hl/three && mkdir hl/three && echo in > hl/three/file
rm -rf usr/share && echo now-a-file > usr/share
mkfifo fifo
mknod dev c 1 3
ln etc/passwd etc/passwd.hard
echo "x" > bin/tool
chmod 4755 bin/tool
mkdir -p new/deep/er && echo deep > new/deep/er/file
cp /bin/true bin/captrue && setfattr -n security.capability -v "$CAP" bin/captrue
echo acl > etc/acl && setfattr -n system.posix_acl_access -v "$ACL" etc/acl
git init -q repo && cd repo && git config user.email t@t && git config user.name t
echo hello > README && git add README && git commit -qm one && cd ..
sqlite3 db.sqlite 'create table t(x); insert into t values (1), (2);'
"""


@pytest.fixture
def scene(tmp: Path, unionfs):
    """(lowers, upper, merged snapshot, lowers' snapshot, a copy of the lowers' view)."""
    lowers = lower_layers(tmp / "layers")
    upper = tmp / "upper"
    upper.mkdir()
    m = unionfs(lowers, upper)
    env = dict(os.environ, CAP=CAP, ACL=ACL)
    r = subprocess.run(["sh", "-c", WORKLOAD], cwd=m.mnt, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    merged = snapshot(m.mnt, xattr_prefixes=XATTRS)
    m.close()
    base = tmp / "base"
    base.mkdir()
    with _kmnt(tmp, lowers) as view:
        before = snapshot(view, xattr_prefixes=XATTRS)
        subprocess.run(["cp", "-a", f"{view}/.", str(base)], check=True)
    return lowers, upper, merged, before, base


class _kmnt:
    """Kernel overlayfs of the lowers alone (read-only), as a context manager."""

    def __init__(self, tmp: Path, lowers: list[Path], upper: Path | None = None) -> None:
        self.mnt = tmp / ("kview" if upper is None else "kmerged")
        self.mnt.mkdir(exist_ok=True)
        work = None
        if upper is not None:
            work = tmp / "kwork"
            work.mkdir(exist_ok=True)
        self.cm = kernel_overlay(lowers, upper, work, self.mnt)

    def __enter__(self) -> Path:
        return self.cm.__enter__()

    def __exit__(self, *exc) -> None:
        self.cm.__exit__(*exc)


def naive_diff(before: dict, after: dict) -> dict[str, set[str]]:
    """docker diff by walking both trees: added, deleted (topmost only), changed."""
    added = {p for p in after if p not in before}
    deleted = {p for p in before if p not in after}
    deleted = {p for p in deleted if os.path.dirname(p) not in deleted}
    added_top = added
    changed = {p for p in after if p in before and after[p] != before[p]}
    return {"A": added_top, "D": deleted, "C": changed}


def changes_by_kind(upper: Path, lowers) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"A": set(), "C": set(), "D": set()}
    for c in scan(str(upper), [str(p) for p in lowers]):
        if c.kind is not Kind.SAME:
            out[c.kind.value].add(os.fsdecode(b"/".join(c.path)))
    return out


# --------------------------------------------------------------------------- diff


def test_diff_equals_full_tree_comparison(scene, tmp: Path):
    lowers, upper, merged, before, _ = scene
    with _kmnt(tmp, lowers, upper) as kview:
        after = snapshot(kview, xattr_prefixes=XATTRS, exclude=("nlink",))
        # A kernel overlayfs mount point names its upper and lowers in mountinfo.
        by_mnt = run_unionfs("diff", str(kview))
    by_upper = run_unionfs("diff", str(upper), "--lower", ":".join(map(str, lowers)))
    assert by_mnt.returncode == 0, by_mnt.stderr
    assert by_mnt.stdout == by_upper.stdout
    merged_nl = {k: (*v[:6], None, *v[7:]) for k, v in merged.items()}
    assert diff_snapshots(merged_nl, after, ("unionfs", "kernel")) == []
    before_nl = {k: (*v[:6], None, *v[7:]) for k, v in before.items()}
    naive = naive_diff(before_nl, after)
    ours = changes_by_kind(upper, lowers)
    assert ours["A"] == naive["A"]
    assert ours["D"] == naive["D"]
    # Ours also reports changes of times only (directories whose children changed).
    assert naive["C"] <= ours["C"], naive["C"] - ours["C"]
    assert {"usr/lib", "lnk", "opt/keep"} <= ours["D"] and "opt/hidden" not in ours["D"]
    assert "data" in ours["C"] and "data/a" in ours["D"]


def test_diff_command_lines_json_and_metadata_marks(scene):
    lowers, upper, *_ = scene
    lower_arg = ":".join(map(str, lowers))
    r = run_unionfs("diff", str(upper), "--lower", lower_arg)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert "C /etc/hostname (metadata: mode)" in lines
    assert "C /etc/owned (metadata: owner)" in lines
    assert "C /etc/attr (metadata: xattrs)" in lines
    assert "C /etc/motd (metadata: times)" in lines
    assert "C /etc/passwd" in lines
    assert "D /usr/lib" in lines and "A /data2/sub/b" in lines
    assert "C /data (metadata: times) (opaque)" in lines
    assert "C /opt (metadata: times)" in lines  # its whiteout merges: not opaque
    # The recorded stack makes --lower unnecessary.
    r2 = run_unionfs("diff", str(upper))
    assert r2.returncode == 0 and r2.stdout == r.stdout
    j = json.loads(run_unionfs("diff", str(upper), "--json").stdout)
    by_path = {c["path"]: c for c in j["changes"]}
    assert by_path["/etc/hostname"]["metadata_only"] is True
    assert by_path["/etc/passwd"]["aspects"] == ["content", "times"]
    assert by_path["/usr/lib"]["kind"] == "D" and by_path["/usr/lib"]["type"] == "dir"
    content = run_unionfs("diff", str(upper), "--content").stdout.decode()
    assert "--- a/etc/passwd\n+++ b/etc/passwd\n" in content and "+more\n" in content
    assert "b/db.sqlite" not in content  # binary: no text diff


def test_diff_of_a_mount_point(tmp: Path, unionfs):
    lowers = lower_layers(tmp / "layers")
    upper = tmp / "upper"
    upper.mkdir()
    m = unionfs(lowers, upper, foreground=False)  # a daemon's command line without -f
    subprocess.run(["sh", "-c", "rm etc/passwd; echo n > new"], cwd=m.mnt, check=True)
    r = run_unionfs("diff", str(m.mnt))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == ["C /etc (metadata: times)", "D /etc/passwd", "A /new"]


def test_stack_record_round_trip_and_errors(tmp: Path):
    info = stackinfo.StackInfo(("/a", "/b:c"), "/u", "oci", "trusted.")
    stackinfo.record(str(tmp), info)
    assert stackinfo.read(str(tmp)) == info
    assert [p.name for p in tmp.iterdir()] == ["stack.json"]  # no temporary left
    (tmp / "stack.json").write_text('{"version": 1, "lowers": ["relative"]}')
    with pytest.raises(stackinfo.StackError, match="not absolute"):
        stackinfo.read(str(tmp))
    upper = tmp / "u"
    upper.mkdir()
    r = run_unionfs("diff", str(upper))
    assert r.returncode == 1 and b"--lower" in r.stderr and r.stderr.count(b"\n") == 1


# --------------------------------------------------------------------------- export


def _norm(name: str) -> str:
    name = name[2:] if name.startswith("./") else name
    return name.rstrip("/")


def oci_extract(layer: Path, root: Path) -> None:
    """Apply one layer tar onto ``root`` by the image spec's rules (written from layer.md).

    Whiteouts hide paths of lower layers only: opaque markers and whiteouts are
    applied against what existed before this layer, whatever their position.
    """
    with tarfile.open(layer, "r:*") as tf:
        members = tf.getmembers()
        for ti in members:  # whiteouts first, against the lower contents
            name = _norm(ti.name)
            base = os.path.basename(name)
            parent = root / os.path.dirname(name)
            if base == ".wh..wh..opq":
                for child in list(parent.iterdir()) if parent.is_dir() else []:
                    _rm(child)
            elif base.startswith(".wh."):
                _rm(parent / base[4:])
        for ti in members:
            name = _norm(ti.name)
            if os.path.basename(name).startswith(".wh."):
                continue
            path = root / name
            if path.is_symlink() or (path.exists() and not (ti.isdir() and path.is_dir())):
                _rm(path)
            if ti.isdir():
                path.mkdir(exist_ok=True)
            elif ti.islnk():
                os.link(root / _norm(ti.linkname), path, follow_symlinks=False)
                continue
            elif ti.issym():
                os.symlink(ti.linkname, path)
            elif ti.isfifo():
                os.mkfifo(path)
            elif ti.ischr() or ti.isblk():
                kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
                os.mknod(path, kind, os.makedev(ti.devmajor, ti.devminor))
            else:
                with open(path, "wb") as f:
                    shutil.copyfileobj(tf.extractfile(ti), f)
            os.lchown(path, ti.uid, ti.gid)
            if not ti.issym():
                os.chmod(path, ti.mode)
                for k, v in ti.pax_headers.items():
                    if k.startswith("SCHILY.xattr."):
                        os.setxattr(path, k[13:], v.encode("utf-8", "surrogateescape"))


def _rm(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def test_exported_layer_extracts_to_the_merged_view(scene, tmp: Path):
    _, upper, merged, _, base = scene
    layer = tmp / "layer.tar.gz"
    r = run_unionfs("export-layer", str(upper), "-o", str(layer), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    raw = gzip.decompress(layer.read_bytes())
    assert info["diffID"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert info["digest"] == "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        members = {m.name: m for m in tf}
        names = [m.name for m in tf]
    assert len(names) == len(set(names))
    assert "opt/.wh.keep" in names and "usr/.wh.lib" in names and ".wh.lnk" in names
    assert names.index("usr/.wh.lib") < names.index("usr/share") if "usr/share" in names else 1
    # Only really opaque directories: data (re-created over a dir) is, new/ is not.
    assert "data/.wh..wh..opq" in names and "new/.wh..wh..opq" not in names
    assert members["hl/two"].islnk() or members["hl/one"].islnk()
    assert members["bin/tool"].mode == 0o4755
    assert members["etc/owned"].uid == 4321 and members["etc/owned"].uname == ""
    assert members["etc/attr"].pax_headers["SCHILY.xattr.user.colour"] == "red"
    assert "SCHILY.xattr.security.capability" in members["bin/captrue"].pax_headers
    assert "SCHILY.xattr.system.posix_acl_access" in members["etc/acl"].pax_headers
    assert "security.capability" in merged["bin/captrue"][5][0]
    assert not any("overlay" in k for m in members.values() for k in m.pax_headers)
    root = tmp / "extracted"
    shutil.copytree(base, root, symlinks=True)
    oci_extract(layer, root)
    assert (
        diff_snapshots(merged, snapshot(root, xattr_prefixes=XATTRS), ("merged", "extracted")) == []
    )


def _layout(root: Path, layers: list[Path]) -> None:
    """A minimal OCI layout (containers.md §6.2) holding ``layers`` (plain tars)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return {"digest": "sha256:" + h, "size": len(data)}

    descs, diff_ids = [], []
    for p in layers:
        data = p.read_bytes()
        diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", **put(data)})
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z"} for _ in layers],
    }
    c = put(json.dumps(cfg).encode())
    man = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **c},
        "layers": descs,
    }
    m = put(json.dumps(man).encode())
    (root / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        **m,
                        "annotations": {"org.opencontainers.image.ref.name": "t"},
                    }
                ],
            }
        )
    )
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
def test_umoci_unpacks_base_plus_exported_layer_to_the_merged_view(scene, tmp: Path):
    _, upper, merged, _, base = scene
    base_tar = tmp / "base.tar"
    with tarfile.open(base_tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for p in sorted(base.rglob("*")):
            ti = tf.gettarinfo(p, str(p.relative_to(base)))
            for k in os.listxattr(p, follow_symlinks=False):
                ti.pax_headers["SCHILY.xattr." + k] = os.getxattr(
                    p, k, follow_symlinks=False
                ).decode("utf-8", "surrogateescape")
            if ti.isreg():
                with open(p, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)
    layer = tmp / "layer.tar"
    assert run_unionfs("export-layer", str(upper), "-o", str(layer)).returncode == 0
    _layout(tmp / "layout", [base_tar, layer])
    r = subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp}/layout:t", str(tmp / "bundle")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    got = snapshot(tmp / "bundle" / "rootfs", xattr_prefixes=XATTRS)
    assert diff_snapshots(merged, got, ("merged", "umoci")) == []


def test_export_is_reproducible_and_clamped(scene, tmp: Path):
    _, upper, *_ = scene
    for suffix in ("tar", "tar.gz", "tar.zst"):
        a, b = tmp / f"a.{suffix}", tmp / f"b.{suffix}"
        assert run_unionfs("export-layer", str(upper), "-o", str(a)).returncode == 0
        os.utime(upper / "etc" / "passwd", ns=(1, os.stat(upper / "etc" / "passwd").st_mtime_ns))
        assert run_unionfs("export-layer", str(upper), "-o", str(b)).returncode == 0
        assert a.read_bytes() == b.read_bytes(), suffix
    env = dict(os.environ, SOURCE_DATE_EPOCH="1000")
    c = tmp / "c.tar"
    r = run_unionfs("export-layer", str(upper), "-o", "-", env=env)
    c.write_bytes(r.stdout)
    assert b"diff_id sha256:" in r.stderr
    with tarfile.open(c) as tf:
        assert {ti.mtime for ti in tf} <= {0, 1000}
    assert a.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd
    assert gzip.decompress((tmp / "a.tar.gz").read_bytes()) == (tmp / "a.tar").read_bytes()
    assert (tmp / "a.tar.gz").read_bytes()[4:8] == b"\0\0\0\0"  # gzip header mtime 0


# --------------------------------------------------------------------------- apply


def test_apply_gives_the_merged_view_and_undo_gives_the_copy_back(scene, tmp: Path):
    _, upper, merged, _, base = scene
    target = tmp / "target"
    shutil.copytree(base, target, symlinks=True)
    orig = snapshot(target, xattr_prefixes=XATTRS)
    dry = run_unionfs("apply", str(upper), str(target), "--dry-run")
    assert dry.returncode == 0 and b"would remove /usr/lib" in dry.stdout
    assert snapshot(target, xattr_prefixes=XATTRS) == orig
    r = run_unionfs("apply", str(upper), str(target), "--keep-journal")
    assert r.returncode == 0, r.stderr
    assert (
        diff_snapshots(merged, snapshot(target, xattr_prefixes=XATTRS), ("merged", "applied")) == []
    )
    assert os.path.samefile(target / "hl" / "one", target / "hl" / "two")
    r = run_unionfs("apply", "--undo", str(upper), str(target))
    assert r.returncode == 0, r.stderr
    assert diff_snapshots(orig, snapshot(target, xattr_prefixes=XATTRS), ("copy", "undone")) == []
    assert not (tmp / ".target.unionfs-apply").exists()


def _apply_killed_at(
    upper: Path, lowers, target: Path, kill_at: int, points: str = "rename", durable: bool = True
) -> int:
    """Run apply in a child that SIGKILLs itself at its ``kill_at``-th rename or link
    (``points="build"``: at its ``kill_at``-th file copy or group commit's syncfs,
    while files are built aside and not renamed yet)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        count = [0]

        def counting(fn):
            def wrapper(*a, **k):
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*a, **k)

            return wrapper

        if points == "build":
            apply_mod._copy = counting(apply_mod._copy)
            apply_mod.syncfs = counting(apply_mod.syncfs)
        else:
            apply_mod.renameat2 = counting(apply_mod.renameat2)
            os.rename = counting(os.rename)
            os.link = counting(os.link)
        try:
            apply_mod.apply(str(upper), [str(p) for p in lowers], str(target), durable=durable)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize(
    ("points", "kill_at"),
    [
        *[("rename", n) for n in (1, 3, 8, 17, 30)],
        # Killed while the group commit has files built aside, not renamed yet.
        *[("build", n) for n in (1, 3, 5)],
    ],
)
def test_apply_resumes_or_undoes_after_sigkill(scene, tmp: Path, points: str, kill_at: int):
    lowers, upper, merged, _, base = scene
    for mode in ("resume", "undo"):
        target = tmp / f"target-{mode}"
        shutil.copytree(base, target, symlinks=True)
        orig = snapshot(target, xattr_prefixes=XATTRS)
        status = _apply_killed_at(upper, lowers, target, kill_at, points)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        journal = tmp / f".target-{mode}.unionfs-apply"
        # The first rename is the plan's own: killed there, nothing was planned yet.
        assert (journal / "plan.json").exists() == (kill_at > 1 or points == "build")
        if points == "build":
            assert [p for p in target.rglob(".#ufa-*")] or kill_at == 1  # built aside
        if kill_at == 1 and mode == "undo" and points == "rename":
            assert snapshot(target, xattr_prefixes=XATTRS) == orig  # nothing was done
            shutil.rmtree(journal)
            continue
        if mode == "resume":
            r = run_unionfs("apply", str(upper), str(target))
            want, names = merged, ("merged", "resumed")
        else:
            r = run_unionfs("apply", "--undo", str(upper), str(target))
            want, names = orig, ("copy", "undone")
        assert r.returncode == 0, r.stderr
        assert diff_snapshots(want, snapshot(target, xattr_prefixes=XATTRS), names) == []
        assert not journal.exists()
        assert not [p for p in target.rglob(".#ufa-*")]


def test_apply_select_and_conflict_check(scene, tmp: Path):
    lowers, upper, merged, before, base = scene
    target = tmp / "target"
    shutil.copytree(base, target, symlinks=True)
    seen = []

    def conflict(c, st):
        seen.append(c.path)
        return c.path != (b"etc", b"hostname")

    apply_mod.apply(
        str(upper),
        [str(p) for p in lowers],
        str(target),
        select=lambda p: p[:1] in ((b"etc",), (b"new",)),
        conflict_check=conflict,
    )
    got = snapshot(target, xattr_prefixes=XATTRS)
    assert got["new/deep/er/file"] == merged["new/deep/er/file"]
    assert got["etc/passwd"] == merged["etc/passwd"]
    assert got["etc/hostname"] == before["etc/hostname"]  # refused by the check
    assert got["usr/lib/x.so"] == before["usr/lib/x.so"]  # not selected
    assert "data2" not in got
    # hl/one's other names are hard links to it in the upper; selected alone, each is a copy.
    target2 = tmp / "target2"
    shutil.copytree(base, target2, symlinks=True)
    apply_mod.apply(
        str(upper), [str(p) for p in lowers], str(target2), select=lambda p: p == (b"hl", b"two")
    )
    assert (target2 / "hl" / "two").read_text() == "linked\nchanged\n"
    assert (target2 / "hl" / "one").read_text() == "linked\n"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", ["dotwh", "nonempty-whiteout", "opaque-value"])
def test_corrupt_upper_is_an_error_that_changes_nothing(tmp: Path, bad: str):
    lower = tmp / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "f").write_text("f\n")
    upper = tmp / "upper"
    (upper / "d").mkdir(parents=True)
    (upper / "d" / "new").write_text("new\n")
    if bad == "dotwh":
        (upper / "d" / ".wh.").write_bytes(b"")
    elif bad == "nonempty-whiteout":
        (upper / "d" / ".wh.f").write_text("not empty")
    else:
        os.setxattr(upper / "d", "trusted.overlay.opaque", b"maybe")
    target = tmp / "target"
    shutil.copytree(lower, target)
    before = snapshot(target)
    out = tmp / "out.tar"
    for cmd in (
        ["diff", str(upper)],
        ["export-layer", str(upper), "-o", str(out)],
        ["apply", str(upper), str(target)],
    ):
        r = run_unionfs(*cmd, "--lower", str(lower))
        assert r.returncode == 1, (cmd, r.stdout, r.stderr)
        assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
    assert not out.exists() and not list(tmp.glob(".out.tar*"))
    assert snapshot(target) == before
    assert not (tmp / ".target.unionfs-apply").exists()


def test_symlink_in_target_never_redirects_a_write(tmp: Path):
    lower = tmp / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "conf").write_text("old\n")
    upper = tmp / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "conf").write_text("new\n")
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "conf").write_text("precious\n")
    target = tmp / "target"
    target.mkdir()
    os.symlink(outside, target / "etc")
    r = run_unionfs("apply", str(upper), str(target), "--lower", str(lower))
    assert r.returncode == 1 and b"symlink" in r.stderr, r.stderr
    assert (outside / "conf").read_text() == "precious\n"
    assert os.readlink(target / "etc") == str(outside)


def test_journal_with_an_escaping_name_is_refused(tmp: Path):
    target = tmp / "target"
    target.mkdir()
    journal = tmp / ".target.unionfs-apply"
    (journal / "backup").mkdir(parents=True)
    step = {"n": 0, "op": "remove", "path": ["..", "victim"], "kind": "D", "had": "nondir"}
    (journal / "plan.json").write_text(
        json.dumps(
            {
                "version": 1,
                "upper": str(tmp),
                "target": str(target),
                "plan_id": "x",
                "steps": [step],
            }
        )
    )
    (tmp / "victim").write_text("v")
    r = run_unionfs("apply", "--resume", str(tmp), str(target))
    assert r.returncode == 1 and b"refusing the name" in r.stderr
    assert (tmp / "victim").exists()


# --------------------------------------------------------------------------- rootless


def test_unprivileged_mount_diff_export_apply(tmp: Path, unionfs, unpriv_user, unpriv_tmp):
    """A user's mount writes user.overlay.opaque markers; the tools read them as that user.

    The lowers are root's and hold an unreadable file and directory, which the
    tools never need to read: only the upper is walked.
    """
    from support import as_user, chown_tree, run_as

    lower = tmp / "lower"
    (lower / "work" / "sub").mkdir(parents=True)
    (lower / "work" / "a").write_text("a\n")
    (lower / "work" / "sub" / "x").write_text("x\n")
    (lower / "secret").write_text("root only\n")
    (lower / "private").mkdir()
    (lower / "private" / "f").write_text("f\n")
    os.chmod(lower / "secret", 0o600)
    os.chmod(lower / "private", 0o700)
    os.chmod(lower / "work", 0o777)
    os.chmod(lower / "work" / "sub", 0o777)
    upper = unpriv_tmp / "upper"
    upper.mkdir()
    os.chown(upper, unpriv_user.uid, unpriv_user.gid)
    m = unionfs([lower], upper, user=unpriv_user)
    script = (
        "rm work/a && rm -rf work/sub && mkdir work/sub && echo y > work/sub/y && echo n > work/new"
    )
    r = subprocess.run(
        ["sh", "-c", f'cd "$1" && {script}', "sh", str(m.mnt)],
        cwd="/",
        preexec_fn=as_user(unpriv_user),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    merged = run_as(unpriv_user, snapshot, str(m.mnt / "work"))
    m.close()
    assert "user.overlay.opaque" in os.listxattr(upper / "work" / "sub")

    def as_user_run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*UNIONFS, *args], capture_output=True, cwd="/", preexec_fn=as_user(unpriv_user)
        )

    r = as_user_run("diff", str(upper))
    assert r.returncode == 0, r.stderr
    # A rootless copy-up belongs to the user: "owner" until ownership metadata says otherwise.
    assert r.stdout.decode().splitlines() == [
        "C /work (metadata: owner, times)",
        "D /work/a",
        "A /work/new",
        "C /work/sub (metadata: mode, owner, times) (opaque)",
        "D /work/sub/x",
        "A /work/sub/y",
    ]
    layer = unpriv_tmp / "layer.tar"
    r = as_user_run("export-layer", str(upper), "-o", str(layer))
    assert r.returncode == 0, r.stderr
    with tarfile.open(layer) as tf:
        names = tf.getnames()
    assert names == [
        "work",
        "work/.wh.a",
        "work/new",
        "work/sub",
        "work/sub/.wh..wh..opq",
        "work/sub/y",
    ]
    target = unpriv_tmp / "target"
    shutil.copytree(lower / "work", target / "work")
    chown_tree(target, unpriv_user.uid, unpriv_user.gid)
    r = as_user_run("apply", str(upper), str(target))
    assert r.returncode == 0, r.stderr
    got = snapshot(target / "work", exclude=("uid", "gid"))
    want = {k: (*v[:7], None, None) for k, v in merged.items()}
    assert diff_snapshots(want, got, ("merged", "applied")) == []


# --------------------------------------------------------------------------- convert


@pytest.mark.parametrize(
    "fmt", [("oci", "xattr-whiteout"), ("fuse-overlayfs", "user-xattr-whiteout")]
)
def test_convert_keeps_the_view_and_kernel_overlayfs_reads_the_result(tmp: Path, unionfs, fmt):
    lowers = lower_layers(tmp / "layers", fmt)
    m = unionfs(lowers, None, opts=["ro"])
    before = snapshot(m.mnt, xattr_prefixes=XATTRS)
    m.close()
    for layer in lowers:
        r = run_unionfs("convert", "--to", "kernel", str(layer))
        assert r.returncode == 0, r.stderr
    with _kmnt(tmp, lowers) as view:
        kernel = snapshot(view, xattr_prefixes=XATTRS)
    assert diff_snapshots(before, kernel, ("before", "kernel")) == []
    from unionfs.changes.convert import convert

    for to in ("oci", "fuse-overlayfs", "kernel"):
        done = [convert(str(layer), to) for layer in lowers]
        assert done[0]  # the top layer has a whiteout and an opaque dir
        assert convert(str(lowers[0]), to, dry_run=True) == []  # nothing left to convert
        m = unionfs(lowers, None, opts=["ro"])
        assert diff_snapshots(before, snapshot(m.mnt, xattr_prefixes=XATTRS), ("before", to)) == []
        m.close()
    names = {p.name for p in lowers[0].rglob("*")}
    assert not any(n.startswith(".wh.") for n in names)


# --------------------------------------------------------------------------- squash


def test_squash_over_a_base_shows_the_same_view(tmp: Path, unionfs):
    from support import write_layer

    l0, l1 = lower_layers(tmp / "layers")
    base = write_layer(
        tmp / "B",
        {
            "etc": {"gone": "in the base too\n", "base-only": "b\n"},
            "opt": {"hidden": "base\n"},
            "data": {"from-base": "x\n"},
            "hl": {"base": "b\n"},
        },
    )
    out = tmp / "squashed"
    r = run_unionfs("squash", f"{l0}:{l1}", "-o", str(out))
    assert r.returncode == 0, r.stderr
    with _kmnt(tmp, [l0, l1, base]) as view:
        want = snapshot(view, xattr_prefixes=XATTRS)
    (tmp / "kview").rmdir()
    with _kmnt(tmp, [out, base]) as view:
        got = snapshot(view, xattr_prefixes=XATTRS)
    assert diff_snapshots(want, got, ("three layers", "squashed")) == []
    # Only markers that can matter below: etc/gone's whiteout, opt opaque (from L0).
    assert stat.S_ISCHR(os.lstat(out / "etc" / "gone").st_mode)
    assert os.getxattr(out / "opt", "trusted.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(out / "etc")
    oci = tmp / "squashed-oci"
    assert run_unionfs("squash", f"{l0}:{l1}", "-o", str(oci), "--format", "oci").returncode == 0
    m = unionfs([oci, base], None, opts=["ro"])
    assert diff_snapshots(want, snapshot(m.mnt, xattr_prefixes=XATTRS), ("three", "oci")) == []
    r = run_unionfs("squash", f"{l0}:{l1}", "-o", str(out))
    assert r.returncode == 1 and b"exists" in r.stderr


def test_lower_names_not_linked_up_are_warned_about(tmp: Path, unionfs):
    lowers = make_layers(tmp / "layers", [{"hl": {"one": "x\n", "two": Hardlink("hl/one")}}])
    upper = tmp / "upper"
    upper.mkdir()
    m = unionfs(lowers, upper)
    with open(m.mnt / "hl" / "one", "a") as f:  # hl/two is never looked up
        f.write("y\n")
    m.close()
    r = run_unionfs("diff", str(upper))
    assert r.returncode == 0
    assert r.stdout.decode().splitlines() == ["C /hl (metadata: times)", "C /hl/one"]
    assert b"/hl/one: a hard-linked lower file with 1 other name(s) not linked up" in r.stderr


# --------------------------------------------------------------------------- pure parts


def test_mount_argv_and_overlay_options_parsing():
    from unionfs.changes.source import _overlay_options, _split_mount_argv

    assert _split_mount_argv(
        [
            "/usr/bin/python3",
            "/v/bin/unionfs-mount",
            "-f",
            "-o",
            "ro,x",
            "/a/unionfs-1:/b",
            "/u",
            "/m",
        ]
    ) == (["/a/unionfs-1:/b", "/u", "/m"], ["ro,x"])
    assert _split_mount_argv(["unionfs", "mount", "/l", "/m"]) == (["/l", "/m"], [])
    # The Python API's daemons run as ``python -m unionfs.launcher``.
    api = ["/v/bin/python3", "-m", "unionfs.launcher", "-f", "--ready-fd", "5", "/l", "/u", "/m"]
    assert _split_mount_argv(api)[0][-3:] == ["/l", "/u", "/m"]
    assert _split_mount_argv(["unionfs", "diff", "/u"]) == ([], [])
    opts = _overlay_options(r"rw,lowerdir=/a\,b:/c,upperdir=/u,workdir=/w,userxattr")
    assert opts["lowerdir"] == r"/a\,b:/c" and opts["upperdir"] == "/u" and "userxattr" in opts


def test_tar_stream_writes_what_tarfile_writes(tmp: Path):
    """The fast header path is byte for byte Python's tarfile (PAX format)."""
    from unionfs.oci.changeset import TarStream

    data = tmp / "data"
    data.write_bytes(b"z" * 1000)

    def infos():
        for name, kind, extra in [
            ("a", tarfile.REGTYPE, {"size": 1000, "mode": 0o4755, "uid": 4321}),
            ("d", tarfile.DIRTYPE, {"mode": 0o1777}),
            ("d/l", tarfile.SYMTYPE, {"linkname": "../a"}),
            ("d/h", tarfile.LNKTYPE, {"linkname": "a"}),
            ("d/c", tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3}),
            ("d/p", tarfile.FIFOTYPE, {}),
            ("x" * 150, tarfile.REGTYPE, {"size": 1000}),
            ("caf\u00e9-\udcff", tarfile.REGTYPE, {"size": 1000, "uid": 1 << 30}),
            ("xa", tarfile.REGTYPE, {"size": 1000, "pax_headers": {"SCHILY.xattr.user.k": "v"}}),
        ]:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.uname, ti.gname = kind, 1234, "", ""
            for k, v in extra.items():
                setattr(ti, k, v)
            yield ti

    ref = io.BytesIO()
    with tarfile.open(
        fileobj=ref,
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tf:
        for ti in infos():
            with open(data, "rb") as f:
                tf.addfile(ti, f if ti.size else None)
    ours = io.BytesIO()
    stream = TarStream(ours)
    for ti in infos():
        fd = os.open(data, os.O_RDONLY)
        try:
            stream.add(ti, fd if ti.size else None)
        finally:
            os.close(fd)
    stream.close()
    assert ours.getvalue() == ref.getvalue()


def test_rootless_ownership_metadata_gives_the_exported_owner(tmp: Path):
    lower, upper = tmp / "lower", tmp / "upper"
    lower.mkdir()
    upper.mkdir()
    (upper / "f").write_text("f\n")
    os.setxattr(upper / "f", "user.containers.override_stat", b"1234:5678:0644:file")
    os.setxattr(upper / "f", "user.k", b"v")
    layer = tmp / "l.tar"
    r = run_unionfs("export-layer", str(upper), "--lower", str(lower), "-o", str(layer))
    assert r.returncode == 0, r.stderr
    with tarfile.open(layer) as tf:
        ti = tf.getmember("f")
    assert (ti.uid, ti.gid) == (1234, 5678)
    assert ti.pax_headers == {"SCHILY.xattr.user.k": "v"}  # the metadata is not exported


def test_side_table_gives_the_owner_of_symlinks_and_fifos(tmp: Path):
    """Objects that cannot carry user xattrs have their owners in the layer's side
    table: the scan reads it, in the upper and in the lowers (a lower symlink whose
    table owner matches the upper's is no owner change)."""
    from unionfs import ownership
    from unionfs.changes.scan import scan

    lower, upper = tmp / "lower", tmp / "upper"
    lower.mkdir()
    upper.mkdir()
    os.symlink("t", upper / "l")
    os.mkfifo(upper / "p")
    os.symlink("t", upper / "same")
    os.symlink("t", lower / "same")
    os.utime(upper / "same", ns=(0, os.lstat(lower / "same").st_mtime_ns), follow_symlinks=False)
    ov = ownership.Override(1234, 5678, 0o644, None)
    table = ownership.encode_table([(b"l", ov), (b"p", ov), (b"same", ov)])
    (upper / ownership.SIDE_TABLE.decode()).write_bytes(table)
    (lower / ownership.SIDE_TABLE.decode()).write_bytes(ownership.encode_table([(b"same", ov)]))
    by_name = {c.path: c for c in scan(str(upper), [str(lower)])}
    assert by_name[(b"l",)].owner == (1234, 5678)
    assert by_name[(b"p",)].owner == (1234, 5678)
    assert "owner" not in by_name[(b"same",)].aspects
    assert (ownership.SIDE_TABLE,) not in by_name  # the table itself is no change
    layer = tmp / "l.tar"
    r = run_unionfs("export-layer", str(upper), "--lower", str(lower), "-o", str(layer))
    assert r.returncode == 0, r.stderr
    with tarfile.open(layer) as tf:
        owners = {ti.name: (ti.uid, ti.gid) for ti in tf.getmembers()}
    assert owners["l"] == owners["p"] == (1234, 5678)
