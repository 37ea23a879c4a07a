"""``unionfs``: the user's one entry point, with a subcommand per tool.

Each subcommand lives in the module of its concept and is imported only when
it is run: a sandbox or container runner pays start-up time on every start,
and the filesystem core (pyfuse3, trio) must not be imported by a tool that
never mounts.  A subcommand module exposes ``main(prog: str, argv: list[str])
-> int``, parses its own arguments and prints its own one-line errors.

``unionfs-mount`` and ``unionfs-check`` stay as commands of their own;
``unionfs mount`` and ``unionfs check`` are the same programs.

Debian's unionfs-fuse package also installs a ``/usr/bin/unionfs``: which
one runs depends on the order of PATH (see README).
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

from . import __version__


class Subcommand(NamedTuple):
    """Where a subcommand's ``main`` is, and the line ``unionfs --help`` shows."""

    module: str
    summary: str


#: The subcommands, in the order ``unionfs --help`` lists them.
SUBCOMMANDS: dict[str, Subcommand] = {
    "mount": Subcommand("unionfs.launcher", "mount a union (the same as unionfs-mount)"),
    "check": Subcommand("unionfs.check", "check or repair an upper (the same as unionfs-check)"),
    "image": Subcommand("unionfs.image.cli", "import, list, inspect, remove images in the store"),
    "diff": Subcommand("unionfs.changes.diff", "what an upper changes over its lowers (A/C/D)"),
    "export-layer": Subcommand("unionfs.changes.export", "write an upper as an OCI layer tar"),
    "commit": Subcommand("unionfs.image.commit", "make a new image: a base image plus an upper"),
    "apply": Subcommand("unionfs.changes.apply", "apply an upper's changes onto a directory"),
    "squash": Subcommand("unionfs.changes.squash", "flatten a range of layers into one"),
    "convert": Subcommand("unionfs.changes.convert", "rewrite a layer's markers in another format"),
    "run": Subcommand("unionfs.container", "run a command in an image, rootless"),
    "sandbox": Subcommand("unionfs.sandbox", "run a program over your home; review, keep or drop"),
    "stats": Subcommand("unionfs.stats", "requests, latencies, cache hits and memory of a mount"),
    "server": Subcommand("unionfs.server", "start/stop a resident server for fast mount starts"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {sub.summary}" for name, sub in SUBCOMMANDS.items())
    return (
        "usage: unionfs COMMAND [ARGS...]\n\n"
        "A rootless union filesystem with kernel overlayfs semantics, and its tools.\n\n"
        f"commands:\n{rows}\n\n"
        "Run 'unionfs COMMAND --help' for a command's options."
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"unionfs {__version__}")
        return 0
    sub = SUBCOMMANDS.get(args[0])
    if sub is None:
        print(f"unionfs: unknown command {args[0]!r} (see 'unionfs --help')", file=sys.stderr)
        return 2
    module = importlib.import_module(sub.module)
    if sub.module in _PLAIN:
        return int(module.main(args[1:]) or 0)
    return int(module.main(f"unionfs {args[0]}", args[1:]) or 0)


#: Modules whose ``main`` predates this command and takes only ``argv``.
_PLAIN = frozenset({"unionfs.launcher", "unionfs.check"})


if __name__ == "__main__":
    sys.exit(main())
