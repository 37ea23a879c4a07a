"""Helpers for mounted tests: snapshots of a merged view, and mounts that always end.

Plain functions and context managers, no pytest: a mount made here is undone
on every exit path (``fusermount3 -u``, then ``-uz``; ``umount``, then
``umount -l``), and a daemon started here is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

Snapshot = dict[str, tuple]


def _user_xattrs(path: bytes) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        if name.startswith("user."):
            with contextlib.suppress(OSError):
                out.append((name, os.getxattr(path, name, follow_symlinks=False)))
    return tuple(out)


def snapshot(root: os.PathLike | str) -> Snapshot:
    """The whole view under ``root``: relative path -> what a user can observe.

    (type and mode, size for non-directories, sha256 of file contents, symlink
    target, device number, user xattrs, link count for non-directories, uid,
    gid).  Times and inode numbers are left out: they differ between any two
    filesystems.  Walked with lstat, never following symlinks; names are bytes.
    """
    base = os.fsencode(root)
    out: Snapshot = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = os.path.join(base, rel) if rel else base
        for entry in os.scandir(full):
            name = os.path.join(rel, os.fsencode(entry.name)) if rel else os.fsencode(entry.name)
            path = os.path.join(base, name)
            st = os.lstat(path)
            digest = target = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
            is_dir = stat.S_ISDIR(st.st_mode)
            out[os.fsdecode(name)] = (
                stat.filemode(st.st_mode),
                None if is_dir else st.st_size,
                digest,
                target,
                st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                _user_xattrs(path),
                None if is_dir else st.st_nlink,
                st.st_uid,
                st.st_gid,
            )
            if is_dir:
                stack.append(name)
    return out


def diff_snapshots(a: Snapshot, b: Snapshot) -> list[str]:
    """Human-readable differences, for assertion messages (empty when equal)."""
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"{key}: {a.get(key, '<missing>')} != {b.get(key, '<missing>')}")
    return lines


def is_mounted(mnt: os.PathLike | str) -> bool:
    target = os.fsdecode(os.path.realpath(mnt))
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@contextlib.contextmanager
def kernel_overlay(
    lowers: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    mnt: Path,
    userxattr: bool = False,
    index: bool = True,
) -> Iterator[Path]:
    """Kernel overlayfs over the same layers, the oracle (needs root).

    ``index=on`` by default: unionfs keeps hard-linked lower files one file
    after copy-up, which is the kernel's behaviour with the index.
    """
    opts = ["lowerdir=" + ":".join(str(p) for p in lowers)]
    if upper is not None:
        opts += [f"upperdir={upper}", f"workdir={work}", "index=on" if index else "index=off"]
    if userxattr:
        opts.append("userxattr")
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), str(mnt)],
        check=True,
        capture_output=True,
    )
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def unionfs_command() -> list[str]:
    exe = shutil.which("unionfs-mount")
    return [exe] if exe else [sys.executable, "-m", "unionfs.cli"]


@dataclass
class User:
    name: str
    uid: int
    gid: int


def _as_user(user: User):
    def demote() -> None:
        os.setgroups([])
        os.setgid(user.gid)
        os.setuid(user.uid)

    return demote


@contextlib.contextmanager
def unionfs_mount(
    lowers: Sequence[Path],
    upper: Path | None,
    mnt: Path,
    opts: Sequence[str] = (),
    user: User | None = None,
    timeout: float = 20,
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run ``unionfs-mount -f`` (as ``user`` if given) until the block ends."""
    cmd = [*unionfs_command(), "-f"]
    if opts:
        cmd += ["-o", ",".join(opts)]
    cmd.append(":".join(str(p) for p in lowers))
    if upper is not None:
        cmd.append(str(upper))
    cmd.append(str(mnt))
    env = {**os.environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, env=env, preexec_fn=_as_user(user) if user else None
    )
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mnt):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise AssertionError(f"unionfs-mount exited with {proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise AssertionError("unionfs-mount did not mount in time")
            time.sleep(0.02)
        if user is None:
            os.stat(mnt)  # answers once INIT is done (root cannot enter a user's mount)
        yield proc, mnt
    finally:
        _stop(proc, mnt, user)


def _stop(proc: subprocess.Popen[bytes], mnt: Path, user: User | None) -> None:
    if is_mounted(mnt):
        r = subprocess.run(
            ["fusermount3", "-u", str(mnt)],
            capture_output=True,
            preexec_fn=_as_user(user) if user else None,
        )
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    if proc.stderr is not None:
        proc.stderr.close()
