"""`hydra/launcher=stacked` end to end: the same records as one job at a time, faults, W&B, and what cannot be exact."""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

from reglab import diagnostics
from reglab.loop import Job, Member, train_stack
from tests.conftest import ROOT, TINY, job_dirs, read_metrics, read_summary, run_train
from tests.test_loop import config
from tests.test_preemption import submitit_job  # noqa: F401  (a fixture)
from tests.test_stack import without_time

QUICK = ["logger=none", "trainer.plots=false", "trainer.save_weights=false"]
GRID = ["regularizer=l2", "regularizer.l2.weight_decay=0,0.01", "trainer.seed=0,1", "model=mlp,cnn1d"]


def test_a_stacked_sweep_records_exactly_what_the_basic_launcher_does(tmp_path, data_root):
    runs = {}
    for launcher in ("basic", "stacked"):
        sweep = tmp_path / launcher
        result = run_train(
            ["-m", *QUICK, *TINY, *GRID, f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}"],
            tmp_path,
            data_root,
        )
        runs[launcher] = (sweep, result.stdout)
        assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    (basic, _), (stacked, out) = runs["basic"], runs["stacked"]
    assert "8 jobs in 2 stack(s)" in out and "model.name='cnn1d' (not 'mlp')" in out
    for mine, theirs in zip(job_dirs(stacked), job_dirs(basic), strict=True):
        assert without_time(read_metrics(mine)) == without_time(read_metrics(theirs))
        summary = read_summary(mine)
        assert summary["test/acc"] == read_summary(theirs)["test/acc"]
        assert summary["stack"]["size"] == 4 and read_summary(theirs)["stack"]["size"] == 1
    assert (stacked / "report.md").exists()


def start(args: list[str], cwd, data_root) -> subprocess.Popen:
    env = {"PYTHONPATH": str(ROOT / "src"), "HYDRA_FULL_ERROR": "0", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *args, f"dataset.root={data_root}"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epochs(process: subprocess.Popen, metrics, epochs: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= epochs):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)


# interrupted as one stack, or as two side by side (each in its own process, the signal passed on by the launcher);
# resumed as they were, or each job alone: a member's optimizer state is saved per member even where the optimizer
# updated its weights in a block with the others (models.member_block)
@pytest.mark.parametrize(
    "interrupted_as, resumed_as",
    [
        (["hydra.launcher.processes=1"], []),
        # ~45 s on a slow 2-core machine: make test-slow (CI runs it) keeps make test under 10 minutes there
        pytest.param(["hydra.launcher.processes=2"], [], marks=pytest.mark.slow),
        pytest.param(["hydra.launcher.processes=1"], ["hydra.launcher.max_stack=1"], marks=pytest.mark.slow),
    ],
    ids=["one stack", "side by side", "alone"],
)
def test_sigterm_checkpoints_every_member_and_resume_finishes_them_exactly(
    tmp_path, data_root, interrupted_as, resumed_as
):
    args = [*QUICK, "trainer.epochs=30", "trainer.checkpoint_every=0", "hydra/launcher=stacked"]
    args += [
        "trainer.save_weights=true",
        "regularizer=[dropout,early_stopping,l2]",
        "regularizer.early_stopping.patience=100",
        # coupled decay updates runs of 2 members, the optimizer one block of 4: each keeps its state
        "regularizer.l2.weight_decay=0.01,0.001",
        "trainer.seed=0,1",
    ]
    interrupted = tmp_path / "interrupted"
    process = start([*args, *interrupted_as, f"hydra.sweep.dir={interrupted}"], tmp_path, data_root)
    for job in (0, 15):  # a job of each stack when there are two (16 jobs: dropout's grid of p times these)
        wait_for_epochs(process, interrupted / str(job) / "metrics.jsonl", 3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, (out, err)
    assert "trainer.resume=true" in out
    assert all((job / "checkpoint.pt").exists() for job in job_dirs(interrupted))
    assert not any((job / "summary.json").exists() for job in job_dirs(interrupted))
    resume = ["-m", *args, *resumed_as, "trainer.resume=true", f"hydra.sweep.dir={interrupted}"]
    run_train(resume, tmp_path, data_root)

    straight = tmp_path / "straight"
    run_train(["-m", *args, f"hydra.sweep.dir={straight}"], tmp_path, data_root)
    varying = (
        "wall_time_s",
        "train_time_s",
        "run_dir",
        "stack",
        "threads",
        "overrides",
    )  # resume adds to them
    for resumed, reference in zip(job_dirs(interrupted), job_dirs(straight), strict=True):
        assert without_time(read_metrics(resumed)) == without_time(read_metrics(reference))
        summary, expected = read_summary(resumed), read_summary(reference)
        assert {k: v for k, v in summary.items() if k not in varying} == {
            k: v for k, v in expected.items() if k not in varying
        }
        for weights in ("best.pt", "last.pt"):
            mine, theirs = torch.load(resumed / weights), torch.load(reference / weights)
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def stack_processes(pid: int) -> list[int]:
    """The processes a stacked launcher started for its stacks (not multiprocessing's resource tracker)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        children += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
    return [c for c in children if "spawn_main" in open(f"/proc/{c}/cmdline").read()]


def blocked_signals(pid: int) -> int:
    """The signal mask of a process's main thread, as /proc shows it (bit n-1 for signal n)."""
    line = next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigBlk:"))
    return int(line.split()[1], 16)


def test_a_stop_before_a_stack_process_trains_is_kept_until_its_stack_arrives():
    from reglab.stacking import start_stack_processes

    [(process, pipe)] = start_stack_processes(1)
    deadline = time.monotonic() + 120
    while not blocked_signals(process.pid) & (1 << (signal.SIGTERM - 1)):  # it waits for a stack now
        assert time.monotonic() < deadline and process.is_alive()
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)  # the launcher passes a stop on, just before handing the stack over
    time.sleep(0.2)
    assert process.is_alive()  # kept pending, not acted on (its default action would have ended the process)
    pipe.send((0, [], "unused", 1))
    process.join(timeout=60)
    assert process.exitcode == 128 + signal.SIGTERM  # stopped before training: nothing to checkpoint


AFTER_TRAINING_STOP = """
import os, signal, sys
from pathlib import Path
from reglab import tracking
from reglab.loop import Job, Member, train_stack
from reglab.stacking import hold_stop_signals
from tests.test_loop import config

hold_stop_signals()  # as a stack's process does
finished, original = [], tracking.RunRecord.finish

def finish(self, failed=False):  # W&B's run.finish() (seconds online) stands here
    if not finished:
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher passes a stop on, after the stack has trained
    original(self, failed)
    finished.append(self.run_dir.name)

tracking.RunRecord.finish = finish
root, data_root = Path(sys.argv[1]), sys.argv[2]
members = []
for k in range(2):
    (root / str(k)).mkdir(parents=True)
    cfg = config(data_root, "trainer.epochs=2", "dataset.n_train=300", f"trainer.seed={k}")
    members.append(Member(cfg=cfg, run_dir=root / str(k), job=Job(multirun=True, parallel=True)))
train_stack(members)
print("finished:", sorted(finished))
"""


def test_a_stop_after_a_stack_process_trained_does_not_cut_its_records_short(tmp_path, data_root):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-c", AFTER_TRAINING_STOP, str(tmp_path), str(data_root)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "finished: ['0', '1']" in result.stdout
    assert all(read_summary(tmp_path / k)["status"] == "completed" for k in ("0", "1"))


def test_a_stack_whose_process_dies_fails_its_own_jobs_and_no_others(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    args = [
        *QUICK,
        "dataset.n_train=300",
        "trainer.epochs=300",
        "trainer.seed=0,1,2,3",
        "hydra/launcher=stacked",
    ]
    args += ["hydra.launcher.max_stack=2", "hydra.launcher.processes=2", f"hydra.sweep.dir={sweep}"]
    process = start(args, tmp_path, data_root)
    for job in (0, 2):  # both stacks train
        wait_for_epochs(process, sweep / str(job) / "metrics.jsonl", 2)
    stacks = stack_processes(process.pid)
    assert len(stacks) == 1  # the launcher's process trains the other stack itself
    os.kill(stacks[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, (out, err)
    summaries = [read_summary(job) for job in job_dirs(sweep)]
    statuses = [s["status"] for s in summaries]
    assert sorted([statuses[:2], statuses[2:]]) == [["completed"] * 2, ["failed"] * 2], statuses
    for summary in summaries:
        if summary["status"] == "failed":
            assert "exit code -9" in summary["error"] and summary["epochs_run"] >= 2
    assert "2 unfinished job(s) recorded as failed" in out


def test_rerunning_a_finished_stacked_sweep_trains_nothing(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    args = ["-m", *QUICK, *TINY, "trainer.seed=0,1", "hydra/launcher=stacked", f"hydra.sweep.dir={sweep}"]
    run_train(args, tmp_path, data_root)
    finished_at = [(job / "summary.json").stat().st_mtime_ns for job in job_dirs(sweep)]
    result = run_train([*args, "trainer.resume=true"], tmp_path, data_root)
    assert result.stdout.count("already finished") == 2
    assert [(job / "summary.json").stat().st_mtime_ns for job in job_dirs(sweep)] == finished_at


def test_every_stacked_job_gets_its_own_wandb_run(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    run_train(
        [
            "-m",
            "logger=wandb",
            *TINY,
            "trainer.seed=0,1,2",
            "hydra/launcher=stacked",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        data_root,
    )
    run_ids = set()
    for job in job_dirs(sweep):
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        run_ids.add(runs[0].name.rsplit("-", 1)[1])
    assert len(run_ids) == 3


def test_an_unreachable_wandb_server_costs_a_stack_one_timeout(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed port on this machine
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.delenv("WANDB_MODE")
    sweep = tmp_path / "sweep"
    started = time.monotonic()
    result = run_train(
        ["-m", "logger=wandb", "logger.wandb.mode=online", "logger.wandb.init_timeout=3", *TINY]
        + ["trainer.seed=0,1,2", "hydra/launcher=stacked", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        data_root,
    )
    # bounded: the lone run's test allows 90 s for one failed start; the stack and its report pay one each
    assert time.monotonic() - started < 120
    # one failed online start for the whole stack (its later members go offline at once), one for the report run
    assert result.stdout.count("W&B online start failed") == 2
    assert all(read_summary(job)["status"] == "completed" for job in job_dirs(sweep))
    assert all(list((job / "wandb").glob("offline-run-*")) for job in job_dirs(sweep))


class FakeWandbRun:
    """What a stack's RunRecord calls on a W&B run; `broken` raises on every call, as a W&B that stopped working."""

    def __init__(self, broken: bool):
        self.broken, self.offline, self.id = broken, False, f"fake{id(self)}"
        self.logged, self.finished, self.summary = [], None, {}

    def log(self, metrics, step=None):
        if self.broken:
            raise ConnectionError("W&B went away")
        self.logged.append(step)

    def finish(self, exit_code=0):
        if self.broken:
            raise ConnectionError("W&B went away")
        self.finished = exit_code


def test_one_members_wandb_failure_leaves_the_other_members_alone(tmp_path, data_root, monkeypatch, capsys):
    """A stack runs K W&B runs in one process: one that breaks mid-run is dropped for that member alone, whose files
    stay complete, while the others go on logging every epoch and finish their runs."""
    from reglab import loop

    started = [FakeWandbRun(broken=False), FakeWandbRun(broken=True), FakeWandbRun(broken=False)]
    runs = iter(started)
    monkeypatch.setattr(loop, "start_wandb", lambda *args, **kwargs: next(runs))
    members = []
    for k in range(3):
        cfg = config(
            data_root, "trainer.epochs=3", "dataset.n_train=300", f"trainer.seed={k}", "logger=wandb"
        )
        (tmp_path / str(k)).mkdir()
        members.append(Member(cfg=cfg, run_dir=tmp_path / str(k), job=Job(multirun=True)))
    train_stack(members)
    assert next(runs, None) is None  # each member started its own run
    assert capsys.readouterr().out.count("W&B stopped working") == 1
    for k, run in enumerate(started):
        assert read_summary(tmp_path / str(k))["status"] == "completed"
        assert [row["epoch"] for row in read_metrics(tmp_path / str(k))] == [1, 2, 3]
        if not run.broken:
            assert run.logged == [1, 2, 3] and run.finished == 0 and run.summary["status"] == "completed"


def test_a_failure_while_finishing_one_member_fails_that_member_alone(tmp_path, data_root):
    """A figure that cannot be written (drawn in another process, in a stack) fails its member alone."""
    broken = tmp_path / "1"
    (broken / "curves.png").mkdir(parents=True)  # savefig cannot write a file where a directory is
    members = []
    for k in range(3):
        cfg = config(
            data_root,
            "trainer.epochs=2",
            "dataset.n_train=300",
            "trainer.plots=true",
            "trainer.threads=2",  # the figures are drawn by two processes, whatever the cores
            f"trainer.seed={k}",
        )
        (tmp_path / str(k)).mkdir(exist_ok=True)
        members.append(Member(cfg=cfg, run_dir=tmp_path / str(k), job=Job(multirun=True)))
    objectives = train_stack(members)
    assert [read_summary(tmp_path / str(k))["status"] for k in range(3)] == [
        "completed",
        "failed",
        "completed",
    ]
    assert "Is a directory" in read_summary(broken)["error"]
    assert (tmp_path / "2" / "weights.png").is_file()
    assert math.isnan(objectives[1]) and not math.isnan(objectives[0])


BUILTIN_MASKS = {  # the techniques whose built-in implementation draws from torch's global generator
    "dropout": ["regularizer=dropout", "regularizer.dropout.impl=torch", "regularizer.dropout.p=0.5"],
    "stochastic_depth": [
        "model=resmlp",
        "model.width=32",
        "model.blocks=4",
        "regularizer=stochastic_depth",
        "regularizer.stochastic_depth.impl=torch",
        "regularizer.stochastic_depth.p=0.5",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("technique", list(BUILTIN_MASKS))
def test_builtin_masks_in_a_stack_train_like_one_by_one_in_distribution(tmp_path, data_root, technique):
    """impl=torch dropout and stochastic depth draw their masks from torch's global generator, which the members of
    a stack share, so a stacked member's masks differ from its lone run's (the scratch implementations have a
    generator per member and are exact, tests/test_stack.py). Over 16 seeds, mean test accuracy and ECE of stacked
    and one-by-one runs agree within two standard errors of the difference of the means. (Over the first 8 seeds
    stochastic depth's mean ECE differed by 2.1 standard errors, 0.184 against 0.166; over 16, by 0.3: 0.170
    against 0.168.)"""
    seeds = range(16)
    args = ["trainer.epochs=15", "dataset.n_train=1000", *BUILTIN_MASKS[technique]]

    def runs(where: str, stacked: bool) -> list[dict]:
        members = []
        for seed in seeds:
            (tmp_path / where / str(seed)).mkdir(parents=True)
            cfg = config(data_root, *args, f"trainer.seed={seed}")
            members.append(Member(cfg=cfg, run_dir=tmp_path / where / str(seed), job=Job()))
        for group in [members] if stacked else [[m] for m in members]:
            train_stack(group)
        return [read_summary(m.run_dir) for m in members]

    stacked, alone = runs("stacked", True), runs("alone", False)
    assert any(
        a["test/acc"] != b["test/acc"] for a, b in zip(stacked, alone, strict=True)
    )  # not the same masks
    for key in ("test/acc", "test/ece"):
        mine, theirs = [run[key] for run in stacked], [run[key] for run in alone]
        standard_error = math.sqrt((statistics.variance(mine) + statistics.variance(theirs)) / len(seeds))
        assert abs(statistics.mean(mine) - statistics.mean(theirs)) <= 2 * standard_error, (key, mine, theirs)


def test_a_checkpoint_that_cannot_be_resumed_fails_its_member_alone(tmp_path, data_root):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    members = []
    for k, resume in enumerate([str(junk), False]):
        cfg = config(data_root, "trainer.epochs=2", "dataset.n_train=300", f"trainer.seed={k}")
        cfg["trainer"]["resume"] = resume
        (tmp_path / str(k)).mkdir()
        members.append(Member(cfg=cfg, run_dir=tmp_path / str(k), job=Job(multirun=True)))
    objectives = train_stack(members)
    broken, fine = read_summary(tmp_path / "0"), read_summary(tmp_path / "1")
    assert broken["status"] == "failed" and "not a readable checkpoint" in broken["error"]
    assert fine["status"] == "completed" and fine["epochs_run"] == 2
    assert math.isnan(objectives[0]) and not math.isnan(objectives[1])


def test_a_stack_with_bad_input_fails_alone_and_the_other_stacks_train(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    result = run_train(
        ["-m", *QUICK, *TINY, "dataset=mnist1d,mnist", "hydra/launcher=stacked", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        data_root,
    )
    assert "2 jobs in 2 stack(s)" in result.stdout
    statuses = {}
    for job in job_dirs(sweep):
        summary = read_summary(job)
        statuses[next(o for o in summary["overrides"] if o.startswith("dataset="))] = summary
    assert statuses["dataset=mnist1d"]["status"] == "completed"
    assert statuses["dataset=mnist"]["status"] == "failed" and "dataset" in statuses["dataset=mnist"]["error"]


@pytest.mark.parametrize(
    "launcher, key, value",
    [("stacked", "max_stack", v) for v in ("0", "-3", "many", "2.5")]
    + [("stacked", "processes", v) for v in ("0", "two", "1.5")]
    + [("stacked_slurm", "max_stack", v) for v in ("0", "many")],  # stops before anything is submitted
)
def test_a_bad_launcher_setting_stops_the_sweep_with_one_line(
    tmp_path, data_root, monkeypatch, launcher, key, value
):
    if (
        launcher == "stacked_slurm"
    ):  # a controller that answers, so that the launcher's own checks are reached
        fake = tmp_path / "bin"
        fake.mkdir()
        for command, output in (("scontrol", "Slurmctld(primary) at here is UP"), ("sacct", "")):
            (fake / command).write_text(f"#!/bin/sh\necho '{output}'\n")
            (fake / command).chmod(0o755)
        monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *QUICK,
        *TINY,
        "trainer.seed=0,1",
        f"hydra/launcher={launcher}",
        f"hydra.launcher.{key}={value}",
    ]
    result = run_train([*args, f"hydra.sweep.dir={sweep}"], tmp_path, data_root, check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"hydra.launcher.{key}=" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not any(sweep.glob("*/summary.json"))


def test_jobs_with_a_second_pass_train_in_stacks_of_their_own(data_root):
    from reglab.stacking import group_into_stacks

    jobs = [[], ["regularizer=sam"], ["regularizer=l2"], ["regularizer=[sam,l2]"]]
    stacks, reasons = group_into_stacks({i: config(data_root, *job) for i, job in enumerate(jobs)}, 64)
    assert stacks == [[0, 2], [1, 3]]
    assert reasons == ["jobs [1, 3] train apart from job 0's stack: passes per step=2 (not 1)"]


def test_a_large_group_is_split_into_one_stack_per_process(data_root):
    from reglab.stacking import group_into_stacks

    seeds = {i: config(data_root, f"trainer.seed={i}") for i in range(10)}
    assert group_into_stacks(seeds, 64, processes=2)[0] == [
        [1, 3, 5, 7, 9],
        [0, 2, 4, 6, 8],
    ]  # spread over the grid
    # each share within max_stack
    assert group_into_stacks(seeds, 4, processes=2)[0] == [[1, 3, 5], [7, 9], [0, 2, 4], [6, 8]]
    assert group_into_stacks(seeds, 64, processes=1)[0] == [list(range(10))]
    few = {i: seeds[i] for i in range(5)}  # too few jobs to be worth a second process
    assert group_into_stacks(few, 64, processes=2)[0] == [[0, 1, 2, 3, 4]]


def test_stacks_side_by_side_share_the_work_with_two_passes_counted_twice(data_root):
    from reglab.stacking import group_into_stacks

    jobs = {i: config(data_root, f"trainer.seed={i}") for i in range(12)}
    jobs.update({i: config(data_root, "regularizer=sam", f"trainer.seed={i}") for i in range(12, 15)})
    # (12 + 2) + 2 x (3 + 2) = 24 units of work (stacking.Cost.of): the 12 plain jobs are 14 of it, the SAM jobs 10,
    # and cutting 11 jobs off the 12 would leave a part below MIN_SPLIT
    assert group_into_stacks(jobs, 64, processes=2)[0] == [list(range(12)), [12, 13, 14]]
    jobs.update({i: config(data_root, f"trainer.seed={i}") for i in range(15, 24)})  # 21 plain jobs now
    stacks = group_into_stacks(jobs, 64, processes=2)[0]
    assert [len(stack) for stack in stacks] == [16, 5, 3] and stacks[2] == [
        12,
        13,
        14,
    ]  # 18 and 7 + 10 of work


def test_shares_count_what_each_technique_adds_to_a_members_cost():
    """`make sweep` on 2 cores: dropout's, mixup's, cutmix's and spectral norm's members cost more per step than the
    others (Technique.step_cost), and the SAM stack's three jobs less than their two passes' plain count, so the
    process that also trains SAM's stack takes 15 of the 36 single-pass jobs (it took 13 when every member counted
    1, and ended ~19 s before the other)."""
    from reglab.stacking import group_into_stacks

    options = "none l1 l2 dropout early_stopping label_smoothing noise mixup cutmix swa ema sam spectral_norm".split()
    jobs = {}
    for option in options:
        for seed in range(3):
            jobs[len(jobs)] = {
                "regularizer": {} if option == "none" else {option: {}},
                "trainer": {"seed": seed},
            }
    stacks = group_into_stacks(jobs, 64, processes=2)[0]
    assert [len(stack) for stack in stacks] == [21, 15, 3]
    assert stacks[2] == [33, 34, 35]  # SAM's
    for option in set(options) - {"sam"}:  # each share of the single-pass group has every technique
        first = options.index(option) * 3
        assert all(set(stack) & {first, first + 1, first + 2} for stack in stacks[:2]), option


def test_more_cores_give_more_stacks_never_smaller_than_min_split(data_root):
    from reglab.stacking import MIN_SPLIT, group_into_stacks

    seeds = {i: config(data_root, f"trainer.seed={i}") for i in range(48)}
    assert [len(stack) for stack in group_into_stacks(seeds, 64, processes=16)[0]] == [MIN_SPLIT] * 12
    fifteen = {i: seeds[i] for i in range(15)}
    assert [len(stack) for stack in group_into_stacks(fifteen, 64, processes=2)[0]] == [
        8,
        7,
    ]  # no tail of one


def test_the_launcher_takes_the_config_the_sweeper_composed_instead_of_composing_it_again():
    from hydra_plugins.reglab_stacked_launcher import ComposedOnce

    class HydraLoader:
        def __init__(self):
            self.composed = []

        def load_sweep_config(self, master_config, overrides):
            self.composed.append(list(overrides))
            return {"overrides": list(overrides)}

        def list_groups(self, parent):
            return ["model"]

    loader = ComposedOnce(HydraLoader())
    checked = loader.load_sweep_config(None, ["trainer.seed=1"])  # Hydra's sweeper checking the batch
    assert loader.take(None, ["trainer.seed=1"]) is checked
    again = loader.take(None, ["trainer.seed=1"])  # handed out once: a second take composes afresh
    assert again == checked and again is not checked
    assert loader.loader.composed == [["trainer.seed=1"], ["trainer.seed=1"]]
    assert loader.list_groups("") == ["model"]  # the rest is Hydra's loader
    assert copy.copy(loader).loader is loader.loader  # copyable (no recursion through __getattr__)


SWEEP_JOBS = [
    *(
        ["regularizer=l2", f"regularizer.l2.weight_decay={wd}", f"trainer.seed={seed}"]
        for wd in (0, 1e-2)
        for seed in (0, 1)
    ),
    ["regularizer=dropout", "trainer.seed=1"],
    ["regularizer=[l2,dropout]", "regularizer.dropout.p=0.3"],
    ["model=cnn1d", "trainer.seed=2"],
    ["optimizer=sgd", "optimizer.lr=0.1"],
    ["regularizer=l2", "~regularizer.l2.mode", "+trainer.note=x"],
    ["regularizer=l2", "hydra.job.name=other", "model.hidden=[8,8]"],
    ["regularizer=l2", "trainer.seed=1"],  # a repeat: its defaults and merged files are kept ones
]


def test_composing_jobs_from_kept_defaults_equals_hydras_own_composition():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from hydra_plugins.reglab_stacked_launcher import ComposedOnce

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        hydra_loader = GlobalHydra.instance().config_loader()
        master = hydra_loader.load_configuration(
            "config", ["hydra/launcher=stacked", "hydra.sweep.dir=sweep"], RunMode.MULTIRUN
        )
        loader = ComposedOnce(hydra_loader)
        for overrides in SWEEP_JOBS:
            hydras, ours = hydra_loader.load_sweep_config(master, overrides), loader.take(master, overrides)
            assert OmegaConf.to_yaml(ours) == OmegaConf.to_yaml(hydras), overrides
            assert OmegaConf.is_struct(ours) and not OmegaConf.is_readonly(ours.hydra)
            assert ours.hydra.runtime.choices == hydras.hydra.runtime.choices
        # one defaults list per set of group choices (l2, dropout, [l2,dropout], cnn1d, sgd): the values shared them
        assert len(loader.same_defaults.defaults) == 5
        with pytest.raises(ConfigCompositionException) as hydras:
            hydra_loader.load_sweep_config(master, ["regularizer=l2", "trainer.no_such_key=1"])
        with pytest.raises(ConfigCompositionException) as ours:
            loader.take(master, ["regularizer=l2", "trainer.no_such_key=1"])
        assert str(ours.value) == str(hydras.value)
        assert hydra_loader._compose_config_from_defaults_list.__self__ is hydra_loader  # Hydra's own again


def draw_or_die(value):
    if multiprocessing.parent_process() is not None:
        os._exit(1)  # a drawing process dies mid-figure (a signal, out of memory)
    return value


def test_a_drawing_process_that_dies_costs_time_not_figures():
    plotter = diagnostics.Plotter(workers=2)
    try:
        drawings = [plotter.draw(draw_or_die, k) for k in range(3)]
        assert [drawing.result() for drawing in drawings] == [0, 1, 2]  # drawn here instead
        assert plotter.draw(draw_or_die, 3).result() == 3 and plotter.pool is None  # and from now on
    finally:
        plotter.close()


def seeds_as_members(tmp_path, data_root, count: int, *overrides) -> dict[int, Member]:
    """Jobs 0..count-1 of a sweep over trainer.seed, as the stacked launcher hands them to a stack."""
    members = {}
    for k in range(count):
        cfg = config(data_root, *overrides, f"trainer.seed={k}")
        (tmp_path / str(k)).mkdir()
        members[k] = Member(cfg=cfg, run_dir=tmp_path / str(k), job=Job(multirun=True))
    return members


def test_stacks_trained_one_after_another_count_each_jobs_time_from_its_own_stack(tmp_path, data_root):
    from reglab.cli import train_members

    members = seeds_as_members(tmp_path, data_root, 2, "trainer.epochs=2", "dataset.n_train=300")
    for member in members.values():
        member.started -= 1000  # composed long before (as the sweep's other jobs trained)
    train_members(members, max_stack=1, sweep_dir=str(tmp_path), processes=1)
    for k in range(2):
        assert read_summary(tmp_path / str(k))["wall_time_s"] < 100
        assert read_metrics(tmp_path / str(k))[0]["time_s"] < 100


def test_more_stacks_than_processes_train_in_this_process_and_in_stack_processes_with_the_same_records(
    tmp_path, data_root
):
    """3 stacks on 2 processes: this process trains the first and takes the next whenever it is free, a stack
    process the others; every job's records equal those of the same stacks trained one after another here."""
    from reglab.cli import train_members

    records = {}
    for processes in (2, 1):
        where = tmp_path / f"processes={processes}"
        where.mkdir()
        members = seeds_as_members(where, data_root, 3, "trainer.epochs=2", "dataset.n_train=300", *QUICK)
        assert train_members(members, max_stack=1, sweep_dir=str(where), processes=processes).keys() == {
            0,
            1,
            2,
        }
        records[processes] = [without_time(read_metrics(where / str(k))) for k in range(3)]
        assert [read_summary(where / str(k))["status"] for k in range(3)] == ["completed"] * 3
    assert records[2] == records[1]
    assert multiprocessing.active_children() == []  # every stack process has ended


def test_a_stack_asks_wandb_online_once_even_when_no_run_starts_at_all(tmp_path, data_root, monkeypatch):
    from reglab import loop
    from reglab.regularizers import build_regularization

    modes = []  # each member's start: the mode asked for; no run starts (online and offline both failed)
    monkeypatch.setattr(loop, "start_wandb", lambda logger, **_: modes.append(logger["wandb"]["mode"]))
    members = list(
        seeds_as_members(tmp_path, data_root, 3, "logger=wandb", "logger.wandb.mode=online").values()
    )
    stack = loop.Stack(members=members, trainer=members[0].cfg["trainer"])
    regs = build_regularization([m.cfg["regularizer"] for m in members], [m.seed for m in members])
    loop.start_records(stack, regs)
    assert modes == ["online", "offline", "offline"]


def test_a_stop_as_a_stacks_last_epoch_ends_leaves_its_records_alone(tmp_path, data_root, monkeypatch):
    from reglab.cli import train_one_stack
    from tests.test_preemption import stop_in_the_last_epoch

    stop_in_the_last_epoch(monkeypatch, signal.SIGTERM, epochs=2)
    members = seeds_as_members(tmp_path, data_root, 2, "trainer.epochs=2", "dataset.n_train=300")
    with pytest.raises(SystemExit) as exit_info:  # the sweep stops: no further stack starts
        train_one_stack(0, members, str(tmp_path))
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert [read_summary(tmp_path / str(k))["status"] for k in range(2)] == ["completed", "completed"]


def test_a_requeue_signal_as_a_stacks_last_epoch_ends_ends_the_job_as_done(
    tmp_path,
    data_root,
    monkeypatch,
    submitit_job,  # noqa: F811  (the fixture imported above)
):
    from reglab.cli import train_one_stack
    from tests.test_preemption import stop_in_the_last_epoch

    env = submitit_job(timeouts_left=0)  # a requeue would be refused and the jobs recorded as interrupted
    stop_in_the_last_epoch(monkeypatch, signal.SIGUSR2, epochs=2)
    members = seeds_as_members(tmp_path, data_root, 2, "trainer.epochs=2", "dataset.n_train=300")
    objectives = train_one_stack(0, members, str(tmp_path))
    summaries = [read_summary(tmp_path / str(k)) for k in range(2)]
    assert [s["status"] for s in summaries] == ["completed", "completed"] and env.requeued_with is None
    assert objectives == {k: summaries[k]["val/loss"] for k in range(2)}
