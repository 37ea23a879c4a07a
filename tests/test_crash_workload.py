"""SIGKILL of the daemon in the middle of a write-heavy workload: the view is a prefix.

A child process applies a seeded random sequence of operations through the
mount (writes with fsync, appends that copy up lower files of a few MiB,
truncates, unlinks that leave whiteouts, mkdir over whiteouts, renames of
files and of lower directories, links, symlinks, chmod) and journals each
completed call with its outcome.  The daemon is killed at a random moment.
After ``unionfs-check --repair`` and a remount, the merged view must be the
state a plain directory reaches after the journaled calls, or after one more
(the call in flight when the daemon died, which may have completed): every
completed call is there, nothing half-done is visible, no marker is half-made.
The same calls replayed on the plain directory also check each journaled
outcome.
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import diff_snapshots, snapshot, unionfs_mount

FILES = [f"f{i}" for i in range(6)] + [f"d{i}/f{j}" for i in range(3) for j in range(3)]
DIRS = ["d0", "d1", "d2", "d0/sub", "n0", "n1"]
BIG = 3 << 20  # lower files this big make copy-up take a while


def build_lower(root: Path) -> None:
    rng = random.Random(7)
    for d in ("d0", "d1", "d2", "d0/sub"):
        (root / d).mkdir(parents=True)
    for i, rel in enumerate(FILES):
        size = BIG if i % 4 == 0 else rng.randrange(1, 5000)
        (root / rel).write_bytes(rng.randbytes(size))
    (root / "d0/sub/deep").write_text("deep\n")
    os.symlink("f1", root / "ln")


def make_ops(seed: int, n: int) -> list[tuple]:
    rng = random.Random(seed)
    names = [*FILES, "new0", "new1", "d1/new", "n0/x"]
    ops: list[tuple] = []
    for _ in range(n):
        kind = rng.choice(
            ["write", "write", "append", "append", "truncate", "unlink", "mkdir", "rmdir",
             "rename", "rename_dir", "link", "symlink", "chmod"]
        )  # fmt: skip
        if kind == "write":
            ops.append((kind, rng.choice(names), rng.randrange(0, 6000), rng.randbytes(64)))
        elif kind == "append":
            ops.append((kind, rng.choice(names), rng.randbytes(rng.randrange(1, 3000))))
        elif kind == "truncate":
            ops.append((kind, rng.choice(names), rng.randrange(0, 8000)))
        elif kind in ("unlink", "chmod"):
            ops.append((kind, rng.choice([*names, "ln"]), 0o640))
        elif kind in ("mkdir", "rmdir"):
            ops.append((kind, rng.choice(DIRS)))
        elif kind == "rename":
            ops.append((kind, rng.choice(names), rng.choice(names)))
        elif kind == "rename_dir":
            ops.append(("rename", rng.choice(DIRS), rng.choice([*DIRS, "n2", "d1/moved"])))
        elif kind == "link":
            ops.append((kind, rng.choice(names), rng.choice(names)))
        else:
            # Targets stay inside the tree: the replay runs in another directory.
            ops.append((kind, rng.choice(["f1", "x", "d0"]), rng.choice(names)))
    return ops


def apply(root: str, op: tuple) -> str:
    """Run one call under ``root``; its outcome as "ok" or the errno's name."""
    kind, *args = op

    def p(rel: str) -> str:
        return os.path.join(root, rel)

    try:
        if kind in ("write", "append"):
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if kind == "append" else 0)
            fd = os.open(p(args[0]), flags, 0o644)
            try:
                if kind == "write":
                    os.pwrite(fd, args[2], args[1])
                else:
                    os.write(fd, args[1])
                os.fsync(fd)
            finally:
                os.close(fd)
        elif kind == "touch":  # the first call of a write or an append
            os.close(os.open(p(args[0]), os.O_WRONLY | os.O_CREAT, 0o644))
        elif kind == "truncate":
            os.truncate(p(args[0]), args[1])
        elif kind == "unlink":
            os.unlink(p(args[0]))
        elif kind == "chmod":
            os.chmod(p(args[0]), args[1], follow_symlinks=True)
        elif kind == "mkdir":
            os.mkdir(p(args[0]))
        elif kind == "rmdir":
            os.rmdir(p(args[0]))
        elif kind == "rename":
            os.rename(p(args[0]), p(args[1]))
        elif kind == "link":
            os.link(p(args[0]), p(args[1]), follow_symlinks=False)
        elif kind == "symlink":
            os.symlink(args[0], p(args[1]))
        else:
            raise ValueError(kind)
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def workload(root: str, ops: list[tuple], journal: str, stop: str) -> None:
    """The child: apply ``ops`` in order, one journal line per call completed before ``stop``.

    The parent makes ``stop`` just before it kills the daemon, so the call in
    flight then is the only one whose outcome is not journaled (a dead
    connection's answers, such as ENOENT from a cached negative entry, are not
    the file system's).
    """
    with open(journal, "w") as j:
        for op in ops:
            res = apply(root, op)
            if os.path.exists(stop):
                return
            j.write(res + "\n")
            j.flush()


def journaled(journal: Path) -> list[str]:
    return [line for line in journal.read_text().split("\n") if line]


def replay(lower: Path, dest: Path, ops: list[tuple], expect: list[str] | None = None) -> dict:
    """The state a plain directory reaches after ``ops``; checks the outcomes against ``expect``."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(lower, dest, symlinks=True)
    for i, op in enumerate(ops):
        res = apply(str(dest), op)
        if expect is not None and i < len(expect):
            assert res == expect[i], f"call {i} {op[:2]}: {expect[i]} through the mount, {res} here"
    return snapshot(dest)


def _partial_write_diff(lower: Path, plain: Path, done: list[tuple], nxt: tuple, got: dict):
    """How ``got`` differs from the write ``nxt`` applied in part after ``done``.

    A write is not atomic: the daemon killed inside its pwrite of the upper
    file (a fatal signal stops a buffered write between pages) leaves the first
    k bytes written, for some k.  Everything but the written file must be as
    after the whole call; that file must hold its old content with a prefix of
    the data written.
    """
    replay(lower, plain, done)
    real = os.path.relpath(os.path.realpath(plain / nxt[1]), plain)
    try:
        base = (plain / real).read_bytes()
    except OSError:
        base = b""
    data = nxt[3] if nxt[0] == "write" else nxt[2]
    offset = nxt[2] if nxt[0] == "write" else len(base)
    sizes_shas = set()
    for k in range(1, len(data) + 1):
        c = bytearray(base)
        c[len(c) :] = bytes(max(0, offset - len(c)))
        c[offset : offset + k] = data[:k]
        sizes_shas.add((len(c), hashlib.sha256(c).hexdigest()))
    want = replay(lower, plain, [*done, nxt])
    if real not in got or real not in want:
        return [f"{real}: missing"]
    rest = {k: v for k, v in want.items() if k != real}
    out = diff_snapshots(rest, {k: v for k, v in got.items() if k != real}, ("whole", "unionfs"))
    w, g = want[real], got[real]
    if (w[0], *w[3:]) != (g[0], *g[3:]):
        out.append(f"{real}: {g} is not {w} but for its data")
    if (g[1], g[2]) not in sizes_shas:
        out.append(f"{real}: size {g[1]} holds no prefix of the write")
    return out


@pytest.mark.parametrize("seed", range(6))
def test_kill_during_workload_leaves_a_prefix(tmp, seed):
    lower, upper, mnt, plain = tmp / "lower", tmp / "upper", tmp / "mnt", tmp / "plain"
    lower.mkdir(), upper.mkdir(), mnt.mkdir()
    build_lower(lower)
    ops = make_ops(seed, 1500)
    journal = tmp / "journal"
    rng = random.Random(seed)
    kill_at = rng.randrange(20, len(ops) - 100)  # journal lines; the child runs on a little
    ctx = multiprocessing.get_context("fork")
    with unionfs_mount([lower], upper, mnt, check_exit=False) as (daemon, _):
        stop = tmp / "stop"
        child = ctx.Process(target=workload, args=(str(mnt), ops, str(journal), str(stop)))
        child.start()
        deadline = time.monotonic() + 60
        while (
            child.is_alive()
            and time.monotonic() < deadline
            and (not journal.exists() or len(journaled(journal)) < kill_at)
        ):
            time.sleep(0.001)
        stop.touch()
        daemon.send_signal(signal.SIGKILL)
        child.join(60)
        assert child.exitcode == 0, "the workload must see the dead mount as errors, not hang"
    done = journaled(journal)
    assert len(done) < len(ops), "killed before the end (else the test proves nothing)"

    check = [sys.executable, "-m", "unionfs.check"]
    first = subprocess.run([*check, "--repair", str(upper)], capture_output=True, text=True)
    assert first.returncode in (0, 1), first.stdout + first.stderr
    again = subprocess.run([*check, str(upper)], capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr

    with unionfs_mount([lower], upper, mnt):
        got = snapshot(mnt)
    want = replay(lower, plain, ops[: len(done)], done)
    diff = diff_snapshots(want, got, ("replayed", "unionfs"))
    if diff:  # the call in flight may have completed, or (a write) only its open(O_CREAT)
        nxt = ops[len(done)]
        states = [ops[: len(done) + 1]]
        if nxt[0] in ("write", "append"):
            states.append([*ops[: len(done)], ("touch", nxt[1])])
        diffs = [diff, *(diff_snapshots(replay(lower, plain, s), got) for s in states)]
        if all(diffs) and nxt[0] in ("write", "append"):
            diffs.append(_partial_write_diff(lower, plain, ops[: len(done)], nxt, got))
        assert not all(diffs), (
            f"after {len(done)} calls (next {nxt[:2]}), the view is none of the states:\n"
            + "\n--\n".join("\n".join(d) for d in diffs)
            + f"\nunionfs-check: {first.stdout}"
        )
    work = tmp / ".upper.unionfs-work" / "work"
    assert not work.exists() or os.listdir(work) == []
