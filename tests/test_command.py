"""The ``unionfs`` entry point: dispatch to subcommands, usage and errors."""

from __future__ import annotations

import subprocess
import sys

from unionfs import command


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unionfs.command", *args], capture_output=True, text=True
    )


def test_help_lists_every_subcommand() -> None:
    r = run("--help")
    assert r.returncode == 0
    for name in command.SUBCOMMANDS:
        assert f"  {name} " in r.stdout


def test_no_command_is_a_usage_error() -> None:
    r = run()
    assert r.returncode == 2
    assert "usage: unionfs COMMAND" in r.stdout


def test_unknown_command_is_one_line_and_exit_2() -> None:
    r = run("frobnicate")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "unionfs: unknown command 'frobnicate' (see 'unionfs --help')"
    ]


def test_mount_is_unionfs_mount() -> None:
    r = run("mount", "--version")
    assert r.returncode == 0
    assert r.stdout.startswith("unionfs ")
    r = run("mount", "/nonexistent-lower", "/nonexistent-mnt")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1


def test_every_subcommand_module_has_a_main() -> None:
    import importlib

    for sub in command.SUBCOMMANDS.values():
        assert callable(importlib.import_module(sub.module).main)
