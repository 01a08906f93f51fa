"""Which jobs of a sweep can train together as one stacked model, in which stacks, and where they train.

Jobs are compatible when their configs agree on everything but the keys a stack lets each member choose for itself
(`PER_MEMBER`): the seed, the optimizer's hyperparameters (not its kind), every technique's settings (and which
techniques are on), label noise, W&B settings and resuming. Model, data set and split, batch size, epochs, the
optimizer kind and the rest of the trainer must agree, because the members share one network shape, one batch
schedule and one optimizer.

On the CPU a stack's step is mostly Python and per-call overhead on one core, so two stacks of 24 jobs, each in a
process of its own on its own core, train faster than one stack of 48 on two threads (measured on 2 cores: 0.44 s
against 0.71 s an epoch of the 48-job l2 grid). The stacked launcher therefore splits a large group of jobs into
one stack per process (`hydra.launcher.processes`) and trains them side by side (`train_in_processes`: the
launcher's own process trains one of them). A member's results do not depend on which stack it trains in, nor on
the thread count, nor on the process (tests/test_stack.py, tests/test_stacked_launcher.py).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

# a process is given a part of a group only when it is at least this many jobs: a smaller one gains less from a core
# of its own than its process costs to start (~3 s, torch's import)
MIN_SPLIT = 4
# a stack's step costs about (jobs x member cost + STACK_OVERHEAD) x passes (`Cost`), counted in one plain member's
# share of a large stack's step: a lone run's epoch took ~50 ms here, a member's share of a 24-member stack's ~17 ms
STACK_OVERHEAD = 2

PER_MEMBER = (
    "trainer.seed",
    "trainer.resume",
    "optimizer.lr",
    "optimizer.betas",
    "optimizer.eps",
    "optimizer.momentum",
    "optimizer.nesterov",
    "regularizer",
    "dataset.label_noise",
    "dataset.augment",
    "logger",
)


def shared_settings(cfg: dict, prefix: str = "") -> dict:
    """The flattened config without the per-member keys: equal for every member of a stack. Also the passes per
    step: one technique that takes a second pass over each batch (SAM) makes the whole stack take it, so jobs with
    one keep to stacks of their own."""
    shared = {"passes per step": passes_per_step(cfg)} if not prefix else {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if name in PER_MEMBER:
            continue
        if isinstance(value, dict):
            shared.update(shared_settings(value, f"{name}."))
        else:
            shared[name] = value
    return shared


def passes_per_step(cfg: dict) -> int:
    second = any(technique.second_pass for technique in techniques_of(cfg))
    return 2 if second else 1


def member_cost(cfg: dict) -> float:
    """A job's cost per pass of a training step, in members without regularization: 1 plus each of its techniques'
    `step_cost` (dropout's per-member masks, mixup's per-member draws, ...), whatever the technique's strength."""
    return 1 + sum(technique.step_cost for technique in techniques_of(cfg))


def techniques_of(cfg: dict) -> list:
    from reglab.regularizers import technique_classes

    techniques = technique_classes()
    return [techniques[name] for name in cfg.get("regularizer") or {} if name in techniques]


def group_into_stacks(
    configs: dict[int, dict], max_stack: int, processes: int = 1
) -> tuple[list[list[int]], list[str]]:
    """Job numbers grouped into stacks of at most `max_stack` (in job order; with `processes` > 1 cut into shares
    of about equal work, the most work first: `shares_of_work`), and a line for every job that could not join the
    largest group, saying which setting kept it apart."""
    groups: dict[str, list[int]] = {}
    for idx, cfg in configs.items():
        groups.setdefault(json.dumps(shared_settings(cfg), sort_keys=True, default=str), []).append(idx)
    if processes > 1:
        costs = [
            Cost(passes_per_step(configs[jobs[0]]), statistics.fmean(member_cost(configs[j]) for j in jobs))
            for jobs in groups.values()
        ]
        cut = shares_of_work(list(zip(groups.values(), costs, strict=True)), processes)
    else:
        cut = list(groups.values())
    stacks = [part for jobs in cut for part in split(jobs, math.ceil(len(jobs) / max_stack))]
    largest = max(groups.values(), key=len) if groups else []
    reasons = []
    for jobs in groups.values():
        if jobs is largest:
            continue
        differs = first_difference(configs[largest[0]], configs[jobs[0]])
        reasons.append(f"jobs {jobs} train apart from job {largest[0]}'s stack: {differs}")
    return stacks, reasons


@dataclass(frozen=True)
class Cost:
    """What a group's jobs cost: passes per training step, and a member's mean cost per pass (`member_cost`)."""

    passes: int = 1
    per_member: float = 1.0

    def of(self, jobs: int) -> float:
        """A stack of `jobs` of the group: its training time, in units of one plain member's share of a large
        stack's step. STACK_OVERHEAD is the stack's own cost per pass, whatever its size."""
        return self.passes * (jobs * self.per_member + STACK_OVERHEAD)

    def jobs_within(self, work: float) -> int:
        """How many of the group's jobs a stack may take to cost about `work`."""
        return math.floor((work / self.passes - STACK_OVERHEAD) / self.per_member + 0.5)  # halves up


def shares_of_work(groups: list[tuple[list[int], Cost]], processes: int) -> list[list[int]]:
    """Groups of jobs (with their `Cost`) cut into stacks such that the processes, each taking the next stack when it
    is free, get about equal work: `processes` of them, or fewer when there are fewer than MIN_SPLIT jobs for each.
    The costliest groups are cut first, never into a part below MIN_SPLIT jobs, each part's jobs spread over the
    group so that it gets its share of every setting the group sweeps (of each technique in `make sweep`). `make
    sweep` on 2 processes: 36 jobs of one pass (1.6 members each: dropout, mixup, ... cost more) and 3 SAM jobs of
    two become stacks of 21 jobs, of 15, and SAM's 3 (work 35.6, and 26.0 + 10, against a share of 35.8)."""
    jobs_in_all = sum(len(jobs) for jobs, _ in groups)
    processes = max(1, min(processes, jobs_in_all // MIN_SPLIT))
    share = (sum(cost.of(len(jobs)) for jobs, cost in groups) + STACK_OVERHEAD * (processes - 1)) / processes
    room = share  # the work the process being filled may still take
    stacks = []
    for jobs, cost in sorted(groups, key=lambda group: -group[1].of(len(group[0]))):
        while jobs:
            fits = cost.jobs_within(room)
            if processes > 1 and fits >= MIN_SPLIT and len(jobs) - fits >= MIN_SPLIT:
                part, jobs = spread(jobs, fits)
                stacks.append(part)  # this process is full; the rest of the group goes to the next
                room = share
            else:
                stacks.append(jobs)
                room -= cost.of(len(jobs))
                jobs = []
                if room < Cost().of(MIN_SPLIT):
                    room = share
    return stacks


def spread(jobs: list[int], count: int) -> tuple[list[int], list[int]]:
    """`count` of the jobs, evenly spread over them, and the others: spread([0..5], 2) -> [2, 5], [0, 1, 3, 4]."""
    chosen = {p for p in range(len(jobs)) if (p + 1) * count // len(jobs) > p * count // len(jobs)}
    return [j for p, j in enumerate(jobs) if p in chosen], [j for p, j in enumerate(jobs) if p not in chosen]


def split(jobs: list[int], parts: int) -> list[list[int]]:
    """`jobs` in `parts` runs of consecutive jobs, as equal in size as can be: [0..9] in 3 -> [0..3], [4..6], [7..9]."""
    size, larger = divmod(len(jobs), max(parts, 1))
    bounds = [0]
    for part in range(max(parts, 1)):
        bounds.append(bounds[-1] + size + (part < larger))
    return [jobs[first:stop] for first, stop in itertools.pairwise(bounds) if stop > first]


def first_difference(a: dict, b: dict) -> str:
    """The first setting in which two jobs differ, a group's option (model.name, ...) before its details."""
    mine, theirs = shared_settings(a), shared_settings(b)
    for key in sorted(set(mine) | set(theirs), key=lambda key: (not key.endswith(".name"), key)):
        if mine.get(key) != theirs.get(key):
            return f"{key}={theirs.get(key)!r} (not {mine.get(key)!r})"
    return "no difference"


# ---------------------------------------------------------------------------------------------------------------------
# Stacks side by side, one process each


def stop_codes() -> set[int]:
    """The exit statuses of a stack process that stopped on a signal after writing its checkpoints (128 + signal)."""
    from reglab.preemption import requeue_signal

    return {128 + sig for sig in (signal.SIGINT, signal.SIGTERM, requeue_signal())}


def resolve_processes(setting: int | str, devices: set[str]) -> int:
    """`hydra.launcher.processes`: a number, or auto: one per core this process may use when the jobs train on the
    CPU (`devices`: their trainer.device), one when they train on a GPU (it runs a whole stack's arithmetic at once)."""
    if setting != "auto":
        return setting
    import torch

    from reglab.loop import usable_cores

    if "cuda" in devices or ("auto" in devices and torch.cuda.is_available()):
        return 1
    return usable_cores()


def start_stack_processes(count: int) -> list[tuple[multiprocessing.Process, Connection]]:
    """Processes that load torch and reglab at once and then wait for a stack to train (`train_in_processes`
    hands it over). The launcher starts them while Hydra still composes the sweep's jobs on one core: their start
    (~4 s, torch's import) then costs the sweep no time on the others. One that is never handed a stack exits when
    this process closes its end of the pipe, at the latest when it exits."""
    context = multiprocessing.get_context("spawn")
    started = []
    for _ in range(count):
        mine, theirs = context.Pipe()
        process = context.Process(target=stack_process, args=(theirs, os.getpid()), name="reglab stack")
        process.start()
        theirs.close()
        started.append((process, mine))
    atexit.register(release, started)  # before multiprocessing's own exit handler waits for them
    return started


def release(processes: list[tuple[multiprocessing.Process, Connection]]) -> None:
    """Let stack processes that were never handed a stack exit, and wait for them."""
    for process, pipe in processes:
        pipe.close()
        with contextlib.suppress(ValueError):  # closed: it was handed a stack and waited for already
            process.join()


def train_in_processes(
    stacks: list[list[int]], members: dict, processes: int, sweep_dir: str, started: list | None = None
) -> dict[int, float]:
    """Train the stacks side by side, at most `processes` at once, in the order given (`group_into_stacks` puts
    the most work first), the cores shared between them; returns each job's objective.

    This process trains the first stack itself and then, while any is left, the next; each other one trains in a
    process of its own (`started` ones first), handed out by a thread of this process as processes come free
    (`OtherStacks`): one torch fewer in memory than a process for every stack (~0.3 GB), and one fewer to start.
    A stack's process writes its members' records exactly as a stack trained in this process would; the
    objectives are read back from their summaries.

    A stop signal (Ctrl-C, SIGTERM, the requeue signal) goes on to every running stack, this one's included, which
    checkpoints its members at the end of its epoch, and no further stack starts; then this process exits as an
    interrupted stack does. A stack whose process dies (out of memory, killed) fails its own unfinished members and
    no one else's; an error that trainer.on_error=raise passes on, in any stack, fails the sweep once the others
    have ended."""
    from reglab.loop import usable_cores

    cores = max(1, usable_cores() // processes)
    others = OtherStacks(stacks, members, sweep_dir, cores, processes - 1, list(started or []))
    with stop_signals_calling(others.relay), stopping_stacks_on_error(others):
        others.start()
        number = 0 if not others.relay.received else None
        while number is not None:
            train_here(number, stacks[number], members, sweep_dir, cores, others)
            number = others.take()
        others.join()
    if others.error is not None:
        raise others.error
    objectives = {idx: objective_on_disk(members[idx].run_dir) for jobs in stacks for idx in jobs}
    if others.relay.received:
        raise SystemExit(128 + others.relay.received[0])
    # as an error in a stack trained in one process would, it fails the sweep (here after the others ended)
    if others.raised:
        raise RuntimeError(
            f"stack(s) {others.raised} failed with trainer.on_error=raise; their errors are printed above"
        )
    return objectives


def train_here(
    number: int, jobs: list[int], members: dict, sweep_dir: str, cores: int, others: OtherStacks
) -> None:
    """Train a stack in this process as a stack's own process would (`stack_process`) while the others train in
    theirs. However it ends, the others go on to their own end: interrupted (its checkpoints written, the stop
    passed on to them as it came), or on an error that trainer.on_error=raise passes on (kept for the end)."""
    from reglab.cli import train_one_stack

    for idx in jobs:
        members[idx].job.cores, members[idx].job.parallel = cores, True
        members[idx].started = time.perf_counter()  # its clock starts with its stack, not with the sweep
    gc.collect()
    gc.freeze()  # as `cli.train_members` does: torch's long-lived objects out of the collector's sight
    try:
        train_one_stack(number, {idx: members[idx] for idx in jobs}, sweep_dir, others.relay)
    except SystemExit as interrupted:  # `preemption.after_stack_interrupt` or `after_finished_runs`
        if interrupted.code not in stop_codes():
            raise
    except KeyboardInterrupt:  # a second Ctrl-C, passed on too: the other stacks stop at once as this one did
        pass
    except Exception:  # as a stack process ending on the error would: printed, the sweep failed at the end
        traceback.print_exc()
        others.raised.append(number)


class OtherStacks(threading.Thread):
    """A thread of the launcher's process that hands the stacks after the first to processes of their own, at most
    `slots` at once, each as one comes free, and waits for them; the process itself trains the first stack and
    `take`s the next one left whenever it is done. A stack process that ends on a stop signal sent to it alone
    stops the sweep: the signal goes on to this process."""

    def __init__(self, stacks, members: dict, sweep_dir: str, cores: int, slots: int, idle: list):
        from reglab.preemption import StopRelay

        super().__init__(name="reglab stack processes", daemon=True)
        self.stacks, self.members, self.sweep_dir = stacks, members, sweep_dir
        self.cores, self.slots = cores, slots
        self.waiting = list(range(1, len(stacks)))
        self.lock = threading.Lock()  # for `waiting`: this thread and the launcher's process take from it
        release(idle[slots:])  # more were started than can train at once
        self.idle = idle[:slots]
        # sentinel -> (process, its pid, stack number, when it was handed over, its jobs that had finished before)
        self.running: dict[int, tuple[multiprocessing.Process, int, int, float, set[int]]] = {}
        self.relay = StopRelay(self.running)
        self.raised: list[int] = []  # stacks that ended on an error that trainer.on_error=raise passes on
        self.error: BaseException | None = None  # this thread's own
        # no further stack starts: a stack process stopped on its own, or this thread or the launcher's process
        # failed (the stops received are in `relay.received`)
        self.stopping = False

    def run(self) -> None:
        try:
            while self.running or (self.waiting and not self.stopped()):
                self.hand_over_waiting()
                for sentinel in multiprocessing.connection.wait(list(self.running)) if self.running else []:
                    self.ended(*self.running.pop(sentinel))
                if not self.waiting:
                    release(self.idle)
                    self.idle = []
        except BaseException as err:  # e.g. no process could start: every stack checkpoints and stops
            self.error = err
            if not self.stopping:
                self.stopping = True
                # the launcher's handler passes it on, to its own stack too
                os.kill(os.getpid(), signal.SIGTERM)
        finally:
            release(self.idle)

    def stopped(self) -> bool:
        return self.stopping or bool(self.relay.received)

    def take(self) -> int | None:
        """The next stack left to train, or None: none is left, or a stop came."""
        with self.lock:
            return self.waiting.pop(0) if self.waiting and not self.stopped() else None

    def hand_over_waiting(self) -> None:
        from reglab.checkpoint import skipped_on_resume

        while len(self.running) < self.slots and (number := self.take()) is not None:
            members = [self.members[idx] for idx in self.stacks[number]]
            jobs = [
                (idx, m.cfg, m.run_dir, m.job) for idx, m in zip(self.stacks[number], members, strict=True)
            ]
            # the jobs its process will skip (`loop.already_finished`): without resume it trains them again
            finished = {
                idx for idx, m in zip(self.stacks[number], members, strict=True) if skipped_on_resume(m)
            }
            process = hand_over(self.idle, (number, jobs, self.sweep_dir, self.cores))
            self.running[process.sentinel] = (process, process.pid, number, time.time(), finished)
            if self.relay.received:  # a stop came while it was handed over: pass it on now
                os.kill(process.pid, self.relay.received[0])

    def ended(self, process, pid: int, number: int, handed_over: float, finished: set) -> None:
        process.join()
        code = process.exitcode
        process.close()
        if code == 0 or (code == 1 and self.relay.received):
            return  # finished, or stopped at once by a second Ctrl-C (an exception's exit status)
        if code in stop_codes():
            if not self.stopped():  # stopped on a signal sent to it alone: the sweep stops, as in one process
                self.stopping = True
                os.kill(os.getpid(), code - 128)  # this process's handler passes it on, to its own stack too
        else:  # it died (out of memory, killed) or ended on an error
            stack = [self.members[idx] for idx in self.stacks[number] if idx not in finished]
            fail_unfinished_members(stack, number, code, handed_over)
            if any(m.cfg["trainer"]["on_error"] == "raise" for m in stack):
                self.raised.append(number)


@contextlib.contextmanager
def stopping_stacks_on_error(others: OtherStacks):
    """An error in this process's own work stops the running stacks (each checkpoints) instead of leaving it to
    wait at exit for them to train to the end; no further one starts."""
    from reglab.preemption import pass_on

    try:
        yield
    except BaseException:
        others.stopping = True
        pass_on(signal.SIGTERM, others.running)
        raise


def hand_over(idle: list, stack: tuple) -> multiprocessing.Process:
    """Send a stack to a started process (a fresh one when none is left, or when one died while it waited)."""
    while True:
        process, pipe = idle.pop(0) if idle else start_stack_processes(1)[0]
        try:
            pipe.send(stack)
        except OSError:  # it died while loading (out of memory, killed): the next one
            pipe.close()
            process.join()
            continue
        pipe.close()
        return process


def hold_stop_signals() -> set[int]:
    """A stack process's stop signals, blocked: each stays pending until the stack is received (then the process
    exits: nothing to checkpoint, its jobs start afresh on resume) or, once it trains, until `stop_on_signals` has
    its handlers in place and unblocks it (then the stack checkpoints after its first epoch): none is lost."""
    stops = {sig - 128 for sig in stop_codes()}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    for sig in stops:
        # what `stop_on_signals` puts back once the stack has trained: a stop then (every member written, W&B runs
        # and figures being finished) is ignored instead of ending the process; a stop while it waits for its stack
        # stays pending (blocked) either way
        signal.signal(sig, lambda signum, frame: None)
    return stops


def stack_process(pipe: Connection, launcher: int) -> None:
    """The body of a stack's process: load, wait for a stack, train it. It runs in a process group of its own, so
    that a terminal's Ctrl-C reaches it once, passed on by the launcher, and not a second time directly (a second
    Ctrl-C stops a stack at once)."""
    from reglab.preemption import requeue_signal, signal_when_parent_dies

    os.setpgid(0, 0)
    stops = hold_stop_signals()
    signal_when_parent_dies(signal.SIGTERM, launcher)
    import gc

    from reglab.cli import train_one_stack
    from reglab.loop import Member

    try:
        number, jobs, sweep_dir, cores = pipe.recv()
    except EOFError:  # no stack for this one
        return
    if pending := stops & signal.sigpending():
        # which came first is not known: the requeue signal wins, as in `stop_on_signals`, then SIGTERM
        raise SystemExit(128 + max(pending, key=lambda sig: (sig == requeue_signal(), sig == signal.SIGTERM)))
    members = {}
    for idx, cfg, run_dir, job in jobs:
        job.cores, job.parallel = cores, True
        members[idx] = Member(cfg=cfg, run_dir=Path(run_dir), job=job)
    gc.collect()
    gc.freeze()  # as `cli.train_members` does: torch's long-lived objects out of the collector's sight
    train_one_stack(number, members, sweep_dir)


@contextlib.contextmanager
def stop_signals_calling(handler):
    from reglab.preemption import requeue_signal

    signals = dict.fromkeys((signal.SIGINT, signal.SIGTERM, requeue_signal()))
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def fail_unfinished_members(members: list, number: int, exitcode: int, started: float) -> None:
    """Record as failed each member of a stack whose process died that had not written its summary since."""
    from reglab.loop import record_failure

    unfinished = []
    for m in members:
        summary = Path(m.run_dir) / "summary.json"
        if summary.exists() and summary.stat().st_mtime >= started:
            continue
        metrics = Path(m.run_dir) / "metrics.jsonl"
        m.epoch = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        record_failure(m, RuntimeError(f"the process of stack {number} ended with exit code {exitcode}"))
        unfinished.append(m)
    print(
        f"[reglab] stack {number}: its process ended with exit code {exitcode}; "
        f"{len(unfinished)} unfinished job(s) recorded as failed (the other stacks go on)"
    )


def objective_on_disk(run_dir) -> float:
    """A job's objective from its summary (NaN without one: a job interrupted before it finished)."""
    from reglab.loop import objective

    try:
        return objective(json.loads((Path(run_dir) / "summary.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return math.nan
