"""Writing images out: an OCI image layout, an oci-archive, or a docker-archive.

The store keeps layers extracted (``layers/sha256/HEX/diff``), not as the
blobs they came in, so every layer is re-tarred here from its directory:

- markers are already in the OCI format there (the extractor writes
  ``.wh.NAME`` and ``.wh..wh..opq`` files, see extract.py), so they go back
  into the tar as they are, as the changeset writer writes markers (empty,
  mode 0, owner 0:0, time 0), each directory's markers right after it;
- owners, modes and device numbers a rootless extraction kept as metadata
  (``unionfs.ownership``: xattrs or the layer's side table) become the tar's
  uid/gid/mode/type again; the metadata xattrs themselves are not exported;
- hard links (one inode, several names) become tar hard links to the first
  name in path order;
- reproducible as the changeset writer is (its ``TarStream`` and ustar
  encoding, gzip without a time): the same store gives the same bytes, so
  exporting twice gives the same digests.

Each output is built under a temporary name beside it (``.NAME.partial-PID``)
and renamed into place at the end: a failure or SIGKILL leaves no half image
under the output's name.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import os
import shutil
import stat as stat_mod
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from .. import markers, ownership
from .changeset import (
    MEDIA_TYPES,
    LayerSink,
    TarStream,
    clamp_time,
    source_date_epoch,
)
from .layout import ImageError, parse_digest

FORMATS = ("oci", "oci-archive", "docker-archive")
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
REF_ANNOTATION = "org.opencontainers.image.ref.name"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Path = tuple[bytes, ...]
#: progress(layer_no, layer_count, bytes written of this layer)
Progress = Callable[[int, int, int], None]


@dataclass(frozen=True)
class WrittenLayer:
    """One re-tarred layer: its blob's digest and size, and its diff_id."""

    digest: str
    diff_id: str
    size: int
    media_type: str


def canonical_json(doc: Any) -> bytes:
    """JSON with sorted keys and no spaces: the same document, the same digest."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- one layer directory as a tar ----------------------------------------------------


def _sort_key(name: bytes) -> tuple[int, bytes]:
    """Opaque marker first, then whiteouts, then the rest: the changeset writer's order."""
    if name == markers.OPAQUE_NAME:
        return (0, name)
    if name.startswith(markers.WHITEOUT_PREFIX):
        return (1, name)
    return (2, name)


def _xattrs(dir_fd: int, name: bytes) -> dict[bytes, bytes]:
    """An object's xattrs, read without following a final symlink."""
    path = b"/proc/self/fd/%d/%s" % (dir_fd, name)
    try:
        names = [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return {}
        raise
    out = {}
    for n in names:
        with contextlib.suppress(OSError):
            out[n] = os.getxattr(path, n, follow_symlinks=False)
    return out


def exported_xattrs(values: dict[bytes, bytes]) -> dict[str, str]:
    """The PAX records of an object's xattrs: the union's and ownership's own left out,
    ``security.*`` kept under the saved prefix (a rootless extraction) under its name."""
    pax: dict[str, str] = {}
    for key, value in values.items():
        if markers.is_private_xattr(key) or key in ownership.OWNERSHIP_XATTRS:
            continue
        if key.startswith(ownership.SAVED_XATTR_PREFIX):
            key = key[len(ownership.SAVED_XATTR_PREFIX) :]
            if not key.startswith((b"security.", b"trusted.")):
                continue
        if not value:
            continue  # an empty PAX value deletes the key: as the changeset writer does
        pax["SCHILY.xattr." + key.decode("utf-8", "surrogateescape")] = value.decode(
            "utf-8", "surrogateescape"
        )
    return dict(sorted(pax.items()))


class LayerTar:
    """Writes one stored layer directory as a tar (the layer's own view, markers included)."""

    def __init__(self, tar: TarStream, root_fd: int, epoch: int | None) -> None:
        self.tar = tar
        self.root_fd = root_fd
        self.epoch = epoch
        self.table = ownership.read_table(root_fd) or {}
        self.links: dict[tuple[int, int], bytes] = {}
        self.entries = 0

    def write_dir(self, dir_fd: int, path: Path) -> None:
        for name in sorted((os.fsencode(n) for n in os.listdir(dir_fd)), key=_sort_key):
            if not path and name == ownership.SIDE_TABLE:
                continue
            self.write_entry(dir_fd, path, name)

    def write_entry(self, dir_fd: int, path: Path, name: bytes) -> None:
        rel = (*path, name)
        arcname = b"/".join(rel)
        add = self.tar.add_entry
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if name.startswith(markers.WHITEOUT_PREFIX):
            add(arcname, tarfile.REGTYPE, 0, (0, 0), 0)
            self.entries += 1
            return
        values = _xattrs(dir_fd, name)
        ov = self.table.get(arcname) or ownership.from_xattrs(values)
        mode, uid, gid, rdev = ownership.shown_stat(st, ov)
        perm, owner, mtime = stat_mod.S_IMODE(mode), (uid, gid), clamp_time(st, self.epoch)
        pax = exported_xattrs(values)
        if stat_mod.S_ISDIR(mode) and stat_mod.S_ISDIR(st.st_mode):
            add(arcname, tarfile.DIRTYPE, perm, owner, mtime, pax=pax)
            self.entries += 1
            sub = os.open(name, _DIR, dir_fd=dir_fd)
            try:
                self.write_dir(sub, rel)
            finally:
                os.close(sub)
            return
        if stat_mod.S_ISREG(st.st_mode) and stat_mod.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            first = self.links.get(key) if st.st_nlink > 1 else None
            if first is not None:
                add(arcname, tarfile.LNKTYPE, perm, owner, mtime, linkname=first, pax=pax)
            else:
                if st.st_nlink > 1:
                    self.links[key] = arcname
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    size = os.fstat(fd).st_size
                    add(arcname, tarfile.REGTYPE, perm, owner, mtime, size=size, pax=pax, fd=fd)
                finally:
                    os.close(fd)
        elif stat_mod.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=dir_fd)
            add(arcname, tarfile.SYMTYPE, perm, owner, mtime, linkname=target, pax=pax)
        elif stat_mod.S_ISCHR(mode) or stat_mod.S_ISBLK(mode):
            kind = tarfile.CHRTYPE if stat_mod.S_ISCHR(mode) else tarfile.BLKTYPE
            dev = (os.major(rdev), os.minor(rdev))
            add(arcname, kind, perm, owner, mtime, dev=dev, pax=pax)
        elif stat_mod.S_ISFIFO(mode):
            add(arcname, tarfile.FIFOTYPE, perm, owner, mtime, pax=pax)
        else:
            return  # sockets (and anything else) have no tar form: an extractor never makes them
        self.entries += 1


def write_layer_dir(
    layer_dir: str, out: IO[bytes], compression: str, epoch: int | None = None
) -> WrittenLayer:
    """Tar the stored layer ``layer_dir`` to ``out``, compressed as asked."""
    sink = LayerSink(out, compression)
    root_fd = os.open(layer_dir, _DIR)
    try:
        LayerTar(sink.tar, root_fd, epoch).write_dir(root_fd, ())
    finally:
        os.close(root_fd)
    digest, diff_id, size = sink.finish()
    return WrittenLayer(digest, diff_id, size, MEDIA_TYPES[compression])


# -- the image's blobs ---------------------------------------------------------------


@dataclass
class Written:
    """What an export wrote: the digests a script wants."""

    output: str
    format: str
    ref: str
    manifest_digest: str
    config_digest: str
    layers: list[WrittenLayer]

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "format": self.format,
            "ref": self.ref,
            "manifest": self.manifest_digest,
            "config": self.config_digest,
            "layers": [
                {"digest": w.digest, "diffID": w.diff_id, "size": w.size, "mediaType": w.media_type}
                for w in self.layers
            ],
        }


def _put_blob_file(blobs: str, tmp_name: str, digest: str) -> None:
    _, hexpart = parse_digest(digest)
    os.replace(os.path.join(blobs, tmp_name), os.path.join(blobs, hexpart))


def _put_blob(blobs: str, data: bytes) -> dict[str, Any]:
    digest = _sha(data)
    with open(os.path.join(blobs, parse_digest(digest)[1]), "wb") as f:
        f.write(data)
    return {"digest": digest, "size": len(data)}


def new_config(image_config: dict[str, Any], diff_ids: list[str]) -> dict[str, Any]:
    """The image config with the re-tarred layers' diff_ids (everything else kept)."""
    config = copy.deepcopy(image_config)
    rootfs = config.setdefault("rootfs", {"type": "layers"})
    rootfs["type"] = "layers"
    rootfs["diff_ids"] = diff_ids
    return config


def write_blobs(
    root: str,
    layer_dirs: list[str],
    image_config: dict[str, Any],
    compression: str,
    progress: Progress | None = None,
) -> tuple[list[WrittenLayer], dict[str, Any], dict[str, Any], bytes]:
    """Layers (bottom first), config and manifest as blobs under ``root/blobs/sha256``.

    Returns (layers, config descriptor, manifest descriptor, config bytes).
    """
    blobs = os.path.join(root, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    epoch = source_date_epoch()
    written = []
    for i, d in enumerate(layer_dirs):
        tmp_name = f".layer-{i}"
        with open(os.path.join(blobs, tmp_name), "wb") as f:
            counter = _Progressing(f, i + 1, len(layer_dirs), progress)
            w = write_layer_dir(d, counter, compression, epoch)  # type: ignore[arg-type]
        _put_blob_file(blobs, tmp_name, w.digest)
        written.append(w)
    config = new_config(image_config, [w.diff_id for w in written])
    config_bytes = canonical_json(config)
    cdesc = {"mediaType": CONFIG_TYPE, **_put_blob(blobs, config_bytes)}
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": cdesc,
        "layers": [
            {"mediaType": w.media_type, "digest": w.digest, "size": w.size} for w in written
        ],
    }
    mdesc = {"mediaType": MANIFEST_TYPE, **_put_blob(blobs, canonical_json(manifest))}
    return written, cdesc, mdesc, config_bytes


class _Progressing:
    """A write-through file that reports the bytes written so far."""

    def __init__(self, f: IO[bytes], number: int, count: int, progress: Progress | None) -> None:
        self.f, self.number, self.count, self.progress = f, number, count, progress
        self.done = 0

    def write(self, data: bytes) -> int:
        n = self.f.write(data)
        self.done += len(data)
        if self.progress is not None:
            self.progress(self.number, self.count, self.done)
        return n

    def flush(self) -> None:
        self.f.flush()


# -- the three formats ---------------------------------------------------------------


def _oci_layout(root: str, mdesc: dict[str, Any], ref: str) -> None:
    with open(os.path.join(root, "oci-layout"), "wb") as f:
        f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ref
    desc = {**mdesc, "annotations": {REF_ANNOTATION: tag, "io.containerd.image.name": ref}}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
    index["manifests"] = [desc]  # type: ignore[assignment]
    with open(os.path.join(root, "index.json"), "wb") as f:
        f.write(canonical_json(index))


def _docker_files(root: str, written: list[WrittenLayer], cdesc: dict[str, Any], ref: str) -> None:
    """docker save's own files over the blobs: manifest.json and repositories.

    The layers are plain tars (docker load wants them so), named
    ``blobs/sha256/HEX`` as Docker >= 25 writes them.
    """
    chex = parse_digest(cdesc["digest"])[1]
    layers = [f"blobs/sha256/{parse_digest(w.digest)[1]}" for w in written]
    manifest = [{"Config": f"blobs/sha256/{chex}", "RepoTags": [ref], "Layers": layers}]
    with open(os.path.join(root, "manifest.json"), "wb") as f:
        f.write(canonical_json(manifest))
    name, tag = ref.rsplit(":", 1)
    top = parse_digest(written[-1].diff_id)[1] if written else chex
    with open(os.path.join(root, "repositories"), "wb") as f:
        f.write(canonical_json({name: {tag: top}}))


def _tar_tree(root: str, out: IO[bytes]) -> None:
    """A directory as a reproducible tar: path order, 0:0, mode 0644/0755, time 0."""
    tar = TarStream(out)

    def walk(dir_fd: int, prefix: str) -> None:
        for name in sorted(os.listdir(dir_fd)):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            ti = tarfile.TarInfo(prefix + name)
            ti.uid = ti.gid = ti.mtime = 0
            ti.uname = ti.gname = ""
            if stat_mod.S_ISDIR(st.st_mode):
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.add(ti)
                sub = os.open(name, _DIR, dir_fd=dir_fd)
                try:
                    walk(sub, prefix + name + "/")
                finally:
                    os.close(sub)
            else:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    ti.mode, ti.size = 0o644, os.fstat(fd).st_size
                    tar.add(ti, fd)
                finally:
                    os.close(fd)

    root_fd = os.open(root, _DIR)
    try:
        walk(root_fd, "")
    finally:
        os.close(root_fd)
    tar.close()


def check_output(output: str) -> None:
    """One-line errors before any work: the output must not exist, its directory must."""
    if os.path.lexists(output):
        raise ImageError(f"{output}: already exists (remove it, or choose another name)")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise ImageError(f"{parent}: no such directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ImageError(f"{parent}: not writable")


def export_image(
    layer_dirs: list[str],
    image_config: dict[str, Any],
    ref: str,
    output: str,
    fmt: str,
    progress: Progress | None = None,
) -> Written:
    """Write an image (``layer_dirs`` bottom first) as ``fmt`` at ``output``, whole or not."""
    if fmt not in FORMATS:
        raise ImageError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    check_output(output)
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    try:
        compression = "none" if fmt == "docker-archive" else "gzip"
        written, cdesc, mdesc, _ = write_blobs(
            work, layer_dirs, image_config, compression, progress
        )
        if fmt == "docker-archive":
            _docker_files(work, written, cdesc, ref)
        else:
            _oci_layout(work, mdesc, ref)
        _sync(work)
        if fmt == "oci":
            os.chmod(work, 0o755 & ~_umask())
            _rename_new(work, output)
            work = ""
        else:
            tmp = work + ".tar"
            try:
                with open(tmp, "xb") as f:
                    _tar_tree(work, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644 & ~_umask())
                _rename_new(tmp, output)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    return Written(output, fmt, ref, mdesc["digest"], cdesc["digest"], written)


def _rename_new(src: str, dst: str) -> None:
    """Rename into place, never over something that appeared meanwhile."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, noreplace = -100, 1
    if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) != 0:
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise ImageError(f"{dst}: already exists (created meanwhile)")
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), dst)
        if os.path.lexists(dst):
            raise ImageError(f"{dst}: already exists (created meanwhile)")
        os.rename(src, dst)
    dfd = os.open(os.path.dirname(dst), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _sync(path: str) -> None:
    """syncfs before the rename: a crash must not leave a renamed but unwritten image."""
    from ..syscalls import syncfs

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
