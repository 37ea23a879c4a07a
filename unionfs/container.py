"""``unionfs run``: run a command in an image from the store, without root.

    unionfs run [--name C] [--rm] [-v HOST:CTR[:ro] ...] [--net=none] [-e K=V ...]
                [-w DIR] [--rootfs DIR[:DIR...]] [IMAGE] [-- CMD...]

The image's layers (from the store, unionfs/image/store.py; or the
directories of ``--rootfs``, top first) are mounted as one union with an
upper of the container's own, kept under its name in
``$XDG_DATA_HOME/unionfs/containers/NAME`` (removed at the end with
``--rm``).  The command runs through the namespace runner (namespace.py): a
user namespace where the user is root, a mount and a PID namespace, the
union as its root file system (pivot_root) with a new /proc, a minimal /dev
(the host's null, zero, full, random, urandom, tty bound in, a new devpts,
/dev/shm), the host's /sys, the host's resolv.conf, and the volumes.  The
image config gives Env, WorkingDir, Entrypoint and Cmd; the exit status and
signals pass through.

Identity, two ways (``--userns``; ``auto`` takes the first that applies):

- ``subids``: the user's subordinate ids (/etc/subuid, /etc/subgid) are
  mapped through newuidmap/newgidmap: 0 inside is the user, 1..N the ranges.
  The union's daemon then runs inside the container's user namespace and
  mounts there (FUSE is a filesystem root of a user namespace may mount,
  through /dev/fuse, no fusermount3), as namespace.Spec.serve: the kernel
  hands it the container's ids, and ``useradd``, ``chown`` to any mapped id
  and ``dpkg -i`` of packages owning files by other ids work.  The mount has
  ``allow_other`` (any id of the namespace, nobody outside it) and ``suid``:
  ``su`` works inside, and the kernel grants a setuid file only ids mapped in
  that namespace.  Owners are recorded, never chowned for real
  (``xattr_permissions=2``): the files stay the user's, who can delete them
  without entering a namespace, and the upper holds the same
  ``user.containers.override_stat`` metadata as the layers of the store, so a
  remount, a run without subordinate ids and ``unionfs commit`` read the
  owners the container set.
- ``root`` (no subordinate ids configured: said once when the container is
  made): the union is mounted outside by the user (fusermount3) and presents
  what the image records as root (uid/gid 0) as the user (``uidmapping``), so
  that it is root inside.  Only that id is mapped: an image whose User is
  another id, or a ``chown`` to one, is refused (EINVAL) as under ``unshare
  -r``: FUSE only lets processes of the mounting namespace, or the mounter's
  own uid, through, and the kernel maps no other id.

Either way owners go to disk as container ids (0 for root), the same in both.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import namespace
from .sandbox.state import NAME_RE, StateError, _remove_tree
from .sandbox.view import View, ViewError, mount_view, runtime_dir

_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RunError(Exception):
    """A one-line error before the command started."""


def containers_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(base) / "unionfs" / "containers"


def pivot_root(new_root: str) -> None:
    """Make ``new_root`` (a mount point) the root and drop the old one.

    ``pivot_root(".", ".")`` stacks the old root on the new one; unmounting
    it lazily leaves only the new root, with no directory needed for the old.
    """
    nr = _PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(0, f"pivot_root: unknown syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    os.chdir(new_root)
    if libc.syscall(nr, b".", b".") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")
    namespace.umount(".", lazy=True)
    os.chdir("/")


def _mkdirs(path: str) -> None:
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, mode=0o755)


def _touch(path: str) -> None:
    if not os.path.lexists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def make_dev(root: str) -> None:
    """A minimal /dev on a tmpfs: host nodes bound in (mknod is not allowed in a
    user namespace), a devpts of its own, /dev/shm, the usual symlinks."""
    dev = os.path.join(root, "dev")
    _mkdirs(dev)
    namespace.mount("tmpfs", dev, "tmpfs", namespace.MS_NOSUID, "mode=0755,size=64k")
    for node in DEV_NODES:
        target = os.path.join(dev, node)
        _touch(target)
        namespace.bind(f"/dev/{node}", target, recursive=False)
    os.mkdir(os.path.join(dev, "pts"))
    namespace.mount(
        "devpts",
        os.path.join(dev, "pts"),
        "devpts",
        namespace.MS_NOSUID | namespace.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    os.mkdir(os.path.join(dev, "shm"))
    namespace.mount(
        "shm",
        os.path.join(dev, "shm"),
        "tmpfs",
        namespace.MS_NOSUID | namespace.MS_NODEV,
        "mode=1777,size=64m",
    )
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, name))


def parse_volume(spec: str) -> tuple[str, str, bool]:
    """``HOST:CTR[:ro|rw]`` -> (real host path, absolute container path, read-only)."""
    parts = spec.split(":")
    ro = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        ro = parts[2] == "ro"
        parts = parts[:2]
    if len(parts) != 2 or not parts[0] or not parts[1].startswith("/"):
        raise RunError(f"bad volume {spec!r}: HOST:CONTAINER[:ro] with an absolute CONTAINER")
    host = os.path.realpath(parts[0])
    if not os.path.exists(host):
        raise RunError(f"volume source {parts[0]!r} does not exist")
    ctr = os.path.normpath(parts[1])
    if ctr == "/" or any(p == ".." for p in ctr.split("/")):
        raise RunError(f"bad volume target {parts[1]!r}")
    return host, ctr, ro


def _open_dir(root: str, parts: list[str], make: bool) -> int:
    """An O_PATH descriptor of ``root/parts...``, walked without following a
    symlink (an image's symlink must not lead outside the container's tree);
    missing directories made (0755) with ``make``."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if make:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            nfd = os.open(
                part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
            )
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _volume(root: str, host: str, ctr: str, ro: bool) -> None:
    """Bind ``host`` at ``ctr`` under ``root``, made where missing.

    The target's parents are walked without following symlinks: an image's
    symlink must not send the bind outside the container's tree.
    """
    parts = [p for p in ctr.split("/") if p]
    fd = _open_dir(root, parts[:-1], make=True)
    try:
        last = parts[-1]
        try:
            st = os.stat(last, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            if os.path.isdir(host):
                os.mkdir(last, 0o755, dir_fd=fd)
            else:
                os.close(os.open(last, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        else:
            if os.path.islink(f"/proc/self/fd/{fd}/{last}") or not (
                os.path.isdir(host) == (st.st_mode & 0o170000 == 0o040000)
            ):
                raise OSError(0, f"volume target {ctr} is a symlink or of another type")
        target = f"/proc/self/fd/{fd}/{last}"
        if ro:
            namespace.bind_readonly(host, target)
        else:
            namespace.bind(host, target)
    finally:
        os.close(fd)


def container_setup(root: str, volumes: list[tuple[str, str, bool]]) -> None:
    """In the namespace, as its root: the container's mounts, then pivot_root.

    The view is first bound onto itself: the copy this namespace got of it is
    locked to its parent, and pivot_root wants a mount of this namespace's own.
    """
    namespace.bind(root, root)
    for sub in ("proc", "sys", "dev", "tmp"):
        _mkdirs(os.path.join(root, sub))
    make_dev(root)
    namespace.bind("/sys", os.path.join(root, "sys"))
    resolv = os.path.join(root, "etc", "resolv.conf")
    if os.path.isfile("/etc/resolv.conf") and os.path.isfile(resolv) and not os.path.islink(resolv):
        with contextlib.suppress(OSError):
            namespace.bind_readonly("/etc/resolv.conf", resolv)
    for host, ctr, ro in volumes:
        _volume(root, host, ctr, ro)
    namespace.mount_proc(os.path.join(root, "proc"))
    pivot_root(root)


def command_of(config: dict[str, Any], cmd: list[str]) -> list[str]:
    """Entrypoint + (the given command, else the image's Cmd), as docker run does."""
    entry = list(config.get("Entrypoint") or [])
    rest = cmd or list(config.get("Cmd") or [])
    argv = entry + rest
    if not argv:
        raise RunError("the image has no Entrypoint or Cmd: give a command after --")
    return argv


def env_of(config: dict[str, Any], extra: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in [*(config.get("Env") or []), *extra]:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise RunError(f"bad environment entry {item!r} (KEY=VALUE)")
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", "/root")
    if "TERM" in os.environ:
        env.setdefault("TERM", os.environ["TERM"])
    return env


def check_user(config: dict[str, Any]) -> None:
    """Without subordinate ids only root exists inside: refuse an image that runs as another."""
    user = str(config.get("User") or "")
    if user.split(":")[0] not in ("", "0", "root"):
        raise RunError(
            f"the image runs as user {user!r}: only root is mapped in a rootless"
            " container without subordinate ids"
        )


def _fields(text: str, n: int) -> Iterator[list[str]]:
    """The lines of a passwd/group file with at least ``n`` fields and a numeric third."""
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= n and f[2].isdigit() and f[2].isascii():
            yield f


def parse_passwd(text: str) -> dict[str, tuple[int, int, str]]:
    """name -> (uid, gid, home) of an /etc/passwd (the first line of a name wins)."""
    out: dict[str, tuple[int, int, str]] = {}
    for f in _fields(text, 6):
        if f[3].isdigit():
            out.setdefault(f[0], (int(f[2]), int(f[3]), f[5]))
    return out


def parse_group(text: str) -> dict[str, tuple[int, list[str]]]:
    """name -> (gid, members) of an /etc/group."""
    out: dict[str, tuple[int, list[str]]] = {}
    for f in _fields(text, 4):
        out.setdefault(f[0], (int(f[2]), [m for m in f[3].split(",") if m]))
    return out


def _number(word: str, what: str) -> int:
    if word.isdigit() and word.isascii():
        return int(word)
    where = "passwd" if what == "user" else "group"
    raise RunError(f"the image's {what} {word!r} is not in its /etc/{where}")


def user_of(spec: str, passwd: str, group: str) -> tuple[int, int, list[int], str] | None:
    """``USER[:GROUP]`` of an image config (names or ids) -> (uid, gid, groups, home),
    as docker resolves it in the image's own files; None for plain root."""
    name, _, gname = spec.partition(":")
    if name in ("", "0", "root") and not gname:
        return None
    users, groups = parse_passwd(passwd), parse_group(group)
    name = name or "root"
    if name in users:
        uid, gid, home = users[name]
    else:  # a number: its passwd entry if it has one
        uid = _number(name, "user")
        name = next((n for n, (u, _, _) in users.items() if u == uid), name)
        uid, gid, home = users.get(name, (uid, uid, "/"))
    if gname:
        gid = groups[gname][0] if gname in groups else _number(gname, "group")
    extra = {g for g, members in groups.values() if name in members}
    return uid, gid, sorted(extra | {gid}), home or "/"


def read_image_file(root: str, rel: str) -> str:
    """A file of the container's tree, read without following a symlink anywhere
    (the image's /etc/passwd must not point the runner at a file of the host)."""
    *dirs, last = rel.split("/")
    fd = _open_dir(root, dirs, make=False)
    try:
        try:
            ffd = os.open(last, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except FileNotFoundError:
            return ""
        with os.fdopen(ffd, "rb") as f:
            return f.read(1 << 22).decode("utf-8", "replace")
    finally:
        os.close(fd)


def id_mode(requested: str, subids: namespace.SubIds | None, tools: bool) -> tuple[str, str | None]:
    """(``subids`` or ``root``, a note for the user or None) for ``--userns``."""
    if requested == "root":
        return "root", None
    if subids is not None and tools:
        return "subids", None
    if requested == "subids":
        if subids is None:
            raise RunError(
                "--userns=subids: no subordinate ids for this user in /etc/subuid and"
                " /etc/subgid (usermod --add-subuids 100000-165535 --add-subgids 100000-165535)"
            )
        raise RunError("--userns=subids: newuidmap/newgidmap not found (the uidmap package)")
    why = "no subordinate ids in /etc/subuid, /etc/subgid" if subids is None else "no newuidmap"
    return "root", (
        f"{why}: only root is mapped inside (useradd, chown to other ids fail);"
        " see docs/containers.md"
    )


def _image(ref: str) -> tuple[list[str], dict[str, Any]]:
    from .image.store import Store
    from .oci.layout import ImageError

    try:
        image = Store.open().hold(ref)  # gc keeps its layers while this process runs
    except ImageError as e:
        raise RunError(str(e)) from None
    return image.layers, image.config


def run(args: argparse.Namespace) -> int:
    if args.rootfs:
        lowers = [os.path.realpath(p) for p in args.rootfs.split(":")]
        for p in lowers:
            if not os.path.isdir(p):
                raise RunError(f"rootfs layer {p!r} is not a directory")
        config: dict[str, Any] = {}
        if args.config:
            with open(args.config) as f:
                config = json.load(f).get("config", {})
        ref = "rootfs:" + args.rootfs
        cmd = args.command
    else:
        if not args.command:
            raise RunError("no image given")
        ref, cmd = args.command[0], args.command[1:]
        lowers, config = _image(ref)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    argv = command_of(config, cmd)
    env = env_of(config, args.env)
    tools = all(shutil.which(t) for t in ("newuidmap", "newgidmap"))
    mode, note = id_mode(args.userns, namespace.subordinate_ids(), tools)
    if mode == "root":
        check_user(config)
    volumes = [parse_volume(v) for v in args.volume]
    workdir = args.workdir or config.get("WorkingDir") or "/"

    name = args.name or f"c-{secrets.token_hex(4)}"
    if not NAME_RE.fullmatch(name):
        raise RunError(f"bad container name {name!r}")
    why = namespace.userns_available()
    if why is not None:
        raise RunError(why)
    top = containers_root()
    top.mkdir(parents=True, exist_ok=True, mode=0o700)
    cdir = top / name
    fresh = not cdir.exists()
    if fresh:
        # The upper's root is the merged root where no layer records one: 0755,
        # for users of the image other than root (the container dir is 0700).
        (cdir / "upper").mkdir(parents=True)
        (cdir / "upper").chmod(0o755)  # whatever the umask
        (cdir / "work").mkdir(mode=0o700)
        meta = {"image": ref, "created": time.time(), "layers": lowers}
        (cdir / "container.json").write_text(json.dumps(meta))
        if note is not None:
            print(f"unionfs run: {note}", file=sys.stderr)
    elif args.rm:
        raise RunError(f"container {name!r} exists: --rm is for a new container")
    try:
        from .sandbox.state import Sandbox

        lock = Sandbox(name, cdir, [], 0).lock()
    except StateError as e:
        raise RunError(str(e).replace("sandbox", "container")) from None
    view: View | None = None
    mnt = runtime_dir() / f"container.{name}.{os.getpid()}"
    try:
        mnt.mkdir(mode=0o700)
        spec = namespace.Spec(
            argv=argv,
            env=env,
            cwd=workdir,
            ids=namespace.Ids.ROOT,
            net=args.net == "none",
            setup=lambda: container_setup(str(mnt), volumes),
            proc=None,
        )
        if mode == "subids":
            spec.ids = namespace.Ids.SUBIDS
            spec.serve = _in_namespace(spec, lowers, cdir, mnt, str(config.get("User") or ""))
        else:
            view = _outside(lowers, cdir, mnt)
            spec.after_setup = lambda _pid: view.detach() if view is not None else None
        try:
            running = namespace.start(spec)
        except namespace.NamespaceError as e:
            raise RunError(str(e)) from None
        os.close(lock)
        lock = -1
        code = running.wait()
        if running.exec_error:
            print(f"unionfs run: {running.exec_error}", file=sys.stderr)
        if view is not None:
            view.reap(timeout=10.0)
        return code
    finally:
        if view is not None and not view.detached:
            view.stop()
        with contextlib.suppress(OSError):
            mnt.rmdir()
        if lock >= 0:
            os.close(lock)
        if args.rm and fresh:
            _remove_tree(cdir)


def _outside(lowers: list[str], cdir: Path, mnt: Path) -> View:
    """The union mounted by the user outside the namespace (no subordinate ids)."""
    uid, gid = os.getuid(), os.getgid()
    # Root of the image (disk id 0) and the user's own files (the upper's
    # root, objects not recorded otherwise) both show as the user, which is
    # root inside; what goes to disk as root is recorded (override_stat).
    opts = [
        f"uidmapping={uid}:0:1:{uid}:{uid}:1",
        f"gidmapping={gid}:0:1:{gid}:{gid}:1",
        "xattr_permissions=2",
    ]
    try:
        return mount_view(lowers, cdir / "upper", cdir / "work", mnt, opts, cdir / "log")
    except ViewError as e:
        raise RunError(str(e)) from None


#: The union's options inside the user namespace (see the module docstring).
INSIDE_OPTIONS = ("xattr_permissions=2", "allow_other", "suid")


def _in_namespace(
    spec: namespace.Spec, lowers: list[str], cdir: Path, mnt: Path, user: str
) -> Callable[[Callable[[], None]], int]:
    """namespace.Spec.serve for the subordinate-id mode: the daemon mounts the
    union in the user namespace; then the image's User is looked up in the
    union's own /etc/passwd and /etc/group (Spec.user, set for the init that
    is forked next)."""

    def serve(in_child: Callable[[], None]) -> int:
        try:
            opts = list(INSIDE_OPTIONS)
            view = mount_view(
                lowers, cdir / "upper", cdir / "work", mnt, opts, cdir / "log", in_child
            )
        except ViewError as e:
            raise namespace.NamespaceError(str(e)) from None
        if user:
            root = str(mnt)
            found = user_of(
                user, read_image_file(root, "etc/passwd"), read_image_file(root, "etc/group")
            )
            if found is not None:
                spec.user = found[:3]
                if spec.env is not None and spec.env.get("HOME") == "/root":
                    spec.env["HOME"] = found[3]
        return view.pid

    return serve


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run a command in an image, rootless.")
    p.add_argument("--name", help="the container (its upper is kept under this name)")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CTR[:ro]")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-w", "--workdir", help="working directory inside (default: the image's)")
    p.add_argument("--net", choices=["host", "none"], default="host")
    p.add_argument(
        "--userns",
        choices=["auto", "subids", "root"],
        default="auto",
        help="map your subordinate ids (subids), or only yourself as root (root);"
        " auto: subids where /etc/subuid has them",
    )
    p.add_argument("--rootfs", metavar="DIR[:DIR...]", help="layers given as directories")
    p.add_argument("--config", metavar="FILE", help="with --rootfs: an image config JSON")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="IMAGE [-- CMD...]")
    return p


def main(prog: str, argv: list[str]) -> int:
    args = _parser(prog).parse_args(argv)
    try:
        return run(args)
    except RunError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 125
    except OSError as e:
        print(f"{prog}: {e.strerror or e}", file=sys.stderr)
        return 125
