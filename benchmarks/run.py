"""Benchmark unionfs side by side with native, kernel overlayfs, fuse-overlayfs and unionfs-fuse.

Every target is mounted over the same generated layers and every workload is
run round by round with the targets interleaved (A B C, B C A, ...), so that
ratios measured in one run are comparable on a shared, noisy machine.  The
report gives median seconds and the median of per-round ratios to native and to
fuse-overlayfs; results go to benchmarks/results/<date>-<host>/.

    python benchmarks/run.py               # full run, every installed target
    python benchmarks/run.py --quick       # smoke run (tiny tree, one round)

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import layers, report, targets
from bench.report import Failure, Measurement
from bench.targets import Mount, MountError, Target
from bench.workloads import WORKLOADS, Counts, Ctx, Job, Note, Workload

HERE = Path(__file__).resolve().parent
DEFAULT_TARGETS = "native,kernel,fuse-overlayfs,unionfs-fuse,unionfs"
QUICK_SCALE = 0.02


@dataclass
class Run:
    """State of one benchmark run."""

    args: argparse.Namespace
    tree: layers.Tree
    counts: Counts
    scratch: Path
    drop: bool  # drop_caches works here
    measurements: list[Measurement] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    broken: set[str] = field(default_factory=set)  # targets that failed to mount
    phase: str = "cold"  # being measured (for failure reports)


# -- options --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Compare unionfs with native, kernel overlayfs and the FUSE peers.",
        epilog="Peers: apt-get install fuse-overlayfs unionfs-fuse.  See benchmarks/README.md.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: --scale {QUICK_SCALE}, 1 round; checks no timing",
    )
    p.add_argument("--targets", default=DEFAULT_TARGETS, help=f"default: {DEFAULT_TARGETS}")
    p.add_argument(
        "--workloads", default="", help="comma-separated subset (default: all; see --list)"
    )
    p.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    p.add_argument(
        "--scale",
        type=float,
        help="size factor: 1 = 20k files, 1 GiB big file, 5k creates (default 1)",
    )
    p.add_argument("--layers", type=int, default=3, help="lower layers (1-500; default 3)")
    p.add_argument("--seed", type=int, default=1, help="seed of the generated tree")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/unionfs-bench"),
        help="layer cache and scratch space (default /var/tmp/unionfs-bench)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="results parent dir (default benchmarks/results)",
    )
    p.add_argument("--plot-to", type=Path, help="also write the PNG plot here")
    p.add_argument("--unionfs", metavar="CMD", help="unionfs-mount command (default: on PATH)")
    p.add_argument(
        "--unionfs-opts", default="", metavar="OPTS", help="extra -o options for unionfs-mount"
    )
    p.add_argument(
        "--baseline",
        metavar="CMD",
        help="another unionfs-mount command, target 'unionfs-base': A/B of two versions"
        " measured in the same rounds (add it to --targets)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        help="seconds per timed run before the FUSE daemon is killed (default 900)",
    )
    p.add_argument(
        "--no-drop-caches", action="store_true", help="do not drop the page cache for cold runs"
    )
    p.add_argument("--regenerate", action="store_true", help="rebuild the cached layers")
    p.add_argument("--list", action="store_true", help="list targets and workloads, then exit")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="RESULTS_DIR",
        help="only re-render results.md and the plot from RESULTS_DIR/results.json",
    )
    args = p.parse_args(argv)
    if args.scale is None:
        args.scale = QUICK_SCALE if args.quick else 1.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.timeout is None:
        args.timeout = 120.0 if args.quick else 900.0
    if not 1 <= args.layers <= 500:
        p.error("--layers must be between 1 and 500 (overlayfs' limit)")
    if args.rounds < 1 or args.scale <= 0:
        p.error("--rounds and --scale must be positive")
    args.workdir = args.workdir.resolve()
    return args


def select_targets(args: argparse.Namespace) -> tuple[list[Target], dict[str, str]]:
    """The requested targets that can run here, and why the others cannot."""
    known = targets.all_targets(args.unionfs, args.unionfs_opts, args.baseline)
    wanted = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen, skipped = [], {}
    for name in wanted:
        reason = known[name].unavailable()
        if reason:
            skipped[name] = reason
            print(f"skipping {name}: {reason}", file=sys.stderr)
        else:
            chosen.append(known[name])
    return chosen, skipped


def select_workloads(args: argparse.Namespace) -> list[Workload]:
    if not args.workloads:
        return WORKLOADS
    by_name = {w.name: w for w in WORKLOADS}
    wanted = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(unknown)}; see --list")
    return [by_name[n] for n in wanted]


def print_list() -> None:
    print("targets:", DEFAULT_TARGETS)
    print("workloads:")
    for w in WORKLOADS:
        kind = "start-up" if w.startup else "mutating" if w.mutates else "read-only"
        print(f"  {w.name:18} {kind:9}  {w.summary}")


# -- caches ---------------------------------------------------------------------------------


def in_flight(diskstats: str) -> int:
    """Block I/Os in progress, from /proc/diskstats (its 12th field, all devices)."""
    total = 0
    for line in diskstats.splitlines():
        fields = line.split()
        if len(fields) > 11 and fields[11].isdigit():
            total += int(fields[11])
    return total


def settle_disks(timeout: float = 30.0, quiet_for: float = 0.05) -> None:
    """Wait until no block I/O has been in flight for ``quiet_for`` s (at most ``timeout``).

    ``sync`` returns once the data is written, not once the disk is idle: the
    discards of the previous measurement's removed big files (a filesystem
    mounted with ``discard``), or a journal's own writes, still run, and the next
    target paid for them. Seen as a position effect: in three rounds, whichever
    unionfs ran right after unionfs-fuse took 2x longer for big-write-fsync,
    copy-up-big and git-status cold, and swapping the two swapped the cost.
    """
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        try:
            with open("/proc/diskstats") as f:
                busy = in_flight(f.read())
        except OSError:
            return  # no diskstats: nothing to wait for
        now = time.monotonic()
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_for:
            return
        time.sleep(0.005)


def drop_caches(enabled: bool) -> None:
    """sync, wait for the disk to be idle, then drop page cache, dentries and inodes (root
    only): a cold start."""
    os.sync()
    settle_disks()
    if enabled:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def can_drop_caches(args: argparse.Namespace) -> bool:
    if args.no_drop_caches:
        return False
    if os.geteuid() != 0:
        print(
            "not root: cannot drop caches, so 'cold' runs are only fresh mounts (not truly cold)",
            file=sys.stderr,
        )
        return False
    try:
        drop_caches(True)
    except OSError as e:
        print(f"cannot drop caches ({e}): 'cold' runs are only fresh mounts", file=sys.stderr)
        return False
    return True


def drop_counter() -> int:
    """How often anyone dropped the page cache (to flag runs disturbed by other processes)."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("drop_pagecache "):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- measuring ------------------------------------------------------------------------------


def timed(m: Mount, fn: Callable[[], Note], timeout: float) -> tuple[float, Note, bool]:
    """Seconds, note, and whether someone else dropped caches meanwhile."""
    before = drop_counter()
    with targets.watchdog(m, timeout):
        t0 = time.perf_counter()
        try:
            note = fn()
        except Exception:
            if m.killed:
                raise TimeoutError(f"no result after {timeout:.0f} s: daemon killed") from None
            raise
        seconds = time.perf_counter() - t0
    return seconds, note, drop_counter() != before


def round_order(items: list[Target], rnd: int) -> list[Target]:
    """The targets' order in round ``rnd`` (0-based): rotated by one each round, and
    reversed every other round.

    Rotation alone keeps each target's predecessor: the one that always ran right
    after unionfs-fuse paid for what its runs left behind (big-write-fsync 1.8-2.2x
    slower whichever unionfs build it was; not found what), and an A/B pair always
    ran in the same order. Reversing every other round gives each target other
    neighbours, so such an effect no longer lands on the same target every round.
    """
    by = rnd % len(items)
    order = items[by:] + items[:by]
    return order[::-1] if rnd % 2 else order


def read_only(run: Run, rnd: int, w: Workload, target: Target) -> None:
    """One fresh mount, caches dropped, then cold and warm on it."""
    with targets.mounted(target, run.tree, run.scratch, fresh=False) as m:
        job = w.prepare(ctx(run, m))
        drop_caches(run.drop)
        for phase in ("cold", "warm") if w.warm else ("cold",):
            run.phase = phase
            record(run, rnd, w, target, phase, m, job)


def mutating(run: Run, rnd: int, w: Workload, target: Target) -> None:
    """A fresh mount and upper per phase; warm reads the inputs first instead of dropping."""
    for phase in ("cold", "warm") if w.warm else ("cold",):
        run.phase = phase
        with targets.mounted(target, run.tree, run.scratch, fresh=True, copy_big=w.copy_big) as m:
            job = w.prepare(ctx(run, m))
            if phase == "cold":
                drop_caches(run.drop)
            else:
                os.sync()
                settle_disks()
                assert job.warmup is not None, f"{w.name} has a warm phase but no warmup"
                job.warmup()
            record(run, rnd, w, target, phase, m, job)
            os.sync()  # this run's write-back must not land in the next measurement


def startup(run: Run, rnd: int, w: Workload, target: Target) -> None:
    """Time the mount itself: from the exec of the mount command (or of nothing, for native)
    to the first LOOKUP through the mount answered.  Cold: caches dropped first, so the
    daemon's program and modules come from the disk, as after a boot; warm: right again."""
    for phase in ("cold", "warm"):
        run.phase = phase
        if phase == "cold":
            drop_caches(run.drop)
        before = drop_counter()
        t0 = time.perf_counter()
        with targets.mounted(target, run.tree, run.scratch, fresh=False) as m:
            os.stat(m.path / targets.PROBE)
            seconds = time.perf_counter() - t0
        disturbed = drop_counter() != before
        run.measurements.append(
            Measurement(rnd, w.name, phase, target.name, seconds, None, disturbed)
        )
        print(f"  {w.name:17} {phase:4} {target.name:15} {seconds:9.3f} s", flush=True)


def ctx(run: Run, m: Mount) -> Ctx:
    return Ctx(m.path, run.tree.manifest, run.counts, run.args.timeout)


def record(run: Run, rnd: int, w: Workload, target: Target, phase: str, m: Mount, job: Job) -> None:
    seconds, note, disturbed = timed(m, job.run, run.args.timeout)
    if job.check is not None:
        note = "; ".join(filter(None, [note, job.check()])) or None
    run.measurements.append(Measurement(rnd, w.name, phase, target.name, seconds, note, disturbed))
    flag = " (caches dropped by someone else)" if disturbed else ""
    extra = f"  [{note}]" if note else ""
    print(f"  {w.name:17} {phase:4} {target.name:15} {seconds:9.3f} s{extra}{flag}", flush=True)


def measure(run: Run, rnd: int, w: Workload, target: Target) -> None:
    """Every phase of one workload on one target; failures are recorded, not raised."""
    run.phase = "cold"
    try:
        kind = startup if w.startup else mutating if w.mutates else read_only
        kind(run, rnd, w, target)
    except MountError as e:
        run.broken.add(target.name)
        fail(run, Failure(rnd, "mount", "-", target.name, str(e)))
        print(f"  {target.name} is left out from now on", flush=True)
    except Exception as e:
        fail(run, Failure(rnd, w.name, run.phase, target.name, f"{type(e).__name__}: {e}"))


def fail(run: Run, f: Failure) -> None:
    run.failures.append(f)
    print(f"  FAILED {f.workload} ({f.phase}) on {f.target}: {f.error}", flush=True)


def run_rounds(run: Run, chosen: list[Target], workloads: list[Workload]) -> None:
    """for round: for workload: for target (``round_order``)."""
    for rnd in range(1, run.args.rounds + 1):
        print(f"round {rnd}/{run.args.rounds}", flush=True)
        for w in workloads:
            for target in round_order(chosen, rnd - 1):
                if target.name not in run.broken:
                    measure(run, rnd, w, target)


# -- reporting ------------------------------------------------------------------------------


def metadata(run: Run, chosen: list[Target], skipped: dict[str, str]) -> dict:
    spec, stats = run.tree.spec, run.tree.manifest.stats
    extra = layers.layer_stats(run.tree)
    summary = (
        f"{spec.layers} lower layers, {stats['files']:,} files, {stats['dirs']:,} dirs, "
        f"{extra['whiteouts']} whiteouts, big file {spec.big_mib} MiB (scale {run.args.scale:g})"
    )
    return {
        "machine": report.machine(),
        "tree_summary": summary,
        "spec": asdict(spec),
        "tree_stats": {**stats, **extra},
        "counts": asdict(run.counts),
        "rounds": run.args.rounds,
        "cold": "sync + drop_caches + fresh mount"
        if run.drop
        else "fresh mount only (caches NOT dropped: not root or --no-drop-caches)",
        "targets": [t.name for t in chosen],
        "skipped": skipped,
        "versions": {t.name: t.version() for t in chosen},
        "workdir": str(run.args.workdir),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def notes(run: Run) -> list[str]:
    """Fallbacks the workloads reported, and measurements other processes disturbed."""
    seen: dict[tuple[str, str], set[str]] = {}
    for m in run.measurements:
        if m.note:
            seen.setdefault((m.workload, m.note), set()).add(m.target)
    out = [f"{w}: {', '.join(sorted(ts))}: {note}" for (w, note), ts in sorted(seen.items())]
    disturbed = sum(m.disturbed for m in run.measurements)
    if disturbed:
        out.append(f"{disturbed} measurement(s) ran while another process dropped caches")
    if not run.drop:
        out.append("caches were not dropped: 'cold' is not truly cold")
    return out


def finish(
    run: Run,
    chosen: list[Target],
    skipped: dict[str, str],
    workloads: list[Workload],
    interrupted: bool,
) -> None:
    """Print the tables, write results.md/results.json and the plot."""
    names = [t.name for t in chosen]
    meta = metadata(run, chosen, skipped)
    meta["workloads"] = [w.name for w in workloads]
    meta["notes"] = notes(run) + (["interrupted: partial results"] if interrupted else [])
    rows = report.summarize(run.measurements, run.failures, names, meta["workloads"])
    text = report.markdown(meta, rows, names, run.failures, meta["notes"])
    print()
    print(text)
    out = run.args.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{meta['machine']['host']}"
    report.write_results(out, meta, rows, run.measurements, run.failures, text)
    plots = [out / "ratios.png"] + ([run.args.plot_to] if run.args.plot_to else [])
    report.plot(rows, names, meta, plots)
    print(f"results: {out}")


# -- main -----------------------------------------------------------------------------------


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every mount is undone on the way out."""
    raise KeyboardInterrupt(signum)


def _exit_status(e: KeyboardInterrupt) -> int:
    """128 + the signal, as a shell reports it."""
    signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
    return 128 + signum


def lock_workdir(workdir: Path) -> int:
    """Hold an exclusive lock on the work dir for the whole run: a second run would unmount
    and delete this one's scratch space."""
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another benchmark run is using {workdir}; pass --workdir") from None
    return fd


def setup(args: argparse.Namespace) -> Run:
    """Clear our leftovers, get the (cached) layers."""
    scratch = args.workdir / "scratch"
    targets.clear_leftovers(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    spec = layers.Spec.scaled(args.scale, args.layers, args.seed, os.geteuid() == 0)
    tree = layers.prepare(spec, args.workdir, args.regenerate)
    counts = Counts.scaled(args.scale, spec.big_mib)
    return Run(args, tree, counts, scratch, can_drop_caches(args))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print_list()
        return 0
    if args.replot:
        print(report.rerender(args.replot, args.plot_to))
        return 0
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    chosen, skipped = select_targets(args)
    workloads = select_workloads(args)
    if not chosen:
        print("no target can run here", file=sys.stderr)
        return 1
    lock_workdir(args.workdir)  # before the try: never clean up another run's mounts
    for target in chosen:
        target.prepare_run()
    try:
        run = setup(args)
        status = measure_and_report(run, chosen, skipped, workloads)
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        status = _exit_status(e)
    finally:
        targets.release_all()
        targets.discard_set_aside()
        targets.clear_leftovers(args.workdir / "scratch")  # belt and braces
        left = targets.leftover_mounts(args.workdir)
        if left:
            print(f"warning: mounts left behind: {left}", file=sys.stderr)
    return status


def measure_and_report(
    run: Run, chosen: list[Target], skipped: dict[str, str], workloads: list[Workload]
) -> int:
    """Run the rounds; on an interrupt, unmount and still report what was measured."""
    interrupted: KeyboardInterrupt | None = None
    try:
        run_rounds(run, chosen, workloads)
    except KeyboardInterrupt as e:
        interrupted = e
        print("interrupted: unmounting and reporting what was measured", file=sys.stderr)
    targets.release_all()
    finish(run, chosen, skipped, workloads, interrupted is not None)
    if interrupted is not None:
        return _exit_status(interrupted)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
