"""Weight averaging: stochastic weight averaging (SWA, Izmailov et al. 2018) and an exponential moving average (EMA).

Both keep, per member, a running average w̄ of its weights beside the weights w that training moves, and the
average is the model they produce: when training ends, member k is evaluated with w̄ (`final_weights`), so the
summary's test/*, val/* and train/* are the averaged model's, and test/last_* those of the last plain model
(early stopping's restored weights, if it is on too, are replaced by the average; best.pt stays its best epoch).

SWA (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better Generalization"): the equal average
of the weights at the end of every epoch from `start_epoch` on (epochs counted from 1, as metrics.jsonl does),

    w̄ ← w̄ + (w − w̄) / (n + 1),   n = epochs averaged so far (the first update copies w),

and from `start_epoch` on its own learning rate, as `torch.optim.swa_utils.SWALR` sets it when created just before
epoch s = start_epoch and stepped after every epoch: the j-th SWA epoch (j = 0, 1, ...) trains with

    lr_j = α_j · swa_lr + (1 − α_j) · lr₀,   α_j = a(min(1, j / anneal_epochs)),   a(t) = (1 − cos πt)/2 | t,

where lr₀ is the rate trainer.lr_schedule gives epoch s, and α_j = 1 when anneal_epochs = 0 (swa_lr at once).
`lr: null` keeps the schedule's rates. SWA finds a point near the centre of a wide, flat region that SGD's
iterates circle around; the paper's finding is that the average generalizes better than the final model.

EMA (Polyak averaging with exponential weights): after every optimizer step

    w̄ ← β · w̄ + (1 − β) · w   (the first step copies w),

an average over roughly the last 1/(1 − β) steps.

`impl=scratch` writes the updates as above; `impl=torch` calls the functions `torch.optim.swa_utils.AveragedModel`
itself averages with (`get_swa_multi_avg_fn`, `get_ema_multi_avg_fn`: `torch._foreach_lerp_`) on the member's own
tensors. tests/test_weight_averaging.py proves both equal to `AveragedModel` on the same sequence of weights and the
SWA rates equal to `SWALR`'s.

BatchNorm: an averaged network's batch-norm statistics are not the average's and must be recomputed with one pass
over the training data (`torch.optim.swa_utils.update_bn`). reglab's models have no batch-norm layers, so there is
nothing to recompute (update_bn leaves them unchanged: tested); a model that adds them needs that pass where
`final_weights` hands over the average.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn, get_swa_multi_avg_fn

from reglab.errors import ConfigError
from reglab.regularizers.base import Technique
from reglab.specs import IMPL, choice, integer, number, optional

ANNEAL = {"cos": lambda t: (1 - math.cos(math.pi * t)) / 2, "linear": lambda t: t}


def swa_update_(average: list[Tensor], weights: list[Tensor], averaged: int) -> None:
    """w̄ ← w̄ + (w − w̄)/(n + 1) in place, n = `averaged` (the number of weights in w̄ so far, >= 1)."""
    with torch.no_grad():
        for mean, w in zip(average, weights, strict=True):
            mean.add_((w - mean) / (averaged + 1))


def ema_update_(average: list[Tensor], weights: list[Tensor], decay: float) -> None:
    """w̄ ← β·w̄ + (1 − β)·w in place, β = `decay`."""
    with torch.no_grad():
        for mean, w in zip(average, weights, strict=True):
            mean.mul_(decay).add_(w, alpha=1 - decay)


def swa_learning_rate(epoch: int, start: int, swa_lr: float, lr0: float, anneal_epochs: int, strategy: str):
    """SWALR's rate for epoch `epoch` (counted from 0) when SWA starts with epoch `start` (counted from 0)."""
    j = epoch - start
    alpha = 1.0 if anneal_epochs == 0 else ANNEAL[strategy](min(1.0, j / anneal_epochs))
    return swa_lr * alpha + lr0 * (1 - alpha)


class WeightAverage(Technique):
    """Shared by SWA and EMA: per member a running average of its weights and how many updates it holds."""

    order = 90  # after_step after every technique that moves the weights (proximal L1, max-norm): they are averaged

    @classmethod
    def check(cls, settings, cfg):
        if {"swa", "ema"} <= set(cfg["regularizer"]):
            raise ConfigError(
                "regularizer",
                "[swa,ema]",
                "one weight average at a time, swa or ema (a run is evaluated with one averaged model)",
            )

    def setup(self, model):
        from reglab.models import member_parameters

        self.parameters = {k: member_parameters(model, k) for k in range(len(self.settings))}
        self.average: dict[int, list[Tensor]] = {}
        self.count = dict.fromkeys(self.members(), 0)

    def average_in(self, member: int) -> None:
        """Fold member k's current weights into its average."""
        weights = [p.detach() for _, p in self.parameters[member]]
        if self.count[member] == 0:
            self.average[member] = [w.clone() for w in weights]
        else:
            self.update(member, self.average[member], weights)
        self.count[member] += 1

    def update(self, member: int, average: list[Tensor], weights: list[Tensor]) -> None:
        raise NotImplementedError

    def final_weights(self, member):
        if not self.count.get(member):
            return None  # nothing averaged yet (e.g. stopped before start_epoch): the plain model stays
        names = [name for name, _ in self.parameters[member]]
        return dict(zip(names, self.average[member], strict=True))

    def final_metrics(self, member, model, x, y, batch_size):
        return {f"{self.name}/averaged": self.count[member]} if member in self.count else {}

    def state_dict(self, member):
        if member not in self.count:
            return {}
        return {"count": self.count[member], "average": self.average.get(member)}

    def load_state_dict(self, member, state):
        if member in self.count and state:
            self.count[member] = state["count"]
            if state["average"] is not None:
                device = self.parameters[member][0][1].device
                self.average[member] = [t.to(device) for t in state["average"]]


class SWA(WeightAverage):
    """Stochastic weight averaging: the equal average of the end-of-epoch weights from `start_epoch` on, with
    SWALR's learning rate."""

    name = "swa"
    keys = {
        "start_epoch": integer(1),
        "lr": optional(number(0, lo_open=True)),
        "anneal_epochs": integer(0),
        "anneal_strategy": choice(*ANNEAL),
        "impl": IMPL,
    }
    strength_key = "start_epoch"

    @classmethod
    def check(cls, settings, cfg):
        super().check(settings, cfg)
        epochs = cfg["trainer"]["epochs"]
        if settings["start_epoch"] > epochs:
            raise ConfigError(
                "regularizer.swa.start_epoch",
                settings["start_epoch"],
                f"an epoch <= trainer.epochs={epochs} (from it on the weights are averaged)",
            )

    def group_settings(self, member):
        s = self.settings[member]
        if s is None or s["lr"] is None:
            return {}
        anneal = (s["anneal_epochs"], s["anneal_strategy"])
        return {"swa_start": s["start_epoch"] - 1, "swa_lr": s["lr"], "swa_anneal": anneal}

    def learning_rate(self, group, plan):
        start = group.get("swa_start")
        if start is None or group["epoch"] < start:
            return None
        anneal_epochs, strategy = group["swa_anneal"]
        return swa_learning_rate(group["epoch"], start, group["swa_lr"], plan(start), anneal_epochs, strategy)

    def end_epoch(self, member, metrics, epoch, model):
        s = self.settings[member]
        if s is not None and epoch >= s["start_epoch"]:
            self.average_in(member)
        return False

    def update(self, member, average, weights):
        if self.settings[member]["impl"] == "torch":
            get_swa_multi_avg_fn()(average, weights, self.count[member])
        else:
            swa_update_(average, weights, self.count[member])

    def describe(self, member):
        s = self.settings[member]
        if s is None:
            return None
        if s["lr"] is None:
            rate = "the schedule's learning rate"
        elif s["anneal_epochs"] == 0:
            rate = f"learning rate {s['lr']:g} from then on"
        else:
            rate = f"learning rate annealed ({s['anneal_strategy']}) to {s['lr']:g} over {s['anneal_epochs']} epochs"
        return (
            f"swa: equal average of the weights at the end of every epoch from epoch {s['start_epoch']} on, "
            f"evaluated at the end; {rate} ({s['impl']})"
        )


class EMA(WeightAverage):
    """An exponential moving average of the weights, updated after every optimizer step."""

    name = "ema"
    step_cost = 0.4  # 14.4 ms a member and epoch against 10.4 without regularization
    keys = {"decay": number(0, 1, hi_open=True), "impl": IMPL}
    strength_key = "decay"

    def after_step(self, lrs):
        for k in self.members():
            self.average_in(k)

    def update(self, member, average, weights):
        decay = self.settings[member]["decay"]
        if self.settings[member]["impl"] == "torch":
            get_ema_multi_avg_fn(decay)(average, weights, None)
        else:
            ema_update_(average, weights, decay)

    def describe(self, member):
        s = self.settings[member]
        return s and (
            f"ema: w̄ ← β·w̄ + (1−β)·w after every step with β={s['decay']:g}, evaluated at the end ({s['impl']})"
        )
