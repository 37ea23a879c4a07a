"""What a sandbox's review and commit decide, apart from reading and writing trees:

- which changes the ignore patterns hide (gitignore syntax, through
  ``pathspec``, with defaults for caches; counted as "N ignored");
- which changes a selection keeps (exact paths, or globs matched against the
  whole path, never substrings; a selected directory brings its contents, and
  every selected entry brings the new directories it needs);
- which changes conflict with the live tree: its object is no longer the one
  the sandbox replaced (the identity recorded at copy-up or whiteout,
  unionfs/identity.py), or a name the sandbox created appeared outside.

Paths are merged paths relative to the sandboxed root, ``/``-separated.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat as stat_mod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from ..identity import Identity

ADDED, CHANGED, DELETED, METADATA = "A", "C", "D", "M"

#: Hidden from reviews and commits unless the user's ignore file says otherwise
#: (a ``!pattern`` line brings one back).  Narrow on purpose: caches that are
#: rebuilt by the program that made them, and editor droppings.
DEFAULT_IGNORES = (
    ".cache/",
    "__pycache__/",
    "*.py[co]",
    ".*.sw[po]",
    "*~",
    ".local/share/Trash/",
    ".thumbnails/",
    ".npm/_cacache/",
    ".bash_history",
    ".python_history",
    ".sqlite_history",
    ".lesshst",
    ".viminfo",
)


@dataclass(frozen=True)
class Change:
    """One entry of a review: ``kind`` is A, C, D or M (metadata only)."""

    path: str
    kind: str
    is_dir: bool = False


# --------------------------------------------------------------------------- ignore


class Ignore:
    """gitignore-syntax patterns, relative to the sandboxed root."""

    def __init__(self, lines: Iterable[str] = DEFAULT_IGNORES) -> None:
        import pathspec

        self.spec = pathspec.GitIgnoreSpec.from_lines(list(lines))

    @classmethod
    def from_files(cls, *files: str | os.PathLike[str], defaults: bool = True) -> Ignore:
        lines = list(DEFAULT_IGNORES) if defaults else []
        for f in files:
            with (
                contextlib.suppress(FileNotFoundError),
                open(f, encoding="utf-8", errors="surrogateescape") as fh,
            ):
                lines.extend(fh.read().splitlines())
        return cls(lines)

    def matches(self, change: Change) -> bool:
        return bool(self.spec.match_file(change.path + ("/" if change.is_dir else "")))

    def split(self, changes: Iterable[Change]) -> tuple[list[Change], int]:
        """(the changes kept, how many were ignored)."""
        kept, n = [], 0
        for c in changes:
            if self.matches(c):
                n += 1
            else:
                kept.append(c)
        return kept, n


# --------------------------------------------------------------------------- select


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over whole ``/``-separated paths: ``*`` and ``?`` stay within one
    component, ``**`` spans any number of them, ``[...]`` as fnmatch's."""
    parts = pattern.strip("/").split("/")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        out.append(_component_regex(part) + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z", re.S)


def _component_regex(part: str) -> str:
    """One path component's glob as a regex that never matches a ``/``."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif (
            c == "["
            and (end := part.find("]", i + 2 if part[i + 1 : i + 2] in "!^" else i + 1)) > 0
        ):
            body = part[i + 1 : end]
            neg = body[:1] in ("!", "^")
            body = body[1:] if neg else body
            out.append("[" + ("^/" if neg else "") + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _parents(path: str) -> Iterator[str]:
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


def normalize_selection(patterns: Iterable[str], root: str, cwd: str) -> list[str]:
    """Selection arguments as paths relative to ``root``: absolute ones must lie
    under it, relative ones are taken from ``cwd`` like a shell would when it is
    inside the root, else from the root; ``..`` may not climb out."""
    out = []
    inside = cwd == root or cwd.startswith(root.rstrip("/") + "/")
    for p in patterns:
        absolute = p if p.startswith("/") else os.path.join(cwd if inside else root, p)
        norm = os.path.normpath(absolute)
        if norm != root and not norm.startswith(root.rstrip("/") + "/"):
            raise ValueError(f"{p!r} is not inside the sandboxed {root!r}")
        rel = os.path.relpath(norm, root)
        out.append("" if rel == "." else rel)
    return out


def select(changes: list[Change], patterns: list[str]) -> list[Change]:
    """The changes the patterns pick, with what they need, in the input order.

    A pattern picks a change when it equals the change's path or (a glob)
    matches it whole, or when it picks one of the change's parent directories
    (a directory brings its contents).  Every picked change also brings the
    changes of its parents that made or replaced them (A, C): a file in a new
    directory cannot be committed without that directory.
    """
    if not patterns or "" in patterns:
        return list(changes)
    exact = {p for p in patterns if not _is_glob(p)}
    globs = [glob_regex(p) for p in patterns if _is_glob(p)]

    def picked(path: str) -> bool:
        for candidate in (path, *_parents(path)):
            if candidate in exact or any(g.match(candidate) for g in globs):
                return True
        return False

    by_path = {c.path: c for c in changes}
    keep: set[str] = set()
    for c in changes:
        if picked(c.path):
            keep.add(c.path)
            for parent in _parents(c.path):
                pc = by_path.get(parent)
                if pc is not None and pc.kind in (ADDED, CHANGED):
                    keep.add(parent)
    return [c for c in changes if c.path in keep]


# --------------------------------------------------------------------------- conflicts


def lstat_under(root_fd: int, path: str) -> os.stat_result | None:
    """lstat of ``path`` below ``root_fd`` without following any symlink on the
    way (a symlink where a directory was is "not that object"); None if absent."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return os.stat(root_fd)
    fd = root_fd
    opened = []
    try:
        for part in parts[:-1]:
            try:
                fd = os.open(
                    part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                raise
            opened.append(fd)
        try:
            return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
    finally:
        for f in opened:
            os.close(f)


class LiveTree:
    """``lstat_under`` for many paths of one tree: each directory is opened once
    (O_PATH, O_NOFOLLOW, one component at a time) and kept, instead of every
    component of every path opened again (10,000 files of one directory cost
    10,000 opens of it).  For one look at the tree: a directory renamed
    afterwards is not seen again."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._fds: dict[str, int | None] = {"": root_fd}

    def close(self) -> None:
        for path, fd in self._fds.items():
            if path and fd is not None:
                os.close(fd)
        self._fds = {"": self.root_fd}

    def __enter__(self) -> LiveTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dir(self, path: str) -> int | None:
        if path in self._fds:
            return self._fds[path]
        parent, _, name = path.rpartition("/")
        pfd = self._dir(parent)
        fd = None
        if pfd is not None:
            try:
                fd = os.open(
                    name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
                )
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
        self._fds[path] = fd
        return fd

    def lstat(self, path: str) -> os.stat_result | None:
        """As ``lstat_under(root_fd, path)``."""
        path = "/".join(p for p in path.split("/") if p)
        if not path:
            return os.stat(self.root_fd)
        parent, _, name = path.rpartition("/")
        pfd = self._dir(parent)
        if pfd is None:
            return None
        try:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None


def _live_entries(live: LiveTree, path: str) -> Iterator[str]:
    """Every path below directory ``path`` in the live tree (no symlink followed)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=live.root_fd)
    except OSError:
        return
    try:
        names = os.listdir(fd)
    finally:
        os.close(fd)
    for name in names:
        child = f"{path}/{name}" if path else name
        yield child
        st = live.lstat(child)
        if st is not None and stat_mod.S_ISDIR(st.st_mode):
            yield from _live_entries(live, child)


def conflict_reason(change: Change, records: dict[str, Identity], live: LiveTree) -> str | None:
    """Why committing ``change`` would overwrite something changed outside, or None."""
    st = live.lstat(change.path)
    rec = records.get(change.path)
    if rec is None:
        if st is None:
            return None
        if change.kind == ADDED and change.is_dir and stat_mod.S_ISDIR(st.st_mode):
            return None  # both made the directory: their contents are checked one by one
        if change.kind == ADDED:
            return "created outside meanwhile"
        return "changed outside (no record of what the sandbox replaced)"
    if not rec.same_object(st):
        return "deleted outside meanwhile" if st is None else "changed outside meanwhile"
    if change.kind == DELETED and change.is_dir:
        for sub in _live_entries(live, change.path):
            sub_rec = records.get(sub)
            if sub_rec is None or not sub_rec.same_object(live.lstat(sub)):
                return f"{sub} changed outside meanwhile"
    return None


def conflicts(
    changes: Iterable[Change], records: dict[str, Identity], root_fd: int
) -> dict[str, str]:
    """path -> reason, for each change that conflicts with the live tree."""
    out = {}
    with LiveTree(root_fd) as live:
        for c in changes:
            why = conflict_reason(c, records, live)
            if why is not None:
                out[c.path] = why
    return out
