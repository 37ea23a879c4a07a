"""The layer store: images by NAME:TAG, each layer extracted once, by diff_id.

Layout of a store (default ``$XDG_DATA_HOME/unionfs``; ``UNIONFS_STORE`` or
``--store`` moves it)::

    layers/sha256/HEX/diff        the extracted layer: a unionfs-mount lower
    layers/sha256/HEX/layer.json  its diff_id, size, entry count, ownership format
    images/QUOTED-REF.json        one image: its layers (diff_ids), config, manifest
    tmp/                          extractions in progress, and layers being removed
    lock                          imports hold it shared, gc exclusively

Layers are keyed by diff_id alone (not by their parent chain as Docker and
containers/storage do): the union reads each layer's own whiteouts, so one
extracted layer serves every image that has it, on any base.

Atomicity: every new layer of an import is extracted and verified in
``tmp/`` first; only when all of them verified does a rename per layer move
them into ``layers/`` (after one ``syncfs``, so a crash cannot leave a renamed
but unwritten layer), ``layers/sha256`` is fsynced, and then the image record
is written with a rename.  A failed verification, ENOSPC or SIGKILL therefore
never leaves a half layer under ``layers/``; what it leaves in ``tmp/`` is
removed by the next ``gc``.  The one thing not undone: when a later layer's
rename fails (or the process dies between the renames and the record), the
layers already renamed stay in ``layers/``, whole but named by no image, and
no mount can use them by name; the next ``gc`` removes them (a re-import
reuses them instead).

A store can be used read-only (a shared store on NFS): ``image()`` and
``images()`` only read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat as stat_mod
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from ..oci import extract, layout
from ..oci.layout import ImageError, Platform
from ..ownership import real_root
from ..syscalls import syncfs

DEFAULT_TAG = "latest"

log = logging.getLogger(__name__)


class StoreError(ImageError):
    """A store problem (missing image, read-only store, ...): one line."""


# -- references ------------------------------------------------------------------

_BAD_REF = re.compile(r"[\s\x00-\x1f\x7f]")


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME[:TAG]`` -> (name, tag); the tag defaults to ``latest``.

    A colon before the last ``/`` belongs to a registry port
    (``localhost:5000/app``), not to the tag.
    """
    if not ref or _BAD_REF.search(ref) or ref.startswith("-") or "@" in ref:
        raise StoreError(f"invalid image reference {ref!r} (NAME[:TAG])")
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = ref.rsplit(":", 1)
    else:
        name, tag = ref, DEFAULT_TAG
    if not name or not tag or name.endswith("/"):
        raise StoreError(f"invalid image reference {ref!r} (NAME[:TAG])")
    if _path_part(name) != _path_part(name).lower():
        raise StoreError(f"invalid image reference {ref!r}: the name must be lowercase")
    return name, tag


def _path_part(name: str) -> str:
    """A name without its registry (``Registry.Example:5000/app`` -> ``app``).

    Docker's grammar allows capitals in the domain only; a first component
    is a domain when it has a dot or a port, or is ``localhost``.
    """
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return rest
    return name


def canonical(ref: str) -> str:
    name, tag = parse_ref(ref)
    return f"{name}:{tag}"


def default_root() -> str:
    """``$UNIONFS_STORE``, else ``$XDG_DATA_HOME/unionfs``, else ``~/.local/share/unionfs``."""
    env = os.environ.get("UNIONFS_STORE")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return os.path.join(base, "unionfs")


# -- records ---------------------------------------------------------------------


@dataclass
class Image:
    """An image in the store, as the mount and the runner want it.

    ``layers``: layer directories, **top first** (unionfs-mount's order);
    ``diff_ids``: bottom first (the config's order); ``config``: the image
    config's ``config`` object (Env, WorkingDir, User, Entrypoint, Cmd, ...).
    """

    ref: str
    layers: list[str]
    diff_ids: list[str]
    config: dict[str, Any]
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return parse_ref(self.ref)[0]

    @property
    def tag(self) -> str:
        return parse_ref(self.ref)[1]

    @property
    def id(self) -> str:
        """The image ID: the config's digest, as Docker and podman show it."""
        return str(self.record["config_digest"])

    @property
    def full_config(self) -> dict[str, Any]:
        return dict(self.record["image_config"])


Progress = Callable[[str, int, int, int, int], None]
"""progress(diff_id, layer_no, layer_count, bytes_read, bytes_total)."""


class Store:
    """One user's layer store.  Use ``Store.open()``."""

    def __init__(self, root: str, readonly: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.readonly = readonly
        #: Record ownership in each layer's side table rather than in xattrs
        #: (for a store bound for a filesystem without user xattrs, e.g. NFS);
        #: without it the table is used only where xattrs fail.
        self.side_table = False
        #: diff_ids the last gc kept because a mount holds them.
        self.in_use: list[str] = []

    @classmethod
    def open(cls, path: str | None = None, readonly: bool | None = None) -> Store:
        """The store at ``path`` (default: ``default_root()``); it need not exist yet.

        ``readonly`` None: read-only when the store exists and is not writable.
        """
        root = path or default_root()
        if readonly is None:
            readonly = os.path.isdir(root) and not os.access(root, os.W_OK | os.X_OK)
        return cls(root, readonly)

    # paths --------------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def layer_dir(self, diff_id: str) -> str:
        """Where a layer's tree is (a lower for unionfs-mount)."""
        alg, hexpart = layout.parse_digest(diff_id)
        return self._p("layers", alg, hexpart, "diff")

    def has_layer(self, diff_id: str) -> bool:
        return os.path.isfile(os.path.join(os.path.dirname(self.layer_dir(diff_id)), "layer.json"))

    def _record_path(self, ref: str) -> str:
        return self._p("images", urllib.parse.quote(canonical(ref), safe="") + ".json")

    # reading ------------------------------------------------------------------

    def image(self, ref: str) -> Image:
        """The image ``NAME[:TAG]``; StoreError when the store has none."""
        key = canonical(ref)
        try:
            with open(self._record_path(key), "rb") as f:
                record = json.load(f)
        except FileNotFoundError:
            raise StoreError(f"no image {key!r} in the store {self.root}") from None
        except (OSError, ValueError) as e:
            raise StoreError(f"image {key!r}: unreadable record ({e})") from None
        return self._image(record)

    def _image(self, record: dict[str, Any]) -> Image:
        diff_ids = list(record["layers"])
        missing = [d for d in diff_ids if not self.has_layer(d)]
        if missing:
            raise StoreError(
                f"image {record['ref']!r}: layer {missing[0]} is missing from the store"
                " (re-import the image)"
            )
        dirs = [self.layer_dir(d) for d in reversed(diff_ids)]
        config = (record.get("image_config") or {}).get("config") or {}
        return Image(record["ref"], dirs, diff_ids, dict(config), record)

    def images(self) -> list[dict[str, Any]]:
        """Every image record, sorted by reference."""
        out = []
        try:
            names = os.listdir(self._p("images"))
        except FileNotFoundError:
            return []
        for n in sorted(names):
            if not n.endswith(".json"):
                continue
            with contextlib.suppress(OSError, ValueError), open(self._p("images", n), "rb") as f:
                out.append(json.load(f))
        return sorted(out, key=lambda r: r["ref"])

    def layer_info(self, diff_id: str) -> dict[str, Any]:
        path = os.path.join(os.path.dirname(self.layer_dir(diff_id)), "layer.json")
        with open(path, "rb") as f:
            return dict(json.load(f))

    def layers(self) -> list[str]:
        """diff_ids of every complete layer in the store."""
        out = []
        base = self._p("layers")
        with contextlib.suppress(FileNotFoundError):
            for alg in os.listdir(base):
                for hexpart in os.listdir(os.path.join(base, alg)):
                    diff_id = f"{alg}:{hexpart}"
                    with contextlib.suppress(ImageError):
                        if self.has_layer(diff_id):
                            out.append(diff_id)
        return sorted(out)

    # writing ------------------------------------------------------------------

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"the store {self.root} is read-only")
        if real_root():
            self._make_private()
        for d in ("layers", "images", "tmp"):
            os.makedirs(self._p(d), exist_ok=True)  # the umask decides who may read

    def _make_private(self) -> None:
        """A store real root writes into holds real setuid-root files and device nodes.

        Other users must not reach them (a 4755 root ``bin/su`` of an image in
        a world-readable ``layers/`` gives anyone root; Docker keeps its store
        0710/0700): ``layers/`` and ``tmp/`` are 0700, tightened with a
        warning when they exist with wider modes, and every directory of the
        store must belong to root (a user who owns one could rename a root-made
        layer out of it).  Mounts are unaffected: the daemon reads as root.
        """
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        for d in ("", "layers", "tmp"):
            path = self._p(d) if d else self.root
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
            st = os.lstat(path)
            if st.st_uid != 0 or not stat_mod.S_ISDIR(st.st_mode):
                raise StoreError(
                    f"{path} belongs to uid {st.st_uid}: root imports only into a store root owns"
                    " (images imported as root have real setuid files and devices)"
                )
            if d and stat_mod.S_IMODE(st.st_mode) & 0o077:
                os.chmod(path, 0o700)
                log.warning(
                    "%s was mode %04o: made 0700 (it holds real setuid files and devices)",
                    path,
                    stat_mod.S_IMODE(st.st_mode),
                )

    @contextlib.contextmanager
    def _lock(
        self, exclusive: bool, wait: bool = True, readonly_ok: bool = False
    ) -> Iterator[None]:
        try:
            fd = os.open(self._p("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            if not readonly_ok:
                raise
            try:  # a read-only store: nobody gc's it from here, the lock is best effort
                fd = os.open(self._p("lock"), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                yield
                return
        try:
            op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, op | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise StoreError("an import is running in this store: try again after it") from None
            yield
        finally:
            os.close(fd)

    def import_image(
        self,
        path: str,
        ref: str | None = None,
        source_ref: str | None = None,
        platform: Platform | None = None,
        progress: Progress | None = None,
    ) -> Image:
        """Import the image at ``path`` (a layout directory or an archive) as ``ref``.

        ``ref`` None takes the name the source gives (RepoTags, ref.name);
        ``source_ref`` chooses one image of several in the source.  Either
        the whole image is added, or (on any error) the store is unchanged.
        """
        if ref is not None:
            parse_ref(ref)  # a bad reference is refused before the source is read
        src, simg = layout.load_image(path, source_ref, platform)
        try:
            ref = _ref_for(ref, simg, path)
            self._writable()
            with self._lock(exclusive=False):
                return self._import(src, simg, ref, path, progress)
        finally:
            src.close()

    def _import(
        self,
        src: layout.DirSource | layout.TarSource,
        simg: layout.SourceImage,
        ref: str,
        path: str,
        progress: Progress | None,
    ) -> Image:
        todo: dict[str, layout.LayerBlob] = {}
        for blob in simg.layers:
            if not self.has_layer(blob.diff_id) and blob.diff_id not in todo:
                todo[blob.diff_id] = blob
        made: list[tuple[str, str]] = []  # (tmp dir, diff_id)
        try:
            for i, blob in enumerate(todo.values()):
                tmp = tempfile.mkdtemp(prefix="import-", dir=self._p("tmp"))
                os.chmod(
                    tmp, 0o755 & ~_umask()
                )  # mkdtemp makes 0700: a shared store is read by others
                made.append((tmp, blob.diff_id))
                self._extract(src, blob, tmp, i + 1, len(todo), progress)
            if made:
                fd = os.open(self._p("tmp"), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    syncfs(fd)
                finally:
                    os.close(fd)
            parents = set()
            for tmp, diff_id in made:
                final = os.path.dirname(self.layer_dir(diff_id))
                os.makedirs(os.path.dirname(final), exist_ok=True)
                parents.add(os.path.dirname(final))
                try:
                    os.rename(tmp, final)
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    # Another import committed the same layer meanwhile: keep theirs.
                    shutil.rmtree(tmp, ignore_errors=True)
            made = []
            for d in sorted(parents):  # the renames are durable before the record names them
                _fsync_dir(d)
            record = {
                "ref": ref,
                "layers": simg.diff_ids,
                "image_config": simg.config,
                "config_digest": simg.config_digest,
                "manifest": simg.manifest,
                "manifest_digest": simg.manifest_digest,
                "source": os.path.abspath(path),
                "source_layout": simg.layout,
                "imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _write_atomic(self._record_path(ref), json.dumps(record, indent=1).encode())
        finally:
            for tmp, _ in made:
                shutil.rmtree(tmp, ignore_errors=True)
        return self._image(record)

    def _extract(
        self,
        src: layout.DirSource | layout.TarSource,
        blob: layout.LayerBlob,
        tmp: str,
        number: int,
        count: int,
        progress: Progress | None,
    ) -> None:
        os.mkdir(os.path.join(tmp, "diff"), 0o755)
        root_fd = os.open(os.path.join(tmp, "diff"), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        what = blob.digest or blob.path
        try:
            with src.open(blob.path) as raw:
                total = blob.size or _size_of(raw)
                stored = layout.VerifyingReader(raw, blob.digest, blob.size, f"layer {what}")

                def tick(_stats: extract.ExtractStats) -> None:
                    if progress is not None:
                        progress(blob.diff_id, number, count, stored.count, total)

                compression, plain = layout.decompressed(stored)
                tarred = layout.VerifyingReader(plain, blob.diff_id, None, f"layer {what}")
                try:
                    stats = extract.extract_tar(
                        tarred, root_fd, use_xattrs=not self.side_table, on_entry=tick
                    )
                except extract.LayerError as e:
                    raise ImageError(f"layer {what}: {e}") from None
                tarred.finish()
                stored.finish()
                tick(stats)
        finally:
            os.close(root_fd)
        info = {
            "diff_id": blob.diff_id,
            "compression": compression,
            "blob_digest": blob.digest,
            "blob_size": stored.count,
            "size": stats.bytes,
            "entries": stats.entries,
            "overrides": stats.overrides,
            "side_table_records": stats.table_records,
            "dropped_xattrs": dict(stats.dropped_xattrs),
            "ownership": "real" if real_root() and not stats.overrides else "override",
        }
        _write_atomic(os.path.join(tmp, "layer.json"), json.dumps(info, indent=1).encode(), False)

    def add_layer_from_tar(self, fileobj: IO[bytes], diff_id: str | None = None) -> str:
        """Extract an uncompressed (or compressed) layer tar into the store; its diff_id.

        For the layer exporter's ``commit``: the diff_id is computed while
        streaming (and checked when given).  Idempotent: a layer already
        stored is not extracted again.
        """
        self._writable()
        with self._lock(exclusive=False):
            tmp = tempfile.mkdtemp(prefix="add-", dir=self._p("tmp"))
            try:
                os.mkdir(os.path.join(tmp, "diff"), 0o755)
                root_fd = os.open(os.path.join(tmp, "diff"), os.O_PATH | os.O_DIRECTORY)
                try:
                    _, plain = layout.decompressed(fileobj)
                    tarred = layout.VerifyingReader(plain, diff_id, None, "layer")
                    try:
                        stats = extract.extract_tar(tarred, root_fd, use_xattrs=not self.side_table)
                    except extract.LayerError as e:
                        raise ImageError(f"layer: {e}") from None
                    tarred.finish()
                finally:
                    os.close(root_fd)
                got = tarred.digest()
                if self.has_layer(got):
                    return got
                info = {"diff_id": got, "size": stats.bytes, "entries": stats.entries}
                _write_atomic(os.path.join(tmp, "layer.json"), json.dumps(info).encode(), False)
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    syncfs(fd)
                finally:
                    os.close(fd)
                final = os.path.dirname(self.layer_dir(got))
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.chmod(tmp, 0o755 & ~_umask())
                try:
                    os.rename(tmp, final)
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    # Another writer committed the same layer meanwhile: theirs stays.
                _fsync_dir(os.path.dirname(final))
                return got
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def add_image(
        self,
        ref: str,
        diff_ids: list[str],
        image_config: dict[str, Any],
        config_digest: str,
        manifest: dict[str, Any],
        manifest_digest: str,
        source: str,
    ) -> Image:
        """Record an image made here (``unionfs commit``) whose layers are all stored.

        The same record an import writes, written the same way (atomically),
        so every reader of the store sees a committed image as an imported one.
        """
        ref = canonical(ref)
        self._writable()
        with self._lock(exclusive=False):
            missing = [d for d in diff_ids if not self.has_layer(d)]
            if missing:
                raise StoreError(f"layer {missing[0]} is not in the store")
            record = {
                "ref": ref,
                "layers": list(diff_ids),
                "image_config": image_config,
                "config_digest": config_digest,
                "manifest": manifest,
                "manifest_digest": manifest_digest,
                "source": source,
                "source_layout": "commit",
                "imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _write_atomic(self._record_path(ref), json.dumps(record, indent=1).encode())
        return self._image(record)

    def remove(self, ref: str) -> None:
        """Remove an image (its layers stay until ``gc``, which ``unionfs image rm`` runs)."""
        if self.readonly:
            raise StoreError(f"the store {self.root} is read-only")
        try:
            os.unlink(self._record_path(ref))
        except FileNotFoundError:
            raise StoreError(f"no image {canonical(ref)!r} in the store {self.root}") from None

    def hold(self, ref: str) -> Image:
        """The image ``ref``, its layers kept from ``gc`` while this process lives.

        For a mount: a shared flock on each layer's directory
        (``layers/sha256/HEX``, opened O_RDONLY: it works on a read-only
        store too), taken with the record read under the store lock, so that
        a concurrent gc either ran before (the image is then missing or
        whole) or sees the locks.  The descriptors stay open until the
        process exits; a daemonizing mount's fork keeps them.  Where the
        filesystem has no flock (ENOLCK, EOPNOTSUPP) nothing is held.
        """
        with self._lock(exclusive=False, readonly_ok=True):
            image = self.image(ref)
            for diff_id in image.diff_ids:
                top = os.path.dirname(self.layer_dir(diff_id))
                fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                if _try_lock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, unsupported=True):
                    _HELD.append(fd)
                else:
                    os.close(fd)
        return image

    def gc(self, wait: bool = False) -> tuple[int, int]:
        """Remove layers no image uses, and leftovers of interrupted imports.

        Layers that a mount holds (``hold``) stay, listed in ``self.in_use``
        after the call: the next gc after that mount ends removes them.
        Returns (layers removed, bytes freed).  A layer is first renamed into
        ``tmp/`` (one step) and deleted from there, so a crash mid-way never
        leaves a half-deleted layer where a mount would find it.
        """
        if self.readonly:
            raise StoreError(f"the store {self.root} is read-only")
        if not os.path.isdir(self.root):
            return 0, 0
        self._writable()
        with self._lock(exclusive=True, wait=wait):
            used = {d for r in self.images() for d in r["layers"]}
            removed = freed = 0
            self.in_use = []
            for diff_id in self.layers():
                if diff_id in used:
                    continue
                top = os.path.dirname(self.layer_dir(diff_id))
                fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    if not _try_lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                        self.in_use.append(diff_id)  # mounted: a later gc removes it
                        continue
                    with contextlib.suppress(OSError, ValueError):
                        freed += int(self.layer_info(diff_id).get("size", 0))
                    dead = tempfile.mkdtemp(prefix="gc-", dir=self._p("tmp"))
                    os.rename(top, os.path.join(dead, "layer"))
                    removed += 1
                finally:
                    os.close(fd)
            for name in os.listdir(self._p("tmp")):
                shutil.rmtree(self._p("tmp", name), ignore_errors=True)
            # Layer dirs without layer.json (cannot happen but by hand): leave them.
            return removed, freed


#: Layer directories this process holds (see Store.hold): open until it exits.
_HELD: list[int] = []


def _try_lock(fd: int, op: int, unsupported: bool = False) -> bool:
    """flock; False when another process holds a conflicting lock.

    ``unsupported``: the answer when the filesystem has no flock at all.
    """
    try:
        fcntl.flock(fd, op)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return unsupported
        raise
    return True


def _ref_for(given: str | None, simg: layout.SourceImage, path: str) -> str:
    """The reference an import gets: the one given, else the source's name.

    A layout that names only a tag (``ref.name`` = ``v1``, skopeo's and
    umoci's reading) has no name to give: the import then asks for one,
    rather than making the tag a name (``v1:latest``).
    """
    if given is not None:
        return canonical(given)
    if simg.name:
        return canonical(simg.name)
    if simg.tag:
        raise ImageError(
            f"{path}: the layout names only the tag {simg.tag!r}: give a NAME"
            f" (it becomes NAME:{simg.tag})"
        )
    raise ImageError(f"{path}: the image has no name: give one (NAME[:TAG])")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _size_of(f: Any) -> int:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        return os.fstat(f.fileno()).st_size
    with contextlib.suppress(AttributeError):
        return int(f.size)  # tarfile's member reader
    return 0


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes, durable: bool = True) -> None:
    """Write a file whole or not at all: a temp file, fsync, rename, fsync the dir."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def resolve_lowers(lowers: list[str], store_path: str | None = None) -> list[str]:
    """Expand each ``image:NAME[:TAG]`` in a lower list into the image's layer dirs.

    The hook unionfs-mount calls; plain directories pass through.
    """
    out: list[str] = []
    store: Store | None = None
    for lower in lowers:
        if lower.startswith("image:"):
            store = store or Store.open(store_path)
            image = store.hold(lower[len("image:") :])  # image rm / gc keep them while mounted
            out.extend(image.layers)
        else:
            out.append(lower)
    return out
