"""Stochastic depth from scratch vs torchvision's, the linear rule over depth, and its config rules."""

from __future__ import annotations

import signal

import pytest
import torch
from torchvision.ops import StochasticDepth
from torchvision.ops import stochastic_depth as torchvision_stochastic_depth

from reglab.errors import ConfigError
from reglab.models import Architecture, build_model
from reglab.regularizers import build_regularization
from reglab.regularizers.stochastic_depth import StackedStochasticDepth, stochastic_depth
from reglab.schema import validate
from tests.conftest import read_metrics, run_train
from tests.test_config import composed
from tests.test_faults import start_run, wait_for_epochs
from tests.test_stack import without_time

RESMLP = {"name": "resmlp", "width": 16, "blocks": 4, "hidden": [], "activation": "relu"}


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(64, 16), (64, 8, 20), (32, 4, 6, 6)])
def test_scratch_equals_torchvision_on_the_same_draws(p, shape):
    """torch's global generator and a Generator seeded alike draw the same Bernoulli stream on the CPU: same draws,
    and then the same output, bit for bit, from the function and from the module in "row" mode."""
    x = torch.randn(shape)
    mine = stochastic_depth(x, p, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    assert torch.equal(mine, torchvision_stochastic_depth(x, p, "row", training=True))
    torch.manual_seed(7)
    assert torch.equal(mine, StochasticDepth(p, "row").train()(x))


def test_a_sample_keeps_its_whole_branch_scaled_or_loses_it():
    x = torch.rand(4000, 3, 5) + 0.5  # positive: a zero can only mean "dropped"
    out = stochastic_depth(x, 0.3, generator=torch.Generator().manual_seed(0))
    dropped = (out == 0).flatten(1)
    assert (dropped.all(1) | ~dropped.any(1)).all()  # per sample, all or nothing
    kept = ~dropped.all(1)
    torch.testing.assert_close(out[kept], x[kept] / 0.7)
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.03  # 4000 draws: within ~4 standard deviations
    assert torch.equal(stochastic_depth(x, 0.3, training=False), x)


def _model(settings: dict | None, model=RESMLP, seeds=(0,)):
    nodes = [{"stochastic_depth": settings} if settings else {} for _ in seeds]
    regs = build_regularization(nodes)
    arch = Architecture((1, 40), 10, list(seeds), regs.dropout_plans(), regs.model_layers)
    return build_model(model, arch)


def _drop_layers(model):
    return [m for m in model.modules() if isinstance(m, StackedStochasticDepth)]


@pytest.mark.parametrize(
    ("rule", "expected"), [("linear", [0.125, 0.25, 0.375, 0.5]), ("uniform", [0.5] * 4)]
)
def test_drop_probabilities_follow_the_rule_over_depth(rule, expected):
    layers = _drop_layers(_model({"p": 0.5, "rule": rule, "impl": "scratch"}))
    assert [layer.settings[0].p for layer in layers] == expected


def test_the_resnet_drops_each_block_too():
    resnet = {"name": "resnet", "channels": [4, 4, 8], "kernel_size": 3, "hidden": [], "activation": "relu"}
    layers = _drop_layers(_model({"p": 0.4, "rule": "linear", "impl": "scratch"}, resnet))
    assert [layer.settings[0].p for layer in layers] == [0.2, 0.4]


def test_evaluation_is_the_plain_network_and_training_drops_blocks():
    x = torch.randn(1, 64, 1, 40)
    dropping, plain = _model({"p": 0.5, "rule": "linear", "impl": "scratch"}), _model(None)
    assert torch.equal(dropping.eval()(x), plain.eval()(x))
    assert not torch.equal(dropping.train()(x), plain.train()(x))


def test_a_member_without_it_is_untouched_in_a_stack():
    x = torch.randn(2, 16, 1, 40)
    regs = build_regularization([{"stochastic_depth": {"p": 0.5, "rule": "linear", "impl": "scratch"}}, {}])
    stacked = build_model(RESMLP, Architecture((1, 40), 10, [0, 1], regs.dropout_plans(), regs.model_layers))
    alone = _model(None, seeds=(1,))
    assert torch.equal(stacked.train()(x)[1], alone.train()(x[1:])[0])


def test_it_needs_a_residual_model():
    with pytest.raises(ConfigError) as error:
        validate(composed("regularizer=stochastic_depth"))  # the default model is the MLP
    assert error.value.key == "model" and "resmlp or resnet" in str(error.value)
    validate(composed("regularizer=stochastic_depth", "model=resmlp"))
    validate(composed("regularizer=stochastic_depth", "model=resnet"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("regularizer.stochastic_depth.p=1.0", "regularizer.stochastic_depth.p"),
        ("regularizer.stochastic_depth.rule=cubic", "regularizer.stochastic_depth.rule"),
        ("regularizer.stochastic_depth.impl=timm", "regularizer.stochastic_depth.impl"),
    ],
)
def test_bad_settings_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as error:
        validate(composed("model=resmlp", "regularizer=stochastic_depth", override))
    assert error.value.key == key and "\n" not in str(error.value)


@pytest.mark.slow  # three runs through train.py, one of them stopped by a signal
def test_a_resumed_run_draws_the_same_drops_and_noise_as_an_uninterrupted_one(tmp_path, data_root):
    """The draws come from the member's noise generator, which the checkpoint saves: SIGTERM, resume, same run."""
    args = [
        "logger=none",
        "trainer.plots=false",
        "trainer.save_weights=false",
        "dataset.n_train=300",
        "trainer.epochs=12",
        "trainer.checkpoint_every=0",
        "model=resmlp",
        "model.width=32",
        "model.blocks=3",
        "regularizer=[stochastic_depth,noise]",
        "regularizer.noise.hidden_sigma=0.2",
    ]
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    process = start_run([*args, f"hydra.run.dir={interrupted}"], tmp_path, data_root)
    wait_for_epochs(interrupted / "metrics.jsonl", 3, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, (out, err)
    run_train([*args, "trainer.resume=true", f"hydra.run.dir={interrupted}"], tmp_path, data_root)
    run_train([*args, f"hydra.run.dir={straight}"], tmp_path, data_root)
    assert without_time(read_metrics(interrupted)) == without_time(read_metrics(straight))
