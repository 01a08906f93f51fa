"""Regularization techniques, and how the training loop meets them.

Each technique lives in its own module (dropout, l1_l2, early_stopping, label_smoothing) with a from-scratch and a
built-in version side by side. This file is only the glue: it turns the `regularizer` config node into `Technique`
objects, and each technique uses one or more of the loop's few hook points:

    model        dropout_plan()        where dropout layers go                          (dropout)
    loss         data_loss, penalty()  what is minimized                                (label smoothing, L1, L2)
    optimizer    optimizer_decay()     the optimizer's built-in (coupled/decoupled) decay (L2, impl=torch)
    step         before_step()         between backward and optimizer.step              (L2 coupled/decoupled scratch)
                 after_step()          after optimizer.step                             (proximal L1, max-norm)
    epoch end    end_epoch()           may stop training                                (early stopping)
    training end end_training()        may restore the best weights                     (early stopping)

`Regularization` fans every hook out over the active techniques, so `regularizer=[l2,dropout,label_smoothing]`
needs no special case anywhere. Techniques keep no global state: everything lives on the objects built per run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.errors import ConfigError
from reglab.regularizers import dropout as dropout_lib
from reglab.regularizers import l1_l2
from reglab.regularizers.early_stopping import EarlyStopping
from reglab.regularizers.label_smoothing import label_smoothing_cross_entropy

TECHNIQUES = ("l1", "l2", "dropout", "early_stopping", "label_smoothing")


class Technique:
    """No-op hooks; each technique overrides the ones it needs."""

    name = "technique"

    def setup(self, model: nn.Module) -> None:
        """Called once the model exists (e.g. to pick the parameters to regularize)."""

    def dropout_plan(self):
        return None

    def data_loss(self) -> Callable[[Tensor, Tensor], Tensor] | None:
        return None

    def penalty(self) -> Tensor | None:
        return None

    def optimizer_decay(self) -> tuple[float, bool] | None:
        """(λ, decoupled) for the optimizer's built-in weight decay, or None."""
        return None

    def before_step(self, optimizer: torch.optim.Optimizer) -> None: ...

    def after_step(self, optimizer: torch.optim.Optimizer) -> None: ...

    def end_epoch(self, metrics: dict[str, float], epoch: int, model: nn.Module) -> bool:
        return False

    def end_training(self, model: nn.Module) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


class WeightNormTechnique(Technique):
    """Shared by L1 and L2: a strength λ, a mode, an impl, and the weights they act on (no biases/norms)."""

    def __init__(self, strength: float, mode: str, impl: str, exclude_bias_and_norm: bool = True):
        self.strength, self.mode, self.impl = strength, mode, impl
        self.exclude_bias_and_norm = exclude_bias_and_norm
        self.params: list[Tensor] = []

    def setup(self, model):
        self.params = l1_l2.decayed_parameters(model, self.exclude_bias_and_norm)


class L2(WeightNormTechnique):
    """L2 / weight decay in three modes (see l1_l2.py for the math and the λ/2 convention)."""

    name = "l2"

    def __init__(self, weight_decay: float, mode: str, impl: str, exclude_bias_and_norm: bool = True):
        super().__init__(weight_decay, mode, impl, exclude_bias_and_norm)

    def penalty(self):
        if self.mode != "penalty":
            return None
        squares = (
            l1_l2.l2_penalty(self.params) if self.impl == "scratch" else l1_l2.l2_penalty_torch(self.params)
        )
        return 0.5 * self.strength * squares  # λ/2·Σw²: its gradient λ·w matches SGD(weight_decay=λ)

    def optimizer_decay(self):
        if self.impl == "torch" and self.mode != "penalty":
            return self.strength, self.mode == "decoupled"
        return None

    def before_step(self, optimizer):
        if self.impl == "scratch" and self.mode == "coupled":
            l1_l2.coupled_weight_decay_(self.params, self.strength)  # grad += λ·w, as SGD/Adam do inside
        elif self.impl == "scratch" and self.mode == "decoupled":
            l1_l2.decoupled_weight_decay_(self.params, _current_lr(optimizer), self.strength)


class L1(WeightNormTechnique):
    """L1: subgradient (λ·Σ|w| in the loss) or proximal (soft-threshold by lr·λ after each step: exact zeros)."""

    name = "l1"

    def penalty(self):
        if self.mode != "subgradient":
            return None
        absolute = (
            l1_l2.l1_penalty(self.params) if self.impl == "scratch" else l1_l2.l1_penalty_torch(self.params)
        )
        return self.strength * absolute

    def after_step(self, optimizer):
        if self.mode == "proximal":
            # ISTA: after a gradient step of size lr, the prox of lr·λ·|w| is soft-thresholding by lr·λ. Exact only
            # after plain SGD (momentum 0): step + prox = one ISTA iteration on the batch. After a momentum or Adam
            # step it is a heuristic (l1_l2.py says which) that still gives exact zeros.
            threshold = _current_lr(optimizer) * self.strength
            shrink = l1_l2.proximal_l1_ if self.impl == "scratch" else l1_l2.proximal_l1_torch_
            shrink(self.params, threshold)


class Dropout(Technique):
    """Dropout layers in the model, and the optional max-norm constraint after each step."""

    name = "dropout"

    def __init__(
        self,
        p: float,
        input_p: float = 0.0,
        conv_p: float | None = None,
        conv_kind: str = "channel",
        max_norm: float | None = None,
        impl: str = "scratch",
        mc_samples: int = 0,
    ):
        self.p, self.input_p, self.conv_p, self.conv_kind = p, input_p, conv_p, conv_kind
        self.max_norm, self.impl, self.mc_samples = max_norm, impl, mc_samples
        self.model: nn.Module | None = None

    def setup(self, model):
        self.model = model

    def dropout_plan(self):
        from reglab.models import DropoutPlan

        conv_p = self.p if self.conv_p is None else self.conv_p
        return DropoutPlan(
            p=self.p, input_p=self.input_p, conv_p=conv_p, conv_kind=self.conv_kind, impl=self.impl
        )

    def after_step(self, optimizer):
        if self.max_norm is not None:
            dropout_lib.max_norm_(self.model, self.max_norm)


class LabelSmoothing(Technique):
    """Soft targets in the data loss."""

    name = "label_smoothing"

    def __init__(self, eps: float, variant: str = "uniform", impl: str = "scratch"):
        self.eps, self.variant, self.impl = eps, variant, impl

    def data_loss(self):
        if self.impl == "torch":
            return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=self.eps)
        return lambda logits, y: label_smoothing_cross_entropy(logits, y, self.eps, variant=self.variant)


class EarlyStoppingTechnique(Technique):
    """Stops training when the monitored metric stops improving; restores the best weights at the end."""

    name = "early_stopping"

    def __init__(self, **kwargs):
        self.stopper = EarlyStopping(**kwargs)

    def end_epoch(self, metrics, epoch, model):
        return self.stopper.step(metrics[self.stopper.monitor], epoch, model=model)

    def end_training(self, model):
        self.stopper.restore(model)

    def state_dict(self):
        return self.stopper.state_dict()

    def load_state_dict(self, state):
        self.stopper.load_state_dict(state)


BUILDERS = {
    "l1": L1,
    "l2": L2,
    "dropout": Dropout,
    "label_smoothing": LabelSmoothing,
    "early_stopping": EarlyStoppingTechnique,
}


class Regularization:
    """All active techniques; each method fans one hook out over them."""

    def __init__(self, techniques: list[Technique]):
        self.techniques = techniques
        self.names = [t.name for t in techniques]
        self._penalties = [t for t in techniques if type(t).penalty is not Technique.penalty]
        self._before = [t for t in techniques if type(t).before_step is not Technique.before_step]
        self._after = [t for t in techniques if type(t).after_step is not Technique.after_step]
        losses = [t.data_loss() for t in techniques if t.data_loss() is not None]
        if len(losses) > 1:
            raise ConfigError("regularizer", self.names, "at most one technique that replaces the data loss")
        self.data_loss: Callable[[Tensor, Tensor], Tensor] = losses[0] if losses else F.cross_entropy

    def get(self, name: str) -> Technique | None:
        return next((t for t in self.techniques if t.name == name), None)

    def dropout_plan(self):
        from reglab.models import DropoutPlan

        plans = [t.dropout_plan() for t in self.techniques if t.dropout_plan() is not None]
        return plans[0] if plans else DropoutPlan()

    def setup(self, model: nn.Module) -> None:
        for t in self.techniques:
            t.setup(model)

    def optimizer_decay(self) -> tuple[float, bool]:
        """(λ, decoupled) for the optimizer; (0, False) when no technique asks for built-in decay."""
        decays = [t.optimizer_decay() for t in self.techniques if t.optimizer_decay() is not None]
        return decays[0] if decays else (0.0, False)

    def penalty(self) -> Tensor | None:
        """Sum of the loss penalties, or None when no technique adds one (the step then skips the add)."""
        terms = [term for t in self._penalties if (term := t.penalty()) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def before_step(self, optimizer) -> None:
        for t in self._before:
            t.before_step(optimizer)

    def after_step(self, optimizer) -> None:
        with torch.no_grad():
            for t in self._after:
                t.after_step(optimizer)

    def end_epoch(self, metrics: dict[str, float], epoch: int, model: nn.Module) -> bool:
        stops = [t.end_epoch(metrics, epoch, model) for t in self.techniques]
        return any(stops)

    def end_training(self, model: nn.Module) -> None:
        for t in self.techniques:
            t.end_training(model)

    def state_dict(self) -> dict:
        return {t.name: t.state_dict() for t in self.techniques}

    def load_state_dict(self, state: dict) -> None:
        for t in self.techniques:
            t.load_state_dict(state.get(t.name, {}))


def build_regularization(cfg) -> Regularization:
    """One `Technique` per sub-node of the `regularizer` config node, in a fixed order."""
    unknown = [name for name in cfg if name not in BUILDERS]
    if unknown:
        raise ConfigError("regularizer", unknown[0], f"one of {', '.join(TECHNIQUES)}")
    return Regularization([BUILDERS[name](**cfg[name]) for name in TECHNIQUES if name in cfg])
