"""What every technique is: its declaration (name, keys, strength) and the hooks through which the loop meets it.

A technique is one class in one file of this package (`l1_l2.py`, `dropout.py`, ...), found by its `name`: the
package collects every `Technique` subclass of its modules (`reglab.regularizers.technique_classes`), the schema
validates `regularizer.<name>.*` against its `keys`, and the report plots its `strength_key`. With the YAML
`conf/regularizer/<name>.yaml` (defaults, a comment per key and the sweep grid) nothing else needs editing to add one
(README: "Add your own technique").

The loop trains a *stack* of K members (one job each, K = 1 for an ordinary run), and every technique holds one
setting per member: the member's config node, or None where that member does not use the technique (a technique
that is off is that member's zero strength, and leaves its arithmetic untouched). A technique overrides the hooks
it needs:

    model        dropout_plan(k)        where member k's dropout layers go                 (dropout)
                 model_layer(site, g)   a stacked layer of its own at a site of the network (noise, stochastic
                                                                                            depth)
                 setup(model)           once the model exists: e.g. a weight transform     (spectral norm)
    batch        batch(x, targets)      member k's inputs and targets for the forward      (label smoothing,
                                        pass, changed by each technique in turn            mixup, cutmix)
    loss         data_loss(...)         a term added to the per-member data loss           (the README's example)
                 penalty()              per-member penalty added to it                     (L1, L2)
    optimizer    optimizer_groups(k)    member k's parameters with settings of their own   (L2 impl=torch)
                 group_settings(k)      settings of all of member k's optimizer groups     (SWA: its lr schedule)
                 learning_rate(g, plan) a group's rate for its next epoch, or None         (SWA: SWALR's rates)
    step         refine_gradients(f)    after backward: f() re-runs the batch's forward    (SAM: the gradient
                                        and backward (same random draws) at moved weights   at w + ρ·g/‖g‖)
                 before_step(lrs)       between backward and optimizer.step                (L2 coupled/decoupled)
                 after_step(lrs)        after optimizer.step                               (proximal L1, max-norm,
                                                                                            EMA, spectral norm)
    epoch end    end_epoch(k, ...)      may stop member k                                  (early stopping, SWA)
    training end selection(k)           which epoch member k keeps, and its weights        (early stopping)
                 final_weights(k)       the weights member k is evaluated with instead     (SWA, EMA: the average)
                 final_metrics(k, ...)  test metrics of its own                            (MC dropout)
    record       describe(k)            what it does to member k, in words                 (L1, L2)
    resume       state_dict(k)          what a checkpoint must keep to continue exactly    (early stopping,
                                                                                            mixup's generators)

The targets compose: the loop builds a `Targets` per batch (every member's target one-hot of its labels), the
`batch` hooks run in `order` (label smoothing, order 50, smooths; mixup and cutmix, order 60, mix the inputs and
the targets so far with the same pairing and λ: smoothed targets, then mixed), and the data loss is the
cross-entropy against whatever targets each member ends with (`Targets.cross_entropy`). A member whose targets no
technique touched keeps exactly the plain cross-entropy of its labels (`cross_entropy`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from reglab.models import MemberView
    from reglab.regularizers.dropout import DropoutPlan
    from reglab.regularizers.early_stopping import EarlyStopping
    from reglab.specs import Spec


class Technique:
    """No-op hooks; each technique overrides the ones it needs. `settings[k]` is member k's config node or None."""

    # The declaration, read by the schema, the report and the docs: every key of `regularizer.<name>` with its
    # type and allowed values, and the key that measures the technique's strength (the report's x-axis).
    name: ClassVar[str] = ""
    keys: ClassVar[Mapping[str, Spec]] = {}
    strength_key: ClassVar[str | None] = None
    strength_scale: ClassVar[str] = "linear"  # "log" for strengths swept over decades (the report's axis)
    order: ClassVar[int] = 100  # hooks run in this order (then by name): e.g. proximal L1 before max-norm
    # True when the technique uses `refine_gradients`: the loop then keeps each batch's dropout noise for a replay
    second_pass: ClassVar[bool] = False
    # A scheduling hint: what this technique adds to a member's cost per training step, in units of a member without
    # regularization (measured as the epoch time of a 10-member stack less a 2-member one, MLP on MNIST-1D, CPU; 0
    # where that added nothing measurable, or where it was not measured: stochastic depth needs a residual model, SAM's
    # second pass is counted as one). The stacked launcher balances its processes with it (stacking.shares_of_work);
    # a wrong value costs balance only.
    step_cost: ClassVar[float] = 0.0

    @classmethod
    def check(cls, settings: Mapping, cfg: Mapping) -> None:
        """Rules across keys (or with the rest of the config), raising ConfigError; each key alone is checked
        against `keys` first."""

    def __init__(self, settings: list[dict | None], seeds: list[int] | None = None):
        self.settings = settings
        # each member's trainer.seed: a technique that draws random numbers seeds a generator per member from it
        # (and saves its state in `state_dict`), so that a stacked member draws exactly what it would alone
        self.seeds = seeds if seeds is not None else [0] * len(settings)

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

    def model_layer(self, site: Site, generators: list[torch.Generator]) -> nn.Module | None:
        """A layer of this technique's own at `site` of the network, for all members at once ([K, B, ...] in and
        out; usually a `MemberLayer`), drawing member k's random numbers from `generators[k]` (its noise generator,
        which checkpoints save); None when no member wants one there. models.py asks at every site as it builds."""
        return None

    def batch(self, x: Tensor, targets: Targets) -> Tensor:
        """The batch [K, B, ...] the model will see; may change member k's inputs and (through `targets`) its
        targets, e.g. mix both. Leave the members it does not use untouched."""
        return x

    def data_loss(self, logits: Tensor, y: Tensor, loss: Tensor) -> Tensor:
        """Per-member data loss [K] from logits [K, B, C] and labels [K, B], given the loss so far (the
        cross-entropy against each member's targets, see `Targets`)."""
        return loss

    def penalty(self) -> Tensor | None:
        """Per-member penalty [K] added to the data loss, or None."""
        return None

    def optimizer_groups(self, member: int) -> list[tuple[list[Tensor], dict]]:
        """(parameters, settings) of member k that the optimizer should treat apart, e.g. its decayed weights with
        the optimizer's own weight_decay; every other parameter gets the optimizer's plain settings."""
        return []

    def group_settings(self, member: int) -> dict:
        """Settings added to every optimizer group of member k (members share a group only when these agree), for
        `learning_rate` to read back."""
        return {}

    def learning_rate(self, group: dict, plan: Callable[[int], float]) -> float | None:
        """The rate of optimizer group `group` for its next epoch (`group["epoch"]`, counted from 0), or None to
        keep the schedule's; `plan(epoch)` is the rate trainer.lr_schedule gives any epoch."""
        return None

    def refine_gradients(self, recompute: Callable[[], None]) -> None:
        """Called after the backward pass, when the members' parameter slices hold their gradients. May move
        member weights, call `recompute()` (the same batch's forward and backward again, with the same dropout
        masks: every training member's slices then hold the new gradients), and must put back the weights and, for
        the members it leaves alone, the first gradients."""

    def before_step(self, lrs: list[float]) -> None: ...

    def after_step(self, lrs: list[float]) -> None: ...

    def end_epoch(self, member: int, metrics: dict[str, float], epoch: int, model: MemberView) -> bool:
        return False

    def selection(self, member: int) -> EarlyStopping | None:
        """The tracker that picks member k's best epoch and the weights it ends with, if this technique decides."""
        return None

    def final_weights(self, member: int) -> dict[str, Tensor] | None:
        """The weights (names as `MemberView.state_dict`) that member k is evaluated with when training ends, in
        place of those it ends with (or early stopping restores); None keeps those."""
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


@dataclass(frozen=True)
class Site:
    """A place in the network where a technique may put a layer of its own (`Technique.model_layer`)."""

    where: str  # input | dense (after a hidden dense layer's activation) | conv (after a conv layer's activation)
    #             | branch (the end of a residual branch, before it joins its shortcut)
    spatial_dims: int = 0  # of the activations there: 0 for features, 1 for signals, 2 for images
    depth: int = 0  # branch: which residual block, 1..blocks from the input
    blocks: int = 0  # branch: how many residual blocks the network has


class MemberLayer(nn.Module):
    """A technique's layer in the stacked model: member k's slice [B, ...] goes through `member_forward` with member
    k's setting and its own generator, so a member draws exactly what it would alone. Members without a setting
    (None) pass through untouched, and so does every member in eval mode: these layers act during training only."""

    def __init__(self, settings: list, generators: list[torch.Generator]):
        super().__init__()
        self.settings, self.generators = settings, generators

    def member_forward(self, x: Tensor, setting, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        return torch.stack(
            [
                x[k] if s is None else self.member_forward(x[k], s, self.generators[k])
                for k, s in enumerate(self.settings)
            ]
        )

    def extra_repr(self) -> str:
        return f"settings={self.settings}"


class Targets:
    """Every member's training targets for one batch: built by the loop, changed by the `batch` hooks in turn, read
    by the data loss.

    Member k's target is one-hot(labels[k]) until a technique sets a distribution q [B, C] instead (`distribution`,
    `replace`). Label smoothing's built-in version (impl=torch) leaves its ε to `F.cross_entropy(label_smoothing=ε)`
    (`smooth_in_loss`); that smoothing, q -> (1-ε)·q + ε/C, commutes with every convex mix of targets (a mix's
    weights sum to 1), so targets mixed after it come out as if smoothed first. The loss per member:

        targets untouched      −log softmax(z)_y (`cross_entropy`)        (batched over the members, as ever)
        ε in the loss only     F.cross_entropy(z, y, label_smoothing=ε)
        a distribution q       -mean_b Σ_c q_bc·log softmax(z_b)_c        (soft_cross_entropy)
        q and ε in the loss    F.cross_entropy(z, q, label_smoothing=ε)
    """

    def __init__(self, labels: Tensor, num_classes: int):
        self.labels, self.num_classes = labels, num_classes  # labels [K, B]
        self.soft: dict[int, Tensor] = {}  # member -> q [B, C], where a technique changed the targets
        self.loss_smoothing: dict[int, float] = {}  # member -> ε that F.cross_entropy applies

    def distribution(self, member: int) -> Tensor:
        """Member k's targets so far as a distribution [B, C] (without an ε left to the loss)."""
        if member in self.soft:
            return self.soft[member]
        return F.one_hot(self.labels[member], self.num_classes).float()

    def replace(self, member: int, q: Tensor) -> None:
        self.soft[member] = q

    def smooth_in_loss(self, member: int, eps: float) -> None:
        self.loss_smoothing[member] = eps

    def cross_entropy(self, logits: Tensor) -> Tensor:
        """Each member's mean cross-entropy over its batch [K] against its targets, from logits [K, B, C]."""
        loss = cross_entropy(logits, self.labels).mean(1)
        changed = sorted(self.soft.keys() | self.loss_smoothing.keys())
        if not changed:
            return loss
        per_member = list(loss.unbind())
        for k in changed:
            per_member[k] = self._member_loss(logits[k], k)
        return torch.stack(per_member)

    def _member_loss(self, logits: Tensor, member: int) -> Tensor:
        eps = self.loss_smoothing.get(member)
        target = self.soft.get(member, self.labels[member])
        if eps is not None:
            return F.cross_entropy(logits, target, label_smoothing=eps)
        return soft_cross_entropy(logits, target)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Each sample's cross-entropy −log softmax(z)_y = log Σ_c exp(z_c − m) − (z_y − m), m = max_c z_c, for logits
    [..., C] and labels [...].

    F.cross_entropy's value (tests/test_mixup_cutmix.py), at half its cost on the CPU: its log_softmax kernel is slow
    over a short last dimension (a K=24 stack's batch, 2400 rows of 10 classes, forward and backward: 0.71 ms against
    0.35 ms; measured, torch 2.14). The logits are shifted by their maximum first, as log_softmax does: a loss near 0
    of a confident model then keeps its precision (logsumexp(z) − z_y would round at the size of the largest logit).
    The maximum is a constant for autograd (the loss does not depend on it). Every operation acts on one row, so a
    member's losses and gradients are the same bits whatever the stack."""
    shifted = logits - logits.detach().amax(-1, keepdim=True)
    return shifted.exp().sum(-1).log() - shifted.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def soft_cross_entropy(logits: Tensor, q: Tensor) -> Tensor:
    """-mean_b Σ_c q_bc·log p_bc with log p = log_softmax(z): cross-entropy against target distributions q [B, C]."""
    return -(q * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
