"""``unionfs export-layer UPPER|MNT -o layer.tar[.gz|.zst]``: an upper as an OCI layer.

The layer is written aside (``.NAME.partial-PID`` in the output's directory),
fsync'd and renamed into place, so a failed or interrupted export leaves no
half-written file; ``-o -`` streams to standard output (not a terminal).
The layer's digest (of the bytes written) and diff_id (of the uncompressed
tar) are printed on standard error, or as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from ..oci.changeset import ChangesetError, LayerInfo, source_date_epoch, write_layer
from .diff import add_source_args
from .scan import ScanError, Scanner, paused_gc
from .source import SourceError, resolve

_SUFFIXES = {".tar": "none", ".gz": "gzip", ".tgz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def compression_for(output: str, asked: str) -> str:
    """The compression: as asked, or from the output's suffix (plain tar otherwise)."""
    if asked != "auto":
        return asked
    for suffix, kind in _SUFFIXES.items():
        if output.endswith(suffix):
            return kind
    return "none"


@paused_gc()  # (see there: a pass over every change made is not free)
def export(
    upper: str,
    lowers: tuple[str, ...] | list[str],
    output: str,
    compression: str = "auto",
    explicit: bool = False,
    warn: object = None,
) -> LayerInfo:
    """Export ``upper`` over ``lowers`` as a layer at ``output`` (``-`` for stdout)."""
    kind = compression_for(output, compression)
    warnings: list[str] = []
    epoch = source_date_epoch()
    with Scanner(upper, lowers) as scanner:
        if output == "-":
            if sys.stdout.isatty():
                raise ChangesetError("refusing to write a layer to a terminal: use -o FILE")
            out = sys.stdout.buffer
            info = write_layer(
                scanner.changes(), upper, out, kind, epoch, explicit, warnings.append
            )
            out.flush()
        else:
            info = _to_file(scanner, upper, output, kind, epoch, explicit, warnings)
        warnings[:0] = scanner.warnings
    if callable(warn):
        for w in warnings:
            warn(w)
    return info


def _to_file(
    scanner: Scanner,
    upper: str,
    output: str,
    kind: str,
    epoch: int | None,
    explicit: bool,
    warnings: list[str],
) -> LayerInfo:
    out_dir = os.path.dirname(os.path.abspath(output))
    tmp = os.path.join(out_dir, f".{os.path.basename(output)}.partial-{os.getpid()}")
    try:
        with open(tmp, "xb") as f:
            info = write_layer(scanner.changes(), upper, f, kind, epoch, explicit, warnings.append)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return info


def main(prog: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Write an upper's changes as an OCI changeset layer tar."
    )
    add_source_args(parser)
    parser.add_argument("-o", "--output", required=True, help="FILE (.tar, .tar.gz, .tar.zst) or -")
    parser.add_argument(
        "--compression",
        choices=("auto", "none", "gzip", "zstd"),
        default="auto",
        help="default: from the output's suffix",
    )
    parser.add_argument(
        "--explicit-whiteouts",
        action="store_true",
        help="a .wh.NAME for every hidden name instead of .wh..wh..opq markers",
    )
    parser.add_argument("--json", action="store_true", help="print digest and diff_id as JSON")
    args = parser.parse_args(argv)
    if args.output != "-" and os.path.isdir(args.output):
        print(f"{prog}: {args.output}: is a directory", file=sys.stderr)
        return 2

    def warn(msg: str) -> None:
        print(f"{prog}: warning: {msg}", file=sys.stderr)

    try:
        src = resolve(args.upper, args.lower, args.workdir)
        info = export(
            src.upper, src.lowers, args.output, args.compression, args.explicit_whiteouts, warn
        )
    except (SourceError, ScanError, ChangesetError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = e.filename if e.filename else args.output
        print(f"{prog}: {os.fsdecode(where)}: {e.strerror}", file=sys.stderr)
        return 1
    if args.json:
        text = json.dumps(info.as_dict(), indent=1)
        print(text, file=sys.stderr if args.output == "-" else sys.stdout)
    else:
        print(f"digest {info.digest}\ndiff_id {info.diff_id}\nsize {info.size}", file=sys.stderr)
    return 0
