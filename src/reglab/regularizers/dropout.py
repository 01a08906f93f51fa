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

Max-norm (Srivastava et al. 2014, section 5.1) constrains the incoming weight vector of every unit to
‖w‖₂ <= c after each optimizer step; the paper pairs it with dropout so that large learning rates cannot blow
the weights up.

Each technique exists from scratch (``dropout``, ``channel_dropout``, ``Dropout``, ``ChannelDropout``) and as
the PyTorch built-in (``nn.Dropout``, ``nn.Dropout1d/2d/3d``); ``build_dropout`` picks one of them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

IMPLEMENTATIONS = ("scratch", "torch")
SPATIAL_DIMS = (0, 1, 2, 3)
_TORCH_DROPOUT_BY_SPATIAL_DIMS = {0: nn.Dropout, 1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}


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


def dropout(x: Tensor, p: float, training: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Element-wise inverted dropout: y = x · m / (1 - p) with m ~ Bernoulli(1 - p) per element.

    Works on any shape, including convolutional feature maps (element-wise rather than channel-wise).
    Identity when ``training`` is False or ``p == 0``.
    """
    _check_probability(p)
    if not training or p == 0.0:
        return x
    return x * _scaled_keep_mask(x, tuple(x.shape), p, generator)


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
    mask_shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    return x * _scaled_keep_mask(x, mask_shape, p, generator)


class Dropout(nn.Module):
    """From-scratch element-wise dropout layer; active in ``train()`` mode, identity in ``eval()`` mode."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        _check_probability(p)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ChannelDropout(Dropout):
    """From-scratch channel-wise dropout layer (the scratch twin of ``nn.Dropout1d/2d/3d``)."""

    def forward(self, x: Tensor) -> Tensor:
        return channel_dropout(x, self.p, self.training)


def build_dropout(p: float, impl: str = "scratch", spatial_dims: int = 0) -> nn.Module:
    """Return a dropout layer: ``impl`` in {"scratch", "torch"}; ``spatial_dims`` 0 means element-wise.

    spatial_dims=0 gives element-wise dropout on any shape (also on conv feature maps); 1, 2 or 3 give
    channel dropout for (N, C, L), (N, C, H, W) or (N, C, D, H, W) inputs. ``p == 0`` returns ``nn.Identity``.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"build_dropout: unknown impl={impl!r}; allowed values are {IMPLEMENTATIONS}")
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(
            f"build_dropout: unknown spatial_dims={spatial_dims!r}; allowed values are {SPATIAL_DIMS}"
        )
    _check_probability(p)
    if p == 0.0:
        return nn.Identity()
    if impl == "torch":
        return _TORCH_DROPOUT_BY_SPATIAL_DIMS[spatial_dims](p)
    return Dropout(p) if spatial_dims == 0 else ChannelDropout(p)


def _is_dropout(module: nn.Module) -> bool:
    # _DropoutNd is the common base of nn.Dropout, nn.Dropout1d/2d/3d and the alpha-dropout variants.
    return isinstance(module, (Dropout, ChannelDropout, nn.modules.dropout._DropoutNd))


def mc_predict(model: nn.Module, x: Tensor, samples: int) -> tuple[Tensor, Tensor]:
    """Monte Carlo dropout: mean softmax over ``samples`` stochastic passes and its predictive entropy.

    The model runs in eval mode (batch norm uses its running statistics) with only the dropout layers in train
    mode. Returns ``(mean_probs, entropy)`` of shapes (N, K) and (N,), with entropy = -Σ_k p̄_k log p̄_k
    in nats.
    Every module's train/eval flag is restored afterwards.
    """
    if samples < 1:
        raise ValueError(f"mc_predict needs samples >= 1, got samples={samples}")
    previous_modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        for module in model.modules():
            if _is_dropout(module):
                module.train()
        with torch.no_grad():
            mean_probs = sum(torch.softmax(model(x), dim=-1) for _ in range(samples)) / samples
    finally:
        for module, was_training in previous_modes.items():
            module.training = was_training
    # xlogy defines 0 · log 0 = 0, so classes with zero probability add nothing instead of NaN.
    entropy = -torch.special.xlogy(mean_probs, mean_probs).sum(dim=-1)
    return mean_probs, entropy


def _output_unit_weights(module: nn.Module) -> tuple[Tensor, tuple[int, ...]]:
    """A view of the weight whose dim 0 (and, for transposed convs, dim 2) indexes output units.

    Also returns the dims that span one unit's incoming weight vector. Linear and conv weights are stored as
    (out, in, *kernel); transposed convs as (in, out / groups, *kernel), where the incoming weights of one
    output channel are the rows of its group: viewed as (groups, in / groups, out / groups, *kernel).
    """
    weight = module.weight
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        grouped = weight.unflatten(0, (module.groups, -1))
        return grouped, (1, *range(3, grouped.ndim))
    return weight, tuple(range(1, weight.ndim))


def max_norm_(model: nn.Module, c: float) -> None:
    """Max-norm constraint: rescale every unit's incoming weight vector w to ‖w‖₂ <= c, in place.

    Applies to every ``nn.Linear`` and convolution (rows of a Linear weight, one filter per output channel of
    a conv). Vectors already inside the ball are untouched: w <- w · min(1, c / ‖w‖₂). Call after each
    ``optimizer.step()``.
    """
    if c <= 0:
        raise ValueError(f"max_norm_ needs a positive norm bound c, got c={c}")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                weight, unit_dims = _output_unit_weights(module)
                norms = torch.linalg.vector_norm(weight, dim=unit_dims, keepdim=True)
                # A zero-norm vector gives c / 0 = inf, which the clamp turns into a harmless factor of 1.
                weight.mul_((c / norms).clamp_(max=1.0))
