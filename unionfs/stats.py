"""``unionfs stats MNT``: what a running mount has done, and the counters behind it.

The daemon counts as it serves, cheaply enough to stay on (docs/performance.md
gives the measured cost):

- every request, by type, into a histogram of its latency: 64 log2 buckets of
  nanoseconds (bucket ``b`` holds latencies in ``[2**(b-1), 2**b)``), counted
  in one place, ``operations._guard``: a clock read and a list increment
  (READs the C session helper answers are counted there, the same way, and
  merged in; see unionfs/_dircache.c);
- hits and misses of the daemon's caches: entries (a name the kernel asks for
  again, ``InodeTable.cached_child``), xattr names of a node, merged directory
  listings, and directory descriptors (``LayerStack.dirfd``), each an increment
  of a ``[hits, misses]`` list of ``Counters.caches`` where the cache is used;
- copy-ups of non-directories: how many, their bytes and their time.

The numbers travel as JSON in a private xattr of the mount root: ``getxattr``
of ``XATTR`` on the root answers them, to the mounting user (and root) only.
A private name (``user.overlay.*``) can never be a user's xattr in the merged
view, so it cannot shadow one.  No control file shows up in listings, and
the query is one request.

This module is imported by the daemon (counters) and by the ``stats``
subcommand (the client), which must not import pyfuse3 or trio.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

#: The xattr of the mount root that answers the counters as JSON.
XATTR = b"user.overlay.unionfs.stats"
#: Log2 buckets of nanoseconds: bucket 63 would be 146 years.
BUCKETS = 64
#: Percentiles the client prints.
PERCENTILES = (50, 90, 99)


class Counters:
    """The counts of one daemon (one mount per process): requests and caches."""

    def __init__(self) -> None:
        self.started = time.time()
        #: request type -> latency buckets; made when a handler is wrapped, so that
        #: the hot path is an index into a list it already holds.
        self.requests: dict[str, list[int]] = {}
        #: cache name -> [hits, misses]
        self.caches: dict[str, list[int]] = {
            name: [0, 0] for name in ("entries", "xattr_names", "listings", "dir_fds")
        }
        self.copyups = {"count": 0, "bytes": 0, "ns": 0}
        #: request type -> buckets counted elsewhere (the C session helper's READs).
        self.sources: dict[str, Callable[[], list[int]]] = {}
        #: What the C session helper did beyond answering requests (its bursts,
        #: its worker threads' reads), by name: a function that counts it.
        self.helper: dict[str, Callable[[], int]] = {}

    def buckets(self, request: str) -> list[int]:
        return self.requests.setdefault(request, [0] * BUCKETS)

    def add_source(self, request: str, source: Callable[[], list[int]]) -> None:
        """Count the requests of a type that ``source`` reports, with the handler's own."""
        self.sources[request] = source

    def merged(self) -> dict[str, list[int]]:
        """Every request type's buckets: the handlers' plus the other sources'."""
        out = {name: list(b) for name, b in self.requests.items()}
        for name, source in self.sources.items():
            mine = out.setdefault(name, [0] * BUCKETS)
            for b, n in enumerate(source()[:BUCKETS]):
                mine[b] += n
        return out

    def cache(self, name: str) -> list[int]:
        return self.caches[name]


#: The daemon's counters (handlers are wrapped at class definition).
COUNTERS = Counters()


def instrument(table: Any, stack: Any, copyup: Any | None) -> None:
    """Count the hits of the inode table's and layer stack's caches, and copy-ups.

    The table and the stack count hits and misses into lists they hold; this
    gives them the daemon's.  Copy-ups are counted by a wrapper on the
    instance (rare and long: the wrapper costs nothing there).
    """
    # The table and the stack count into these lists themselves (an increment
    # where a wrapper cost 0.1-0.4 us a call).
    table.child_counts = COUNTERS.cache("entries")
    stack.fd_counts = COUNTERS.cache("dir_fds")

    if copyup is not None:
        copyup.copy_up = _counted_copy_up(copyup.copy_up, copyup)


def _counted_copy_up(copy_up: Callable[..., Any], copyup: Any) -> Callable[..., Any]:
    """Count a copy-up that brought a non-directory into the upper, and its time;
    the copier adds the bytes it copied to the same totals."""
    totals = COUNTERS.copyups
    copyup.totals = totals

    @functools.wraps(copy_up)
    async def counted(node: Any, with_data: bool = True, meta_only: bool = False) -> Any:
        if node.is_dir or (node.layer == 0 and not node.metacopy):
            return await copy_up(node, with_data, meta_only)
        start = time.perf_counter_ns()
        result = await copy_up(node, with_data, meta_only)
        totals["ns"] += time.perf_counter_ns() - start
        totals["count"] += 1
        return result

    return counted


def _rss_bytes() -> int:
    """The daemon's resident memory, from /proc/self/statm."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def snapshot(
    sizes: dict[str, int] | None = None, branches: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The counters as plain data: what the xattr carries (non-zero buckets only).

    ``branches`` (absolute upper, work dir and lowers) lets the layer tools find
    a mount's upper from its mount point, whatever paths its command line had.
    """
    c = COUNTERS
    return {
        "branches": branches,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - c.started, 3),
        "rss_bytes": _rss_bytes(),
        "requests": {
            name: {str(b): n for b, n in enumerate(buckets) if n}
            for name, buckets in sorted(c.merged().items())
            if any(buckets)
        },
        "caches": {name: {"hits": h, "misses": m} for name, (h, m) in c.caches.items()},
        "copyups": dict(c.copyups),
        "held": dict(sizes or {}),
        # Of the requests above, how many the C session helper answered.
        "in_c": {name: sum(source()) for name, source in sorted(c.sources.items())},
        "helper": {name: count() for name, count in c.helper.items()},
    }


def encode(sizes: dict[str, int] | None = None, branches: dict[str, Any] | None = None) -> bytes:
    return json.dumps(snapshot(sizes, branches), separators=(",", ":")).encode()


# -- the client -------------------------------------------------------------------------------


def percentile(buckets: dict[int, int], q: float) -> int:
    """The upper bound (ns) of the bucket holding the ``q``-th percentile."""
    total = sum(buckets.values())
    rank = q / 100 * total
    seen = 0
    for b in sorted(buckets):
        seen += buckets[b]
        if seen >= rank:
            return 1 << b
    return 1 << max(buckets)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """The xattr's data with counts, percentiles and hit rates worked out (``--json``)."""
    requests = {}
    for name, str_buckets in raw["requests"].items():
        buckets = {int(b): n for b, n in str_buckets.items()}
        requests[name] = {
            "count": sum(buckets.values()),
            **{f"p{q}_ns": percentile(buckets, q) for q in PERCENTILES},
            "max_ns": 1 << max(buckets),
            "buckets": {str(b): n for b, n in sorted(buckets.items())},
        }
    caches = {}
    for name, hm in raw["caches"].items():
        total = hm["hits"] + hm["misses"]
        caches[name] = {**hm, "hit_rate": round(hm["hits"] / total, 4) if total else None}
    return {**raw, "requests": requests, "caches": caches}


def _us(ns: int) -> str:
    return f"{ns / 1000:.0f}" if ns >= 10_000 else f"{ns / 1000:.1f}"


def render(s: dict[str, Any]) -> str:
    """The human table: requests, caches, copy-ups, memory."""
    lines = [
        f"daemon pid {s['pid']}, up {s['uptime_s']:.0f} s, RSS {s['rss_bytes'] / 2**20:.1f} MiB",
        "",
        f"{'request':<12} {'count':>10} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'max us':>9}",
    ]
    rows = sorted(s["requests"].items(), key=lambda kv: -kv[1]["count"])
    for name, r in rows:
        lines.append(
            f"{name:<12} {r['count']:>10} {_us(r['p50_ns']):>9} {_us(r['p90_ns']):>9}"
            f" {_us(r['p99_ns']):>9} {_us(r['max_ns']):>9}"
        )
    lines += ["", f"{'cache':<12} {'hits':>10} {'misses':>10} {'hit rate':>9}"]
    for name, c in s["caches"].items():
        rate = "-" if c["hit_rate"] is None else f"{100 * c['hit_rate']:.1f} %"
        lines.append(f"{name:<12} {c['hits']:>10} {c['misses']:>10} {rate:>9}")
    cu = s["copyups"]
    lines += [
        "",
        f"copy-ups: {cu['count']}, {cu['bytes'] / 2**20:.1f} MiB, {cu['ns'] / 1e9:.3f} s",
    ]
    if s.get("held"):
        lines.append("held: " + ", ".join(f"{k} {v}" for k, v in s["held"].items()))
    if s.get("in_c"):
        lines.append("answered in C: " + ", ".join(f"{k} {v}" for k, v in s["in_c"].items()))
    if s.get("helper"):
        lines.append("C helper: " + ", ".join(f"{k} {v}" for k, v in s["helper"].items()))
    lines.append("(latency: upper bound of a log2 bucket, from the daemon's view)")
    return "\n".join(lines)


def query(mnt: str) -> dict[str, Any]:
    """The counters of the unionfs mounted at ``mnt``; OSError with a clear message if none."""
    try:
        raw = os.getxattr(mnt, XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise OSError(e.errno, f"{mnt} is not the root of a unionfs mount") from None
        raise OSError(e.errno, f"{mnt}: {e.strerror}") from None
    return summarize(json.loads(raw))


def main(prog: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Requests, latencies, cache hit rates, copy-ups and memory of a mount.",
    )
    parser.add_argument("mountpoint", metavar="MNT", help="the root of a running unionfs mount")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        s = query(args.mountpoint)
    except OSError as e:
        print(f"{prog}: {e.strerror}", file=sys.stderr)
        return 1
    except ValueError:
        print(f"{prog}: {args.mountpoint}: the daemon answered no valid JSON", file=sys.stderr)
        return 1
    print(json.dumps(s, indent=1) if args.json else render(s))
    return 0
