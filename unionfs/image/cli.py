"""``unionfs image``: import, list, inspect, remove and collect images in the store."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

from ..oci.layout import ImageError, Platform
from .store import Store, canonical


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class TermProgress:
    """One status line on stderr, rewritten in place, when stderr is a terminal."""

    def __init__(self) -> None:
        self.last = 0.0
        self.shown = False

    def __call__(self, diff_id: str, number: int, count: int, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        share = f" / {_human(total)}" if total else ""
        line = f"layer {number}/{count} {diff_id[:19]}  {_human(done)}{share}"
        sys.stderr.write(f"\r\x1b[K{line}")
        sys.stderr.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Container images in the layer store.")
    p.add_argument(
        "--store",
        metavar="DIR",
        help="the store (default: $UNIONFS_STORE, else $XDG_DATA_HOME/unionfs)",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    imp = sub.add_parser("import", help="import an OCI layout, oci-archive or docker-save tar")
    imp.add_argument("path", metavar="PATH")
    imp.add_argument("ref", metavar="NAME[:TAG]", nargs="?", help="name in the store")
    imp.add_argument("--ref", dest="source_ref", metavar="REF", help="which image of the source")
    imp.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="default: this machine's")
    imp.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    imp.add_argument(
        "--side-table",
        action="store_true",
        help="keep owners in each layer's side table, not in xattrs (a store for NFS)",
    )
    ls = sub.add_parser("ls", help="list images")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ins = sub.add_parser("inspect", help="show an image's record, config and layer dirs (JSON)")
    ins.add_argument("ref", metavar="NAME[:TAG]")
    rm = sub.add_parser("rm", help="remove images, then layers no image uses")
    rm.add_argument("refs", metavar="NAME[:TAG]", nargs="+")
    sub.add_parser("gc", help="remove unused layers and leftovers of interrupted imports")
    exp = sub.add_parser("export", help="write an image: OCI layout, oci-archive, docker-archive")
    exp.add_argument("ref", metavar="NAME[:TAG]")
    exp.add_argument("-o", "--output", required=True, metavar="DIR|FILE", help="must not exist")
    exp.add_argument("--format", choices=("oci", "oci-archive", "docker-archive"), default="oci")
    exp.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    exp.add_argument("--json", action="store_true", help="print the digests as JSON")
    return p


def main(prog: str, argv: list[str]) -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_usage(sys.stderr)
        return 2
    store = Store.open(args.store)
    try:
        return int(_COMMANDS[args.cmd](store, args))
    except ImageError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: the import's cleanup has run (its tmp/ directory is gone, or
        # left for gc if a second Ctrl-C cut it short); the store has no half layer.
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader (head, less) went away: not an error of ours
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
        return 0
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"{prog}: {e.strerror or e}{where}", file=sys.stderr)
        return 1


def _import(store: Store, args: argparse.Namespace) -> int:
    plat = Platform.parse(args.platform) if args.platform else None
    store.side_table = args.side_table
    progress = TermProgress() if sys.stderr.isatty() and not args.quiet else None
    try:
        img = store.import_image(args.path, args.ref, args.source_ref, plat, progress)
    finally:
        if progress is not None:
            progress.end()
    print(f"{img.ref} {img.id} ({len(img.diff_ids)} layers)")
    return 0


def _rows(store: Store) -> list[dict[str, Any]]:
    rows = []
    for rec in store.images():
        size = 0
        for d in rec["layers"]:
            with contextlib.suppress(OSError, ValueError):
                size += int(store.layer_info(d).get("size", 0))
        rows.append(
            {
                "ref": rec["ref"],
                "id": rec["config_digest"],
                "layers": len(rec["layers"]),
                "size": size,
                "imported": rec.get("imported"),
            }
        )
    return rows


def _ls(store: Store, args: argparse.Namespace) -> int:
    rows = _rows(store)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max([len(r["ref"]) for r in rows] + [9])
    print(f"{'REFERENCE':<{width}}  {'ID':<12}  LAYERS  {'SIZE':>9}  IMPORTED")
    for r in rows:
        ident = r["id"].split(":", 1)[-1][:12]
        print(
            f"{r['ref']:<{width}}  {ident:<12}  {r['layers']:>6}  {_human(r['size']):>9}"
            f"  {r['imported']}"
        )
    return 0


def _inspect(store: Store, args: argparse.Namespace) -> int:
    img = store.image(args.ref)
    out = dict(img.record)
    out["layer_dirs"] = img.layers
    out["store"] = store.root
    print(json.dumps(out, indent=1))
    return 0


def _rm(store: Store, args: argparse.Namespace) -> int:
    refs = [canonical(r) for r in args.refs]
    for ref in refs:
        store.image(ref)  # all exist, or nothing is removed
    for ref in refs:
        store.remove(ref)
        print(f"removed {ref}")
    removed, freed = store.gc(wait=True)
    if removed:
        print(f"{removed} layers no longer used removed ({_human(freed)})")
    _report_in_use(store)
    return 0


def _report_in_use(store: Store) -> None:
    """Layers gc kept because a mount uses them (a later gc removes them)."""
    if store.in_use:
        print(f"{len(store.in_use)} unused layers kept: mounted (a later gc removes them)")


def _gc(store: Store, args: argparse.Namespace) -> int:
    removed, freed = store.gc()
    print(f"{removed} layers removed ({_human(freed)})")
    _report_in_use(store)
    return 0


def _export(store: Store, args: argparse.Namespace) -> int:
    """Re-tar the image's stored layers into the asked format (unionfs/oci/write.py)."""
    from ..oci import write

    img = store.image(args.ref)
    write.check_output(args.output)  # before the work: exists, unwritable
    term = TermProgress() if sys.stderr.isatty() and not args.quiet else None
    diff_ids = list(img.diff_ids)

    last = [0.0]

    def progress(number: int, count: int, done: int) -> None:
        now = time.monotonic()  # the blob's final size is unknown: a line every 0.1 s
        if term is not None and now - last[0] >= 0.1:
            last[0] = now
            term(diff_ids[number - 1], number, count, done, 0)

    try:
        with store._lock(exclusive=False, readonly_ok=True):  # no gc meanwhile
            out = write.export_image(
                list(reversed(img.layers)),
                img.full_config,
                img.ref,
                args.output,
                args.format,
                progress,
            )
    finally:
        if term is not None:
            term.end()
    if args.json:
        print(json.dumps(out.as_dict(), indent=1))
    else:
        print(f"{out.output}: {args.format} {img.ref} manifest {out.manifest_digest}")
    return 0


_COMMANDS = {
    "import": _import,
    "ls": _ls,
    "inspect": _inspect,
    "rm": _rm,
    "gc": _gc,
    "export": _export,
}


if __name__ == "__main__":
    sys.exit(main(os.path.basename(sys.argv[0]), sys.argv[1:]))
