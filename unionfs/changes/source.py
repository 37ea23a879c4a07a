"""Where an upper's lowers are: the recorded stack, a mount point, or ``--lower``.

A tool is given an upper directory or a mount point.  For an upper, the
lowers come from ``--lower`` or else from the stack the mount recorded in the
work dir (``unionfs.stackinfo``).  For a mount point, /proc/self/mountinfo
says what is mounted there: kernel overlayfs shows its ``lowerdir=`` and
``upperdir=`` in the super options; a unionfs mount is found by its daemon's
command line, parsed with the mount's own option parser.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .. import mountinfo, stackinfo, stats
from ..options import ConfigError, build_config, default_workdir, split_lowerdirs


class SourceError(Exception):
    """The upper or its lowers cannot be found or used: one line for the user."""


@dataclass(frozen=True)
class Source:
    """An upper, its work dir (may not exist) and its lowers, all absolute."""

    upper: str
    workdir: str | None
    lowers: tuple[str, ...]
    #: The namespace of the mount's own xattrs (origin, lower links), when known.
    xattr_ns: str | None = None


def mount_at(path: str) -> tuple[str, str] | None:
    """(fstype, super options) of the topmost mount at ``path``, or None."""
    found = mountinfo.at(os.path.realpath(path))
    return (found[-1].fstype, found[-1].super_options) if found else None


def _overlay_options(options: str) -> dict[str, str]:
    """Kernel overlayfs super options (``\\,`` escapes a comma inside a value)."""
    out: dict[str, str] = {}
    word, i = "", 0
    while i <= len(options):
        c = options[i] if i < len(options) else ","
        if c == "\\" and i + 1 < len(options):
            word += options[i : i + 2]
            i += 2
            continue
        if c == ",":
            key, _, value = word.partition("=")
            out[key] = value
            word = ""
        else:
            word += c
        i += 1
    return out


def _served_branches(mnt: str) -> Source | None:
    """The branches a running unionfs daemon reports through its stats xattr (absolute
    paths, however it was started); None from a daemon too old to report them."""
    try:
        branches = json.loads(os.getxattr(mnt, stats.XATTR)).get("branches")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(branches, dict) or "lowers" not in branches:
        return None
    if branches.get("upper") is None:
        raise SourceError(f"{mnt}: a read-only union has no upper to read")
    upper = branches["upper"]
    workdir = branches.get("workdir") or default_workdir(upper)
    return Source(upper, workdir, tuple(branches["lowers"]))


def _daemon_config(mnt: str) -> Source | None:
    """The upper and lowers of the unionfs daemon serving ``mnt``: what it reports, else
    what its command line says."""
    served = _served_branches(mnt)
    if served is not None:
        return served
    target = os.path.realpath(mnt)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().split(b"\0")[:-1]]
        except OSError:
            continue
        if not any("unionfs" in a for a in argv[:3]) or not argv:
            continue
        paths, opts = _split_mount_argv(argv)
        if not paths or os.path.realpath(paths[-1]) != target:
            continue
        try:
            cfg = build_config(paths, opts, True, False)
        except ConfigError:
            continue
        if cfg.upper is None:
            raise SourceError(f"{mnt}: a read-only union has no upper to read")
        branches = [*cfg.lowers, cfg.upper, *([cfg.workdir] if cfg.workdir else [])]
        if not all(os.path.isabs(p) for p in branches):
            raise SourceError(
                f"{mnt}: its daemon was started with relative paths: give the upper directory"
            )
        workdir = cfg.workdir or default_workdir(cfg.upper)
        return Source(cfg.upper, workdir, tuple(cfg.lowers))
    return None


def _split_mount_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """The positional paths and ``-o`` words of a ``unionfs-mount`` command line.

    The program is ``unionfs-mount``, ``unionfs mount`` or ``python -m
    unionfs.cli`` (or ``-m unionfs.launcher``, what the Python API runs), maybe
    after an interpreter; an empty result for anything else.
    """
    start = None
    for i, a in enumerate(argv[:4]):
        base = os.path.basename(a)
        if base == "unionfs-mount" or (
            a in ("unionfs.cli", "unionfs.launcher") and i > 0 and argv[i - 1] == "-m"
        ):
            start = i + 1
            break
        if base == "unionfs" and argv[i + 1 : i + 2] == ["mount"]:
            start = i + 2
            break
    if start is None:
        return [], []
    args = argv[start:]
    paths, opts = [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-o" and i + 1 < len(args):
            opts.append(args[i + 1])
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            opts.append(a[2:])
        elif not a.startswith("-"):
            paths.append(a)
        i += 1
    return paths, opts


def from_mount(mnt: str) -> Source:
    """The upper and lowers of the union mounted at ``mnt``."""
    found = mount_at(mnt)
    if found is None:
        raise SourceError(f"{mnt}: not a mount point")
    fstype, options = found
    if fstype == "overlay":
        opts = _overlay_options(options)
        if "upperdir" not in opts:
            raise SourceError(f"{mnt}: a read-only overlay has no upper to read")
        lowers = tuple(split_lowerdirs(opts.get("lowerdir", "")))
        ns = "user." if "userxattr" in opts else "trusted."
        return Source(opts["upperdir"], opts.get("workdir"), lowers, ns)
    if fstype.startswith("fuse"):
        src = _daemon_config(mnt)
        if src is not None:
            return src
    raise SourceError(f"{mnt}: not a unionfs or overlay mount with an upper ({fstype})")


def resolve(arg: str, lower_spec: str | None = None, workdir: str | None = None) -> Source:
    """The Source for a command's UPPER|MNT argument and its ``--lower``/``--workdir``.

    ``--lower`` (``L1:L2``, top-down, ``\\:`` escapes a colon) wins over any
    recorded stack.  Without it, an upper needs the stack its mount recorded.
    """
    if not os.path.isdir(arg):
        raise SourceError(f"{arg}: not a directory")
    found = mount_at(arg)
    if found is not None and (found[0] == "overlay" or found[0].startswith("fuse")):
        src = from_mount(arg)
        upper, wd, lowers, ns = src.upper, src.workdir, src.lowers, src.xattr_ns
    else:
        upper = os.path.realpath(arg)
        wd, lowers, ns = None, (), None
    wd = workdir or wd or default_workdir(upper)
    recorded = None
    try:
        recorded = stackinfo.read(wd) if os.path.isdir(wd) else None
    except stackinfo.StackError as e:
        if lower_spec is None:
            raise SourceError(f"{wd}: {e}") from None
    if recorded is not None:
        ns = ns or recorded.xattr_ns
        if not lowers:
            lowers = recorded.lowers
    if lower_spec is not None:
        try:
            lowers = tuple(os.path.realpath(p) for p in split_lowerdirs(lower_spec))
        except ConfigError as e:
            raise SourceError(f"--lower: {e}") from None
    if not lowers:
        raise SourceError(
            f"{upper}: no lower stack recorded (in {wd}): give the lowers with --lower L1:L2"
        )
    for p in lowers:
        if not os.path.isdir(p):
            raise SourceError(f"lower {p!r} is not a directory")
    if os.path.realpath(upper) in {os.path.realpath(p) for p in lowers}:
        raise SourceError(f"{upper}: the upper is also given as a lower")
    return Source(upper, wd if os.path.isdir(wd) else None, tuple(lowers), ns)
