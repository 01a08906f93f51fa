"""reglab's launchers that train a whole sweep as a few stacked models (README: "Stacked sweeps").

- `hydra/launcher=stacked`: on this machine. Hydra expands the sweep as always; every job is set up as Hydra's
  basic launcher does it (its directory, `.hydra/` files and callbacks, through `run_job`), but instead of training
  each job there the launcher collects them, groups compatible ones (`reglab.stacking`) into stacks of at most
  `max_stack`, and trains each stack as one batched model (`reglab.loop.train_stack`): on the CPU one stack per
  core side by side (`processes`; this process trains one of them, each other one trains in a process of its
  own), on a GPU one after another in this process.
- `hydra/launcher=stacked_slurm`: the same stacks, each one SLURM job submitted through submitit (hydra-submitit-
  launcher's settings: partition, time limit, ...), so that a 1000-job sweep is a few dozen SLURM jobs. A stack
  that hits its time limit or is pre-empted checkpoints every member and is requeued as a whole.

Every job still ends with its own files and W&B run, as if it had run alone. Hydra imports every module of
`hydra_plugins` at start-up, so this one imports nothing heavy at module level.
"""

# no `from __future__ import annotations`: Hydra loads plugin modules in a way that breaks dataclasses with it
import contextlib
import copy
import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.defaults_list import DefaultsList
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def prepare_jobs(
    hydra_context: HydraContext, config: DictConfig, jobs: list[tuple[int, list[str]]], check: bool = False
):
    """Set every job up as Hydra's own launchers do (directory, `.hydra/` files, callbacks) without training it:
    returns its `JobReturn` and, for a job whose config is valid, its stack `Member`, both by job number.

    `check`: first compose and validate every job (`reglab.schema.launcher_checks_jobs` says when), so that a bad
    value stops the sweep with one line before any job is set up, and no config is composed twice."""
    from reglab.cli import prepare_member
    from reglab.schema import stop_on_bad_job

    configs = [
        (idx, overrides, sweep_config(hydra_context, config, idx, overrides)) for idx, overrides in jobs
    ]
    if check:
        for _, overrides, composed in configs:
            stop_on_bad_job(without_hydra(composed), overrides, sweep_dir=Path(str(config.hydra.sweep.dir)))
    returns, members = {}, {}
    for idx, overrides, composed in configs:
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        ret = run_job(
            hydra_context=hydra_context,
            task_function=prepare_member,  # sets the job up (directory, validation); training comes later
            config=composed,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        returns[idx] = ret
        if ret.status == JobStatus.COMPLETED and ret.return_value is not None:
            members[idx] = ret.return_value
    return returns, members


def sweep_config(
    hydra_context: HydraContext, config: DictConfig, idx: int, overrides: list[str]
) -> DictConfig:
    """Job `idx`'s config with Hydra's node, as Hydra's own launchers compose it (or as the sweeper already did)."""
    loader = hydra_context.config_loader
    if isinstance(loader, ComposedOnce):
        composed = loader.take(config, list(overrides))
    else:
        composed = loader.load_sweep_config(config, list(overrides))
    with open_dict(composed):
        composed.hydra.job.id = idx
        composed.hydra.job.num = idx
    return composed


class ComposedOnce:
    """Hydra's config loader, keeping each job's config as Hydra's basic sweeper composes it to check that the batch
    composes (`validate_batch_is_legal`, which throws it away), for the launcher to take instead of composing it a
    second time: ~0.2 s a job, 10 s of a 48-job grid. Everything else goes to Hydra's loader."""

    def __init__(self, loader, on_composed=None) -> None:
        self.loader = loader
        self.kept: dict[tuple[str, ...], DictConfig] = {}
        self.on_composed = on_composed  # called with the number of configs kept so far
        self.same_defaults = SameDefaults()

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        with self.same_defaults.in_use(self.loader):
            composed = self.loader.load_sweep_config(master_config, sweep_overrides)
        self.kept[tuple(sweep_overrides)] = composed
        if self.on_composed is not None:
            self.on_composed(len(self.kept))
        return composed

    def take(self, master_config: DictConfig, overrides: list[str]) -> DictConfig:
        """The job's config as the sweeper composed it (handed out once), else freshly composed."""
        kept = self.kept.pop(tuple(overrides), None)
        if kept is not None:
            return kept
        with self.same_defaults.in_use(self.loader):
            return self.loader.load_sweep_config(master_config, overrides)

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (a copy being made): no endless recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


class SameDefaults:
    """What Hydra's composition of a sweep's jobs has in common, kept to compose each job once, not twice over.

    Hydra composes every job from scratch: it builds the defaults list from the config-group choices (reading every
    YAML file again) and merges the files it names (~0.1 s a job), and only then applies the job's own values. The
    jobs of a grid over values (seeds, strengths: `trainer.seed=0,1,2`) choose the same options, so their defaults
    lists and merged files are the same: kept here, by the primary config, the search path and every override but
    the value ones, a later job's composition copies the merged files (~0.01 s) and Hydra applies its values as
    always. Which override is a value one is Hydra's own rule (`hydra._internal.defaults_list.Overrides`): one
    whose key is no config group, or whose value is a dict. Tested: equal to Hydra's own composition."""

    def __init__(self) -> None:
        self.defaults: dict[tuple, DefaultsList] = {}
        self.merged: dict[int, DictConfig] = {}  # id of a kept defaults list -> the files it names, merged

    @contextlib.contextmanager
    def in_use(self, loader):
        """Hydra's composition by `loader`, with its two common steps taken from here (another loader than Hydra's
        own, whose steps these are, composes as it does)."""
        from hydra._internal import config_loader_impl

        if not isinstance(loader, config_loader_impl.ConfigLoaderImpl):
            yield
            return
        build, merge = config_loader_impl.create_defaults_list, loader._compose_config_from_defaults_list

        def defaults_list(repo, config_name, overrides_list, prepend_hydra, skip_missing):
            values = [o for o in overrides_list if is_value_override(repo, o)]
            choices = tuple(o.input_line for o in overrides_list if not is_value_override(repo, o))
            searched = tuple((source.provider, source.path) for source in repo.get_sources())
            key = (config_name, prepend_hydra, skip_missing, searched, choices)
            if key not in self.defaults:
                self.defaults[key] = build(repo, config_name, overrides_list, prepend_hydra, skip_missing)
            kept = self.defaults[key]
            overrides = copy.copy(kept.overrides)
            overrides.config_overrides = values
            return dataclasses.replace(kept, config_overrides=values, overrides=overrides)

        def merged(defaults, repo):
            if id(defaults) not in self.merged:
                self.merged[id(defaults)] = merge(defaults=defaults, repo=repo)
            return copy.deepcopy(self.merged[id(defaults)])

        config_loader_impl.create_defaults_list, loader._compose_config_from_defaults_list = (
            defaults_list,
            merged,
        )
        try:
            yield
        finally:
            config_loader_impl.create_defaults_list = build
            del loader._compose_config_from_defaults_list  # the method again


def is_value_override(repo, override) -> bool:
    """Hydra's rule for an override that sets a value rather than choosing a config group's option."""
    if override.is_sweep_override():
        return False  # left out by Hydra: never a job's
    return isinstance(override.value(), dict) or not repo.group_exists(override.key_or_group)


def without_hydra(composed: DictConfig) -> DictConfig:
    """The job's own config: a copy without Hydra's node."""
    task = composed.copy()
    with open_dict(task):
        del task["hydra"]
    return task


def with_objectives(returns: dict[int, JobReturn], objectives: dict[int, float]) -> list[JobReturn]:
    """The jobs' returns in job order, each carrying its objective (NaN for a job whose config was bad)."""
    for idx, ret in returns.items():
        if idx in objectives:
            ret.return_value = objectives[idx]
        elif ret.status == JobStatus.COMPLETED:
            ret.return_value = float("nan")  # bad input: recorded as a failed job, like the other launchers
    return [returns[idx] for idx in sorted(returns)]


def checked_max_stack(value) -> int:
    """`hydra.launcher.max_stack` as a positive int; anything else stops the sweep before any job starts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        print(
            f"reglab: error: hydra.launcher.max_stack={value!r}: must be an integer >= 1 "
            "(the most jobs trained in one stack)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return value


def checked_processes(value) -> int | str:
    """`hydra.launcher.processes` as a positive int or "auto"; anything else stops the sweep before any job starts."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    print(
        f"reglab: error: hydra.launcher.processes={value!r}: must be an integer >= 1 or auto "
        "(how many stacks train side by side)",
        file=sys.stderr,
    )
    raise SystemExit(2)


class StackedLauncher(Launcher):
    def __init__(self, max_stack: int = 64, processes: int | str = "auto") -> None:
        super().__init__()
        self.max_stack = checked_max_stack(max_stack)
        self.processes = checked_processes(processes)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.started: list = []  # stack processes started while the sweep is composed

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # the sweeper holds the same context: the configs it composes to check a batch reach this launcher
        if not isinstance(hydra_context.config_loader, ComposedOnce):
            hydra_context.config_loader = ComposedOnce(hydra_context.config_loader)
        hydra_context.config_loader.on_composed = self.jobs_composed
        self.config, self.hydra_context = config, hydra_context

    def jobs_composed(self, count: int) -> None:
        """Once the sweep has jobs enough for two stacks side by side, start the second one's process: it loads
        torch on a core that Hydra, composing the rest of the jobs on one, leaves idle (this process trains the
        first stack itself: `stacking.train_in_processes`)."""
        from reglab.stacking import MIN_SPLIT, resolve_processes, start_stack_processes

        if self.started or count != 2 * MIN_SPLIT:
            return
        processes = resolve_processes(self.processes, {str(self.config.trainer.device)})
        # one, as many as 2 x MIN_SPLIT jobs can use; a larger sweep starts more when it needs them
        if processes > 1:
            self.started = start_stack_processes(1)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from reglab.cli import train_members
        from reglab.schema import launcher_checks_jobs

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [(initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides)]
        returns, members = prepare_jobs(
            self.hydra_context, self.config, jobs, launcher_checks_jobs(self.config)
        )
        started, self.started = self.started, []
        sweep_dir = str(self.config.hydra.sweep.dir)
        objectives = train_members(members, self.max_stack, sweep_dir, self.processes, started)
        return with_objectives(returns, objectives)


@dataclass
class StackedSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.reglab_stacked_launcher.StackedSlurmLauncher"
    # at most this many jobs in one stack, that is in one SLURM job; untyped, so that a bad value reaches
    # `checked_max_stack` and its one-line error instead of OmegaConf's multi-line type error
    max_stack: Any = 64


ConfigStore.instance().store(
    group="hydra/launcher", name="stacked_slurm_base", node=StackedSlurmConf, provider="reglab"
)


class StackedSlurmLauncher(SlurmLauncher):
    """Hydra's submitit SLURM launcher, one SLURM job per stack instead of one per job."""

    def __init__(self, max_stack: int = 64, **params) -> None:
        super().__init__(**params)
        self.max_stack = checked_max_stack(max_stack)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from reglab.stacking import group_into_stacks

        jobs = {initial_job_idx + i: list(overrides) for i, overrides in enumerate(job_overrides)}
        stacks, apart = group_into_stacks(
            {idx: self.composed(overrides) for idx, overrides in jobs.items()}, self.max_stack
        )
        print(f"[reglab] stacked SLURM launcher: {len(jobs)} jobs in {len(stacks)} SLURM job(s)")
        for line in apart:
            print(f"[reglab] {line}")
        stack_jobs = [[(idx, jobs[idx]) for idx in stack] for stack in stacks]
        submitted = self.executor().map_array(self, stack_jobs, [Singleton.get_state()] * len(stacks))
        returns = {}
        for stack, job in zip(stacks, submitted, strict=True):
            returns.update(zip(stack, job.results()[0], strict=True))
        return [returns[idx] for idx in sorted(returns)]

    def composed(self, overrides: list[str]) -> dict:
        """A job's config without Hydra's node, for grouping only (an unresolvable one trains in a stack of its own
        and fails there with its one-line error)."""
        task = without_hydra(sweep_config(self.hydra_context, self.config, 0, overrides))
        try:
            return OmegaConf.to_container(task, resolve=True)
        except Exception:
            return {"unresolvable": overrides}

    def executor(self):
        """submitit's executor with this launcher's settings, mapped as hydra-submitit-launcher maps them."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        params = dict(self.params)
        executor = submitit.AutoExecutor(
            folder=params.pop("submitit_folder"),
            cluster=self._EXECUTOR,
            **{f"{self._EXECUTOR}_max_num_timeout": params.pop("max_num_timeout")},
        )
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{key if key in generic else f"{self._EXECUTOR}_{key}": value for key, value in params.items()}
        )
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        return executor

    def __call__(self, stack_jobs: list[tuple[int, list[str]]], singleton_state) -> list[JobReturn]:
        """One SLURM job: set its jobs up, then train them as one stack (resuming them when requeued)."""
        from reglab.cli import train_members

        Singleton.set_state(singleton_state)
        setup_globals()
        returns, members = prepare_jobs(self.hydra_context, self.config, stack_jobs)
        objectives = train_members(members, len(stack_jobs), str(self.config.hydra.sweep.dir))
        return with_objectives(returns, objectives)
