"""Dropout (Srivastava et al. 2014), channel dropout, Monte Carlo dropout and the max-norm constraint.

Dropout multiplies every activation by an independent random mask during training:

    m_i ~ Bernoulli(1 - p),    y_i = x_i · m_i / (1 - p)

This is *inverted* dropout: survivors are scaled by 1/(1-p) at training time so that E[y_i] = x_i and the
network needs no rescaling at test time, where dropout is the identity. Channel dropout (Tompson et al. 2015,
``nn.Dropout2d``) draws one mask value per (sample, channel) and broadcasts it over the spatial positions,
because neighbouring pixels of a feature map are strongly correlated and dropping them one by one barely
regularizes a convolutional layer.

Monte Carlo dropout (Gal & Ghahramani 2016) keeps dropout on at test time and averages the softmax of
``samples`` stochastic forward passes; the entropy of that mean, H = -Σ_k p̄_k log p̄_k, is a cheap measure of
predictive uncertainty.

Max-norm (Srivastava et al. 2014, section 5.1) constrains the incoming weight vector of every hidden unit to
‖w‖₂ <= c after each optimizer step; the paper pairs it with dropout so that large learning rates cannot blow
the weights up. The output layer is left alone unless asked for (`max_norm_output`).

Dropout exists from scratch (``dropout``, ``channel_dropout``: a mask from an explicit generator) and as the
PyTorch built-in (``F.dropout``, ``F.dropout1d/2d/3d``: masks from torch's global generator); ``StackedDropout``
applies either to each member of a stack of networks (models.py) with that member's own rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.regularizers.base import Technique
from reglab.specs import IMPL, PROBABILITY, boolean, choice, integer, number, optional


def _check_probability(p: float) -> None:
    # p == 1 would divide by zero in the 1/(1-p) scale and zero the whole layer: never a useful setting.
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got p={p}")


def _scaled_keep_mask(
    x: Tensor, shape: tuple[int, ...], p: float, generator: torch.Generator | None
) -> Tensor:
    # The 1/(1-p) scale is folded into the mask, so the layer is a single multiplication in the forward pass
    # and a single multiplication by the same saved mask in the backward pass.
    mask = x.new_empty(shape).bernoulli_(1.0 - p, generator=generator)
    return mask.div_(1.0 - p)


def keep_mask(x: Tensor, p: float, generator: torch.Generator | None, channel_wise: bool = False) -> Tensor:
    """The scaled keep mask dropout multiplies x by: one value per element, or channel-wise one per (sample,
    channel), shape (N, C, 1, ..., 1), broadcast over the positions."""
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2) if channel_wise else tuple(x.shape)
    return _scaled_keep_mask(x, shape, p, generator)


def dropout(x: Tensor, p: float, training: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Element-wise inverted dropout: y = x · m / (1 - p) with m ~ Bernoulli(1 - p) per element.

    Works on any shape, including convolutional feature maps (element-wise rather than channel-wise).
    Identity when ``training`` is False or ``p == 0``.
    """
    _check_probability(p)
    if not training or p == 0.0:
        return x
    return x * keep_mask(x, p, generator)


def channel_dropout(
    x: Tensor, p: float, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Channel-wise inverted dropout: one mask value per (sample, channel), shared by all spatial positions.

    ``x`` has shape (N, C, *spatial) with at least one spatial dimension; the mask has shape
    (N, C, 1, ..., 1). Identity when ``training`` is False or ``p == 0``.
    """
    _check_probability(p)
    if x.ndim < 3:
        raise ValueError(
            f"channel_dropout expects (N, C, *spatial) with at least one spatial dim, got shape "
            f"{tuple(x.shape)}; use dropout() for (N, features) inputs"
        )
    if not training or p == 0.0:
        return x
    return x * keep_mask(x, p, generator, channel_wise=True)


def torch_dropout(x: Tensor, p: float, spatial_dims: int) -> Tensor:
    """The built-in twin: ``F.dropout`` (element-wise) or ``F.dropout1d/2d/3d`` (channel-wise), training mode.
    Its masks come from torch's global generator."""
    if spatial_dims == 0:
        return F.dropout(x, p, training=True)
    channel_wise = {1: F.dropout1d, 2: F.dropout2d, 3: F.dropout3d}[spatial_dims]
    return channel_wise(x, p, training=True)


@dataclass(frozen=True)
class DropoutPlan:
    """Where and how strongly one member drops activations."""

    p: float = 0.0  # after every hidden dense layer
    input_p: float = 0.0  # on the input
    conv_p: float = 0.0  # after every conv block
    conv_kind: str = "channel"  # channel: whole feature maps; element: single activations
    impl: str = "scratch"  # scratch | torch

    def rate(self, where: str) -> float:
        return {"input": self.input_p, "dense": self.p, "conv": self.conv_p}[where]


class StackedDropout(nn.Module):
    """Dropout for K members at once, each with its own rate, kind and implementation.

    Member k's slice [B, ...] is dropped exactly as a lone network's would be: the scratch version draws its mask
    from member k's own generator, so a member's masks do not depend on which other members share the stack.
    Members with rate 0 pass through untouched. Identity in eval mode.
    """

    def __init__(self, rates, channel_dims, impls, generators):
        super().__init__()
        for p in rates:
            _check_probability(p)
        self.rates, self.channel_dims, self.impls, self.generators = rates, channel_dims, impls, generators
        self.only: int | None = None  # Monte Carlo dropout of one member: the others pass through

    @classmethod
    def at(
        cls, where: str, plans: list[DropoutPlan], generators, spatial_dims: int = 0
    ) -> StackedDropout | None:
        """The layer at `where` (input | dense | conv) for these members; None when no member drops there."""
        rates = [plan.rate(where) for plan in plans]
        if not any(rates):
            return None
        channel_dims = [
            spatial_dims if where == "conv" and plan.conv_kind == "channel" else 0 for plan in plans
        ]
        return cls(rates, channel_dims, [plan.impl for plan in plans], generators)

    def forward(self, x: Tensor) -> Tensor:
        dropping = [k for k, p in enumerate(self.rates) if p and self.only in (None, k)]
        if not self.training or not dropping:
            return x
        # one product with a stack of masks (ones where a member does not drop): each member's values are those of
        # its own dropout, x·m, and the backward pass is one product too. Slicing x member by member instead cost a
        # zero tensor of the stack's size per slice in the backward pass (3 dropping members of 36 tripled a step).
        masks = torch.ones_like(x)
        for k in dropping:
            masks[k] = self._mask(x[k], k)
        return x * masks

    def _mask(self, x: Tensor, member: int) -> Tensor:
        """Member k's scaled keep mask for its slice x, as its own (lone) dropout draws it."""
        p, dims = self.rates[member], self.channel_dims[member]
        if self.impls[member] == "torch":
            return torch_dropout(torch.ones_like(x), p, dims)  # F.dropout's x·m with x = 1 is its mask m
        return keep_mask(x, p, self.generators[member], channel_wise=bool(dims))

    def extra_repr(self) -> str:
        return f"p={self.rates}"


def mc_predict(
    model: nn.Module, x: Tensor, samples: int, batch_size: int, members: int, only: int | None = None
) -> tuple[Tensor, Tensor]:
    """Monte Carlo dropout: mean softmax over ``samples`` stochastic passes and its predictive entropy.

    Only the dropout layers run in training mode (every module's mode is restored afterwards), and with ``only``
    only that member's layers drop (the others draw nothing from their generators); the inputs go through in
    chunks of ``batch_size``. Returns ``(mean_probs, entropy)`` of shapes [K, N, classes] and [K, N],
    with entropy = -Σ_c p̄_c log p̄_c in nats.
    """
    if samples < 1:
        raise ValueError(f"mc_predict needs samples >= 1, got samples={samples}")
    from reglab.models import predict

    previous_modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        for module in model.modules():
            if isinstance(module, StackedDropout):
                module.train()
                module.only = only
        with torch.no_grad():
            chunks = [
                sum(
                    torch.softmax(predict(model, x[i : i + batch_size], members), dim=-1)
                    for _ in range(samples)
                )
                / samples
                for i in range(0, len(x), batch_size)
            ]
    finally:
        for module, was_training in previous_modes.items():
            module.training = was_training
            if isinstance(module, StackedDropout):
                module.only = None
    mean_probs = torch.cat(chunks, dim=1)
    # xlogy defines 0 · log 0 = 0, so classes with zero probability add nothing instead of NaN.
    entropy = -torch.special.xlogy(mean_probs, mean_probs).sum(dim=-1)
    return mean_probs, entropy


def max_norm_(weights: list[Tensor], c: float) -> None:
    """Max-norm constraint: rescale every unit's incoming weight vector w to ‖w‖₂ <= c, in place.

    ``weights`` are dense weights (out, in) or conv kernels (out, in, *kernel): dim 0 indexes the units, the rest
    spans one unit's incoming weights. Vectors already inside the ball are untouched: w <- w · min(1, c / ‖w‖₂).
    Call after each ``optimizer.step()``.
    """
    if c <= 0:
        raise ValueError(f"max_norm_ needs a positive norm bound c, got c={c}")
    with torch.no_grad():
        for weight in weights:
            norms = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.ndim)), keepdim=True)
            # A zero-norm vector gives c / 0 = inf, which the clamp turns into a harmless factor of 1.
            weight.mul_((c / norms).clamp_(max=1.0))


# ---------------------------------------------------------------------------------------------------------------------
# The technique


class Dropout(Technique):
    """Dropout layers in the model, and the optional max-norm constraint after each step."""

    name = "dropout"
    step_cost = 1.3  # 24.2 ms a member and epoch against 10.4 without regularization
    keys = {
        "p": PROBABILITY,
        "input_p": PROBABILITY,
        "conv_p": optional(PROBABILITY),
        "conv_kind": choice("channel", "element"),
        "max_norm": optional(number(0, lo_open=True)),
        "max_norm_output": boolean(),
        "impl": IMPL,
        "mc_samples": integer(0),
    }
    strength_key = "p"
    order = 30

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

        probs, entropy = mc_predict(model, x, s["mc_samples"], batch_size, len(self.settings), member)
        metrics = {
            **prediction_metrics(probs[member].clamp_min(1e-12).log(), y),
            "entropy": entropy[member].mean(),
        }
        return {f"test/mc_{name}": value.item() for name, value in metrics.items()}

    def after_step(self, lrs):
        for k, weights in self.constrained.items():
            if self.settings[k] is not None:
                max_norm_(weights, self.settings[k]["max_norm"])
