"""Shared fixtures: the real entrypoint in a subprocess, offline W&B, a data cache made once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import reglab  # noqa: F401  (first, before any matmul: it sets MKL's reproducibility mode, which MKL reads once)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["trainer.epochs=3", "dataset.n_train=300", "trainer.plots=false"]  # a run of about a second


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """No test ever talks to W&B's servers or writes outside tmp_path."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """MNIST-1D generated once for the whole session (the loader caches it here)."""
    root = tmp_path_factory.mktemp("data")

    from reglab.data import load_dataset, mnist1d_config

    load_dataset(mnist1d_config(str(root)))
    return root


def run_train(args: list[str], cwd: Path, data_root: Path, check: bool = True, timeout: int = 300):
    """`python train.py ARGS` as a user would run it, with outputs and data under the test's directories."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HYDRA_FULL_ERROR": "0"}
    multirun = ["-m"] if "-m" in args else []
    args = [a for a in args if a != "-m"]
    cmd = [sys.executable, str(ROOT / "train.py"), *multirun, *args, f"dataset.root={data_root}"]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
