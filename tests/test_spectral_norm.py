"""Spectral normalization from scratch equals torch.nn.utils.parametrizations.spectral_norm from the same u, v."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from reglab.errors import ConfigError
from reglab.models import Architecture, build_model, effective_weight
from reglab.regularizers import build_regularization
from reglab.schema import validate
from tests.test_loop import config


@pytest.mark.parametrize("model_name", ["mlp", "cnn1d"])
def test_normalized_weights_and_sigma_equal_torchs_over_training_steps(model_name):
    """The stacked model with spectral norm vs plain modules under torch's parametrization, from the same u, v (ours,
    after their 15 warm-up iterations: torch's registration runs one more on its own draws, so they are set), then
    one power iteration per training step in both while both take the same random steps."""
    seed = 3
    cfg = config("unused", f"model={model_name}", "regularizer=spectral_norm")
    regs = build_regularization([cfg["regularizer"]], [seed])
    model = build_model(cfg["model"], Architecture((1, 40), 10, [seed], regs.dropout_plans()))
    layers = [m for m in model.modules() if hasattr(m, "weight_transform")]
    plain = [nn.Linear(1, 1, bias=False) for _ in layers]
    regs.setup(model)
    technique = regs.techniques[0]
    for index, (module, layer) in enumerate(zip(plain, layers, strict=True)):
        module.weight = nn.Parameter(layer.weight[0].detach().flatten(1).clone())
        spectral_norm(module)
        module.parametrizations.weight[0]._u.copy_(technique.u[index][0])
        module.parametrizations.weight[0]._v.copy_(technique.v[index][0])
    generator = torch.Generator().manual_seed(0)
    # training steps: forward (one power iteration), then the same random SGD step for both
    for _ in range(5):
        model.train()
        for module, layer in zip(plain, layers, strict=True):
            ours = effective_weight(layer)[0].flatten(1)
            torch.testing.assert_close(ours, module.weight, rtol=1e-5, atol=1e-6)
        regs.after_step([0.0])
        with torch.no_grad():
            for module, layer in zip(plain, layers, strict=True):
                step = 0.01 * torch.randn(module.parametrizations.weight.original.shape, generator=generator)
                module.parametrizations.weight.original.add_(step)
                layer.weight[0].add_(step.view_as(layer.weight[0]))
    model.eval()
    for module, layer in zip(plain, layers, strict=True):
        module.eval()
        torch.testing.assert_close(effective_weight(layer)[0].flatten(1), module.weight, rtol=1e-5, atol=1e-6)


def test_the_normalized_weights_have_spectral_norm_near_the_coefficient():
    cfg = config("unused", "regularizer=spectral_norm", "regularizer.spectral_norm.coefficient=2")
    regs = build_regularization([cfg["regularizer"], {}], [0, 1])
    model = build_model(cfg["model"], Architecture((1, 40), 10, [0, 1], regs.dropout_plans()))
    regs.setup(model)
    model.train()
    for _ in range(200):  # power iteration converges over steps
        for layer in (m for m in model.modules() if hasattr(m, "weight_transform")):
            normalized = effective_weight(layer)
        regs.after_step([0.0, 0.0])
    for layer in (m for m in model.modules() if hasattr(m, "weight_transform")):
        normalized = effective_weight(layer)
        assert torch.linalg.matrix_norm(normalized[0], ord=2).item() == pytest.approx(2.0, rel=1e-3)
        assert torch.equal(normalized[1], layer.weight[1])  # the member without it: its weights untouched


def test_a_non_positive_coefficient_is_refused():
    with pytest.raises(
        ConfigError, match="regularizer.spectral_norm.coefficient=0 is not allowed: a number > 0"
    ):
        validate(config("unused", "regularizer=spectral_norm", "regularizer.spectral_norm.coefficient=0"))
