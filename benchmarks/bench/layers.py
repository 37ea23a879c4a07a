"""Deterministic lower layers, their merged copy, and a manifest of the merged view.

Every target is measured over the very same layer directories, so they are
generated once per parameter set and cached under the work dir (regenerating
20k files and a 1 GiB file for every run would dominate a quick run and wear
the disk).  The merged copy is what the ``native`` target reads: the physical
limit a union file system can approach.  The manifest is computed from that
copy, so workloads can address every visible path without a readdir.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import stat
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Bump when the generated tree changes, so that stale caches are not reused.
GENERATOR_VERSION = 4

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
FIXED_MTIME = 1_600_000_000  # git must not see the repository's files as "racily clean"
GIT_ID = ["-c", "user.email=bench@example.invalid", "-c", "user.name=bench"]
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
EXTENSIONS = ("c", "h", "py", "txt", "json")


@dataclass(frozen=True)
class Spec:
    """Everything that determines the generated tree (and so its cache key)."""

    layers: int
    files: int
    dirs: int
    repo_files: int
    big_mib: int
    #: A second repository big enough for git's threaded index preload (one thread per 500
    #: entries, none below 1,000): the issue's 5,000-file ``git status``.
    bigrepo_files: int
    #: A mid-sized lower file (128 MiB at scale 1) for the append that copies it up.
    mid_mib: int
    seed: int
    privileged: bool  # char-dev whiteouts and trusted.* xattrs need root

    @classmethod
    def scaled(cls, scale: float, layers: int, seed: int, privileged: bool) -> Spec:
        """The default tree (20k files, 2k dirs, 1 GiB) shrunk or grown by ``scale``."""
        return cls(
            layers=layers,
            files=max(100, round(20_000 * scale)),
            dirs=max(10, round(2_000 * scale)),
            repo_files=max(20, round(500 * scale)),
            big_mib=max(4, round(1024 * scale)),
            bigrepo_files=max(1000, round(5000 * scale)),
            mid_mib=max(2, round(128 * scale)),
            seed=seed,
            privileged=privileged,
        )

    def key(self) -> str:
        """A readable, collision-safe directory name for the cache."""
        digest = hashlib.sha256(
            json.dumps([GENERATOR_VERSION, asdict(self)], sort_keys=True).encode()
        ).hexdigest()[:10]
        return f"L{self.layers}-f{self.files}-b{self.big_mib}-s{self.seed}-{digest}"


@dataclass
class Manifest:
    """The merged view, as relative paths (sorted, so every run walks the same order)."""

    dirs: list[str]
    files: list[str]
    symlinks: list[str]
    others: list[str]
    big: str
    repo: str
    rename_dir: str
    stats: dict[str, int] = field(default_factory=dict)
    bigrepo: str = "bigrepo"
    mid: str = "big/mid.bin"

    @property
    def small_files(self) -> list[str]:
        """Regular files except the big ones and the big repository (which only the threaded
        ``git status`` uses; leaving it out keeps the older cells comparable across runs)."""
        return [f for f in self.files if not f.startswith(("big/", "bigrepo/"))]

    def core(self, paths: list[str]) -> list[str]:
        """``paths`` without the big repository (the tree of the workloads before it)."""
        return [p for p in paths if p != "bigrepo" and not p.startswith("bigrepo/")]

    @property
    def src_files(self) -> list[str]:
        """Regular files of the source tree: all live in lower layers only."""
        return [f for f in self.files if f.startswith("src/")]


@dataclass
class Tree:
    """A generated layer set on disk."""

    spec: Spec
    root: Path
    lowers: list[Path]  # top first, like overlayfs' lowerdir=
    merged: Path
    manifest: Manifest


# -- public entry point --------------------------------------------------------------------


def prepare(spec: Spec, workdir: Path, regenerate: bool = False) -> Tree:
    """Return the cached tree for ``spec``, generating it first when needed."""
    root = workdir / f"layers-{spec.key()}"
    done = root / ".complete"
    if regenerate or not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.monotonic()
        print(f"generating layers in {root} ...", flush=True)
        _generate(spec, root)
        done.touch()
        print(f"generated in {time.monotonic() - t0:.1f} s", flush=True)
    manifest = Manifest(**json.loads((root / "manifest.json").read_text()))
    return Tree(spec, root, layer_dirs(root, spec.layers), root / "merged", manifest)


def layer_dirs(root: Path, n: int) -> list[Path]:
    """Short names (L0 is the top): 500 of them still fit in a kernel mount option page."""
    return [root / f"L{i}" for i in range(n)]


# -- generation ----------------------------------------------------------------------------


def _generate(spec: Spec, root: Path) -> None:
    rng = random.Random(spec.seed)
    lowers = layer_dirs(root, spec.layers)
    for layer in lowers:
        layer.mkdir(parents=True)
    dirs = _dir_names(spec.dirs)
    _small_files(spec, rng, lowers, dirs)
    if spec.layers > 1:
        _hidden_dir(spec, lowers)
        _opaque_dir(spec, lowers)
    _git_repo(lowers, "repo", spec.repo_files)
    _git_repo(lowers, "bigrepo", spec.bigrepo_files)
    _big_file(rng, lowers[-1] / "big" / "big.bin", spec.big_mib)
    _big_file(rng, lowers[-1] / "big" / "mid.bin", spec.mid_mib)
    merge_layers(lowers, root / "merged")
    _refresh_git_index(root / "merged" / "repo")
    _refresh_git_index(root / "merged" / "bigrepo")
    manifest = _scan(root / "merged", rename_dir=_rename_dir(dirs))
    (root / "manifest.json").write_text(json.dumps(asdict(manifest)))


def _dir_names(n: int) -> list[str]:
    """``n`` directories under src/, in groups of ~50; every fifth one nested one level deeper."""
    groups = max(1, n // 50)
    names: list[str] = []
    for i in range(n):
        parent = names[-1] if i % 5 == 4 else f"src/g{i % groups:02d}"
        names.append(f"{parent}/d{i:04d}")
    return names


def _rename_dir(dirs: list[str]) -> str:
    """A group directory in the middle of the tree: a few hundred files spread over the layers."""
    groups = sorted({"/".join(d.split("/")[:2]) for d in dirs})
    return groups[len(groups) // 2]


def _small_files(spec: Spec, rng: random.Random, lowers: list[Path], dirs: list[str]) -> None:
    """Files spread over the stack (lower layers hold more, like base images); some are
    shadowed by a newer copy higher up, some hidden by a whiteout, a few have symlinks."""
    cum_weights = list(itertools.accumulate(i + 1 for i in range(spec.layers)))
    for i in range(spec.files):
        rel = f"{rng.choice(dirs)}/f{i:05d}.{rng.choice(EXTENSIONS)}"
        home = rng.choices(range(spec.layers), cum_weights=cum_weights)[0]
        _write(lowers[home] / rel, _content(rng))
        roll = rng.random()
        if home > 0 and roll < 0.15:
            _write(lowers[rng.randrange(home)] / rel, _content(rng))  # shadowing copy
        elif home > 0 and roll < 0.16 and spec.privileged:
            _whiteout(lowers[rng.randrange(home)] / rel)
        elif roll > 0.99:
            link = lowers[home] / rel
            link.with_name(f"l{i:05d}").symlink_to(link.name)


def _content(rng: random.Random) -> bytes:
    """Source-file-like sizes: median ~1.8 KiB, a long tail up to 64 KiB."""
    size = min(65536, max(16, int(rng.lognormvariate(7.5, 1.0))))
    return rng.randbytes(size)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _whiteout(path: Path) -> None:
    """A kernel-format whiteout: a character device 0/0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _hidden_dir(spec: Spec, lowers: list[Path]) -> None:
    """legacy/ exists in the bottom layer only and is hidden by a whiteout in the top one."""
    for i in range(20):
        _write(lowers[-1] / "legacy" / f"old{i}.txt", b"deleted in a newer layer\n")
    if spec.privileged:
        _whiteout(lowers[0] / "legacy")


def _opaque_dir(spec: Spec, lowers: list[Path]) -> None:
    """etc/ in the top layer is opaque: the 30 files of the bottom layer's etc/ are hidden."""
    for i in range(30):
        _write(lowers[-1] / "etc" / f"conf{i}", f"old value {i}\n".encode())
    for i in range(10):
        _write(lowers[0] / "etc" / f"conf{i}", f"new value {i}\n".encode())
    name = OPAQUE_XATTRS[0] if spec.privileged else OPAQUE_XATTRS[1]
    os.setxattr(lowers[0] / "etc", name, b"y")


def _git_repo(lowers: list[Path], name: str, files: int) -> None:
    """A committed, packed repository in the bottom layer; the top layer changes one file and
    adds an untracked one, so ``git status`` has something to report."""
    repo = lowers[-1] / name
    packages = max(1, files // 25)
    for i in range(files):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j}\n\n" for j in range(20))
        path = repo / f"pkg{i % packages}" / f"mod{i}.py"
        _write(path, body.encode())
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))
    _git(repo, "-c", "init.defaultBranch=main", "init", "-q")
    _git(repo, *GIT_ID, "add", "-A")
    _git(repo, *GIT_ID, "commit", "-q", "-m", "initial import")
    _git(repo, *GIT_ID, "gc", "-q")
    if len(lowers) > 1:
        _write(lowers[0] / name / "pkg0" / "mod0.py", b"# changed in a newer layer\n")
        _write(lowers[0] / name / "untracked.txt", b"new\n")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, env={**os.environ, **GIT_ENV})


def _refresh_git_index(repo: Path) -> None:
    """The copy has new inode numbers and ctimes; refresh the index once so that native's
    ``git status`` is not charged for re-hashing files, as the layers' index is fresh."""
    subprocess.run(
        ["git", "-c", "safe.directory=*", "-C", str(repo), "status", "--porcelain"],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, **GIT_ENV},
    )


def _big_file(rng: random.Random, path: Path, mib: int) -> None:
    """Incompressible data, 1 MiB at a time (a single randbytes of 1 GiB would need the RAM)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(rng.randbytes(1 << 20))


# -- merging -------------------------------------------------------------------------------


def merge_layers(lowers: list[Path], dest: Path) -> None:
    """Copy the overlayfs view of ``lowers`` (top first) into ``dest``, bottom layer first:
    a whiteout removes, an opaque directory replaces, anything else overrides."""
    dest.mkdir(parents=True)
    for layer in reversed(lowers):
        _apply_layer(layer, dest)


def _apply_layer(src: Path | str, dst: Path | str) -> None:
    with os.scandir(src) as entries:
        for entry in entries:
            target = os.path.join(dst, entry.name)
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                _remove(target)
            elif stat.S_ISDIR(st.st_mode):
                if _is_opaque(entry.path) or not _is_real_dir(target):
                    _remove(target)
                    os.mkdir(target)
                _apply_layer(entry.path, target)
                os.chmod(target, stat.S_IMODE(st.st_mode))
                os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
            else:
                _remove(target)
                shutil.copy2(entry.path, target, follow_symlinks=False)


def _is_opaque(path: str) -> bool:
    for name in OPAQUE_XATTRS:
        with contextlib.suppress(OSError):
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
    return False


def _is_real_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _remove(path: str) -> None:
    if _is_real_dir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


# -- manifest ------------------------------------------------------------------------------


def _scan(merged: Path, rename_dir: str) -> Manifest:
    """Classify every path of the merged copy (relative, sorted)."""
    dirs, files, symlinks, others = [], [], [], []
    total = 0
    for dirpath, dirnames, filenames in os.walk(merged):
        rel = os.path.relpath(dirpath, merged)
        for name in dirnames + filenames:
            path = os.path.normpath(os.path.join(rel, name))
            st = os.lstat(os.path.join(dirpath, name))
            kind = {stat.S_IFDIR: dirs, stat.S_IFREG: files, stat.S_IFLNK: symlinks}
            kind.get(stat.S_IFMT(st.st_mode), others).append(path)
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    stats = {"dirs": len(dirs), "files": len(files), "symlinks": len(symlinks), "bytes": total}
    return Manifest(
        dirs=sorted(dirs),
        files=sorted(files),
        symlinks=sorted(symlinks),
        others=sorted(others),
        big="big/big.bin",
        repo="repo",
        rename_dir=rename_dir,
        stats=stats,
    )


def layer_stats(tree: Tree) -> dict[str, int]:
    """Counts for the report header: what the union has to merge."""
    whiteouts = entries = 0
    for layer in tree.lowers:
        for dirpath, dirnames, filenames in os.walk(layer):
            entries += len(dirnames) + len(filenames)
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                whiteouts += stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    return {"layer_entries": entries, "whiteouts": whiteouts}
