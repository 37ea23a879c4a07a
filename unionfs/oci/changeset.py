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
        data = bytes(b)
        self.sha.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)


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


def _octal(n: int, digits: int) -> bytes | None:
    """A ustar number field (``digits`` bytes, NUL-terminated octal), None when too big."""
    if not 0 <= n < 8 ** (digits - 1):
        return None
    return b"%0*o\0" % (digits - 1, n)


def ustar_header(ti: tarfile.TarInfo) -> bytes | None:
    """The header of a plain entry, or None when it needs PAX records.

    The common entry (ASCII name and link target of at most 100 bytes, small
    numbers, no xattrs) is encoded here, byte for byte as Python's tarfile
    writes it in PAX format, at a fraction of tarfile's per-entry cost; any
    other goes through ``TarInfo.tobuf``.
    """
    if ti.pax_headers:
        return None
    name = ti.name + "/" if ti.type == tarfile.DIRTYPE and not ti.name.endswith("/") else ti.name
    if not (name.isascii() and ti.linkname.isascii()):
        return None
    bname, blink = name.encode(), ti.linkname.encode()
    if len(bname) > 100 or len(blink) > 100:
        return None
    fields = [
        _octal(ti.mode & 0o7777, 8),
        _octal(ti.uid, 8),
        _octal(ti.gid, 8),
        _octal(ti.size, 12),
        _octal(ti.mtime, 12),
    ]
    if any(f is None for f in fields) or not isinstance(ti.mtime, int):
        return None
    if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        major, minor = _octal(ti.devmajor, 8), _octal(ti.devminor, 8)
        if major is None or minor is None:
            return None
        dev = major + minor
    else:
        dev = bytes(16)
    buf = bytearray(
        bname.ljust(100, b"\0")
        + b"".join(fields)  # type: ignore[arg-type]
        + b"        "
        + ti.type
        + blink.ljust(100, b"\0")
        + tarfile.POSIX_MAGIC
        + bytes(64)  # uname, gname: empty
        + dev
        + bytes(155)
    ).ljust(_BLOCK, b"\0")
    chksum = sum(buf)
    buf[148:156] = b"%06o\0 " % chksum
    return bytes(buf)


class TarStream:
    """A tar written straight to a stream: headers, data streamed from descriptors, padding.

    Python's ``tarfile`` in stream mode keeps a TarInfo per member and spends
    most of an export's time encoding headers; this writes the same bytes
    (see ``ustar_header``) and keeps nothing per entry.
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
            self.out.write(bytes(self.buf))
            self.buf.clear()

    def add(self, ti: tarfile.TarInfo, fd: int | None = None) -> None:
        """One entry; a regular file's ``ti.size`` bytes are read from ``fd``."""
        header = ustar_header(ti)
        if header is None:
            header = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self._write(header)
        if fd is None or ti.size == 0:
            return
        left = ti.size
        while left:
            chunk = os.read(fd, min(left, _COPY_BUF))
            if not chunk:
                raise OSError(errno.EIO, "file shrank while being exported")
            self._write(chunk)
            left -= len(chunk)
        if ti.size % _BLOCK:
            self._write(bytes(_BLOCK - ti.size % _BLOCK))

    def close(self) -> None:
        """The end-of-archive blocks, padded to a whole record as tar(1) and tarfile do."""
        self._write(_NUL_BLOCK * 2)
        if self.offset % _RECORD:
            self._write(bytes(_RECORD - self.offset % _RECORD))
        self.flush()


def _name(path: tuple[bytes, ...]) -> str:
    return os.fsdecode(b"/".join(path))


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _marker(path: tuple[bytes, ...]) -> tarfile.TarInfo:
    """A whiteout or opaque marker entry: an empty file, mode 0, 0:0, time 0."""
    ti = tarfile.TarInfo(_name(path))
    ti.mode, ti.uid, ti.gid, ti.mtime = 0, 0, 0, 0
    ti.uname = ti.gname = ""
    return ti


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

    def _time(self, st: os.stat_result) -> int:
        t = st.st_mtime_ns // 1_000_000_000
        return min(t, self.epoch) if self.epoch is not None else max(t, 0)

    def _add(self, ti: tarfile.TarInfo, fd: int | None = None) -> None:
        self.tar.add(ti, fd)
        self.entries += 1

    def _header(self, c: Change) -> tarfile.TarInfo:
        """The entry's header: mode, owner (ownership metadata applied), time, xattrs."""
        st = c.st
        assert st is not None
        ti = tarfile.TarInfo(_name(c.path))
        ti.mode = stat_mod.S_IMODE(st.st_mode)
        ti.uid, ti.gid = c.owner
        ti.uname = ti.gname = ""
        ti.mtime = self._time(st)
        pax: dict[str, str] = {}
        for key, value in sorted(c.xattrs.items()):
            if markers.is_private_xattr(key):
                continue  # never the union's own (scan drops them too)
            if not value:
                self.warn(f"{c.display()}: xattr {_text(key)} with an empty value not exported")
                continue  # a PAX record with an empty value deletes the key
            pax["SCHILY.xattr." + _text(key)] = _text(value)
        ti.pax_headers = pax
        return ti

    def write(self, c: Change) -> None:
        """Write one change (its markers included) to the tar."""
        if c.kind is Kind.DELETED:
            if c.in_opaque and not self.explicit:
                return  # the opaque marker of a directory above hides it
            self._add(_marker((*c.path[:-1], markers.oci_whiteout_name(c.path[-1]))))
            return
        st = c.st
        assert st is not None
        ti = self._header(c)
        mode = st.st_mode
        if c.link is not None:
            ti.type, ti.linkname, ti.size = tarfile.LNKTYPE, _name(c.link), 0
            self._add(ti)
        elif stat_mod.S_ISDIR(mode):
            ti.type = tarfile.DIRTYPE
            self._add(ti)
            if c.opaque and not self.explicit:
                self._add(_marker((*c.path, markers.OPAQUE_NAME)))
        elif stat_mod.S_ISREG(mode):
            self._file(c, ti)
        elif stat_mod.S_ISLNK(mode):
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.fsdecode(
                os.readlink(c.path[-1], dir_fd=self.stack.dirfd(0, c.path[:-1]))
            )
            self._add(ti)
        elif stat_mod.S_ISCHR(mode) or stat_mod.S_ISBLK(mode):
            ti.type = tarfile.CHRTYPE if stat_mod.S_ISCHR(mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self._add(ti)
        elif stat_mod.S_ISFIFO(mode):
            ti.type = tarfile.FIFOTYPE
            self._add(ti)
        else:
            self.warn(f"{c.display()}: a socket cannot be stored in a tar layer: left out")

    def _file(self, c: Change, ti: tarfile.TarInfo) -> None:
        try:
            fd = os.open(
                c.path[-1],
                os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self.stack.dirfd(0, c.path[:-1]),
            )
        except OSError as e:
            raise ChangesetError(f"{c.display()}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise ChangesetError(f"{c.display()}: changed type while being exported")
            ti.size = st.st_size
            try:
                self._add(ti, fd)
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
    if compression not in MEDIA_TYPES:
        raise ChangesetError(f"unknown compression {compression!r} (none, gzip, zstd)")
    outer = _Hashing(out)
    comp, finish = _compressor(compression, outer)  # type: ignore[arg-type]
    inner = _Hashing(comp)
    tar = TarStream(inner)  # type: ignore[arg-type]
    writer = ChangesetWriter(upper, tar, epoch, explicit, warn)
    try:
        for c in changes:
            writer.write(c)
    finally:
        writer.close()
    tar.close()
    finish()
    return LayerInfo(
        "sha256:" + outer.sha.hexdigest(),
        "sha256:" + inner.sha.hexdigest(),
        outer.size,
        MEDIA_TYPES[compression],
        writer.entries,
    )
