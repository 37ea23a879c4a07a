#!/usr/bin/env python3
"""Benchmark of the layer tools against what other tools do and the physical limit.

- diff: ``unionfs.changes.scan`` of a 100-entry upper over a 200,000-file lower,
  against a naive diff (walk the lower and the merged view and compare every
  entry's lstat and xattrs, as podman's NaiveDiff and docker diff do).  The
  merged view is a kernel overlayfs mount as root; otherwise the lower is
  walked twice (the same amount of work).
- export: ``export-layer`` of a 10,000-file upper against ``tar -cf`` of the
  upper (the physical limit: no lower lookups, no whiteout rules), and against
  the same work done by tar and coreutils (``tar --xattrs --acls -c``, then
  ``sha256sum`` and ``sync -f`` of the output: export reads every xattr,
  digests the layer and makes the file durable).
- apply: ``apply`` of that upper onto a directory against ``tar -x`` of the
  upper's tar and a per-file copy loop (``shutil.copy2`` per file, as try's
  commit or a naive script does), with no sync and durable (apply's group
  commit against the same tools followed by one ``sync -f``).

Run: ``.venv/bin/python benchmarks/layers.py [--files 200000] [--small 10000]``
(``--quick`` for a smoke run).  Prints seconds and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unionfs.changes.apply import apply as _apply
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


def apply(upper: str, lowers: list[str], target: str, durable: bool = True) -> object:
    return _apply(upper, lowers, target, durable=durable)


def _sync(path: Path) -> None:
    subprocess.run(["sync", "-f", str(path)], check=True)


def bench_small(work: Path, small: int, rounds: int = 3) -> None:
    """Export and apply of ``small`` files, each measured ``rounds`` times (medians).

    Nothing is deleted between rounds: on ext4, creating files right after
    deleting many costs several times more (the inode allocator skips recently
    deleted inodes), which made earlier figures swing by 10x.  Use a fresh
    filesystem (``--dir`` on a new loop-mounted ext4) for repeatable figures.
    """
    lower, upper = work / "slower", work / "supper"
    lower.mkdir()
    for i in range(small):
        d = upper / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i % 100:03d}").write_bytes(os.urandom(512))
    _sync(work)
    times: dict[str, list[float]] = {}

    def timed_as(name: str, fn, *args) -> None:
        t, _ = timed(fn, *args)
        times.setdefault(name, []).append(t)

    def copy_loop(target: Path) -> None:
        for dirpath, _dirs, names in os.walk(upper):
            rel = os.path.relpath(dirpath, upper)
            os.makedirs(os.path.join(target, rel), exist_ok=True)
            for name in names:
                shutil.copy2(os.path.join(dirpath, name), os.path.join(target, rel, name))

    plain = work / "plain.tar"
    for r in range(rounds):
        timed_as("export", export, str(upper), [str(lower)], str(work / f"layer{r}.tar"))
        timed_as("tar -c", subprocess.run, ["tar", "-cf", str(plain), "-C", str(upper), "."])
        # The same work as export: xattrs read, the layer's digest, the output made durable.
        same = work / f"same{r}.tar"
        timed_as(
            "tar -c --xattrs, sha256, sync",
            lambda t=same: (
                subprocess.run(["tar", "--xattrs", "--acls", "-cf", str(t), "-C", str(upper), "."]),
                subprocess.run(["sha256sum", str(t)], stdout=subprocess.DEVNULL),
                _sync(t),
            ),
        )
        for durable in (False, True):
            target = work / f"apply-{durable}-{r}"
            target.mkdir()
            name = "apply, durable" if durable else "apply --no-sync"
            timed_as(name, apply, str(upper), [str(lower)], str(target), durable)
        target = work / f"tar-x-{r}"
        target.mkdir()
        timed_as("tar -x", subprocess.run, ["tar", "-xf", str(plain), "-C", str(target)])
        target = work / f"tar-xs-{r}"
        target.mkdir()
        timed_as(
            "tar -x, sync -f",
            lambda t=target: (
                subprocess.run(["tar", "-xf", str(plain), "-C", str(t)]),
                _sync(t),
            ),
        )
        timed_as("copy loop", copy_loop, work / f"copy-{r}")
        timed_as("copy loop, sync -f", lambda t=work / f"copys-{r}": (copy_loop(t), _sync(t)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"export and apply of {small} small files (median of {rounds} rounds):")
    rows = [
        ("export-layer", "export", "tar -c"),
        ("  vs the same work", "export", "tar -c --xattrs, sha256, sync"),
        ("tar -c", "tar -c", None),
        ("tar -c --xattrs, sha256, sync", "tar -c --xattrs, sha256, sync", None),
        ("apply --no-sync", "apply --no-sync", "tar -x"),
        ("  vs copy loop", "apply --no-sync", "copy loop"),
        ("apply (durable: group commit)", "apply, durable", "tar -x, sync -f"),
        ("  vs copy loop, sync -f", "apply, durable", "copy loop, sync -f"),
        ("tar -x", "tar -x", None),
        ("tar -x, sync -f", "tar -x, sync -f", None),
        ("copy loop", "copy loop", None),
        ("copy loop, sync -f", "copy loop, sync -f", None),
    ]
    for label, key, ref in rows:
        ratio = f"   {med[key] / med[ref]:.2f}x {ref}" if ref else ""
        print(f"  {label:34s} {med[key]:8.3f} s{ratio}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=200_000, help="lower files for diff")
    parser.add_argument("--changes", type=int, default=100, help="upper entries for diff")
    parser.add_argument("--small", type=int, default=10_000, help="files for export/apply")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of export/apply")
    parser.add_argument("--quick", action="store_true", help="a smoke run (small sizes)")
    parser.add_argument("--dir", help="scratch directory (default: a temporary one in /tmp)")
    args = parser.parse_args()
    if args.quick:
        args.files, args.small = 5000, 500
    work = Path(tempfile.mkdtemp(prefix="unionfs-layers-bench-", dir=args.dir))
    try:
        if args.files:  # --files 0: export and apply only
            bench_diff(work, args.files, args.changes)
        bench_small(work, args.small, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
