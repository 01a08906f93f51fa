"""CutMix (Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features").

Each batch pastes a box cut from a partner sample into every sample, and mixes the targets by the box's area:

    λ ~ Beta(α, α)                               one draw per batch (and per member of a stack)
    box of about (1-λ) of the sample's area      centre uniform, clipped at the edges
    x̃ = x with x[perm] inside the box
    λ' = 1 - |box| / |sample|                    the area actually kept (clipping shrinks the box)
    q̃ = λ'·q + (1-λ')·q[perm]                    targets: one-hot, or smoothed first by label smoothing

The box, per spatial axis of size S: a centre c drawn uniformly from 0..S-1 and a half-width h = int(r·S), the
box [max(c-h, 0), min(c+h, S)). Images (2 axes): r = ½·√(1-λ), the rectangle of Yun et al. and torchvision;
1-D signals such as MNIST-1D (1 axis): r = ½·(1-λ), a segment of about (1-λ) of the signal. The centres are drawn
last axis first, as torchvision does. Yun et al. use α = 1 (λ uniform) and report better accuracy than mixup on
ImageNet and CIFAR.

The pairing (perm[i] = i-1, as torchvision) and the randomness (each member's own generator) are mixup's
(mixup.py). The built-in twin is ``torchvision.transforms.v2.CutMix`` (impl=torch); it cuts 2-D boxes only (on a
signal, a height-1 image, its box is always empty), so impl=torch needs image data (`dataset=digits`, ...).
train/acc and train/loss are measured on the clean training set, as for mixup; loss/data is the mixed objective.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reglab.errors import ConfigError
from reglab.regularizers.mixup import BatchMixing, draw_lambda, previous_sample


def draw_box(lam: float, sizes: tuple[int, ...]) -> tuple[tuple[slice, ...], float]:
    """A box of about (1-λ) of a sample with spatial `sizes` (L,) or (H, W), from torch's global generator, and
    λ' = 1 - box area / sample area."""
    spread = {1: 1.0 - lam, 2: math.sqrt(1.0 - lam)}[len(sizes)]
    r = 0.5 * spread
    centres = [int(torch.randint(size, (1,))) for size in reversed(sizes)][::-1]  # last axis drawn first
    box = []
    for centre, size in zip(centres, sizes, strict=True):
        half = int(r * size)
        box.append(slice(max(centre - half, 0), min(centre + half, size)))
    area = math.prod(s.stop - s.start for s in box)
    return tuple(box), float(1.0 - area / math.prod(sizes))


def cutmix(x: Tensor, q: Tensor, box: tuple[slice, ...], lam: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """x with x[perm] pasted inside `box` (over the last len(box) axes), and q̃ = λ·q + (1-λ)·q[perm]."""
    mixed = x.clone()
    mixed[(..., *box)] = x[perm][(..., *box)]
    return mixed, lam * q + (1 - lam) * q[perm]


class CutMix(BatchMixing):
    """A box from the previous sample of the batch pasted in, targets mixed by its area; λ ~ Beta(α, α)."""

    name = "cutmix"
    step_cost = 1.4  # 24.7 ms a member and epoch against 10.4 without regularization
    seed_offset = 2_000_003

    @classmethod
    def check(cls, settings, cfg):
        if settings["impl"] == "torch" and cfg["dataset"]["name"] == "mnist1d":
            raise ConfigError(
                "regularizer.cutmix.impl",
                "torch",
                "scratch for mnist1d (torchvision's CutMix cuts 2-D boxes only; scratch cuts segments of signals)",
            )

    def mix(self, x, q, alpha, impl):
        if impl == "torch":
            from torchvision.transforms import v2

            return v2.CutMix(alpha=alpha)(x, q)
        box, lam = draw_box(draw_lambda(alpha), tuple(x.shape[2:]))
        return cutmix(x, q, box, lam, previous_sample(len(x), x.device))

    def describe(self, member):
        s = self.settings[member]
        return s and (
            f"cutmix α={s['alpha']:g} ({s['impl']}): a box of about (1-λ) of each sample pasted from the previous "
            "sample of the batch, targets mixed by its area, λ ~ Beta(α, α) per batch"
        )
