"""``unionfs sandbox``: run a program over a union view of your home, then keep
or drop what it changed.

- ``run [--name N] [--dir PATH ...] [--net=none] [--pass PATH ...] -- CMD...``
- ``diff NAME [--json] [--content]``
- ``commit NAME [PATH|GLOB ...] [--dry-run] [--force]``
- ``ls [--json]``, ``discard NAME``, ``gc``

See docs/sandbox.md for what the sandbox is and is not a boundary for.
The subcommands import only what they use: ``run`` must start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run a program over a union view of your home; review, keep or drop "
        "what it changed.",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
    r = sub.add_parser("run", help="run a command in a sandbox")
    r.add_argument("--name", default="default", help="the sandbox (made if missing)")
    r.add_argument(
        "--dir",
        action="append",
        default=[],
        metavar="PATH",
        help="a directory to sandbox (repeatable; default: $HOME)",
    )
    r.add_argument("--net", choices=["host", "none"], default="host", help="none: loopback only")
    r.add_argument(
        "--pass",
        dest="passes",
        action="append",
        default=[],
        metavar="PATH",
        help="keep PATH real inside the sandbox (a socket, an agent's directory)",
    )
    r.add_argument(
        "--home-view",
        action="store_true",
        help="without user namespaces: mount the view elsewhere and point HOME at it",
    )
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    df = sub.add_parser("diff", help="what a sandbox's programs changed")
    df.add_argument("name")
    df.add_argument("--json", action="store_true")
    df.add_argument("--content", action="store_true", help="unified diffs of small text files")
    c = sub.add_parser("commit", help="keep changes: write them into the real tree")
    c.add_argument("name")
    c.add_argument("paths", nargs="*", metavar="PATH|GLOB", help="only these (default: all)")
    c.add_argument("--dry-run", action="store_true", help="show what would be done")
    c.add_argument("--force", action="store_true", help="overwrite conflicts too")
    ls = sub.add_parser("ls", help="list the sandboxes")
    ls.add_argument("--json", action="store_true")
    d = sub.add_parser("discard", help="delete a sandbox and everything its programs changed")
    d.add_argument("name")
    sub.add_parser("gc", help="remove leftovers of interrupted runs and removals")
    return p


def _err(prog: str, msg: str, code: int = 1) -> int:
    print(f"{prog}: {msg}", file=sys.stderr)
    return code


def main(prog: str, argv: list[str]) -> int:
    parser = _parser(prog)
    args, extra = parser.parse_known_args(argv)
    # argparse leaves positionals given after an option (commit N --force a b).
    if extra and args.cmd == "commit" and not any(e.startswith("-") for e in extra):
        args.paths += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from . import state

    try:
        if args.cmd == "run":
            return _run(prog, args)
        if args.cmd == "diff":
            return _diff(args)
        if args.cmd == "commit":
            return _commit(prog, args)
        if args.cmd == "ls":
            return _ls(args)
        if args.cmd == "discard":
            state.remove(state.load(args.name))
            return 0
        if args.cmd == "gc":
            return _gc()
    except state.StateError as e:
        return _err(prog, str(e))
    except ValueError as e:  # a selection outside the sandboxed trees
        return _err(prog, str(e), 2)
    except OSError as e:
        return _err(prog, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    return 2


def _run(prog: str, args: argparse.Namespace) -> int:
    from . import run

    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        return _err(prog, "no command given (unionfs sandbox run [OPTIONS] -- CMD...)", 2)
    dirs = args.dir or [os.path.expanduser("~")]
    try:
        if args.home_view:
            if args.dir or args.net != "host":
                return _err(prog, "--home-view sandboxes $HOME only, without --net", 2)
            return run.run_home_view(args.name, cmd)
        return run.run(args.name, dirs, cmd, net_none=args.net == "none", passes=args.passes)
    except (run.RunError, run.ViewError) as e:
        return _err(prog, str(e))


def _diff(args: argparse.Namespace) -> int:
    from . import keep, state

    sb = state.load(args.name)
    fd = sb.lock()  # nothing writes the upper while it is read
    try:
        ignore = keep.ignore_for(sb)
        reviews = [keep.review_root(sb, i, ignore) for i in range(len(sb.roots))]
    finally:
        os.close(fd)
    if args.json:
        doc = keep.diff_json(sb.name, reviews)
        if args.content:
            doc["content"] = "".join(keep.content(r) for r in reviews)
        print(json.dumps(doc, indent=2))
        return 0
    for r in reviews:
        for text in keep.diff_lines(r):
            print(text)
        if args.content:
            sys.stdout.write(keep.content(r))
    ignored = sum(r.ignored for r in reviews)
    conflicts = sum(len(r.conflicts) for r in reviews)
    tail = [f"{ignored} ignored"] if ignored else []
    tail += [f"{conflicts} conflict(s)"] if conflicts else []
    if tail:
        print(", ".join(tail), file=sys.stderr)
    return 0


def _commit(prog: str, args: argparse.Namespace) -> int:
    """Exit status 0: all selected changes committed; 3: conflicts were left."""
    from . import keep, review, state

    sb = state.load(args.name)
    cwd = os.getcwd()
    per_root: list[list[str] | None] = [None] * len(sb.roots)
    if args.paths:
        left = list(args.paths)
        for i, root in enumerate(sb.roots):
            mine = []
            for p in args.paths:
                try:
                    mine += review.normalize_selection([p], root, cwd)
                except ValueError:
                    continue
                if p in left:
                    left.remove(p)
            per_root[i] = mine
        if left:
            return _err(prog, f"{left[0]!r} is not inside the sandboxed {', '.join(sb.roots)}", 2)
    fd = sb.lock()
    try:
        ignore = keep.ignore_for(sb)
        results = []
        for i in range(len(sb.roots)):
            if per_root[i] == []:
                continue
            try:
                results.append(
                    keep.commit_root(sb, i, per_root[i], args.force, args.dry_run, ignore)
                )
            except keep.KeepError as e:
                return _err(prog, str(e))
    finally:
        os.close(fd)
    verb = "would commit" if args.dry_run else "committed"
    done = sum(len(r.done) for r in results)
    skipped = {p: why for r in results for p, why in r.skipped.items()}
    for p in sorted(skipped):
        print(f"{prog}: conflict, left alone: {p}: {skipped[p]}", file=sys.stderr)
    ignored = sum(r.ignored for r in results)
    msg = f"{verb} {done} path(s)"
    if skipped:
        msg += f", {len(skipped)} conflict(s) skipped (--force overwrites)"
    if ignored:
        msg += f", {ignored} ignored"
    print(msg)
    return 3 if skipped else 0


def _ls(args: argparse.Namespace) -> int:
    from . import state

    rows = []
    for sb in state.all_sandboxes():
        rows.append(
            {"name": sb.name, "roots": sb.roots, "created": sb.created, "running": sb.in_use()}
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    import time

    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))
        flag = " (running)" if r["running"] else ""
        print(f"{r['name']}\t{when}\t{' '.join(r['roots'])}{flag}")
    return 0


def _gc() -> int:
    from . import state
    from .view import ViewError, fusermount, runtime_dir

    removed = 0
    for path in state.leftovers():
        state.remove_leftover(path)
        removed += 1
    # Views a killed runner left mounted outside (its pid is the last part of the name).
    rt = runtime_dir()
    for entry in os.listdir(rt):
        pid = entry.rsplit(".", 1)[-1]
        if not pid.isdigit() or state._alive(int(pid)):
            continue
        path = rt / entry
        with contextlib.suppress(ViewError):
            fusermount("-u", "-z", path)
        try:
            os.rmdir(path)
            removed += 1
        except OSError:
            pass
    print(f"{removed} leftover(s) removed")
    return 0
