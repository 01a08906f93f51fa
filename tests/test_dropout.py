"""Dropout from scratch vs nn.Dropout*, Monte Carlo dropout and the max-norm constraint."""

import math

import pytest
import torch
from torch import nn

from reglab.models import Architecture, build_model
from reglab.regularizers.dropout import (
    DropoutPlan,
    StackedDropout,
    channel_dropout,
    dropout,
    max_norm_,
    mc_predict,
    torch_dropout,
)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _positive(*shape: int) -> torch.Tensor:
    # Strictly positive inputs: an output of 0 can then only mean "dropped".
    return torch.rand(*shape, generator=_generator(1)) + 0.5


def _assert_inverted_dropout(x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
    """Every output is either 0 or x/(1-p); returns the keep mask."""
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    return kept


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_matches_nn_dropout_statistics(p):
    x = _positive(200, 500)
    kept_scratch = _assert_inverted_dropout(x, dropout(x, p, generator=_generator()), p)
    torch.manual_seed(0)
    kept_torch = _assert_inverted_dropout(x, nn.Dropout(p)(x), p)
    # 100k Bernoulli draws: the drop rate is within ~4 standard deviations (0.006) of p.
    for kept in (kept_scratch, kept_torch):
        assert abs(1 - kept.float().mean().item() - p) < 0.006


def test_dropout_keeps_the_expectation():
    x = _positive(1000, 100)
    mean_over_masks = torch.stack([dropout(x, 0.5, generator=_generator(s)) for s in range(50)]).mean(0)
    assert abs(mean_over_masks.mean().item() / x.mean().item() - 1) < 0.01


def test_dropout_gradient_is_the_scaled_mask():
    x = _positive(64, 32).requires_grad_()
    y = dropout(x, 0.3, generator=_generator())
    y.sum().backward()
    expected = (y != 0).float() / 0.7
    torch.testing.assert_close(x.grad, expected)


def test_dropout_is_deterministic_with_a_seeded_generator():
    x = _positive(10, 10)
    assert torch.equal(dropout(x, 0.5, generator=_generator(3)), dropout(x, 0.5, generator=_generator(3)))


def test_dropout_identity_when_off():
    x = _positive(4, 5)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    assert channel_dropout(x.view(2, 2, 5), 0.5, training=False).data_ptr() == x.data_ptr()


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_invalid_probability_names_the_value(p):
    with pytest.raises(ValueError, match=f"p={p}"):
        dropout(torch.ones(3), p)
    with pytest.raises(ValueError, match=f"p={p}"):
        StackedDropout.at("dense", [DropoutPlan(p=p)], [_generator()])


@pytest.mark.parametrize(
    ("shape", "torch_layer"),
    [((8, 16, 50), nn.Dropout1d), ((8, 16, 7, 7), nn.Dropout2d), ((8, 16, 3, 4, 5), nn.Dropout3d)],
)
def test_channel_dropout_drops_whole_channels_like_torch(shape, torch_layer):
    p = 0.4
    x = _positive(*shape)
    torch.manual_seed(0)
    for y in (channel_dropout(x, p, generator=_generator()), torch_layer(p)(x)):
        kept = _assert_inverted_dropout(x, y, p).flatten(2)
        # Each (sample, channel) slice is kept or dropped as a whole, and both outcomes occur.
        assert torch.equal(kept.all(dim=2), kept.any(dim=2))
        assert 0 < kept[:, :, 0].float().mean() < 1


@pytest.mark.parametrize("p", [0.1, 0.4, 0.7])
def test_channel_dropout_drops_channels_at_rate_p_like_torch(p):
    """Over 64 x 512 = 32768 (sample, channel) slices the dropped share lies within 5 binomial standard deviations
    of p, for the scratch version and for nn.Dropout1d alike."""
    x = torch.ones(64, 512, 3)
    n = 64 * 512
    bound = 5 * math.sqrt(p * (1 - p) / n)
    torch.manual_seed(1)
    for y in (channel_dropout(x, p, generator=_generator()), nn.Dropout1d(p)(x)):
        dropped = (y[:, :, 0] == 0).float().mean().item()
        assert abs(dropped - p) < bound


def test_channel_dropout_needs_a_spatial_dim():
    with pytest.raises(ValueError, match="spatial"):
        channel_dropout(torch.ones(4, 3), 0.5)


def _stacked(plans: list[DropoutPlan], where="dense", spatial_dims=0, seeds=None) -> StackedDropout:
    generators = [_generator(seed) for seed in (seeds or range(len(plans)))]
    return StackedDropout.at(where, plans, generators, spatial_dims)


def test_stacked_dropout_follows_train_and_eval():
    x = _positive(2, 8, 4, 6, 6)
    layer = _stacked([DropoutPlan(conv_p=0.5), DropoutPlan(conv_p=0.5, conv_kind="element")], "conv", 2)
    assert "p=[0.5, 0.5]" in repr(layer)
    assert torch.equal(layer.eval()(x), x)
    kept = layer.train()(x) != 0
    assert torch.equal(kept[0].flatten(2).all(2), kept[0].flatten(2).any(2))  # channel-wise for member 0
    assert not torch.equal(kept[1].flatten(2).all(2), kept[1].flatten(2).any(2))  # element-wise for member 1


def test_a_member_drops_exactly_as_alone_whatever_its_neighbours():
    """Member k's mask comes from its own generator: the same in a stack as in a stack of one."""
    x = _positive(3, 16, 20)
    plans = [DropoutPlan(p=0.3), DropoutPlan(), DropoutPlan(p=0.6)]
    stacked = _stacked(plans)(x)
    for k, plan in enumerate(plans):
        alone = _stacked([plan], seeds=[k]) if plan.p else None
        expected = alone(x[k : k + 1])[0] if alone is not None else x[k]
        assert torch.equal(stacked[k], expected)
    assert torch.equal(stacked[1], x[1])  # rate 0: untouched


def test_no_layer_when_no_member_drops_there():
    assert _stacked([DropoutPlan(p=0.5)], "input") is None
    assert _stacked([DropoutPlan(), DropoutPlan()], "dense") is None


@pytest.mark.parametrize("spatial_dims", [0, 1, 2])
def test_torch_twin_drops_at_rate_p(spatial_dims):
    x = torch.ones(256, 64, *[3] * spatial_dims)
    torch.manual_seed(0)
    kept = torch_dropout(x, 0.4, spatial_dims) != 0
    assert abs(1 - kept.float().mean().item() - 0.4) < 0.02
    if spatial_dims:
        assert torch.equal(kept.flatten(2).all(2), kept.flatten(2).any(2))


def _mc_model(plans) -> torch.nn.Module:
    arch = Architecture((1, 5), 4, seeds=list(range(len(plans))), dropout=plans)
    return build_model({"name": "mlp", "hidden": [32, 32], "activation": "relu"}, arch)


@pytest.mark.parametrize("train_before", [True, False])
def test_mc_predict(train_before):
    model = _mc_model([DropoutPlan(p=0.5), DropoutPlan(p=0.5, impl="torch")]).train(train_before)
    x = torch.randn(16, 5, generator=_generator())
    modes = [m.training for m in model.modules()]

    mean_probs, entropy = mc_predict(model, x, samples=20, batch_size=5, members=2)

    assert mean_probs.shape == (2, 16, 4) and entropy.shape == (2, 16)
    assert [m.training for m in model.modules()] == modes
    torch.testing.assert_close(mean_probs.sum(-1), torch.ones(2, 16))
    torch.testing.assert_close(entropy, torch.distributions.Categorical(probs=mean_probs).entropy())
    with torch.no_grad():
        deterministic = torch.softmax(model.eval()(x.expand(2, 16, 5)), -1)
    assert not torch.allclose(mean_probs[0], deterministic[0])  # scratch dropout was sampling
    assert not torch.allclose(mean_probs[1], deterministic[1])  # built-in dropout too


def test_mc_predict_of_one_member_leaves_the_others_alone():
    model = _mc_model([DropoutPlan(p=0.5), DropoutPlan(p=0.5)])
    x = torch.randn(8, 5, generator=_generator())
    states = [
        layer.generators[1].get_state() for layer in model.modules() if isinstance(layer, StackedDropout)
    ]
    probs, _ = mc_predict(model, x, samples=3, batch_size=8, members=2, only=0)
    after = [
        layer.generators[1].get_state() for layer in model.modules() if isinstance(layer, StackedDropout)
    ]
    assert all(torch.equal(a, b) for a, b in zip(states, after, strict=True))  # member 1 drew nothing
    with torch.no_grad():
        torch.testing.assert_close(probs[1], torch.softmax(model.eval()(x.expand(2, 8, 5)), -1)[1])


def test_mc_predict_rejects_zero_samples():
    with pytest.raises(ValueError, match="samples=0"):
        mc_predict(_mc_model([DropoutPlan(p=0.5)]), torch.zeros(2, 5), samples=0, batch_size=2, members=1)


def _scaled_up(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(torch.rand(p.shape[0], *[1] * (p.ndim - 1), generator=_generator()) * 20)
    return module


@pytest.mark.parametrize("layer", [nn.Linear(20, 10), nn.Conv2d(3, 8, 3), nn.Conv1d(4, 6, 5)])
def test_max_norm_matches_torch_renorm(layer):
    torch.manual_seed(0)
    layer = _scaled_up(layer)
    expected = torch.renorm(layer.weight.detach(), p=2, dim=0, maxnorm=2.0)
    max_norm_([layer.weight], 2.0)
    # renorm adds a 1e-7 guard to the norm, so agreement is to float32 precision, not bitwise.
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-5, atol=1e-6)


def test_max_norm_leaves_small_units_alone():
    weight = torch.tensor([[3.0, 4.0, 0, 0], [0.1, 0, 0, 0], [0, 0, 0, 0]])
    max_norm_([weight], 1.0)
    torch.testing.assert_close(weight, torch.tensor([[0.6, 0.8, 0, 0], [0.1, 0, 0, 0], [0, 0, 0, 0]]))


@pytest.mark.parametrize("c", [0.0, -1.0])
def test_max_norm_rejects_non_positive_bound(c):
    with pytest.raises(ValueError, match=f"c={c}"):
        max_norm_([torch.ones(2, 2)], c)


@pytest.mark.parametrize("output_layer", [False, True])
def test_max_norm_constrains_hidden_units_and_the_output_layer_only_when_asked(output_layer):
    """Srivastava et al. bound the incoming weights of hidden units; the output layer is an option."""
    from reglab.regularizers import build_regularization

    node = {
        "p": 0.0,
        "input_p": 0.0,
        "conv_p": None,
        "conv_kind": "channel",
        "impl": "scratch",
        "mc_samples": 0,
    }
    regs = build_regularization([{"dropout": {**node, "max_norm": 0.5, "max_norm_output": output_layer}}])
    model = _mc_model(regs.dropout_plans())
    regs.setup(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(100)
    regs.after_step([0.1])
    row_norms = [
        p[0].norm(dim=1).max().item() for name, p in model.named_parameters() if name.endswith("weight")
    ]
    assert all(norm <= 0.5 + 1e-6 for norm in row_norms[:-1])
    assert (row_norms[-1] <= 0.5 + 1e-6) == output_layer
