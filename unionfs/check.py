"""``unionfs-check``: find, and with ``--repair`` remove, what a crash or a foreign
tool can leave in an upper directory and its work directory.

Run it on an upper that is not mounted.  Exit status, as fsck's: 0 nothing
found, 1 problems found and repaired, 4 problems found and left, 8 usage or
operational error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat as stat_mod
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import markers
from .options import default_workdir, volatile_marker

OK, REPAIRED, LEFT, FAILED = 0, 1, 4, 8


@dataclass
class Problem:
    """One finding: where, what, and the action that repairs it."""

    path: str
    what: str
    repair: Callable[[], None] | None  # None: only a person can decide


def _xattrs(path: str) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def _remove_tree(path: str) -> Callable[[], None]:
    def run() -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    return run


def _remove_xattr(path: str, name: bytes) -> Callable[[], None]:
    return lambda: os.removexattr(path, name, follow_symlinks=False)


def check_workdir(workdir: str) -> Iterator[Problem]:
    """Copy-up leftovers in work/, and index entries no upper name links to."""
    work = os.path.join(workdir, "work")
    volatile = volatile_marker(workdir)
    if os.path.isdir(volatile):
        yield Problem(
            volatile,
            "a -o volatile mount did not end cleanly: files written through it may be"
            " incomplete (start from a new upper, or remove this if the system did not crash)",
            None,
        )
    if os.path.isdir(work):
        for name in sorted(os.listdir(work)):
            path = os.path.join(work, name)
            if path == os.path.dirname(volatile) and os.path.isdir(volatile):
                continue
            yield Problem(path, "leftover of an interrupted operation", _remove_tree(path))
    index = os.path.join(workdir, "index")
    if os.path.isdir(index):
        for name in sorted(os.listdir(index)):
            path = os.path.join(index, name)
            st = os.lstat(path)
            if not name.isdigit():
                yield Problem(path, "not an index entry", _remove_tree(path))
            elif st.st_nlink < 2:
                yield Problem(
                    path, "index entry whose upper names are all gone", _remove_tree(path)
                )


def _check_entry(dirpath: str, name: str, names: set[str], st: os.stat_result) -> Iterator[Problem]:
    path = os.path.join(dirpath, name)
    bname = os.fsencode(name)
    if bname == markers.OPAQUE_NAME:
        if not stat_mod.S_ISREG(st.st_mode):
            yield Problem(path, "opaque marker that is not a regular file", _remove_tree(path))
    elif (target := markers.oci_whiteout_target(bname)) is not None:
        if not stat_mod.S_ISREG(st.st_mode) or st.st_size != 0:
            yield Problem(path, "whiteout file that is not empty or not a file", _remove_tree(path))
        elif os.fsdecode(target) in names:
            yield Problem(
                path, "whiteout beside the name it hides (the name wins)", _remove_tree(path)
            )
    elif markers.is_marker_name(bname):
        yield Problem(path, "invalid .wh. name", _remove_tree(path))
    if stat_mod.S_ISLNK(st.st_mode):
        return
    for xname, value in _xattrs(path).items():
        if xname in markers.OPAQUE_XATTRS and not stat_mod.S_ISDIR(st.st_mode):
            yield Problem(path, f"{xname.decode()} on a non-directory", _remove_xattr(path, xname))
        elif xname in markers.OPAQUE_XATTRS and value[:1] not in (b"y", b"x", b"n"):
            yield Problem(path, f"{xname.decode()} has value {value!r}", _remove_xattr(path, xname))
        elif xname in markers.METACOPY_XATTRS and not stat_mod.S_ISREG(st.st_mode):
            yield Problem(path, f"{xname.decode()} on a non-file", _remove_xattr(path, xname))
        elif xname in markers.METACOPY_XATTRS and not markers.valid_metacopy_value(value):
            # Removing it would show the sparse upper's zeros: only a person decides.
            yield Problem(path, f"{xname.decode()} has malformed value {value!r}", None)
        elif xname.endswith((b"overlay.unionfs.origin", b"overlay.unionfs.lowerlinks")) and (
            not value.isdigit()
        ):
            yield Problem(
                path, f"{xname.decode()} is not a number: {value!r}", _remove_xattr(path, xname)
            )


def check_upper(upper: str) -> Iterator[Problem]:
    """Malformed markers anywhere in the upper (walked without following symlinks)."""
    yield from _check_entry(os.path.dirname(upper), os.path.basename(upper), set(), os.lstat(upper))
    for dirpath, dirnames, filenames, _dirfd in os.fwalk(upper, follow_symlinks=False):
        names = set(dirnames) | set(filenames)
        for name in sorted(names):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            yield from _check_entry(dirpath, name, names, st)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="unionfs-check",
        description="Check an (unmounted) upper directory and its work directory.",
    )
    parser.add_argument("upper")
    parser.add_argument("--workdir", help="work directory (default: the one unionfs-mount uses)")
    parser.add_argument("--repair", action="store_true", help="remove what is found")
    args = parser.parse_args(argv)
    upper = os.path.realpath(args.upper)
    if not os.path.isdir(upper):
        print(f"unionfs-check: {args.upper!r} is not a directory", file=sys.stderr)
        return FAILED
    workdir = args.workdir or default_workdir(upper)
    try:
        problems = [*check_workdir(workdir), *check_upper(upper)]
    except OSError as e:
        print(f"unionfs-check: cannot read {e.filename!r}: {e.strerror}", file=sys.stderr)
        return FAILED
    for p in problems:
        print(f"{p.path}: {p.what}")
    if not problems:
        print(f"{upper}: clean")
        return OK
    if not args.repair:
        print(f"{len(problems)} problem(s); run with --repair to remove them")
        return LEFT
    failed = 0
    for p in problems:
        if p.repair is None:
            failed += 1
            print(f"{p.path}: not repaired: needs your decision", file=sys.stderr)
            continue
        try:
            p.repair()
        except OSError as e:
            failed += 1
            print(f"{p.path}: not repaired: {e.strerror}", file=sys.stderr)
    print(f"repaired {len(problems) - failed} of {len(problems)} problem(s)")
    return LEFT if failed else REPAIRED


if __name__ == "__main__":
    sys.exit(main())
