"""Benchmark unionfs side by side with native, kernel overlayfs and the FUSE peers.

One command mounts every target over the same generated layers and runs each
workload round by round, targets interleaved (A B C A B C ...), so that the
ratios of one run are comparable on a shared, noisy machine.  It reports
medians and, per round, the ratio of each target to native and to
fuse-overlayfs.  ``--quick`` is a smoke run for CI: tiny tree, one round, no
timing is checked.

    python benchmarks/run.py                # full run, all targets installed
    python benchmarks/run.py --quick        # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = os.geteuid() == 0
HERE = Path(__file__).resolve().parent
UNIONFS = shutil.which("unionfs-mount") or str(Path(sys.executable).parent / "unionfs-mount")


@dataclass(frozen=True)
class Scale:
    dirs: int
    files_per_dir: int
    big_mib: int
    create: int
    layers: int


FULL = Scale(dirs=2000, files_per_dir=10, big_mib=1024, create=5000, layers=3)
QUICK = Scale(dirs=40, files_per_dir=5, big_mib=8, create=100, layers=3)


# -- layers -----------------------------------------------------------------------


def generate(base: Path, scale: Scale) -> list[Path]:
    """Deterministic layers: small files spread over the stack, a git repository,
    a big file, a whiteout and an opaque directory.  Cached between runs."""
    lowers = [base / f"layer{i}" for i in range(scale.layers)]
    if (base / "ready").exists():
        return lowers
    shutil.rmtree(base, ignore_errors=True)
    rng = random.Random(42)
    bottom = lowers[-1]
    for layer in lowers:
        layer.mkdir(parents=True)
    for d in range(scale.dirs):
        rel = Path(f"src/pkg{d % 50:02d}/mod{d:04d}")
        for f in range(scale.files_per_dir):
            layer = lowers[rng.randrange(scale.layers)]
            (layer / rel).mkdir(parents=True, exist_ok=True)
            (layer / rel / f"file{f}.c").write_bytes(rng.randbytes(rng.randint(200, 4000)))
    repo = bottom / "repo"
    repo.mkdir()
    for i in range(max(50, scale.dirs // 4)):
        (repo / f"f{i}.txt").write_text(f"line {i}\n" * 20)
    git = ["git", "-c", "user.email=b@e", "-c", "user.name=bench", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    with open(bottom / "big.bin", "wb") as f:
        chunk = rng.randbytes(1 << 20)
        for _ in range(scale.big_mib):
            f.write(chunk)
    (bottom / "old").mkdir()
    (bottom / "old" / "gone.txt").write_text("deleted above\n")
    (bottom / "opaque").mkdir()
    (bottom / "opaque" / "hidden.txt").write_text("hidden\n")
    if scale.layers > 1 and ROOT:
        os.mknod(lowers[0] / "old", 0o20000, 0)  # whiteout of the old/ dir
        (lowers[0] / "opaque").mkdir()
        os.setxattr(lowers[0] / "opaque", "trusted.overlay.opaque", b"y")
    (base / "ready").touch()
    return lowers


def deep_layers(base: Path, n: int, scale: Scale) -> list[Path]:
    """A deep stack: ``n`` layers, each adding a few files to the same directories."""
    lowers = [base / f"d{i:03d}" for i in range(n)]
    if (base / "ready").exists():
        return lowers
    shutil.rmtree(base, ignore_errors=True)
    per = max(1, scale.dirs * scale.files_per_dir // n)
    for i, layer in enumerate(lowers):
        for j in range(per):
            d = layer / f"usr/lib/part{j % 20:02d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"l{i}_{j}.so").write_bytes(b"x" * 512)
    (base / "ready").touch()
    return lowers


# -- targets ----------------------------------------------------------------------


@dataclass
class Target:
    name: str
    available: Callable[[], bool]
    mount: Callable[[list[Path], Path, Path, Path], None]
    unmount: Callable[[Path], None]


def _fusermount_u(mnt: Path) -> None:
    if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


def _umount(mnt: Path) -> None:
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _mount_native(lowers, upper, work, mnt):  # a plain copy of the merged tree
    subprocess.run(["cp", "-a", f"{NATIVE_SRC}/.", str(mnt)], check=True)


def _mount_kernel(lowers, upper, work, mnt):
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)


def _mount_fo(lowers, upper, work, mnt):
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    subprocess.run(["fuse-overlayfs", "-o", opts, str(mnt)], check=True, stderr=subprocess.DEVNULL)


def _mount_uf(lowers, upper, work, mnt):
    branches = ":".join([f"{upper}=RW", *(f"{p}=RO" for p in lowers)])
    subprocess.run(["unionfs", "-o", "cow", branches, str(mnt)], check=True)


def _mount_unionfs(lowers, upper, work, mnt):
    subprocess.run(
        [UNIONFS, "-o", f"workdir={work}", ":".join(map(str, lowers)), str(upper), str(mnt)],
        check=True,
    )


NATIVE_SRC = ""
TARGETS = {
    "native": Target(
        "native", lambda: True, _mount_native, lambda m: shutil.rmtree(m, ignore_errors=True)
    ),
    "kernel": Target("kernel", lambda: ROOT, _mount_kernel, _umount),
    "fuse-overlayfs": Target(
        "fuse-overlayfs",
        lambda: shutil.which("fuse-overlayfs") is not None,
        _mount_fo,
        _fusermount_u,
    ),
    "unionfs-fuse": Target(
        "unionfs-fuse", lambda: shutil.which("unionfs") is not None, _mount_uf, _fusermount_u
    ),
    "unionfs": Target("unionfs", lambda: os.path.exists(UNIONFS), _mount_unionfs, _fusermount_u),
}


@contextlib.contextmanager
def mounted(
    target: Target, lowers: list[Path], scratch: Path, mutating: bool = True
) -> Iterator[Path]:
    """A fresh mount (and upper) of ``target``; always undone.

    Native read-only runs use the merged copy in place; mutating ones get a copy.
    """
    if target.name == "native" and not mutating:
        yield Path(NATIVE_SRC)
        return
    root = scratch / target.name
    shutil.rmtree(root, ignore_errors=True)
    upper, work, mnt = root / "upper", root / "work", root / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    target.mount(lowers, upper, work, mnt)
    try:
        yield mnt
    finally:
        target.unmount(mnt)
        shutil.rmtree(root, ignore_errors=True)


def drop_caches() -> None:
    if ROOT:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3")


# -- workloads --------------------------------------------------------------------


def _files(mnt: Path, under: str = "src") -> list[str]:
    out = []
    for dirpath, _, filenames in os.walk(mnt / under):
        out += [os.path.join(dirpath, f) for f in filenames]
    return sorted(out)


def stat_walk(mnt: Path, scale: Scale) -> None:
    for dirpath, dirnames, filenames in os.walk(mnt):
        for n in dirnames + filenames:
            os.lstat(os.path.join(dirpath, n))


def ls_lr(mnt: Path, scale: Scale) -> None:
    subprocess.run(["ls", "-lR", str(mnt)], stdout=subprocess.DEVNULL, check=True)


def read_small(mnt: Path, scale: Scale) -> None:
    for p in _files(mnt):
        with open(p, "rb") as f:
            f.read()


def big_read(mnt: Path, scale: Scale) -> None:
    subprocess.run(
        ["dd", f"if={mnt}/big.bin", "of=/dev/null", "bs=1M"], check=True, capture_output=True
    )


def big_write(mnt: Path, scale: Scale) -> None:
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={mnt}/written.bin",
            "bs=1M",
            f"count={scale.big_mib}",
            "conv=fsync",
        ],
        check=True,
        capture_output=True,
    )


def create_files(mnt: Path, scale: Scale) -> None:
    d = mnt / "created"
    d.mkdir()
    for i in range(scale.create):
        with open(d / f"f{i}", "wb") as f:
            f.write(b"x" * 100)


def delete_files(mnt: Path, scale: Scale) -> None:
    for p in _files(mnt)[: scale.create]:
        os.unlink(p)


def copy_up_small(mnt: Path, scale: Scale) -> None:
    for p in _files(mnt)[: scale.create // 2]:
        with open(p, "ab") as f:
            f.write(b"+")


def copy_up_big(mnt: Path, scale: Scale) -> None:
    with open(mnt / "big.bin", "ab") as f:
        f.write(b"tail")
        f.flush()
        os.fsync(f.fileno())


def rename_dir(mnt: Path, scale: Scale) -> None:
    subprocess.run(["mv", str(mnt / "src" / "pkg07"), str(mnt / "src" / "pkg07.moved")], check=True)


def tar_tree(mnt: Path, scale: Scale) -> None:
    subprocess.run(
        f"tar -C {mnt}/src -cf - . | wc -c", shell=True, check=True, stdout=subprocess.DEVNULL
    )


def git_status(mnt: Path, scale: Scale) -> None:
    subprocess.run(
        ["git", "-c", "safe.directory=*", "-C", str(mnt / "repo"), "status", "--porcelain"],
        check=True,
        capture_output=True,
    )


def build(mnt: Path, scale: Scale) -> None:
    """Compiler-like: read every source of some packages, write an object for each,
    then rename the objects into place and delete the temporaries' directory."""
    out = mnt / "build"
    out.mkdir()
    for i, p in enumerate(_files(mnt, "src/pkg0" + str(0))[: scale.create // 4] or _files(mnt)):
        with open(p, "rb") as f:
            data = f.read()
        tmp = out / f"o{i}.tmp"
        tmp.write_bytes(data[:64] * 4)
        os.rename(tmp, out / f"o{i}.o")
    shutil.rmtree(out)


@dataclass(frozen=True)
class Workload:
    name: str
    run: Callable[[Path, Scale], None]
    warm: bool  # repeat on the same mount (read-only workloads)


WORKLOADS = [
    Workload("stat-walk", stat_walk, True),
    Workload("ls-lR", ls_lr, True),
    Workload("read-small", read_small, True),
    Workload("big-read", big_read, True),
    Workload("tar", tar_tree, True),
    Workload("git-status", git_status, True),
    Workload("big-write-fsync", big_write, False),
    Workload("create", create_files, False),
    Workload("delete", delete_files, False),
    Workload("copy-up-small", copy_up_small, False),
    Workload("copy-up-big", copy_up_big, False),
    Workload("rename-lower-dir", rename_dir, False),
    Workload("build", build, False),
]


# -- running and reporting --------------------------------------------------------


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    global NATIVE_SRC
    scale = QUICK if args.quick else FULL
    work = Path(args.workdir)
    tag = "quick" if args.quick else "full"
    lowers = generate(work / f"layers-{tag}", scale)
    if args.layers:
        lowers = deep_layers(work / f"deep-{args.layers}-{tag}", args.layers, scale)
    native = work / f"native-{tag}-{len(lowers)}"
    if not (native / ".ready").exists():
        shutil.rmtree(native, ignore_errors=True)
        native.mkdir(parents=True)
        t = TARGETS["kernel"] if ROOT else TARGETS["unionfs"]
        with mounted(t, lowers, work / "scratch") as mnt:
            subprocess.run(["cp", "-a", f"{mnt}/.", str(native)], check=True)
        (native / ".ready").touch()
    NATIVE_SRC = str(native)

    targets = [TARGETS[n] for n in args.targets.split(",")]
    missing = [t.name for t in targets if not t.available()]
    for name in missing:
        hint = " (apt-get install fuse-overlayfs unionfs-fuse)" if "fuse" in name else ""
        print(f"skipping {name}: not available{hint}", file=sys.stderr)
    targets = [t for t in targets if t.available()]
    wanted = [w for w in WORKLOADS if not args.workloads or w.name in args.workloads.split(",")]
    if args.layers:
        wanted = [w for w in wanted if w.name in ("stat-walk", "ls-lR", "read-small")]
    # times[(workload, phase, target)] = [seconds per round]
    times: dict[tuple[str, str, str], list[float]] = {}
    failures = []
    for rnd in range(args.rounds):
        for w in wanted:
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for t in order:
                try:
                    drop_caches()
                    with mounted(t, lowers, work / "scratch", mutating=not w.warm) as mnt:
                        if args.layers and w.name == "read-small":

                            def fn(m: Path = mnt) -> None:
                                for p in _files(m, "usr"):
                                    Path(p).read_bytes()
                        else:

                            def fn(m: Path = mnt, w: Workload = w) -> None:
                                w.run(m, scale)

                        cold = timed(fn)
                        warm = timed(fn) if w.warm else None
                except (subprocess.CalledProcessError, OSError) as e:
                    failures.append(f"{w.name} on {t.name}: {e}")
                    print(f"FAILED {w.name} on {t.name}: {e}", file=sys.stderr)
                    continue
                times.setdefault((w.name, "cold", t.name), []).append(cold)
                if warm is not None:
                    times.setdefault((w.name, "warm", t.name), []).append(warm)
                print(
                    f"round {rnd + 1} {w.name:18} {t.name:15} cold {cold:8.3f}"
                    + (f" warm {warm:8.3f}" if warm is not None else ""),
                    flush=True,
                )
    report(times, [t.name for t in targets], args, len(lowers))
    return 1 if failures else 0


def _ratio(times, key, base) -> float | None:
    """Median over rounds of the per-round ratio target / base."""
    a, b = times.get(key), times.get((key[0], key[1], base))
    if not a or not b:
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=False) if y > 0)


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
        )
    return f"{os.cpu_count()} cores, {cpu}, Linux {platform.release()}"


def report(times, names, args, nlayers) -> None:
    rows = sorted(
        {(w, p) for (w, p, _) in times},
        key=lambda k: ([x.name for x in WORKLOADS].index(k[0]), k[1]),
    )
    head = ["workload", *names]
    others = [n for n in names if n != "native"]
    lines = [
        f"# unionfs benchmark, {time.strftime('%Y-%m-%d')}",
        f"{machine()}; {nlayers} layers; {args.rounds} round(s); "
        f"{'quick' if args.quick else 'full'} scale",
        "",
        "Median seconds; in brackets the median per-round ratio to native / to fuse-overlayfs.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    ratios: dict[str, dict[str, float]] = {}
    for w, p in rows:
        cells = [f"{w} ({p})"]
        for n in names:
            v = times.get((w, p, n))
            if not v:
                cells.append("-")
                continue
            cell = f"{statistics.median(v):.3f}"
            rn = _ratio(times, (w, p, n), "native") if n != "native" else None
            rf = _ratio(times, (w, p, n), "fuse-overlayfs") if n != "fuse-overlayfs" else None
            if rn is not None or rf is not None:
                cell += " (" + " / ".join("-" if r is None else f"{r:.2f}x" for r in (rn, rf)) + ")"
            if rf is not None:
                ratios.setdefault(n, {})[f"{w} ({p})"] = rf
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in others:
        r = ratios.get(n)
        if r and n != "fuse-overlayfs":
            gm = statistics.geometric_mean(r.values())
            lines.append(
                f"- {n}: geometric mean of ratios to fuse-overlayfs {gm:.2f}x, "
                f"worst {max(r.values()):.2f}x ({max(r, key=r.get)})"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "rounds": args.rounds,
                "layers": nlayers,
                "times": {"|".join(k): v for k, v in times.items()},
            },
            indent=1,
        )
    )
    plot(ratios, out / "ratios.png" if not args.plot_to else Path(args.plot_to), lines[1])
    print(f"results in {out}")


def plot(ratios: dict[str, dict[str, float]], path: Path, subtitle: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    keys = sorted({k for r in ratios.values() for k in r})
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(keys) + 2))
    width = 0.8 / max(1, len(ratios))
    for i, (name, r) in enumerate(sorted(ratios.items())):
        ax.barh(
            [k + i * width for k in range(len(keys))],
            [r.get(k, 0) for k in keys],
            height=width,
            label=name,
        )
    ax.set_yticks([k + 0.4 - width / 2 for k in range(len(keys))], keys, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("time relative to fuse-overlayfs (lower is faster)")
    ax.set_title(f"unionfs benchmark {time.strftime('%Y-%m-%d')}\n{subtitle}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny tree, one round: a smoke run")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets")
    p.add_argument("--workloads", default="", help="comma-separated subset of workloads")
    p.add_argument(
        "--layers",
        type=int,
        default=0,
        help="deep stack of N layers instead of the default tree (read workloads)",
    )
    p.add_argument("--workdir", default="/var/tmp/unionfs-bench", help="layers and scratch")
    p.add_argument("--out", default=str(HERE / "results"), help="where results go")
    p.add_argument("--plot-to", default="", help="also write the PNG plot here")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    # SIGTERM unwinds like Ctrl-C, so every mount is undone on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
