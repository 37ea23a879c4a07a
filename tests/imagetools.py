"""Images built with the standard library, in every layout an importer meets.

Layer entries are small dataclass-free dicts: ``name`` and ``type`` (``dir``,
``file``, ``link``, ``symlink``, ``char``, ``block``, ``fifo``), optional
``data``, ``mode``, ``uid``, ``gid``, ``target``, ``xattrs``, ``major``,
``minor``, ``mtime``.  Raw ``tarfile.TarInfo`` objects pass through as they
are, for hostile headers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

Entry = dict[str, Any]

_TYPES = {
    "dir": tarfile.DIRTYPE,
    "file": tarfile.REGTYPE,
    "link": tarfile.LNKTYPE,
    "symlink": tarfile.SYMTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_bytes(entries: list[Entry | tarfile.TarInfo], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=fmt) as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e, io.BytesIO(b"\0" * e.size) if e.size else None)
                continue
            ti = tarfile.TarInfo(e["name"])
            ti.mtime = e.get("mtime", 0)
            ti.uname = ti.gname = ""
            ti.uid, ti.gid = e.get("uid", 0), e.get("gid", 0)
            ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in e.get("xattrs", {}).items()}
            t = e["type"]
            ti.type = _TYPES[t]
            default = 0o755 if t == "dir" else 0o644
            ti.mode = e.get("mode", default)
            if t in ("link", "symlink"):
                ti.linkname = e["target"]
            if t in ("char", "block"):
                ti.devmajor, ti.devminor = e.get("major", 0), e.get("minor", 0)
            data = e.get("data", b"") if t == "file" else b""
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return b.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put(root: Path, data: bytes) -> dict[str, Any]:
    h = hashlib.sha256(data).hexdigest()
    d = root / "blobs" / "sha256"
    d.mkdir(parents=True, exist_ok=True)
    (d / h).write_bytes(data)
    return {"digest": "sha256:" + h, "size": len(data)}


def config_for(diff_ids: list[str], arch: str = "amd64", cfg: dict | None = None) -> bytes:
    body = {
        "architecture": arch,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": cfg or {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "1970-01-01T00:00:00Z", "created_by": f"layer {i}"}
            for i in range(len(diff_ids))
        ],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def compress(raw: bytes, how: str) -> tuple[bytes, str]:
    if how == "gzip":
        return gzip.compress(raw, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
    if how == "zstd":
        import zstandard

        return (
            zstandard.ZstdCompressor().compress(raw),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        )
    return raw, "application/vnd.oci.image.layer.v1.tar"


def make_manifest(
    root: Path,
    layers: list[list[Entry]],
    compression: str = "gzip",
    cfg: dict | None = None,
    arch: str = "amd64",
) -> tuple[dict[str, Any], list[str]]:
    """Blobs of one image in ``root``; returns (manifest descriptor, diff_ids)."""
    descs, diff_ids = [], []
    for ents in layers:
        raw = tar_bytes(ents)
        diff_ids.append(sha256(raw))
        blob, mtype = compress(raw, compression)
        descs.append({"mediaType": mtype, **_put(root, blob)})
    c = _put(root, config_for(diff_ids, arch, cfg))
    man = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **c},
        "layers": descs,
    }
    m = _put(root, json.dumps(man, separators=(",", ":")).encode())
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", **m}, diff_ids


def make_layout(
    root: Path,
    layers: list[list[Entry]],
    tag: str = "test",
    compression: str = "gzip",
    cfg: dict | None = None,
) -> list[str]:
    """A minimal OCI image layout (containers.md §6.2); returns the diff_ids."""
    root.mkdir(parents=True, exist_ok=True)
    desc, diff_ids = make_manifest(root, layers, compression, cfg)
    desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    write_index(root, [desc])
    return diff_ids


def write_index(root: Path, descs: list[dict[str, Any]]) -> None:
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descs,
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def make_multiplatform(root: Path, per_arch: dict[str, list[list[Entry]]], tag: str) -> None:
    """An index.json -> nested index -> one manifest per architecture."""
    root.mkdir(parents=True, exist_ok=True)
    children = []
    for arch, layers in per_arch.items():
        desc, _ = make_manifest(root, layers, arch=arch)
        desc["platform"] = {"os": "linux", "architecture": arch}
        children.append(desc)
    nested = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": children,
    }
    n = _put(root, json.dumps(nested).encode())
    write_index(
        root,
        [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                **n,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    )


def tar_dir(src: Path, dst: Path, symlinks_ok: bool = True) -> Path:
    """Pack a directory (an image layout or a docker-save tree) into a tar."""
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(src.rglob("*")):
            tf.add(path, arcname=str(path.relative_to(src)), recursive=False)
    return dst


def docker_save(
    root: Path, layers: list[list[Entry]], style: str, repotag: str = "example/app:1"
) -> list[str]:
    """A ``docker save`` tree in ``root``: ``legacy`` (Docker <= 24), ``hybrid``
    (Docker 25-28: OCI layout, uncompressed blobs named by diff_id, plus
    manifest.json), ``hybrid-gzip`` (Docker 29, containerd store) or ``skopeo``
    (``<diffid>.tar`` with ``<v1id>/layer.tar`` symlinks)."""
    root.mkdir(parents=True, exist_ok=True)
    raws = [tar_bytes(e) for e in layers]
    diff_ids = [sha256(r) for r in raws]
    cfg = config_for(diff_ids)
    cfg_hex = hashlib.sha256(cfg).hexdigest()
    layer_paths = []
    if style == "legacy" or style == "skopeo":
        (root / f"{cfg_hex}.json").write_bytes(cfg)
        for i, raw in enumerate(raws):
            v1 = hashlib.sha256(b"v1 %d" % i + raw).hexdigest()
            (root / v1).mkdir()
            (root / v1 / "VERSION").write_text("1.0")
            (root / v1 / "json").write_text(json.dumps({"id": v1}))
            if style == "legacy":
                (root / v1 / "layer.tar").write_bytes(raw)
            else:
                name = diff_ids[i].split(":")[1] + ".tar"
                (root / name).write_bytes(raw)
                os.symlink(f"../{name}", root / v1 / "layer.tar")
            layer_paths.append(f"{v1}/layer.tar")
        config_path = f"{cfg_hex}.json"
    else:
        compression = "gzip" if style == "hybrid-gzip" else "none"
        desc, _ = make_manifest(root, layers, compression)
        desc["annotations"] = {
            "io.containerd.image.name": "docker.io/" + repotag,
            "org.opencontainers.image.ref.name": repotag.rsplit(":", 1)[1],
        }
        write_index(root, [desc])
        man = json.loads((root / "blobs/sha256" / desc["digest"].split(":")[1]).read_bytes())
        layer_paths = ["blobs/sha256/" + d["digest"].split(":")[1] for d in man["layers"]]
        config_path = "blobs/sha256/" + man["config"]["digest"].split(":")[1]
    manifest = [{"Config": config_path, "RepoTags": [repotag], "Layers": layer_paths}]
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "repositories").write_text("{}")
    return diff_ids
