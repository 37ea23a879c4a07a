"""``unionfs run`` of a real Debian image with the user's subordinate ids (issue 12).

The two-layer image of tests/test_debian_image.py (``debootstrap
--variant=minbase bookworm``), imported by the unprivileged test user, runs
``dpkg -i`` of a package built here (files owned by root and by another id, a
setuid file, a postinst), ``useradd``, a ``chown`` to the new user and a script
whose exit status comes back.  Then the same container, run again by name,
shows the same state; so does a mount of its upper outside any namespace (as
the user, the way ``unionfs commit`` reads it) and a new container of the
image ``unionfs commit`` makes of it.

``ls -l`` of the mounted image itself (root owners, setuid bits, device
nodes) is tests/test_debian_image.py's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import debian
import pytest
import test_debian_image as debian_image
from sandbox_support import Home, make_home

import support

PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The package's non-root owner (no such user in the image: dpkg keeps numbers).
PKG_ID = 1234
#: useradd's new user.
NEW_UID = 1500

#: The files of the package: (path, uid, gid, mode).
FILES = [
    ("usr/share/unionfs-probe/root-file", 0, 0, 0o644),
    ("usr/share/unionfs-probe/owned", PKG_ID, PKG_ID, 0o640),
    ("usr/bin/unionfs-probe-suid", 0, 0, 0o4755),
]

SCRIPT = f"""set -e
dpkg -i /in/probe.deb >/dev/null
useradd -m -u {NEW_UID} -s /bin/sh alice
echo hello > /home/alice/note
chown alice:alice /home/alice/note
chmod 600 /home/alice/note
stat -c '%u:%g %a %n' /home/alice/note
exit 42
"""

#: What the second run prints: dpkg's state, the user, the owners.
CHECK = f"""set -e
dpkg-query -W -f '${{Package}} ${{Status}}\\n' unionfs-probe
id alice
cat /var/lib/unionfs-probe/postinst
stat -c '%u:%g %a %n' /home/alice /home/alice/note {" ".join("/" + f[0] for f in FILES)}
stat -c '%u:%g %a %n' /usr/bin/su /etc/shadow
"""

EXPECTED_CHECK = [
    "unionfs-probe install ok installed",
    f"uid={NEW_UID}(alice) gid={NEW_UID}(alice) groups={NEW_UID}(alice)",
    "postinst ran as 0",
    f"{NEW_UID}:{NEW_UID} 755 /home/alice",
    f"{NEW_UID}:{NEW_UID} 600 /home/alice/note",
    *(f"{u}:{g} {m:o} /{p}" for p, u, g, m in FILES),
    # The image's own metadata, as the container sees it.
    "0:0 4755 /usr/bin/su",
    "0:42 640 /etc/shadow",
]


def build_deb(work: Path) -> Path:
    """A .deb of FILES with their real owners (dpkg-deb as root keeps them) and
    a postinst that leaves a trace."""
    root = work / "pkg"
    for rel, uid, gid, mode in FILES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{rel}\n")
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        "Package: unionfs-probe\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: unionfs tests <tests@example.invalid>\n"
        "Description: files owned by root and by another id, setuid, a postinst\n"
    )
    postinst = root / "DEBIAN/postinst"
    postinst.write_text(
        "#!/bin/sh\nset -e\nmkdir -p /var/lib/unionfs-probe\n"
        'echo "postinst ran as $(id -u)" > /var/lib/unionfs-probe/postinst\n'
    )
    postinst.chmod(0o755)
    deb = work / "probe.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], check=True, capture_output=True)
    return deb


@pytest.fixture
def home(tmp: Path, unpriv_tmp: Path, unpriv_user: support.User, subids) -> Home:
    """A home of the test user holding the Debian image as debian:12, and a
    directory ``in`` (bound at /in) with the package and the script."""
    rootfs, why = debian.rootfs()
    if rootfs is None:
        pytest.skip(why)
    h = make_home(unpriv_tmp, unpriv_user)
    layout = unpriv_tmp / "layout"
    debian_image.make_image(rootfs, layout)
    support.chown_tree(layout, unpriv_user.uid, unpriv_user.gid)
    r = h.unionfs("image", "import", str(layout), "debian:12", timeout=600)
    assert r.returncode == 0, r.stderr
    inbox = unpriv_tmp / "in"
    inbox.mkdir()
    build_deb(tmp).rename(inbox / "probe.deb")
    (inbox / "script.sh").write_text(SCRIPT)
    support.chown_tree(inbox, unpriv_user.uid, unpriv_user.gid)
    return h


def _run(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    vol = f"{home.path.parent / 'in'}:/in:ro"
    return home.unionfs("run", "--userns=subids", "-e", PATH, "-v", vol, *args, timeout=600)


def _shown(lines: str) -> list[str]:
    return [line for line in lines.splitlines() if line]


def test_dpkg_useradd_chown_in_a_debian_container(
    home: Home, unpriv_user: support.User, unionfs, tmp: Path, monkeypatch
) -> None:
    r = _run(home, "--name", "deb", "debian:12", "--", "sh", "/in/script.sh")
    assert r.returncode == 42, r.stderr
    assert r.stdout == f"{NEW_UID}:{NEW_UID} 600 /home/alice/note\n"

    # The same container again: the state is in its upper.
    r = _run(home, "--name", "deb", "debian:12", "--", "sh", "-c", CHECK)
    assert (r.returncode, _shown(r.stdout)) == (0, EXPECTED_CHECK), r.stderr
    # As the new user, through su's setuid bit (the mount is suid inside).
    r = _run(home, "--name", "deb", "debian:12", "--", "su", "alice", "-c", "id -u; cat ~/note")
    assert (r.returncode, r.stdout) == (0, f"{NEW_UID}\nhello\n"), r.stderr

    # The upper's files are the user's for real: owners are metadata.
    cdir = home.path / ".local/share/unionfs/containers/deb"
    upper = cdir / "upper"
    assert all(p.lstat().st_uid == unpriv_user.uid for p in upper.rglob("*"))
    # Outside any namespace, a mount of the upper shows the owners the
    # container set, as container ids (what unionfs commit exports).
    monkeypatch.setenv("UNIONFS_STORE", str(home.path / ".local/share/unionfs"))
    mnt = tmp / "outside"
    mnt.mkdir()
    os.chown(mnt, unpriv_user.uid, unpriv_user.gid)
    work = f"workdir={cdir / 'work'}"
    m = unionfs(["image:debian:12"], upper, mnt, opts=[work], user=unpriv_user)

    def owners(root: Path) -> list[str]:
        paths = ["home/alice", "home/alice/note", *(f[0] for f in FILES)]
        out = []
        for p in paths:
            st = os.lstat(root / p)
            out.append(f"{st.st_uid}:{st.st_gid} {st.st_mode & 0o7777:o} /{p}")
        return out

    assert support.run_as(unpriv_user, owners, mnt) == EXPECTED_CHECK[3:-2]
    passwd = support.run_as(unpriv_user, (mnt / "etc/passwd").read_text)
    assert f"alice:x:{NEW_UID}:{NEW_UID}::/home/alice:/bin/sh" in passwd.splitlines()
    m.close()

    # unionfs commit of the container: a new image whose container shows it all.
    r = home.unionfs("commit", "deb", "probe:1", timeout=600)
    assert r.returncode == 0, r.stderr
    r = _run(home, "--rm", "probe:1", "--", "sh", "-c", CHECK)
    assert (r.returncode, _shown(r.stdout)) == (0, EXPECTED_CHECK), r.stderr
