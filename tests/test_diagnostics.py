"""Diagnostics: calibration against torchmetrics and by hand, weight statistics, overfitting onset, plots."""

import math
import random
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reglab import diagnostics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------------
# Calibration and prediction metrics


@pytest.mark.parametrize("n_classes, temperature", [(10, 3.0), (3, 0.5), (2, 1.0)])
def test_ece_matches_torchmetrics(n_classes, temperature):
    from torchmetrics.classification import MulticlassCalibrationError

    generator = torch.Generator().manual_seed(n_classes)
    logits = temperature * torch.randn(2000, n_classes, generator=generator)
    targets = torch.randint(n_classes, (2000,), generator=generator)
    reference = MulticlassCalibrationError(num_classes=n_classes, n_bins=15, norm="l1")(logits, targets)
    ours = diagnostics.prediction_metrics(logits, targets)["ece"]
    assert ours.item() == pytest.approx(reference.item(), abs=1e-6)


def test_ece_by_hand():
    # 2 bins. (0, 0.5]: confidences 0.3 (right), 0.5 (wrong): accuracy 0.5, confidence 0.4 -> |0.1| x 2/5
    # (0.5, 1]: 0.6 (right), 0.8 (right), 1.0 (wrong): accuracy 2/3, confidence 0.8 -> |-2/15| x 3/5
    confidences = torch.tensor([0.3, 0.5, 0.6, 0.8, 1.0])
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    expected = 0.1 * 2 / 5 + (2 / 15) * 3 / 5  # = 0.12
    ece = diagnostics.expected_calibration_error(confidences, correct, n_bins=2)
    assert ece.ndim == 0
    assert ece.item() == pytest.approx(expected)
    perfect = diagnostics.expected_calibration_error(torch.tensor([0.5, 0.5, 1.0]), torch.tensor([1, 0, 1]))
    assert perfect.item() == pytest.approx(0.0)


def test_prediction_metrics_match_cross_entropy_and_accuracy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=generator, requires_grad=True)
    targets = torch.randint(7, (500,), generator=generator)
    metrics = diagnostics.prediction_metrics(logits, targets)
    assert set(metrics) == {"nll", "acc", "ece", "confidence"}
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in metrics.values())
    assert metrics["nll"].item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert metrics["acc"].item() == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert metrics["confidence"].item() == pytest.approx(
        logits.softmax(1).max(1).values.mean().item(), rel=1e-6
    )


def test_prediction_metrics_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    targets = torch.tensor([0, 1, 0])
    metrics = diagnostics.prediction_metrics(logits, targets)
    p = 1 / (1 + math.exp(-2))
    q = 1 / (1 + math.exp(-3))
    assert metrics["nll"].item() == pytest.approx((-math.log(p) - math.log(0.5) - math.log(1 - q)) / 3)
    assert metrics["acc"].item() == pytest.approx(
        1 / 3
    )  # the tie predicts class 0 (wrong), the last is wrong
    assert metrics["confidence"].item() == pytest.approx((p + 0.5 + q) / 3)


def calibrated_logits(n: int = 4000, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z and labels drawn from softmax(z): a perfectly calibrated model by construction."""
    generator = torch.Generator().manual_seed(1)
    logits = 1.5 * torch.randn(n, classes, generator=generator)
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


def test_temperature_fixes_an_overconfident_model():
    logits, labels = calibrated_logits()
    overconfident = 5 * logits
    fit = diagnostics.fit_temperature(overconfident, labels)
    assert 3.5 < fit.temperature < 7.0 and not fit.at_bound  # the true answer is 5
    nll_before = F.cross_entropy(overconfident, labels)
    nll_after = F.cross_entropy(overconfident / fit.temperature, labels)
    assert nll_after < nll_before
    assert diagnostics.fit_temperature(overconfident, labels) == fit  # deterministic


def test_temperature_of_a_calibrated_model_is_about_one():
    logits, labels = calibrated_logits()
    assert 0.85 < diagnostics.fit_temperature(logits, labels).temperature < 1.15


def test_temperature_is_the_minimum_of_the_nll_on_a_fine_grid():
    logits, labels = calibrated_logits(n=500)
    logits = 2.5 * logits.double()
    grid = torch.logspace(-0.5, 1.0, 30001, dtype=torch.float64)  # T from 0.32 to 10, steps of 0.01%
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    best_on_grid = grid[nll.argmin()].item()
    assert diagnostics.fit_temperature(logits, labels).temperature == pytest.approx(best_on_grid, rel=3e-4)


def test_perfectly_separated_logits_hit_the_lower_bound_and_say_so():
    """Every validation sample right with a margin: the NLL falls towards 0 as T -> 0, so there is no optimum;
    the fit must return the bound and flag it, not wherever an optimizer happened to stop."""
    labels = torch.arange(200) % 10
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(200), labels] += 8.0  # the true class beats every other by a wide margin
    assert (logits.argmax(1) == labels).all()
    fit = diagnostics.fit_temperature(logits, labels)
    assert fit == (diagnostics.TEMPERATURE_BOUNDS[0], True)


def test_logits_that_are_always_wrong_hit_the_upper_bound_and_say_so():
    logits = torch.randn(500, 10, generator=torch.Generator().manual_seed(0))
    labels = logits.argmin(1)  # the true class always gets the lowest logit: the NLL falls as T -> inf
    assert diagnostics.fit_temperature(logits, labels) == (diagnostics.TEMPERATURE_BOUNDS[1], True)


# ----------------------------------------------------------------------------------------------------------------
# Weight statistics


def test_weight_statistics_on_hand_set_weights():
    weights = [torch.tensor([[3.0, 0.0], [-4.0, 0.0005]]), torch.tensor([[0.0, 12.0]])]
    stats = diagnostics.weight_statistics(weights)
    assert stats["weights/l2"] == pytest.approx(math.sqrt(9 + 16 + 0.0005**2 + 144))  # sqrt(169 + 2.5e-7)
    assert stats["weights/l1"] == pytest.approx(3 + 4 + 0.0005 + 12)
    assert stats["weights/zero_frac"] == pytest.approx(2 / 6)
    assert stats["weights/small_frac"] == pytest.approx(3 / 6)  # the two zeros and 0.0005
    assert diagnostics.weight_statistics(weights, small=1e-4)["weights/small_frac"] == pytest.approx(2 / 6)
    assert diagnostics.weight_statistics([])["weights/l2"] == 0.0  # no weight tensors at all


def test_weight_statistics_of_a_member_leave_biases_out():
    from reglab.models import Architecture, build_model, member_weights
    from reglab.regularizers.dropout import DropoutPlan

    arch = Architecture((1, 4), 3, seeds=[0, 1], dropout=[DropoutPlan(), DropoutPlan()])
    model = build_model({"name": "mlp", "hidden": [5], "activation": "relu"}, arch)
    weights = member_weights(model, 1)
    assert [tuple(w.shape) for w in weights] == [(5, 4), (3, 5)]
    assert torch.equal(weights[0], model.dense1.weight[1])


# ----------------------------------------------------------------------------------------------------------------
# Overfitting onset


def history(val_losses, train_losses=None):
    train_losses = train_losses or [2.0 * math.exp(-epoch / 20) for epoch in range(1, len(val_losses) + 1)]
    return [
        {"epoch": epoch, "val/loss": val, "train/loss": train}
        for epoch, (val, train) in enumerate(zip(val_losses, train_losses, strict=True), start=1)
    ]


def u_shape(minimum_at: int = 30, epochs: int = 100) -> list[float]:
    return [1.0 + (epoch - minimum_at) ** 2 / 300 for epoch in range(1, epochs + 1)]


def test_onset_of_a_clean_u_is_where_the_rise_passes_the_tolerance_not_the_minimum():
    # 1 + (e-30)^2/300: the minimum is at epoch 30; the loss first exceeds its lowest level by 5% at epoch 35
    assert diagnostics.overfit_onset_epoch(history(u_shape(30))) == 35


def test_onset_of_noisy_u_shape_is_a_few_epochs_after_its_minimum():
    for seed in range(10):
        rng = random.Random(seed)
        noisy = [v * (1 + 0.03 * rng.gauss(0, 1)) for v in u_shape(40)]
        assert 41 <= diagnostics.overfit_onset_epoch(history(noisy)) <= 48, seed


def test_onset_of_a_late_rise_is_where_it_begins_not_at_an_earlier_minimum():
    """A noisy plateau until epoch 80, then a rise of 0.01 per epoch: the lowest validation loss falls anywhere
    on the plateau (epoch 4 to 80 across these seeds), the onset where the rise passes 5% (epoch ~85)."""
    for seed in range(10):
        rng = random.Random(seed)
        late = [1.0 + 0.02 * rng.gauss(0, 1) + 0.01 * max(0, epoch - 80) for epoch in range(1, 121)]
        minimum = 1 + min(range(len(late)), key=late.__getitem__)
        onset = diagnostics.overfit_onset_epoch(history(late))
        assert 81 <= onset <= 90 and onset != minimum, (seed, onset, minimum)


def test_no_onset_while_validation_loss_decreases():
    assert diagnostics.overfit_onset_epoch(history([1 + math.exp(-e / 10) for e in range(1, 101)])) is None


def test_no_onset_on_noisy_flat_validation_loss():
    for seed in range(20):
        rng = random.Random(seed)
        flat = [1.0 + 0.02 * rng.gauss(0, 1) for _ in range(150)]
        assert diagnostics.overfit_onset_epoch(history(flat)) is None, seed


def test_no_onset_from_single_bumps():
    flat = [1.0 - 0.001 * epoch for epoch in range(60)]
    assert diagnostics.overfit_onset_epoch(history([*flat[:-1], 5.0])) is None  # one spike in the last epoch
    assert diagnostics.overfit_onset_epoch(history([*flat[:-3], 5.0, 5.0, flat[-1]])) is None  # two of five
    dip = [*flat[:30], 0.5, *flat[31:]]  # one lucky epoch far below the rest: the rest is no rise
    assert diagnostics.overfit_onset_epoch(history(dip)) is None


def test_no_onset_when_training_loss_rises_too():
    rising_train = [0.5 + epoch / 100 for epoch in range(100)]  # unstable optimization, not overfitting
    assert diagnostics.overfit_onset_epoch(history(u_shape(30), rising_train)) is None


STEEP_V = [1.0, 0.6, 0.45, 0.4, 0.55, 0.7, 0.85, 1.0, 1.1]  # minimum at epoch 4, then +0.15 per epoch


def test_a_run_too_short_to_tell_has_no_onset():
    assert diagnostics.overfit_onset_epoch(history([1.0, 0.5, 0.8])) is None
    assert diagnostics.overfit_onset_epoch(history([1.0, 0.9, 0.8, 0.7])) is None  # still falling
    assert diagnostics.overfit_onset_epoch(history(STEEP_V[:6])) is None  # two epochs after the minimum


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_with_patience_below_3_leaves_too_few_epochs_to_tell(patience):
    """Early stopping ends the run `patience` epochs after the minimum: however steep the rise, 1 or 2 epochs
    cannot tell it from noise; the diagnosis says so instead of claiming there is no overfitting."""
    rows = history(STEEP_V[: 4 + patience])
    assert diagnostics.overfit_onset_epoch(rows) is None
    (line,) = [line for line in diagnostics.diagnose(rows, {}) if "epoch 4" in line]
    assert line.startswith("too early to tell") and f"only {patience} epochs" in line


def test_a_steep_rise_followed_long_enough_has_its_onset_after_the_minimum():
    assert diagnostics.overfit_onset_epoch(history(STEEP_V)) == 6  # 0.7 > 0.55 · 1.05; epoch 5 (0.55) is not


def test_onset_ignores_epochs_after_divergence_and_missing_values():
    rows = history(u_shape(30, epochs=60))
    rows[50]["val/loss"] = float("nan")
    assert diagnostics.overfit_onset_epoch(rows) == 35  # epochs 31-50 already show the rise
    assert diagnostics.overfit_onset_epoch([{"epoch": 1, "val/loss": None, "train/loss": 1.0}]) is None
    assert diagnostics.overfit_onset_epoch([]) is None


# ----------------------------------------------------------------------------------------------------------------
# Diagnosis


def test_diagnosis_of_an_overfitting_early_stopped_sparse_overconfident_run():
    summary = {
        "status": "early_stopped",
        "epochs_run": 100,
        "best_epoch": 30,
        "gap/test_acc": 0.352,
        "train/acc": 1.0,
        "test/acc": 0.65,
        "test/ece": 0.21,
        "test/confidence": 0.86,
        "weights/zero_frac": 0.25,
        "weights/small_frac": 0.4,
    }
    lines = diagnostics.diagnose(history(u_shape(30)), summary)
    assert lines[0] == "early stopping ended training after epoch 100; best epoch 30"
    assert lines[1].startswith(
        "overfitting from epoch 35: validation loss stays more than 5% above its lowest level (1 at epoch 30)"
    )
    assert lines[1].endswith("train-test accuracy gap 35.2 points")
    assert "overconfident: test ECE 0.210 (mean confidence 86% vs accuracy 65%)" in lines
    assert "sparse weights: 25.0% of the weights are exactly zero (40.0% below 1e-3)" in lines
    assert not any("underfits" in line for line in lines)


def test_diagnosis_of_a_healthy_run_and_of_an_underfitting_one():
    decreasing = history([1 + math.exp(-e / 10) for e in range(1, 51)])
    healthy = diagnostics.diagnose(decreasing, {"status": "completed", "train/acc": 0.95, "test/ece": 0.01})
    assert healthy == [
        "no overfitting detected: validation loss was still at its lowest in the last epoch",
        "well calibrated: test ECE 0.010",
    ]
    underfit = diagnostics.diagnose(decreasing, {"status": "completed", "train/acc": 0.42})
    assert any(line.startswith("training accuracy only 42%: the model underfits") for line in underfit)


def test_diagnosis_of_failed_runs_tolerates_missing_values():
    lines = diagnostics.diagnose([], {"status": "failed", "error": "ValueError: bad config", "epochs_run": 0})
    assert lines[0] == "run failed after 0 epochs: ValueError: bad config"
    diverged = diagnostics.diagnose(history([1.0, float("nan")]), {"status": "diverged", "train/acc": None})
    assert diverged[0].startswith("training diverged (non-finite loss) after None epochs")


# ----------------------------------------------------------------------------------------------------------------
# Plots


def test_plots_are_written_as_png(tmp_path):
    rows = history(u_shape(30, epochs=60))
    for row in rows:
        row.update({"train/acc": 0.9, "val/acc": 0.7})
    rows[-1]["val/acc"] = None  # gaps are fine
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(300, 10, generator=generator)
    targets = torch.randint(10, (300,), generator=generator)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[:2].zero_()
    paths = [
        diagnostics.plot_curves(rows, tmp_path / "curves.png", best_epoch=30, onset_epoch=30, stop_epoch=60),
        diagnostics.plot_reliability(logits, targets, tmp_path / "reliability.png"),
        diagnostics.plot_weight_histogram(
            [p for p in model.parameters()], tmp_path / "nested" / "weights.png"
        ),
        diagnostics.plot_weight_histogram([torch.zeros(2, 2)], tmp_path / "zeros.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 5000


def _pixels(path) -> bytes:
    from PIL import Image

    with Image.open(path) as image:
        return image.size, image.tobytes()


def _run_figures(seed: int, epochs: int, markers: dict, zeros: int) -> list:
    """One run's values for its three figures: curves, reliability and weight histogram (`zeros` weights zeroed)."""
    generator = torch.Generator().manual_seed(seed)
    rows = history(u_shape(epochs // 3, epochs=epochs), [seed + 2.0 / e for e in range(1, epochs + 1)])
    for row in rows:
        row.update({"train/acc": 0.5 + row["epoch"] / (4 * epochs), "val/acc": 0.3 + seed / 10})
    rows[epochs // 2]["val/loss"] = None  # a gap
    logits = (1 + seed) * torch.randn(200 + 100 * seed, 10, generator=generator)
    targets = torch.randint(10, (len(logits),), generator=generator)
    weights = [
        (10.0**-seed) * torch.randn(30, 20, generator=generator),
        torch.randn(5, 30, generator=generator),
    ]
    weights[0].view(-1)[:zeros] = 0
    return [
        (diagnostics.plot_curves, (rows,), markers),
        (diagnostics.plot_reliability, (logits, targets), {}),
        (diagnostics.plot_weight_histogram, (weights,), {}),
    ]


def _draw(figures: list, directory) -> list:
    return [
        function(*args, directory / f"{function.__name__}.png", **options)
        for function, args, options in figures
    ]


def test_figures_drawn_into_kept_figures_are_those_of_new_figures_pixel_for_pixel(tmp_path, monkeypatch):
    """A process draws each run's figures into the figures it drew the run before with (`diagnostics._kept`): what
    a run gets must not depend on the runs before it: other lengths, markers, gaps, ranges, zeros, a diverged run's
    panel without a finite value."""
    runs = [
        _run_figures(0, 60, dict(best_epoch=20, onset_epoch=25, stop_epoch=60), zeros=0),
        _run_figures(1, 150, dict(best_epoch=140), zeros=30),
        _run_figures(2, 12, {}, zeros=600),
    ]
    zero_weights = [
        (f, ([torch.zeros(3, 3)],), {}) if f is diagnostics.plot_weight_histogram else (f, a, o)
        for f, a, o in runs[0]
    ]
    diverged = [{"epoch": e, "train/loss": math.nan, "val/loss": math.inf, "train/acc": 0.1} for e in (1, 2)]
    runs += [zero_weights, [(diagnostics.plot_curves, (diverged,), {}), *zero_weights[1:]]]
    monkeypatch.setattr(diagnostics, "_kept", threading.local())  # the first run into new figures too
    kept = [_draw(run, tmp_path / f"kept{i}") for i, run in enumerate(runs)]
    for i, run in enumerate(runs):
        monkeypatch.setattr(diagnostics, "_kept", threading.local())  # nothing kept: new figures
        for new, reused in zip(_draw(run, tmp_path / f"new{i}"), kept[i], strict=True):
            assert _pixels(new) == _pixels(reused), (i, new.name)


@pytest.mark.parametrize("models, samples", [(1, 3200), (3, 800), (24, 3200)])
def test_prediction_metrics_of_stacked_models_equal_each_model_alone_exactly(models, samples):
    """A stack evaluates its members' logits [K, N, classes] in one call: each member's metrics must be exactly the
    ones its own logits give, or a stacked job's records would differ from its lone run's."""
    generator = torch.Generator().manual_seed(models)
    logits = 2.5 * torch.randn(models, samples, 10, generator=generator)
    targets = torch.randint(10, (models, samples), generator=generator)
    stacked = diagnostics.prediction_metrics(logits, targets)
    assert all(value.shape == (models,) for value in stacked.values())
    for k in range(models):
        alone = diagnostics.prediction_metrics(logits[k], targets[k])
        assert {name: stacked[name][k].item() for name in alone} == {
            name: v.item() for name, v in alone.items()
        }


def test_prediction_metrics_without_calibration_are_the_nll_and_acc_of_the_full_set():
    """The training split's per-epoch metrics skip the binning (only its loss and acc are logged): the two it gives
    must be the very values of the full set."""
    generator = torch.Generator().manual_seed(7)
    logits = 2.5 * torch.randn(3, 500, 10, generator=generator)
    targets = torch.randint(10, (3, 500), generator=generator)
    full = diagnostics.prediction_metrics(logits, targets)
    lean = diagnostics.prediction_metrics(logits, targets, calibration=False)
    assert lean.keys() == {"nll", "acc"}
    assert all(torch.equal(lean[name], full[name]) for name in lean)


PLOTTER_OWNER = """
import os, time
from reglab.diagnostics import Plotter

plotter = Plotter(workers=2)
print(plotter.draw(os.getpid).result(), flush=True)  # a drawing process's id
time.sleep(300)
"""


def test_drawing_processes_end_with_the_process_that_owns_them():
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    owner = subprocess.Popen(
        [sys.executable, "-c", PLOTTER_OWNER], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        worker = int(owner.stdout.readline())
        os.kill(owner.pid, signal.SIGKILL)  # as the out-of-memory killer would: no clean-up of its pool
        owner.wait(timeout=30)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{worker}") and open(f"/proc/{worker}/stat").read().split()[2] != "Z":
            assert time.monotonic() < deadline, "the drawing process outlived its owner"
            time.sleep(0.1)
    finally:
        owner.kill()


def test_sharpness_of_each_member_equals_the_formula_on_its_own_model_over_all_samples_at_once():
    """diagnostics.sharpness goes over the samples SHARPNESS_CHUNK at a time, all members together; here each member
    is copied into a plain nn.Sequential and L(w + ρ·g/‖g‖) − L(w) is taken over every sample in one pass."""
    from reglab.models import StackedLinear

    generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
    stack = nn.Sequential(StackedLinear(6, 16, generators), nn.Tanh(), StackedLinear(16, 4, generators))
    samples = 2 * diagnostics.SHARPNESS_CHUNK + 37  # three chunks, the last a short one
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(samples, 6, generator=generator)
    y = torch.randint(4, (3, samples), generator=generator)
    before = [p.detach().clone() for p in stack.parameters()]
    measured = diagnostics.sharpness(stack, [0, 2], x, y, rho=0.5)
    assert all(torch.equal(p, w) for p, w in zip(stack.parameters(), before, strict=True))  # put back exactly
    assert measured.keys() == {0, 2}
    for k in (0, 2):
        alone = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
        with torch.no_grad():
            for layer, stacked in ((alone[0], stack[0]), (alone[2], stack[2])):
                layer.weight.copy_(stacked.weight[k]), layer.bias.copy_(stacked.bias[k])
        loss = F.cross_entropy(alone(x.double()), y[k])
        grads = torch.autograd.grad(loss, list(alone.parameters()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(alone.parameters(), grads, strict=True):
                p.add_(g * 0.5 / norm)
            expected = F.cross_entropy(alone(x.double()), y[k]) - loss
        assert expected > 1e-3  # a step of ρ = 0.5 up the gradient raises the loss
        assert measured[k] == pytest.approx(expected.item(), rel=1e-4)


def test_sharpness_of_a_diverged_member_is_nan_and_leaves_the_others_alone():
    from reglab.models import StackedLinear

    generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
    stack = nn.Sequential(StackedLinear(6, 16, generators), nn.Tanh(), StackedLinear(16, 4, generators))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(diagnostics.SHARPNESS_CHUNK + 5, 6, generator=generator)
    y = torch.randint(4, (3, len(x)), generator=generator)
    healthy = diagnostics.sharpness(stack, [0, 2], x, y)
    with torch.no_grad():
        stack[0].weight[1, 0, 0] = math.nan
    measured = diagnostics.sharpness(stack, [0, 1, 2], x, y)
    assert math.isnan(measured[1]) and {k: measured[k] for k in (0, 2)} == healthy
    assert torch.isnan(stack[0].weight[1, 0, 0]) and torch.isfinite(stack[0].weight[[0, 2]]).all()
