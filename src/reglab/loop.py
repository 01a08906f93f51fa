"""The training loop: set-up, data, model, optimizer, epochs, evaluation, record. Read it top to bottom.

`train(cfg, run_dir, job)` runs one configuration and returns the validation objective (the evaluated model's
val/loss), so that Optuna-style sweepers can minimize it. It knows Hydra only through the plain `cfg` dict and the
`Job` facts the entrypoint hands over, and regularization only through the hooks of `reglab.regularizers`.

Speed (small models are overhead-bound, so the loop's own overhead is the cost): the data live on the training
device and batches come from `randperm` indexing; the step never syncs with the host (losses are stacked and read
once per epoch); evaluation is one large-batch pass under `inference_mode`, from which every diagnostic is computed.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from reglab import checkpoint, diagnostics
from reglab.data import DataSplits, load_dataset, shift_and_flip
from reglab.errors import BAD_INPUT, FINISHED
from reglab.models import build_model
from reglab.regularizers import Regularization, build_regularization
from reglab.regularizers.early_stopping import EarlyStopping
from reglab.tracking import RunRecord, start_wandb, write_summary

FIT_ACCURACY = 0.99  # `fit_epoch`: the first epoch with this training accuracy (how fast a model memorizes)


@dataclass
class Job:
    """What the entrypoint knows about this job beyond its config."""

    overrides: list[str] = field(default_factory=list)
    group: str | None = None  # the sweep's name; W&B groups a sweep's runs by it
    multirun: bool = False
    parallel: bool = False  # started by a parallel launcher (joblib, submitit): stay quiet


class Interrupted(Exception):
    """SIGTERM, SIGUSR2 or Ctrl-C arrived; a resumable checkpoint was written."""


# ---------------------------------------------------------------------------------------------------------------------
# One run


def train(cfg: dict, run_dir: Path, job: Job) -> float:
    """Train one configuration in `run_dir`; returns the evaluated model's val/loss (NaN when the run failed)."""
    state = TrainState(cfg=cfg, run_dir=Path(run_dir), job=job)
    if cfg["trainer"]["resume"] and (done := checkpoint.finished_summary(state.run_dir)):
        print(f"[reglab] {state.run_dir} already finished ({done['status']}): skipped")
        return objective(done)
    record = None
    try:
        model, data, optimizer, scheduler, regs = prepare(state)
        record = RunRecord(state.run_dir, start_wandb_for(state, regs), log_images=log_plots(cfg))
        with stop_on_signals(state):
            fit(model, data, optimizer, scheduler, regs, state, record)
        return objective(finish(model, data, regs, state, record))
    except (*BAD_INPUT, Interrupted):
        raise  # bad input is the entrypoint's to report; an interrupted run has its checkpoint
    except Exception as err:
        state.status = "failed"
        summary = failure_summary(state, err)
        write_summary(state.run_dir, summary, getattr(record, "wandb_run", None))
        if should_raise(cfg["trainer"]["on_error"], job):
            raise
        print(
            f"[reglab] job failed: {summary['error']} (recorded in {state.run_dir / 'summary.json'}; "
            "the sweep goes on)"
        )
        return math.nan
    finally:
        if record is not None:  # also after a second Ctrl-C: W&B runs are always finished
            # an interrupted run is not a failed one: it will be resumed into the same W&B run
            record.finish(failed=state.status not in FINISHED and not state.stop_requested)


def prepare(state: TrainState):
    """Process settings, data, regularizers, model, optimizer and scheduler; restored from a checkpoint on resume."""
    cfg = state.cfg
    state.device = setup_process(cfg["trainer"])
    host_train = cfg["trainer"]["loader"] == "dataloader"
    data = load_dataset(cfg["dataset"]).to(state.device, keep_train_on_host=host_train)
    regs = build_regularization(cfg["regularizer"])
    plan = regs.dropout_plan()
    model = build_model(cfg["model"], data.input_shape, data.num_classes, plan).to(state.device)
    regs.setup(model)
    optimizer = build_optimizer(
        cfg["optimizer"], model, regs, cfg["trainer"]["fused_optimizer"], state.device
    )
    scheduler = build_scheduler(cfg["trainer"], optimizer)
    state.best = EarlyStopping(monitor="val/loss", patience=cfg["trainer"]["epochs"] + 1, check_finite=False)
    state.batch_generator.manual_seed(cfg["trainer"]["seed"])  # the batch order; a resume restores its state
    if cfg["trainer"]["resume"]:
        checkpoint.resume(cfg["trainer"]["resume"], state.run_dir, model, optimizer, scheduler, regs, state)
    else:
        checkpoint.clear_stale_files(state.run_dir)
    return model, data, optimizer, scheduler, regs


def start_wandb_for(state: TrainState, regs: Regularization):
    run = start_wandb(
        state.cfg["logger"],
        run_dir=state.run_dir,
        name=run_name(state.job.overrides),
        group=state.job.group,
        job_type="+".join(regs.names) or "none",  # W&B filters and colours runs by technique
        config=flatten(state.cfg, ""),  # dotted keys: the same names W&B sweeps set, so they never collide
        tags=regs.names or ["none"],
        resume_id=state.wandb_id,
    )
    state.wandb_id = getattr(run, "id", None)
    return run


def log_plots(cfg: dict) -> bool:
    return cfg["logger"]["name"] == "wandb" and cfg["logger"]["wandb"]["log_plots"]


def objective(summary: dict) -> float:
    """What sweepers minimize: validation cross-entropy of the evaluated model (the same scale for every technique)."""
    value = summary.get("val/loss")
    return math.nan if value is None else value


@dataclass
class TrainState:
    """Everything that changes while training, and what a checkpoint must restore."""

    cfg: dict
    run_dir: Path
    job: Job
    device: torch.device = torch.device("cpu")
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)
    status: str = "running"
    stop_reason: str | None = None
    train_time_s: float = 0.0
    wandb_id: str | None = None
    batch_generator: torch.Generator = field(default_factory=torch.Generator)
    best: EarlyStopping | None = None  # tracks the best val/loss epoch for best.pt, never stops training
    stop_requested: str | None = None
    started: float = field(default_factory=time.perf_counter)  # wall_time_s counts from here


def setup_process(trainer: dict) -> torch.device:
    """Threads, denormals, seeds and device: the process-wide settings, all explicit in the config."""
    torch.set_num_threads(trainer["threads"])
    # tiny values (< 1.2e-38) become 0 instead of denormal floats, which CPUs compute slowly
    torch.set_flush_denormal(trainer["flush_denormal"])
    seed = trainer["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # weight init and dropout masks
    if trainer["device"] == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(trainer["device"])


def build_optimizer(
    opt: dict, model: nn.Module, regs: Regularization, fused: bool, device
) -> torch.optim.Optimizer:
    """The optimizer; built-in weight decay (coupled, or decoupled via AdamW) comes from the L2 technique."""
    from reglab.regularizers.l1_l2 import decay_parameter_groups

    weight_decay, decoupled = regs.optimizer_decay()
    l2 = regs.get("l2")
    exclude = getattr(l2, "exclude_bias_and_norm", True)
    groups = decay_parameter_groups(model, weight_decay, exclude) if weight_decay else model.parameters()
    common = dict(lr=opt["lr"], weight_decay=0.0)
    if fused and device.type in ("cuda", "cpu"):
        # one kernel for the whole update instead of several per tensor: ~1.3x faster steps here
        common["fused"] = True
    if opt["name"] == "sgd":
        return torch.optim.SGD(groups, momentum=opt["momentum"], nesterov=opt["nesterov"], **common)
    adam = torch.optim.AdamW if (opt["name"] == "adamw" or decoupled) else torch.optim.Adam
    return adam(groups, betas=tuple(opt["betas"]), eps=opt["eps"], **common)


def build_scheduler(trainer: dict, optimizer):
    if trainer["lr_schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=trainer["epochs"])
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The epochs


def fit(
    model, data: DataSplits, optimizer, scheduler, regs: Regularization, state: TrainState, record: RunRecord
):
    trainer = state.cfg["trainer"]
    progress = Progress(trainer["progress"], trainer["epochs"], state.job.parallel)
    precision = autocast(trainer["precision"], state.device)
    network = compiled(model) if trainer["compile"] else model  # same parameters; compiled forward
    while state.epoch < trainer["epochs"]:
        epoch = state.epoch + 1
        started = time.perf_counter()
        batches = shuffled_batches(
            data, trainer, state.cfg["dataset"]["augment"], state.batch_generator, state.device
        )
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        losses = train_one_epoch(network, batches, optimizer, regs, precision)
        if scheduler is not None:
            scheduler.step()
        state.train_time_s += time.perf_counter() - started
        metrics = epoch_metrics(network, data, regs, losses, lr, trainer["eval_batch_size"], epoch)
        metrics["time_s"] = round(time.perf_counter() - state.started, 4)
        state.history.append(metrics)
        record.log_epoch(metrics)
        progress.update(metrics)
        state.epoch = epoch
        if not math.isfinite(metrics["loss/total"]):
            state.status, state.stop_reason = "diverged", f"non-finite training loss at epoch {epoch}"
            break
        state.best.step(metrics["val/loss"], epoch, model=model)
        if regs.end_epoch(metrics, epoch, model):
            state.status, state.stop_reason = "early_stopped", _stop_reason(regs)
            break
        if state.stop_requested:
            checkpoint.save(state, model, optimizer, scheduler, regs)
            raise Interrupted(state.stop_requested)
        if trainer["checkpoint_every"] and epoch % trainer["checkpoint_every"] == 0:
            checkpoint.save(state, model, optimizer, scheduler, regs)
    progress.close()
    if state.status == "running":
        state.status = "completed"


def shuffled_batches(data: DataSplits, trainer: dict, augment: bool, generator: torch.Generator, device):
    """The training set in a fresh random order, as (x, y) batches on the training device.

    Fast path (`trainer.loader=tensors`): index the resident tensors with a `randperm`, no DataLoader, no workers.
    `trainer.loader=dataloader` draws the very same batches through a DataLoader (worker processes, pinned memory),
    for data that should stay in host memory; both paths train identically for the same seed.
    """
    order = torch.randperm(len(data.y_train), generator=generator)
    if trainer["loader"] == "tensors":
        order = order.to(data.x_train.device)
        source = ((data.x_train[idx], data.y_train[idx]) for idx in order.split(trainer["batch_size"]))
    else:
        dataset = torch.utils.data.TensorDataset(data.x_train, data.y_train)
        sampler = [idx.tolist() for idx in order.split(trainer["batch_size"])]
        source = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=trainer["num_workers"],
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # its own seed draw must not consume the global RNG (dropout masks)
        )
    for x, y in source:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield (shift_and_flip(x, generator) if augment else x), y


def train_one_epoch(model, batches, optimizer, regs: Regularization, precision):
    """One pass over the batches; returns the mean data loss and mean penalty (0-d tensors, no host sync)."""
    model.train()
    data_losses, penalties = [], []
    for x, y in batches:
        with precision:
            logits = model(x)
            data_loss = regs.data_loss(logits.float(), y)
        penalty = regs.penalty()
        loss = data_loss if penalty is None else data_loss + penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        regs.before_step(optimizer)
        optimizer.step()
        regs.after_step(optimizer)
        data_losses.append(data_loss.detach())
        if penalty is not None:
            penalties.append(penalty.detach())
    mean_data_loss = torch.stack(data_losses).mean()
    return mean_data_loss, torch.stack(penalties).mean() if penalties else torch.zeros_like(mean_data_loss)


def epoch_metrics(model, data: DataSplits, regs, losses, lr: float, eval_batch_size: int, epoch: int) -> dict:
    """Train and validation metrics from one eval-mode pass each (train in eval mode: dropout would distort it)."""
    data_loss, penalty = losses
    train = evaluate(model, data.x_train, data.y_train, eval_batch_size)
    val = evaluate(model, data.x_val, data.y_val, eval_batch_size)
    values = {
        "loss/data": data_loss,
        "loss/penalty": penalty,
        "loss/total": data_loss + penalty,
        **{f"train/{k}": v for k, v in train.items() if k in ("loss", "acc")},
        **{f"val/{k}": v for k, v in val.items()},
    }
    numbers = as_floats(values)
    return {
        "epoch": epoch,
        **numbers,
        "gap/val_loss": numbers["val/loss"] - numbers["train/loss"],
        "gap/val_acc": numbers["train/acc"] - numbers["val/acc"],
        **diagnostics.weight_statistics(model),
        "lr": lr,
    }


@torch.inference_mode()
def predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])


def evaluate(model, x: Tensor, y: Tensor, batch_size: int) -> dict[str, Tensor]:
    """loss (= nll), acc, ece, confidence: 0-d tensors, no host sync."""
    return scores(predict(model, x, batch_size), y)


@torch.inference_mode()
def scores(logits: Tensor, y: Tensor) -> dict[str, Tensor]:
    """loss = nll = plain cross-entropy, whatever the training objective: comparable across techniques (the
    training objective itself, e.g. smoothed cross-entropy, is logged as loss/data)."""
    metrics = diagnostics.prediction_metrics(logits, y)
    return {"loss": metrics["nll"], **metrics}


# ---------------------------------------------------------------------------------------------------------------------
# The end of a run: restore, final evaluation, files, summary


def finish(model, data: DataSplits, regs: Regularization, state: TrainState, record: RunRecord) -> dict:
    cfg, run_dir = state.cfg, state.run_dir
    batch = cfg["trainer"]["eval_batch_size"]
    last_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # before any restore
    last_model_test = {}
    if regs.get("early_stopping") is not None:
        # the model as training left it, to compare with the one early stopping restores
        last_test = as_floats(evaluate(model, *data.test, batch))
        last_model_test = {f"test/last_{k}": v for k, v in last_test.items()}
    regs.end_training(model)  # early stopping restores its best weights here, whatever ended training
    logits = {split: predict(model, x, batch) for split, (x, _) in data.splits().items()}
    final = {split: as_floats(scores(logits[split], y)) for split, (_, y) in data.splits().items()}
    summary = build_summary(state, regs, final, diagnostics.weight_statistics(model))
    summary.update(last_model_test)
    summary.update(temperature_scaling(logits["val"], data.y_val, logits["test"], data.y_test))
    summary.update(mc_dropout_metrics(model, data, regs))
    if cfg["trainer"]["save_weights"]:
        stopper = regs.get("early_stopping")  # best.pt holds the weights of `best_epoch`, by the same monitor
        save_weights(run_dir, last_weights, stopper.stopper if stopper is not None else state.best)
    plots = write_plots(model, logits["test"], data.y_test, state, summary) if cfg["trainer"]["plots"] else []
    record.log_images(plots)
    record.write_summary(summary)
    checkpoint.remove(run_dir)  # the run is over: the resumable checkpoint has done its job
    print_summary(summary, run_dir, diagnostics.diagnose(state.history, summary), quiet=state.job.parallel)
    return summary


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


def build_summary(state: TrainState, regs: Regularization, final: dict, weights: dict) -> dict:
    stopper = regs.get("early_stopping")
    best_epoch = stopper.stopper.best_epoch if stopper is not None else state.best.best_epoch
    summary = {
        "status": state.status,
        "error": None,
        "stop_reason": state.stop_reason,
        "epochs_run": state.epoch,
        "best_epoch": best_epoch,
        "overfit_onset_epoch": diagnostics.overfit_onset_epoch(state.history),
        "fit_epoch": next((m["epoch"] for m in state.history if m["train/acc"] >= FIT_ACCURACY), None),
    }
    for split, metrics in final.items():
        summary.update({f"{split}/{k}": v for k, v in metrics.items()})
    summary["gap/val_acc"] = summary["train/acc"] - summary["val/acc"]
    summary["gap/val_loss"] = summary["val/loss"] - summary["train/loss"]
    summary["gap/test_acc"] = summary["train/acc"] - summary["test/acc"]
    summary["gap/test_loss"] = summary["test/loss"] - summary["train/loss"]
    summary.update(weights)
    summary.update(job_facts(state, regs))
    summary["train_time_s"] = round(state.train_time_s, 4)
    summary["wall_time_s"] = round(time.perf_counter() - state.started, 4)
    return summary


def job_facts(state: TrainState, regs: Regularization | None) -> dict:
    cfg = state.cfg
    return {
        "overrides": list(state.job.overrides),
        "hparams": {
            **flatten(cfg["regularizer"], "regularizer"),
            "model.name": cfg["model"]["name"],
            "dataset.name": cfg["dataset"]["name"],
            "dataset.n_train": cfg["dataset"]["n_train"],
            "dataset.label_noise": cfg["dataset"]["label_noise"],
            "optimizer.name": cfg["optimizer"]["name"],
            "optimizer.lr": cfg["optimizer"]["lr"],
        },
        "regularizers": regs.names if regs is not None else [],
        "seed": state.cfg["trainer"]["seed"],
        "device": str(state.device),
        "run_dir": str(state.run_dir),
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


def failure_summary(state: TrainState, err: Exception) -> dict:
    """A failed job's summary: the error, and the usual keys as null so that readers need no special case."""
    return {
        "status": "failed",
        "error": f"{type(err).__name__}: {err}",
        "stop_reason": None,
        "epochs_run": state.epoch,
        **dict.fromkeys(SUMMARY_METRICS),
        **job_facts(state, None),
        "wall_time_s": round(time.perf_counter() - state.started, 4),
    }


def mc_dropout_metrics(model, data: DataSplits, regs: Regularization) -> dict:
    """Test metrics of Monte Carlo dropout predictions, when the dropout technique asks for them."""
    dropout = regs.get("dropout")
    if dropout is None or not dropout.mc_samples:
        return {}
    from reglab.regularizers.dropout import mc_predict

    probs, entropy = mc_predict(model, data.x_test, dropout.mc_samples)
    stats = diagnostics.prediction_metrics(probs.clamp_min(1e-12).log(), data.y_test)
    return {f"test/mc_{k}": v for k, v in as_floats({**stats, "entropy": entropy.mean()}).items()}


def save_weights(run_dir: Path, last_weights: dict, best: EarlyStopping) -> None:
    """last.pt: the weights training ended with; best.pt: those of the best epoch (lowest val/loss, or early
    stopping's monitor when it is on)."""
    torch.save(last_weights, run_dir / "last.pt")
    torch.save(best.best_state if best.best_state is not None else last_weights, run_dir / "best.pt")


def write_plots(model, test_logits: Tensor, test_y: Tensor, state: TrainState, summary: dict) -> list[Path]:
    run_dir = state.run_dir
    stop_epoch = state.epoch if state.status == "early_stopped" else None
    return [
        diagnostics.plot_curves(
            state.history,
            run_dir / "curves.png",
            best_epoch=summary["best_epoch"],
            onset_epoch=summary["overfit_onset_epoch"],
            stop_epoch=stop_epoch,
        ),
        diagnostics.plot_reliability(test_logits, test_y, run_dir / "reliability.png"),
        diagnostics.plot_weight_histogram(model, run_dir / "weights.png"),
    ]


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
        if key.startswith(("hydra.", "logger", "trainer.resume", "dataset.root")):
            continue
        parts.append(value if key == "regularizer" else f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(parts) or "default"


def should_raise(on_error: str, job: Job) -> bool:
    return on_error == "raise" or (on_error == "auto" and not job.multirun)


def _stop_reason(regs: Regularization) -> str | None:
    stopper = regs.get("early_stopping")
    return stopper.stopper.stop_reason if stopper is not None else None


def compiled(model: nn.Module) -> nn.Module:
    # dynamo's caches are per process: reset them so that jobs of one sweep never share (or exhaust) them
    torch._dynamo.reset()
    return torch.compile(model)


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def stop_on_signals(state: TrainState):
    """SIGTERM (a cluster's pre-emption notice), SIGUSR2 (SLURM's time-limit warning via submitit) and Ctrl-C
    finish the current epoch, checkpoint and stop."""

    def request_stop(signum, frame):
        if state.stop_requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        state.stop_requested = signal.Signals(signum).name

    previous = {}
    # SIGUSR2: what submitit/SLURM send `signal_delay_s` before a job's time limit
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        # only the main thread may set handlers (a launcher may run jobs in other threads): skip them there
        with contextlib.suppress(ValueError):
            previous[sig] = signal.signal(sig, request_stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
