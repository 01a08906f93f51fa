"""L1 and L2 weight penalties, weight decay (coupled and decoupled) and the proximal step for L1.

Penalties, as computed here (no factor 1/2 inside):

    l1_penalty(w) = Σ|w|            l2_penalty(w) = Σw²

Convention: ``torch.optim.SGD(weight_decay=λ)`` adds λ·w to the gradient, which is the gradient of
λ/2 · Σw². So adding ``λ/2 · l2_penalty(params)`` to the loss equals SGD's ``weight_decay=λ``.

Weight decay comes in two flavours (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"):

- coupled (L2 regularization, what ``SGD``/``Adam`` ``weight_decay=λ`` do): g <- g + λ·w before the update.
  With SGD this is the same as decay; with Adam the λ·w term is divided by √v̂ like any gradient, so heavily
  updated weights are barely decayed.
- decoupled (``AdamW``): w <- w - lr·λ·w, applied to the weights directly, outside the adaptive update.

L1 by subgradient (λ·Σ|w| in the loss) makes weights oscillate around zero but almost never hit it exactly.
The proximal gradient step (ISTA, Beck & Teboulle 2009) does: after a plain gradient step of size lr,
soft-threshold every weight,

    w <- sign(w) · max(|w| - lr·λ, 0),

which is the exact minimizer of ½‖v - w‖² + lr·λ·‖v‖₁ and sets small weights exactly to zero.

When the proximal mode is exactly that: only after a plain SGD step, i.e. ``optimizer=sgd`` with
``optimizer.momentum=0`` (and so no Nesterov). Then each optimizer step followed by the soft-threshold is one
ISTA iteration on the mini-batch loss (stochastic proximal gradient descent; full-batch ISTA when one batch is
the whole training set), with lr the step size of that step (a schedule may change it between epochs). Otherwise:

- SGD with momentum μ (reglab's ``sgd`` option defaults to μ = 0.9): the gradient step moves along the momentum
  buffer b <- μ·b + g, so the update is w <- prox(w - lr·b): a proximal heavy-ball step, not ISTA (and not
  FISTA either, whose momentum extrapolates the iterates, not the gradients);
- Adam or AdamW (reglab's default optimizer is Adam): every weight moves by its own step size lr/(√v̂ + ε), so the
  prox that matches the step would threshold each weight by lr·λ/(√v̂ + ε). Thresholding all of them by lr·λ is a
  common heuristic: it still gives exact zeros, but its fixed points are not the minimizers of loss + λ·‖w‖₁.

Biases and normalization parameters are usually not decayed (they do not cause overfitting through large
norms, and decaying a norm layer's scale fights the normalization); ``member_decay_split`` makes that split once
per member of a stack (models.py), for penalties, decay and the optimizer's parameter groups alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.errors import ConfigError
from reglab.regularizers.base import Technique
from reglab.specs import IMPL, boolean, choice, number


def _per_member(terms: list[Tensor]) -> Tensor:
    return torch.stack(terms).sum(0) if terms else torch.zeros(1)


def l1_penalty(stacked: Iterable[Tensor]) -> Tensor:
    """Σ|w| per member: ``stacked`` holds tensors [K, ...] whose first dimension indexes the members of a stack
    (models.py); returns [K] (multiply by λ yourself). A lone tensor is a stack of one: ``t.unsqueeze(0)``."""
    return _per_member([p.abs().flatten(1).sum(1) for p in stacked])


def l2_penalty(stacked: Iterable[Tensor]) -> Tensor:
    """Σw² per member (tensors [K, ...] -> [K], as ``l1_penalty``), without a factor 1/2.

    ``SGD(weight_decay=λ)`` equals adding ``λ/2 · l2_penalty(params)`` to the loss, since d/dw (λ/2 w²) = λw.
    """
    return _per_member([(p * p).flatten(1).sum(1) for p in stacked])


def l1_penalty_torch(stacked: Iterable[Tensor]) -> Tensor:
    """Built-in twin of ``l1_penalty``: Σ ‖w‖₁ per member via ``torch.linalg.vector_norm(ord=1)``."""
    return _per_member([torch.linalg.vector_norm(p.flatten(1), ord=1, dim=1) for p in stacked])


def l2_penalty_torch(stacked: Iterable[Tensor]) -> Tensor:
    """Built-in twin of ``l2_penalty``: Σ ‖w‖₂² per member via ``torch.linalg.vector_norm``, no 1/2."""
    return _per_member([torch.linalg.vector_norm(p.flatten(1), ord=2, dim=1) ** 2 for p in stacked])


def member_decay_split(model: nn.Module, member: int, exclude_bias_and_norm: bool = True):
    """(decayed, not decayed) parameters of one member of a stacked model (models.py).

    With ``exclude_bias_and_norm`` only weight matrices and kernels (ndim >= 2) are decayed; biases are not. The
    model zoo has no normalization layers, so ndim decides alone.
    """
    from reglab.models import member_parameters

    params = [p for _, p in member_parameters(model, member)]
    if not exclude_bias_and_norm:
        return params, []
    return [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]


def _check_threshold(threshold: float) -> None:
    if threshold < 0:
        raise ValueError(f"soft-threshold must be >= 0 (it is lr·λ), got threshold={threshold}")


def proximal_l1_(params: Iterable[Tensor], threshold: float) -> None:
    """Proximal step for L1, in place: w <- sign(w) · max(|w| - threshold, 0); use threshold = lr·λ."""
    _check_threshold(threshold)
    with torch.no_grad():
        for p in params:
            p.copy_(p.sign() * (p.abs() - threshold).clamp_(min=0.0))


def proximal_l1_torch_(params: Iterable[Tensor], threshold: float) -> None:
    """Built-in twin of ``proximal_l1_`` via ``torch.nn.functional.softshrink``."""
    _check_threshold(threshold)
    with torch.no_grad():
        for p in params:
            p.copy_(F.softshrink(p, threshold))


def coupled_weight_decay_(params: Iterable[Tensor], weight_decay: float) -> None:
    """Coupled decay (L2 regularization) in place: grad <- grad + λ·w.

    Call between ``loss.backward()`` and ``optimizer.step()``; equals the optimizer's own ``weight_decay=λ``
    (for SGD, Adam, RMSprop, ...). Parameters without a gradient are skipped.
    """
    with torch.no_grad():
        stepped = [p for p in params if p.grad is not None]
        # one call for the list: on the CPU it adds tensor by tensor, as grad.add_(p, alpha=λ) does
        if stepped:
            torch._foreach_add_([p.grad for p in stepped], stepped, alpha=weight_decay)


def decoupled_weight_decay_(params: Iterable[Tensor], lr: float, weight_decay: float) -> None:
    """Decoupled decay in place: w <- w - lr·λ·w = w · (1 - lr·λ).

    Call right before ``optimizer.step()`` with the optimizer's current lr (after any scheduler change):
    that is where ``torch.optim.AdamW`` shrinks the weights, so ``Adam(weight_decay=0)`` plus this equals
    ``AdamW(weight_decay=λ)``. Parameters without a gradient are skipped, as the optimizer skips them.
    """
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.mul_(1.0 - lr * weight_decay)


# ---------------------------------------------------------------------------------------------------------------------
# The techniques: per member a strength, a mode and an impl


class WeightNormTechnique(Technique):
    """Shared by L1 and L2: per member a strength λ, a mode, an impl, and the weights they act on."""

    strength_key = "strength"

    def setup(self, model):
        from reglab.models import member_parameters

        self.params = {
            k: member_decay_split(model, k, self.settings[k]["exclude_bias_and_norm"])[0]
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

    def decayed_blocks(self, model, first: int, stop: int) -> list[Tensor]:
        """The weights of members first..stop-1 that decay acts on: one block per parameter (models.member_block),
        or the member's own views for a run of one."""
        from reglab.models import member_block, member_parameters

        if stop - first == 1:
            return self.params[first]
        decayed = {id(p) for p in self.params[first]}
        names = [name for name, view in member_parameters(model, first) if id(view) in decayed]
        return [member_block(model, name, first, stop) for name in names]

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
    """L2 / weight decay in three modes (see py for the math and the λ/2 convention)."""

    name = "l2"
    step_cost = 0.2  # 12.9 ms a member and epoch against 10.4 without regularization
    keys = {
        "weight_decay": number(0),
        "mode": choice("penalty", "coupled", "decoupled"),
        "impl": IMPL,
        "exclude_bias_and_norm": boolean(),
    }
    strength_key = "weight_decay"
    strength_scale = "log"
    order = 20

    @classmethod
    def check(cls, settings, cfg):
        optimizer = cfg["optimizer"]["name"]
        if settings["impl"] == "torch" and settings["mode"] == "decoupled" and optimizer == "sgd":
            raise ConfigError(
                "regularizer.l2.impl",
                "torch",
                "scratch when mode=decoupled with optimizer=sgd (torch has no decoupled SGD)",
            )
        if settings["mode"] == "coupled" and optimizer == "adamw":
            raise ConfigError(
                "regularizer.l2.mode",
                "coupled",
                "decoupled or penalty with optimizer=adamw (AdamW's weight decay is decoupled by definition); "
                "for L2 in the gradient of Adam use optimizer=adam",
            )

    def penalty(self):
        # λ/2·Σw²: its gradient λ·w matches SGD(weight_decay=λ)
        return self.penalties("penalty", l2_penalty, l2_penalty_torch, scale=0.5)

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

    def setup(self, model):
        from reglab.models import runs

        super().setup(model)
        # grad += λ·w for a run of consecutive members with the same settings as one operation per weight tensor,
        # made now so that their gradients are shared from the first step on (models.share_gradients); the runs
        # stay as they are: a member that finishes is decayed on with its block, and nothing reads it afterwards
        self.coupled = [
            (self.decayed_blocks(model, first, stop), self.strength(first))
            for first, stop in runs(self.in_mode("coupled", "scratch"), key=lambda k: self.settings[k])
        ]

    def before_step(self, lrs):
        for weights, weight_decay in self.coupled:
            # grad += λ·w, as SGD/Adam do inside (elementwise: each member's slice as if alone)
            coupled_weight_decay_(weights, weight_decay)
        for k in self.in_mode("decoupled", "scratch"):
            decoupled_weight_decay_(self.params[k], lrs[k], self.strength(k))


class L1(WeightNormTechnique):
    """L1: subgradient (λ·Σ|w| in the loss) or proximal (soft-threshold by lr·λ after each step: exact zeros)."""

    name = "l1"
    step_cost = 0.3  # 13.3 ms a member and epoch against 10.4 without regularization
    keys = {
        "strength": number(0),
        "mode": choice("subgradient", "proximal"),
        "impl": IMPL,
        "exclude_bias_and_norm": boolean(),
    }
    strength_key = "strength"
    strength_scale = "log"
    order = 10

    def penalty(self):
        return self.penalties("subgradient", l1_penalty, l1_penalty_torch, scale=1.0)

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
            # step it is a heuristic (py says which) that still gives exact zeros.
            shrink = proximal_l1_ if self.settings[k]["impl"] == "scratch" else proximal_l1_torch_
            shrink(self.params[k], lrs[k] * self.strength(k))
