"""The bridge from Hydra to the training loop: job facts, validation, and a clean exit on bad input.

Bad input in a single run: one line on stderr, exit status 2, and the run directory (holding only Hydra's own
files) removed. Inside a multirun the same line is recorded as the job's `failed` summary instead, so that one bad
combination never stops the rest of the sweep; the sweep report lists it.
"""

from __future__ import annotations

import atexit
import gc
import math
import shutil
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from reglab.errors import BAD_INPUT
from reglab.preemption import Interrupted, after_interrupt, resume_when_requeued
from reglab.schema import resolved, validate

PARALLEL_LAUNCHERS = ("joblib", "submitit", "ray")

# At exit, freeze what was created since (W&B, matplotlib, a compiled model's torch._dynamo) so that interpreter
# teardown does not walk it all; registered at import, so it runs after the exit handlers of W&B (imported later).
atexit.register(gc.freeze)


def main(cfg: DictConfig) -> float:
    """Validate the config (before any file is written beyond Hydra's own), then train."""
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    multirun = hydra.mode == RunMode.MULTIRUN
    try:
        plain = resolved(cfg)
        validate(plain)
        from reglab.loop import train  # the loop, models and data load only for a config that can run

        # torch's import leaves ~10^5 long-lived objects that every full garbage collection would walk again,
        # during training and once more at exit (~0.7 s measured): move them out of the collector's sight.
        gc.collect()  # earlier jobs of this process (basic launcher) may have left cyclic garbage: free it first
        gc.freeze()
        resume_when_requeued(plain["trainer"], run_dir)
        try:
            return train(plain, run_dir, job_facts(hydra, multirun))
        except Interrupted as stop:
            resume = f"-m hydra.sweep.dir={hydra.sweep.dir}" if multirun else f"hydra.run.dir={run_dir}"
            return after_interrupt(stop, run_dir, list(hydra.overrides.task), resume)
    except BAD_INPUT as err:
        print(f"reglab: error: {err}", file=sys.stderr)
        if multirun:
            record_bad_input(run_dir, err, list(hydra.overrides.task))
            return float("nan")
        discard_unfinished_run(run_dir)
        raise SystemExit(2) from None


def prepare_member(cfg: DictConfig):
    """The stacked launcher's per-job set-up (inside Hydra's `run_job`): validate, and return the job as a stack
    `Member`, or None when its config is bad (recorded as a failed job, as in any multirun)."""
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    try:
        plain = resolved(cfg)
        validate(plain)
    except BAD_INPUT as err:
        print(f"reglab: error: {err}", file=sys.stderr)
        record_bad_input(run_dir, err, list(hydra.overrides.task))
        return None
    from reglab.loop import Member

    return Member(cfg=plain, run_dir=run_dir, job=job_facts(hydra, multirun=True))


def train_members(
    members: dict, max_stack: int, sweep_dir: str, processes: int | str = 1, started: list | None = None
) -> dict[int, float]:
    """Train prepared jobs (job number -> Member) in stacks, `processes` of them side by side (this process trains
    one, the others each train in a process of their own, `started` ones first; 1: one after another in this
    process); returns each job's objective."""
    from reglab.stacking import group_into_stacks, release, resolve_processes, train_in_processes

    processes = resolve_processes(processes, {m.cfg["trainer"]["device"] for m in members.values()})
    stacks, apart = group_into_stacks({idx: m.cfg for idx, m in members.items()}, max_stack, processes)
    side_by_side = min(processes, len(stacks))
    where = f", {side_by_side} side by side" if side_by_side > 1 else ""
    print(
        f"[reglab] stacked launcher: {len(members)} jobs in {len(stacks)} stack(s) of at most {max_stack}{where}"
    )
    for line in apart:
        print(f"[reglab] {line}")
    for member in members.values():
        # a requeued SLURM job continues by itself
        resume_when_requeued(member.cfg["trainer"], member.run_dir)
    for number, jobs in enumerate(stacks):
        for idx in jobs:
            members[idx].job.stack = {"id": number, "jobs": jobs}
    if side_by_side > 1:
        return train_in_processes(stacks, members, side_by_side, sweep_dir, started)
    release(started or [])
    gc.collect()
    gc.freeze()
    objectives = {}
    for number, jobs in enumerate(stacks):
        for idx in jobs:  # its clock starts with its stack, not when the sweep was composed
            members[idx].started = time.perf_counter()
        objectives.update(train_one_stack(number, {idx: members[idx] for idx in jobs}, sweep_dir))
    return objectives


def train_one_stack(number: int, members: dict, sweep_dir: str, relay=None) -> dict[int, float]:
    """Train one stack (job number -> Member) and print a line per job; returns each job's objective. A stop signal
    also goes to the stacked launcher's `relay`, where one is given (`preemption.StopRelay`)."""
    from reglab.loop import objective, train_stack
    from reglab.preemption import after_finished_runs, after_stack_interrupt

    jobs = list(members)
    print(f"[reglab] stack {number}: {len(jobs)} jobs ({', '.join(map(str, jobs))}) training", flush=True)
    try:
        results = train_stack(list(members.values()), relay)
    # e.g. a data set that cannot be read: this stack's jobs fail, the others go on
    except BAD_INPUT as err:
        print(f"reglab: error: {err}", file=sys.stderr)
        for member in members.values():
            if member.summary is None:
                record_bad_input(member.run_dir, err, member.job.overrides)
        return dict.fromkeys(jobs, float("nan"))
    except Interrupted as stop:
        if not stop.finished:
            unfinished = [m for m in members.values() if m.summary is None]
            return after_stack_interrupt(stop, unfinished, f"-m hydra.sweep.dir={sweep_dir}")
        after_finished_runs(stop)  # exits, unless submitit's requeue signal came: then the job is simply done
        results = [objective(m.summary) if m.summary else math.nan for m in members.values()]
    for idx, member in members.items():
        print_job_line(idx, member)
    return dict(zip(jobs, results, strict=True))


def print_job_line(idx: int, member) -> None:
    summary = member.summary or {}
    if summary.get("test/acc") is None:
        print(
            f"[reglab] job {idx}: {summary.get('status')} {summary.get('error') or summary.get('stop_reason') or ''}"
        )
        return
    print(
        f"[reglab] job {idx}: {summary['status']} after {summary['epochs_run']} epochs, "
        f"val {100 * summary['val/acc']:.1f}%, test {100 * summary['test/acc']:.1f}% ({member.run_dir})"
    )


def job_facts(hydra, multirun: bool):
    from reglab.loop import Job

    launcher = str(hydra.launcher.get("_target_", ""))
    return Job(
        overrides=list(hydra.overrides.task),
        group=Path(hydra.sweep.dir).name if multirun else None,
        multirun=multirun,
        parallel=any(name in launcher for name in PARALLEL_LAUNCHERS),
    )


def record_bad_input(run_dir: Path, err: Exception, overrides: list[str]) -> None:
    from reglab.tracking import write_summary

    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "status": "failed",
        "error": f"{type(err).__name__}: {err}",
        "epochs_run": 0,
        "overrides": overrides,
    }
    write_summary(run_dir, summary)


def discard_unfinished_run(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but Hydra's own files, so no husk looks like a run."""
    if not run_dir.is_dir():
        return
    leftovers = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if not leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)
