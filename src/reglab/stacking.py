"""Which jobs of a sweep can train together as one stacked model, and in which stacks.

Jobs are compatible when their configs agree on everything but the keys a stack lets each member choose for itself
(`PER_MEMBER`): the seed, the optimizer's hyperparameters (not its kind), every technique's settings (and which
techniques are on), label noise, W&B settings and resuming. Model, data set and split, batch size, epochs, the
optimizer kind and the rest of the trainer must agree, because the members share one network shape, one batch
schedule and one optimizer.
"""

from __future__ import annotations

import json

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
    from reglab.regularizers import technique_classes

    techniques = technique_classes()
    second = any(techniques[name].second_pass for name in cfg.get("regularizer") or {} if name in techniques)
    return 2 if second else 1


def group_into_stacks(configs: dict[int, dict], max_stack: int) -> tuple[list[list[int]], list[str]]:
    """Job numbers grouped into stacks (in job order, at most `max_stack` each), and a line for every job that
    could not join the largest group, saying which setting kept it apart."""
    groups: dict[str, list[int]] = {}
    for idx, cfg in configs.items():
        groups.setdefault(json.dumps(shared_settings(cfg), sort_keys=True, default=str), []).append(idx)
    stacks = [jobs[i : i + max_stack] for jobs in groups.values() for i in range(0, len(jobs), max_stack)]
    largest = max(groups.values(), key=len) if groups else []
    reasons = []
    for jobs in groups.values():
        if jobs is largest:
            continue
        differs = first_difference(configs[largest[0]], configs[jobs[0]])
        reasons.append(f"jobs {jobs} train apart from job {largest[0]}'s stack: {differs}")
    return stacks, reasons


def first_difference(a: dict, b: dict) -> str:
    """The first setting in which two jobs differ, a group's option (model.name, ...) before its details."""
    mine, theirs = shared_settings(a), shared_settings(b)
    for key in sorted(set(mine) | set(theirs), key=lambda key: (not key.endswith(".name"), key)):
        if mine.get(key) != theirs.get(key):
            return f"{key}={theirs.get(key)!r} (not {mine.get(key)!r})"
    return "no difference"
