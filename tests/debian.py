"""A real Debian root filesystem, built once per machine and reused.

``debootstrap --variant=minbase bookworm`` into
``/var/cache/unionfs-tests/debootstrap-bookworm`` (``UNIONFS_DEBIAN_ROOTFS``
moves it).  It is built into a temp dir beside it and renamed, under a lock,
so concurrent test runs build it once and never see half of one.  Returns
None with the reason when it cannot be had (no root, no debootstrap, no
network): the tests skip with that reason.

``python3 tests/debian.py`` builds it ahead of a test run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(
    os.environ.get("UNIONFS_DEBIAN_ROOTFS", "/var/cache/unionfs-tests/debootstrap-bookworm")
)
MIRROR = "http://deb.debian.org/debian"


def rootfs() -> tuple[Path | None, str]:
    """(the cached rootfs, "") or (None, why it cannot be made)."""
    if (CACHE / "etc/debian_version").exists():
        return CACHE, ""
    if os.geteuid() != 0:
        return None, "building the Debian rootfs needs root"
    if shutil.which("debootstrap") is None:
        return None, "debootstrap is not installed"
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE.parent / f".{CACHE.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (CACHE / "etc/debian_version").exists():
            return CACHE, ""
        work = Path(tempfile.mkdtemp(prefix=f".{CACHE.name}-", dir=CACHE.parent))
        try:
            r = subprocess.run(
                ["debootstrap", "--variant=minbase", "bookworm", str(work / "root"), MIRROR],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
                return None, f"debootstrap failed: {tail[0]}"
            # apt's caches are not part of the image and only cost time.
            shutil.rmtree(work / "root/var/cache/apt/archives", ignore_errors=True)
            os.rename(work / "root", CACHE)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"debootstrap failed: {e}"
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return CACHE, ""


if __name__ == "__main__":
    path, why = rootfs()
    print(path or why)
