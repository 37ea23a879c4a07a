"""Turning measurements into medians, per-round ratios, markdown, JSON and a plot.

On a shared, noisy machine absolute seconds drift between rounds, but targets
measured back to back within one round see the same conditions.  So a ratio is
computed per round first and the median of those per-round ratios is reported,
rather than a ratio of medians.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BASELINES = ("native", "fuse-overlayfs")


@dataclass
class Measurement:
    round: int
    workload: str
    phase: str  # "cold" or "warm"
    target: str
    seconds: float
    note: str | None = None
    disturbed: bool = False  # someone else dropped the page cache meanwhile


@dataclass
class Failure:
    round: int
    workload: str  # "mount" when the target could not be mounted
    phase: str
    target: str
    error: str


@dataclass
class Cell:
    median: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)  # baseline -> median per-round ratio
    rounds: int = 0
    failed: bool = False


@dataclass
class Row:
    workload: str
    phase: str
    cells: dict[str, Cell]

    @property
    def label(self) -> str:
        return f"{self.workload} ({self.phase})"


# -- statistics -----------------------------------------------------------------------------


def per_round_ratio(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Median over the rounds both have of a[round] / b[round]."""
    ratios = [a[r] / b[r] for r in a if r in b and b[r] > 0]
    return statistics.median(ratios) if ratios else None


def summarize(
    measurements: list[Measurement],
    failures: list[Failure],
    targets: list[str],
    workloads: list[str],
) -> list[Row]:
    """One row per workload and phase that has any result, in workload order."""
    times: dict[tuple[str, str, str], dict[int, float]] = {}
    for m in measurements:
        times.setdefault((m.workload, m.phase, m.target), {})[m.round] = m.seconds
    failed = {(f.workload, f.phase, f.target) for f in failures}
    keys = {(m.workload, m.phase) for m in measurements} | {(f.workload, f.phase) for f in failures}
    rows = []
    for w in workloads:
        for phase in ("cold", "warm"):
            if (w, phase) not in keys:
                continue
            cells = {}
            for t in targets:
                series = times.get((w, phase, t), {})
                cell = Cell(rounds=len(series), failed=(w, phase, t) in failed)
                if series:
                    cell.median = statistics.median(series.values())
                    for base in BASELINES:
                        ratio = per_round_ratio(series, times.get((w, phase, base), {}))
                        if ratio is not None:
                            cell.ratios[base] = ratio
                cells[t] = cell
            rows.append(Row(w, phase, cells))
    return rows


def geomean(values: list[float]) -> float | None:
    return statistics.geometric_mean(values) if values else None


# -- machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, str | int]:
    return {
        "host": socket.gethostname(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def machine_line(m: dict[str, str | int]) -> str:
    return f"{m['host']}: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}"


# -- markdown -------------------------------------------------------------------------------


def _seconds(cell: Cell) -> str:
    if cell.median is None:
        return "FAIL" if cell.failed else "-"
    return f"{cell.median:.3f}" + ("" if not cell.failed else " (some rounds failed)")


def _ratio(cell: Cell, base: str) -> str:
    if base not in cell.ratios:
        return "FAIL" if cell.failed else "-"
    return f"{cell.ratios[base]:.2f}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def seconds_table(rows: list[Row], targets: list[str]) -> list[str]:
    return _table(
        ["workload", *targets], [[r.label, *(_seconds(r.cells[t]) for t in targets)] for r in rows]
    )


def ratio_table(rows: list[Row], targets: list[str], base: str) -> list[str]:
    """Ratios of every other target to ``base``, plus their geometric mean over workloads."""
    others = [t for t in targets if t != base]
    lines = [[r.label, *(_ratio(r.cells[t], base) for t in others)] for r in rows]
    means = [
        geomean([r.cells[t].ratios[base] for r in rows if base in r.cells[t].ratios])
        for t in others
    ]
    lines.append(["**geometric mean**", *("-" if g is None else f"**{g:.2f}**" for g in means)])
    return _table(["workload", *others], lines)


def markdown(
    meta: dict,
    rows: list[Row],
    targets: list[str],
    failures: list[Failure],
    notes: list[str],
) -> str:
    m = meta["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    lines = [
        f"# unionfs benchmark, {m['date']}",
        "",
        f"- machine: {machine_line(m)}, Python {m['python']}",
        f"- tree: {meta['tree_summary']}",
        f"- {meta['rounds']} round(s), targets rotated each round and reversed every other round; cold = {meta['cold']}; "
        "warm = the same workload again on the same mount (mutating workloads: a fresh mount "
        "whose caches were warmed by reading what the workload touches)",
        f"- versions: {versions or '-'}",
        *(f"- skipped {name}: {why}" for name, why in meta["skipped"].items()),
        f"- command: `{meta['command']}`",
        "",
        "## Median seconds (lower is better)",
        "",
        *seconds_table(rows, targets),
    ]
    for base, meaning in (
        ("native", "1.00 = as fast as a plain directory"),
        ("fuse-overlayfs", "below 1 = faster than fuse-overlayfs"),
    ):
        if base in targets and len(targets) > 1:
            lines += [
                "",
                f"## Ratio to {base} (median of per-round ratios; {meaning})",
                "",
                *ratio_table(rows, targets, base),
            ]
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [
            f"- round {f.round}, {f.workload} ({f.phase}) on {f.target}: {f.error}"
            for f in failures
        ]
    return "\n".join(lines) + "\n"


# -- files ----------------------------------------------------------------------------------


def write_results(
    out: Path,
    meta: dict,
    rows: list[Row],
    measurements: list[Measurement],
    failures: list[Failure],
    text: str,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    summary = {r.label: {t: asdict(c) for t, c in r.cells.items()} for r in rows}
    data = {
        "meta": meta,
        "summary": summary,
        "measurements": [asdict(m) for m in measurements],
        "failures": [asdict(f) for f in failures],
    }
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")


def plot(rows: list[Row], targets: list[str], meta: dict, paths: list[Path]) -> None:
    """Grouped horizontal bars of the ratio to fuse-overlayfs (to native when fuse-overlayfs
    did not run), log scale, one colour per target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    base = "fuse-overlayfs" if "fuse-overlayfs" in targets else "native"
    others = [t for t in targets if t != base]
    rows = [r for r in rows if any(base in r.cells[t].ratios for t in others)]
    if not rows or not others:
        print("nothing to plot (need at least two targets)", file=sys.stderr)
        return
    height = 0.8 / len(others)
    values = [[r.cells[t].ratios.get(base, math.nan) for r in rows] for t in others]
    finite = [v for vs in values for v in vs if not math.isnan(v)]
    # Native's ratio on mutating workloads can be 1e-4: clip the axis so 0.1-10 stays readable.
    left = max(min(finite) / 1.3, 0.01)
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.12 * len(rows) * len(others) + 0.15 * len(rows)))
    for i, (t, vals) in enumerate(zip(others, values, strict=True)):
        ys = [k + i * height for k in range(len(rows))]
        ax.barh(ys, vals, height=height, label=t)
        for y, v in zip(ys, vals, strict=True):
            if not math.isnan(v):
                ax.text(
                    max(v, left) * 1.04,
                    y,
                    f"{v:.2g}" if v < 0.1 else f"{v:.2f}",
                    va="center",
                    fontsize=6,
                )
    ax.set_xlim(left=left, right=max(finite) * 2)
    ax.set_yticks(
        [k + 0.4 - height / 2 for k in range(len(rows))], [r.label for r in rows], fontsize=8
    )
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"time relative to {base} (log scale; below 1 = faster than {base})")
    m = meta["machine"]
    ax.set_title(
        f"unionfs benchmark {m['date']}: time / {base}, median of per-round ratios\n"
        f"{machine_line(m)}; {meta['tree_summary']}; {meta['rounds']} round(s)",
        fontsize=8,
    )
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="x", which="both", linewidth=0.3, alpha=0.5)
    fig.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        print(f"plot: {path}")
    plt.close(fig)


def rerender(results_dir: Path, plot_to: Path | None) -> str:
    """Rebuild results.md and the plot of an earlier run from its results.json (to restyle a
    plot or put it under docs/ without measuring again)."""
    data = json.loads((results_dir / "results.json").read_text())
    meta = data["meta"]
    measurements = [Measurement(**m) for m in data["measurements"]]
    failures = [Failure(**f) for f in data["failures"]]
    rows = summarize(measurements, failures, meta["targets"], meta["workloads"])
    text = markdown(meta, rows, meta["targets"], failures, meta["notes"])
    (results_dir / "results.md").write_text(text)
    plot(rows, meta["targets"], meta, [results_dir / "ratios.png", *filter(None, [plot_to])])
    return text
