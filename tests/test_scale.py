"""Scale (opt-in): a huge lower is walked and the daemon's memory stays bounded.

Set UNIONFS_SCALE=N (e.g. 1000000) to run it with N files; it is skipped
otherwise, because generating the tree takes minutes.  The figures it prints
are recorded in docs/reliability.md.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from support import unionfs_mount
from test_cli import daemon_pids

N = int(os.environ.get("UNIONFS_SCALE", "0"))
pytestmark = pytest.mark.skipif(N <= 0, reason="set UNIONFS_SCALE=N to run")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _make_tree(root, n: int) -> None:
    per_dir = 1000
    for d in range(0, n, per_dir):
        sub = root / f"d{d // per_dir:05d}"
        sub.mkdir(parents=True)
        for i in range(min(per_dir, n - d)):
            (sub / f"f{i}").touch()


def _walk(path) -> tuple[int, float]:
    t0 = time.monotonic()
    out = subprocess.run(["find", str(path), "-type", "f"], capture_output=True, check=True)
    return out.stdout.count(b"\n"), time.monotonic() - t0


def test_walk_of_huge_lower_keeps_memory_bounded(tmp_path_factory):
    """Walk one half, let the kernel forget it, walk the other half.

    If forget were not honoured the daemon would hold both halves' nodes and
    its RSS would about double; Python keeps freed memory for reuse, so RSS
    after the second half stays near the first.
    """
    base = tmp_path_factory.mktemp("scale")
    lower, upper, mnt = base / "lower", base / "upper", base / "mnt"
    for d in (upper, mnt):
        d.mkdir()
    t0 = time.monotonic()
    _make_tree(lower / "a", N // 2)
    _make_tree(lower / "b", N - N // 2)
    print(f"\ngenerated {N} files in {time.monotonic() - t0:.0f} s")
    with unionfs_mount([lower], upper, mnt):
        (pid,) = daemon_pids(mnt)
        start = _rss_kib(pid)
        count_a, walk_a = _walk(mnt / "a")
        after_a = _rss_kib(pid)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")  # the kernel drops dentries and inodes: FORGETs follow
        time.sleep(1)
        count_b, walk_b = _walk(mnt / "b")
        after_b = _rss_kib(pid)
        print(
            f"find: {count_a + count_b} files in {walk_a + walk_b:.1f} s; daemon RSS "
            f"{start} KiB at start, {after_a} KiB after half the tree, {after_b} KiB after "
            f"the other half"
        )
    assert count_a + count_b == N
    grown_a = after_a - start
    assert after_b - start < 1.3 * grown_a + 16 * 1024, "forgotten nodes must be released"
