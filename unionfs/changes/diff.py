"""``unionfs diff UPPER|MNT``: what an upper changes, as ``docker diff`` prints it.

One line per change: ``A /path`` (added), ``C /path`` (changed), ``D /path``
(deleted); a change of metadata only is marked ``(metadata: mode, owner,
times, xattrs)``, a directory that hides its lower contents ``(opaque)``.
``--json`` gives the same as a list of objects; ``--content`` adds a unified
diff of each changed (or added) small text file against the lower file it
shadows.  Reads the upper and, per upper entry, one path of the lowers.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import stat as stat_mod
import sys
from collections.abc import Iterator

from ..layers import Entry, LayerStack
from .scan import Change, Kind, ScanError, scan
from .source import Source, SourceError, resolve

#: Files bigger than this are not shown by --content.
CONTENT_MAX = 256 * 1024


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every upper-reading command shares."""
    parser.add_argument("upper", metavar="UPPER|MNT", help="an upper directory or a mount point")
    parser.add_argument("--lower", metavar="L1:L2", help="the lowers, top-down (default: recorded)")
    parser.add_argument("--workdir", help="the mount's work dir (default: beside the upper)")


def _type_name(st: os.stat_result | None) -> str | None:
    if st is None:
        return None
    m = st.st_mode
    for test, name in (
        (stat_mod.S_ISDIR, "dir"),
        (stat_mod.S_ISREG, "file"),
        (stat_mod.S_ISLNK, "symlink"),
        (stat_mod.S_ISFIFO, "fifo"),
        (stat_mod.S_ISSOCK, "socket"),
        (stat_mod.S_ISCHR, "char"),
        (stat_mod.S_ISBLK, "block"),
    ):
        if test(m):
            return name
    return "unknown"


def line(c: Change) -> str:
    """One ``docker diff`` line, with the metadata and opaque marks."""
    text = f"{c.kind.value} {c.display()}"
    if c.metadata_only:
        text += (
            " (metadata: "
            + ", ".join(a for a in ("mode", "owner", "times", "xattrs") if a in c.aspects)
            + ")"
        )
    if c.opaque:
        text += " (opaque)"
    return text


def as_json(c: Change) -> dict[str, object]:
    return {
        "path": c.display(),
        "kind": c.kind.value,
        "type": _type_name(c.st) if c.st is not None else _type_name(c.lower),
        "aspects": sorted(c.aspects),
        "metadata_only": c.metadata_only,
        "opaque": c.opaque,
        "link": None if c.link is None else "/" + b"/".join(c.link).decode(errors="replace"),
    }


def _read_text(dir_fd: int, name: bytes) -> list[str] | None:
    """The lines of a small text file, or None (too big, binary, unreadable)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        data = os.read(fd, CONTENT_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > CONTENT_MAX or b"\0" in data:
        return None
    try:
        return data.decode().splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def content_diffs(src: Source, changes: list[Change]) -> Iterator[str]:
    """Unified diffs of small text files the upper changed or added."""
    stack = LayerStack(list(src.lowers), None)
    upper_stack = LayerStack([src.upper], None)
    try:
        root = stack.root_entry()
        for c in changes:
            if c.st is None or not stat_mod.S_ISREG(c.st.st_mode):
                continue
            if c.kind is Kind.CHANGED and "content" not in c.aspects:
                continue
            if c.kind not in (Kind.CHANGED, Kind.ADDED):
                continue
            new = _read_text(upper_stack.dirfd(0, c.path[:-1]), c.path[-1])
            old: list[str] | None = []
            if c.kind is Kind.CHANGED and c.lower is not None and stat_mod.S_ISREG(c.lower.st_mode):
                entry = _resolve(stack, root, c.path)
                old = (
                    None
                    if entry is None
                    else _read_text(stack.dirfd(entry.layer, c.path[:-1]), c.path[-1])
                )
            if new is None or old is None:
                continue
            name = c.display()
            yield from difflib.unified_diff(
                old, new, "/dev/null" if c.kind is Kind.ADDED else "a" + name, "b" + name
            )
    finally:
        stack.close()
        upper_stack.close()


def _resolve(stack: LayerStack, root: Entry, path: tuple[bytes, ...]) -> Entry | None:
    """The lowers' entry at ``path``, resolved from the root one component at a time."""
    entry = root
    for i, name in enumerate(path):
        if entry is None or entry.dir_layers is None:
            return None
        entry = stack.lookup(path[:i], entry.dir_layers, entry.xwh_layers, name)
    return entry


def main(prog: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Show what an upper changes over its lowers (A/C/D lines)."
    )
    add_source_args(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.add_argument("--content", action="store_true", help="add unified diffs of text files")
    parser.add_argument("--all", action="store_true", help="also list unchanged upper entries")
    args = parser.parse_args(argv)
    warnings: list[str] = []
    try:
        src = resolve(args.upper, args.lower, args.workdir)
        changes = scan(src.upper, src.lowers, warnings.append)
    except (SourceError, ScanError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    shown = [c for c in changes if args.all or c.kind is not Kind.SAME]
    out = sys.stdout
    try:
        if args.json:
            doc: dict[str, object] = {"changes": [as_json(c) for c in shown], "warnings": warnings}
            if args.content:
                doc["content"] = "".join(content_diffs(src, shown))
            json.dump(doc, out, indent=1)
            out.write("\n")
        else:
            for c in shown:
                out.write(line(c) + "\n")
            if args.content:
                for text in content_diffs(src, shown):
                    out.write(text if text.endswith("\n") else text + "\n")
            for w in warnings:
                print(f"{prog}: warning: {w}", file=sys.stderr)
        out.flush()
    except BrokenPipeError:
        return 0
    except OSError as e:
        print(f"{prog}: {e.strerror}", file=sys.stderr)
        return 1
    return 0
