"""Reading images: OCI layouts, oci-archive tars and every ``docker save`` layout.

An image source is a directory or a tar holding one of:

- an OCI image layout (``oci-layout``, ``index.json``, ``blobs/ALG/HEX``), with
  nested indexes (multi-platform images: the platform of this machine, or
  the one asked for, is chosen);
- a ``docker save`` / ``docker-archive`` tar: ``manifest.json`` naming a
  config and layer files, in the legacy layout (``<v1id>/layer.tar``), the
  Docker 25+ hybrid (an OCI layout beside it, uncompressed or gzip layers)
  and skopeo's (``<v1id>/layer.tar`` a symlink to ``<diffid>.tar``).

Nothing is trusted: the manifest and config are read whole (they are small,
and capped) and checked against their digests; a layer is streamed once,
never held in memory, through a reader that checks the stored blob's size
and digest, the decompressor chosen from its first bytes (gzip, zstd, bzip2,
xz or none: media types lie, ``manifest.json`` has none), and a reader that
checks the uncompressed stream against the config's ``diff_id``.  A mismatch
raises ImageError, a one-line message.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import os
import platform as platform_mod
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

#: Manifests and configs larger than this are refused (real ones are KiBs).
JSON_CAP = 16 << 20
_CHUNK = 1 << 20
#: Compressed bytes fed at a time: bounds what one call can inflate (gzip: ~1000x).
_FEED = 64 << 10

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_HEX = {"sha256": 64, "sha512": 128}


class ImageError(Exception):
    """A source that cannot be imported: one line, saying what and where."""


# -- digests -------------------------------------------------------------------


def parse_digest(digest: str) -> tuple[str, str]:
    """``ALG:HEX`` split and checked (sha256 and sha512; lowercase hex only)."""
    alg, _, hexpart = digest.partition(":")
    if alg not in _HEX:
        raise ImageError(f"unsupported digest algorithm in {digest!r}")
    if len(hexpart) != _HEX[alg] or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise ImageError(f"malformed digest {digest!r}")
    return alg, hexpart


def digest_of(data: bytes, alg: str = "sha256") -> str:
    return f"{alg}:{hashlib.new(alg, data).hexdigest()}"


class VerifyingReader:
    """Reads a stream through, checking its size and digest as the bytes pass.

    ``finish()`` reads whatever the consumer left (tar padding after the end
    marker), then compares.  ``size`` None checks no size, ``digest`` None
    only counts (the digest of what passed is then ``.digest()``).
    """

    def __init__(self, raw: IO[bytes] | Any, digest: str | None, size: int | None, what: str):
        self.raw = raw
        self.want = digest
        alg = parse_digest(digest)[0] if digest else "sha256"
        self.hash = hashlib.new(alg)
        self.alg = alg
        self.size = size
        self.count = 0
        self.what = what
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _CHUNK
        data = self.raw.read(n)
        if not data:
            self.eof = True
            return b""
        self.count += len(data)
        if self.size is not None and self.count > self.size:
            raise ImageError(f"{self.what}: more than the {self.size} bytes its descriptor says")
        self.hash.update(data)
        return data

    def digest(self) -> str:
        return f"{self.alg}:{self.hash.hexdigest()}"

    def finish(self) -> None:
        while self.read(_CHUNK):
            pass
        if self.size is not None and self.count != self.size:
            raise ImageError(
                f"{self.what}: {self.count} bytes where its descriptor says {self.size}"
            )
        if self.want is not None and self.digest() != self.want:
            raise ImageError(f"{self.what}: digest mismatch (got {self.digest()})")


# -- compression -----------------------------------------------------------------


def sniff(head: bytes) -> str:
    """The compression of a stream from its first bytes: gzip, zstd, bzip2, xz or none."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return "none"


class _Decompressor:
    """A decompressing ``read`` over a compressed stream of any number of members."""

    def __init__(self, raw: Any, head: bytes, make: Callable[[], Any]) -> None:
        self.raw = raw
        self.make = make
        self.obj = make()
        self.fed = False  # the current member has started
        self.pending = head
        self.out = b""
        self.pos = 0  # read position in ``out`` (slicing it on each read is quadratic)
        self.done = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _CHUNK
        while self.pos >= len(self.out) and not self.done:
            data = self.pending or self.raw.read(_FEED)
            self.pending = b""
            if not data:
                if self.fed:
                    raise ImageError("compressed layer ends early")
                self.done = True
                break
            self.fed = True
            try:
                self.out = self.obj.decompress(data)
                self.pos = 0
            except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as e:
                raise ImageError(f"corrupt compressed layer: {e}") from None
            if self.obj.eof:  # a member ended; another starts only if bytes follow
                self.pending = self.obj.unused_data
                self.obj = self.make()
                self.fed = False
        out = self.out[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def decompressed(raw: Any) -> tuple[str, Any]:
    """(compression, a reader of the uncompressed bytes) for a blob stream."""
    head = raw.read(6)
    kind = sniff(head)
    if kind == "none":
        return kind, _Prefixed(head, raw)
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise ImageError(
                "a zstd layer needs the zstandard package (pip install zstandard)"
            ) from None
        reader = zstandard.ZstdDecompressor().stream_reader(
            _Prefixed(head, raw), read_across_frames=True, closefd=False
        )
        return kind, _ZstdReader(reader)
    makers: dict[str, Callable[[], Any]] = {
        "gzip": lambda: zlib.decompressobj(wbits=31),
        "bzip2": bz2.BZ2Decompressor,
        "xz": lzma.LZMADecompressor,
    }
    make = makers[kind]
    return kind, _Decompressor(raw, head, make)


class _Prefixed:
    def __init__(self, head: bytes, raw: Any) -> None:
        self.head = head
        self.raw = raw

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out = self.head if n < 0 else self.head[:n]
            self.head = self.head[len(out) :]
            return out
        return self.raw.read(n)


class _ZstdReader:
    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def read(self, n: int = -1) -> bytes:
        try:
            return self.reader.read(_CHUNK if n is None or n < 0 else n)
        except Exception as e:  # zstandard.ZstdError
            raise ImageError(f"corrupt zstd layer: {e}") from None


# -- sources -------------------------------------------------------------------


def _clean(rel: str) -> str:
    """A path named inside a source, kept inside it."""
    parts: list[str] = []
    for p in rel.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                raise ImageError(f"path {rel!r} in the image points outside it")
            parts.pop()
        else:
            parts.append(p)
    return "/".join(parts)


class DirSource:
    """An image directory.  Blob files may be symlinks (shared blob dirs): they
    are only read, and their content is checked against the digests."""

    def __init__(self, root: str) -> None:
        self.root = root

    def exists(self, rel: str) -> bool:
        return os.path.isfile(os.path.join(self.root, _clean(rel)))

    def open(self, rel: str) -> IO[bytes]:
        try:
            return open(os.path.join(self.root, _clean(rel)), "rb")
        except OSError as e:
            raise ImageError(f"{rel}: {e.strerror}") from None

    def close(self) -> None:
        pass


class TarSource:
    """An image tar (oci-archive, docker-archive), read in place: members are
    found by name and read through; symlinks and hard links between members
    (skopeo's ``<v1id>/layer.tar -> ../<diffid>.tar``) are followed inside it."""

    def __init__(self, path: str) -> None:
        try:
            self.tf = tarfile.open(path, "r:*")  # noqa: SIM115
        except (tarfile.TarError, OSError) as e:
            raise ImageError(f"{path}: not an image directory or tar ({e})") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for ti in self.tf:
            self.members[_clean_member(ti.name)] = ti

    def _resolve(self, rel: str) -> tarfile.TarInfo:
        name = _clean(rel)
        for _ in range(16):
            ti = self.members.get(name)
            if ti is None:
                raise ImageError(f"{rel}: not in the archive")
            if ti.issym():
                name = _clean(posixpath.join(posixpath.dirname(name), ti.linkname))
            elif ti.islnk():
                name = _clean(ti.linkname)
            elif ti.isreg():
                return ti
            else:
                raise ImageError(f"{rel}: not a file in the archive")
        raise ImageError(f"{rel}: too many links in the archive")

    def exists(self, rel: str) -> bool:
        try:
            self._resolve(rel)
        except ImageError:
            return False
        return True

    def open(self, rel: str) -> IO[bytes]:
        f = self.tf.extractfile(self._resolve(rel))
        assert f is not None
        return f

    def close(self) -> None:
        self.tf.close()


def _clean_member(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def open_source(path: str) -> DirSource | TarSource:
    if os.path.isdir(path):
        return DirSource(path)
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file or directory")
    return TarSource(path)


# -- platforms -------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)

    @classmethod
    def parse(cls, spec: str) -> Platform:
        parts = spec.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(f"a platform is OS/ARCH[/VARIANT], not {spec!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, desc: dict[str, Any]) -> bool:
        """Does an index entry's ``platform`` fit?  No variant asked: any fits."""
        p = desc.get("platform") or {}
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        return self.variant is None or p.get("variant") in (self.variant, None)


_MACHINES = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def this_platform() -> Platform:
    arch, variant = _MACHINES.get(platform_mod.machine(), (platform_mod.machine(), None))
    return Platform("linux", arch, variant)


# -- images ----------------------------------------------------------------------


@dataclass
class LayerBlob:
    """One layer as the source stores it, and what it must verify as."""

    path: str
    diff_id: str
    digest: str | None
    size: int | None
    media_type: str | None = None


@dataclass
class SourceImage:
    """An image found in a source, its JSON verified, its layers not read yet."""

    name: str | None
    config: dict[str, Any]
    config_digest: str
    manifest: dict[str, Any] | None
    manifest_digest: str | None
    layers: list[LayerBlob] = field(default_factory=list)
    layout: str = "oci"
    #: A tag without a name: an OCI ``ref.name`` such as ``v1`` (see split_ref_name).
    tag: str | None = None

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]


def blob_path(digest: str) -> str:
    alg, hexpart = parse_digest(digest)
    return f"blobs/{alg}/{hexpart}"


def read_json(src: DirSource | TarSource, rel: str, digest: str | None, size: int | None) -> Any:
    """A small JSON file of the source, checked against its digest and size."""
    what = rel if digest is None else digest
    if size is not None and size > JSON_CAP:
        raise ImageError(f"{what}: {size} bytes is too big for a manifest or config")
    with src.open(rel) as f:
        reader = VerifyingReader(f, digest, size, what)
        chunks = []
        total = 0
        while chunk := reader.read(_CHUNK):
            total += len(chunk)
            if total > JSON_CAP:
                raise ImageError(f"{what}: too big for a manifest or config")
            chunks.append(chunk)
        reader.finish()
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what}: not JSON ({e})") from None


def _blob_json(src: DirSource | TarSource, desc: dict[str, Any]) -> Any:
    try:
        digest, size = desc["digest"], int(desc["size"])
    except (KeyError, TypeError, ValueError):
        raise ImageError(f"malformed descriptor {json.dumps(desc)[:200]}") from None
    return read_json(src, blob_path(digest), digest, size)


def _names(desc: dict[str, Any]) -> list[str]:
    ann = desc.get("annotations") or {}
    return [
        n
        for n in (ann.get("io.containerd.image.name"), ann.get("org.opencontainers.image.ref.name"))
        if n
    ]


def load_image(
    path: str, ref: str | None = None, platform: Platform | None = None
) -> tuple[DirSource | TarSource, SourceImage]:
    """Open ``path`` and find the image in it (``ref`` chooses one of several).

    Returns the open source (the caller closes it after reading the layers).
    """
    src = open_source(path)
    try:
        if src.exists("index.json"):
            image = _oci_image(src, ref, platform or this_platform())
        elif src.exists("manifest.json"):
            image = _docker_image(src, ref)
        else:
            raise ImageError(
                f"{path}: neither an OCI layout (index.json) nor a docker save (manifest.json)"
            )
    except BaseException:
        src.close()
        raise
    return src, image


def _oci_image(src: DirSource | TarSource, ref: str | None, plat: Platform) -> SourceImage:
    index = read_json(src, "index.json", None, None)
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ImageError("index.json: no manifests list")
    descs = [d for d in index["manifests"] if isinstance(d, dict)]
    if ref is not None:
        descs = [d for d in descs if ref in _names(d) or _short(ref) in _names(d)]
        if not descs:
            raise ImageError(f"no image named {ref!r} in index.json")
    if not descs:
        raise ImageError("index.json lists no image")
    names = {tuple(_names(d)) for d in descs}
    if len(descs) > 1 and len(names) > 1 and ref is None:
        shown = ", ".join(sorted(n[0] for n in names if n)) or "unnamed"
        raise ImageError(f"the layout holds several images ({shown}): choose one with --ref")
    desc = _choose_platform(descs, plat) if len(descs) > 1 else descs[0]
    name = (_names(desc) or [None])[0]
    for _ in range(8):
        body = _blob_json(src, desc)
        mtype = desc.get("mediaType") or body.get("mediaType")
        if mtype in INDEX_TYPES or (mtype is None and "manifests" in body):
            children = [d for d in body.get("manifests", []) if isinstance(d, dict)]
            desc = _choose_platform(children, plat)
            continue
        if mtype not in MANIFEST_TYPES and not (mtype is None and "layers" in body):
            raise ImageError(f"{desc.get('digest')}: not an image manifest ({mtype})")
        image = _from_manifest(src, body, desc["digest"], name)
        image.name, image.tag = split_ref_name(name)
        return image
    raise ImageError("index nesting too deep")


def split_ref_name(name: str | None) -> tuple[str | None, str | None]:
    """(name, tag) a layout's annotation gives: a bare word is only a tag.

    ``org.opencontainers.image.ref.name`` holds a tag (``v1``, what skopeo,
    umoci and docker write) or a full reference (``localhost/app:v1``, with a
    ``/`` or ``:``); skopeo and umoci read a bare word as the tag, never as
    the image's name.
    """
    if name is None or "/" in name or ":" in name:
        return name, None
    return None, name


def _short(ref: str) -> str:
    """The tag part of a reference, as Docker's ``ref.name`` annotation holds it."""
    last = ref.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else "latest"


def _choose_platform(descs: list[dict[str, Any]], plat: Platform) -> dict[str, Any]:
    fits = [d for d in descs if d.get("platform") and plat.matches(d)]
    if fits:
        return fits[0]
    images = [d for d in descs if (d.get("platform") or {}).get("os") not in (None, "unknown")]
    if not images and len(descs) == 1:
        return descs[0]
    have = ", ".join(
        sorted(
            str(Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant")))
            for p in (d.get("platform") or {} for d in images)
        )
    )
    raise ImageError(
        f"no image for {plat} (the index has: {have or 'none'}); choose with --platform"
    )


def _from_manifest(
    src: DirSource | TarSource, manifest: dict[str, Any], mdigest: str, name: str | None
) -> SourceImage:
    try:
        cdesc = manifest["config"]
        ldescs = manifest["layers"]
    except (KeyError, TypeError):
        raise ImageError(f"{mdigest}: a manifest without config or layers") from None
    config = _blob_json(src, cdesc)
    diff_ids = _diff_ids(config, cdesc["digest"])
    if len(diff_ids) != len(ldescs):
        raise ImageError(
            f"{mdigest}: {len(ldescs)} layers but the config lists {len(diff_ids)} diff_ids"
        )
    layers = []
    for d, diff_id in zip(ldescs, diff_ids, strict=True):
        try:
            layers.append(
                LayerBlob(
                    blob_path(d["digest"]), diff_id, d["digest"], int(d["size"]), d.get("mediaType")
                )
            )
        except (KeyError, TypeError, ValueError):
            raise ImageError(f"{mdigest}: malformed layer descriptor") from None
    return SourceImage(name, config, cdesc["digest"], manifest, mdigest, layers, "oci")


def _diff_ids(config: Any, what: str) -> list[str]:
    try:
        ids = config["rootfs"]["diff_ids"]
        assert isinstance(ids, list)
    except (KeyError, TypeError, AssertionError):
        raise ImageError(f"{what}: config has no rootfs.diff_ids") from None
    for d in ids:
        parse_digest(d)
    return ids


_HEXNAME = re.compile(r"(?:^|/)(?:sha256[:/])?([0-9a-f]{64})(?:\.json|\.tar)?$")


def _docker_image(src: DirSource | TarSource, ref: str | None) -> SourceImage:
    entries = read_json(src, "manifest.json", None, None)
    if not isinstance(entries, list) or not entries:
        raise ImageError("manifest.json: not a list of images")
    if ref is not None:
        chosen = [e for e in entries if ref in (e.get("RepoTags") or [])]
        if not chosen:
            raise ImageError(f"no image tagged {ref!r} in manifest.json")
    elif len(entries) > 1:
        tags = ", ".join(t for e in entries for t in (e.get("RepoTags") or [])[:1]) or "untagged"
        raise ImageError(f"the archive holds several images ({tags}): choose one with --ref")
    else:
        chosen = entries
    entry = chosen[0]
    try:
        cfg_path, layer_paths = entry["Config"], entry["Layers"]
    except (KeyError, TypeError):
        raise ImageError("manifest.json: an entry without Config or Layers") from None
    m = _HEXNAME.search(cfg_path)
    cdigest = f"sha256:{m.group(1)}" if m else None
    config = read_json(src, cfg_path, cdigest, None)
    if cdigest is None:
        cdigest = digest_of(json.dumps(config).encode())
    diff_ids = _diff_ids(config, cfg_path)
    if len(diff_ids) != len(layer_paths):
        raise ImageError(
            f"manifest.json: {len(layer_paths)} layers but the config lists {len(diff_ids)}"
        )
    layers = []
    for lp, diff_id in zip(layer_paths, diff_ids, strict=True):
        # A blobs/sha256/HEX path is content-addressed: its digest is checked too.
        m = re.search(r"(?:^|/)blobs/(sha256|sha512)/([0-9a-f]+)$", lp)
        digest = f"{m.group(1)}:{m.group(2)}" if m else None
        layers.append(LayerBlob(lp, diff_id, digest, None))
    name = (entry.get("RepoTags") or [None])[0]
    return SourceImage(name, config, cdigest, None, None, layers, "docker")
