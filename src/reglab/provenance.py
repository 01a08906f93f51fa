"""Where a published number came from: the commit (and whether the tree had uncommitted changes), the versions and
the machine. `make reproduce`, `make figures` and `make bench` record it beside their outputs, and
tests/test_published.py re-runs what it can when it runs on the same kind of machine.

    python -m reglab.provenance            # prints it as JSON
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def git_commit(root: Path = ROOT) -> str:
    """The checkout's short commit, '+dirty' with uncommitted changes to tracked files (read-only git calls)."""

    def git(*args: str) -> str:
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        return subprocess.run(
            ["git", *args], cwd=root, env=env, capture_output=True, text=True, check=True
        ).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    import torch

    return {
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "date": date.today().isoformat(),
    }


def describe(facts: dict) -> str:
    """One line: 'commit 1a2b3c4, torch 2.14.1, Python 3.11.7, AMD EPYC ..., 2 cores, 2026-11-27'."""
    return (
        f"commit {facts['commit']}, torch {facts['torch']}, Python {facts['python']}, {facts['cpu']}, "
        f"{facts['cores']} cores, {facts['date']}"
    )


def same_machine_kind(facts: dict) -> bool:
    """Whether metrics recorded under `facts` must come out bit-identical here: same CPU model and torch version
    (other CPUs or versions may pick other kernels and round differently)."""
    import torch

    return facts.get("cpu") == cpu_model() and facts.get("torch") == torch.__version__


if __name__ == "__main__":
    json.dump(provenance(), sys.stdout, indent=2)
    print()
