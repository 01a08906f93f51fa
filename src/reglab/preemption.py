"""Stopping on signals, and cooperating with submitit and SLURM so that a stopped job comes back by itself.

Three signals stop a run at the end of the current epoch, once a resumable checkpoint is written:

- SIGUSR2, submitit's signal (`SUBMITIT_PREEMPT_SIGNAL` names another): SLURM sends it `signal_delay_s` before a
  job's time limit, at pre-emption where the site sets `PreemptParameters=send_user_signal`, and on
  `scancel --signal=USR2`.
- SIGTERM: SLURM is about to kill the job (`scancel`, `scontrol requeue`, pre-emption with PreemptMode=REQUEUE or
  CANCEL, the time limit itself).
- SIGINT: Ctrl-C; a second one stops at once.

What follows the checkpoint (`after_interrupt`):

- SIGUSR2 in a job that submitit started (`hydra/launcher=slurm`): submitit's own handler, which reglab held back
  until the checkpoint was written, takes over. It calls the launcher's `checkpoint()` (hydra-submitit-launcher
  resubmits the same job), requeues the job and exits the process. submitit counts the requeues after a time limit
  against `max_num_timeout` (it requeues pre-emptions without limit); when it refuses, the job records status
  `interrupted` and its resume command in summary.json and returns, so that the sweep goes on and writes its report.
- SIGTERM, or any signal outside submitit: the process exits with status 128 + the signal number and no result.
  After SIGTERM SLURM either requeues the job itself or cancels it; asking it for a requeue here would turn a
  user's `scancel` into a requeue.

A requeued job resumes from its checkpoint by itself (`resume_when_requeued`): SLURM sets `SLURM_RESTART_COUNT` in
a job it restarts, and a requeue through submitit leaves a marker file in the run directory.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

REQUEUE_MARKER = "requeued.txt"  # in the run directory: "resume at the next start" (submitit's local requeue)


class Interrupted(Exception):
    """A stop signal arrived and a resumable checkpoint was written after `epoch` epochs; or, `finished`, it came
    as the last runs finished: their records are complete and there is nothing to checkpoint or resume."""

    def __init__(self, signal_name: str, epoch: int = 0, finished: bool = False):
        super().__init__(signal_name)
        self.signal_name, self.epoch, self.finished = signal_name, epoch, finished


def requeue_signal() -> signal.Signals:
    """The signal submitit checkpoints and requeues on: USR2 unless SUBMITIT_PREEMPT_SIGNAL names another."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", signal.SIGUSR2)


def signal_when_parent_dies(sig: int, parent: int) -> None:
    """Linux: `sig` to this process when `parent`, the process that started it, dies (killed, crashed): a stack's
    process then checkpoints and stops instead of training on unsupervised, a drawing process ends instead of
    waiting forever."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        return
    # it died before the request was made: this process has another parent now (init, or a sub-reaper; not "PID 1",
    # which is the parent itself in a container without an init)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


PR_SET_PDEATHSIG = 1


@dataclass
class StopRelay:
    """The stacked launcher's stop signals: each one its process receives is passed on to every stack process
    running (`processes`: sentinel -> (process, pid, ...)) and kept (`received`), for the stack that process trains
    itself (`stop_on_signals`) and for its own exit status."""

    processes: dict
    received: list[int] = field(default_factory=list)

    def __call__(self, signum: int, frame=None) -> None:
        self.received.append(signum)
        pass_on(signum, self.processes)


def pass_on(signum: int, processes: dict) -> None:
    """`signum` to each stack process (sentinel -> (process, pid, ...)); by pid alone: a signal handler must not
    touch a Process that another thread joins and closes meanwhile."""
    for _, pid, *_ in list(processes.values()):  # a copy: a thread hands stacks over meanwhile
        with contextlib.suppress(ProcessLookupError):  # it has ended
            os.kill(pid, signum)


@contextlib.contextmanager
def stop_on_signals(state, relay: StopRelay | None = None):
    """While the block runs, SIGTERM, SIGINT and submitit's requeue signal set `state.stop_requested` (the loop
    checkpoints and stops at the end of the epoch); the handlers found before come back afterwards. With a `relay`
    (the stacked launcher's process training one stack while others train in processes of their own) each one is
    passed on first, and those it received before these handlers were in place count as if they came now."""
    requeue = requeue_signal()
    ctrl_c_seen = False

    def note(signum):
        nonlocal ctrl_c_seen
        if signum == signal.SIGINT:
            if ctrl_c_seen:  # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            ctrl_c_seen = True
        # the requeue signal wins: submitit's own pre-emption test sends SIGTERM first, then SIGUSR2
        if state.stop_requested != requeue.name:
            state.stop_requested = signal.Signals(signum).name

    relayed_here = []

    def request_stop(signum, frame):
        if relay is not None:
            relayed_here.append(signum)
            relay(signum)  # a second Ctrl-C too: the other stacks stop at once as well
        note(signum)

    previous = {}
    for sig in dict.fromkeys((signal.SIGTERM, signal.SIGINT, requeue)):
        # only the main thread may set handlers (a launcher may run jobs in other threads): skip them there
        with contextlib.suppress(ValueError):
            previous[sig] = signal.signal(sig, request_stop)
    # those the launcher's own handler received before (any that came since went through `request_stop`)
    early = relay.received[: len(relay.received) - len(relayed_here)] if relay is not None else []
    # one that came while they were blocked (a stack's process blocks them until it trains) arrives now, here
    signal.pthread_sigmask(signal.SIG_UNBLOCK, previous)
    try:
        for signum in early:
            note(signum)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------------
# After the checkpoint


def after_finished_runs(stop: Interrupted) -> None:
    """A stop that came as the last runs finished (`stop.finished`): nothing to requeue, no record to touch. Under
    submitit's requeue signal the job ends as done (this returns); otherwise the process exits with 128 + signal,
    so that a sweep in this process starts no further job."""
    signum = signal.Signals[stop.signal_name]
    if submitit_handler(signum) is None:
        print(
            f"[reglab] {stop.signal_name}: the run(s) had finished; stopped before anything else", flush=True
        )
        raise SystemExit(128 + signum)


def after_interrupt(stop: Interrupted, run_dir: Path, overrides: list[str], resume_hint: str) -> float:
    """Requeue through submitit, or record the job as interrupted (returns NaN), or exit with 128 + signal; for a
    run that had finished, `after_finished_runs` (returns its objective)."""
    if stop.finished:
        from reglab.stacking import objective_on_disk

        after_finished_runs(stop)
        return objective_on_disk(run_dir)
    signum = signal.Signals[stop.signal_name]
    handler = submitit_handler(signum)
    if handler is not None:
        return hand_to_submitit(handler, stop, Path(run_dir), overrides)
    print(f"[reglab] {stop.signal_name}: checkpoint written; {how_to_continue(resume_hint)}", flush=True)
    raise SystemExit(128 + signum)


def after_stack_interrupt(stop: Interrupted, members: list, resume_hint: str) -> dict:
    """`after_interrupt` for a stack: requeue the whole stack through submitit, each member resuming from its own
    checkpoint; or record every unfinished member as interrupted (NaN objectives); or exit with 128 + signal."""
    signum = signal.Signals[stop.signal_name]
    handler = submitit_handler(signum)
    if handler is None:
        print(f"[reglab] {stop.signal_name}: checkpoints written; {how_to_continue(resume_hint)}", flush=True)
        raise SystemExit(128 + signum)
    from submitit.core.utils import UncompletedJobError

    for member in members:
        (member.run_dir / REQUEUE_MARKER).write_text(f"{stop.signal_name}: requeued through submitit\n")
    try:
        handler(signum, None)  # on success: scontrol requeue, then sys.exit
    except UncompletedJobError as refusal:
        for member in members:
            (member.run_dir / REQUEUE_MARKER).unlink(missing_ok=True)
            record_interrupted(
                member.run_dir,
                Interrupted(stop.signal_name, member.epoch),
                str(refusal),
                member.job.overrides,
            )
        return {}
    except Exception as err:  # scontrol failed: as `hand_to_submitit`, no requeue marker left behind
        for member in members:
            (member.run_dir / REQUEUE_MARKER).unlink(missing_ok=True)
        print(
            f"[reglab] submitit could not requeue this stack ({type(err).__name__}: {err}); checkpoints written"
        )
    raise SystemExit(128 + signum)  # submitit left the requeue to another task of the job


def how_to_continue(resume_hint: str) -> str:
    manual = f"continue with the same overrides plus trainer.resume=true {resume_hint}"
    if os.environ.get(
        "SLURM_JOB_ID"
    ):  # after SIGTERM SLURM may requeue the job (pre-emption, scontrol requeue)
        return f"if SLURM requeues this job it resumes by itself; otherwise {manual}"
    return manual


def submitit_handler(signum: int):
    """submitit's checkpoint-and-requeue handler for `signum`, when submitit runs this job; else None."""
    if signum != requeue_signal() or "submitit" not in sys.modules:
        return None
    from submitit.core.job_environment import SignalHandler

    handler = signal.getsignal(signum)
    return handler if isinstance(getattr(handler, "__self__", None), SignalHandler) else None


def hand_to_submitit(handler, stop: Interrupted, run_dir: Path, overrides: list[str]) -> float:
    """Let submitit checkpoint the launcher and requeue the job (it exits the process), or record why not."""
    from submitit.core.utils import UncompletedJobError

    signum = signal.Signals[stop.signal_name]
    marker = run_dir / REQUEUE_MARKER
    marker.write_text(f"{stop.signal_name} after epoch {stop.epoch}: requeued through submitit\n")
    try:
        handler(signum, None)  # on success: scontrol requeue, then sys.exit
    except UncompletedJobError as refusal:  # e.g. "timed-out too many times" (max_num_timeout used up)
        marker.unlink(missing_ok=True)
        return record_interrupted(run_dir, stop, str(refusal), overrides)
    except Exception as err:  # scontrol failed, e.g. because SLURM is requeueing the job on its own
        marker.unlink(missing_ok=True)
        print(
            f"[reglab] submitit could not requeue this job ({type(err).__name__}: {err}); checkpoint written"
        )
    # scontrol failed, or submitit left it to another task of the job: end this process without a result
    raise SystemExit(128 + signum)


def record_interrupted(run_dir: Path, stop: Interrupted, reason: str, overrides: list[str]) -> float:
    """summary.json with status `interrupted` and the command that resumes the job; returns NaN (no objective)."""
    from reglab.tracking import write_summary

    kept = [o for o in overrides if not o.startswith("trainer.resume=")]
    resume = shlex.join(["python", "train.py", *kept, "trainer.resume=true", f"hydra.run.dir={run_dir}"])
    summary = {
        "status": "interrupted",
        "error": None,
        "stop_reason": f"{stop.signal_name} after epoch {stop.epoch}: {reason}",
        "epochs_run": stop.epoch,
        "resume": resume,
        "overrides": list(overrides),
        "run_dir": str(run_dir),
    }
    write_summary(run_dir, summary)
    print(f"[reglab] interrupted and not requeued ({summary['stop_reason']}); resume with: {resume}")
    return math.nan


# ---------------------------------------------------------------------------------------------------------------------
# The next start


def resume_when_requeued(trainer: dict, run_dir: Path) -> None:
    """Set `trainer.resume` when this job is a requeued one, so that it continues from its checkpoint (a fresh
    start when it has none). An explicit `trainer.resume` (a path) is left as it is."""
    marker = Path(run_dir) / REQUEUE_MARKER
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    requeued = restarts > 0 or marker.exists()
    marker.unlink(missing_ok=True)
    if requeued and trainer["resume"] is False:
        trainer["resume"] = True
        why = f"restart {restarts} by SLURM" if restarts else "requeued by submitit"
        print(f"[reglab] {why}: resuming from the checkpoint in {run_dir}", flush=True)
