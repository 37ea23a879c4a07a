"""``unionfs sandbox diff`` and ``commit``: the review and the keep, on the layer tools.

The changes come from issue 13's ``unionfs.changes.scan`` (the upper read
alone, against the live tree as its lower) and are written by its ``apply``
(each file built aside and renamed into place, directory metadata, hard
links, symlinks, removals; journaled in the sandbox's state directory, so a
commit killed midway is resumed by the next ``commit``).  This module adds
what only a sandbox knows: the ignore patterns, the selection, and the
conflicts with what others changed in the live tree meanwhile
(sandbox/review.py, with the identities the daemon recorded).

After a commit, the identities of what it wrote replace the recorded ones:
the live tree now holds the sandbox's version, so a later commit conflicts
only with what changes after this one.
"""

from __future__ import annotations

import json
import os
import stat as stat_mod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import identity
from ..changes import scan as scanmod
from ..changes.apply import ApplyError, apply
from . import review, state


class KeepError(Exception):
    """A one-line error of diff or commit."""


def ignore_for(sb: state.Sandbox) -> review.Ignore:
    """Defaults, then the user's ``~/.config/unionfs/sandbox-ignore``, then the
    sandbox's own ``ignore`` file (gitignore syntax; later lines win)."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return review.Ignore.from_files(
        os.path.join(config, "unionfs", "sandbox-ignore"), sb.path / "ignore"
    )


def review_change(c: scanmod.Change) -> review.Change:
    """A scanned change as the review sees it: M for metadata only."""
    path = "/".join(os.fsdecode(p) for p in c.path)
    kind = review.METADATA if c.metadata_only else c.kind.value
    st = c.st if c.st is not None else c.lower
    is_dir = st is not None and stat_mod.S_ISDIR(st.st_mode)
    return review.Change(path, kind, is_dir)


@dataclass
class RootReview:
    """The review of one sandboxed root."""

    root: str
    upper: Path
    changes: list[scanmod.Change]  # shown ones (not ignored, not SAME), scan order
    ignored: int
    conflicts: dict[str, str] = field(default_factory=dict)
    #: The whole scan (SAME entries and ignored ones included): what commit applies
    #: from, so that the upper is scanned once.
    scanned: list[scanmod.Change] = field(default_factory=list)
    #: ``review_change`` of each of ``changes``, in the same order.
    reviewed: list[review.Change] = field(default_factory=list)


def review_root(sb: state.Sandbox, i: int, ignore: review.Ignore) -> RootReview:
    root = sb.roots[i]
    try:
        changes = scanmod.scan(str(sb.upper(i)), [root])
    except scanmod.ScanError as e:
        raise KeepError(str(e)) from None
    shown, reviewed, ignored = [], [], 0
    for c in changes:
        if c.kind is scanmod.Kind.SAME:
            continue
        rc = review_change(c)
        if ignore.matches(rc):
            ignored += 1
            continue
        shown.append(c)
        reviewed.append(rc)
    records = identity.load(sb.work(i))
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        conflicts = review.conflicts(reviewed, records, fd)
    finally:
        os.close(fd)
    return RootReview(root, sb.upper(i), shown, ignored, conflicts, changes, reviewed)


def _abs(root: str, c: scanmod.Change) -> str:
    rel = b"/".join(c.path).decode("utf-8", "backslashreplace")
    return root.rstrip("/") + "/" + rel


def diff_lines(r: RootReview) -> list[str]:
    from ..changes.diff import line

    out = []
    for c in r.changes:
        text = line(c).split(" ", 1)[1]  # the marks after the path
        text = _abs(r.root, c) + text[len(c.display()) :]
        why = r.conflicts.get(review_change(c).path)
        out.append(f"{c.kind.value} {text}" + (f"  CONFLICT: {why}" if why else ""))
    return out


def diff_json(name: str, reviews: list[RootReview]) -> dict[str, Any]:
    from ..changes.diff import as_json

    roots = []
    for r in reviews:
        items = []
        for c in r.changes:
            doc = as_json(c)
            doc["path"] = _abs(r.root, c)
            doc["conflict"] = r.conflicts.get(review_change(c).path)
            items.append(doc)
        roots.append({"root": r.root, "changes": items, "ignored": r.ignored})
    return {"sandbox": name, "roots": roots}


def content(r: RootReview) -> str:
    from ..changes.diff import content_diffs
    from ..changes.source import Source

    return "".join(content_diffs(Source(str(r.upper), None, (r.root,)), r.changes))


@dataclass
class CommitResult:
    root: str
    done: list[str]  # absolute paths written or removed
    skipped: dict[str, str]  # absolute path -> why
    ignored: int


def commit_root(
    sb: state.Sandbox,
    i: int,
    patterns: list[str] | None,
    force: bool,
    dry_run: bool,
    ignore: review.Ignore,
) -> CommitResult:
    """Apply the selected, not ignored, non-conflicting changes of root ``i``."""
    root = sb.roots[i]
    r = review_root(sb, i, ignore)
    chosen = review.select(r.reviewed, patterns or [])
    selected = {tuple(os.fsencode(p) for p in c.path.split("/")) for c in chosen}
    skipped: dict[str, str] = {}
    # The conflicts by scanned path: the check below runs once per planned change.
    by_path = {
        c.path: r.conflicts[rc.path]
        for c, rc in zip(r.changes, r.reviewed, strict=True)
        if rc.path in r.conflicts
    }

    def check(c: scanmod.Change, _live: os.stat_result | None) -> bool:
        why = by_path.get(c.path)
        if why is None or force:
            return True
        skipped[_abs(root, c)] = why
        return False

    try:
        actions = apply(
            str(sb.upper(i)),
            [root],
            root,
            select=lambda p: p in selected,
            conflict_check=check,
            changes=r.scanned,
            journal_dir=str(sb.path / f"journal.{i}"),
            dry_run=dry_run,
            # Apply's group commit: files built aside, one syncfs, then renamed into
            # place; one more syncfs at the end.  A crash never leaves a renamed
            # file whose data is not on disk, and the commit is durable when done.
            durable=True,
        )
    except (ApplyError, scanmod.ScanError) as e:
        raise KeepError(str(e)) from None
    done = [root.rstrip("/") + a.path for a in actions if a.skipped is None and a.op != "skip"]
    if not dry_run:
        _refresh_identities(sb, i, root, actions)
    return CommitResult(root, sorted(set(done)), skipped, r.ignored)


def _refresh_identities(sb: state.Sandbox, i: int, root: str, actions: list[Any]) -> None:
    """Record what the live tree holds now at every committed path (atomic rewrite)."""
    records = identity.load(sb.work(i))
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with review.LiveTree(fd) as live:
            for a in actions:
                if a.skipped is not None or a.op == "skip":
                    continue
                path = a.path.strip("/")
                st = live.lstat(path)
                if st is None:
                    records.pop(path, None)
                else:
                    records[path] = identity.Identity.of(st)
    finally:
        os.close(fd)
    lines = []
    for path, ident in records.items():
        lines.append(json.dumps({"path": path, **ident.__dict__}, separators=(",", ":")))
    target = Path(sb.work(i)) / identity.FILE
    tmp = target.with_name(identity.FILE + ".new")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
