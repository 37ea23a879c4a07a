"""The timed workloads.

Each workload has an untimed ``prepare`` (path lists, buffers) that returns a
``Job``: ``run`` is the timed part and may return a note (an EXDEV fallback, say);
``warmup`` (mutating workloads only) reads what ``run`` will touch, so that the
"warm" phase measures the file system rather than the disk.  Read-only workloads
are warm simply by running twice on the same mount.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.layers import GIT_ENV, Manifest

MIB = 1 << 20
ENV = {**os.environ, **GIT_ENV, "LC_ALL": "C"}

Note = str | None


@dataclass(frozen=True)
class Counts:
    """How much each workload does (the defaults of the brief, times --scale)."""

    create: int
    delete: int
    copy_up: int
    build: int
    big_mib: int
    procs: int = 300  # short-lived processes of short-procs
    paced: int = 2000  # stats of paced-stat

    @classmethod
    def scaled(cls, scale: float, big_mib: int) -> Counts:
        n = max(20, round(5000 * scale))
        return cls(
            create=n,
            delete=n,
            copy_up=n,
            build=max(20, round(2000 * scale)),
            big_mib=big_mib,
            procs=max(30, round(300 * scale) // 3 * 3),
            paced=max(100, round(2000 * scale)),
        )


@dataclass(frozen=True)
class Ctx:
    root: Path  # the mount point (or native's directory)
    manifest: Manifest
    counts: Counts
    timeout: float  # for the tools we spawn


@dataclass(frozen=True)
class Job:
    run: Callable[[], Note]  # timed
    warmup: Callable[[], None] | None = None  # untimed, before run in the warm phase
    check: Callable[[], Note] | None = None  # untimed, after run: did it do the whole job?


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    prepare: Callable[[Ctx], Job]
    mutates: bool = False  # needs a fresh mount and upper for every measurement
    warm: bool = True  # has a warm phase
    copy_big: bool = False  # native needs a private copy of the big files
    #: The timed part is the mount itself: from the exec of the mount command to the first
    #: request through the mount answered (``prepare`` is not used; run.py times it).
    startup: bool = False


# -- helpers -------------------------------------------------------------------------------


def pick(paths: Sequence[str], n: int) -> list[str]:
    """``n`` paths evenly spread over the (sorted) list: many directories, all layers."""
    n = min(n, len(paths))
    return [paths[i * len(paths) // n] for i in range(n)]


def absolute(ctx: Ctx, rels: Sequence[str]) -> list[str]:
    return [os.path.join(ctx.root, r) for r in rels]


def tool(ctx: Ctx, argv: list[str], stdout: int | None = subprocess.DEVNULL) -> str:
    """Run a tool; a non-zero exit is an error of the workload (with the tool's stderr)."""
    r = subprocess.run(
        argv, stdout=stdout, stderr=subprocess.PIPE, env=ENV, timeout=ctx.timeout, check=False
    )
    if r.returncode:
        err = r.stderr.decode(errors="replace").strip()[-500:]
        raise RuntimeError(f"{argv[0]} exited with {r.returncode}: {err}")
    return r.stdout.decode(errors="replace") if r.stdout else ""


def read_file(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.readall()


def read_all(paths: Sequence[str]) -> None:
    for p in paths:
        read_file(p)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def stat_all(paths: Sequence[str]) -> None:
    for p in paths:
        os.stat(p)


def no_note(fn: Callable[[], None]) -> Callable[[], Note]:
    def run() -> Note:
        fn()
        return None

    return run


# -- read-only workloads --------------------------------------------------------------------


def stat_walk(ctx: Ctx) -> Job:
    """os.stat of every path from the manifest, no readdir: pure lookup + getattr."""
    m = ctx.manifest
    paths = absolute(ctx, m.core(sorted([*m.dirs, *m.files, *m.symlinks])))
    return Job(no_note(lambda: stat_all(paths)))


def ls_lr(ctx: Ctx) -> Job:
    """readdir + stat + xattr probes, the way a user browses (of the tree without the big
    repository, so that the cell stays comparable with the runs before it)."""
    m = ctx.manifest
    tops = absolute(
        ctx, m.core(sorted(p for p in [*m.dirs, *m.files, *m.symlinks] if "/" not in p))
    )
    return Job(no_note(lambda: tool(ctx, ["ls", "-lR", "--color=never", *tops])))


def read_small(ctx: Ctx) -> Job:
    """open, read to EOF, close every small file: open/release round trips dominate."""
    paths = absolute(ctx, ctx.manifest.small_files)
    return Job(no_note(lambda: read_all(paths)))


def big_read(ctx: Ctx) -> Job:
    """Sequential read of the big file in 1 MiB reads: streaming throughput."""
    path = os.path.join(ctx.root, ctx.manifest.big)

    def run() -> None:
        buf = bytearray(MIB)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    return Job(no_note(run))


def tar_tree(ctx: Ctx) -> Job:
    """tar of the tree except the big file, through a pipe: GNU tar does not read file data
    when its output is /dev/null itself."""
    script = (
        'set -o pipefail; tar -C "$1" --exclude=./big --exclude=./bigrepo -cf - . | cat > /dev/null'
    )
    argv = ["bash", "-c", script, "tar", str(ctx.root)]
    return Job(no_note(lambda: tool(ctx, argv)))


def git_status(ctx: Ctx) -> Job:
    """git status in the repository of the bottom layer; --no-optional-locks keeps it
    read-only (no index refresh written back)."""
    repo = os.path.join(ctx.root, ctx.manifest.repo)
    argv = [
        "git",
        "--no-optional-locks",
        "-c",
        "safe.directory=*",
        "-C",
        repo,
        "status",
        "--porcelain",
    ]
    return Job(no_note(lambda: tool(ctx, argv, stdout=subprocess.PIPE)))


def walk(ctx: Ctx) -> Job:
    """A Python client's walk: ``os.walk`` (readdir) of the whole mount, ``os.lstat`` of every
    entry it lists.  Unlike stat-walk, each directory is listed before its entries are
    looked up, and the client spends its own 20-30 us between two requests."""
    root = str(ctx.root)

    def run() -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                os.lstat(os.path.join(dirpath, name))

    return Job(no_note(run))


def quarters(paths: Sequence[str], n: int = 4) -> list[list[str]]:
    """``paths`` (sorted) cut in ``n`` contiguous runs: disjoint subtrees, one per reader."""
    return [list(paths[i * len(paths) // n : (i + 1) * len(paths) // n]) for i in range(n)]


def in_processes(jobs: Sequence[Callable[[], None]]) -> None:
    """Run each job in a forked child at once and wait for all: several clients of the mount
    at the same time, as a build or a desktop makes them (not threads of one process)."""
    pids = []
    for job in jobs:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                job()
                status = 0
            finally:
                os._exit(status)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(pids)} reader processes failed")


def read_parallel(ctx: Ctx) -> Job:
    """4 processes at once, each reading its own quarter of the small files (open, read to
    EOF, close): does the file system serve concurrent clients concurrently?"""
    parts = [absolute(ctx, q) for q in quarters(ctx.manifest.small_files)]
    jobs = [lambda part=part: read_all(part) for part in parts]
    return Job(no_note(lambda: in_processes(jobs)))


def git_status_threaded(ctx: Ctx) -> Job:
    """git status of the 5,000-file repository with git's defaults: ``core.preloadIndex``
    lstat's the index entries from up to 20 threads at once (one per 500 entries)."""
    repo = os.path.join(ctx.root, ctx.manifest.bigrepo)
    argv = ["git", "--no-optional-locks", "-c", "safe.directory=*", "-C", repo, "status"]
    return Job(no_note(lambda: tool(ctx, [*argv, "--porcelain"], stdout=subprocess.PIPE)))


#: One short-lived process per line, as a shell script or a make recipe spawns them.
_SHORT_PROCS = """
for f in "$@"; do
  cat "$f" > /dev/null
  stat -c %s "$f" > /dev/null
  sh -c 'test -r "$1"' sh "$f"
done
"""


def short_procs(ctx: Ctx) -> Job:
    """Short-lived processes (cat, stat, sh -c), three per file: each request comes from a
    process that has just started, after a pause far longer than any busy wait."""
    files = absolute(ctx, pick(ctx.manifest.src_files, ctx.counts.procs // 3))
    argv = ["sh", "-c", _SHORT_PROCS, "sh", *files]
    return Job(no_note(lambda: tool(ctx, argv)))


#: The pause of paced-stat between two requests (a client that computes between calls).
PACE_S = 200e-6


def paced_stat(ctx: Ctx) -> Job:
    """os.stat of files with 200 us of computation between two calls: longer than the
    daemon's busy wait (30 us), so every request finds it asleep."""
    paths = absolute(ctx, pick(ctx.manifest.src_files, ctx.counts.paced))

    def run() -> None:
        for p in paths:
            end = time.perf_counter() + PACE_S
            while time.perf_counter() < end:
                pass
            os.stat(p)

    return Job(no_note(run))


# -- mutating workloads ---------------------------------------------------------------------


def big_write(ctx: Ctx) -> Job:
    """Write a new big file in 1 MiB writes, then fsync (included in the time)."""
    path = os.path.join(ctx.root, "written.bin")
    chunk = random.Random(7).randbytes(MIB)

    def run() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(ctx.counts.big_mib):
                write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)

    return Job(no_note(run))


def create(ctx: Ctx) -> Job:
    """Create small files (100 bytes each), 100 per new directory."""
    base = os.path.join(ctx.root, "created")
    n = ctx.counts.create
    dirs = [os.path.join(base, f"d{i:03d}") for i in range((n + 99) // 100)]
    files = [os.path.join(dirs[i // 100], f"f{i:05d}") for i in range(n)]
    data = b"x" * 100

    def run() -> None:
        os.mkdir(base)
        for d in dirs:
            os.mkdir(d)
        for p in files:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)

    return Job(no_note(run))


def create_4k(ctx: Ctx) -> Job:
    """Create files of 4 KiB (a page each), all in one new directory."""
    base = os.path.join(ctx.root, "created4k")
    files = [os.path.join(base, f"f{i:05d}") for i in range(ctx.counts.create)]
    data = b"x" * 4096

    def run() -> None:
        os.mkdir(base)
        for p in files:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            write_all(fd, data)
            os.close(fd)

    return Job(no_note(run))


def delete(ctx: Ctx) -> Job:
    """Unlink lower files spread over the tree: each needs a whiteout in a union."""
    paths = absolute(ctx, pick(ctx.manifest.src_files, ctx.counts.delete))

    def run() -> None:
        for p in paths:
            os.unlink(p)

    return Job(no_note(run), warmup=lambda: stat_all(paths))


def copy_up_small(ctx: Ctx) -> Job:
    """Append one byte to lower files: each open for writing copies the file up."""
    paths = absolute(ctx, pick(ctx.manifest.src_files, ctx.counts.copy_up))

    def run() -> None:
        for p in paths:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"\n")
            os.close(fd)

    return Job(no_note(run), warmup=lambda: read_all(paths))


def copy_up_big(ctx: Ctx) -> Job:
    """Append one byte to the big lower file and fsync: a full data copy-up."""
    path = os.path.join(ctx.root, ctx.manifest.big)

    def run() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    return Job(no_note(run), warmup=lambda: read_all([path]))


def append_mid(ctx: Ctx) -> Job:
    """Append one byte to the 128 MiB lower file, no fsync by the client: the copy-up's own
    cost (a durable copy-up syncs it anyway, as kernel overlayfs does)."""
    path = os.path.join(ctx.root, ctx.manifest.mid)

    def run() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"\n")
        finally:
            os.close(fd)

    return Job(no_note(run), warmup=lambda: read_all([path]))


def rename_dir(ctx: Ctx) -> Job:
    """Rename a directory that spans the lower layers.  Where rename(2) answers EXDEV (kernel
    overlayfs without redirect_dir, fuse-overlayfs), mv copies and deletes, as users see."""
    src = os.path.join(ctx.root, ctx.manifest.rename_dir)
    dst = src + ".moved"
    inside = [f for f in ctx.manifest.files if f.startswith(ctx.manifest.rename_dir + "/")]

    def run() -> Note:
        try:
            os.rename(src, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            tool(ctx, ["mv", src, dst])
            return "EXDEV, mv copied"
        return None

    def check() -> Note:
        """Untimed: a rename that loses files would look fast."""
        if os.path.lexists(src) or not os.path.isdir(dst):
            raise RuntimeError(f"after the rename {src} still exists or {dst} is missing")
        moved = [os.path.join(dst, os.path.relpath(f, ctx.manifest.rename_dir)) for f in inside]
        missing = sum(not os.path.isfile(p) for p in moved)
        return f"{missing} of {len(moved)} files missing after the rename" if missing else None

    return Job(run, warmup=lambda: read_all(absolute(ctx, inside)), check=check)


def build(ctx: Ctx) -> Job:
    """A compiler-like mix: per source probe two missing and two present headers, read it,
    write an object via a temporary + rename; then link (read the objects, write and fsync
    one output), delete a tenth of the objects and rename the output."""
    sources = pick(ctx.manifest.src_files, ctx.counts.build)
    headers = absolute(ctx, pick(ctx.manifest.src_files[3:], 40))
    out = os.path.join(ctx.root, "build")
    plan = []
    for i, rel in enumerate(sources):
        src = os.path.join(ctx.root, rel)
        probes = (
            os.path.join(os.path.dirname(src), "config.h"),
            os.path.join(ctx.root, "src", "include", os.path.basename(headers[i % 40])),
        )
        found = (headers[i % 40], headers[(i * 7) % 40])
        obj = os.path.join(out, os.path.dirname(rel), os.path.basename(rel) + ".o")
        plan.append((src, probes, found, obj))

    def compile_one(src: str, probes: tuple[str, ...], found: tuple[str, ...], obj: str) -> None:
        for p in probes:
            if os.path.exists(p):
                raise RuntimeError(f"{p} should not exist")
        stat_all(found)
        data = read_file(src)
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        with open(obj + ".tmp", "wb") as f:
            f.write(data[: len(data) // 2] + b"\0" * 64)
        os.rename(obj + ".tmp", obj)

    def run() -> None:
        for step in plan:
            compile_one(*step)
        objects = [obj for *_, obj in plan]
        with open(os.path.join(out, "app.bin"), "wb") as f:
            for obj in objects:
                f.write(read_file(obj))
            f.flush()
            os.fsync(f.fileno())
        for obj in objects[::10]:
            os.unlink(obj)
        os.rename(os.path.join(out, "app.bin"), os.path.join(out, "app"))

    def warmup() -> None:
        for src, _, found, _ in plan:
            read_file(src)
            stat_all(found)

    return Job(no_note(run), warmup=warmup)


def _unused(ctx: Ctx) -> Job:
    raise AssertionError("a start-up workload is timed by run.py, not prepared")


WORKLOADS = [
    Workload("stat-walk", "os.stat of every path (no readdir)", stat_walk),
    Workload("ls-lR", "ls -lR of the whole mount", ls_lr),
    Workload("read-small", "open + read + close of every small file", read_small),
    Workload("big-read", "sequential read of the big file, 1 MiB reads", big_read),
    Workload("tar", "tar cf - of the tree (minus the big file) | cat > /dev/null", tar_tree),
    Workload("git-status", "git status in the repository in the bottom layer", git_status),
    Workload("walk", "os.walk of the mount + os.lstat of every entry (Python)", walk),
    Workload(
        "read-4procs", "4 processes at once, each reading a quarter of the files", read_parallel
    ),
    Workload(
        "git-status-5k", "git status of a 5k-file repo (threaded preload)", git_status_threaded
    ),
    Workload("short-procs", "300 short-lived processes: cat, stat, sh -c on files", short_procs),
    Workload("paced-stat", "os.stat of 2k files, 200 us of computing between calls", paced_stat),
    Workload(
        "mount",
        "from exec of the mount command to the first answered request",
        _unused,
        startup=True,
    ),
    Workload("big-write-fsync", "write a new big file + fsync", big_write, True, False),
    Workload("create", "create 5k files of 100 bytes", create, True, False),
    Workload("create-4k", "create 5k files of 4 KiB in one new directory", create_4k, True, False),
    Workload("delete", "unlink 5k lower files (whiteouts)", delete, True),
    Workload("copy-up-small", "append a byte to 5k lower files", copy_up_small, True),
    Workload(
        "copy-up-big",
        "append a byte to the big lower file + fsync",
        copy_up_big,
        True,
        copy_big=True,
    ),
    Workload(
        "append-mid",
        "append a byte to a 128 MiB lower file (copy-up, no client fsync)",
        append_mid,
        True,
        copy_big=True,
    ),
    Workload(
        "rename-lower-dir", "rename a directory spanning the lowers (mv on EXDEV)", rename_dir, True
    ),
    Workload(
        "build",
        "compile-like: probe headers, read sources, write/rename objects, link",
        build,
        True,
    ),
]
