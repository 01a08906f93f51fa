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
        for p in params:
            if p.grad is not None:
                p.grad.add_(p, alpha=weight_decay)


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
