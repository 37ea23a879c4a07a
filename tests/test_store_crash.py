"""Interrupted imports: SIGKILL mid-layer and a full disk leave no usable half layer.

The SIGKILL test feeds the layer through a FIFO, so the importer is stopped
at a known point (the test holds back the second half of the layer) with no
timing involved.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imagetools as it
import pytest

from unionfs.image import Store, StoreError

import support

FILES = [{"name": f"f{i:03d}", "type": "file", "data": os.urandom(32 << 10)} for i in range(64)]


def _import_cmd(store: Path, src: Path, ref: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "unionfs.command",
        "image",
        "--store",
        str(store),
        "import",
        str(src),
        ref,
    ]


def _wait(cond, proc: subprocess.Popen, what: str, limit: float = 60) -> None:
    """Poll until ``cond()``; fail if the importer exits first or it never happens."""
    deadline = time.monotonic() + limit
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"importer exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def test_sigkill_during_import_leaves_no_half_layer(unpriv_user, unpriv_tmp: Path, unionfs) -> None:
    src = unpriv_tmp / "oci"
    it.make_layout(src, [FILES], compression="none")
    blobs = sorted((src / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    layer = blobs[-1]  # the big one
    data = layer.read_bytes()
    layer.unlink()
    os.mkfifo(layer)
    support.chown_tree(src, unpriv_user.uid, unpriv_user.gid)
    store = unpriv_tmp / "store"
    proc = subprocess.Popen(
        _import_cmd(store, src, "half:1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=support.as_user(unpriv_user),
    )
    try:
        fd = -1

        def opened() -> bool:
            nonlocal fd
            try:
                fd = os.open(layer, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:  # no reader yet
                    raise
                return False
            return True

        _wait(opened, proc, "the importer opened the layer")
        os.set_blocking(fd, True)
        os.write(fd, data[: len(data) // 2])  # returns once the importer took most of it
        tmp = store / "tmp"
        _wait(
            lambda: any((d / "diff/f010").exists() for d in tmp.iterdir()),
            proc,
            "files being extracted",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    st = Store.open(str(store))
    assert st.layers() == [] and st.images() == []
    with pytest.raises(StoreError, match="no image 'half:1'"):
        st.image("half:1")
    assert list((store / "tmp").iterdir())  # the half layer is there, out of the way
    # A mount of the name fails in one line, before mounting anything.
    mnt = unpriv_tmp / "mnt"
    mnt.mkdir()
    r = subprocess.run(
        [*support.unionfs_command(), "image:half:1", str(mnt)],
        capture_output=True,
        text=True,
        env=dict(os.environ, UNIONFS_STORE=str(store)),
        preexec_fn=support.as_user(unpriv_user),
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no image" in r.stderr
    # gc clears the leftovers; the import, done again, is complete.
    r = subprocess.run(
        [sys.executable, "-m", "unionfs.command", "image", "--store", str(store), "gc"],
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(unpriv_user),
    )
    assert r.returncode == 0, r.stderr
    assert list((store / "tmp").iterdir()) == []
    layer.unlink()
    layer.write_bytes(data)
    os.chown(layer, unpriv_user.uid, unpriv_user.gid)
    r = subprocess.run(
        _import_cmd(store, src, "half:1"),
        capture_output=True,
        text=True,
        preexec_fn=support.as_user(unpriv_user),
    )
    assert r.returncode == 0, r.stderr
    img = Store.open(str(store)).image("half:1")
    assert sorted(os.listdir(img.layers[0])) == sorted(f["name"] for f in FILES)


@pytest.mark.skipif(os.geteuid() != 0, reason="a small tmpfs needs root to mount")
def test_full_disk_is_one_line_and_leaves_the_store_as_it_was(
    tmp: Path, unpriv_user, unpriv_tmp: Path
) -> None:
    src = unpriv_tmp / "oci"
    it.make_layout(src, [FILES], compression="gzip")
    it.make_layout(unpriv_tmp / "small", [[{"name": "small", "type": "file", "data": b"s"}]])
    support.chown_tree(unpriv_tmp, unpriv_user.uid, unpriv_user.gid)
    disk = tmp / "disk"
    disk.mkdir()
    with support.tmpfs(disk, size="1m"):
        os.chown(disk, unpriv_user.uid, unpriv_user.gid)
        store = disk / "store"
        for source, ref, code in ((unpriv_tmp / "small", "small", 0), (src, "big", 1)):
            before = sorted(str(p) for p in store.rglob("*")) if store.exists() else None
            r = subprocess.run(
                _import_cmd(store, source, ref),
                capture_output=True,
                text=True,
                preexec_fn=support.as_user(unpriv_user),
            )
            assert r.returncode == code, r.stderr
        assert r.stderr.count("\n") == 1 and "No space left on device" in r.stderr, r.stderr
        assert sorted(str(p) for p in store.rglob("*")) == before
        st = Store.open(str(store))
        assert [i["ref"] for i in st.images()] == ["small:latest"]


def test_ctrl_c_during_import_is_one_line_and_exit_130(tmp: Path) -> None:
    src = tmp / "oci"
    it.make_layout(src, [FILES], compression="none")
    blobs = sorted((src / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    layer = blobs[-1]
    data = layer.read_bytes()
    layer.unlink()
    os.mkfifo(layer)
    store = tmp / "store"
    proc = subprocess.Popen(
        _import_cmd(store, src, "int:1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # As from a terminal: a suite run as a background job (`scripts/test &`)
        # ignores SIGINT, which the importer would inherit (and then ignore).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        fd = -1

        def opened() -> bool:
            nonlocal fd
            try:
                fd = os.open(layer, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                return False
            return True

        _wait(opened, proc, "the importer opened the layer")
        os.set_blocking(fd, True)
        os.write(fd, data[: len(data) // 2])
        _wait(
            lambda: any((d / "diff/f010").exists() for d in (store / "tmp").iterdir()),
            proc,
            "files being extracted",
        )
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, err = proc.communicate(timeout=60)
        os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err.decode().strip().splitlines() == ["unionfs image: interrupted"], err
    st = Store.open(str(store))
    assert st.layers() == [] and st.images() == []
    assert not list((store / "tmp").iterdir())  # the import removed its own directory


def test_layer_renames_are_durable_before_the_record_and_gc_owns_the_rest(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 8: layers/sha256 is fsynced after the renames, before the
    image record; a later layer's failed rename leaves the earlier one whole but
    unnamed, which gc removes (as the store's docstring says)."""
    src = tmp / "oci"
    it.make_layout(src, [FILES[:2], FILES[2:4]], compression="none")
    store = Store.open(str(tmp / "store"))
    synced: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.import_image(str(src), "ok:1")
    layers_dir = str(tmp / "store/layers/sha256")
    images_dir = str(tmp / "store/images")
    assert layers_dir in synced and images_dir in synced
    assert synced.index(layers_dir) < synced.index(images_dir)

    src2 = tmp / "oci2"
    it.make_layout(src2, [FILES[4:6], FILES[6:8]], compression="none")
    renames = []

    def rename(a, b, *args, **kw):
        if "/layers/sha256/" in os.fspath(b):
            renames.append(b)
            if len(renames) == 2:
                raise OSError(errno.EIO, "injected")
        return real_rename(a, b, *args, **kw)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        store.import_image(str(src2), "half:1")
    monkeypatch.setattr(os, "rename", real_rename)
    assert [r["ref"] for r in store.images()] == ["ok:1"]
    assert len(store.layers()) == 3  # ok's two, and the earlier layer of half:1
    removed, _ = store.gc()
    assert removed == 1 and len(store.layers()) == 2
    assert store.import_image(str(src2), "half:1").ref == "half:1"
