"""Review and commit of a sandbox, as the unprivileged user, with real programs.

The same workload (git commit, a Python program writing and renaming, sqlite
in WAL mode, rm -rf, chmod of a directory) runs in a sandbox over one home and
directly in a copy of it; the review must list what it did, and after commit
the two homes must hold the same tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from sandbox_support import Home, make_home

import support

WORKLOAD = r"""
set -e
cd repo
echo second line >> README
git add -A
git commit -qm second
cd ..
python3 -c '
import os
with open("out.tmp", "w") as f:
    f.write("written then renamed\n")
os.rename("out.tmp", "out.txt")
os.makedirs("gen/a")
with open("gen/a/f", "w") as f:
    f.write("f\n")
'
sqlite3 db.sqlite 'PRAGMA journal_mode=WAL; CREATE TABLE t(x);' > /dev/null
sqlite3 db.sqlite 'INSERT INTO t VALUES (1), (2);'
rm -rf doomed
chmod 700 locked
"""

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
    "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z",
}

if not shutil.which("git") or not shutil.which("sqlite3"):
    pytest.skip("needs git and sqlite3", allow_module_level=True)


def _fill(home: Path) -> None:
    """The starting tree (run as the user)."""
    env = {**os.environ, **GIT_ENV, "HOME": str(home)}
    (home / "repo").mkdir()
    (home / "repo" / "README").write_text("first line\n")
    subprocess.run(["git", "init", "-q", "repo"], cwd=home, env=env, check=True)
    subprocess.run(["git", "add", "-A"], cwd=home / "repo", env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "first"], cwd=home / "repo", env=env, check=True)
    (home / "doomed" / "sub").mkdir(parents=True)
    for i in range(5):
        (home / "doomed" / "sub" / f"f{i}").write_text(f"{i}\n")
    (home / "locked").mkdir()
    (home / "locked" / "inside").write_text("in\n")


def tree(root: Path, skip: tuple[str, ...] = (".local", "repo/.git/index")) -> dict[str, tuple]:
    """path -> (type, mode, content hash or link target), times and inodes aside."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(full)
            else:
                what = ""
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), what)
    return out


@pytest.fixture
def homes(unpriv_tmp: Path, unpriv_user: support.User) -> tuple[Home, Path]:
    h = make_home(unpriv_tmp, unpriv_user)
    support.run_as(unpriv_user, _fill, h.path)
    twin = unpriv_tmp / "twin"
    support.run_as(unpriv_user, shutil.copytree, str(h.path), str(twin), True)
    return h, twin


def test_review_then_commit_equals_running_directly(homes: tuple[Home, Path]) -> None:
    home, twin = homes
    before = tree(home.path)
    r = home.sandbox("sh", "-c", WORKLOAD, env=GIT_ENV)
    assert r.returncode == 0, r.stderr
    assert tree(home.path) == before  # nothing reached the real home

    r = home.unionfs("sandbox", "diff", "default", "--json")
    assert r.returncode == 0, r.stderr
    (root,) = json.loads(r.stdout)["roots"]
    got = {c["path"][len(str(home.path)) + 1 :]: c for c in root["changes"]}
    assert got["repo/README"]["kind"] == "C"
    assert got["out.txt"]["kind"] == "A" and "out.tmp" not in got
    assert [got[p]["kind"] for p in ("gen", "gen/a", "gen/a/f", "db.sqlite")] == ["A"] * 4
    assert got["doomed"]["kind"] == "D" and "doomed/sub/f0" not in got
    assert got["locked"]["metadata_only"] and got["locked"]["aspects"] == ["mode"]
    assert any(p.startswith("repo/.git/objects/") for p in got)
    assert {p: c["conflict"] for p, c in got.items() if c["conflict"]} == {}
    r = home.unionfs("sandbox", "diff", "default", "--content")
    assert "+second line" in r.stdout and f"C {home.path}/repo/README" in r.stdout

    r = home.unionfs("sandbox", "commit", "default", "--dry-run")
    assert r.returncode == 0 and r.stdout.startswith("would commit"), r.stderr
    assert tree(home.path) == before
    r = home.unionfs("sandbox", "commit", "default")
    assert r.returncode == 0, r.stderr
    # Committed: a second commit has nothing that conflicts (the identities of
    # what the first wrote replaced the recorded ones).
    r = home.unionfs("sandbox", "commit", "default")
    assert r.returncode == 0, r.stdout + r.stderr

    d = subprocess.run(
        ["sh", "-c", WORKLOAD],
        cwd=twin,
        env={**home.env, **GIT_ENV, "HOME": str(twin)},
        preexec_fn=support.as_user(home.user),
        capture_output=True,
        text=True,
    )
    assert d.returncode == 0, d.stderr
    assert tree(home.path) == tree(twin)
    log = ["git", "log", "--format=%H %s"]
    assert (
        home.direct(*log, cwd=home.path / "repo").stdout
        == home.direct(*log, cwd=twin / "repo").stdout
    )
    assert home.direct("git", "status", "--porcelain", cwd=home.path / "repo").stdout == ""
    q = home.direct("sqlite3", str(home.path / "db.sqlite"), "SELECT sum(x) FROM t")
    assert q.stdout == "3\n"


def _edit_outside(home: Path) -> None:
    (home / "a.txt").write_text("changed outside\n")


def test_file_changed_outside_during_the_run_is_a_conflict(homes: tuple[Home, Path]) -> None:
    home, _ = homes
    for name in ("a.txt", "b.txt"):
        (home.path / name).write_text("original\n")
        os.chown(home.path / name, home.user.uid, home.user.gid)
    prog = (
        "echo sandbox > a.txt; touch $HOME/ready; i=0;"
        " while [ ! -e go ] && [ $i -lt 1500 ]; do sleep 0.02; i=$((i+1)); done;"
        " echo sandbox > b.txt; echo new > c.txt"
    )
    p = home.popen("sandbox", "run", "--", "sh", "-c", prog)
    try:
        end = time.monotonic() + 30
        while not (home.upper() / "ready").exists() and time.monotonic() < end:
            time.sleep(0.02)
        support.run_as(home.user, _edit_outside, home.path)
        (home.path / "go").write_text("")
        assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    r = home.unionfs("sandbox", "diff", "default")
    assert f"C {home.path}/a.txt  CONFLICT: changed outside meanwhile" in r.stdout
    r = home.unionfs("sandbox", "commit", "default", "a.txt", "b.txt", "c.txt")
    assert r.returncode == 3, r.stderr
    assert f"conflict, left alone: {home.path}/a.txt" in r.stderr
    assert (home.path / "a.txt").read_text() == "changed outside\n"
    assert (home.path / "b.txt").read_text() == "sandbox\n"
    assert (home.path / "c.txt").read_text() == "new\n"
    r = home.unionfs("sandbox", "commit", "default", "--force", "a.txt")
    assert r.returncode == 0, r.stderr
    assert (home.path / "a.txt").read_text() == "sandbox\n"


def test_sigkill_during_commit_then_resume(homes: tuple[Home, Path]) -> None:
    home, _ = homes
    prog = "mkdir many; i=0; while [ $i -lt 1500 ]; do echo $i > many/f$i; i=$((i+1)); done"
    assert home.sandbox("sh", "-c", prog).returncode == 0
    p = home.popen("sandbox", "commit", "default")
    plan = home.state() / "journal.0" / "plan.json"
    end = time.monotonic() + 60
    while not plan.exists() and p.poll() is None and time.monotonic() < end:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if not plan.exists():
        pytest.fail("the commit ended before its journal was seen: make the workload bigger")
    partial = len(os.listdir(home.path / "many")) if (home.path / "many").exists() else 0
    assert partial < 1500  # it was interrupted midway
    r = home.unionfs("sandbox", "commit", "default")
    assert r.returncode == 0, r.stderr
    assert not plan.exists()
    assert sorted(os.listdir(home.path / "many")) == sorted(f"f{i}" for i in range(1500))
    assert all((home.path / "many" / f"f{i}").read_text() == f"{i}\n" for i in range(1500))


def test_selection_and_ignores(homes: tuple[Home, Path]) -> None:
    home, _ = homes
    prog = (
        "echo k > keep.txt; echo b > keep.txt.bak; mkdir -p .cache/x new/deep;"
        " echo c > .cache/x/blob; echo d > new/deep/f.py; echo e > other.py"
    )
    assert home.sandbox("sh", "-c", prog).returncode == 0
    r = home.unionfs("sandbox", "diff", "default")
    assert "3 ignored" in r.stderr and ".cache" not in r.stdout  # the dir, x, blob
    r = home.unionfs("sandbox", "commit", "default", "keep.txt", "new/**/*.py")
    assert r.returncode == 0, r.stderr
    assert (home.path / "keep.txt").exists() and not (home.path / "keep.txt.bak").exists()
    assert (home.path / "new/deep/f.py").read_text() == "d\n"
    assert not (home.path / "other.py").exists() and not (home.path / ".cache").exists()
    r = home.unionfs("sandbox", "commit", "default", "/etc/passwd")
    assert r.returncode == 2 and "not inside" in r.stderr
