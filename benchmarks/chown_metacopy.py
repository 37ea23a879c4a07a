#!/usr/bin/env python3
"""``chown -R`` over a tree of big lower files: metadata-only copy-up against full copy-up.

Run as root: ``python3 benchmarks/chown_metacopy.py [--files 64] [--mib 16] [--rounds 3]``.
The targets, interleaved round by round, each on a fresh upper and a fresh mount:
unionfs (default: data copied), unionfs ``-o metacopy=on``, kernel overlayfs
``metacopy=on`` and fuse-overlayfs.  Each run times ``chown -R`` and then a
``sync -f`` of the upper (what the copy still owes the disk), and checks that
the merged tree reads the lower's bytes.  The lower stays in the page cache
(no drop_caches: the machine may be shared), the same for every target.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def unionfs_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "unionfs-mount"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "unionfs.cli"]


def make_lower(lower: Path, files: int, mib: int) -> str:
    """64 x 16 MiB files of random data in 8 dirs (made once); returns a digest of one."""
    block = os.urandom(1 << 20)
    for i in range(files):
        d = lower / f"d{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"f{i}"
        if not p.exists() or p.stat().st_size != mib << 20:
            with open(p, "wb") as f:
                for j in range(mib):
                    f.write(block[j:] + block[:j])  # distinct blocks, no dedup
    return hashlib.sha256((lower / "d0" / "f0").read_bytes()).hexdigest()


def mount(target: str, lower: Path, upper: Path, work: Path, mnt: Path) -> None:
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if target == "kernel-metacopy":
        cmd = ["mount", "-t", "overlay", "overlay", "-o", opts + ",metacopy=on", str(mnt)]
    elif target == "fuse-overlayfs":
        cmd = ["fuse-overlayfs", "-o", opts, str(mnt)]
    else:
        extra = ",metacopy=on" if target == "unionfs-metacopy" else ""
        cmd = [*unionfs_cmd(), "-o", opts + extra, str(mnt)]
    subprocess.run(cmd, check=True, capture_output=True)


def unmount(target: str, mnt: Path) -> None:
    cmd = ["umount", str(mnt)] if target.startswith("kernel") else ["fusermount3", "-u", str(mnt)]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    for _ in range(500):  # a FUSE daemon may still be finishing
        if not os.path.ismount(mnt):
            return
        time.sleep(0.01)


def one(target: str, lower: Path, scratch: Path, digest: str) -> tuple[float, float, int]:
    """(chown seconds, sync seconds, upper KiB) of one run on a fresh upper."""
    run = scratch / target
    shutil.rmtree(run, ignore_errors=True)
    upper, work, mnt = run / "upper", run / "work", run / "mnt"
    for p in (upper, work, mnt):
        p.mkdir(parents=True)
    mount(target, lower, upper, work, mnt)
    try:
        t0 = time.perf_counter()
        subprocess.run(["chown", "-R", "1234:1234", str(mnt)], check=True)
        t1 = time.perf_counter()
        subprocess.run(["sync", "-f", str(upper)], check=True)
        t2 = time.perf_counter()
        got = hashlib.sha256((mnt / "d0" / "f0").read_bytes()).hexdigest()
        assert got == digest, f"{target}: wrong data after chown"
        assert os.stat(mnt / "d0" / "f0").st_uid == 1234, f"{target}: not chowned"
    finally:
        unmount(target, mnt)
    used = int(
        subprocess.run(
            ["du", "-sk", str(upper)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    shutil.rmtree(run, ignore_errors=True)
    return t1 - t0, t2 - t1, used


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp/unionfs-bench-chown")
    ap.add_argument("--targets", default="unionfs,unionfs-metacopy,kernel-metacopy,fuse-overlayfs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("chown_metacopy: run as root (kernel overlayfs, chown)", file=sys.stderr)
        return 2
    base = Path(args.workdir)
    lower = base / f"lower-{args.files}x{args.mib}"
    digest = make_lower(lower, args.files, args.mib)
    targets = args.targets.split(",")
    results: dict[str, list[tuple[float, float, int]]] = {t: [] for t in targets}
    for r in range(args.rounds):
        for t in targets:
            res = one(t, lower, base / "runs", digest)
            results[t].append(res)
            print(
                f"round {r + 1} {t}: chown {res[0]:.2f} s, sync {res[1]:.2f} s,"
                f" upper {res[2] / 1024:.1f} MiB",
                flush=True,
            )
    ref = (
        statistics.median(c + s for c, s, _ in results["kernel-metacopy"])
        if ("kernel-metacopy" in results)
        else None
    )
    print(f"\n{args.files} x {args.mib} MiB, medians of {args.rounds} rounds")
    print("| target | chown -R (s) | + sync (s) | upper written | vs kernel metacopy |")
    print("|---|---|---|---|---|")
    for t, rs in results.items():
        c = statistics.median(x[0] for x in rs)
        s = statistics.median(x[0] + x[1] for x in rs)
        kib = statistics.median(x[2] for x in rs)
        ratio = f"{s / ref:.1f}x" if ref else "-"
        print(f"| {t} | {c:.2f} | {s:.2f} | {kib / 1024:.1f} MiB | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
