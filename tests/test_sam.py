"""SAM against its two-step update written out by hand on a tiny model; a member without SAM keeps its plain step."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from reglab.errors import ConfigError
from reglab.loop import forward_backward
from reglab.models import StackedLinear, member_parameters
from reglab.regularizers import build_regularization
from reglab.regularizers.base import Targets
from reglab.schema import validate
from tests.test_loop import config


def hand_written_sam(weight, bias, x, y, rho, lr):
    """g = ∇L(w); ε = ρ·g/‖g‖; w ← w − lr·∇L(w + ε), for L = mean cross-entropy of the linear model x Wᵀ + b."""

    def gradient(w, b):
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        F.cross_entropy(x @ w.T + b, y).backward()
        return w.grad, b.grad

    gw, gb = gradient(weight, bias)
    norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
    sharp_w, sharp_b = gradient(weight + rho * gw / norm, bias + rho * gb / norm)
    return weight - lr * sharp_w, bias - lr * sharp_b


def plain_step(weight, bias, x, y, lr):
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    F.cross_entropy(x @ w.T + b, y).backward()
    return weight - lr * w.grad, bias - lr * b.grad


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_the_sam_step_equals_the_two_steps_by_hand_and_leaves_other_members_alone(rho):
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Sequential(StackedLinear(6, 4, [torch.Generator().manual_seed(s) for s in (0, 1)]))
    x = torch.randn(2, 16, 6, generator=generator)
    y = torch.randint(0, 4, (2, 16), generator=generator)
    start = [(layer[0].weight[k].detach().clone(), layer[0].bias[k].detach().clone()) for k in range(2)]
    regs = build_regularization([{"sam": {"rho": rho}}, {}])
    regs.setup(layer)
    lr = 0.1
    optimizer = torch.optim.SGD([p for k in range(2) for _, p in member_parameters(layer, k)], lr=lr)
    batch = (layer, x, Targets(y, 4), regs, contextlib.nullcontext(), [0, 1])
    forward_backward(*batch)
    regs.refine_gradients(lambda: forward_backward(*batch))
    optimizer.step()
    sam_w, sam_b = hand_written_sam(*start[0], x[0], y[0], rho, lr)
    torch.testing.assert_close(layer[0].weight[0].detach(), sam_w)
    torch.testing.assert_close(layer[0].bias[0].detach(), sam_b)
    plain_w, plain_b = plain_step(*start[1], x[1], y[1], lr)
    torch.testing.assert_close(layer[0].weight[1].detach(), plain_w)
    torch.testing.assert_close(layer[0].bias[1].detach(), plain_b)
    assert not torch.allclose(sam_w, plain_step(*start[0], x[0], y[0], lr)[0])  # SAM did change the step


def test_rho_zero_is_the_plain_single_pass_update():
    regs = build_regularization([{"sam": {"rho": 0.0}}])
    layer = torch.nn.Sequential(StackedLinear(3, 2, [torch.Generator().manual_seed(0)]))
    regs.setup(layer)
    calls = []
    forward_backward(
        layer,
        torch.randn(1, 4, 3),
        Targets(torch.zeros(1, 4, dtype=torch.long), 2),
        regs,
        contextlib.nullcontext(),
        [0],
    )
    regs.refine_gradients(lambda: calls.append(1))
    assert calls == []


def test_a_negative_rho_is_refused():
    with pytest.raises(ConfigError, match="regularizer.sam.rho=-0.1 is not allowed: a number >= 0"):
        validate(config("unused", "regularizer=sam", "regularizer.sam.rho=-0.1"))
