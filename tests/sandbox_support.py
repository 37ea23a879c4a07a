"""Running ``unionfs sandbox`` as the unprivileged test user over a scratch home."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import support
from support import User


def unionfs_tool() -> list[str]:
    here = os.path.dirname(sys.executable)
    exe = shutil.which("unionfs", path=here)
    return [exe] if exe else [sys.executable, "-m", "unionfs.command"]


@dataclass
class Home:
    """A scratch home owned by the test user, with its runtime dir beside it."""

    user: User
    path: Path
    runtime: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.path),
            "XDG_RUNTIME_DIR": str(self.runtime),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "GIT_CONFIG_NOSYSTEM": "1",
        }

    def state(self, name: str = "default") -> Path:
        return self.path / ".local/state/unionfs/sandboxes" / name

    def upper(self, name: str = "default", i: int = 0) -> Path:
        return self.state(name) / "roots" / str(i) / "upper"

    def unionfs(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """``unionfs ARGS`` as the user, in the home; output captured."""
        kw.setdefault("cwd", self.path)
        kw.setdefault("timeout", 120)
        return subprocess.run(
            [*unionfs_tool(), *args],
            env={**self.env, **kw.pop("env", {})},
            preexec_fn=support.as_user(self.user),
            capture_output=True,
            text=True,
            **kw,
        )

    def sandbox(
        self, *cmd: str, opts: tuple[str, ...] = (), **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """``unionfs sandbox run OPTS -- CMD`` as the user."""
        return self.unionfs("sandbox", "run", *opts, "--", *cmd, **kw)

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*unionfs_tool(), *args],
            env=self.env,
            cwd=self.path,
            preexec_fn=support.as_user(self.user),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kw,
        )

    def direct(self, *cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """The same command run directly (no sandbox), for comparison."""
        return subprocess.run(
            list(cmd),
            env=self.env,
            cwd=cwd or self.path,
            preexec_fn=support.as_user(self.user),
            capture_output=True,
            text=True,
            timeout=120,
        )


def make_home(base: Path, user: User) -> Home:
    home = base / "home"
    runtime = base / "run"
    home.mkdir()
    runtime.mkdir(mode=0o700)
    for p in (home, runtime):
        os.chown(p, user.uid, user.gid)
    os.chmod(home, 0o755)
    return Home(user, home, runtime)


def fuse_mounts_of(home: Home) -> list[str]:
    """fuse.unionfs mounts of the home's user below the home's scratch dir
    (its runtime dir, where views are mounted, included)."""
    out = []
    base = str(home.path.parent) + "/"
    for m in support.mounts():
        if (
            m.fstype == "fuse.unionfs"
            and f"user_id={home.user.uid}," in m.options
            and m.mountpoint.startswith(base)
        ):
            out.append(m.mountpoint)
    return out
