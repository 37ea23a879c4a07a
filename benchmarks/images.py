"""Rootless image import: unionfs's layer store against ``umoci unpack --rootless``.

Run as root (it builds the Debian rootfs once, then runs both tools as the
unprivileged ``unionfs-test`` user)::

    python3 benchmarks/images.py [--compression gzip|none] [--rounds N] [--json]

The image is the tests' Debian bookworm minbase rootfs (tests/debian.py) made
into two layers (tests/test_debian_image.py).  A second image shares the
base layer and differs in the top one.  Measured, per tool: wall time of the
import/unpack of image 1, its disk use, and the extra disk use of image 2.
Disk use counts allocated blocks once per inode (``du`` semantics).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))

import debian  # noqa: E402
import test_debian_image as dimg  # noqa: E402

import support  # noqa: E402

USER = "unionfs-test"


def disk_use(root: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, n))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def timed(cmd: list[str], user: support.User) -> float:
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=support.as_user(user))
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {r.stderr.strip()[-500:]}")
    return dt


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compression", choices=("gzip", "none"), default="gzip")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp/unionfs-bench-images")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the tools run as the unprivileged user unionfs-test")
    if shutil.which("umoci") is None:
        raise SystemExit("umoci is not installed")
    rootfs, why = debian.rootfs()
    if rootfs is None:
        raise SystemExit(why)
    import pwd

    pw = pwd.getpwnam(USER)
    user = support.User(USER, pw.pw_uid, pw.pw_gid)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chmod(work, 0o755)
    images = []
    for i in (1, 2):
        dest = work / f"image{i}"
        extra = tarfile.TarInfo(f"etc/image{i}")
        dimg.make_image(rootfs, dest, args.compression, [(extra, b"")])
        images.append(dest)
    support.chown_tree(work, user.uid, user.gid)
    unionfs = [sys.executable, "-m", "unionfs.command", "image"]
    results: dict[str, dict[str, list[float]]] = {"unionfs": {}, "umoci": {}}
    for _ in range(args.rounds):
        scratch = Path(tempfile.mkdtemp(dir=work))
        os.chown(scratch, user.uid, user.gid)
        store = scratch / "store"
        drop_caches()
        t1 = timed([*unionfs, "--store", str(store), "import", "-q", str(images[0]), "a"], user)
        use1 = disk_use(store)
        timed([*unionfs, "--store", str(store), "import", "-q", str(images[1]), "b"], user)
        use2 = disk_use(store)
        r = results["unionfs"]
        r.setdefault("time", []).append(t1)
        r.setdefault("disk", []).append(use1)
        r.setdefault("second", []).append(use2 - use1)
        drop_caches()
        b1, b2 = scratch / "bundle1", scratch / "bundle2"
        umoci = ["umoci", "unpack", "--rootless", "--image"]
        t2 = timed([*umoci, f"{images[0]}:bookworm", str(b1)], user)
        timed([*umoci, f"{images[1]}:bookworm", str(b2)], user)
        u = results["umoci"]
        u.setdefault("time", []).append(t2)
        u.setdefault("disk", []).append(disk_use(b1))
        u.setdefault("second", []).append(disk_use(b2))
        shutil.rmtree(scratch)
    summary = {
        tool: {k: statistics.median(v) for k, v in vals.items()} for tool, vals in results.items()
    }
    if args.json:
        print(json.dumps({"compression": args.compression, "rounds": args.rounds, **summary}))
        return 0
    print(f"Debian bookworm minbase, 2 layers, {args.compression}, median of {args.rounds}")
    print("| tool | import of image 1 | its disk use | 2nd image sharing the base |")
    print("|---|---|---|---|")
    for tool, s in summary.items():
        print(
            f"| {tool} | {s['time']:.1f} s | {s['disk'] / 1e6:.0f} MB |"
            f" {s['second'] / 1e6:.1f} MB |"
        )
    ratio = summary["unionfs"]["time"] / summary["umoci"]["time"]
    print(f"unionfs/umoci import time: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
