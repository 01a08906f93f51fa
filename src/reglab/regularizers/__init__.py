"""Regularization techniques, and how the training loop meets them.

Each technique lives in its own module (dropout, l1_l2, early_stopping, label_smoothing, ...) with a from-scratch
and a built-in version side by side, and declares itself there (base.py: its name, keys and strength, and the hooks
it uses). This file is only the glue: it finds the techniques (`technique_classes`) and fans every hook out over
those a stack uses (`Regularization`), so `regularizer=[l2,dropout,label_smoothing,mixup]` needs no special case
anywhere, and the loop never names a technique. No global state: everything lives on these objects.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from reglab.errors import ConfigError
from reglab.regularizers.base import Site, Targets, Technique
from reglab.regularizers.dropout import DropoutPlan

if TYPE_CHECKING:
    from reglab.models import MemberView
    from reglab.regularizers.early_stopping import EarlyStopping


@cache
def technique_classes() -> dict[str, type[Technique]]:
    """Every technique of this package by name, in hook order: each module is imported and its `Technique`
    subclasses with a name collected, so a new technique is one new file."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found = [cls for cls in _subclasses(Technique) if cls.name]
    for cls in found:
        twins = [other.__module__ for other in found if other.name == cls.name]
        if len(twins) > 1:
            raise TypeError(f"two techniques are named {cls.name!r}: in {' and '.join(twins)}")
    return {cls.name: cls for cls in sorted(found, key=lambda cls: (cls.order, cls.name))}


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


class Regularization:
    """All techniques of a stack; each method fans one hook out over them."""

    def __init__(self, techniques: list[Technique], members: int):
        self.techniques, self.size = techniques, members

    def names(self, member: int) -> list[str]:
        """The techniques member k uses, in a fixed order."""
        return [t.name for t in self.techniques if t.settings[member] is not None]

    def dropout_plans(self) -> list[DropoutPlan]:
        plans = []
        for k in range(self.size):
            plans.append(
                next((p for t in self.techniques if (p := t.dropout_plan(k)) is not None), DropoutPlan())
            )
        return plans

    def model_layers(self, site: Site, generators: list[torch.Generator]) -> list[nn.Module]:
        """The techniques' own layers at `site` of the network (models.py asks at every site), in hook order."""
        return [layer for t in self.techniques if (layer := t.model_layer(site, generators)) is not None]

    def setup(self, model: nn.Module) -> None:
        for t in self.techniques:
            t.setup(model)

    def optimizer_groups(self, member: int) -> list[tuple[list[Tensor], dict]]:
        return [group for t in self.techniques for group in t.optimizer_groups(member)]

    def group_settings(self, member: int) -> dict:
        return {key: value for t in self.techniques for key, value in t.group_settings(member).items()}

    def learning_rate(self, group: dict, plan) -> float:
        """Group `group`'s rate for its next epoch: a technique's (SWA), else the schedule's `plan(epoch)`."""
        rates = (rate for t in self.techniques if (rate := t.learning_rate(group, plan)) is not None)
        return next(rates, plan(group["epoch"]))

    def batch(self, x: Tensor, targets: Targets) -> Tensor:
        """The inputs the model sees; each technique in turn may change members' inputs and targets."""
        for t in self.techniques:
            x = t.batch(x, targets)
        return x

    def data_loss(self, logits: Tensor, targets: Targets) -> Tensor:
        """Each member's mean cross-entropy over its batch [K] against its targets, then whatever the techniques
        add to it."""
        loss = targets.cross_entropy(logits)
        for t in self.techniques:
            loss = t.data_loss(logits, targets.labels, loss)
        return loss

    def penalty(self) -> Tensor | None:
        """Sum of the per-member penalties [K], or None when no technique adds one (the step then skips the add)."""
        terms = [term for t in self.techniques if (term := t.penalty()) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    @property
    def second_pass(self) -> bool:
        """Whether a technique may re-run a batch (`refine_gradients`): the loop then keeps its dropout noise."""
        return any(t.second_pass and t.members() for t in self.techniques)

    def refine_gradients(self, recompute) -> None:
        for t in self.techniques:
            t.refine_gradients(recompute)

    def before_step(self, lrs: list[float]) -> None:
        for t in self.techniques:
            t.before_step(lrs)

    def after_step(self, lrs: list[float]) -> None:
        with torch.no_grad():
            for t in self.techniques:
                t.after_step(lrs)

    def end_epoch(self, member: int, metrics: dict[str, float], epoch: int, model: MemberView) -> bool:
        stops = [t.end_epoch(member, metrics, epoch, model) for t in self.techniques]
        return any(stops)

    def selection(self, member: int) -> EarlyStopping | None:
        return next((s for t in self.techniques if (s := t.selection(member)) is not None), None)

    def restores(self, member: int) -> bool:
        """Whether member k ends with other weights than training left it (early stopping's best, an average)."""
        return self.selection(member) is not None or self.final_weights(member) is not None

    def restore(self, member: int, model: MemberView) -> None:
        """Load the weights member k is evaluated with: early stopping's best, then (overriding them) an average."""
        if (selection := self.selection(member)) is not None:
            selection.restore(model)
        if (weights := self.final_weights(member)) is not None:
            model.load_state_dict(weights)

    def final_weights(self, member: int) -> dict[str, Tensor] | None:
        return next((w for t in self.techniques if (w := t.final_weights(member)) is not None), None)

    def retire(self, member: int) -> None:
        for t in self.techniques:
            t.retire(member)

    def describe(self, member: int) -> list[str]:
        return [text for t in self.techniques if (text := t.describe(member))]

    def final_metrics(self, member: int, model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> dict:
        metrics: dict = {}
        for t in self.techniques:
            metrics.update(t.final_metrics(member, model, x, y, batch_size))
        return metrics

    def state_dict(self, member: int) -> dict:
        return {t.name: t.state_dict(member) for t in self.techniques}

    def load_state_dict(self, member: int, state: dict) -> None:
        for t in self.techniques:
            t.load_state_dict(member, state.get(t.name, {}))


def build_regularization(nodes: list[dict], seeds: list[int] | None = None) -> Regularization:
    """One `Technique` per technique that any member's `regularizer` config node names, in hook order; `seeds`
    are the members' trainer.seed values."""
    classes = technique_classes()
    for node in nodes:
        unknown = [name for name in node if name not in classes]
        if unknown:
            raise ConfigError("regularizer", unknown[0], f"one of {', '.join(classes)}")
    techniques = [
        cls([dict(node[name]) if name in node else None for node in nodes], seeds)
        for name, cls in classes.items()
        if any(name in node for node in nodes)
    ]
    return Regularization(techniques, len(nodes))
