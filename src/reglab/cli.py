"""The bridge from Hydra to the training loop: job facts, validation, and a clean exit on bad input."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from reglab.checkpoint import CheckpointError
from reglab.data import DatasetUnavailable
from reglab.errors import ConfigError
from reglab.schema import validate

PARALLEL_LAUNCHERS = ("joblib", "submitit", "ray")


def main(cfg: DictConfig) -> float:
    """Validate the config, then train; bad input exits non-zero with one line and leaves no run behind."""
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    job = job_facts(hydra)
    plain = OmegaConf.to_container(cfg, resolve=True)
    from reglab.loop import Interrupted, train  # torch is imported here, after the cheap checks

    try:
        validate(plain)
        return train(plain, run_dir, job)
    except (ConfigError, DatasetUnavailable, CheckpointError) as err:
        discard_unfinished_run(run_dir)
        print(f"reglab: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as stop:
        print(
            f"[reglab] {stop}: checkpoint written; continue with trainer.resume=true hydra.run.dir={run_dir}"
        )
        raise SystemExit(128 + signal.Signals[str(stop)].value) from None


def job_facts(hydra):
    from reglab.loop import Job

    multirun = hydra.mode == RunMode.MULTIRUN
    launcher = str(hydra.launcher.get("_target_", ""))
    return Job(
        overrides=list(hydra.overrides.task),
        group=Path(hydra.sweep.dir).name if multirun else None,
        multirun=multirun,
        parallel=any(name in launcher for name in PARALLEL_LAUNCHERS),
    )


def discard_unfinished_run(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but Hydra's own files, so no husk looks like a run."""
    if not run_dir.is_dir():
        return
    leftovers = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if not leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)
