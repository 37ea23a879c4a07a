"""``unionfs stats MNT``: the counters of a running mount move with the requests made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unionfs import stats

import support


def unionfs_cmd(*args: str, user: support.User | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unionfs.command", *args],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=support.as_user(user) if user is not None else None,
    )


def counts(mnt: Path) -> dict:
    return stats.query(str(mnt))


def n(s: dict, request: str) -> int:
    return s["requests"].get(request, {}).get("count", 0)


@pytest.fixture
def lower(tmp: Path) -> Path:
    low = tmp / "lower"
    (low / "d").mkdir(parents=True)
    for i in range(5):
        (low / "d" / f"f{i}").write_bytes(b"x" * (100 + i))
    os.chmod(low, 0o755)
    (tmp / "upper").mkdir()
    return low


def test_counts_grow_by_the_requests_a_program_makes(unionfs, tmp, lower):
    m = unionfs([lower], tmp / "upper", opts=["nodircache"])
    before = counts(m.mnt)
    # One new name, opened and read: one LOOKUP of d, one of f0, one OPEN, a READ.
    fd = os.open(m.mnt / "d" / "f0", os.O_RDONLY)
    assert os.read(fd, 4096) == b"x" * 100
    os.close(fd)
    after = counts(m.mnt)
    assert n(after, "lookup") == n(before, "lookup") + 2
    assert n(after, "open") == n(before, "open") + 1
    assert n(after, "read") >= n(before, "read") + 1
    # the query is itself a request, counted by the next one
    assert n(after, "getxattr") > n(before, "getxattr")
    assert after["rss_bytes"] > 1 << 20 and after["pid"] != os.getpid()
    for r in after["requests"].values():
        assert sum(r["buckets"].values()) == r["count"]
        assert r["p50_ns"] <= r["p90_ns"] <= r["p99_ns"] <= r["max_ns"]


def test_listing_and_copy_up_counters(unionfs, tmp, lower):
    m = unionfs([lower], tmp / "upper", opts=["nodircache"])
    before = counts(m.mnt)
    assert sorted(os.listdir(m.mnt / "d")) == [f"f{i}" for i in range(5)]
    assert len(os.listdir(m.mnt / "d")) == 5  # the merged listing cached on the node
    with open(m.mnt / "d" / "f3", "ab") as f:
        f.write(b"!")
    after = counts(m.mnt)
    hits = after["caches"]["listings"]["hits"] - before["caches"]["listings"]["hits"]
    misses = after["caches"]["listings"]["misses"] - before["caches"]["listings"]["misses"]
    assert (hits, misses) == (1, 1)
    cu = after["copyups"]
    assert cu["count"] - before["copyups"]["count"] == 1
    assert cu["bytes"] - before["copyups"]["bytes"] == 103  # the lower file's size
    assert cu["ns"] > before["copyups"]["ns"]
    assert after["caches"]["dir_fds"]["hits"] + after["caches"]["dir_fds"]["misses"] > 0


def test_the_command_prints_a_table_and_json(unionfs, tmp, lower):
    m = unionfs([lower], tmp / "upper")
    os.stat(m.mnt / "d" / "f1")
    r = unionfs_cmd("stats", str(m.mnt))
    assert r.returncode == 0, r.stderr
    assert "lookup" in r.stdout and "hit rate" in r.stdout and "RSS" in r.stdout
    r = unionfs_cmd("stats", "--json", str(m.mnt))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["requests"]["lookup"]["count"] >= 2
    assert set(data["caches"]) == {"entries", "xattr_names", "listings", "dir_fds"}


def test_not_a_mount_root_is_a_one_line_error(unionfs, tmp, lower):
    m = unionfs([lower], tmp / "upper")
    for path in (tmp, m.mnt / "d", tmp / "missing"):
        r = unionfs_cmd("stats", str(path))
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("unionfs stats: "), r.stderr
        assert r.stdout == ""


def test_only_the_mounting_user_reads_them(unionfs, tmp, lower, unpriv_user):
    m = unionfs([lower], tmp / "upper", opts=["allow_other"])
    with pytest.raises(AssertionError, match="PermissionError"):
        support.run_as(unpriv_user, os.getxattr, str(m.mnt), stats.XATTR)
    assert counts(m.mnt)["requests"]  # root, the mounting user, still can
    # and the name never shows up among the root's xattrs
    assert os.fsencode(stats.XATTR) not in map(os.fsencode, os.listxattr(m.mnt))


def test_percentile_of_log2_buckets():
    buckets = {10: 50, 12: 40, 20: 10}
    assert stats.percentile(buckets, 50) == 1 << 10
    assert stats.percentile(buckets, 90) == 1 << 12
    assert stats.percentile(buckets, 99) == 1 << 20
