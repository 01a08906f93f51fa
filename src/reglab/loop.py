"""The training loop: set-up, data, model, optimizer, epochs, evaluation, record. Read it top to bottom.

One loop trains a *stack*: K members of one architecture side by side, each member one job of a sweep with its own
directory, seed, learning rate and regularization (models.py explains the stacked layers). An ordinary run is the
stack of one, `train(cfg, run_dir, job)`; the stacked launchers (hydra_plugins/reglab_stacked_launcher) call
`train_stack` with many, through `reglab.cli.train_members`. Every record is written as if each member had trained
alone, and on the CPU a member's metrics and weights equal its one-by-one run bit for bit (tests/test_stack.py),
because nothing a member computes depends on the others: its own parameter tensors and optimizer state, its own
generators for initialization, batch order and dropout masks, its own loss (the stack minimizes the *sum* of the
members' losses, whose gradient for member k is member k's own). A member that diverges or stops early is finished
on the spot and drops out of the updates.

The loop knows Hydra only through the plain `cfg` dicts and the `Job` facts, and regularization only through the
hooks of `reglab.regularizers`. Speed (small models are overhead-bound, so the loop's own overhead is the cost):
the data live on the training device and batches come from `randperm` indexing; the step never syncs with the host
(losses are stacked and read once per epoch); evaluation is one large-batch pass under `inference_mode`.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from reglab import checkpoint, diagnostics
from reglab.data import DataSplits, load_stack_data, shift_and_flip
from reglab.errors import BAD_INPUT, FINISHED, CheckpointError
from reglab.fused_adam import FusedAdam
from reglab.models import (
    Architecture,
    MemberView,
    build_model,
    clear_gradients,
    in_blocks,
    member_parameters,
    member_weights,
    predict,
    share_gradients,
)
from reglab.preemption import Interrupted, stop_on_signals
from reglab.regularizers import Regularization, build_regularization
from reglab.regularizers.base import Targets
from reglab.regularizers.early_stopping import EarlyStopping
from reglab.tracking import RunRecord, resolve_wandb_mode, start_wandb, write_summary

# glibc's mallopt parameters (malloc.h) and the values reglab asks for: keep up to 1 GiB of freed heap memory, and
# serve blocks up to 1 GiB from the heap (a glibc that refuses so high a threshold gets its own maximum, 32 MiB)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_BLOCKS, HEAP_BLOCKS_FALLBACK = 1 << 30, 32 << 20
FIT_ACCURACY = 0.99  # `fit_epoch`: the first epoch with this training accuracy (how fast a model memorizes)


@dataclass
class Job:
    """What the entrypoint (or the stacked launcher) knows about a job beyond its config."""

    overrides: list[str] = field(default_factory=list)
    group: str | None = None  # the sweep's name; W&B groups a sweep's runs by it
    multirun: bool = False
    # started by a parallel launcher (joblib, submitit): stay quiet (so does a stack of K > 1)
    parallel: bool = False
    stack: dict | None = None  # {"id": ..., "jobs": [...]} when trained in a stack with other jobs
    # the cores its stack may use (None: all this process may use); the stacked launcher shares them between the
    # stacks it trains side by side
    cores: int | None = None


@dataclass
class Member:
    """One job of the stack: its config and directory, and everything about it that changes while it trains."""

    cfg: dict
    run_dir: Path
    job: Job
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)
    status: str = "running"
    stop_reason: str | None = None
    train_time_s: float = 0.0
    wandb_id: str | None = None
    batch_generator: torch.Generator = field(default_factory=torch.Generator)  # batch order, augmentation
    # dropout masks, noise, depth drops (on the training device)
    noise_generator: torch.Generator | None = None
    best: EarlyStopping | None = None  # tracks the best val/loss epoch for best.pt, never stops training
    record: RunRecord | None = None
    summary: dict | None = None
    # what actually trains: optimizer class and settings, techniques in words
    ran: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)  # wall_time_s counts from here

    @property
    def seed(self) -> int:
        return self.cfg["trainer"]["seed"]

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass
class Stack:
    """The members trained together, and what they share."""

    members: list[Member]
    trainer: dict  # the same for every member (only trainer.seed may differ)
    device: torch.device = torch.device("cpu")
    threads: int = 1  # torch's CPU threads for the stack's training and evaluation passes
    stop_requested: str | None = None
    plotter: diagnostics.Plotter = field(default_factory=diagnostics.Plotter)  # draws the runs' figures

    def running(self) -> list[tuple[int, Member]]:
        return [(k, m) for k, m in enumerate(self.members) if m.running]


# ---------------------------------------------------------------------------------------------------------------------
# One stack


def train(cfg: dict, run_dir: Path, job: Job) -> float:
    """Train one configuration in `run_dir`; returns the evaluated model's val/loss (NaN when the run failed)."""
    return train_stack([Member(cfg=cfg, run_dir=Path(run_dir), job=job)])[0]


def train_stack(members: list[Member], relay=None) -> list[float]:
    """Train the members side by side; returns each one's validation objective (NaN for a failed member). A stop
    signal while they train also goes to the stacked launcher's `relay`, where one is given (`stop_on_signals`)."""
    todo = [m for m in members if not already_finished(m)]
    for m in todo:  # the jobs trained together (on a resume, those that had not finished)
        m.job.stack = {**(m.job.stack or {}), "size": len(todo)}
    if todo:
        stack = Stack(members=todo, trainer=todo[0].cfg["trainer"])
        try:
            # a signal during set-up stops the stack at the end of its first epoch
            with stop_on_signals(stack, relay):
                model, data, optimizer, regs = prepare(stack)
                start_records(stack, regs)
                fit(model, data, optimizer, regs, stack)
        except (*BAD_INPUT, Interrupted):
            raise  # bad input is the entrypoint's to report; an interrupted stack has its checkpoints
        except Exception as err:
            fail_unfinished(stack, err)
        finally:
            for m in todo:  # also after a second Ctrl-C: W&B runs are always finished
                if m.record is not None:
                    # an interrupted run is not a failed one: it will be resumed into the same W&B run
                    m.record.finish(failed=m.status not in FINISHED and not stack.stop_requested)
            stack.plotter.close()  # after W&B: a Ctrl-C while it waits for a drawing must not skip the runs
    return [objective(m.summary) if m.summary else math.nan for m in members]


def already_finished(member: Member) -> bool:
    if not member.cfg["trainer"]["resume"] or (done := checkpoint.finished_summary(member.run_dir)) is None:
        return False
    if not checkpoint.written_by(done, member.job.overrides):
        # a sweep re-run with another grid: as without resume, the job trains in its directory
        print(f"[reglab] {member.run_dir} held another job's run ({' '.join(done['overrides'])}): replaced")
        return False
    print(f"[reglab] {member.run_dir} already finished ({done['status']}): skipped")
    member.summary, member.status = done, done["status"]
    return True


def prepare(stack: Stack):
    """Process settings, data, regularizers, model and optimizer; each member restored from its checkpoint on resume."""
    cfg = stack.members[0].cfg
    stack.threads = thread_count(stack.trainer["threads"], len(stack.members), stack.members[0].job.cores)
    stack.device = setup_process(stack.trainer, stack.members[0].seed, stack.threads)
    # the members of a stack mostly finish together: their figures are drawn side by side
    if len(stack.members) > 1:
        stack.plotter = diagnostics.Plotter(workers=stack.threads)
    data = load_stack_data([m.cfg["dataset"] for m in stack.members])
    data = data.to(stack.device, keep_train_on_host=stack.trainer["loader"] == "dataloader")
    regs = build_regularization(
        [m.cfg["regularizer"] for m in stack.members], [m.seed for m in stack.members]
    )
    for m in stack.members:
        m.batch_generator.manual_seed(m.seed)  # the batch order; a resume restores its state
        m.noise_generator = torch.Generator(stack.device).manual_seed(m.seed)
        # best.pt and best_epoch when no technique selects the epoch
        m.best = EarlyStopping.tracker("val/loss")
    arch = Architecture(
        data.input_shape,
        data.num_classes,
        [m.seed for m in stack.members],
        regs.dropout_plans(),
        regs.model_layers,  # the layers techniques put into the network (noise, stochastic depth)
    )
    model = build_model(cfg["model"], arch, [m.noise_generator for m in stack.members]).to(stack.device)
    regs.setup(model)
    # checkpoints load before the optimizer is built: it groups members by epoch
    saved = [alone_or_failed(stack, m, checkpoint.load_for_resume, m) for m in stack.members]
    optimizer = build_optimizer(stack, model, regs)
    for k, (m, payload) in enumerate(zip(stack.members, saved, strict=True)):
        m.ran = {"optimizer": describe_optimizer(optimizer, model, k), "regularization": regs.describe(k)}
        if payload is not None:
            alone_or_failed(stack, m, checkpoint.restore, payload, k, m, model, optimizer, regs)
    if len(stack.members) == 1 and not stack.members[0].job.parallel:
        print(f"[reglab] training {describe_run(stack.members[0])}")
    return model, data, optimizer, regs


def alone_or_failed(stack: Stack, member: Member, step, *args):
    """`step(*args)`; a checkpoint that cannot be resumed is bad input for a lone run (one line, exit 2), and in a
    stack fails its own member only, which then drops out of the updates."""
    try:
        return step(*args)
    except CheckpointError as err:
        if len(stack.members) == 1:
            raise
        member.status = "failed"
        record_failure(member, err)
        print(f"[reglab] {member.run_dir}: {err} (recorded as failed; the rest of the stack goes on)")
        return None


def describe_run(member: Member) -> str:
    """'mlp on mnist1d, Adam(lr=0.01, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0), l2 coupled ...'"""
    opt = {k: v for k, v in member.ran["optimizer"].items() if k not in ("class", "fused")}
    settings = ", ".join(f"{key}={value}" for key, value in opt.items())
    techniques = "; ".join(member.ran["regularization"]) or "no regularization"
    cfg = member.cfg
    return f"{cfg['model']['name']} on {cfg['dataset']['name']}: {member.ran['optimizer']['class']}({settings}); {techniques}"


def start_records(stack: Stack, regs: Regularization) -> None:
    """Each member's metrics file and W&B run. When W&B cannot start online (a bounded wait, then offline), the
    members after it go offline at once, so that a stack of K never waits K times."""
    offline = False
    for k, m in stack.running():
        run = start_wandb_for(m, regs.names(k), offline)
        asked_online = (
            resolve_wandb_mode(m.cfg["logger"].get("wandb", {}).get("mode", "disabled")) == "online"
        )
        # online asked for but not had (offline, or no run at all when offline failed too): not asked again
        offline = offline or (asked_online and (run is None or run.offline))
        m.record = RunRecord(m.run_dir, run, log_images=log_plots(m.cfg))


def start_wandb_for(member: Member, techniques: list[str], offline: bool = False):
    logger = member.cfg["logger"]
    if offline:
        logger = {**logger, "wandb": {**logger["wandb"], "mode": "offline"}}
    run = start_wandb(
        logger,
        run_dir=member.run_dir,
        name=run_name(member.job.overrides),
        group=member.job.group,
        job_type="+".join(techniques) or "none",  # W&B filters and colours runs by technique
        config=flatten(member.cfg, ""),  # dotted keys: the same names W&B sweeps set, so they never collide
        tags=techniques or ["none"],
        resume_id=member.wandb_id,
    )
    member.wandb_id = getattr(run, "id", None)
    return run


def log_plots(cfg: dict) -> bool:
    return cfg["logger"]["name"] == "wandb" and cfg["logger"]["wandb"]["log_plots"]


def objective(summary: dict) -> float:
    """What sweepers minimize: validation cross-entropy of the evaluated model (the same scale for every technique)."""
    value = summary.get("val/loss")
    return math.nan if value is None else value


def setup_process(trainer: dict, seed: int, threads: int = 1) -> torch.device:
    """Threads, memory, denormals, seeds and device: the process-wide settings, all explicit in the config."""
    torch.set_num_threads(threads)
    keep_freed_memory()
    # tiny values (< 1.2e-38) become 0 instead of denormal floats, which CPUs compute slowly
    torch.set_flush_denormal(trainer["flush_denormal"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # only the built-in dropout (impl=torch) draws from torch's global generator
    if trainer["deterministic"]:
        # cuBLAS needs a fixed workspace for reproducible matmuls; it reads this before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # process-wide, so set for every job, on or off; only on a change, as its first call imports torch's compiler
    # (~2 s of every run's start, measured)
    wanted = trainer["deterministic"]
    if (
        torch.are_deterministic_algorithms_enabled() != wanted
        or torch.is_deterministic_algorithms_warn_only_enabled()
    ):
        torch.use_deterministic_algorithms(wanted)
    if trainer["device"] == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(trainer["device"])


def thread_count(threads: int | str, members: int, cores: int | None = None) -> int:
    """`trainer.threads`: a number, or auto: one thread for a lone job (a small model's step is too short to split,
    and parallel jobs must not oversubscribe the cores), one per member up to the cores the stack may use (`cores`,
    else all this process may use). On the CPU the thread count does not change a member's results
    (tests/test_stack.py)."""
    if threads != "auto":
        return threads
    return max(1, min(members, cores or usable_cores()))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def keep_freed_memory() -> None:
    """Ask glibc to serve large blocks from its heap and keep them when freed. Otherwise a large block (an
    activation of a stack, an evaluation batch) is a fresh mmap each time, new memory the kernel zeroes page by page:
    measured here (glibc 2.36), an 80 MB block took 20481 page faults per allocation, 3072 with these settings, and
    a 48-member evaluation pass ran 1.6x faster. No-op where glibc is not the libc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_BLOCKS)
        if not libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS):
            libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS_FALLBACK)
    except (OSError, AttributeError):
        pass


def give_back_freed_memory() -> None:
    """Once a process has no member left to train, hand the heap memory that `keep_freed_memory` keeps back to the
    system: the final evaluation's temporaries (the sharpness gradient over every member and training sample) would
    stay resident while the figures are drawn, in every stack process at once (K=24 MLP stack: 569 -> 394 MB of
    private memory, measured). No-op where glibc is not the libc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_optimizer(stack: Stack, model: nn.Module, regs: Regularization) -> torch.optim.Optimizer:
    """One optimizer for the whole stack, with each member's own hyperparameters in its parameter groups.

    Members whose settings (lr, betas, weight decay, ..., and epoch) agree share a group, and each run of
    consecutive members in a group is updated as one block per parameter (models.member_block): one call per
    tensor costs more than a small layer's arithmetic. A group's `initial_lr` and `epoch` let the learning-rate
    schedule run per group. Techniques may claim some of a member's parameters with settings of their own
    (`optimizer_groups`: L2 through the optimizer's weight decay)."""
    groups: dict[tuple, dict] = {}
    for k, m in enumerate(stack.members):
        plain = optimizer_hyperparameters(m.cfg["optimizer"])
        claimed = regs.optimizer_groups(k)
        taken = {id(p) for params, _ in claimed for p in params}
        rest = [p for _, p in member_parameters(model, k) if id(p) not in taken]
        for params, extra in [*claimed, (rest, {})]:
            settings = {**plain, **extra, **regs.group_settings(k), "epoch": m.epoch}
            group = groups.setdefault(
                tuple(sorted(settings.items())), {**settings, "params": [], "members": []}
            )
            group["params"] += params
            group["members"].append(k)
    fused = stack.trainer["fused_optimizer"] and stack.device.type in ("cuda", "cpu")
    param_groups = []
    for group in (g for g in groups.values() if g["params"]):
        group["initial_lr"] = group["lr"]
        # the fused CPU kernel rounds a tensor's last few elements apart (models.in_blocks)
        blocks = in_blocks(model, group["params"], lanes=fused and stack.device.type == "cpu")
        param_groups.append({**group, "params": blocks})
    # fused: one kernel for the whole update instead of several per tensor, ~1.3x faster steps here
    if stack.members[0].cfg["optimizer"]["name"] == "sgd":
        return torch.optim.SGD(param_groups, fused=fused or None)
    # FusedAdam: the built-in fused Adam, less its per-tensor bookkeeping (fused_adam.py)
    return FusedAdam(param_groups) if fused else torch.optim.Adam(param_groups)


def describe_optimizer(optimizer, model: nn.Module, member: int) -> dict:
    """The optimizer member k actually trains with: its class as PyTorch names it and its group settings."""
    groups = [g for g in optimizer.param_groups if member in g["members"]]
    decayed = max(groups, key=lambda g: g["weight_decay"])
    # FusedAdam is torch's Adam, and says so
    name = "Adam" if isinstance(optimizer, torch.optim.Adam) else type(optimizer).__name__
    if decayed.get("decoupled_weight_decay"):
        name = "AdamW"  # torch.optim.AdamW is exactly Adam with this flag
    keys = ("betas", "eps") if name != "SGD" else ("momentum", "nesterov")
    return {
        "class": name,
        "lr": decayed["initial_lr"],
        **{key: decayed[key] for key in keys},
        "weight_decay": decayed["weight_decay"],  # the optimizer's built-in decay of the decayed weights
        "fused": bool(optimizer.defaults.get("fused")),
    }


def optimizer_hyperparameters(opt: dict) -> dict:
    """The settings of one member's parameter groups (weight decay 0 unless the L2 technique sets it)."""
    if opt["name"] == "sgd":
        return dict(lr=opt["lr"], momentum=opt["momentum"], nesterov=opt["nesterov"], weight_decay=0.0)
    # AdamW is Adam with decoupled weight decay (torch.optim.AdamW sets exactly this flag)
    decoupled = opt["name"] == "adamw"
    return dict(
        lr=opt["lr"],
        betas=tuple(opt["betas"]),
        eps=opt["eps"],
        weight_decay=0.0,
        decoupled_weight_decay=decoupled,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The epochs


def fit(model, data: DataSplits, optimizer, regs: Regularization, stack: Stack):
    trainer = stack.trainer
    progress = Progress(
        trainer["progress"], trainer["epochs"], stack.members[0].job.parallel or len(stack.members) > 1
    )
    precision = autocast(trainer["precision"], stack.device)
    network = compiled(model) if trainer["compile"] else model  # same parameters; compiled forward
    while stack.running():
        started = time.perf_counter()
        lrs = set_learning_rates(optimizer, regs, stack)  # the rate each member trains with this epoch
        batches = shuffled_batches(data, stack)
        losses = train_one_epoch(network, batches, optimizer, regs, precision, stack, lrs)
        elapsed = time.perf_counter() - started
        metrics = epoch_metrics(network, data, regs, losses, lrs, stack)
        ending = []
        for k, m in stack.running():
            m.train_time_s += elapsed
            m.epoch += 1
            row = {"epoch": m.epoch, **metrics[k], "time_s": round(time.perf_counter() - m.started, 4)}
            m.history.append(row)
            m.record.log_epoch(row)
            if k == 0:
                progress.update(row)
            if end_of_training(k, m, row, model, regs, trainer["epochs"]):
                ending.append(k)
        finish_members(ending, model, data, regs, stack)
        if stack.stop_requested and stack.running():
            checkpoint.save_stack(stack, model, optimizer, regs)
            raise Interrupted(stack.stop_requested, max(m.epoch for _, m in stack.running()))
        if trainer["checkpoint_every"] and any(
            m.epoch % trainer["checkpoint_every"] == 0 for _, m in stack.running()
        ):
            checkpoint.save_stack(stack, model, optimizer, regs)
    progress.close()
    if stack.stop_requested:  # it came while the last members finished: stop before anything else starts
        raise Interrupted(stack.stop_requested, max(m.epoch for m in stack.members), finished=True)


def end_of_training(k: int, m: Member, row: dict, model, regs: Regularization, epochs: int) -> bool:
    """Whether member k's training ends after this epoch: it diverged, a technique stopped it, or its epochs ran out."""
    if not math.isfinite(row["loss/total"]):
        m.status, m.stop_reason = "diverged", f"non-finite training loss at epoch {m.epoch}"
        return True
    view = MemberView(model, k)
    m.best.step(row["val/loss"], m.epoch, model=view)
    if regs.end_epoch(k, row, m.epoch, view):
        selection = regs.selection(k)
        m.status, m.stop_reason = "early_stopped", getattr(selection, "stop_reason", None)
        return True
    if m.epoch >= epochs:
        m.status = "completed"
        return True
    return False


def set_learning_rates(optimizer, regs: Regularization, stack: Stack) -> list[float]:
    """Each group's rate for its next epoch (constant, or cosine annealing to 0 over the epochs, unless a technique
    takes over, as SWA does); per member."""
    epochs = stack.trainer["epochs"]
    lrs = [0.0] * len(stack.members)
    for group in optimizer.param_groups:
        plan = partial(
            scheduled_lr, group["initial_lr"], epochs=epochs, schedule=stack.trainer["lr_schedule"]
        )
        group["lr"] = regs.learning_rate(group, plan)
        group["epoch"] += 1
        for k in group["members"]:
            lrs[k] = group["lr"]
    return lrs


def scheduled_lr(initial_lr: float, epoch: int, epochs: int, schedule: str) -> float:
    """cosine: lr₀·(1 + cos(π·epoch/epochs))/2 for epochs 0, 1, ... (SGDR's closed form without restarts)."""
    if schedule == "cosine":
        return initial_lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
    return initial_lr


def shuffled_batches(data: DataSplits, stack: Stack):
    """Mini-batches (inputs [K, B, ...], targets) in a fresh random order per member and epoch, each from the
    member's own generator.

    Default (`trainer.loader=tensors`): the data stay on the device and a batch is one indexing operation, no
    workers. `trainer.loader=dataloader` draws the very same batches through a DataLoader (worker processes, pinned
    memory), for data that should stay in host memory; both paths train identically for the same seeds.
    """
    trainer, device = stack.trainer, stack.device
    orders = torch.stack(
        [torch.randperm(len(data.x_train), generator=m.batch_generator) for m in stack.members]
    )
    if trainer["loader"] == "tensors":
        orders = orders.to(data.x_train.device)
        source = (
            (rows(data.x_train, idx), data.y_train.gather(1, idx))
            for idx in orders.split(trainer["batch_size"], 1)
        )
    else:
        source = loader_batches(data, orders, trainer, device)
    for x, y in source:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if any(m.cfg["dataset"]["augment"] for m in stack.members):  # per member: an augmentation grid stacks
            x = torch.stack(
                [
                    shift_and_flip(x[k], m.batch_generator) if m.cfg["dataset"]["augment"] else x[k]
                    for k, m in enumerate(stack.members)
                ]
            )
        yield x, Targets(y, data.num_classes)  # each member's one-hot labels, until a technique changes them


def rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[idx] for indices [K, B]: the rows [K, B, ...], by index_select (a fifth of the time of x[idx]'s general
    indexing for a K=24 stack's batch of MNIST-1D rows, measured: 18 against 81 µs)."""
    return x.index_select(0, idx.flatten()).view(*idx.shape, *x.shape[1:])


def loader_batches(data: DataSplits, orders: Tensor, trainer: dict, device):
    """The same batches as the tensor path, through a DataLoader over (member, sample) pairs."""
    members, n = orders.shape
    dataset = MemberSamples(data.x_train, data.y_train)
    flat = orders + torch.arange(members).unsqueeze(1) * n  # sample i of member k is item k·n + i
    sampler = [idx.flatten().tolist() for idx in flat.split(trainer["batch_size"], 1)]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=trainer["num_workers"],
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # its own seed draw must not consume the global RNG
    )
    for x, y in loader:
        yield x.view(members, -1, *x.shape[1:]), y.view(members, -1)


class MemberSamples(torch.utils.data.Dataset):
    """Item k·n + i: sample i's input (shared) with member k's label for it (labels differ under label noise)."""

    def __init__(self, x: Tensor, y: Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.y.numel()

    def __getitem__(self, item: int):
        member, i = divmod(item, len(self.x))
        return self.x[i], self.y[member, i]


def train_one_epoch(
    model, batches, optimizer, regs: Regularization, precision, stack: Stack, lrs: list[float]
):
    """One pass over the batches; returns each member's mean data loss and mean penalty ([K] tensors, no host sync)."""
    model.train()
    training = [k for k, _ in stack.running()]
    data_losses, penalties = [], []
    for x, targets in batches:
        x = regs.batch(x, targets)  # label smoothing smooths targets; mixup, cutmix mix inputs and targets
        noise = noise_states(stack) if regs.second_pass else None
        data_loss, penalty = forward_backward(model, x, targets, regs, precision, training)
        if noise is not None:
            # a technique may take the gradient again at moved weights (SAM): the same batch, the same masks
            regs.refine_gradients(partial(replay, noise, stack, model, x, targets, regs, precision, training))
        regs.before_step(lrs)
        optimizer.step()
        regs.after_step(lrs)
        data_losses.append(data_loss.detach())
        if penalty is not None:
            penalties.append(penalty.detach())
    return mean_over_steps(data_losses), mean_over_steps(penalties) if penalties else torch.zeros_like(
        data_losses[0]
    )


def forward_backward(model, x, targets: Targets, regs: Regularization, precision, training: list[int]):
    """One batch forward and backward: each member's data loss and penalty ([K], or None when no technique adds
    one); afterwards each training member's parameter slices hold the gradients of its own loss."""
    with precision:
        logits = model(x)
        data_loss = regs.data_loss(logits.float(), targets)  # [K]
    penalty = regs.penalty()
    loss = data_loss if penalty is None else data_loss + penalty
    clear_gradients(model)
    # the members are independent: the gradient of the sum for member k's weights is that of its own loss
    loss.sum().backward()
    # each member's slices get their gradients; a finished member none, so the optimizer leaves it alone
    share_gradients(model, training)
    return data_loss, penalty


def replay(noise: list[Tensor], stack: Stack, *batch) -> None:
    """The batch's forward and backward pass again, with the dropout masks of its first pass."""
    rewind_noise(stack, noise)
    forward_backward(*batch)


def noise_states(stack: Stack) -> list[Tensor]:
    """Where the dropout masks of the next forward pass come from: every member's noise generator, and torch's
    global ones (built-in dropout), so that a second pass over a batch draws the same masks."""
    states = [m.noise_generator.get_state() for m in stack.members] + [torch.get_rng_state()]
    return states + ([torch.cuda.get_rng_state()] if stack.device.type == "cuda" else [])


def rewind_noise(stack: Stack, states: list[Tensor]) -> None:
    for m, state in zip(stack.members, states, strict=False):
        m.noise_generator.set_state(state)
    torch.set_rng_state(states[len(stack.members)])
    if stack.device.type == "cuda":
        torch.cuda.set_rng_state(states[-1])


def mean_over_steps(values: list[Tensor]) -> Tensor:
    """The per-member mean of [K] vectors, summed in step order: the same rounding for every K (a reduction kernel
    may order its sums by the tensor's shape)."""
    return sum(values[1:], values[0]) / len(values)


def epoch_metrics(model, data: DataSplits, regs, losses, lrs: list[float], stack: Stack) -> list[dict]:
    """Per member: train and validation metrics from one eval-mode pass each (train in eval mode: dropout would
    distort it), the training objective, weight statistics and the learning rate."""
    data_loss, penalty = losses
    batch, members = stack.trainer["eval_batch_size"], len(stack.members)
    # of the training split only loss and acc are logged: no calibration binning
    train = evaluate(model, data.x_train, data.y_train, batch, calibration=False)
    val = evaluate(model, data.x_val, data.y_val.expand(members, -1), batch)
    values = {}
    for k in range(members):
        values[k] = {
            "loss/data": data_loss[k],
            "loss/penalty": penalty[k],
            "loss/total": data_loss[k] + penalty[k],
            **{f"train/{name}": v for name, v in train[k].items() if name in ("loss", "acc")},
            **{f"val/{name}": v for name, v in val[k].items()},
        }
    numbers = as_floats_nested(values)
    # as in `evaluate`, on one thread; one member at a time: a float64 sum over the rows of K members' weights rounds
    # otherwise than over one member's (measured: weights/l2 in its last digit)
    with diagnostics.one_thread():
        weights = [diagnostics.weight_statistics(member_weights(model, k)) for k in range(members)]
    return [
        {
            **numbers[k],
            "gap/val_loss": numbers[k]["val/loss"] - numbers[k]["train/loss"],
            "gap/val_acc": numbers[k]["train/acc"] - numbers[k]["val/acc"],
            **weights[k],
            "lr": lrs[k],
        }
        for k in range(members)
    ]


@torch.inference_mode()
def predict_all(model: nn.Module, x: Tensor, batch_size: int, members: int) -> Tensor:
    """Every member's logits for x: [K, N, classes], on the model's device (x may be on the host: a DataLoader's
    training split). In chunks of at most `batch_size` samples; on the CPU of near-equal size and at most
    `EVALUATED_AT_ONCE` samples x members."""
    model.eval()
    device = next(model.parameters()).device
    if device.type == "cpu":
        batch_size = min(batch_size, max(FEWEST_EVALUATED, EVALUATED_AT_ONCE // members))
        chunks = x.tensor_split(max(1, math.ceil(len(x) / batch_size)))
    else:
        chunks = x.split(batch_size)
    return torch.cat([predict(model, chunk.to(device), members).float() for chunk in chunks], 1)


# Samples x members evaluated in one chunk on the CPU: a stack's activations then stay in the caches. Evaluating the
# MNIST-1D splits took a K=24 MLP stack ~114 ms an epoch in chunks of 4096 samples ([24, 4096, 100] floats per layer)
# and ~100 ms in chunks of 341 (measured in its training loop, one thread). A row of a matmul came out the same bits
# whatever rows were computed beside it, as long as there were at least 3 of them (1 or 2 take another kernel:
# measured here), so chunks are near-equal and at least FEWEST_EVALUATED / 2 samples: a stack's logits are its lone
# runs' (tested), and a lone run's are those of one chunk.
EVALUATED_AT_ONCE = 2**13
FEWEST_EVALUATED = 64


SCORED_AT_ONCE = 2**19  # samples x members scored in one call by `evaluate`


def evaluate(
    model, x: Tensor, y: Tensor, batch_size: int, calibration: bool = True
) -> list[dict[str, Tensor]]:
    """Per member: loss (= nll), acc, and with `calibration` ece and confidence, as 0-d tensors, no host sync. y is
    [K, N]."""
    logits = predict_all(model, x, batch_size, len(y))
    y = y.to(logits.device)
    # as many members at once as keep the scores' temporaries small (a one-hot [members, N, 15] of int64 for the
    # calibration bins): all of them on MNIST-1D, a few at a time on a 60000-sample training split
    step = max(1, SCORED_AT_ONCE // logits.shape[1])
    # a sum of over 32768 numbers is split between threads, with other rounding: a member's metrics are taken on one
    # thread, as in its lone run (trainer.threads=auto gives a stack more)
    with diagnostics.one_thread():
        parts = [
            scores(logits[first : first + step], y[first : first + step], calibration)
            for first in range(0, len(y), step)
        ]
    return [{name: part[name][k] for name in part} for part in parts for k in range(len(part["loss"]))]


@torch.inference_mode()
def scores(logits: Tensor, y: Tensor, calibration: bool = True) -> dict[str, Tensor]:
    """One model's metrics (logits [N, classes]), or each member's (logits [K, N, classes]). loss = nll = plain
    cross-entropy, whatever the training objective: comparable across techniques (the training objective itself,
    e.g. smoothed cross-entropy, is logged as loss/data)."""
    metrics = diagnostics.prediction_metrics(logits, y, calibration=calibration)
    return {"loss": metrics["nll"], **metrics}


# ---------------------------------------------------------------------------------------------------------------------
# The end of a member's training: restore, final evaluation, files, summary


def finish_members(ending: list[int], model, data: DataSplits, regs: Regularization, stack: Stack) -> None:
    """Evaluate and record the members whose training ended this epoch (one evaluation pass for all of them).

    A failure while finishing one member (a plot that cannot be written, say) fails that member alone."""
    if not ending:
        return
    try:
        logits, last_weights, measured = final_predictions(ending, model, data, regs, stack)
    # e.g. out of memory in the shared evaluation: each ending member is failed, not lost
    except Exception as err:
        for k in ending:
            stack.members[k].status = "failed"
            record_failure(stack.members[k], err)
            regs.retire(k)
        return
    finished = {}
    for k in ending:
        member = stack.members[k]
        try:
            with diagnostics.one_thread():  # its metrics and diagnostics as in its lone run (see `evaluate`)
                finished[k] = finish(
                    k, member, model, data, regs, logits, last_weights[k], measured[k], stack
                )
        except Exception as err:
            member.status = "failed"
            record_failure(member, err)
        finally:
            regs.retire(k)
    if not stack.running():
        give_back_freed_memory()
    # the figures were drawn meanwhile (side by side, in a stack)
    for k, (summary, figures) in finished.items():
        member = stack.members[k]
        try:
            record_finished(member, summary, figures, quiet=member.job.parallel or len(stack.members) > 1)
        except Exception as err:
            member.status = "failed"
            record_failure(member, err)


def final_predictions(ending: list[int], model, data: DataSplits, regs: Regularization, stack: Stack):
    """Every split's logits after the ending members' final weights are restored (early stopping's best, an
    average), with their last weights kept from before the restore, and per member the summary's measurements of
    the models: the last model's test metrics where a technique restores others (test/last_*), and the sharpness
    of the final one."""
    batch = stack.trainer["eval_batch_size"]
    last_weights = {k: MemberView(model, k).state_dict() for k in ending}
    measured: dict[int, dict] = {k: {} for k in ending}
    restoring = [k for k in ending if regs.restores(k)]
    if restoring:
        # the models as training left them, to compare with the ones early stopping or an average puts back
        logits = predict_all(model, data.x_test, batch, len(stack.members))
        with diagnostics.one_thread():  # as in `evaluate`
            for k in restoring:
                measured[k] = {
                    f"test/last_{name}": v for name, v in as_floats(scores(logits[k], data.y_test)).items()
                }
    for k in restoring:
        regs.restore(k, MemberView(model, k))  # whatever ended training
    # sharpness on one evaluation batch of training samples (all of them for MNIST-1D), on the model's device
    inputs, labels = data.x_train[:batch].to(stack.device), data.y_train[:, :batch].to(stack.device)
    for k, value in diagnostics.sharpness(model, ending, inputs, labels).items():
        measured[k]["sharpness"] = value
    logits = {
        split: predict_all(model, x, batch, len(stack.members)) for split, (x, _) in data.splits().items()
    }
    return logits, last_weights, measured


def finish(
    k: int, member: Member, model, data: DataSplits, regs, logits: dict, last_weights, measured, stack
) -> tuple[dict, list]:
    """The member's summary and weight files; its figures handed to the stack's plotter (returns their Drawings)."""
    cfg, run_dir = member.cfg, member.run_dir
    labels = {"train": data.y_train[k], "val": data.y_val, "test": data.y_test}
    final = {split: as_floats(scores(logits[split][k], labels[split])) for split in logits}
    weights = member_weights(model, k)
    selection = regs.selection(k) or member.best  # best_epoch and best.pt, by the same monitor
    statistics = {**diagnostics.weight_statistics(weights), **diagnostics.spectral_norms(weights)}
    summary = build_summary(member, regs.names(k), final, statistics, selection)
    summary["device"] = str(stack.device)
    summary["threads"] = stack.threads  # trainer.threads as it ran (auto: 1 alone, more in a stack)
    summary.update(measured)  # test/last_*, sharpness
    summary.update(temperature_scaling(logits["val"][k], data.y_val, logits["test"][k], data.y_test))
    summary.update(regs.final_metrics(k, model, data.x_test, data.y_test, stack.trainer["eval_batch_size"]))
    if cfg["trainer"]["save_weights"]:
        save_weights(run_dir, last_weights, selection, regs.final_weights(k))
    figures = []
    if cfg["trainer"]["plots"]:
        figures = write_plots(stack.plotter, weights, logits["test"][k], data.y_test, member, summary)
    return summary, figures


def record_finished(member: Member, summary: dict, figures: list, quiet: bool) -> None:
    """Once its figures are drawn: the member's summary on disk (and W&B), its checkpoint removed, a few lines."""
    member.record.log_images([figure.result() for figure in figures])  # a figure that failed fails the member
    member.record.write_summary(summary)
    member.summary = summary
    checkpoint.remove(member.run_dir)  # the run is over: the resumable checkpoint has done its job
    print_summary(summary, member.run_dir, diagnostics.diagnose(member.history, summary), quiet=quiet)


def temperature_scaling(val_logits: Tensor, val_y: Tensor, test_logits: Tensor, test_y: Tensor) -> dict:
    """The post-hoc calibration reference (Guo et al. 2017): one temperature fitted on validation, applied to test."""
    if not torch.isfinite(val_logits).all():
        return {}
    fit = diagnostics.fit_temperature(val_logits, val_y)
    scaled = as_floats(diagnostics.prediction_metrics(test_logits / fit.temperature, test_y))
    return {
        "temperature": fit.temperature,
        "temperature_at_bound": fit.at_bound,  # T is a bound of the search, not an optimum
        "test/ts_nll": scaled["nll"],
        "test/ts_ece": scaled["ece"],
    }


def as_floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    """0-d tensors to floats with one host sync for all of them."""
    names = list(metrics)
    return dict(zip(names, torch.stack([metrics[k].float() for k in names]).tolist(), strict=True))


def as_floats_nested(metrics: dict[int, dict[str, Tensor]]) -> dict[int, dict[str, float]]:
    """Every member's 0-d tensors to floats, still with one host sync."""
    flat = as_floats({f"{k}\0{name}": v for k, values in metrics.items() for name, v in values.items()})
    nested: dict[int, dict[str, float]] = {k: {} for k in metrics}
    for key, value in flat.items():
        k, name = key.split("\0")
        nested[int(k)][name] = value
    return nested


def build_summary(member: Member, techniques: list[str], final: dict, weights: dict, selection) -> dict:
    summary = {
        "status": member.status,
        "error": None,
        "stop_reason": member.stop_reason,
        "epochs_run": member.epoch,
        "best_epoch": selection.best_epoch,
        "overfit_onset_epoch": diagnostics.overfit_onset_epoch(member.history),
        "fit_epoch": next((m["epoch"] for m in member.history if m["train/acc"] >= FIT_ACCURACY), None),
    }
    for split, metrics in final.items():
        summary.update({f"{split}/{k}": v for k, v in metrics.items()})
    summary["gap/val_acc"] = summary["train/acc"] - summary["val/acc"]
    summary["gap/val_loss"] = summary["val/loss"] - summary["train/loss"]
    summary["gap/test_acc"] = summary["train/acc"] - summary["test/acc"]
    summary["gap/test_loss"] = summary["test/loss"] - summary["train/loss"]
    summary.update(weights)
    summary.update(job_facts(member, techniques))
    summary["train_time_s"] = round(member.train_time_s, 4)
    summary["wall_time_s"] = round(time.perf_counter() - member.started, 4)
    return summary


def job_facts(member: Member, techniques: list[str]) -> dict:
    cfg = member.cfg
    return {
        "overrides": list(member.job.overrides),
        "hparams": {
            **flatten(cfg["regularizer"], "regularizer"),
            "model.name": cfg["model"]["name"],
            "dataset.name": cfg["dataset"]["name"],
            "dataset.n_train": cfg["dataset"]["n_train"],
            "dataset.label_noise": cfg["dataset"]["label_noise"],
            "optimizer.name": cfg["optimizer"]["name"],
            "optimizer.lr": cfg["optimizer"]["lr"],
        },
        "regularizers": techniques,
        "seed": cfg["trainer"]["seed"],
        **member.ran,
        "stack": member.job.stack or {"size": 1},  # the stack it trained in, and how many jobs trained in it
        "run_dir": str(member.run_dir),
    }


SUMMARY_METRICS = [f"{split}/{m}" for split in ("train", "val", "test") for m in ("loss", "acc")] + [
    "gap/val_acc",
    "gap/val_loss",
    "gap/test_acc",
    "gap/test_loss",
    "best_epoch",
    "overfit_onset_epoch",
    "test/nll",
    "test/ece",
    "test/confidence",
]


def fail_unfinished(stack: Stack, err: Exception) -> None:
    """An error in the shared step fails every member still training; finished members keep their records."""
    failed = stack.running()
    for _, m in failed:
        m.status = "failed"
        record_failure(m, err)
    if should_raise(stack.trainer["on_error"], stack.members[0].job):
        raise err
    print(
        f"[reglab] {len(failed)} job(s) failed: {type(err).__name__}: {err} (recorded in summary.json; the sweep goes on)"
    )


def record_failure(member: Member, err: Exception) -> dict:
    """A failed job's summary: the error, and the usual keys as null so that readers need no special case."""
    summary = {
        "status": "failed",
        "error": f"{type(err).__name__}: {err}",
        "stop_reason": None,
        "epochs_run": member.epoch,
        **dict.fromkeys(SUMMARY_METRICS),
        **job_facts(member, []),
        "wall_time_s": round(time.perf_counter() - member.started, 4),
    }
    write_summary(member.run_dir, summary, getattr(member.record, "wandb_run", None))
    member.summary = summary
    return summary


def save_weights(run_dir: Path, last_weights: dict, best: EarlyStopping, averaged: dict | None) -> None:
    """last.pt: the weights training ended with; best.pt: those of the best epoch (lowest val/loss, or early
    stopping's monitor when it is on); averaged.pt: the average a technique evaluates instead (SWA, EMA)."""
    torch.save(last_weights, run_dir / "last.pt")
    torch.save(best.best_state if best.best_state is not None else last_weights, run_dir / "best.pt")
    if averaged is not None:
        torch.save(averaged, run_dir / "averaged.pt")


def write_plots(plotter, weights, test_logits: Tensor, test_y: Tensor, member: Member, summary: dict) -> list:
    """curves.png, reliability.png and weights.png of the member (`diagnostics.Drawing`s). Tensors go to a drawing
    process as copies of their values (numpy arrays), not as shared memory."""
    run_dir = member.run_dir
    markers = {
        "best_epoch": summary["best_epoch"],
        "onset_epoch": summary["overfit_onset_epoch"],
        "stop_epoch": member.epoch if member.status == "early_stopped" else None,
    }
    values = lambda tensor: tensor.detach().cpu().numpy().copy()  # noqa: E731
    return [
        plotter.draw(draw_curves, member.history, run_dir / "curves.png", markers),
        plotter.draw(draw_reliability, values(test_logits), values(test_y), run_dir / "reliability.png"),
        plotter.draw(draw_weight_histogram, [values(w) for w in weights], run_dir / "weights.png"),
    ]


# the drawing functions a plotter's process calls (arrays in, the figure's path out)


def draw_curves(history: list[dict], path: Path, markers: dict) -> Path:
    return diagnostics.plot_curves(history, path, **markers)


def draw_reliability(logits, targets, path: Path) -> Path:
    return diagnostics.plot_reliability(torch.from_numpy(logits), torch.from_numpy(targets), path)


def draw_weight_histogram(weights: list, path: Path) -> Path:
    return diagnostics.plot_weight_histogram([torch.from_numpy(w) for w in weights], path)


def print_summary(summary: dict, run_dir: Path, diagnosis: list[str], quiet: bool) -> None:
    if quiet:
        return
    pct = lambda key: f"{100 * summary[key]:.1f}%"  # noqa: E731
    print(
        f"[reglab] {summary['status']} after {summary['epochs_run']} epochs (best epoch {summary['best_epoch']}): "
        f"train {pct('train/acc')}, val {pct('val/acc')}, test {pct('test/acc')}, "
        f"train-test gap {100 * summary['gap/test_acc']:.1f} points, test loss {summary['test/loss']:.3f}"
    )
    for line in diagnosis:
        print(f"[reglab] {line}")
    print(f"[reglab] files: {run_dir}")


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers


def flatten(node: dict, prefix: str) -> dict:
    """{'l2': {'weight_decay': 0.1}} -> {'regularizer.l2.weight_decay': 0.1}"""
    flat = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def run_name(overrides: list[str]) -> str:
    """A short readable name from the job's overrides: 'l2 weight_decay=0.001 seed=1'."""
    parts = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key.startswith(("hydra.", "hydra/", "logger", "trainer.resume", "dataset.root")):
            continue
        parts.append(value if key == "regularizer" else f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(parts) or "default"


def should_raise(on_error: str, job: Job) -> bool:
    return on_error == "raise" or (on_error == "auto" and not job.multirun)


def compiled(model: nn.Module) -> nn.Module:
    # dynamo's caches are per process: reset them so that jobs of one sweep never share (or exhaust) them
    torch._dynamo.reset()
    return torch.compile(model)


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Progress:
    """One updating line on a terminal; nothing when not on a terminal or inside a parallel launcher."""

    def __init__(self, mode: str, epochs: int, parallel: bool):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() and not parallel and not os.environ.get("CI") else "none"
        self.mode, self.epochs = mode, epochs

    def update(self, m: dict) -> None:
        if self.mode == "none":
            return
        line = (
            f"epoch {m['epoch']:>4}/{self.epochs}  train loss {m['train/loss']:.3f} acc {100 * m['train/acc']:5.1f}%"
            f"  val loss {m['val/loss']:.3f} acc {100 * m['val/acc']:5.1f}%"
        )
        print(f"\r{line}", end="", flush=True) if self.mode == "bar" else print(line, flush=True)

    def close(self) -> None:
        if self.mode == "bar":
            print()
