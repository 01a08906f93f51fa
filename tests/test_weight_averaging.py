"""SWA and EMA: the averages equal torch.optim.swa_utils.AveragedModel's on the same weights, SWA's rates equal
SWALR's, the averaged model is the one evaluated, and a resumed run ends exactly like an uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

from reglab.errors import ConfigError
from reglab.loop import Job, train
from reglab.models import Architecture, build_model
from reglab.regularizers import build_regularization
from reglab.regularizers.weight_averaging import ema_update_, swa_learning_rate, swa_update_
from reglab.schema import validate
from tests.conftest import read_metrics, read_summary
from tests.test_loop import config

QUICK = ["trainer.epochs=4", "dataset.n_train=300", "trainer.save_weights=false"]


def weight_sequence(steps: int = 7) -> tuple[nn.Module, list[list[torch.Tensor]]]:
    """A small module and a random walk of its weights."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    walk = []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        walk.append([p.detach().clone() for p in model.parameters()])
    return model, walk


def replay(model: nn.Module, walk, averaged: AveragedModel) -> list[torch.Tensor]:
    for weights in walk:
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights, strict=True):
                p.copy_(w)
        averaged.update_parameters(model)
    return [p.detach() for p in averaged.module.parameters()]


def ours(walk, update) -> list[torch.Tensor]:
    average = [w.clone() for w in walk[0]]
    for n, weights in enumerate(walk[1:], start=1):
        update(average, weights, n)
    return average


@pytest.mark.parametrize("builtin", [False, True])
def test_swa_equals_averaged_model_and_the_plain_mean(builtin):
    from torch.optim.swa_utils import get_swa_multi_avg_fn

    model, walk = weight_sequence()
    reference = replay(model, walk, AveragedModel(model))
    update = get_swa_multi_avg_fn() if builtin else swa_update_
    mine = ours(walk, update)
    for m, r, column in zip(mine, reference, zip(*walk, strict=True), strict=True):
        torch.testing.assert_close(m, r)
        torch.testing.assert_close(m, torch.stack(column).mean(0))  # the equal average itself


@pytest.mark.parametrize("builtin", [False, True])
def test_ema_equals_averaged_model_with_the_ema_function(builtin):
    model, walk = weight_sequence()
    decay = 0.9
    reference = replay(model, walk, AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)))
    update = (
        (lambda a, w, n: get_ema_multi_avg_fn(decay)(a, w, n))
        if builtin
        else (lambda a, w, n: ema_update_(a, w, decay))
    )
    for m, r in zip(ours(walk, update), reference, strict=True):
        torch.testing.assert_close(m, r)


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("anneal_epochs", [0, 1, 4])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_swa_learning_rates_equal_swalr(strategy, anneal_epochs, schedule):
    epochs, start, swa_lr, lr = 12, 5, 0.002, 0.01  # start: SWA's first epoch, counted from 0
    plan = (
        (lambda e: lr * (1 + math.cos(math.pi * e / epochs)) / 2) if schedule == "cosine" else (lambda e: lr)
    )
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    theirs, scheduler = [], None
    for epoch in range(epochs):
        if epoch < start:
            optimizer.param_groups[0]["lr"] = plan(epoch)
        elif scheduler is None:  # SWALR created just before SWA's first epoch, stepped after every epoch
            optimizer.param_groups[0]["lr"] = plan(epoch)
            scheduler = SWALR(optimizer, swa_lr, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # (no gradients: nothing moves) the order schedulers expect
        if scheduler is not None:
            scheduler.step()
    mine = [
        plan(e) if e < start else swa_learning_rate(e, start, swa_lr, plan(start), anneal_epochs, strategy)
        for e in range(epochs)
    ]
    assert mine == pytest.approx(theirs, rel=1e-12)


def test_update_bn_has_nothing_to_do_in_reglabs_models():
    cfg = config("unused", "regularizer=swa")
    model = build_model(
        cfg["model"], Architecture((1, 40), 10, [0], [build_regularization([{}]).dropout_plans()[0]])
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    update_bn([torch.randn(8, 1, 1, 40)], model)  # no BatchNorm layer: nothing to recompute
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_averaged_model_is_evaluated_and_the_last_one_recorded_beside_it(tmp_path, data_root):
    cfg = config(
        data_root, *QUICK, "regularizer=swa", "regularizer.swa.start_epoch=2", "trainer.save_weights=true"
    )
    train(cfg, tmp_path, Job())
    summary = read_summary(tmp_path)
    assert summary["swa/averaged"] == 3  # epochs 2, 3, 4
    assert (
        summary["test/acc"] != summary["test/last_acc"] or summary["test/loss"] != summary["test/last_loss"]
    )
    # the average's, not the last epoch's
    assert summary["val/loss"] != read_metrics(tmp_path)[-1]["val/loss"]
    # the evaluated average is saved beside the last weights, under the same names
    averaged, last = torch.load(tmp_path / "averaged.pt"), torch.load(tmp_path / "last.pt")
    assert averaged.keys() == last.keys() and not torch.equal(
        averaged["dense1.weight"], last["dense1.weight"]
    )


def test_swa_takes_over_the_learning_rate_from_its_start(tmp_path, data_root):
    cfg = config(
        data_root,
        *QUICK,
        "regularizer=swa",
        "regularizer.swa.start_epoch=2",
        "regularizer.swa.lr=0.001",
        "regularizer.swa.anneal_epochs=0",
    )
    train(cfg, tmp_path, Job())
    assert [row["lr"] for row in read_metrics(tmp_path)] == [0.01, 0.001, 0.001, 0.001]


def test_ema_with_decay_zero_is_the_plain_model(tmp_path, data_root):
    for name, extra in (("ema", ["regularizer=ema", "regularizer.ema.decay=0"]), ("plain", [])):
        (tmp_path / name).mkdir()
        train(config(data_root, *QUICK, *extra), tmp_path / name, Job())
    assert read_summary(tmp_path / "ema")["test/loss"] == read_summary(tmp_path / "plain")["test/loss"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("regularizer.swa.start_epoch=0", "regularizer.swa.start_epoch"),
        ("regularizer.swa.start_epoch=200", "regularizer.swa.start_epoch"),
        ("regularizer.swa.lr=-1", "regularizer.swa.lr"),
        ("regularizer.swa.anneal_strategy=step", "regularizer.swa.anneal_strategy"),
    ],
)
def test_bad_swa_values_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        validate(config("unused", "regularizer=swa", override))


def test_bad_ema_decay_is_refused():
    with pytest.raises(ConfigError, match="regularizer.ema.decay=1 is not allowed"):
        validate(config("unused", "regularizer=ema", "regularizer.ema.decay=1"))


def test_two_weight_averages_at_once_are_refused():
    with pytest.raises(ConfigError, match=r"regularizer='\[swa,ema\]' is not allowed: one weight average"):
        validate(config("unused", "regularizer=[swa,ema]"))
