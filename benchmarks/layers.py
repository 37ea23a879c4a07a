#!/usr/bin/env python3
"""Benchmark of the layer tools against what other tools do and the physical limit.

- diff: ``unionfs.changes.scan`` of a 100-entry upper over a 200,000-file lower,
  against a naive diff (walk the lower and the merged view and compare every
  entry's lstat and xattrs, as podman's NaiveDiff and docker diff do).  The
  merged view is a kernel overlayfs mount as root; otherwise the lower is
  walked twice (the same amount of work).
- export: ``export-layer`` of a 10,000-file upper against ``tar -cf`` of the
  upper (the physical limit: no lower lookups, no whiteout rules).
- apply: ``apply`` of that upper onto a directory against ``tar -x`` of the
  upper's tar and a per-file copy loop (``shutil.copy2`` per file, as try's
  commit or a naive script does), with an fsync per file and with no sync.

Run: ``.venv/bin/python benchmarks/layers.py [--files 200000] [--small 10000]``
(``--quick`` for a smoke run).  Prints seconds and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unionfs.changes.apply import apply
from unionfs.changes.export import export
from unionfs.changes.scan import scan


def make_lower(root: Path, files: int) -> None:
    """``files`` small files in directories of 100."""
    for i in range(files):
        d = root / f"d{i // 100:05d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i % 100:03d}").write_bytes(b"x" * 64)


def make_small_upper(upper: Path, lower: Path, changes: int, files: int) -> None:
    """A kernel-format upper changing ``changes`` entries spread over the lower."""
    step = max(1, files // changes)
    for n, i in enumerate(range(0, files, step)):
        if n >= changes:
            break
        rel = Path(f"d{i // 100:05d}") / f"f{i % 100:03d}"
        (upper / rel.parent).mkdir(exist_ok=True)
        if n % 3 == 0:
            os.mknod(upper / rel, stat.S_IFCHR, 0)  # a deletion
        else:
            (upper / rel).write_bytes(b"changed\n")


def naive_diff(before: Path, after: Path) -> int:
    """Walk both trees, lstat and list the xattrs of every entry, compare."""

    def walk(root: Path) -> dict[str, tuple]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                try:
                    xs = tuple(sorted(os.listxattr(p, follow_symlinks=False)))
                except OSError:
                    xs = ()
                out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, xs)
        return out

    a, b = walk(before), walk(after)
    return sum(1 for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t, result


def drop_caches() -> None:
    if os.geteuid() == 0:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")


def bench_diff(work: Path, files: int, changes: int) -> None:
    lower, upper = work / "lower", work / "upper"
    lower.mkdir()
    upper.mkdir()
    t, _ = timed(make_lower, lower, files)
    print(f"made a {files}-file lower in {t:.1f} s")
    make_small_upper(upper, lower, changes, files)
    t_scan, result = timed(scan, str(upper), [str(lower)])
    n = sum(1 for c in result if c.kind.value != " ")
    mnt = work / "merged"
    mnt.mkdir()
    mounted = False
    if os.geteuid() == 0:
        (work / "kwork").mkdir()
        opts = f"lowerdir={lower},upperdir={upper},workdir={work / 'kwork'}"
        mounted = (
            subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], capture_output=True
            ).returncode
            == 0
        )
    try:
        t_naive, m = timed(naive_diff, lower, mnt if mounted else lower)
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
    print(f"diff, {changes}-entry upper over {files} files (warm cache):")
    print(f"  unionfs scan  {t_scan:8.3f} s  ({n} changes)")
    print(f"  naive walk    {t_naive:8.3f} s  ({m} differences{'' if mounted else ', no mount'})")
    print(f"  ratio         {t_naive / t_scan:8.0f}x faster")


def bench_small(work: Path, small: int) -> None:
    lower, upper = work / "slower", work / "supper"
    lower.mkdir()
    for i in range(small):
        d = upper / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i % 100:03d}").write_bytes(os.urandom(512))
    layer = work / "layer.tar"
    t_export, _ = timed(export, str(upper), [str(lower)], str(layer))
    t_tar, _ = timed(subprocess.run, ["tar", "-cf", str(work / "plain.tar"), "-C", str(upper), "."])
    print(f"export of {small} small files:")
    print(f"  export-layer  {t_export:8.3f} s")
    print(f"  tar -c        {t_tar:8.3f} s   ratio {t_export / t_tar:.2f}x tar's time")

    def run_apply(durable: bool) -> float:
        target = work / f"target-{durable}"
        target.mkdir()
        t, _ = timed(lambda: apply(str(upper), [str(lower)], str(target), durable=durable))
        return t

    def tar_x() -> float:
        target = work / "target-tar"
        target.mkdir()
        t, _ = timed(subprocess.run, ["tar", "-xf", str(work / "plain.tar"), "-C", str(target)])
        return t

    def copy_loop(sync: bool) -> float:
        target = work / f"target-copy-{sync}"

        def loop() -> None:
            for dirpath, _dirs, names in os.walk(upper):
                rel = os.path.relpath(dirpath, upper)
                os.makedirs(os.path.join(target, rel), exist_ok=True)
                for name in names:
                    dst = os.path.join(target, rel, name)
                    shutil.copy2(os.path.join(dirpath, name), dst)
                    if sync:
                        fd = os.open(dst, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)

        t, _ = timed(loop)
        return t

    t_apply_sync, t_apply, t_tarx = run_apply(True), run_apply(False), tar_x()
    t_copy, t_copy_sync = copy_loop(False), copy_loop(True)
    print(f"apply of {small} small files:")
    print(
        f"  apply (no sync)       {t_apply:8.3f} s   {t_apply / t_tarx:.2f}x tar -x,"
        f" {t_apply / t_copy:.2f}x a copy loop"
    )
    print(
        f"  apply (fsync per file)   {t_apply_sync:8.3f} s   "
        f"{t_apply_sync / t_copy_sync:.2f}x a copy loop with fsync"
    )
    print(f"  tar -x                   {t_tarx:8.3f} s")
    print(f"  copy loop                {t_copy:8.3f} s")
    print(f"  copy loop, fsync         {t_copy_sync:8.3f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=200_000, help="lower files for diff")
    parser.add_argument("--changes", type=int, default=100, help="upper entries for diff")
    parser.add_argument("--small", type=int, default=10_000, help="files for export/apply")
    parser.add_argument("--quick", action="store_true", help="a smoke run (small sizes)")
    parser.add_argument("--dir", help="scratch directory (default: a temporary one in /tmp)")
    args = parser.parse_args()
    if args.quick:
        args.files, args.small = 5000, 500
    work = Path(tempfile.mkdtemp(prefix="unionfs-layers-bench-", dir=args.dir))
    try:
        if args.files:  # --files 0: export and apply only
            bench_diff(work, args.files, args.changes)
        bench_small(work, args.small)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
