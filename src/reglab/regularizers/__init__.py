"""Regularization techniques, and how the training loop meets them.

Each technique lives in its own module (dropout, l1_l2, early_stopping, label_smoothing) with a from-scratch and a
built-in version side by side. This file is only the glue. The loop trains a *stack* of K members (one job each,
K = 1 for an ordinary run), and every technique holds one setting per member: the member's config node, or None
where that member does not use the technique (a technique that is off is that member's zero strength, and leaves
its arithmetic untouched). Each technique uses one or more of the loop's few hook points:

    model        dropout_plan(k)       where member k's dropout layers go                 (dropout)
    loss         data_loss(...)        the per-member data loss                           (label smoothing)
                 penalty()             per-member penalty added to it                     (L1, L2)
    optimizer    optimizer_groups(k)   member k's parameters with settings of their own   (L2 impl=torch: weight_decay)
    step         before_step(lrs)      between backward and optimizer.step                (L2 coupled/decoupled scratch)
                 after_step(lrs)       after optimizer.step                               (proximal L1, max-norm)
    epoch end    end_epoch(k, ...)     may stop member k                                  (early stopping)
    training end selection(k)          which epoch member k keeps, and its weights        (early stopping)
                 final_metrics(k, ...) test metrics of its own                            (MC dropout)
    record       describe(k)           what it does to member k, in words                 (L1, L2)

`Regularization` fans every hook out over the techniques, so `regularizer=[l2,dropout,label_smoothing]` needs no
special case anywhere, and the loop never names a technique. No global state: everything lives on these objects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.errors import ConfigError
from reglab.regularizers import dropout as dropout_lib
from reglab.regularizers import l1_l2
from reglab.regularizers.dropout import DropoutPlan
from reglab.regularizers.early_stopping import EarlyStopping
from reglab.regularizers.label_smoothing import label_smoothing_cross_entropy

if TYPE_CHECKING:
    from reglab.models import MemberView

TECHNIQUES = ("l1", "l2", "dropout", "early_stopping", "label_smoothing")


class Technique:
    """No-op hooks; each technique overrides the ones it needs. `settings[k]` is member k's config node or None."""

    name = "technique"

    def __init__(self, settings: list[dict | None]):
        self.settings = settings

    def members(self) -> list[int]:
        """The members that use this technique (and have not finished training)."""
        return [k for k, s in enumerate(self.settings) if s is not None]

    def retire(self, member: int) -> None:
        """Member `member` has finished: no hook touches it again."""
        self.settings[member] = None

    def setup(self, model: nn.Module) -> None:
        """Called once the model exists (e.g. to pick the parameters to regularize)."""

    def dropout_plan(self, member: int) -> DropoutPlan | None:
        return None

    def data_loss(self, logits: Tensor, y: Tensor, loss: Tensor) -> Tensor:
        """Per-member data loss [K] from logits [K, B, C] and labels [K, B], given the loss so far."""
        return loss

    def penalty(self) -> Tensor | None:
        """Per-member penalty [K] added to the data loss, or None."""
        return None

    def optimizer_groups(self, member: int) -> list[tuple[list[Tensor], dict]]:
        """(parameters, settings) of member k that the optimizer should treat apart, e.g. its decayed weights with
        the optimizer's own weight_decay; every other parameter gets the optimizer's plain settings."""
        return []

    def before_step(self, lrs: list[float]) -> None: ...

    def after_step(self, lrs: list[float]) -> None: ...

    def end_epoch(self, member: int, metrics: dict[str, float], epoch: int, model: MemberView) -> bool:
        return False

    def selection(self, member: int) -> EarlyStopping | None:
        """The tracker that picks member k's best epoch and the weights it ends with, if this technique decides."""
        return None

    def describe(self, member: int) -> str | None:
        """What this technique actually does to member k, in words (summary.json, W&B, the run's first line)."""
        return None

    def final_metrics(self, member: int, model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> dict:
        """Test metrics of its own for member k's final model (e.g. Monte Carlo dropout's)."""
        return {}

    def state_dict(self, member: int) -> dict:
        return {}

    def load_state_dict(self, member: int, state: dict) -> None: ...


class WeightNormTechnique(Technique):
    """Shared by L1 and L2: per member a strength λ, a mode, an impl, and the weights they act on."""

    strength_key = "strength"

    def setup(self, model):
        from reglab.models import member_parameters

        self.params = {
            k: l1_l2.member_decay_split(model, k, self.settings[k]["exclude_bias_and_norm"])[0]
            for k in self.members()
        }
        # for the penalties: the stacked parameters, and per member whether each one counts (biases only when
        # not excluded), as 1.0 / 0.0 factors
        self.stacked = [param for _, param in model.named_parameters()]
        decayed = {k: {id(p) for p in self.params[k]} for k in self.members()}
        self.counts = [
            torch.tensor(
                [float(k in decayed and id(view) in decayed[k]) for k, (_, view) in enumerate(views)]
            )
            for views in zip(*(member_parameters(model, k) for k in range(len(self.settings))), strict=True)
        ]

    def strength(self, member: int) -> float:
        return self.settings[member][self.strength_key]

    def in_mode(self, mode: str, impl: str | None = None) -> list[int]:
        return [
            k
            for k in self.members()
            if self.settings[k]["mode"] == mode and (impl is None or self.settings[k]["impl"] == impl)
        ]

    def penalties(self, mode: str, scratch, builtin, scale: float) -> Tensor | None:
        """scale·λ_k·(the penalty of member k's weights) for every member k in `mode`, 0 for the others: one
        vectorized pass over the stacked weights per implementation in use."""
        members = self.in_mode(mode)
        if not members:
            return None
        device = self.stacked[0].device
        totals = torch.zeros(len(self.settings), device=device)
        for impl, penalty in (("scratch", scratch), ("torch", builtin)):
            users = [k for k in members if self.settings[k]["impl"] == impl]
            if users:
                per_member = sum(
                    penalty([param]) * count.to(device)
                    for param, count in zip(self.stacked, self.counts, strict=True)
                )
                totals = torch.where(self.mask(users, device), per_member, totals)
        strengths = torch.tensor(
            [self.strength(k) if k in members else 0.0 for k in range(len(self.settings))]
        )
        return scale * strengths.to(device) * totals

    def mask(self, members: list[int], device) -> Tensor:
        return torch.tensor([k in members for k in range(len(self.settings))], device=device)


class L2(WeightNormTechnique):
    """L2 / weight decay in three modes (see l1_l2.py for the math and the λ/2 convention)."""

    name = "l2"
    strength_key = "weight_decay"

    def penalty(self):
        # λ/2·Σw²: its gradient λ·w matches SGD(weight_decay=λ)
        return self.penalties("penalty", l1_l2.l2_penalty, l1_l2.l2_penalty_torch, scale=0.5)

    def optimizer_groups(self, member):
        # impl=torch decays through the optimizer's own weight_decay, on the same weights the scratch modes decay
        # (biases and norm layers left out when exclude_bias_and_norm): they get a parameter group of their own
        setting = self.settings[member]
        if setting is None or setting["impl"] != "torch" or setting["mode"] == "penalty":
            return []
        decay = {
            "weight_decay": setting["weight_decay"],
            "decoupled_weight_decay": setting["mode"] == "decoupled",
        }
        return [(self.params[member], decay)]

    def describe(self, member):
        s = self.settings[member]
        if s is None:
            return None
        how = {
            "penalty": f"λ/2·Σw² with λ={s['weight_decay']:g} added to the loss",
            "coupled": f"coupled weight decay λ={s['weight_decay']:g}: grad += λ·w",
            "decoupled": f"decoupled weight decay λ={s['weight_decay']:g}: w -= lr·λ·w",
        }[s["mode"]]
        by = "the optimizer's own weight_decay" if self.optimizer_groups(member) else s["impl"]
        return f"l2 {how} ({by}; biases {'excluded' if s['exclude_bias_and_norm'] else 'included'})"

    def before_step(self, lrs):
        for k in self.in_mode("coupled", "scratch"):
            # grad += λ·w, as SGD/Adam do inside
            l1_l2.coupled_weight_decay_(self.params[k], self.strength(k))
        for k in self.in_mode("decoupled", "scratch"):
            l1_l2.decoupled_weight_decay_(self.params[k], lrs[k], self.strength(k))


class L1(WeightNormTechnique):
    """L1: subgradient (λ·Σ|w| in the loss) or proximal (soft-threshold by lr·λ after each step: exact zeros)."""

    name = "l1"

    def penalty(self):
        return self.penalties("subgradient", l1_l2.l1_penalty, l1_l2.l1_penalty_torch, scale=1.0)

    def describe(self, member):
        s = self.settings[member]
        if s is None:
            return None
        if s["mode"] == "subgradient":
            return f"l1 λ·Σ|w| with λ={s['strength']:g} added to the loss ({s['impl']})"
        return f"l1 proximal: soft-threshold by lr·λ, λ={s['strength']:g}, after every step ({s['impl']})"

    def after_step(self, lrs):
        for k in self.in_mode("proximal"):
            # ISTA: after a gradient step of size lr, the prox of lr·λ·|w| is soft-thresholding by lr·λ. Exact only
            # after plain SGD (momentum 0): step + prox = one ISTA iteration on the batch. After a momentum or Adam
            # step it is a heuristic (l1_l2.py says which) that still gives exact zeros.
            shrink = l1_l2.proximal_l1_ if self.settings[k]["impl"] == "scratch" else l1_l2.proximal_l1_torch_
            shrink(self.params[k], lrs[k] * self.strength(k))


class Dropout(Technique):
    """Dropout layers in the model, and the optional max-norm constraint after each step."""

    name = "dropout"

    def dropout_plan(self, member):
        s = self.settings[member]
        if s is None:
            return None
        conv_p = s["p"] if s["conv_p"] is None else s["conv_p"]
        return DropoutPlan(
            p=s["p"], input_p=s["input_p"], conv_p=conv_p, conv_kind=s["conv_kind"], impl=s["impl"]
        )

    def setup(self, model):
        from reglab.models import member_weights  # models.py builds its dropout layers from this package

        self.constrained = {
            k: member_weights(model, k, output_layer=self.settings[k]["max_norm_output"])
            for k in self.members()
            if self.settings[k]["max_norm"] is not None
        }

    def final_metrics(self, member, model, x, y, batch_size):
        """Test metrics of Monte Carlo dropout predictions, when member k asks for them (`mc_samples`)."""
        s = self.settings[member]
        if s is None or not s["mc_samples"]:
            return {}
        from reglab.diagnostics import prediction_metrics

        probs, entropy = dropout_lib.mc_predict(
            model, x, s["mc_samples"], batch_size, len(self.settings), member
        )
        metrics = {
            **prediction_metrics(probs[member].clamp_min(1e-12).log(), y),
            "entropy": entropy[member].mean(),
        }
        return {f"test/mc_{name}": value.item() for name, value in metrics.items()}

    def after_step(self, lrs):
        for k, weights in self.constrained.items():
            if self.settings[k] is not None:
                dropout_lib.max_norm_(weights, self.settings[k]["max_norm"])


class LabelSmoothing(Technique):
    """Soft targets in the data loss, per member: ε and the variant; members without it keep plain cross-entropy."""

    name = "label_smoothing"

    def data_loss(self, logits, y, loss):
        smoothed = list(loss.unbind())
        for k in self.members():
            s = self.settings[k]
            if s["impl"] == "torch":
                smoothed[k] = F.cross_entropy(logits[k], y[k], label_smoothing=s["eps"])
            else:
                smoothed[k] = label_smoothing_cross_entropy(logits[k], y[k], s["eps"], variant=s["variant"])
        return torch.stack(smoothed)


class EarlyStoppingTechnique(Technique):
    """Stops a member when its monitored metric stops improving; restores its best weights at the end."""

    name = "early_stopping"

    def __init__(self, settings):
        super().__init__(settings)
        self.stoppers = {k: EarlyStopping(**s) for k, s in enumerate(settings) if s is not None}

    def end_epoch(self, member, metrics, epoch, model):
        stopper = self.stoppers.get(member)
        return stopper is not None and stopper.step(metrics[stopper.monitor], epoch, model=model)

    def selection(self, member):
        return self.stoppers.get(member)

    def state_dict(self, member):
        return self.stoppers[member].state_dict() if member in self.stoppers else {}

    def load_state_dict(self, member, state):
        if member in self.stoppers:
            self.stoppers[member].load_state_dict(state)


BUILDERS = {
    "l1": L1,
    "l2": L2,
    "dropout": Dropout,
    "label_smoothing": LabelSmoothing,
    "early_stopping": EarlyStoppingTechnique,
}


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

    def setup(self, model: nn.Module) -> None:
        for t in self.techniques:
            t.setup(model)

    def optimizer_groups(self, member: int) -> list[tuple[list[Tensor], dict]]:
        return [group for t in self.techniques for group in t.optimizer_groups(member)]

    def data_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Each member's mean cross-entropy over its batch [K], then whatever the techniques make of it."""
        members, batch = y.shape
        loss = (
            F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(members, batch).mean(1)
        )
        for t in self.techniques:
            loss = t.data_loss(logits, y, loss)
        return loss

    def penalty(self) -> Tensor | None:
        """Sum of the per-member penalties [K], or None when no technique adds one (the step then skips the add)."""
        terms = [term for t in self.techniques if (term := t.penalty()) is not None]
        return sum(terms[1:], terms[0]) if terms else None

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


def build_regularization(nodes: list[dict]) -> Regularization:
    """One `Technique` per technique that any member's `regularizer` config node names, in a fixed order."""
    for node in nodes:
        unknown = [name for name in node if name not in BUILDERS]
        if unknown:
            raise ConfigError("regularizer", unknown[0], f"one of {', '.join(TECHNIQUES)}")
    techniques = [
        BUILDERS[name]([dict(node[name]) if name in node else None for node in nodes])
        for name in TECHNIQUES
        if any(name in node for node in nodes)
    ]
    return Regularization(techniques, len(nodes))
