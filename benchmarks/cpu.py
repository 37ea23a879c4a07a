"""CPU of the daemon per request: a measure that does not depend on the machine's load.

Wall-clock times on a shared 2-CPU machine move with everyone else's work; the CPU the
daemon itself spends (utime + stime from /proc/PID/stat) for a fixed client workload
moves far less.  For each workload and each mount command given, this mounts the
3-layer tree fresh (after ``drop_caches`` for the cold pass), runs the client in a
child process, and prints the daemon's user and system CPU for the cold pass and for
a warm pass on the same mount; for unionfs also the requests by type (``unionfs stats``)
and the user CPU per request.  Commands are interleaved round by round (ABAB...).

    python benchmarks/cpu.py --tree /var/tmp/unionfs-bench/layers-... \\
        --cmd new=.venv/bin/unionfs-mount --cmd old=/tmp/ci1/.venv/bin/unionfs-mount \\
        --cmd fo=fuse-overlayfs --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CLK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK, int(fields[12]) / CLK


def cpu_ns_of(pid: int) -> int:
    """CPU nanoseconds of a process, all its threads (schedstat: finer than utime's ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended
    return total


def walk(root: str) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files + _dirs:
            os.lstat(os.path.join(dirpath, name))


def read_all(root: str) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) < 1 << 20:
                with open(p, "rb") as f:
                    f.read()


def read_listed(root: str, paths: list[str]) -> None:
    """open/read/close of every small file, by path (LOOKUP-driven, no readdir)."""
    for rel in paths:
        with open(os.path.join(root, rel), "rb") as f:
            f.read()


def ls_lr(root: str) -> None:
    subprocess.run(["ls", "-lR", root], stdout=subprocess.DEVNULL, check=False)


def stat_paths(root: str, paths: list[str]) -> None:
    for rel in paths:
        os.lstat(os.path.join(root, rel))


def pread_direct(root: str, size: int, count: int = 50_000) -> None:
    """``count`` O_DIRECT preads of ``size`` bytes over big/mid.bin's first 16 MiB:
    every one a READ request (no page cache of the mount in between); cold reads
    the disk once, warm reads the lower's page cache: READ's own CPU."""
    import mmap

    buf = mmap.mmap(-1, size)
    fd = os.open(os.path.join(root, "big", "mid.bin"), os.O_RDONLY | os.O_DIRECT)
    try:
        span = (16 << 20) // size
        for i in range(count):
            os.preadv(fd, [buf], (i % span) * size)
    finally:
        os.close(fd)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mount(cmd: str, lowers: list[Path], scratch: Path) -> tuple[subprocess.Popen, Path]:
    upper, work, mnt = scratch / "upper", scratch / "work", scratch / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    low = ":".join(map(str, lowers))
    binary, _, opts = cmd.partition(",")  # COMMAND[,OPTS]: extra -o options
    if "fuse-overlayfs" in binary:
        opts = ",".join(filter(None, [f"lowerdir={low},upperdir={upper},workdir={work}", opts]))
        argv = [binary, "-f", "-o", opts, str(mnt)]
    else:
        opts = ",".join(filter(None, [f"workdir={work}", opts]))
        argv = [binary, "-f", "-o", opts, low, str(upper), str(mnt)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{argv} did not mount")
        time.sleep(0.01)
    os.stat(mnt / "src")  # the first request answered
    return proc, mnt


def unmount(proc: subprocess.Popen, mnt: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def requests(mnt: Path) -> dict[str, int]:
    try:
        raw = json.loads(os.getxattr(mnt, b"user.overlay.unionfs.stats"))
    except OSError:
        return {}
    counts = {k: sum(v.values()) for k, v in raw["requests"].items()}
    counts["getxattr"] -= 1  # this query's own
    return counts


def in_child(fn: Callable[[], None]) -> None:
    """Run the client in a child process: its own CPU is not the daemon's concern."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a.get(k, 0) for k in b if b[k] - a.get(k, 0)}


def one(cmd: str, lowers: list[Path], workload: Callable[[str], None]) -> list[dict]:
    scratch = Path(tempfile.mkdtemp(prefix="cpu-", dir="/var/tmp"))
    out = []
    try:
        drop_caches()
        proc, mnt = mount(cmd, lowers, scratch)
        try:
            for phase in ("cold", "warm"):
                r0, (u0, s0), c0 = requests(mnt), cpu_of(proc.pid), cpu_ns_of(proc.pid)
                t0 = time.perf_counter()
                in_child(lambda: workload(str(mnt)))
                wall = time.perf_counter() - t0
                u1, s1 = cpu_of(proc.pid)
                cpu = (cpu_ns_of(proc.pid) - c0) / 1e9
                reqs = diff(r0, requests(mnt))
                out.append(
                    {
                        "phase": phase,
                        "user": u1 - u0,
                        "sys": s1 - s0,
                        "cpu": cpu,
                        "wall": wall,
                        "reqs": reqs,
                    }
                )
        finally:
            unmount(proc, mnt)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tree", required=True, type=Path)
    p.add_argument("--cmd", action="append", required=True, help="NAME=COMMAND[,OPTS]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workloads", default="walk,read,ls-lR,read-paths")
    args = p.parse_args()
    lowers = sorted(d for d in args.tree.iterdir() if d.is_dir() and d.name.startswith("L"))
    manifest = json.loads((args.tree / "manifest.json").read_text())
    small = [f for f in manifest["files"] if not f.startswith("big/")]
    workloads: dict[str, Callable[[str], None]] = {
        "walk": walk,
        "read": read_all,
        "ls-lR": ls_lr,
        "read-paths": lambda root: read_listed(root, small),
        "stat-paths": lambda root: stat_paths(root, small),
        "pread-4k": lambda root: pread_direct(root, 4096),
        "pread-32k": lambda root: pread_direct(root, 32 << 10),
        "pread-128k": lambda root: pread_direct(root, 128 << 10),
        "pread-1m": lambda root: pread_direct(root, 1 << 20, 3000),
    }
    cmds = [c.split("=", 1) for c in args.cmd]
    for wname in args.workloads.split(","):
        for rnd in range(args.rounds):
            for name, cmd in cmds if rnd % 2 == 0 else reversed(cmds):
                for r in one(cmd, lowers, workloads[wname]):
                    n = sum(r["reqs"].values())
                    per = f" {1e6 * r['user'] / n:6.1f} us user/req" if n else ""
                    per += f" {1e6 * r['cpu'] / n:6.2f} us cpu/req" if n else ""
                    print(
                        f"{wname:10} r{rnd} {name:6} {r['phase']}: user {r['user']:.2f} s"
                        f" sys {r['sys']:.2f} s wall {r['wall']:.2f} s{per} {r['reqs']}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
