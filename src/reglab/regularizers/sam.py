"""Sharpness-aware minimization (SAM, Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization").

SAM minimizes the worst loss in a ball of radius ρ around the weights, max_{‖ε‖₂ ≤ ρ} L(w + ε), and takes the
first-order solution of the inner maximization. Per member and step, on mini-batch B:

    g     = ∇L_B(w)                     the ordinary forward and backward pass
    ε̂     = ρ · g / (‖g‖₂ + 1e-12)      ‖g‖₂ over all of the member's parameters: its own gradient norm
    g_SAM = ∇L_B(w + ε̂)                 a second pass on the same batch, with the same dropout masks
    w     ← the optimizer's step from w (not from w + ε̂) with g_SAM

so every step costs two forward and backward passes. L is the member's whole objective: its data loss (smoothed
cross-entropy under label smoothing, ...) plus any penalty in the loss (L1, L2 penalty mode); weight decay
applied to the gradient or the weights (L2 coupled, decoupled) acts at w, after SAM has put the weights back. The
logged training loss is L_B(w), from the first pass.

In a stack, the second pass runs for all members at once; members without SAM (or with ρ = 0) keep the gradients
of their first pass and their dropout noise is replayed, so their update is exactly their single-pass one
(tests/test_stack.py), while every SAM member uses its own ρ and its own gradient norm. There is no PyTorch
built-in: tests/test_sam.py checks the update against the two steps written out by hand on a tiny model.

The finding (Foret et al.): flatter minima and a smaller generalization gap. Every run's summary holds the
`sharpness` proxy (diagnostics.sharpness: how much the training loss rises along the normalized gradient at
ρ = 0.05), so SAM runs compare with unregularized ones.
"""

from __future__ import annotations

import torch

from reglab.regularizers.base import Technique
from reglab.specs import number


class SAM(Technique):
    name = "sam"
    keys = {"rho": number(0)}  # ρ, the radius of the neighbourhood whose worst loss SAM minimizes
    strength_key = "rho"
    second_pass = True
    order = 5  # before every technique that changes gradients or weights around the step

    def setup(self, model):
        from reglab.models import member_parameters

        self.parameters = {k: [p for _, p in member_parameters(model, k)] for k in range(len(self.settings))}

    def ascending(self) -> list[int]:
        """The members whose gradient SAM takes at the ascent point: they use SAM with ρ > 0 and are training."""
        return [
            k
            for k in self.members()
            if self.settings[k]["rho"] > 0 and self.parameters[k][0].grad is not None
        ]

    def refine_gradients(self, recompute):
        members = self.ascending()
        if not members:
            return
        # the first pass's gradients of every other member, kept to be put back after the second pass (copies: the
        # second pass adds into the same tensors, models.clear_gradients)
        kept = {
            k: [None if p.grad is None else p.grad.clone() for p in params]
            for k, params in self.parameters.items()
            if k not in members
        }
        saved = {}
        with torch.no_grad():
            for k in members:
                params = self.parameters[k]
                grads = [p.grad for p in params]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                scale = self.settings[k]["rho"] / (norm + 1e-12)
                saved[k] = [p.clone() for p in params]
                for p, g in zip(params, grads, strict=True):
                    p.add_(g * scale)  # w + ε̂, ε̂ = ρ·g/‖g‖
        recompute()  # every training member's slices now hold the gradients at the (moved) weights
        with torch.no_grad():
            for k in members:
                for p, w in zip(self.parameters[k], saved[k], strict=True):
                    p.copy_(w)  # back to w: the optimizer steps from there with ∇L(w + ε̂)
        for k, grads in kept.items():
            for p, g in zip(self.parameters[k], grads, strict=True):
                if g is not None:  # in place: a block of members (models.member_block) shares this gradient
                    p.grad.copy_(g)

    def describe(self, member):
        s = self.settings[member]
        if s is None:
            return None
        if s["rho"] == 0:
            return "sam ρ=0: the plain gradient (off)"
        return f"sam ρ={s['rho']:g}: gradient at w + ρ·g/‖g‖ (second pass on the same batch), step from w"
