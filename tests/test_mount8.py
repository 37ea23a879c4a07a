"""mount(8), /etc/fstab and mount.fuse3: ``mount -t fuse.unionfs-mount``, user fstab lines.

mount(8) hands a ``fuse.TYPE`` mount to /sbin/mount.fuse3, which runs
``/bin/sh -c 'TYPE SOURCE MNT -o OPTS'``.  mount(8) has removed PATH from the
environment (util-linux sanitize_env; it is given back only when mount drops
its setuid privileges, as ``mount -T FILE`` by a non-root user does), so the
shell looks TYPE up in its default PATH, which starts with /usr/local/sbin.

To be found there without touching the machine, the tests that go through
the real /etc/fstab or root's mount run in a private mount namespace (made by
``unshare -m`` as root, joined with ``nsenter``) in which a scratch directory
holding an ``unionfs-mount`` symlink to this checkout's command is bind-mounted
over /usr/local/sbin, a scratch fstab over /etc/fstab and a tmpfs over
libmount's /run/mount (its utab would otherwise record our mounts for the
whole machine).  Nothing is visible outside it, and it ends with its last
process: the test stops every process in it by PID and checks none is left.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from unionfs.options import ConfigError, build_config

import support
from support import User

# --------------------------------------------------------------------------- parsing


def test_the_argv_mount_fuse3_runs_as_root():
    # What mount.fuse3 runs for `mount -t fuse.unionfs-mount unionfs /m -o lowerdir=...`
    # (captured from util-linux 2.38 + fuse 3.14): SOURCE first, rw/dev/suid added.
    cfg = build_config(["unionfs", "/m"], ["rw,lowerdir=/a:/b,upperdir=/u,workdir=/w,dev,suid"])
    assert (cfg.lowers, cfg.upper, cfg.workdir, cfg.mountpoint) == (["/a", "/b"], "/u", "/w", "/m")
    assert cfg.fsname == "unionfs"
    assert {"rw", "dev", "suid"} <= cfg.fuse_options(is_root=True)
    assert "fsname=unionfs" in cfg.fuse_options(is_root=True)


def test_the_argv_of_a_user_mount():
    # For a `user` fstab line libmount adds noexec,nosuid,nodev and user=NAME.
    cfg = build_config(
        ["mysrc", "/m"], ["rw,noexec,nosuid,nodev,lowerdir=/a,upperdir=/u,user=someone"]
    )
    assert cfg.fsname == "mysrc" and cfg.lowers == ["/a"] and cfg.upper == "/u"
    assert {"noexec", "nosuid", "nodev"} <= cfg.fuse_options(is_root=False)
    assert not any(o.startswith("user") for o in cfg.fuse_options(is_root=False))


def test_fsname_option_wins_over_source_and_is_escaped_for_libfuse():
    cfg = build_config(["src", "/m"], [r"lowerdir=/a,fsname=my\,name"])
    assert cfg.fsname == "my,name"
    assert r"fsname=my\,name" in cfg.fuse_options(is_root=False)
    # Without SOURCE (mount.fuse3 drops an empty one) the default stays.
    assert build_config(["/m"], ["lowerdir=/a"]).fsname == "unionfs"


@pytest.mark.parametrize(
    "word",
    [
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "owner",
        "group",
        "nofail",
        "_netdev",
        "user=alice",
        "comment=systemd.automount",
        "x-systemd.automount",
        "x-systemd.idle-timeout=1min",
        "X-mount.mkdir",
        "relatime",
        "diratime",
        "nostrictatime",
        "nolazytime",
    ],
)
def test_mount_tool_options_are_ignored(word):
    plain = build_config(["unionfs", "/m"], ["lowerdir=/a,upperdir=/u"])
    cfg = build_config(["unionfs", "/m"], [f"lowerdir=/a,upperdir=/u,{word}"])
    assert cfg == plain


@pytest.mark.parametrize(
    ("word", "fragment"),
    [
        ("setuid=alice", "run unionfs-mount as that user"),
        ("drop_privileges", "mount.fuse3's"),
        ("users=1", "unknown option 'users='"),  # a flag, not a key
        ("nodiratime", "cannot be given to a FUSE mount"),
        ("strictatime", "cannot be given to a FUSE mount"),
        ("lazytime", "cannot be given to a FUSE mount"),
    ],
)
def test_helper_only_options_are_refused(word, fragment):
    with pytest.raises(ConfigError) as info:
        build_config(["unionfs", "/m"], [f"lowerdir=/a,{word}"])
    assert fragment in str(info.value) and info.value.code == 2


def test_drop_privileges_fd_mountpoint_is_refused():
    with pytest.raises(ConfigError, match="drop_privileges") as info:
        build_config(["unionfs", "/dev/fd/3"], ["lowerdir=/a"])
    assert info.value.code == 2


# --------------------------------------------------------------------------- namespace


def _ns_id(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


class MountNamespace:
    """A private mount namespace held by one process, with files bound over system paths.

    ``run`` executes a command in it (as ``user`` if given, through setpriv,
    with no supplementary groups); ``processes`` lists every process in it.
    """

    def __init__(self, binds: Sequence[tuple[Path, str]]) -> None:
        steps = [f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)}" for src, dst in binds]
        # libmount's utab: a tmpfs over /run/mount, or over /run when there is none yet.
        steps.append(
            "if [ -d /run/mount ]; then mount -t tmpfs tmpfs /run/mount;"
            " else mount -t tmpfs tmpfs /run; fi"
        )
        script = " && ".join(steps) + " && echo ready && read _"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line != "ready\n":
            err = self.holder.stderr.read() if self.holder.stderr else ""
            self.holder.wait()
            raise AssertionError(f"cannot set up the mount namespace: {err.strip()}")
        self.id = _ns_id(self.holder.pid)
        assert self.id is not None and self.id != _ns_id(os.getpid())

    def run(
        self, cmd: Sequence[str], user: User | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        prefix = ["nsenter", f"--target={self.holder.pid}", "--mount", "--"]
        if user is not None:
            prefix += [
                "setpriv",
                f"--reuid={user.uid}",
                f"--regid={user.gid}",
                "--clear-groups",
                "--",
            ]
        return subprocess.run(
            [*prefix, *cmd],
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
            stdin=subprocess.DEVNULL,
            env=env if env is not None else {"LANG": "C"},
        )

    def mountinfo(self, mnt: Path) -> list[str]:
        """The mountinfo lines, as the namespace sees them, of mounts at ``mnt``."""
        with open(f"/proc/{self.holder.pid}/mountinfo") as f:
            return [line for line in f if line.split()[4] == str(mnt)]

    def processes(self) -> list[int]:
        """Every process in the namespace but its holder."""
        return [
            int(p)
            for p in os.listdir("/proc")
            if p.isdigit() and int(p) != self.holder.pid and _ns_id(int(p)) == self.id
        ]

    def close(self) -> list[int]:
        """Stop every process in it (by PID), then the holder; returns the ones stopped."""
        left = self.processes()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.holder.stdin is not None:
            self.holder.stdin.close()
        try:
            self.holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.holder.kill()
            self.holder.wait()
        for stream in (self.holder.stdout, self.holder.stderr):
            if stream is not None:
                stream.close()
        return left


def _command_dir(tmp: Path) -> Path:
    """A directory holding ``unionfs-mount``: a symlink to this checkout's command,
    as the README tells an installer to put into /usr/local/sbin."""
    d = tmp / "sbin"
    d.mkdir()
    cmd = support.unionfs_command()
    if len(cmd) == 1:
        (d / "unionfs-mount").symlink_to(cmd[0])
    else:  # no installed script: run the module with this interpreter
        script = d / "unionfs-mount"
        script.write_text(f'#!/bin/sh\nexec {" ".join(map(shlex.quote, cmd))} "$@"\n')
        script.chmod(0o755)
    return d


@contextlib.contextmanager
def namespace(tmp: Path, fstab: str = "") -> Iterator[MountNamespace]:
    """A MountNamespace with our command in /usr/local/sbin and ``fstab`` as /etc/fstab."""
    (tmp / "fstab").write_text(fstab)
    ns = MountNamespace([(_command_dir(tmp), "/usr/local/sbin"), (tmp / "fstab", "/etc/fstab")])
    try:
        yield ns
    finally:
        left = ns.close()
    assert not left, f"processes left in the namespace: {left}"


def _wait_gone(pid: int) -> None:
    """Wait until process ``pid`` has ended (a bound for a hung daemon, not a timing)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([fd], [], [], 60)[0], f"process {pid} did not end"
    finally:
        os.close(fd)


def _daemon(ns: MountNamespace) -> int:
    """The one process in the namespace: the daemon (mount(8) and its helpers have ended)."""
    procs = ns.processes()
    assert len(procs) == 1, procs
    with open(f"/proc/{procs[0]}/cmdline", "rb") as f:
        assert b"unionfs" in f.read()
    return procs[0]


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


def _layers(tmp: Path, owner: User | None = None) -> tuple[Path, Path, Path, Path]:
    """A root-owned lower with a file and a 0700 dir; upper, work and mount point for ``owner``."""
    lower = tmp / "lower"
    (lower / "secret").mkdir(parents=True)
    (lower / "f").write_text("from the lower\n")
    (lower / "secret").chmod(0o700)
    home = tmp / "home"
    home.mkdir()
    up, work, mnt = home / "upper", home / "work", home / "merged"
    for d in (up, work, mnt):
        d.mkdir()
    if owner is not None:
        support.chown_tree(home, owner.uid, owner.gid)
    return lower, up, work, mnt


# --------------------------------------------------------------------------- mounts


@pytest.mark.root
def test_mount_t_fuse_unionfs_mount_as_root(tmp):
    lower, up, work, mnt = _layers(tmp)
    # relatime, as fstab lines often have it: libfuse refuses it, so it must not reach it.
    opts = f"lowerdir={lower},upperdir={up},workdir={work},relatime,nosuid"
    with namespace(tmp) as ns:
        r = ns.run(["mount", "-t", "fuse.unionfs-mount", "unionfs", str(mnt), "-o", opts])
        assert r.returncode == 0, r.stderr
        (line,) = ns.mountinfo(mnt)
        fstype, source = line.split(" - ")[1].split()[:2]
        assert (fstype, source) == ("fuse.unionfs", "unionfs")
        assert "nosuid" in line.split()[5].split(",")
        daemon = _daemon(ns)
        r = ns.run(["sh", "-c", f"stat -c %s {mnt}/f && cat {mnt}/f && echo new > {mnt}/new"])
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["15", "from the lower"]
        assert (up / "new").read_text() == "new\n"
        assert not os.path.ismount(mnt), "the mount must not be visible outside the namespace"
        r = ns.run(["umount", str(mnt)])
        assert r.returncode == 0, r.stderr
        _wait_gone(daemon)
        assert ns.mountinfo(mnt) == []


@pytest.mark.root
def test_mount_t_reports_the_daemons_error_and_mounts_nothing(tmp):
    lower, up, work, mnt = _layers(tmp)
    opts = f"lowerdir={lower}/missing,upperdir={up},workdir={work}"
    with namespace(tmp) as ns:
        r = ns.run(["mount", "-t", "fuse.unionfs-mount", "unionfs", str(mnt), "-o", opts])
        assert r.returncode != 0
        assert f"unionfs-mount: lower directory '{lower}/missing' does not exist" in r.stderr
        assert ns.mountinfo(mnt) == [] and ns.processes() == []
    assert sorted(os.listdir(work)) == [], "nothing may be created"


def _fstab_line(mnt: Path, lower: Path | str, up: Path, work: Path, extra: str) -> str:
    for p in (mnt, lower, up, work):
        assert not any(c.isspace() for c in str(p)), "fstab would need \\040 escapes"
    opts = f"{extra},lowerdir={lower},upperdir={up},workdir={work}"
    return f"unionfs {mnt} fuse.unionfs-mount {opts} 0 0\n"


def test_user_fstab_line_mount_and_umount(tmp, unpriv_user):
    """The README's example: a `noauto,user` line in /etc/fstab, mounted and unmounted
    by the user with plain `mount MNT` / `umount MNT` (setuid mount(8), sanitized PATH)."""
    lower, up, work, mnt = _layers(tmp, owner=unpriv_user)
    tools = tmp / "tools"
    tools.mkdir()
    (tools / "tool").write_text("")
    # The 0700 dir in the lowest layer: above another one it hides the listing of
    # the root until issue 15's item 1 is fixed (another branch).
    fstab = _fstab_line(mnt, f"{tools}:{lower}", up, work, "noauto,user")
    with namespace(tmp, fstab) as ns:
        r = ns.run(["mount", str(mnt)], user=unpriv_user)
        assert r.returncode == 0, r.stderr
        (line,) = ns.mountinfo(mnt)
        assert f"user_id={unpriv_user.uid}," in line and " fuse.unionfs unionfs " in line
        assert "nosuid" in line.split()[5] and "nodev" in line.split()[5]
        daemon = _daemon(ns)
        assert _uid_of(daemon) == unpriv_user.uid
        r = ns.run(
            ["sh", "-c", f"cat {mnt}/f && echo mine > {mnt}/new && ls {mnt}"], user=unpriv_user
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["from the lower", "f", "new", "secret", "tool"]
        # Someone else may not unmount it ...
        r = ns.run(["umount", str(mnt)], user=User("nobody", 65534, 65534))
        assert r.returncode != 0 and len(ns.mountinfo(mnt)) == 1
        # ... its owner may.
        r = ns.run(["umount", str(mnt)], user=unpriv_user)
        assert r.returncode == 0, r.stderr
        _wait_gone(daemon)
        assert ns.mountinfo(mnt) == []
    st = os.stat(up / "new")
    assert (st.st_uid, (up / "new").read_text()) == (unpriv_user.uid, "mine\n")


@pytest.mark.root
def test_root_fstab_line_with_setuid_runs_the_daemon_as_that_user(tmp, unpriv_user):
    """mount.fuse3's setuid=USER: root mounts, the daemon runs unprivileged."""
    lower, up, work, mnt = _layers(tmp, owner=unpriv_user)
    fstab = _fstab_line(mnt, lower, up, work, f"noauto,setuid={unpriv_user.name}")
    with namespace(tmp, fstab) as ns:
        r = ns.run(["mount", str(mnt)])
        assert r.returncode == 0, r.stderr
        daemon = _daemon(ns)
        assert _uid_of(daemon) == unpriv_user.uid
        (line,) = ns.mountinfo(mnt)
        assert f"user_id={unpriv_user.uid}," in line
        r = ns.run(["umount", str(mnt)])
        assert r.returncode == 0, r.stderr
        _wait_gone(daemon)


@pytest.mark.root
def test_mount_a_knows_the_entry_is_mounted_by_its_source(tmp):
    """mount -a skips an fstab entry whose source and target are mounted: the SOURCE
    label must be what /proc/mounts shows, or every mount -a would stack another mount."""
    lower, up, work, mnt = _layers(tmp)
    fstab = _fstab_line(mnt, lower, up, work, "auto").replace("unionfs ", "base-layers ", 1)
    with namespace(tmp, fstab) as ns:
        for _ in range(2):
            r = ns.run(["mount", "-a"])
            assert r.returncode == 0, r.stderr
        (line,) = ns.mountinfo(mnt)
        assert " fuse.unionfs base-layers " in line
        daemon = _daemon(ns)
        r = ns.run(["umount", str(mnt)])
        assert r.returncode == 0, r.stderr
        _wait_gone(daemon)


def test_user_mount_with_a_throwaway_fstab_T(tmp, unpriv_user):
    """`mount -T FILE MNT` by a user: mount(8) drops its setuid privileges (FUSE needs
    none) and keeps the user's PATH, so the venv's command is found without any link."""
    lower, up, work, mnt = _layers(tmp, owner=unpriv_user)
    fstab = tmp / "fstab"
    fstab.write_text(_fstab_line(mnt, lower, up, work, "noauto,user"))
    bindir = os.path.dirname(support.unionfs_command()[0])
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "LANG": "C"}
    as_user = support.as_user(unpriv_user)

    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        # cwd /: libmount takes a SOURCE that names a file in the cwd for a path.
        return subprocess.run(
            cmd, capture_output=True, text=True, env=env, preexec_fn=as_user, timeout=120, cwd="/"
        )

    r = run("mount", "-T", str(fstab), str(mnt))
    assert r.returncode == 0, r.stderr
    try:
        entry = support.mount_entry(mnt)
        assert entry is not None and (entry.fstype, entry.source) == ("fuse.unionfs", "unionfs")
        (daemon,) = [pid for pid, _ in support.daemon_processes(tmp)]
        assert run("cat", f"{mnt}/f").stdout == "from the lower\n"
        r = run("umount", str(mnt))
        assert r.returncode == 0, r.stderr
        _wait_gone(daemon)
        assert not support.is_mounted(mnt)
    finally:
        if support.is_mounted(mnt):
            run("fusermount3", "-uz", str(mnt))
