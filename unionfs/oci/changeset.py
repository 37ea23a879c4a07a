"""Writing an OCI changeset layer (a tar, plain, gzip or zstd) from an upper's changes.

The layer follows the image spec's preferences (layer.md), which the common
producers do not all follow (see shared/reference/containers.md §2.7):

- a deletion is an explicit ``.wh.NAME``; ``.wh..wh..opq`` is written only for
  a directory that really hides lower contents (``explicit=True`` writes a
  whiteout per hidden name instead);
- in each directory the whiteouts come right after the directory's own
  entry, before its other entries; entries are in path order;
- hard links are tar hard links to the first name; symlinks, devices, fifos
  and set-id bits are kept, xattrs (ACLs and file capabilities included) go
  in PAX ``SCHILY.xattr.*`` records; the union's own xattrs never do;
- reproducible: no user/group names, no atime/ctime, times in whole seconds
  clamped to ``SOURCE_DATE_EPOCH`` when given, the gzip header without a name
  or time, markers with mode 0, owner 0:0 and time 0.  The same upper gives
  the same bytes.

File data is streamed from the upper to the compressor (never held in
memory); the uncompressed stream is hashed on its way (the ``diff_id``) and
the compressed one too (the ``digest``).
"""

from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import io
import os
import stat as stat_mod
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

from .. import markers
from ..changes.scan import Change, Kind
from ..layers import LayerStack

MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
_COPY_BUF = 1 << 20
#: Files below this size are read in one call and written with their header.
_SMALL = 1 << 16


class ChangesetError(Exception):
    """The layer cannot be written (an upper file vanished or shrank meanwhile, ...)."""


@dataclass(frozen=True)
class LayerInfo:
    """What a written layer is: its descriptor fields and its diff_id."""

    digest: str
    diff_id: str
    size: int
    media_type: str
    entries: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "diffID": self.diff_id,
            "size": self.size,
            "mediaType": self.media_type,
            "entries": self.entries,
        }


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes to ``out``."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        # Hashed and written at once, nothing keeps it: no copy needed.
        self.sha.update(b)
        self.out.write(b)
        n = b.nbytes if isinstance(b, memoryview) else len(b)
        self.size += n
        return n


def source_date_epoch() -> int | None:
    """``SOURCE_DATE_EPOCH`` from the environment, when set (a bad value is an error)."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise ChangesetError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds")
    return int(value)


_BLOCK = 512
_RECORD = 20 * _BLOCK
_NUL_BLOCK = bytes(_BLOCK)


#: The checksum's share of the constant parts of a ustar header: the checksum
#: field itself counted as spaces, and the magic and version.
_CONST_SUM = sum(b" " * 8) + sum(tarfile.POSIX_MAGIC)
_NO_DEV = bytes(16)
_TAIL = bytes(64)  # uname, gname: empty
_PAD = bytes(155 + 12)  # prefix, and the rest of the block
_LIMIT_7 = 8**7
_LIMIT_11 = 8**11
_DEV_TYPES = (tarfile.CHRTYPE, tarfile.BLKTYPE)


def _plain_tail(kind: bytes) -> tuple[bytes, int]:
    """A header's bytes after the checksum for an entry of ``kind`` with no link
    name and no device numbers, and its share of the checksum."""
    tail = b"".join((kind, bytes(100), tarfile.POSIX_MAGIC, _TAIL, _NO_DEV, _PAD))
    return tail, kind[0]


_PLAIN_TAILS = {k: _plain_tail(k) for k in (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE)}


@functools.lru_cache(maxsize=1024)
def _owner_fields(mode: int, uid: int, gid: int) -> tuple[bytes, int]:
    """The mode, uid and gid fields of a header, and their share of the checksum."""
    fields = b"%07o\0%07o\0%07o\0" % (mode, uid, gid)
    return fields, sum(fields)


def ustar_entry(
    name: bytes,
    kind: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes = b"",
    dev: tuple[int, int] = (0, 0),
) -> bytes | None:
    """The header of a plain entry, or None when it needs PAX records.

    The common entry (ASCII name and link target of at most 100 bytes, small
    numbers; a directory's name ending in ``/``) is encoded here, byte for byte
    as Python's tarfile writes it in PAX format (tests/test_layertools.py
    compares them), at a fraction of tarfile's per-entry cost: an export of
    10,000 small files spent most of its time in tarfile's header encoding.
    """
    if (
        len(name) > 100
        or not name.isascii()
        or not (0 <= uid < _LIMIT_7 and 0 <= gid < _LIMIT_7)
        or not (0 <= size < _LIMIT_11 and 0 <= mtime < _LIMIT_11)
    ):
        return None
    plain = None if linkname else _PLAIN_TAILS.get(kind)
    if plain is not None:
        # The common entry (a file, a directory): the tail after the checksum is
        # constant per type, mode and owner are few (cached with their share of
        # the checksum), the name's padding adds nothing to it.
        owner = _owner_fields(mode & 0o7777, uid, gid)
        nums = b"%011o\0%011o\0" % (size, mtime)
        chksum = _CONST_SUM + sum(name) + owner[1] + sum(nums) + plain[1]
        return b"%s%s%s%06o\0 %s" % (name.ljust(100, b"\0"), owner[0], nums, chksum, plain[0])
    head = name.ljust(100, b"\0") + b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (
        mode & 0o7777,
        uid,
        gid,
        size,
        mtime,
    )
    if len(linkname) > 100 or not linkname.isascii():
        return None
    if kind in _DEV_TYPES:
        if not (0 <= dev[0] < _LIMIT_7 and 0 <= dev[1] < _LIMIT_7):
            return None
        devs = b"%07o\0%07o\0" % dev
    else:
        devs = _NO_DEV
    link = linkname.ljust(100, b"\0")
    # Only the non-constant parts are summed (the rest is precomputed): a whole
    # block's sum() costs more than the rest of the encoding.
    chksum = _CONST_SUM + sum(head) + kind[0] + sum(linkname) + sum(devs)
    return b"".join((head, b"%06o\0 " % chksum, kind, link, tarfile.POSIX_MAGIC, _TAIL, devs, _PAD))


def ustar_header(ti: tarfile.TarInfo) -> bytes | None:
    """``ustar_entry`` of a TarInfo (None when it needs PAX records)."""
    if ti.pax_headers or not isinstance(ti.mtime, int):
        return None
    name = ti.name + "/" if ti.type == tarfile.DIRTYPE and not ti.name.endswith("/") else ti.name
    if not (name.isascii() and ti.linkname.isascii()):
        return None
    return ustar_entry(
        name.encode(),
        ti.type,
        ti.mode,
        ti.uid,
        ti.gid,
        ti.size,
        ti.mtime,
        ti.linkname.encode(),
        (ti.devmajor, ti.devminor),
    )


class TarStream:
    """A tar written straight to a stream: headers, data streamed from descriptors, padding.

    Python's ``tarfile`` in stream mode keeps a TarInfo per member and spends
    most of an export's time encoding headers; this writes the same bytes
    (see ``ustar_entry``) and keeps nothing per entry.  This is the one
    writer of the OCI tar format: the changeset writer and the image writer
    (write.py) both go through it.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.buf = bytearray()
        self.offset = 0

    def _write(self, data: bytes) -> None:
        self.offset += len(data)
        if len(data) >= 1 << 16:
            self.flush()
            self.out.write(data)
            return
        self.buf += data
        if len(self.buf) >= 1 << 16:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.out.write(self.buf)
            self.buf = bytearray()

    def add(self, ti: tarfile.TarInfo, fd: int | None = None) -> None:
        """One entry; a regular file's ``ti.size`` bytes are read from ``fd``."""
        header = ustar_header(ti)
        if header is None:
            header = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self._write(header)
        if fd is not None and ti.size:
            self._data(fd, ti.size)

    def add_entry(
        self,
        name: bytes,
        kind: bytes,
        mode: int,
        owner: tuple[int, int],
        mtime: int,
        *,
        size: int = 0,
        linkname: bytes = b"",
        dev: tuple[int, int] = (0, 0),
        pax: dict[str, str] | None = None,
        fd: int | None = None,
    ) -> None:
        """One entry from its fields (names as bytes; a directory's without its
        ``/``); ``size`` bytes of a regular file are read from ``fd``."""
        if kind == tarfile.DIRTYPE:
            name += b"/"
        header = (
            None
            if pax
            else ustar_entry(name, kind, mode, owner[0], owner[1], size, mtime, linkname, dev)
        )
        if header is None:
            ti = tarfile.TarInfo(os.fsdecode(name))
            ti.type, ti.mode, ti.mtime, ti.size = kind, mode, mtime, size
            ti.uid, ti.gid = owner
            ti.uname = ti.gname = ""
            ti.linkname = os.fsdecode(linkname)
            ti.devmajor, ti.devminor = dev
            ti.pax_headers = pax or {}
            header = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if fd is None or not size:
            self._write(header)
        elif size < _SMALL:
            self.add_small(header, fd, size)
        else:
            self._write(header)
            self._data(fd, size)

    def add_small(self, header: bytes, fd: int, size: int) -> None:
        """A regular file of ``size`` < ``_SMALL`` bytes read from ``fd``, after
        its ``header``: one read, appended with its padding (most files)."""
        data = os.read(fd, size)
        if len(data) < size:
            data += self._rest(fd, size - len(data))
        pad = -size % _BLOCK
        buf = self.buf
        buf += header
        buf += data
        if pad:
            buf += _NUL_BLOCK[:pad]
        self.offset += len(header) + size + pad
        if len(buf) >= 1 << 16:
            self.flush()

    @staticmethod
    def _rest(fd: int, left: int) -> bytes:
        """The rest of a short read (a file read while it is written: EIO if it shrank)."""
        parts = []
        while left:
            chunk = os.read(fd, left)
            if not chunk:
                raise OSError(errno.EIO, "file shrank while being exported")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def _data(self, fd: int, size: int) -> None:
        left = size
        while left:
            chunk = os.read(fd, min(left, _COPY_BUF))
            if not chunk:
                raise OSError(errno.EIO, "file shrank while being exported")
            self._write(chunk)
            left -= len(chunk)
        if size % _BLOCK:
            self._write(bytes(_BLOCK - size % _BLOCK))

    def close(self) -> None:
        """The end-of-archive blocks, padded to a whole record as tar(1) and tarfile do."""
        self._write(_NUL_BLOCK * 2)
        if self.offset % _RECORD:
            self._write(bytes(_RECORD - self.offset % _RECORD))
        self.flush()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def clamp_time(st: os.stat_result, epoch: int | None) -> int:
    """An entry's mtime in whole seconds: clamped to ``SOURCE_DATE_EPOCH`` when
    given, never before 1970 (the changeset writer's and the image writer's rule)."""
    t = st.st_mtime_ns // 1_000_000_000
    return min(t, epoch) if epoch is not None else max(t, 0)


class ChangesetWriter:
    """Turns a stream of ``Change`` (scan order) into tar entries of one layer."""

    def __init__(
        self,
        upper: str,
        tar: TarStream,
        epoch: int | None = None,
        explicit: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.stack = LayerStack([upper], None)
        self.tar = tar
        self.epoch = epoch
        self.explicit = explicit
        self.warn = warn or (lambda _msg: None)
        self.entries = 0

    def close(self) -> None:
        self.stack.close()

    def _marker(self, path: tuple[bytes, ...]) -> None:
        """A whiteout or opaque marker entry: an empty file, mode 0, 0:0, time 0."""
        self.tar.add_entry(b"/".join(path), tarfile.REGTYPE, 0, (0, 0), 0)
        self.entries += 1

    def _pax(self, c: Change) -> dict[str, str]:
        """The PAX records of the entry's xattrs."""
        pax: dict[str, str] = {}
        for key, value in sorted(c.xattrs.items()):
            if markers.is_private_xattr(key):
                continue  # never the union's own (scan drops them too)
            if not value:
                self.warn(f"{c.display()}: xattr {_text(key)} with an empty value not exported")
                continue  # a PAX record with an empty value deletes the key
            pax["SCHILY.xattr." + _text(key)] = _text(value)
        return pax

    def write(self, c: Change) -> None:
        """Write one change (its markers included) to the tar."""
        if c.kind is Kind.DELETED:
            if c.under_nondir or (c.in_opaque and not self.explicit):
                return  # hidden by the non-directory, or the opaque marker, above it
            self._marker((*c.path[:-1], markers.oci_whiteout_name(c.path[-1])))
            return
        st = c.st
        assert st is not None
        mode = st.st_mode
        name = b"/".join(c.path)
        perm, owner, mtime = stat_mod.S_IMODE(mode), c.owner, clamp_time(st, self.epoch)
        pax = self._pax(c) if c.xattrs else None
        if c.link is None and stat_mod.S_ISREG(mode):  # the most common first
            self._file(c, name, perm, mtime, pax)
            self.entries += 1
            return
        add = self.tar.add_entry
        if c.link is not None:
            add(name, tarfile.LNKTYPE, perm, owner, mtime, linkname=b"/".join(c.link), pax=pax)
        elif stat_mod.S_ISDIR(mode):
            add(name, tarfile.DIRTYPE, perm, owner, mtime, pax=pax)
            if c.opaque and not self.explicit:
                self.entries += 1
                self._marker((*c.path, markers.OPAQUE_NAME))
                return
        elif stat_mod.S_ISLNK(mode):
            target = os.readlink(c.path[-1], dir_fd=self.stack.dirfd(0, c.path[:-1]))
            add(name, tarfile.SYMTYPE, perm, owner, mtime, linkname=target, pax=pax)
        elif stat_mod.S_ISCHR(mode) or stat_mod.S_ISBLK(mode):
            kind = tarfile.CHRTYPE if stat_mod.S_ISCHR(mode) else tarfile.BLKTYPE
            dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            add(name, kind, perm, owner, mtime, dev=dev, pax=pax)
        elif stat_mod.S_ISFIFO(mode):
            add(name, tarfile.FIFOTYPE, perm, owner, mtime, pax=pax)
        else:
            self.warn(f"{c.display()}: a socket cannot be stored in a tar layer: left out")
            return
        self.entries += 1

    def _file(
        self, c: Change, name: bytes, perm: int, mtime: int, pax: dict[str, str] | None
    ) -> None:
        try:
            fd = os.open(
                c.path[-1],
                # O_NONBLOCK: a fifo swapped in meanwhile is refused below, not waited on.
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=self.stack.dirfd(0, c.path[:-1]),
            )
        except OSError as e:
            raise ChangesetError(f"{c.display()}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise ChangesetError(f"{c.display()}: changed type while being exported")
            size = st.st_size
            uid, gid = c.owner
            try:
                # The plain header of a small file straight away (most files).
                header = (
                    None
                    if pax or size >= _SMALL
                    else ustar_entry(name, tarfile.REGTYPE, perm, uid, gid, size, mtime)
                )
                if header is not None:
                    self.tar.add_small(header, fd, size)
                    return
                self.tar.add_entry(
                    name, tarfile.REGTYPE, perm, c.owner, mtime, size=size, pax=pax, fd=fd
                )
            except OSError as e:
                raise ChangesetError(f"{c.display()}: {e.strerror or e}") from None
        finally:
            os.close(fd)


def _compressor(kind: str, out: IO[bytes]) -> tuple[IO[bytes], Callable[[], None]]:
    """A stream compressing into ``out`` and the call that finishes it."""
    if kind == "none":
        return out, lambda: None
    if kind == "gzip":
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6)
        return gz, gz.close  # type: ignore[return-value]
    if kind == "zstd":
        import zstandard

        zw = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
        return zw, zw.close  # type: ignore[return-value]
    raise ChangesetError(f"unknown compression {kind!r} (none, gzip, zstd)")


class LayerSink:
    """Where a layer's tar goes: compressed into ``out``, both streams hashed.

    ``tar`` is the TarStream to write entries to; ``finish()`` ends the
    compression and gives (digest, diff_id, size).  An uncompressed layer is
    hashed once (its digest is its diff_id).  The changeset writer and the
    image writer (write.py) both write through one.
    """

    def __init__(self, out: IO[bytes], compression: str) -> None:
        if compression not in MEDIA_TYPES:
            raise ChangesetError(f"unknown compression {compression!r} (none, gzip, zstd)")
        self.compression = compression
        self.outer = _Hashing(out)
        if compression == "none":
            self.inner, self._finish = self.outer, lambda: None
        else:
            comp, self._finish = _compressor(compression, self.outer)  # type: ignore[arg-type]
            self.inner = _Hashing(comp)
        self.tar = TarStream(self.inner)  # type: ignore[arg-type]

    def finish(self) -> tuple[str, str, int]:
        self.tar.close()
        self._finish()
        return (
            "sha256:" + self.outer.sha.hexdigest(),
            "sha256:" + self.inner.sha.hexdigest(),
            self.outer.size,
        )


def write_layer(
    changes: Iterable[Change],
    upper: str,
    out: IO[bytes],
    compression: str = "none",
    epoch: int | None = None,
    explicit: bool = False,
    warn: Callable[[str], None] | None = None,
) -> LayerInfo:
    """Write the changeset layer of ``changes`` (read from ``upper``) to ``out``.

    ``out`` receives the (compressed) layer; nothing is buffered beyond the
    tar's and compressor's blocks.  Returns digest, diff_id and size.
    """
    sink = LayerSink(out, compression)
    writer = ChangesetWriter(upper, sink.tar, epoch, explicit, warn)
    try:
        for c in changes:
            writer.write(c)
    finally:
        writer.close()
    digest, diff_id, size = sink.finish()
    return LayerInfo(digest, diff_id, size, MEDIA_TYPES[compression], writer.entries)
