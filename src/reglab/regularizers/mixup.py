"""Mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization").

Each batch trains on convex combinations of pairs of samples and of their targets:

    λ ~ Beta(α, α)                          one draw per batch (and per member of a stack)
    x̃ = λ·x + (1-λ)·x[perm]                 inputs
    q̃ = λ·q + (1-λ)·q[perm]                 targets: one-hot, or smoothed first by label smoothing

and the loss is the cross-entropy against q̃. Small α gives λ near 0 or 1 (little mixing); α = 1 draws λ
uniformly. Zhang et al. report better test accuracy (α = 0.2 on ImageNet, 1 on CIFAR-10); Thulasidasan et al.
2019 find mixup-trained networks better calibrated (lower ECE; α in [0.1, 0.4] best, larger α under-confident).

The pairing: perm[i] = i-1, each sample mixed with the one before it in the batch. The loop's batches are already
in a fresh random order, so this is a random pairing, and it is the one torchvision uses. The built-in twin is
``torchvision.transforms.v2.MixUp`` (impl=torch); both draw λ from the member's own generator (`drawing_from`), so
the two implementations make the same draws and train alike (tests/test_mixup_cutmix.py).

What train/acc and train/loss mean under mixup: the loop measures them after each epoch on the clean training
set against the true labels (eval mode, like val/* and test/*), never on the mixed batches; the objective
actually minimized, the cross-entropy against the mixed targets, is loss/data.

This file also holds what cutmix.py shares with it: `BatchMixing` (a generator per member saved in checkpoints,
one mix per batch and member), `drawing_from`, `draw_lambda` and `previous_sample`.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
from torch import Tensor

from reglab.regularizers.base import Targets, Technique
from reglab.specs import IMPL, number


@contextlib.contextmanager
def drawing_from(generator: torch.Generator):
    """Inside the block torch's global CPU generator continues `generator`'s stream; afterwards `generator` has
    advanced by what was drawn and the global generator is as before. torch.distributions (Beta) and torchvision's
    MixUp/CutMix draw only from the global generator; this gives every member its own stream for them."""
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.random.get_rng_state())


def draw_lambda(alpha: float) -> float:
    """λ ~ Beta(α, α) from torch's global generator, drawn as torchvision's MixUp and CutMix draw it."""
    # no argument validation: α is checked with the config, and validating took as long as the draw (per batch)
    beta = torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha]), validate_args=False)
    return float(beta.sample(()))


def previous_sample(batch_size: int, device: torch.device | str = "cpu") -> Tensor:
    """perm with perm[i] = i-1 (mod B): every sample paired with the one before it (torchvision's pairing)."""
    return torch.arange(batch_size, device=device).roll(1)


def mixup(x: Tensor, q: Tensor, lam: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """x̃ = λ·x + (1-λ)·x[perm], q̃ = λ·q + (1-λ)·q[perm] for a batch x [B, ...] and targets q [B, C]."""
    return lam * x + (1 - lam) * x[perm], lam * q + (1 - lam) * q[perm]


def as_images(x: Tensor) -> Tensor:
    """torchvision's batch transforms want [B, C, H, W]: a batch of signals [B, C, L] is one of height-1 images."""
    return x.unsqueeze(-2) if x.dim() == 3 else x


class BatchMixing(Technique):
    """What mixup and cutmix share: α and impl, a generator per member (seeded from its trainer.seed, saved in
    checkpoints), and one mix of inputs and targets per batch and member. α = 0 leaves a member untouched."""

    keys = {
        "alpha": number(0),  # Beta(α, α); 0 = no mixing
        "impl": IMPL,
    }
    strength_key = "alpha"
    order = 60  # after label smoothing (50): smoothed targets, then mixed
    seed_offset: ClassVar[int] = 0  # a stream apart from the member's batch order (seeded with trainer.seed)

    def __init__(self, settings, seeds=None):
        super().__init__(settings, seeds)
        self.generators = [torch.Generator().manual_seed(seed + self.seed_offset) for seed in self.seeds]

    def mix(self, x: Tensor, q: Tensor, alpha: float, impl: str) -> tuple[Tensor, Tensor]:
        """One member's batch x [B, ...] and targets q [B, C], mixed; draws from torch's global generator."""
        raise NotImplementedError

    def batch(self, x: Tensor, targets: Targets) -> Tensor:
        mixing = [k for k in self.members() if self.settings[k]["alpha"] > 0]
        if not mixing:
            return x
        x = x.clone()  # the other members' inputs stay as they are
        for k in mixing:
            with drawing_from(self.generators[k]):
                # a float α: Beta(1, 1) of an integer tensor would fail (YAML reads `1` as an integer)
                alpha, impl = float(self.settings[k]["alpha"]), self.settings[k]["impl"]
                x[k], q = self.mix(x[k], targets.distribution(k), alpha, impl)
            targets.replace(k, q)
        return x

    def state_dict(self, member):
        return {"generator": self.generators[member].get_state()}

    def load_state_dict(self, member, state):
        if "generator" in state:
            self.generators[member].set_state(state["generator"])


class Mixup(BatchMixing):
    """λ·x + (1-λ)·x[perm] and the same mix of the targets, λ ~ Beta(α, α) per batch and member."""

    name = "mixup"
    step_cost = 1.3  # 23.5 ms a member and epoch against 10.4 without regularization
    seed_offset = 1_000_003

    def mix(self, x, q, alpha, impl):
        if impl == "torch":
            from torchvision.transforms import v2

            mixed, q = v2.MixUp(alpha=alpha)(as_images(x), q)
            return mixed.view_as(x), q
        return mixup(x, q, draw_lambda(alpha), previous_sample(len(x), x.device))

    def describe(self, member):
        s = self.settings[member]
        return s and (
            f"mixup α={s['alpha']:g} ({s['impl']}): inputs and targets mixed with the previous sample of the batch, "
            "λ ~ Beta(α, α) per batch"
        )
