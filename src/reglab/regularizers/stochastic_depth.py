"""Stochastic depth (Huang et al. 2016): drop whole residual branches at random while training.

A residual block computes H_l = act(x + f_l(x)). Stochastic depth multiplies the branch by a Bernoulli variable
b_l ~ Bernoulli(1 − p_l), drawn per sample, so that a dropped block is the identity (H_l = act(x)) and the network
a sample sees during training is shallower:

    H_l = act(x + b_l · f_l(x) / (1 − p_l))        (training; "row" mode: one b_l per sample)
    H_l = act(x + f_l(x))                          (evaluation)

The paper scales the branch by the survival probability 1 − p_l at test time; here, as in torchvision, the
surviving branch is scaled by 1/(1 − p_l) at training time instead (inverted, like dropout), so that E[b_l/(1−p_l)] = 1
and evaluation is the identity. The drop probabilities follow the paper's linear decay rule over depth: block l of
L drops with p_l = (l / L)·p_L, from nearly 0 at the input to p_L at the output (p_L = 0.5 in the paper);
`rule: uniform` drops every block with p_L.

From scratch, the mask comes from the member's own generator; the built-in twin is
`torchvision.ops.stochastic_depth(x, p, "row")` (the function behind `torchvision.ops.StochasticDepth(p, "row")`),
whose masks come from torch's global generator: on the same draws both are equal bit for bit
(tests/test_stochastic_depth.py). It needs a residual model (model=resmlp or model=resnet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reglab.errors import ConfigError
from reglab.regularizers.base import MemberLayer, Technique
from reglab.specs import IMPL, PROBABILITY, choice

RESIDUAL_MODELS = ("resmlp", "resnet")
RULES = ("linear", "uniform")


def stochastic_depth(
    x: Tensor, p: float, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """x · b / (1 − p) with b ~ Bernoulli(1 − p), one b per sample (row) of x [B, ...]. Identity when not training
    or p = 0."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"stochastic depth probability p must be in [0, 1), got p={p}")
    if not training or p == 0.0:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p, generator=generator)
    return x * keep.div_(1.0 - p)


def torch_stochastic_depth(x: Tensor, p: float) -> Tensor:
    """The built-in twin in training mode, its masks from torch's global generator."""
    from torchvision.ops import stochastic_depth as builtin  # torchvision costs seconds to import: only here

    return builtin(x, p, "row", training=True)


def drop_probability(depth: int, blocks: int, p: float, rule: str) -> float:
    """p_l of block `depth` (1..blocks): linear p_l = (l / L)·p_L, or uniform p_l = p_L."""
    return p * depth / blocks if rule == "linear" else p


@dataclass(frozen=True)
class DepthDrop:
    p: float  # this block's drop probability p_l
    impl: str  # scratch | torch


class StackedStochasticDepth(MemberLayer):
    """The end of one residual branch for K members, each dropping it with its own p_l."""

    def member_forward(self, x: Tensor, setting: DepthDrop, generator: torch.Generator) -> Tensor:
        if setting.impl == "torch":
            return torch_stochastic_depth(x, setting.p)
        return stochastic_depth(x, setting.p, generator=generator)


class StochasticDepth(Technique):
    """A per-sample drop of each residual branch, with the linear (or uniform) rule over depth."""

    name = "stochastic_depth"
    keys = {"p": PROBABILITY, "rule": choice(*RULES), "impl": IMPL}
    strength_key = "p"
    order = 36

    @classmethod
    def check(cls, settings, cfg):
        model = cfg["model"]["name"]
        if model not in RESIDUAL_MODELS:
            raise ConfigError(
                "model",
                model,
                "resmlp or resnet with regularizer=stochastic_depth (it drops residual blocks)",
            )
        if model == "resnet" and len(cfg["model"]["channels"]) < 2:
            raise ConfigError(
                "model.channels",
                cfg["model"]["channels"],
                "at least two entries with regularizer=stochastic_depth (a stem, then one residual block per entry)",
            )

    def model_layer(self, site, generators):
        if site.where != "branch":
            return None
        settings = [
            DepthDrop(p_l, s["impl"])
            if s is not None and (p_l := drop_probability(site.depth, site.blocks, s["p"], s["rule"])) > 0
            else None
            for s in self.settings
        ]
        return StackedStochasticDepth(settings, generators) if any(s is not None for s in settings) else None

    def describe(self, member):
        s = self.settings[member]
        if s is None:
            return None
        rule = "p_l = (l/L)·p_L" if s["rule"] == "linear" else "p_l = p_L"
        return f"stochastic depth p_L={s['p']:g} ({rule}, {s['impl']})"
