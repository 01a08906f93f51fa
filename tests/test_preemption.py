"""Signals, submitit's requeue protocol and the SLURM check, without a cluster (tests/test_cluster.py has one).

submitit's own SignalHandler runs here for real, with a stand-in job environment that records the requeue; the
end-to-end test runs a sweep through submitit's local executor, which requeues by restarting the job process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, JobPaths

from reglab import preemption
from reglab.preemption import (
    Interrupted,
    StopRelay,
    after_interrupt,
    resume_when_requeued,
    stop_on_signals,
)
from reglab.report import write_report
from tests.conftest import ROOT, read_metrics, read_summary, run_train


class State:
    stop_requested = None


def test_the_requeue_signal_wins_and_a_second_ctrl_c_stops_at_once():
    state = State()
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(state):
        signal.raise_signal(signal.SIGTERM)
        assert state.stop_requested == "SIGTERM"
        signal.raise_signal(signal.SIGUSR2)  # submitit's pre-emption sends SIGTERM, then SIGUSR2
        signal.raise_signal(signal.SIGTERM)
        assert state.stop_requested == "SIGUSR2"
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_every_stop_is_also_relayed_a_second_ctrl_c_before_it_stops_at_once():
    # the stacked launcher trains one stack in its own process and passes each stop on to the others' processes
    state, relay = State(), StopRelay({})
    with stop_on_signals(state, relay):
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (
        relay.received == [signal.SIGTERM, signal.SIGINT, signal.SIGINT] and state.stop_requested == "SIGINT"
    )


def test_a_stop_the_launcher_received_before_its_own_stack_set_its_handlers_up_stops_that_stack_too():
    state, relay = State(), StopRelay({})
    relay(signal.SIGINT)  # in the launcher's handler, while it prepared the stack
    with stop_on_signals(state, relay):
        assert state.stop_requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # the next Ctrl-C is the second
            signal.raise_signal(signal.SIGINT)
    assert relay.received == [signal.SIGINT, signal.SIGINT]
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # two before: stop at once
        with stop_on_signals(State(), relay):
            pass
    assert signal.getsignal(signal.SIGINT) is before


def test_a_stop_that_came_while_blocked_reaches_the_handlers_once_they_are_in_place():
    # a stack's process blocks the stop signals until it trains: one sent in between must not be lost
    state = State()
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # should it stay pending, it must not end pytest
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        # to this thread: sent to the process, it would go to another thread of pytest's, which does not block it
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        assert signal.SIGTERM in signal.sigpending() and state.stop_requested is None
        with stop_on_signals(state):
            assert state.stop_requested == "SIGTERM"
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        signal.signal(signal.SIGTERM, before)


PARENT_CHECK = """
import os, signal
from reglab.preemption import signal_when_parent_dies

got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
signal_when_parent_dies(signal.SIGUSR1, os.getppid())  # its parent lives, whatever its id (1 in a container)
print(len(got), end=" ")
signal_when_parent_dies(signal.SIGUSR1, os.getppid() + 1)  # started by another process, which is gone
print(len(got))
"""


def test_a_child_signals_itself_only_when_the_process_that_started_it_is_gone():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", PARENT_CHECK], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["0", "1"], result.stderr


class Launcher:
    """What hydra-submitit-launcher gives submitit: a callable whose checkpoint() resubmits it."""

    def __call__(self):
        return "done"

    def checkpoint(self):
        return DelayedSubmission(self)


class JobEnvironment:
    """Stands in for SlurmJobEnvironment: the first task, and `scontrol requeue` replaced by a note."""

    global_rank = 0
    requeued_with = None

    def _requeue(self, countdown: int) -> None:
        self.requeued_with = countdown


@pytest.fixture
def submitit_job(tmp_path):
    """submitit's real SignalHandler installed for SIGUSR2, as in a job with a 1-minute time limit (so every
    SIGUSR2 counts as a timeout); `timeouts_left` is max_num_timeout."""
    previous = signal.getsignal(signal.SIGUSR2)
    (tmp_path / "submitit").mkdir()

    def install(timeouts_left: int) -> JobEnvironment:
        delayed = DelayedSubmission(Launcher())
        delayed.set_timeout(1, timeouts_left)
        env = JobEnvironment()
        handler = SignalHandler(env, JobPaths(tmp_path / "submitit", job_id="7"), delayed)
        signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
        return env

    yield install
    signal.signal(signal.SIGUSR2, previous)


def test_sigusr2_in_a_submitit_job_requeues_through_submitit(tmp_path, submitit_job):
    env = submitit_job(timeouts_left=1)
    with pytest.raises(SystemExit):  # submitit exits the process once the job is requeued
        after_interrupt(Interrupted("SIGUSR2", 5), tmp_path, ["trainer.epochs=9"], "")
    assert env.requeued_with == 0  # one timeout used
    assert (tmp_path / "submitit" / "7_submitted.pkl").exists()  # the launcher's checkpoint, resubmitted
    assert (tmp_path / preemption.REQUEUE_MARKER).exists()
    assert not (tmp_path / "summary.json").exists()  # no result: the job is not over


def test_when_submitit_refuses_the_job_is_recorded_as_interrupted_with_its_resume_command(
    tmp_path, submitit_job, capsys
):
    env = submitit_job(timeouts_left=0)
    run_dir = tmp_path / "sweep" / "3"
    run_dir.mkdir(parents=True)
    objective = after_interrupt(
        Interrupted("SIGUSR2", 12),
        run_dir,
        ["regularizer=[l2,dropout]", "trainer.seed=1", "trainer.resume=true"],
        "",
    )
    assert math.isnan(objective) and env.requeued_with is None
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and summary["epochs_run"] == 12
    assert "timed-out too many times" in summary["stop_reason"]
    assert summary["resume"] == (
        f"python train.py 'regularizer=[l2,dropout]' trainer.seed=1 trainer.resume=true hydra.run.dir={run_dir}"
    )
    assert not (run_dir / preemption.REQUEUE_MARKER).exists()
    assert "resume with" in capsys.readouterr().out


def test_sigterm_and_signals_outside_submitit_exit_with_128_plus_the_signal(tmp_path, submitit_job, capsys):
    env = submitit_job(timeouts_left=3)  # SIGTERM means SLURM kills or requeues the job itself: never requeue
    with pytest.raises(SystemExit) as exit_info:
        after_interrupt(Interrupted("SIGTERM", 4), tmp_path, [], "hydra.run.dir=x")
    assert exit_info.value.code == 128 + signal.SIGTERM and env.requeued_with is None
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)  # a plain run: nobody to hand the signal to
    with pytest.raises(SystemExit) as exit_info:
        after_interrupt(Interrupted("SIGUSR2", 4), tmp_path, [], "hydra.run.dir=x")
    assert exit_info.value.code == 128 + signal.SIGUSR2
    assert "trainer.resume=true hydra.run.dir=x" in capsys.readouterr().out
    assert not (tmp_path / "summary.json").exists()


def stop_in_the_last_epoch(monkeypatch, signum, epochs: int) -> None:
    """The signal arrives while the last epoch is measured, after which the run finishes (records complete)."""
    from reglab import loop

    original = loop.end_of_training

    def end_of_training(k, m, row, model, regs, last):
        if m.epoch == epochs:
            os.kill(os.getpid(), signum)
        return original(k, m, row, model, regs, last)

    monkeypatch.setattr(loop, "end_of_training", end_of_training)


def test_a_stop_as_the_run_finishes_leaves_its_records_alone(tmp_path, data_root, submitit_job, monkeypatch):
    from reglab.loop import Job, train
    from tests.test_loop import config

    env = submitit_job(
        timeouts_left=0
    )  # were it requeued, submitit would refuse and the run be "interrupted"
    stop_in_the_last_epoch(monkeypatch, signal.SIGUSR2, epochs=2)
    cfg = config(data_root, "trainer.epochs=2", "dataset.n_train=300")
    with pytest.raises(Interrupted) as stopped:
        train(cfg, tmp_path, Job(multirun=True))
    assert stopped.value.finished
    objective = after_interrupt(stopped.value, tmp_path, ["trainer.epochs=2"], "")
    summary = read_summary(tmp_path)
    assert summary["status"] == "completed" and "test/acc" in summary and env.requeued_with is None
    assert objective == summary["val/loss"] and not (tmp_path / preemption.REQUEUE_MARKER).exists()
    # outside submitit the process stops (a sweep in it starts nothing more) and the records stay as they are
    with pytest.raises(SystemExit) as exit_info:
        after_interrupt(Interrupted("SIGTERM", 2, finished=True), tmp_path, [], "")
    assert exit_info.value.code == 128 + signal.SIGTERM and read_summary(tmp_path) == summary


@pytest.mark.parametrize(
    ("restarts", "marker", "given", "expected"),
    [
        ("", False, False, False),
        ("0", False, False, False),
        ("2", False, False, True),
        ("", True, False, True),
        ("1", False, "/elsewhere/checkpoint.pt", "/elsewhere/checkpoint.pt"),
    ],
)
def test_a_requeued_job_resumes_by_itself(tmp_path, monkeypatch, restarts, marker, given, expected):
    monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
    if marker:
        (tmp_path / preemption.REQUEUE_MARKER).write_text("requeued\n")
    trainer = {"resume": given}
    resume_when_requeued(trainer, tmp_path)
    assert trainer["resume"] == expected
    assert not (tmp_path / preemption.REQUEUE_MARKER).exists()  # used once


def test_the_report_lists_an_interrupted_job_with_its_resume_command(tmp_path, submitit_job):
    submitit_job(timeouts_left=0)
    sweep = tmp_path / "sweep"
    for number, seed in enumerate((0, 1)):
        job = sweep / str(number)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- trainer.seed={seed}\n")
    (sweep / "0" / "summary.json").write_text(
        json.dumps({"status": "completed", "test/acc": 0.5, "overrides": ["trainer.seed=0"]})
    )
    after_interrupt(Interrupted("SIGUSR2", 12), sweep / "1", ["trainer.seed=1"], "")
    text = write_report(sweep, verbose=False).read_text()
    assert "2 jobs in 1 groups (1 completed, 1 interrupted)" in text
    assert "| `1` | `none` | interrupted | SIGUSR2 after epoch 12: Job not requeued because" in text
    assert "resume: `python train.py trainer.seed=1 trainer.resume=true" in text


# ---------------------------------------------------------------------------------------------------------------------
# The SLURM check before a sweep


def fake_scontrol(folder: Path, answer: str, status: int) -> str:
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f"#!/bin/sh\necho '{answer}'\nexit {status}\n")
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (None, "SLURM's commands are not installed here (no scontrol on PATH)"),
        (
            "Slurmctld(primary) at vm is DOWN",
            "the SLURM controller does not answer (scontrol ping: Slurmctld(primary) at vm is DOWN)",
        ),
    ],
)
def test_a_slurm_sweep_without_a_cluster_stops_with_one_line(
    tmp_path, data_root, monkeypatch, answer, message
):
    if answer is None:
        monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, and no SLURM command
    else:
        monkeypatch.setenv("PATH", fake_scontrol(tmp_path / "bin", answer, status=1))
    sweep = tmp_path / "sweep"
    result = run_train(
        ["-m", "hydra/launcher=slurm", "logger=none", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        data_root,
        check=False,
    )
    assert result.returncode == 1
    expected = f"reglab: error: hydra/launcher=slurm: {message}; no job was submitted"
    assert result.stderr.strip().splitlines() == [expected]
    assert not sweep.exists()


def test_a_cluster_without_accounting_is_named_before_the_sweep(tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from reglab.slurm import CheckCluster

    path = fake_scontrol(tmp_path / "bin", "Slurmctld(primary) at vm is UP", status=0)
    sacct = tmp_path / "bin" / "sacct"
    sacct.write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    sacct.chmod(0o755)
    monkeypatch.setenv("PATH", path)
    slurm = {
        "hydra": {
            "launcher": {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
        }
    }
    CheckCluster().on_multirun_start(OmegaConf.create(slurm))
    assert "accounting (slurmdbd) is off" in capsys.readouterr().err
    CheckCluster().on_multirun_start(OmegaConf.create({"hydra": {"launcher": {"_target_": "joblib"}}}))
    assert capsys.readouterr().err == ""  # other launchers: no check at all


# ---------------------------------------------------------------------------------------------------------------------
# End to end: a pre-empted job of a submitit sweep comes back and ends as if never stopped


def job_processes(sweep: Path) -> list[int]:
    """PIDs of the job processes submitit started for this sweep (`python -m submitit.core._submit <sweep>/...`)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if "submitit.core._submit" in command and str(sweep) in command:
            found.append(int(entry.name))
    return found


def wait_for(condition, what: str, process, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def epochs_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


SLOW = ["+hydra.callbacks.slow._target_=tests.slow_epochs.SlowEpochs", "+hydra.callbacks.slow.seconds=0.2"]
RUN = [
    "logger=none",
    "trainer.plots=false",
    "trainer.epochs=30",
    "dataset.n_train=300",
    "regularizer=dropout",
    "regularizer.dropout.p=0.3",  # one value, not the grid the option carries
]


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_ends_exactly_like_an_uninterrupted_run(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", *SLOW, *RUN]
    process = subprocess.Popen(
        [*command, f"dataset.root={data_root}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: epochs_logged(sweep / "0") >= 5, "epoch 5", process)
    (job,) = job_processes(sweep)
    os.kill(job, signal.SIGUSR2)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, (out, err)
    log = "".join(path.read_text() for path in (sweep / ".submitit").rglob("*_log.out"))
    assert "this job is preempted" in log and "requeued by submitit: resuming" in log
    assert read_summary(sweep / "0")["status"] == "completed" and (sweep / "report.md").exists()

    straight = tmp_path / "straight"
    run_train([*RUN, f"hydra.run.dir={straight}"], tmp_path, data_root)
    without_time = lambda rows: [{k: v for k, v in row.items() if k != "time_s"} for row in rows]  # noqa: E731
    assert without_time(read_metrics(sweep / "0")) == without_time(read_metrics(straight))


@pytest.mark.parametrize("stacked", [False, True], ids=["alone", "stack"])
def test_a_failed_scontrol_requeue_exits_with_the_signal_and_leaves_no_requeue_marker(
    tmp_path, submitit_job, monkeypatch, stacked
):
    from types import SimpleNamespace

    env = submitit_job(timeouts_left=3)

    def scontrol_fails(countdown):
        raise subprocess.CalledProcessError(1, ["scontrol", "requeue", "7"])

    monkeypatch.setattr(env, "_requeue", scontrol_fails)
    stop = Interrupted("SIGUSR2", 4)
    with pytest.raises(SystemExit) as exit_info:
        if stacked:
            member = SimpleNamespace(run_dir=tmp_path, epoch=4, job=SimpleNamespace(overrides=[]))
            preemption.after_stack_interrupt(stop, [member], "")
        else:
            after_interrupt(stop, tmp_path, [], "")
    assert exit_info.value.code == 128 + signal.SIGUSR2
    assert not (tmp_path / preemption.REQUEUE_MARKER).exists()  # a later plain run must not resume by itself
