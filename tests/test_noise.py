"""Noise injection against Bishop's closed form, the stacked layer against its formula, and its config rules."""

from __future__ import annotations

import math

import pytest
import torch

from reglab.errors import ConfigError
from reglab.models import Architecture, build_model
from reglab.regularizers import build_regularization
from reglab.regularizers.l1_l2 import l2_penalty
from reglab.regularizers.noise import NoiseSetting, StackedNoise, gaussian_dropout, gaussian_noise
from reglab.schema import validate
from tests.test_config import composed


def _linear_problem(n=200, features=5, outputs=3):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, features, generator=g), torch.randn(n, outputs, generator=g)
    weight, bias = torch.randn(outputs, features, generator=g), torch.randn(outputs, generator=g)
    return x.double(), y.double(), weight.double(), bias.double()


def _half_squared_loss(x, y, weight, bias):
    """ℓ = ½‖Wx + b − y‖² per sample."""
    return 0.5 * ((x @ weight.T + bias - y) ** 2).sum(-1)


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_noisy_inputs_give_the_clean_loss_plus_bishops_l2_term(mode):
    """Monte Carlo mean of the noisy loss == closed form (noise.py's docstring), within 5 standard errors.

    Per sample the noise reaches the output as u = W(σε) or W(x ⊙ σε) ~ N(0, Σᵢ) with Σᵢ = W DᵢWᵀ (Dᵢ = σ²I or
    σ²·diag(xᵢ²)), so E[½‖rᵢ + u‖²] = ½‖rᵢ‖² + ½ tr Σᵢ and Var[½‖rᵢ + u‖²] = rᵢᵀΣᵢrᵢ + ½ tr(Σᵢ²). The mean over n
    samples and M draws each has variance Σᵢ Var / (n²M): the tolerance comes from that, not from a guess.
    """
    x, y, weight, bias = _linear_problem()
    sigma, draws = 0.7, 4000
    generator = torch.Generator().manual_seed(1)
    perturb = gaussian_noise if mode == "additive" else gaussian_dropout
    noisy = perturb(x.expand(draws, *x.shape), sigma, generator=generator)
    monte_carlo = _half_squared_loss(noisy, y, weight, bias).mean()

    residual = x @ weight.T + bias - y
    if mode == "additive":
        scales = torch.full_like(x, sigma**2)  # D = σ²I: the penalty is ½σ²‖W‖², reglab's L2 at λ = σ²
        penalty = 0.5 * sigma**2 * l2_penalty([weight.unsqueeze(0)])[0]
    else:
        scales = sigma**2 * x**2  # D = σ²·diag(x²): a data-dependent ridge
        penalty = 0.5 * (scales @ (weight**2).T).sum(-1).mean()
    clean = _half_squared_loss(x, y, weight, bias).mean()
    closed_form = clean + penalty

    covariances = torch.einsum("of,nf,pf->nop", weight, scales, weight)  # Σᵢ = W Dᵢ Wᵀ
    variances = torch.einsum("no,nop,np->n", residual, covariances, residual) + 0.5 * (covariances**2).sum(
        (1, 2)
    )
    tolerance = 5 * math.sqrt(variances.sum() / (len(x) ** 2 * draws))
    assert abs(monte_carlo - closed_form) < tolerance
    assert penalty > 20 * tolerance  # the check can tell the noisy loss from the clean one


def test_the_stacked_layer_adds_each_members_own_noise_and_leaves_the_others_alone():
    x = torch.randn(3, 8, 6)
    generators = [torch.Generator().manual_seed(seed) for seed in (10, 11, 12)]
    settings = [NoiseSetting(0.5, "additive"), None, NoiseSetting(0.2, "multiplicative")]
    out = StackedNoise(settings, generators)(x)
    first, last = (torch.Generator().manual_seed(seed) for seed in (10, 12))
    torch.testing.assert_close(out[0], x[0] + 0.5 * torch.randn(8, 6, generator=first), rtol=0, atol=0)
    assert torch.equal(out[1], x[1])
    torch.testing.assert_close(out[2], x[2] * (1 + 0.2 * torch.randn(8, 6, generator=last)))
    assert torch.equal(StackedNoise(settings, generators).eval()(x), x)


def _model_with(regularizer: dict, model: dict, shape=(1, 40)):
    regs = build_regularization([regularizer])
    arch = Architecture(shape, 10, [0], regs.dropout_plans(), regs.model_layers)
    return build_model(model, arch)


@pytest.mark.parametrize(
    ("model", "sites"),
    [
        ({"name": "mlp", "hidden": [16, 16], "activation": "relu"}, 3),  # input, two hidden layers
        (
            {"name": "resmlp", "width": 16, "blocks": 2, "hidden": [], "activation": "relu"},
            4,
        ),  # + each branch
        ({"name": "cnn1d", "channels": [4, 4], "kernel_size": 3, "hidden": [], "activation": "relu"}, 3),
    ],
)
def test_noise_sits_on_the_input_and_after_every_hidden_activation(model, sites):
    settings = {"input_sigma": 0.3, "hidden_sigma": 0.1, "mode": "additive"}
    layers = [m for m in _model_with({"noise": settings}, model).modules() if isinstance(m, StackedNoise)]
    assert [layer.settings[0].sigma for layer in layers] == [0.3] + [0.1] * (sites - 1)
    only_input = {**settings, "hidden_sigma": 0.0}
    assert (
        len([m for m in _model_with({"noise": only_input}, model).modules() if isinstance(m, StackedNoise)])
        == 1
    )


def test_noise_is_the_identity_in_evaluation():
    model = {"name": "mlp", "hidden": [16], "activation": "relu"}
    x = torch.randn(1, 4, 1, 40)
    noisy = _model_with(
        {"noise": {"input_sigma": 1.0, "hidden_sigma": 1.0, "mode": "additive"}}, model
    ).eval()
    assert torch.equal(noisy(x), _model_with({}, model).eval()(x))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("regularizer.noise.input_sigma=-0.1", "regularizer.noise.input_sigma"),
        ("regularizer.noise.hidden_sigma=nan", "regularizer.noise.hidden_sigma"),
        ("regularizer.noise.mode=salt", "regularizer.noise.mode"),
    ],
)
def test_bad_noise_settings_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as error:
        validate(composed("regularizer=noise", override))
    assert error.value.key == key and "\n" not in str(error.value)


def test_hidden_noise_without_hidden_layers_is_refused():
    from reglab.errors import ConfigError
    from reglab.schema import validate
    from tests.test_loop import config

    with pytest.raises(ConfigError, match="regularizer.noise.hidden_sigma=0.2 is not allowed: 0 for an MLP"):
        validate(
            config("unused", "regularizer=noise", "regularizer.noise.hidden_sigma=0.2", "model.hidden=[]")
        )
