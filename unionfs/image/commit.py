"""``unionfs commit UPPER|MNT|CONTAINER NEW[:TAG]``: an upper's changes as a new image.

The base image is the store image whose layers the upper's recorded lower
stack is (a mount of ``image:NAME`` records the image's layer directories,
top first; ``unionfs run`` records the image it ran in its container dir).
The changes are exported as an OCI changeset layer (gzip, reproducible:
unionfs/oci/changeset.py) and streamed through a pipe, from a writer thread,
straight into ``Store.add_layer_from_tar``: the layer is never held in memory
nor written twice.  The new image is the base config with the new diff_id
appended to ``rootfs.diff_ids`` and a history entry, and a manifest with the
compressed layer's descriptor, recorded in the store as an import is.

The compressed blob is not kept: the store keeps no blob of any layer (an
imported layer is kept extracted only), and ``unionfs image export``
re-creates every layer deterministically from its directory, so one code
path serves committed and imported layers alike and no layer is stored twice.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
from typing import IO, Any

from ..changes.scan import ScanError, Scanner
from ..changes.source import Source, SourceError, resolve
from ..oci.changeset import ChangesetError, LayerInfo, source_date_epoch, write_layer
from ..oci.layout import ImageError
from ..oci.write import CONFIG_TYPE, MANIFEST_TYPE, canonical_json
from .store import Image, Store, StoreError, canonical


class CommitError(Exception):
    """What makes a commit impossible: one line for the user."""


def container_dir(name: str) -> str | None:
    """The directory of ``unionfs run``'s container ``name``, when there is one."""
    from ..container import containers_root
    from ..sandbox.state import NAME_RE

    if not NAME_RE.fullmatch(name):
        return None
    cdir = containers_root() / name
    return str(cdir) if (cdir / "upper").is_dir() else None


def find_source(arg: str, lower: str | None, workdir: str | None) -> tuple[Source, str | None]:
    """(the upper and its lowers, the base image's ref when the container recorded it)."""
    if os.path.isdir(arg):
        return resolve(arg, lower, workdir), None
    cdir = None if os.sep in arg else container_dir(arg)
    if cdir is None:
        raise CommitError(f"{arg}: not a directory, a mount point or a container of 'unionfs run'")
    ref = None
    try:
        with open(os.path.join(cdir, "container.json"), "rb") as f:
            image = json.load(f).get("image")
        if isinstance(image, str) and not image.startswith("rootfs:"):
            ref = image
    except (OSError, ValueError):
        pass
    src = resolve(os.path.join(cdir, "upper"), lower, workdir or os.path.join(cdir, "work"))
    return src, ref


def base_image(store: Store, lowers: tuple[str, ...], hint: str | None) -> Image:
    """The store image whose layers (top first) are exactly ``lowers``."""
    want = [os.path.realpath(p) for p in lowers]
    refs = ([hint] if hint else []) + [r["ref"] for r in store.images()]
    for ref in refs:
        try:
            img = store.image(ref)
        except StoreError:
            continue
        if [os.path.realpath(p) for p in img.layers] == want:
            return img
    raise CommitError(
        "the upper's lowers are not the layers of an image in the store"
        f" {store.root} (mount image:NAME, or give --lower with its layers)"
    )


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_image_config(
    base: dict[str, Any], diff_id: str, created: str, message: str | None, author: str | None
) -> dict[str, Any]:
    """The base config plus one layer: its diff_id appended and a history entry."""
    config = json.loads(json.dumps(base))  # a deep copy of plain JSON
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = [*rootfs.get("diff_ids", []), diff_id]
    entry: dict[str, Any] = {"created": created, "created_by": "unionfs commit"}
    if message:
        entry["comment"] = message
    if author:
        entry["author"] = author
        config["author"] = author
    config["history"] = [*config.get("history", []), entry]
    config["created"] = created
    return config


def new_manifest(base: dict[str, Any], config_bytes: bytes, layer: LayerInfo) -> dict[str, Any]:
    """The base manifest's layers plus the new one, with the new config's descriptor."""
    from ..oci.layout import digest_of

    layers = [dict(d) for d in (base or {}).get("layers", [])]
    layers.append({"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size})
    return {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {
            "mediaType": CONFIG_TYPE,
            "digest": digest_of(config_bytes),
            "size": len(config_bytes),
        },
        "layers": layers,
    }


def stream_layer(store: Store, src: Source, warn: Any) -> tuple[LayerInfo, str]:
    """Export the upper's changes through a pipe into the store: (layer info, diff_id).

    The writer thread writes the gzip'd tar into the pipe; this thread
    extracts it into the store.  An error on either side ends both: a
    failed writer closes the pipe (the store sees a short tar and keeps
    nothing), a failed store read closes its end (the writer gets EPIPE).
    """
    rfd, wfd = os.pipe()
    result: dict[str, Any] = {}
    epoch = source_date_epoch()

    def writer() -> None:
        out: IO[bytes] = os.fdopen(wfd, "wb", buffering=1 << 16)
        try:
            with Scanner(src.upper, src.lowers) as scanner:
                result["info"] = write_layer(
                    scanner.changes(), src.upper, out, "gzip", epoch, False, warn
                )
                result["warnings"] = scanner.warnings
            out.flush()
        except BaseException as e:  # reported by the main thread
            result["error"] = e
        finally:
            try:
                out.close()
            except OSError as e:
                result.setdefault("error", e)

    thread = threading.Thread(target=writer, name="commit-export", daemon=True)
    thread.start()
    store_error: BaseException | None = None
    diff_id = ""
    with os.fdopen(rfd, "rb") as inp:
        try:
            diff_id = store.add_layer_from_tar(inp)
            while inp.read(1 << 16):  # the tar's trailing padding: the writer must finish
                pass
        except BaseException as e:
            store_error = e
    thread.join()
    if "error" in result and not isinstance(result["error"], BrokenPipeError):
        raise result["error"]
    if store_error is not None:
        raise store_error
    info: LayerInfo = result["info"]
    for w in result.get("warnings", []):
        warn(w)
    if diff_id != info.diff_id:  # the store hashed what it read: must be what was written
        raise CommitError(f"layer digest mismatch ({diff_id} != {info.diff_id})")
    return info, diff_id


def commit(
    store: Store,
    arg: str,
    ref: str,
    lower: str | None = None,
    workdir: str | None = None,
    message: str | None = None,
    author: str | None = None,
    warn: Any = None,
) -> tuple[Image, LayerInfo]:
    """Commit the upper ``arg`` (a dir, mount point or container) as image ``ref``."""
    ref = canonical(ref)
    src, hint = find_source(arg, lower, workdir)
    base = base_image(store, src.lowers, hint)
    info, diff_id = stream_layer(store, src, warn or (lambda _m: None))
    epoch = source_date_epoch()
    created = _rfc3339(epoch if epoch is not None else datetime.datetime.now().timestamp())
    config = new_image_config(base.full_config, diff_id, created, message, author)
    config_bytes = canonical_json(config)
    manifest = new_manifest(base.record.get("manifest") or {}, config_bytes, info)
    manifest_bytes = canonical_json(manifest)
    from ..oci.layout import digest_of

    img = store.add_image(
        ref,
        [*base.diff_ids, diff_id],
        config,
        digest_of(config_bytes),
        manifest,
        digest_of(manifest_bytes),
        f"commit of {src.upper} over {base.ref}",
    )
    return img, info


def main(prog: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Make a new image in the store: a base image plus an upper's changes.",
    )
    parser.add_argument("upper", metavar="UPPER|MNT|CONTAINER")
    parser.add_argument("ref", metavar="NEW[:TAG]", help="the new image's name in the store")
    parser.add_argument("--lower", metavar="L1:L2", help="the lowers, top-down (default: recorded)")
    parser.add_argument("--workdir", help="the mount's work dir (default: beside the upper)")
    parser.add_argument("-m", "--message", help="the history entry's comment")
    parser.add_argument("--author", help="the image's author")
    parser.add_argument("--store", metavar="DIR", help="the store (default: $UNIONFS_STORE)")
    parser.add_argument("--json", action="store_true", help="print the new image's digests as JSON")
    args = parser.parse_args(argv)

    def warn(msg: str) -> None:
        print(f"{prog}: warning: {msg}", file=sys.stderr)

    store = Store.open(args.store)
    try:
        img, info = commit(
            store, args.upper, args.ref, args.lower, args.workdir, args.message, args.author, warn
        )
    except (CommitError, SourceError, ScanError, ChangesetError, ImageError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f" ({os.fsdecode(e.filename)})" if e.filename else ""
        print(f"{prog}: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    if args.json:
        doc = {
            "ref": img.ref,
            "id": img.id,
            "manifest": img.record["manifest_digest"],
            "layer": info.as_dict(),
            "diff_ids": img.diff_ids,
        }
        print(json.dumps(doc, indent=1))
    else:
        print(f"{img.ref} {img.id} ({len(img.diff_ids)} layers, new layer {info.diff_id})")
    return 0
