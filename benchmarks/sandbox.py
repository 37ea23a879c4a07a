#!/usr/bin/env python3
"""Start-up time of ``unionfs sandbox run -- true``, end to end, and where it goes.

    python3 benchmarks/sandbox.py [--runs N] [--user NAME] [--unionfs CMD] [--commit N]

Runs the sandbox over a scratch home (made for the run, removed after) N
times and reports the median wall time, next to the floors it is built on:
the interpreter starting, and ``unshare -Urm true`` (the namespaces alone),
plus bubblewrap binding the same home when installed.  The per-step split is
the runner's own (UNIONFS_SANDBOX_TIMES=1).  As root, ``--user`` (default
``unionfs-test`` when it exists) runs everything as that user, as a desktop
user would.  ``--commit N`` (default 10000) then times ``unionfs sandbox
commit`` of N small files a sandboxed program wrote (try's published figure
for 10,000: about 21.7 s).  No figure is asserted; ``--runs 1 --commit 100``
is the smoke test.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _demote(user: str | None) -> Callable[[], None] | None:
    if user is None:
        return None
    pw = pwd.getpwnam(user)

    def demote() -> None:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)

    return demote


def _time(cmd: list[str], env: dict[str, str], cwd: str, user: str | None) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, preexec_fn=_demote(user)
    )
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return dt, r.stderr


def _steps(stderr: str) -> dict[str, float]:
    m = re.search(r"start-up (.*)", stderr)
    out: dict[str, float] = {}
    if m:
        for part in m.group(1).split(", "):
            name, _, ms = part.rpartition(" ")[0].rpartition(" ")
            out[name] = float(ms)
    return out


def _commit_references(files: Path, base: Path) -> dict[str, float]:
    """The floors of a commit, measured on the same files in the same run: ``tar``
    piping them into a new directory, and a per-file copy loop (``shutil.copy2``,
    as a naive commit does), each followed by one ``sync -f`` as the commit syncs."""
    out = {}
    target = base / "tar-x"
    target.mkdir()
    t0 = time.monotonic()
    subprocess.run(
        f"tar -cf - -C {files} . | tar -xf - -C {target} && sync -f {target}",
        shell=True,
        check=True,
    )
    out["tar -c piped to tar -x, then sync -f"] = time.monotonic() - t0
    target = base / "copy-loop"
    target.mkdir()
    t0 = time.monotonic()
    for name in os.listdir(files):
        shutil.copy2(files / name, target / name)
    subprocess.run(["sync", "-f", str(target)], check=True)
    out["copy loop (shutil.copy2 per file), then sync -f"] = time.monotonic() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--runs", type=int, default=11)
    p.add_argument("--user", default=None)
    default = shutil.which("unionfs", path=os.path.dirname(sys.executable)) or "unionfs"
    p.add_argument("--unionfs", default=default)
    p.add_argument("--commit", type=int, default=10000, metavar="N")
    args = p.parse_args(argv)
    user = args.user
    if user is None and os.geteuid() == 0:
        try:
            pwd.getpwnam("unionfs-test")
            user = "unionfs-test"
        except KeyError:
            pass
    base = Path(tempfile.mkdtemp(prefix="unionfs-sandbox-bench-"))
    os.chmod(base, 0o755)
    home, runtime = base / "home", base / "run"
    home.mkdir()
    runtime.mkdir(mode=0o700)
    (home / "file").write_text("x\n")
    if user is not None and os.geteuid() == 0:
        pw = pwd.getpwnam(user)
        for d in (home, home / "file", runtime):
            os.chown(d, pw.pw_uid, pw.pw_gid)
    env = {
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "UNIONFS_SANDBOX_TIMES": "1",
    }
    rows: dict[str, list[float]] = {}
    steps: dict[str, list[float]] = {}
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "unshare -Urm true": ["unshare", "-Urm", "true"],
        "unionfs sandbox run -- true": [args.unionfs, "sandbox", "run", "--", "true"],
    }
    if shutil.which("bwrap"):
        cases["bwrap --bind / / --bind HOME HOME true"] = [
            "bwrap", "--bind", "/", "/", "--bind", str(home), str(home), "true",
        ]  # fmt: skip
    try:
        for _ in range(args.runs):
            for name, cmd in cases.items():
                dt, err = _time(cmd, env, str(home), user)
                rows.setdefault(name, []).append(dt)
                for k, v in _steps(err).items():
                    steps.setdefault(k, []).append(v)
        commit_s, refs = None, {}
        if args.commit:
            prog = (
                "import os\nos.mkdir('many')\n"
                f"for i in range({args.commit}):\n"
                "    with open(f'many/f{i}', 'w') as f: f.write(str(i))\n"
            )
            run = [args.unionfs, "sandbox", "run", "--name", "bench", "--", sys.executable]
            _time([*run, "-c", prog], env, str(home), user)
            commit_s, _ = _time([args.unionfs, "sandbox", "commit", "bench"], env, str(home), user)
            if len(os.listdir(home / "many")) != args.commit:
                raise SystemExit("the commit did not write every file")
            refs = _commit_references(home / "many", base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"| start-up ({args.runs} runs{', as ' + user if user else ''}) | median | min |")
    print("|---|---|---|")
    for name, ts in rows.items():
        print(f"| {name} | {statistics.median(ts) * 1000:.0f} ms | {min(ts) * 1000:.0f} ms |")
    if steps:
        split = ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in steps.items())
        print(f"\nsandbox steps (median): {split}")
    if commit_s is not None:
        print(f"\nsandbox commit of {args.commit} small files: {commit_s:.2f} s")
        print(f"\n| commit of {args.commit} small files | s |\n|---|---|")
        print(f"| unionfs sandbox commit (journaled, durable) | {commit_s:.2f} |")
        for name, t in refs.items():
            print(f"| {name} | {t:.2f} |")
        print("| try's commit (its published figure) | 21.7 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
