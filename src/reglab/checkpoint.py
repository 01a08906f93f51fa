"""Resumable checkpoints: everything needed to continue a run exactly where it stopped.

Every member of a stack has its own checkpoint in its own run directory, so that a job resumes whatever stack it
lands in next time (another `max_stack`, or alone). A checkpoint holds the member's weights and optimizer state,
its techniques' state (early stopping's best score and best weights), its epoch, its generators (batch order and
dropout masks) and the process-wide ones (torch's global generator for built-in dropout, CUDA's, Python's
`random` and NumPy's: nothing draws from the last two today, but the next technique that does must not silently
break exact resume), and the W&B run id. Each file is written atomically (write then rename), so a crash mid-write
never corrupts the last good one, and loaded with `weights_only=True`, so a foreign file cannot run code. On CPU a
resumed run ends with exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from reglab.errors import FINISHED, CheckpointError, override_key, run_only
from reglab.models import MemberView, find_block, member_parameters
from reglab.tracking import write_atomic

FORMAT = "reglab-checkpoint-2"
FILENAME = "checkpoint.pt"
SKIPPED_ON_RESUME = (*FINISHED, "diverged")  # a diverged run would diverge again: resuming a sweep skips it


def save_stack(stack, model, optimizer, regs) -> None:
    """A checkpoint for every member still training."""
    for k, member in stack.running():
        save(member, k, model, optimizer, regs)


def save(member, k: int, model, optimizer, regs) -> Path:
    payload = {
        "format": FORMAT,
        "epoch": member.epoch,
        "model": MemberView(model, k).state_dict(),
        "optimizer": member_optimizer_state(optimizer, model, k),
        "regularizers": regs.state_dict(k),
        "best_tracker": member.best.state_dict(),
        "rng_batches": member.batch_generator.get_state(),
        "rng_noise": member.noise_generator.get_state(),
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": json.dumps(random.getstate()),
        "rng_numpy": json.dumps(_numpy_state()),
        "train_time_s": member.train_time_s,
        "wandb_id": member.wandb_id,
        "overrides": list(member.job.overrides),  # whose checkpoint it is (`load_for_resume`)
    }
    path = member.run_dir / FILENAME
    write_atomic(path, lambda f: torch.save(payload, f))
    return path


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), pos, has_gauss, gauss]


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


def load_for_resume(member) -> dict | None:
    """The member's checkpoint when it resumes, with its epoch set; None for a fresh start (stale files removed).
    With resume=true and no checkpoint yet, the member starts fresh."""
    resume_from = member.cfg["trainer"]["resume"]
    path = member.run_dir / FILENAME if resume_from is True else Path(resume_from) if resume_from else None
    if path is None or (resume_from is True and not path.exists()):
        clear_stale_files(member.run_dir)
        return None
    payload = load(path)
    if resume_from is True and not written_by(payload, member.job.overrides):
        # a sweep re-run with another grid in the same directory: resuming would continue another job's training
        raise CheckpointError(
            f"trainer.resume: {path} does not fit this config: it is the checkpoint of another job "
            f"({' '.join(payload['overrides']) or 'no overrides'}), not of this one ({' '.join(member.job.overrides)})"
        )
    payload["path"] = str(path)
    member.epoch = payload["epoch"]
    return payload


def member_optimizer_state(optimizer, model, k: int) -> dict[str, dict]:
    """Member k's optimizer state by parameter name, as a lone run's optimizer holds it: from its own tensors, or
    its slice of the block that holds it (models.member_block)."""
    held = optimizer_tensors(optimizer)
    states = {}
    for name, view in member_parameters(model, k):
        block = find_block(model, name, k, held)
        tensor, index = block if block is not None else (view, None)
        state = optimizer.state.get(tensor)
        if state:
            states[name] = {key: _member_slice(value, tensor, index) for key, value in state.items()}
    return states


def optimizer_tensors(optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _member_slice(value, tensor, index):
    """A block's state entry shaped like the block holds one slice per member; the step count is the block's."""
    if index is None or not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
        return value
    return value[index].clone()


def restore_optimizer_state(optimizer, model, k: int, states: dict[str, dict]) -> None:
    """Put member k's optimizer state back: into its own tensors' state, or into its slice of its block's (made
    as the optimizer makes it: zeros the size of the block, the step count as saved)."""
    views, held = dict(member_parameters(model, k)), optimizer_tensors(optimizer)
    for name, state in states.items():
        block = find_block(model, name, k, held)
        if block is None:
            view = views[name]
            optimizer.state[view] = {key: _to(value, view.device) for key, value in state.items()}
            continue
        tensor, index = block
        tensor_state = optimizer.state[tensor]
        for key, value in state.items():
            # a member's slice of a per-element entry (moments, momentum buffer); a step count is the block's
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape == tensor.shape[1:]:
                if tensor_state.get(key) is None:
                    tensor_state[key] = torch.zeros_like(tensor)
                tensor_state[key][index].copy_(value)
            elif key not in tensor_state or value is not None:
                tensor_state[key] = _to(value, tensor.device)


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def restore(payload: dict, k: int, member, model, optimizer, regs) -> None:
    """Put member k back where its checkpoint left it."""
    path = Path(payload["path"])
    try:
        MemberView(model, k).load_state_dict(payload["model"])
        restore_optimizer_state(optimizer, model, k, payload["optimizer"])
        regs.load_state_dict(k, payload["regularizers"])
        member.best.load_state_dict(payload["best_tracker"])
    except (RuntimeError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(
            f"trainer.resume: {path} does not fit this config (another model, optimizer or regularizer?): "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from err
    member.batch_generator.set_state(payload["rng_batches"])
    member.noise_generator.set_state(payload["rng_noise"])
    torch.set_rng_state(payload["rng_torch"])
    if payload["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    random.setstate(_as_tuples(json.loads(payload["rng_python"])))
    kind, keys, pos, has_gauss, gauss = json.loads(payload["rng_numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    member.train_time_s = payload["train_time_s"]
    member.wandb_id = payload["wandb_id"]
    # a checkpoint from another directory brings its metrics along
    member.history = truncate_metrics(
        path.parent / "metrics.jsonl", member.run_dir / "metrics.jsonl", member.epoch
    )
    print(f"[reglab] resumed {member.run_dir} from {path} at epoch {member.epoch}", flush=True)


def _as_tuples(value):
    """JSON turned random.getstate()'s tuples into lists; setstate wants them back."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


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
    # atomic: a kill (or a second Ctrl-C) while it is rewritten must not lose the epochs before the checkpoint
    text = "".join(json.dumps(row) + "\n" for row in history)
    write_atomic(target, lambda f: f.write(text.encode()))
    return history


def finished_summary(run_dir: Path) -> dict | None:
    """The summary of a run that already finished in `run_dir`, or None."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return summary if summary.get("status") in SKIPPED_ON_RESUME else None


def skipped_on_resume(member) -> dict | None:
    """The summary of a job that resuming skips: it finished in its directory, and this job wrote it."""
    if not member.cfg["trainer"]["resume"]:
        return None
    done = finished_summary(member.run_dir)
    return done if done is not None and written_by(done, member.job.overrides) else None


def written_by(record: dict, overrides: list[str]) -> bool:
    """Whether a summary or checkpoint is this job's (a sweep re-run with another grid puts other jobs into the same
    numbered directories); one written before records kept their overrides is taken as the job's own."""
    return "overrides" not in record or job_key(record["overrides"]) == job_key(overrides)


def job_key(overrides: list[str]) -> frozenset[str]:
    """A job's identity in its sweep: its overrides in any order and as Hydra's sweeper writes them (1e-4 and 0.0001,
    true and True alike: a job resumed by hand is typed as the user likes), less those that only say how it runs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException:  # not Hydra's syntax: compared as written
        return frozenset(o for o in overrides if not run_only(override_key(o).split("@")[0]))
    return frozenset(
        f"{o.get_key_element()}={o.get_value_element_as_str()}"
        for o in parsed
        if not run_only(o.key_or_group)
    )


def clear_stale_files(run_dir: Path) -> None:
    """A fresh start in a directory that held an earlier attempt: drop its record so nothing mixes."""
    for name in ("metrics.jsonl", "summary.json", FILENAME):
        (Path(run_dir) / name).unlink(missing_ok=True)


def remove(run_dir: Path) -> None:
    (Path(run_dir) / FILENAME).unlink(missing_ok=True)
