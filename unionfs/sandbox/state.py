"""Where a sandbox keeps what its program changed, and who is using it.

``$XDG_STATE_HOME/unionfs/sandboxes/NAME/`` (``~/.local/state/...`` by
default; ``UNIONFS_SANDBOX_DIR`` moves the whole set) holds:

- ``sandbox.json``: the sandboxed roots, in order, and when it was made;
- ``roots/I/upper`` and ``roots/I/work``: the upper and work dir of root I
  (a kernel-format upper: review and commit read it when nothing runs);
- ``lock``: flock'ed by the runner and by every daemon serving a view, so
  that ``commit``/``discard`` never touch an upper that is still written.

The state directory usually lies inside the sandboxed ``$HOME``: the runner
covers it inside the sandbox, so the program never sees or changes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class StateError(Exception):
    """A one-line error about a sandbox's state."""


def state_root() -> Path:
    """The directory holding every sandbox of this user."""
    env = os.environ.get("UNIONFS_SANDBOX_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local/state")
    return Path(base) / "unionfs" / "sandboxes"


def check_name(name: str) -> str:
    """A name is one path component of letters, digits, ``.``, ``_`` and ``-``."""
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise StateError(f"bad sandbox name {name!r} (letters, digits, '.', '_', '-'; 64 at most)")
    return name


@dataclass
class Sandbox:
    """One sandbox's directory and recorded roots."""

    name: str
    path: Path
    roots: list[str]
    created: float

    def upper(self, i: int) -> Path:
        return self.path / "roots" / str(i) / "upper"

    def work(self, i: int) -> Path:
        return self.path / "roots" / str(i) / "work"

    def lock(self, wait: bool = False) -> int:
        """flock the sandbox; the descriptor (close-on-exec, inheritable by fork).

        Raises StateError when another run or daemon still holds it.
        """
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise StateError(
                f"sandbox {self.name!r} is in use (a program still runs in it)"
            ) from None
        return fd

    def in_use(self) -> bool:
        try:
            fd = self.lock()
        except StateError:
            return True
        os.close(fd)
        return False


def _meta_path(path: Path) -> Path:
    return path / "sandbox.json"


def load(name: str) -> Sandbox:
    """The existing sandbox ``name``; StateError when there is none."""
    path = state_root() / check_name(name)
    try:
        with open(_meta_path(path)) as f:
            meta = json.load(f)
        roots = [str(r) for r in meta["roots"]]
        created = float(meta.get("created", 0))
    except FileNotFoundError:
        raise StateError(f"no sandbox named {name!r}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StateError(f"sandbox {name!r}: unreadable {_meta_path(path)}: {e}") from None
    return Sandbox(name, path, roots, created)


def open_or_create(name: str, roots: list[str]) -> Sandbox:
    """The sandbox ``name`` over ``roots``, made if missing.

    An existing sandbox keeps its roots: asking for others is an error
    (its uppers describe changes to exactly those trees).
    """
    check_name(name)
    with contextlib.suppress(StateError):
        sb = load(name)
        if sb.roots != roots:
            raise StateError(
                f"sandbox {name!r} is over {', '.join(sb.roots)}, not {', '.join(roots)}"
                " (choose another --name, or discard it)"
            )
        return sb
    top = state_root()
    top.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = top / name
    tmp = top / f".{name}.new.{os.getpid()}"
    tmp.mkdir(mode=0o700)
    try:
        for i in range(len(roots)):
            (tmp / "roots" / str(i) / "upper").mkdir(parents=True, mode=0o700)
            (tmp / "roots" / str(i) / "work").mkdir(mode=0o700)
        created = time.time()
        with open(_meta_path(tmp), "w") as f:
            json.dump({"version": 1, "roots": roots, "created": created}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)  # all or nothing: a crash leaves only a .new dir for gc
    except FileExistsError:
        _remove_tree(tmp)
        return load(name)
    except BaseException:
        _remove_tree(tmp)
        raise
    return Sandbox(name, path, roots, created)


def all_sandboxes() -> list[Sandbox]:
    top = state_root()
    try:
        names = sorted(os.listdir(top))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.startswith("."):
            continue
        with contextlib.suppress(StateError):
            out.append(load(name))
    return out


def _remove_tree(path: Path) -> None:
    """Remove a tree made by the daemon (dirs may be mode 0 after a chmod in the sandbox)."""
    import shutil

    def fix(func: object, p: str, exc: object) -> None:
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
        with contextlib.suppress(OSError):
            os.chmod(p, 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)

    shutil.rmtree(path, onerror=fix)


def remove(sb: Sandbox) -> None:
    """Delete a sandbox that nothing uses: renamed aside first, so a crash midway
    leaves a ``.NAME.gone.*`` dir for gc, never a half sandbox under its name."""
    fd = sb.lock()
    try:
        aside = sb.path.parent / f".{sb.name}.gone.{os.getpid()}"
        os.rename(sb.path, aside)
    finally:
        os.close(fd)
    _remove_tree(aside)


def leftovers() -> list[Path]:
    """Half-made or half-removed sandbox dirs (``.NAME.new.PID``/``.NAME.gone.PID``)."""
    top = state_root()
    try:
        names = os.listdir(top)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = re.fullmatch(r"\..+\.(new|gone)\.(\d+)", name)
        if m and not _alive(int(m.group(2))):
            out.append(top / name)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftover(path: Path) -> None:
    _remove_tree(path)
