"""Resumable checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model, optimizer, scheduler, the regularizers' state (early stopping's best score and best
weights), the RNG states (global torch for init/dropout, the batch-order generator), the epoch and the W&B run id.
It is written atomically (write then rename), so a crash mid-write never corrupts the last good one, and loaded with
`weights_only=True`, so a foreign file cannot run code. On CPU a resumed run ends with exactly the metrics of an
uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reglab.errors import FINISHED, CheckpointError
from reglab.tracking import write_atomic

FORMAT = "reglab-checkpoint-1"
FILENAME = "checkpoint.pt"
SKIPPED_ON_RESUME = (*FINISHED, "diverged")  # a diverged run would diverge again: resuming a sweep skips it


def save(state, model, optimizer, scheduler, regs) -> Path:
    payload = {
        "format": FORMAT,
        "epoch": state.epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "regularizers": regs.state_dict(),
        "best_tracker": state.best.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_batches": state.batch_generator.get_state(),
        "train_time_s": state.train_time_s,
        "wandb_id": state.wandb_id,
    }
    path = state.run_dir / FILENAME
    write_atomic(path, lambda f: torch.save(payload, f))
    return path


def load(path: Path) -> dict:
    """Load and check a checkpoint; any problem becomes one clear CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"trainer.resume: no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"trainer.resume: {path} is not a readable checkpoint (truncated or corrupted?): "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"trainer.resume: {path} is not a reglab checkpoint (expected format {FORMAT})")
    return payload


def resume(resume_from, run_dir: Path, model, optimizer, scheduler, regs, state) -> bool:
    """Restore a run from its checkpoint. With resume=true and no checkpoint yet, start fresh (returns False)."""
    path = run_dir / FILENAME if resume_from is True else Path(resume_from)
    if resume_from is True and not path.exists():
        clear_stale_files(run_dir)
        return False
    payload = load(path)
    try:
        restore(payload, model, optimizer, scheduler, regs, state)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"trainer.resume: {path} does not fit this config (another model, optimizer or regularizer?): "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from err
    # a checkpoint from another directory brings its metrics along
    state.history = truncate_metrics(path.parent / "metrics.jsonl", run_dir / "metrics.jsonl", state.epoch)
    print(f"[reglab] resumed from {path} at epoch {state.epoch}")
    return True


def restore(payload: dict, model, optimizer, scheduler, regs, state) -> None:
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    regs.load_state_dict(payload["regularizers"])
    state.best.load_state_dict(payload["best_tracker"])
    torch.set_rng_state(payload["rng_torch"])
    if payload["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    state.batch_generator.set_state(payload["rng_batches"])
    state.epoch = payload["epoch"]
    state.train_time_s = payload["train_time_s"]
    state.wandb_id = payload["wandb_id"]


def truncate_metrics(source: Path, target: Path, epochs: int) -> list[dict]:
    """Keep the first `epochs` complete lines of metrics.jsonl (later ones were logged after the checkpoint)."""
    history = []
    if source.exists():
        for line in source.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut off by the interruption
            if row.get("epoch", 0) > epochs:
                break
            history.append(row)
    target.write_text("".join(json.dumps(row) + "\n" for row in history))
    return history


def finished_summary(run_dir: Path) -> dict | None:
    """The summary of a run that already finished in `run_dir`, or None."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return summary if summary.get("status") in SKIPPED_ON_RESUME else None


def clear_stale_files(run_dir: Path) -> None:
    """A fresh start in a directory that held an earlier attempt: drop its record so nothing mixes."""
    for name in ("metrics.jsonl", "summary.json", FILENAME):
        (Path(run_dir) / name).unlink(missing_ok=True)


def remove(run_dir: Path) -> None:
    (Path(run_dir) / FILENAME).unlink(missing_ok=True)
