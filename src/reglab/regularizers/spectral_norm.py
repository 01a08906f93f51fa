"""Spectral normalization (Miyato et al. 2018, "Spectral Normalization for Generative Adversarial Networks").

Every weight matrix W (a kernel [out, in, k…] as the matrix [out, in·k…]) is divided by its largest singular value
σ(W) in the forward pass, so that each layer is c-Lipschitz (c = `coefficient`, 1 in the paper) and the network,
with 1-Lipschitz activations, is at most c^L-Lipschitz:

    W_SN = c · W / σ(W),   σ(W) ≈ uᵀ W v   (u, v held fixed: the gradient flows through W only)

σ comes from power iteration on vectors u, v kept per member and layer; each training step runs one iteration on
the current weights before the forward pass uses them (Miyato et al.'s algorithm 1):

    u ← W v / ‖W v‖,   v ← Wᵀ u / ‖Wᵀ u‖

u and v start as normalized standard-normal draws from the member's own generator (trainer.seed + 1009), followed
by 15 iterations on the initial weights, and in evaluation the stored u, v are used without iterating: all as
`torch.nn.utils.parametrizations.spectral_norm` does (tests/test_spectral_norm.py: equal weights and σ over training
steps from the same u, v). The iteration runs once per step even when SAM passes over the batch twice. u and v are
saved in checkpoints (resume is exact); best.pt and last.pt hold the unnormalized parameters W, as the model's
parameters are. Restored or averaged weights (early stopping, SWA, EMA) are normalized with the last u, v.

The stacked layers compute with `models.effective_weight`, which hands their weight to the transform installed here;
members without spectral normalization get their slice back untouched. Weight statistics in the summary
(`weights/sigma_max`, `weights/lipschitz_bound`) are those of the normalized weights for members that use it.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.diagnostics import spectral_norms
from reglab.regularizers.base import Technique
from reglab.specs import integer, number

GENERATOR_OFFSET = 1009  # u, v draws: trainer.seed + this, so they never replay the batch order's stream
# power iterations on the initial weights, as torch's spectral_norm runs on registration
WARMUP_ITERATIONS = 15
EPS = 1e-12  # F.normalize's guard against a zero vector, torch's default


def power_iteration_(matrix: Tensor, u: Tensor, v: Tensor, iterations: int) -> None:
    """u ← normalize(W v), v ← normalize(Wᵀ u), `iterations` times, in place (no gradient)."""
    with torch.no_grad():
        for _ in range(iterations):
            u.copy_(F.normalize(torch.mv(matrix, v), dim=0, eps=EPS))
            v.copy_(F.normalize(torch.mv(matrix.T, u), dim=0, eps=EPS))


def sigma(matrix: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """σ(W) ≈ uᵀ W v, differentiable in W (u and v are constants)."""
    return torch.vdot(u, torch.mv(matrix, v))


class SpectralNorm(Technique):
    name = "spectral_norm"
    step_cost = 1.7  # 28.1 ms a member and epoch against 10.4 without regularization
    keys = {
        "coefficient": number(0, lo_open=True),  # c: each layer's spectral norm (Lipschitz constant)
        "power_iterations": integer(1),  # per training step
    }
    strength_key = "coefficient"
    strength_scale = "log"

    def setup(self, model: nn.Module) -> None:
        self.layers = [layer for layer in model.modules() if hasattr(layer, "weight_transform")]
        # a layer iterates once per step, in its first training forward
        self.pending = [True] * len(self.layers)
        self.u: list[dict[int, Tensor]] = [{} for _ in self.layers]
        self.v: list[dict[int, Tensor]] = [{} for _ in self.layers]
        for k in self.members():
            generator = torch.Generator().manual_seed(self.seeds[k] + GENERATOR_OFFSET)
            for index, layer in enumerate(self.layers):
                matrix = layer.weight[k].detach().flatten(1)
                u = torch.empty(matrix.shape[0]).normal_(0, 1, generator=generator).to(matrix.device)
                v = torch.empty(matrix.shape[1]).normal_(0, 1, generator=generator).to(matrix.device)
                self.u[index][k], self.v[index][k] = (
                    F.normalize(u, dim=0, eps=EPS),
                    F.normalize(v, dim=0, eps=EPS),
                )
                power_iteration_(matrix, self.u[index][k], self.v[index][k], WARMUP_ITERATIONS)
        for index, layer in enumerate(self.layers):
            layer.weight_transform = partial(self.normalized, index, layer)

    def normalized(self, index: int, layer: nn.Module, weight: Tensor) -> Tensor:
        """The layer's weights [K, ...] with the slices of members that use spectral normalization divided by σ/c."""
        iterate = layer.training and self.pending[index]
        if iterate:
            self.pending[index] = False
        slices = list(weight.unbind(0))
        for k in self.members():
            matrix, u, v = slices[k].flatten(1), self.u[index][k], self.v[index][k]
            if iterate:
                power_iteration_(matrix.detach(), u, v, self.settings[k]["power_iterations"])
            slices[k] = slices[k] / (sigma(matrix, u.clone(), v.clone()) / self.settings[k]["coefficient"])
        return torch.stack(slices)

    def after_step(self, lrs):
        # the weights moved: the next training forward iterates again
        self.pending = [True] * len(self.layers)

    def final_metrics(self, member, model, x, y, batch_size):
        if self.settings[member] is None:
            return {}
        with torch.no_grad():
            normalized = [
                self.normalized(i, layer, layer.weight)[member] for i, layer in enumerate(self.layers)
            ]
        raw = spectral_norms([layer.weight[member] for layer in self.layers])
        return {
            **spectral_norms(normalized),  # replaces the summary's statistics of the unnormalized weights
            "spectral_norm/raw_sigma_max": raw["weights/sigma_max"],
        }

    def describe(self, member):
        s = self.settings[member]
        return s and (
            f"spectral_norm: every weight matrix W ← {s['coefficient']:g}·W/σ(W) in the forward pass, σ by "
            f"{s['power_iterations']} power iteration(s) per step"
        )

    def state_dict(self, member):
        if self.settings[member] is None:
            return {}
        return {"u": [u[member] for u in self.u], "v": [v[member] for v in self.v]}

    def load_state_dict(self, member, state):
        if self.settings[member] is not None and state:
            for saved, vectors in ((state["u"], self.u), (state["v"], self.v)):
                for index, tensor in enumerate(saved):
                    vectors[index][member].copy_(tensor)
