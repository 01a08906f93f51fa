"""Dropout from scratch vs nn.Dropout*, Monte Carlo dropout and the max-norm constraint."""

import math

import pytest
import torch
from torch import nn

from reglab.regularizers.dropout import (
    ChannelDropout,
    Dropout,
    build_dropout,
    channel_dropout,
    dropout,
    max_norm_,
    mc_predict,
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
        ChannelDropout(p)


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


def test_modules_follow_train_and_eval():
    x = _positive(8, 4, 6, 6)
    for layer in (Dropout(0.5), ChannelDropout(0.5)):
        assert "p=0.5" in repr(layer)
        assert torch.equal(layer.eval()(x), x)
        assert (layer.train()(x) == 0).any()


@pytest.mark.parametrize(
    ("impl", "spatial_dims", "expected"),
    [
        ("scratch", 0, Dropout),
        ("scratch", 2, ChannelDropout),
        ("torch", 0, nn.Dropout),
        ("torch", 1, nn.Dropout1d),
        ("torch", 2, nn.Dropout2d),
        ("torch", 3, nn.Dropout3d),
    ],
)
def test_build_dropout(impl, spatial_dims, expected):
    layer = build_dropout(0.3, impl=impl, spatial_dims=spatial_dims)
    assert type(layer) is expected and layer.p == 0.3
    assert isinstance(build_dropout(0.0, impl=impl, spatial_dims=spatial_dims), nn.Identity)


@pytest.mark.parametrize("impl", ["scratch", "torch"])
def test_build_dropout_element_wise_on_feature_maps(impl):
    torch.manual_seed(0)
    kept = build_dropout(0.5, impl=impl, spatial_dims=0)(_positive(4, 8, 6, 6)) != 0
    mixed_channels = kept.flatten(2).any(2) & ~kept.flatten(2).all(2)
    assert mixed_channels.all()


@pytest.mark.parametrize(
    ("key", "kwargs"), [("impl", {"impl": "keras"}), ("spatial_dims", {"spatial_dims": 4})]
)
def test_build_dropout_rejects_unknown_arguments(key, kwargs):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=rf"{key}={value!r}.*allowed values"):
        build_dropout(0.5, **kwargs)


def _mc_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        Dropout(0.5),
        nn.Linear(32, 32),
        nn.Dropout(0.5),
        nn.Linear(32, 4),
    )


@pytest.mark.parametrize("train_before", [True, False])
def test_mc_predict(train_before):
    model = _mc_model().train(train_before)
    x = torch.randn(16, 5, generator=_generator())
    batchnorm = model[1]
    running_mean = batchnorm.running_mean.clone()
    modes = [m.training for m in model.modules()]

    torch.manual_seed(1)
    mean_probs, entropy = mc_predict(model, x, samples=20)

    assert [m.training for m in model.modules()] == modes
    assert torch.equal(batchnorm.running_mean, running_mean)  # batch norm ran in eval mode
    torch.testing.assert_close(mean_probs.sum(-1), torch.ones(16))
    torch.testing.assert_close(entropy, torch.distributions.Categorical(probs=mean_probs).entropy())
    with torch.no_grad():
        deterministic = torch.softmax(model.eval()(x), -1)
    assert not torch.allclose(mean_probs, deterministic)  # both dropout kinds were sampling


def test_mc_predict_turns_on_torch_and_scratch_dropout():
    for layer in (Dropout(0.5), nn.Dropout(0.5), nn.Dropout2d(0.5)):
        model = nn.Sequential(layer, nn.Flatten()).eval()
        x = torch.ones(2, 3, 4, 4)
        torch.manual_seed(0)
        one_pass, _ = mc_predict(model, x, samples=1)
        assert not torch.allclose(one_pass, torch.softmax(x.flatten(1), -1))
        assert not layer.training


def test_mc_predict_rejects_zero_samples():
    with pytest.raises(ValueError, match="samples=0"):
        mc_predict(_mc_model(), torch.zeros(2, 5), samples=0)


def _scaled_up(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(torch.rand(p.shape[0], *[1] * (p.ndim - 1), generator=_generator()) * 20)
    return module


@pytest.mark.parametrize(
    ("layer", "unit_dim"),
    [
        (nn.Linear(20, 10), 0),
        (nn.Conv2d(3, 8, 3), 0),
        (nn.Conv1d(4, 6, 5, groups=2), 0),
        (nn.ConvTranspose2d(3, 8, 3), 1),
    ],
)
def test_max_norm_matches_torch_renorm(layer, unit_dim):
    torch.manual_seed(0)
    layer = _scaled_up(layer)
    expected = torch.renorm(layer.weight.detach(), p=2, dim=unit_dim, maxnorm=2.0)
    bias = layer.bias.detach().clone()
    max_norm_(nn.Sequential(layer), 2.0)
    # renorm adds a 1e-7 guard to the norm, so agreement is to float32 precision, not bitwise.
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.bias, bias)


def test_max_norm_grouped_transposed_conv():
    torch.manual_seed(0)
    layer = _scaled_up(nn.ConvTranspose1d(4, 6, 3, groups=2))  # weight (4, 3, 3): 2 groups of 2 inputs
    max_norm_(layer, 1.0)
    w = layer.weight.detach()
    norms = [w[2 * (out // 3) : 2 * (out // 3) + 2, out % 3].norm() for out in range(6)]
    assert max(norms) <= 1.0 + 1e-6
    assert min(norms) > 0.99  # every output channel was above the bound, so each now sits on it


def test_max_norm_leaves_small_units_alone():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0, 0, 0], [0.1, 0, 0, 0], [0, 0, 0, 0]]))
    max_norm_(layer, 1.0)
    torch.testing.assert_close(
        layer.weight.detach(), torch.tensor([[0.6, 0.8, 0, 0], [0.1, 0, 0, 0], [0, 0, 0, 0]])
    )


@pytest.mark.parametrize("c", [0.0, -1.0])
def test_max_norm_rejects_non_positive_bound(c):
    with pytest.raises(ValueError, match=f"c={c}"):
        max_norm_(nn.Linear(2, 2), c)
