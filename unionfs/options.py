"""Mount configuration: parsing the command line and ``-o`` options, and checks.

All option parsing lives here so that other front ends (``mount -t
fuse.unionfs``, /etc/fstab through mount.fuse3) can reuse it: they only need
to turn their argument vector into the same ``-o`` words.  Parsing is pure;
``check_paths`` is the one function that looks at the filesystem, and it runs
before anything is created or mounted, so a bad invocation leaves no trace.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

#: Mount flags handed to the kernel as they are.
KERNEL_FLAGS = frozenset(
    {
        "nosuid",
        "suid",
        "nodev",
        "dev",
        "noexec",
        "exec",
        "noatime",
        "atime",
        "dirsync",
        "sync",
        "async",
        "rw",
    }
)
#: FUSE options handed to libfuse as they are.
FUSE_FLAGS = frozenset({"allow_root", "auto_unmount"})
#: Options that tell mount(8), /etc/fstab or mount.fuse3 what to do, not the filesystem:
#: accepted and ignored.  mount(8) strips most (``x-*``, ``noauto``) and mount.fuse3
#: the rest (``user``, ``nofail``, ``_netdev``, ...) before it runs ``unionfs-mount``,
#: but an fstab options field given to unionfs-mount directly must work too.
MOUNT_TOOL_FLAGS = frozenset(
    {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail", "_netdev"}
)
#: Valued options of the same kind: ``user=NAME`` is what libmount hands the helper
#: for a user mount; ``comment=`` is an old fstab spelling of ``x-``.
MOUNT_TOOL_KEYS = frozenset({"user", "comment"})
#: Prefixes of fstab options kept for other programs (systemd, udisks): ``x-systemd.*``.
MOUNT_TOOL_PREFIXES = ("x-", "X-")
#: Mount flags a FUSE mount has anyway (the kernel's defaults) but that libfuse cannot
#: pass (it refuses the whole mount): accepted, as fstab lines often spell them.
FUSE_DEFAULT_FLAGS = frozenset({"relatime", "diratime", "nostrictatime", "nolazytime"})
#: Mount flags libfuse and fusermount3 cannot pass at all: refused, not ignored.
NOT_FOR_FUSE = frozenset({"nodiratime", "strictatime", "lazytime"})
#: Options only mount.fuse3 can act on, before it runs the filesystem.  Reaching
#: unionfs-mount they were not acted on; ignoring a request to drop privileges
#: would run the daemon with more rights than asked, so they are refused.
HELPER_ONLY = {
    "setuid": "is mount.fuse3's (mount -t fuse.unionfs-mount); run unionfs-mount as that user",
    "drop_privileges": "is mount.fuse3's (mount -t fuse.unionfs-mount), not unionfs-mount's",
}
#: Options that take a value, with the parser for it.
WHITEOUT_FORMATS = ("kernel", "oci")


class ConfigError(Exception):
    """A bad invocation: reported as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class MountConfig:
    lowers: list[str]
    upper: str | None
    mountpoint: str
    workdir: str | None = None
    read_only: bool = False
    foreground: bool = False
    debug: bool = False
    nonempty: bool = False
    allow_other: bool | None = None  # None: on when root, as fuse-overlayfs does
    entry_timeout: float = 300.0
    attr_timeout: float = 300.0
    negative_timeout: float = 300.0
    whiteout: str = "kernel"
    fsname: str = "unionfs"
    read_ahead_kb: int | None = 1024
    dircache: bool = True
    #: The C session helper answers READs, dispatches the common requests and makes
    #: replies (``nofastpath``: all of it through pyfuse3, in Python).
    fastpath: bool = True
    acl: bool = True
    volatile: bool = False
    metacopy: bool = False
    spin_us: int = 30
    #: An lstat in a layer's directory that takes this long (us) makes the C
    #: helper read that directory ahead (unionfs/_prefetch.c); None: never.
    dir_readahead_us: int | None = 40
    #: Follow changes made to the lowers while mounted (unionfs/watch.py).
    live: bool = False
    #: Record the lower objects the upper replaces (unionfs/identity.py).
    identities: bool = False
    kernel_flags: list[str] = field(default_factory=list)
    #: fuse-overlayfs' ownership options (see unionfs.ownership): id mappings
    #: CONTAINER:HOST:SIZE triples, squash targets, and ``xattr_permissions``
    #: (None: on when a lower carries ownership metadata; 0 off; 2 on).
    uidmapping: tuple[tuple[int, int, int], ...] = ()
    gidmapping: tuple[tuple[int, int, int], ...] = ()
    squash_uid: int | None = None
    squash_gid: int | None = None
    xattr_permissions: int | None = None

    def fuse_options(self, is_root: bool) -> set[str]:
        """The option set for ``pyfuse3.init`` (default_permissions is forced)."""
        fsname = self.fsname.replace("\\", "\\\\").replace(",", "\\,")  # libfuse's -o escapes
        opts = {"default_permissions", f"fsname={fsname}", "subtype=unionfs"}
        opts.update(self.kernel_flags)
        allow_other = is_root if self.allow_other is None else self.allow_other
        if allow_other:
            opts.add("allow_other")
        if self.read_only:
            opts.discard("rw")
            opts.add("ro")
        if self.debug:
            opts.add("debug")
        if is_root and self._shows_other_owners():
            from .ownership import confine_flags

            opts = confine_flags(opts)
        return opts

    def _shows_other_owners(self) -> bool:
        """Owners/modes from metadata or mappings, shown by real root: nosuid,nodev forced."""
        from .ownership import real_root, shows_other_owners

        mapping = bool(self.uidmapping or self.gidmapping) or (
            self.squash_uid is not None or self.squash_gid is not None
        )
        return real_root() and shows_other_owners(self.xattr_permissions, mapping, True)


def split_lowerdirs(spec: str) -> list[str]:
    """Split a ``lower1:lower2`` list; ``\\:`` is a literal colon, ``\\\\`` a backslash.

    The same escaping as overlayfs' ``lowerdir=``.
    """
    parts: list[str] = []
    cur: list[str] = []
    it = iter(spec)
    for ch in it:
        if ch == "\\":
            nxt = next(it, None)
            if nxt is None:
                raise ConfigError("lower directory list ends with a lone backslash", 2)
            cur.append(nxt)
        elif ch == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    if any(p == "" for p in parts):
        raise ConfigError(f"empty lower directory in {spec!r}", 2)
    return parts


def split_options(words: list[str]) -> list[str]:
    """Flatten ``-o a,b -o c`` into words; ``\\,`` keeps a comma inside a value."""
    out: list[str] = []
    for word in words:
        cur: list[str] = []
        it = iter(word)
        for ch in it:
            if ch == "\\":
                nxt = next(it, "")
                cur.append("\\" + nxt if nxt != "," else ",")
            elif ch == ",":
                out.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        out.append("".join(cur))
    return [w for w in out if w]


def is_mount_tool_option(word: str) -> bool:
    """True for an option meant for mount(8), fstab or mount.fuse3, not for unionfs,
    or a mount flag every FUSE mount has anyway.

    Refuses (ConfigError) the ones only mount.fuse3 can carry out, and mount
    flags a FUSE mount cannot have.
    """
    key, eq, _ = word.partition("=")
    if key in HELPER_ONLY:
        raise ConfigError(f"option {word!r} {HELPER_ONLY[key]}", 2)
    if word in NOT_FOR_FUSE:
        raise ConfigError(f"mount flag {word!r} cannot be given to a FUSE mount (libfuse)", 2)
    if key.startswith(MOUNT_TOOL_PREFIXES):
        return True
    if eq:
        return key in MOUNT_TOOL_KEYS
    return key in MOUNT_TOOL_FLAGS or key in FUSE_DEFAULT_FLAGS


def _check_mountpoint_arg(path: str) -> None:
    """Refuse mount.fuse3's ``/dev/fd/N`` (its ``drop_privileges``) as a mount point.

    mount.fuse3 then mounts by itself and hands over the /dev/fuse descriptor;
    unionfs-mount needs the real mount point to refuse one inside a branch.
    """
    rest = path.removeprefix("/dev/fd/")
    if rest != path and rest.isdigit():
        raise ConfigError(
            f"mount point {path!r} is a /dev/fuse descriptor (mount.fuse3's drop_privileges):"
            " unionfs-mount needs the real mount point; mount without drop_privileges",
            2,
        )


def _timeout(key: str, value: str) -> float:
    try:
        t = float(value)
    except ValueError:
        raise ConfigError(f"option {key}= needs a number of seconds, not {value!r}", 2) from None
    if not t >= 0 or t == float("inf"):
        raise ConfigError(f"option {key}= must be a finite number >= 0, not {value!r}", 2)
    return t


def build_config(
    positional: list[str], option_words: list[str], foreground: bool = False, debug: bool = False
) -> MountConfig:
    """Turn the positional arguments and ``-o`` words into a MountConfig.

    Forms: ``LOWERS UPPER MNT``, ``LOWERS MNT`` (read-only union), or ``MNT``
    with ``-o lowerdir=...[,upperdir=...]`` (the overlayfs spelling).
    """
    opts = [w for w in split_options(option_words) if not is_mount_tool_option(w)]
    values: dict[str, str] = {}
    flags: set[str] = set()
    for word in opts:
        key, eq, value = word.partition("=")
        if eq:
            values[key] = value
        else:
            flags.add(key)

    cfg = MountConfig(lowers=[], upper=None, mountpoint="", foreground=foreground, debug=debug)
    squash_root = False
    for flag in flags:
        if flag == "ro":
            cfg.read_only = True
        elif flag == "nonempty":
            cfg.nonempty = True
        elif flag == "allow_other":
            cfg.allow_other = True
        elif flag == "noallow_other":
            cfg.allow_other = False
        elif flag == "nodircache":
            cfg.dircache = False
        elif flag == "nofastpath":
            cfg.fastpath = False
        elif flag == "nodir_readahead":
            cfg.dir_readahead_us = None
        elif flag == "noacl":
            cfg.acl = False
        elif flag == "volatile":
            cfg.volatile = True
        elif flag == "live":
            cfg.live = True
        elif flag == "identities":
            cfg.identities = True
        elif flag in ("debug",):
            cfg.debug = True
        elif flag == "default_permissions":
            pass  # always on
        elif flag == "squash_to_root":
            squash_root = True
        elif flag in KERNEL_FLAGS or flag in FUSE_FLAGS:
            cfg.kernel_flags.append(flag)
        else:
            raise ConfigError(f"unknown option {flag!r}", 2)

    if squash_root:
        cfg.squash_uid = 0 if cfg.squash_uid is None else cfg.squash_uid
        cfg.squash_gid = 0 if cfg.squash_gid is None else cfg.squash_gid
    lowerdir = values.pop("lowerdir", None)
    upperdir = values.pop("upperdir", None)
    for key, value in values.items():
        if key == "workdir":
            cfg.workdir = value
        elif key == "timeout":
            cfg.entry_timeout = cfg.attr_timeout = cfg.negative_timeout = _timeout(key, value)
        elif key in ("entry_timeout", "attr_timeout", "negative_timeout"):
            setattr(cfg, key, _timeout(key, value))
        elif key == "whiteout":
            if value not in WHITEOUT_FORMATS:
                raise ConfigError(
                    f"option whiteout= takes {' or '.join(WHITEOUT_FORMATS)}, not {value!r}", 2
                )
            cfg.whiteout = value
        elif key == "read_ahead_kb":
            if not value.isdigit():
                raise ConfigError(f"option read_ahead_kb= needs a whole number, not {value!r}", 2)
            cfg.read_ahead_kb = int(value)
        elif key == "dir_readahead_us":
            if not value.isdigit() or int(value) > 1_000_000:
                raise ConfigError(
                    f"option dir_readahead_us= needs a whole number of us (0-1000000),"
                    f" not {value!r}",
                    2,
                )
            cfg.dir_readahead_us = int(value)
        elif key == "spin_us":
            if not value.isdigit() or int(value) > 1_000_000:
                raise ConfigError(
                    f"option spin_us= needs a whole number of us (0-1000000), not {value!r}", 2
                )
            cfg.spin_us = int(value)
        elif key == "metacopy":
            if value not in ("on", "off"):
                raise ConfigError(f"option metacopy= takes on or off, not {value!r}", 2)
            cfg.metacopy = value == "on"
        elif key == "fsname":
            if not value:
                raise ConfigError("option fsname= needs a value", 2)
            cfg.fsname = value
        elif key in _OWNERSHIP_KEYS:
            _ownership_option(cfg, key, value)
        else:
            raise ConfigError(f"unknown option {key + '='!r}", 2)

    if lowerdir is not None:
        if len(positional) not in (1, 2):
            raise ConfigError("with -o lowerdir=, give only [SOURCE] MNT", 2)
        cfg.lowers = [lowerdir] if lowerdir.startswith("image:") else split_lowerdirs(lowerdir)
        cfg.upper = upperdir
        cfg.mountpoint = positional[-1]
        if len(positional) == 2 and positional[0] and "fsname" not in values:
            # mount(8)'s SOURCE: a label, shown in /proc/mounts as the kernel's overlay
            # shows its own; umount(8) and mount -a match fstab entries by it (so
            # fuse-overlayfs, which ignores it and shows its name, is mounted again by
            # every mount -a).
            cfg.fsname = positional[0]
    else:
        if upperdir is not None:
            raise ConfigError("-o upperdir= needs -o lowerdir= too", 2)
        if len(positional) in (2, 3) and positional[0].startswith("image:"):
            # An image of the store (resolved by the image hook): its NAME:TAG has a colon.
            cfg.lowers = [positional[0]]
            cfg.upper = positional[1] if len(positional) == 3 else None
            cfg.mountpoint = positional[-1]
        elif len(positional) == 3:
            cfg.lowers = split_lowerdirs(positional[0])
            cfg.upper, cfg.mountpoint = positional[1], positional[2]
        elif len(positional) == 2:
            cfg.lowers = split_lowerdirs(positional[0])
            cfg.mountpoint = positional[1]
        else:
            raise ConfigError("usage: unionfs-mount [options] LOWER1[:LOWER2...] [UPPER] MNT", 2)
    _check_mountpoint_arg(cfg.mountpoint)
    if cfg.upper is None:
        cfg.read_only = True
    if cfg.workdir is not None and cfg.upper is None:
        raise ConfigError("-o workdir= needs an upper directory", 2)
    if cfg.volatile and cfg.read_only:
        raise ConfigError("-o volatile needs a writable upper directory", 2)
    if cfg.metacopy and cfg.read_only:
        raise ConfigError("-o metacopy=on needs a writable upper directory", 2)
    return cfg


_OWNERSHIP_KEYS = (
    "uidmapping",
    "gidmapping",
    "squash_to_uid",
    "squash_to_gid",
    "xattr_permissions",
)


def _ownership_option(cfg: MountConfig, key: str, value: str) -> None:
    """fuse-overlayfs' spelling of the ownership options (containers.md §4.3)."""
    if key in ("uidmapping", "gidmapping"):
        from .ownership import parse_idmap  # pure; no import cost for other mounts

        try:
            setattr(cfg, key, parse_idmap(value))
        except ValueError as e:
            raise ConfigError(f"option {key}=: {e}", 2) from None
    elif key in ("squash_to_uid", "squash_to_gid"):
        if not value.isdigit():
            raise ConfigError(f"option {key}= needs a numeric id, not {value!r}", 2)
        setattr(cfg, "squash_uid" if key == "squash_to_uid" else "squash_gid", int(value))
    else:
        if value not in ("0", "2"):
            raise ConfigError(
                "option xattr_permissions= takes 0 (off) or 2 (user.containers.override_stat)", 2
            )
        cfg.xattr_permissions = int(value)


def _unreachable(path: str) -> str | None:
    """Why ``path`` cannot be stat'ed, in words (None: it can).

    os.path.exists says False for all of them; a file named as a directory
    on the way (ENOTDIR) or a directory one may not search (EACCES) is not
    "does not exist".
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "is not a directory (a file is named as a directory in it)"
    except PermissionError:
        return "cannot be reached (permission denied)"
    except OSError as e:
        return f"cannot be reached ({e.strerror})"
    return None


def _inside(child: str, parent: str) -> bool:
    """True when ``child`` is ``parent`` or below it (both real, absolute paths)."""
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def default_workdir(upper: str) -> str:
    """The work dir when none is given: a hidden sibling of the upper directory.

    It must be on the upper's filesystem (copy-up renames from it) and outside
    the upper, so a later kernel overlayfs mount of the upper never sees it.
    """
    upper = upper.rstrip("/") or "/"
    parent, base = os.path.split(upper)
    return os.path.join(parent, f".{base}.unionfs-work")


def volatile_marker(workdir: str) -> str:
    """The directory a ``-o volatile`` mount leaves until it has synced the upper.

    Kernel overlayfs' path: ``<workdir>/work/incompat/volatile``.  Its presence
    at mount time means a volatile mount ended without syncing (a crash, a
    killed daemon), so files written through it may be incomplete.
    """
    return os.path.join(workdir, "work", "incompat", "volatile")


def check_paths(
    cfg: MountConfig, is_root: bool | None = None, upper_in_lower: bool = False
) -> None:
    """Refuse every invocation that would deadlock, overlap or half-mount.

    Resolves every path to its real absolute form (in place) first, so later
    steps compare and open exactly what was checked.  ``upper_in_lower`` lets
    a tool that hides the upper from the view itself (the sandbox keeps its
    upper under $HOME and covers it inside its namespace) put it there.
    """
    if is_root is None:
        is_root = os.geteuid() == 0  # root of any user namespace mounts without fusermount3
    from .ownership import real_root

    if cfg.metacopy and not real_root():
        raise ConfigError(
            "-o metacopy=on needs a root mount: kernel overlayfs reads metacopy files only"
            " with trusted.* xattrs, never in a rootless (userxattr) upper",
            2,
        )

    def real_dir(path: str, what: str) -> str:
        why = _unreachable(path)
        if why is not None:
            raise ConfigError(f"{what} {path!r} {why}")
        if not os.path.isdir(path):
            raise ConfigError(f"{what} {path!r} is not a directory")
        return os.path.realpath(path)

    cfg.lowers = [real_dir(p, "lower directory") for p in cfg.lowers]
    for lower in cfg.lowers:  # else every lookup falling through it would fail, not the mount
        if not os.access(lower, os.R_OK | os.X_OK):
            raise ConfigError(f"lower directory {lower!r} cannot be read by this user")
    if cfg.upper is not None:
        cfg.upper = real_dir(cfg.upper, "upper directory")
    cfg.mountpoint = real_dir(cfg.mountpoint, "mount point")

    seen: dict[str, int] = {}
    for i, lower in enumerate(cfg.lowers):
        if lower in seen:
            raise ConfigError(f"lower directory {lower!r} is given twice")
        seen[lower] = i

    branches = [*cfg.lowers, *([cfg.upper] if cfg.upper else [])]
    for branch in branches:
        if _inside(cfg.mountpoint, branch):
            raise ConfigError(
                f"mount point {cfg.mountpoint!r} is inside branch {branch!r}"
                " (the union would look into itself and deadlock)"
            )
        if _inside(branch, cfg.mountpoint):
            raise ConfigError(
                f"branch {branch!r} is inside the mount point {cfg.mountpoint!r}"
                " (it would be hidden by the mount and deadlock)"
            )
    if cfg.upper is not None:
        for lower in cfg.lowers:
            if _inside(cfg.upper, lower) and not upper_in_lower:
                raise ConfigError(f"upper directory {cfg.upper!r} is inside lower {lower!r}")
            if _inside(lower, cfg.upper):
                raise ConfigError(f"lower directory {lower!r} is inside upper {cfg.upper!r}")
        if not os.access(cfg.upper, os.W_OK | os.X_OK) and not cfg.read_only:
            raise ConfigError(f"upper directory {cfg.upper!r} is not writable")
        _check_workdir(cfg, [cfg.upper] if upper_in_lower else branches)

    if not cfg.nonempty:
        try:
            entries = os.listdir(cfg.mountpoint)
        except OSError as e:
            raise ConfigError(f"cannot read mount point {cfg.mountpoint!r}: {e.strerror}") from None
        if entries:
            raise ConfigError(
                f"mount point {cfg.mountpoint!r} is not empty (use -o nonempty to mount anyway)"
            )

    if not os.path.exists("/dev/fuse"):
        raise ConfigError("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    if not is_root:
        if shutil.which("fusermount3") is None:
            raise ConfigError("fusermount3 not found: install the fuse3 package")
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            raise ConfigError(
                "no access to /dev/fuse: it must be mode 0666 for unprivileged mounts"
            )


def _check_workdir(cfg: MountConfig, branches: list[str]) -> None:
    assert cfg.upper is not None
    if cfg.workdir is None:
        cfg.workdir = default_workdir(cfg.upper)
        if not os.path.isdir(cfg.workdir) and not os.access(
            os.path.dirname(cfg.workdir), os.W_OK | os.X_OK
        ):
            raise ConfigError(
                f"cannot create the default work dir {cfg.workdir!r}: give one with -o workdir="
            )
    elif not os.path.isdir(cfg.workdir):
        raise ConfigError(f"work dir {cfg.workdir!r} does not exist or is not a directory")
    work = os.path.realpath(cfg.workdir)
    for branch in [*branches, cfg.mountpoint]:
        if _inside(work, branch) or _inside(branch, work):
            raise ConfigError(f"work dir {work!r} overlaps {branch!r}")
    parent = work if os.path.isdir(work) else os.path.dirname(work)
    if os.stat(parent).st_dev != os.stat(cfg.upper).st_dev:
        raise ConfigError(f"work dir {work!r} must be on the same filesystem as the upper")
    cfg.workdir = work
    if os.path.isdir(volatile_marker(work)):
        raise ConfigError(
            f"the upper was mounted with -o volatile and that mount did not end cleanly, so"
            f" what was written through it may be incomplete: start from a new upper and work"
            f" dir, or remove {volatile_marker(work)!r} if the system did not crash"
        )
