"""`hydra/launcher=stacked`: reglab's launcher that trains a whole sweep as a few stacked models in one process.

Hydra expands the sweep as always; this launcher sets up every job as Hydra's basic launcher does (its directory,
`.hydra/` files and callbacks, through `run_job`), but instead of training each job there it collects them, groups
compatible ones (`reglab.stacking`) into stacks of at most `max_stack`, and trains each stack as one batched model
(`reglab.loop.train_stack`). Every job still ends with its own files and W&B run, as if it had run alone. Hydra
imports every module of `hydra_plugins` at start-up, so this one imports nothing heavy at module level.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class StackedLauncher(Launcher):
    def __init__(self, max_stack: int = 64) -> None:
        super().__init__()
        self.max_stack = max_stack
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from reglab.cli import prepare_member, train_members

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        returns, members = [], {}
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=prepare_member,  # sets the job up (directory, validation); training comes below
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            returns.append(ret)
            if ret.status == JobStatus.COMPLETED and ret.return_value is not None:
                members[idx] = ret.return_value
        objectives = train_members(members, self.max_stack, str(self.config.hydra.sweep.dir))
        for idx, ret in enumerate(returns, start=initial_job_idx):
            if idx in objectives:
                ret.return_value = objectives[idx]
            elif ret.status == JobStatus.COMPLETED:
                ret.return_value = float(
                    "nan"
                )  # bad input: recorded as a failed job, like the other launchers
        return returns
