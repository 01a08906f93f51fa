"""Reproduce the published findings: run every experiment preset (3 seeds each) and write docs/results.md.

    python -m reglab.reproduce [--presets calibration,dropout] [--out docs/results.md]   (or: make reproduce)

Each preset is a sweep through the real entrypoint (`train.py -m experiment=NAME`, stacked launcher). Each finding
then reads the jobs' summary.json files, states the published reference, reglab's mean ± std over seeds, the
range the reference leads us to expect, and whether the measurement falls in it. The ranges come from the papers
and are never tuned to the result: where reglab lands outside, the note says why.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from reglab.report import read_jobs

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------------------
# Reading a sweep


def select(runs: list[dict], regularizers: list[str] | None = None, **hparams) -> list[dict]:
    """Runs with these active regularizers and hparams (keys as in summary['hparams'], dots written as __)."""
    wanted = {key.replace("__", "."): value for key, value in hparams.items()}
    return [
        r
        for r in runs
        if (regularizers is None or r["regularizers"] == regularizers)
        and all(r["hparams"].get(key) == value for key, value in wanted.items())
    ]


def mean(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.mean(values) if values else float("nan")


def ms(runs: list[dict], key: str, scale: float = 100.0, digits: int = 1) -> str:
    """mean ± std over seeds, e.g. '61.7 ± 1.2' (accuracies in percent by default)."""
    values = [scale * r[key] for r in runs if r.get(key) is not None]
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


# ---------------------------------------------------------------------------------------------------------------------
# The findings


@dataclass
class Outcome:
    measured: str  # reglab's numbers, mean ± std over seeds
    expected: str  # the range the reference leads us to expect
    holds: bool
    note: str = ""


@dataclass
class Finding:
    preset: str
    question: str
    reference: str
    judge: Callable[[dict[str, list[dict]]], Outcome]


def overfit_baseline(results):
    runs = results["overfit_baseline"]
    onset = sum(r["overfit_onset_epoch"] is not None for r in runs)
    holds = mean(runs, "train/acc") >= 0.99 and 0.55 <= mean(runs, "test/acc") <= 0.72 and onset == len(runs)
    return Outcome(
        f"train {ms(runs, 'train/acc')}%, test {ms(runs, 'test/acc')}%, val-loss rise detected in {onset}/{len(runs)}",
        "train >= 99%, test 55-72%, val loss rising after its minimum in every seed",
        holds,
        "reglab holds out 800 of the 4000 training samples for validation, so it trains on 3200 (paper: 4000).",
    )


def cnn_baseline(results):
    cnn, mlp = results["cnn_baseline"], results.get("overfit_baseline", [])
    holds = mean(cnn, "test/acc") >= 0.90 and (not mlp or mean(cnn, "test/acc") > mean(mlp, "test/acc"))
    return Outcome(
        f"CNN test {ms(cnn, 'test/acc')}% (train {ms(cnn, 'train/acc')}%) vs MLP {ms(mlp, 'test/acc')}%",
        "CNN test >= 90%, far above the MLP",
        holds,
        "the paper's CNN (25 channels, kernels 5-3-3, stride 2), final model after 150 epochs, trained on 3200 "
        "signals: reglab holds 800 of the 4000 out for validation. That is the cause of the gap to 94% "
        "(docs/cnn_gap.md): the paper's own protocol (all 4000 signals, no validation set, final model after 6000 "
        "steps; benchmarks/mnist1d_paper_cnn.py) reproduces its 94% here and drops below 90% on reglab's 3200, "
        "and this preset with `dataset.val_fraction=0.05` (3800 signals) gains most of the gap back; padding, batch "
        "order and reading the peak of the test curve each move the number by less than a point. The CNN overfits "
        f"too (train-test gap {ms(cnn, 'gap/test_acc')} points). {conv_dropout_choice(results.get('dropout_conv', []))}",
    )


def conv_dropout_choice(runs: list[dict]) -> str:
    """Which conv-dropout setting of the dropout_conv grid validation loss selects, and its test accuracy."""
    settings: dict[str, list[dict]] = {}
    for r in runs:
        kind, p = r["hparams"]["regularizer.dropout.conv_kind"], r["hparams"]["regularizer.dropout.conv_p"]
        settings.setdefault(f"{kind} p={p:g}", []).append(r)
    if not settings:
        return ""
    chosen = selected_by_validation(settings)
    return (
        f"Among the conv-dropout settings of preset dropout_conv, the lowest validation loss selects {chosen} "
        f"dropout in the conv blocks: {ms(settings[chosen], 'test/acc')}% test."
    )


def calibration(results):
    runs = results["calibration"]
    none, smooth, drop = (select(runs, regs) for regs in ([], ["label_smoothing"], ["dropout"]))
    acc_moves = max(abs(mean(r, "test/acc") - mean(none, "test/acc")) for r in (smooth, drop))
    holds = (
        0.2 <= mean(none, "test/ece") <= 0.4
        and mean(smooth, "test/ece") < 0.1
        and mean(drop, "test/ece") < 0.1
        and acc_moves <= 0.05
    )
    return Outcome(
        f"test ECE: none {ms(none, 'test/ece', 1, 3)}, label smoothing {ms(smooth, 'test/ece', 1, 3)}, "
        f"dropout {ms(drop, 'test/ece', 1, 3)}; temperature-scaled none {ms(none, 'test/ts_ece', 1, 3)}; "
        f"test acc none {ms(none, 'test/acc')}%, LS {ms(smooth, 'test/acc')}%, dropout {ms(drop, 'test/acc')}%",
        "ECE none 0.2-0.4; with LS or dropout < 0.1; accuracy within 5 points",
        holds,
    )


def weight_decay(results):
    runs = results["weight_decay"]
    grid = sorted({r["hparams"]["regularizer.l2.weight_decay"] for r in runs})
    rows = {wd: select(runs, regularizer__l2__weight_decay=wd) for wd in grid}
    gaps = ", ".join(
        f"λ={wd:g}: gap {ms(rows[wd], 'gap/test_acc')} train {ms(rows[wd], 'train/acc')}" for wd in grid
    )
    top, zero = rows[grid[-1]], rows[grid[0]]
    shrinks = min(mean(rows[wd], "gap/test_acc") for wd in grid[1:]) < mean(zero, "gap/test_acc") - 0.1
    underfits = mean(top, "train/acc") < 0.9
    return Outcome(
        gaps,
        "gap falls by > 10 points somewhere on the grid; train acc < 90% at its top",
        shrinks and underfits,
    )


def by_strength_and_mode(runs: list[dict], technique: str, strength_key: str, modes: tuple[str, str]):
    """(strength, runs of the first mode, runs of the second mode) for every strength on the grid."""
    key = f"regularizer.{technique}.{strength_key}"
    for strength in sorted({r["hparams"][key] for r in runs}):
        at_strength = [r for r in runs if r["hparams"][key] == strength]
        yield strength, *(select(at_strength, **{f"regularizer__{technique}__mode": mode}) for mode in modes)


def weight_decay_coupling(results):
    runs = results["weight_decay_coupling"]
    parts, differ = [], []
    for wd, coupled, decoupled in by_strength_and_mode(runs, "l2", "weight_decay", ("coupled", "decoupled")):
        parts.append(
            f"λ={wd:g}: coupled test {ms(coupled, 'test/acc')}% |w| {ms(coupled, 'weights/l2', 1, 1)}, "
            f"decoupled test {ms(decoupled, 'test/acc')}% |w| {ms(decoupled, 'weights/l2', 1, 1)}"
        )
        norms = mean(coupled, "weights/l2"), mean(decoupled, "weights/l2")
        differ.append(abs(norms[0] - norms[1]) > 0.1 * max(norms))
    return Outcome(
        "; ".join(parts), "coupled and decoupled weight norms differ by > 10% at every λ", all(differ)
    )


def dropout(results):
    runs = results["dropout"]
    rows = {p: select(runs, regularizer__dropout__p=p) for p in (0.0, 0.1, 0.3, 0.5)}
    text = ", ".join(
        f"p={p:g}: gap {ms(r, 'gap/test_acc')} ECE {ms(r, 'test/ece', 1, 3)}" for p, r in rows.items()
    )
    holds = mean(rows[0.5], "gap/test_acc") < mean(rows[0.0], "gap/test_acc") and mean(
        rows[0.5], "test/ece"
    ) < mean(rows[0.0], "test/ece")
    return Outcome(text, "gap and ECE at p=0.5 below p=0", holds)


def dropout_variants(results):
    runs = results["dropout_variants"]

    def cell(p, input_p, max_norm):
        return select(
            runs,
            regularizer__dropout__p=p,
            regularizer__dropout__input_p=input_p,
            regularizer__dropout__max_norm=max_norm,
        )

    parts = [
        f"{label}: test {ms(cell(*key), 'test/acc')}% gap {ms(cell(*key), 'gap/test_acc')}"
        for label, key in {
            "none": (0.0, 0.0, None),
            "input 0.2": (0.0, 0.2, None),
            "hidden 0.5": (0.5, 0.0, None),
            "both": (0.5, 0.2, None),
            "both + max-norm 3": (0.5, 0.2, 3),
        }.items()
    ]
    holds = mean(cell(0.5, 0.0, None), "gap/test_acc") < mean(cell(0.0, 0.0, None), "gap/test_acc") and mean(
        cell(0.5, 0.2, 3), "weights/l2"
    ) < mean(cell(0.5, 0.2, None), "weights/l2")
    return Outcome("; ".join(parts), "hidden dropout shrinks the gap; max-norm shrinks the weights", holds)


def l1_sparsity(results):
    runs, baseline = results["l1_sparsity"], results.get("overfit_baseline", [])
    parts, holds, most_zeros = [], True, 0.0  # most exact zeros among proximal strengths costing <= 5 points
    for strength, prox, sub in by_strength_and_mode(runs, "l1", "strength", ("proximal", "subgradient")):
        parts.append(
            f"λ={strength:g}: proximal zeros {ms(prox, 'weights/zero_frac')}% test {ms(prox, 'test/acc')}%, "
            f"subgradient zeros {ms(sub, 'weights/zero_frac')}% test {ms(sub, 'test/acc')}%"
        )
        holds &= mean(sub, "weights/zero_frac") < 0.01
        if not baseline or mean(baseline, "test/acc") - mean(prox, "test/acc") <= 0.05:
            most_zeros = max(most_zeros, mean(prox, "weights/zero_frac"))
    holds &= most_zeros >= 0.3
    return Outcome(
        "; ".join(parts), "proximal >= 30% exact zeros at <= 5 points cost; subgradient < 1% zeros", holds
    )


def random_labels(results):
    runs = results["random_labels"]
    rows = {
        name: select(runs, regs) for name, regs in (("none", []), ("l2", ["l2"]), ("dropout", ["dropout"]))
    }
    text = "; ".join(
        f"{name}: train {ms(r, 'train/acc')}% test {ms(r, 'test/acc')}% fit epoch {ms(r, 'fit_epoch', 1, 0)}"
        for name, r in rows.items()
    )
    none = rows["none"]
    holds = mean(none, "train/acc") >= 0.95 and 0.05 <= mean(none, "test/acc") <= 0.15
    slower = all(
        all(r.get("fit_epoch") is None or r["fit_epoch"] > mean(none, "fit_epoch") for r in rows[name])
        for name in ("l2", "dropout")
    )
    return Outcome(
        text,
        "none: train >= 95%, test 5-15%; regularized runs fit later (or not within the budget)",
        holds and slower,
        "Adam at lr 1e-3 (at the default 1e-2 the unregularized MLP reached only ~79% train accuracy on random "
        "labels in 400 epochs: its steps are too large to settle on noise; Zhang et al. trained to zero loss). A "
        "regularized run that never reaches 99% train accuracy within the budget counts as slower; whether it "
        "would with more epochs, this run does not show.",
    )


def early_stopping(results):
    runs = results["early_stopping"]
    parts, holds = [], True
    for monitor in ("val/loss", "val/acc"):
        rows = select(runs, regularizer__early_stopping__monitor=monitor)
        parts.append(
            f"monitor {monitor}: restored test loss {ms(rows, 'test/loss', 1, 3)} acc {ms(rows, 'test/acc')}% "
            f"vs final test loss {ms(rows, 'test/last_loss', 1, 3)} acc {ms(rows, 'test/last_acc')}% "
            f"(best epoch {ms(rows, 'best_epoch', 1, 0)}, stopped {ms(rows, 'epochs_run', 1, 0)})"
        )
        if monitor == "val/loss":
            holds = mean(rows, "test/loss") < mean(rows, "test/last_loss")
    return Outcome(
        "; ".join(parts), "the restored model has the lower test loss (monitoring val/loss)", holds
    )


def selected_by_validation(rows: dict[str, list[dict]], metric: str = "val/loss") -> str:
    """The name whose runs have the lowest mean val/loss: how reglab names a winner (test numbers never choose).
    metric="val/acc" picks the highest mean validation accuracy instead (for a note, never for a verdict)."""
    scored = {name: mean(runs, metric) for name, runs in rows.items()}
    candidates = [name for name in scored if not math.isnan(scored[name])]
    if metric == "val/acc":
        return max(candidates, key=scored.__getitem__)
    return min(candidates, key=scored.__getitem__)


def small_data(results):
    runs = results["small_data"]
    parts, holds, by_accuracy = [], True, []
    for noise in (0.0, 0.2):
        rows = {
            name: select(runs, [] if name == "none" else [name], dataset__label_noise=noise)
            for name in ("none", "l2", "dropout", "label_smoothing", "early_stopping")
        }
        chosen = selected_by_validation(rows)
        by_accuracy.append(f"{selected_by_validation(rows, 'val/acc')} at noise {noise:g}")
        parts.append(
            f"noise {noise:g}: "
            + ", ".join(
                f"{name} {ms(r, 'test/acc')}% (val loss {ms(r, 'val/loss', 1, 2)})"
                for name, r in rows.items()
            )
            + f"; selected by val loss: {chosen}"
        )
        holds &= mean(rows[chosen], "test/acc") - mean(rows["none"], "test/acc") > 0.01
    return Outcome(
        "; ".join(parts),
        "the technique with the lowest validation loss beats no regularization by > 1 point of test accuracy",
        holds,
        "the winner is chosen by mean validation loss (the sweep's objective), and its test accuracy is then "
        "read off; choosing by test accuracy would make the winner's test score an optimistic estimate. Early "
        "stopping's validation loss is itself selected on validation (the restored epoch has the lowest one), "
        "which favours it under this rule, and cross-entropy rewards calibration (label smoothing) more than "
        "accuracy. The highest validation accuracy, a rule that matches this question's test accuracy without "
        f"looking at the test set, would select {' and '.join(by_accuracy)}.",
    )


def dropout_conv(results):
    runs = results["dropout_conv"]

    def gap(kind, p):
        return mean(
            select(runs, regularizer__dropout__conv_kind=kind, regularizer__dropout__conv_p=p), "gap/test_acc"
        )

    parts = [
        f"{kind} p={p:g}: test {ms(rows, 'test/acc')}% gap {ms(rows, 'gap/test_acc')}"
        for kind in ("element", "channel")
        for p in (0.0, 0.1, 0.3)
        for rows in [select(runs, regularizer__dropout__conv_kind=kind, regularizer__dropout__conv_p=p)]
    ]
    effect = {kind: gap(kind, 0.0) - gap(kind, 0.3) for kind in ("element", "channel")}
    return Outcome(
        "; ".join(parts),
        "channel dropout shrinks the gap more than element dropout",
        effect["channel"] > effect["element"],
        "the case for channel dropout rests on strongly correlated neighbouring activations in large 2-D feature "
        "maps (Tompson et al. 2015); MNIST-1D's 1-D feature maps are short (length 20, 10, 5) and dropping single "
        "activations there regularizes about as much; both variants beat the unregularized CNN clearly.",
    )


def noise(results):
    runs = results["noise"]
    grid = sorted({r["hparams"]["regularizer.noise.input_sigma"] for r in runs})
    rows = {sigma: select(runs, regularizer__noise__input_sigma=sigma) for sigma in grid}
    text = ", ".join(
        f"σ={sigma:g}: gap {ms(r, 'gap/test_acc')} |w| {ms(r, 'weights/l2', 1, 1)} test {ms(r, 'test/acc')}%"
        for sigma, r in rows.items()
    )

    def falls(key: str) -> bool:
        means = [mean(rows[sigma], key) for sigma in grid]
        return all(later < earlier for earlier, later in pairwise(means))

    return Outcome(
        text,
        "gap and weight norm fall at every step of the σ grid",
        falls("gap/test_acc") and falls("weights/l2"),
        "Bishop's equivalence holds for the squared loss of a model near a fixed solution. Here the loss is "
        "cross-entropy and the norm is read after 150 epochs of Adam: without noise the training loss reaches zero "
        "and the weights stop growing, while noise keeps the loss above zero and the weights keep growing to the "
        "last epoch (each run's metrics.jsonl holds weights/l2 per epoch; in the runs measured for this preset the "
        "norm was ordered by σ over the first 30 epochs). So the final norm at a small σ can exceed that of the "
        "unregularized run, although the largest σ shrinks both the gap and the norm.",
    )


def stochastic_depth(results):
    runs = results["stochastic_depth"]
    plain, dropped = (select(runs, regularizer__stochastic_depth__p=p) for p in (0.0, 0.5))
    text = "; ".join(
        f"{label}: test {ms(r, 'test/acc')}% gap {ms(r, 'gap/test_acc')} train {ms(r, 'train/acc')}%"
        for label, r in (("p_L=0", plain), ("p_L=0.5", dropped))
    )
    holds = mean(dropped, "test/acc") > mean(plain, "test/acc") and mean(dropped, "gap/test_acc") < mean(
        plain, "gap/test_acc"
    )
    return Outcome(text, "with p_L=0.5 the test accuracy rises and the gap falls", holds)


def mixup_accuracy(results):
    runs, mlp = results["mixup_accuracy"], results.get("mixup_calibration", [])
    rows = {
        name: select(runs, regs)
        for name, regs in (("none", []), ("mixup", ["mixup"]), ("cutmix", ["cutmix"]))
    }
    text = "; ".join(
        f"{name}: test {ms(r, 'test/acc')}% ECE {ms(r, 'test/ece', 1, 3)} (confidence {ms(r, 'test/confidence')}%)"
        for name, r in rows.items()
    )
    gains = [mean(rows[name], "test/acc") - mean(rows["none"], "test/acc") for name in ("mixup", "cutmix")]
    mlp_rows = {a: select(mlp, regularizer__mixup__alpha=a) for a in (0, 0.2, 0.4, 1)}
    mlp_text = ", ".join(f"α={a:g} {ms(r, 'test/acc')}%" for a, r in mlp_rows.items())
    return Outcome(
        f"CNN (cnn1d) {text}",
        "mixup and cutmix each above no mixing by > 1 point of test accuracy",
        all(gain > 0.01 for gain in gains),
        "on the MLP mixup does not raise test accuracy (preset mixup_calibration: "
        f"{mlp_text or 'not run'}); it lowers the ECE instead. The likely cause: MNIST-1D's classes are templates "
        "at random offsets, and the MLP's errors come from offsets it has not seen in 3200 signals; mixing two "
        "signals creates no new offsets, so it smooths the MLP's confidence without giving it the invariance. "
        "The CNN has that invariance built in, and its remaining error is overfitting (train-test gap), which "
        "training on mixed samples reduces.",
    )


def mixup_calibration(results):
    runs = results["mixup_calibration"]
    rows = {a: select(runs, regularizer__mixup__alpha=a) for a in (0, 0.2, 0.4, 1)}
    text = ", ".join(
        f"α={a:g}: ECE {ms(r, 'test/ece', 1, 3)} (confidence {ms(r, 'test/confidence')}% vs test "
        f"{ms(r, 'test/acc')}%)"
        for a, r in rows.items()
    )
    base = mean(rows[0], "test/ece")
    holds = all(mean(rows[a], "test/ece") < base for a in (0.2, 0.4))
    return Outcome(
        text,
        "test ECE at α=0.2 and 0.4 (the paper's best range) below α=0 (no mixing)",
        holds,
        "Thulasidasan et al. find larger α drives the network towards under-confidence; the confidence beside "
        "the accuracy shows which side of calibrated each α lands on.",
    )


def by_optimizer(runs: list[dict]) -> dict[str, list[dict]]:
    return {name: select(runs, optimizer__name=name) for name in ("adam", "sgd")}


def weight_averaging(results):
    runs = results["weight_averaging"]
    parts, wins = [], {}
    for optimizer, rows in by_optimizer(runs).items():
        for name in ("swa", "ema"):
            cell = select(rows, [name])
            parts.append(
                f"{optimizer} {name}: averaged test {ms(cell, 'test/acc')}% loss {ms(cell, 'test/loss', 1, 3)} vs "
                f"final {ms(cell, 'test/last_acc')}% loss {ms(cell, 'test/last_loss', 1, 3)}"
            )
            wins[optimizer, name] = sum(r["test/acc"] > r["test/last_acc"] for r in cell), len(cell)
    won, seeds = wins["sgd", "swa"]
    return Outcome(
        "; ".join(parts) + f"; SWA beats its final model in {won}/{seeds} seeds (SGD), "
        f"{wins['adam', 'swa'][0]}/{wins['adam', 'swa'][1]} (Adam)",
        "with the paper's SGD: the SWA average has a higher test accuracy than the final model in every seed",
        seeds > 0 and won == seeds,
        "the comparison is within each run (test/* the average, test/last_* the final model it was averaged from). "
        "SWA averages the end-of-epoch weights of epochs 100-150 at the optimizer's constant rate (SGD 0.05 with "
        "momentum, Adam 0.01); EMA (β=0.99, ~3 epochs) is shown beside it. The MLP memorizes MNIST-1D long before "
        "epoch 100, so the averaged iterates all interpolate the training set; the paper's criterion is accuracy, and "
        "the test loss of both models is shown beside it.",
    )


def sam(results):
    runs = results["sam"]
    parts, holds = [], False  # judged on the SGD rows; without them it cannot hold
    for optimizer, rows in by_optimizer(runs).items():
        plain, sharp = (select(rows, regularizer__sam__rho=rho) for rho in (0.0, 0.05))
        parts += [
            f"{optimizer} ρ={rho:g}: gap {ms(r, 'gap/test_acc')} test {ms(r, 'test/acc')}% train loss "
            f"{ms(r, 'train/loss', 1, 4)} sharpness {ms(r, 'sharpness', 1, 4)}"
            for rho, r in ((0, plain), (0.05, sharp))
        ]
        if optimizer == "sgd":
            fitted = mean(plain, "train/acc") >= 0.99 and mean(sharp, "train/acc") >= 0.99
            flatter = mean(sharp, "sharpness") < mean(plain, "sharpness")
            holds = fitted and flatter and mean(sharp, "gap/test_acc") < mean(plain, "gap/test_acc")
    return Outcome(
        "; ".join(parts),
        "with the paper's SGD, both fitting the training set (>= 99%): ρ=0.05 has lower sharpness and a smaller gap",
        holds,
        "sharpness = L(w + 0.05·g/‖g‖) − L(w) on the training set for the final model (diagnostics.sharpness), "
        "the first-order version of what SAM minimizes; the paper measures flatness by Hessian eigenvalues. At a "
        "training loss near 0 the cross-entropy is flat in every direction whatever the curvature of the "
        "logits, so this proxy mostly follows the training loss: it is not scale-invariant (Dinh et al. 2017).",
    )


def spectral_norm(results):
    runs = results["spectral_norm"]
    none, normalized = select(runs, []), select(runs, ["spectral_norm"])
    text = "; ".join(
        f"{name}: gap {ms(r, 'gap/test_acc')} train {ms(r, 'train/acc')}% test {ms(r, 'test/acc')}% "
        f"σ_max {ms(r, 'weights/sigma_max', 1, 2)} Π σ_max {ms(r, 'weights/lipschitz_bound', 1, 1)}"
        for name, r in (("none", none), ("spectral_norm c=1", normalized))
    )
    smaller_gap = mean(normalized, "gap/test_acc") < mean(none, "gap/test_acc")
    smaller_bound = mean(normalized, "weights/lipschitz_bound") < mean(none, "weights/lipschitz_bound")
    # a gap that closes because the model stops fitting is not regularization that helps
    kept_accuracy = mean(normalized, "test/acc") >= mean(none, "test/acc") - 0.02
    holds = smaller_gap and smaller_bound and kept_accuracy
    return Outcome(
        text,
        "smaller gap and a smaller Lipschitz bound (Π σ_max of the weights the network computes with), at a test "
        "accuracy no more than 2 points below no regularization",
        holds,
        "σ_max of the normalized weights is ≈ 1 by construction (power iteration's estimate). With c=1 in every "
        "layer the whole MLP is ~1-Lipschitz, so its logits can barely separate the classes: it underfits, and the "
        "gap closes because training accuracy falls, not because test accuracy rises (the paper normalizes a GAN's "
        "discriminator, where the bound is the point; a classifier needs c > 1: `regularizer.spectral_norm."
        "coefficient` sweeps it).",
    )


FINDINGS = [
    Finding(
        "overfit_baseline",
        "Does the reference MLP overfit MNIST-1D?",
        "MNIST-1D README: MLP 68% test; ~100% train, test loss climbing",
        overfit_baseline,
    ),
    Finding(
        "cnn_baseline", "Is architecture the bigger lever?", "MNIST-1D README: CNN 94% test", cnn_baseline
    ),
    Finding(
        "calibration",
        "Do label smoothing and dropout calibrate?",
        "Müller et al. 2019; Guo et al. 2017 (temperature scaling)",
        calibration,
    ),
    Finding(
        "weight_decay",
        "What does an AdamW decay grid do to the gap?",
        "Loshchilov & Hutter 2019",
        weight_decay,
    ),
    Finding(
        "weight_decay_coupling",
        "Is L2 with Adam the same as AdamW?",
        "Loshchilov & Hutter 2019",
        weight_decay_coupling,
    ),
    Finding("dropout", "Does dropout shrink the gap and the ECE?", "Srivastava et al. 2014", dropout),
    Finding(
        "dropout_variants", "Input vs hidden dropout; max-norm", "Srivastava et al. 2014", dropout_variants
    ),
    Finding(
        "l1_sparsity",
        "Which L1 gives exact zeros?",
        "proximal gradient / ISTA (Beck & Teboulle 2009)",
        l1_sparsity,
    ),
    Finding("random_labels", "Can the MLP memorize random labels?", "Zhang et al. 2017", random_labels),
    Finding("early_stopping", "Restored best vs final model", "Prechelt 1998", early_stopping),
    Finding(
        "small_data",
        "Which technique helps most with little or noisy data?",
        "(reglab's own question)",
        small_data,
    ),
    Finding(
        "dropout_conv",
        "Element vs channel dropout in conv layers",
        "Tompson et al. 2015 (SpatialDropout)",
        dropout_conv,
    ),
    Finding(
        "noise",
        "Does input noise act like weight decay?",
        "Bishop 1995 (training with noise is Tikhonov regularization)",
        noise,
    ),
    Finding(
        "stochastic_depth",
        "Does dropping depth regularize a deeper residual net?",
        "Huang et al. 2016",
        stochastic_depth,
    ),
    Finding(
        "mixup_accuracy",
        "Do mixup and cutmix raise test accuracy?",
        "Zhang et al. 2018 (mixup); Yun et al. 2019 (CutMix)",
        mixup_accuracy,
    ),
    Finding(
        "mixup_calibration",
        "Does mixup calibrate?",
        "Thulasidasan et al. 2019",
        mixup_calibration,
    ),
    Finding(
        "weight_averaging",
        "Does the average of the weights beat the final model?",
        "Izmailov et al. 2018 (SWA)",
        weight_averaging,
    ),
    Finding("sam", "Does SAM find flatter minima and a smaller gap?", "Foret et al. 2021", sam),
    Finding(
        "spectral_norm",
        "Does bounding each layer's spectral norm shrink the gap?",
        "Miyato et al. 2018; Bartlett et al. 2017",
        spectral_norm,
    ),
]


# ---------------------------------------------------------------------------------------------------------------------
# Running and writing


def run_preset(preset: str, sweeps_root: Path, extra: list[str]) -> Path:
    """One preset's sweep through the real entrypoint, its jobs trained as stacks (hydra/launcher=stacked)."""
    sweep_dir = sweeps_root / preset
    shutil.rmtree(sweep_dir, ignore_errors=True)
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        f"experiment={preset}",
        "hydra/launcher=stacked",
        "logger=none",
        "trainer.save_weights=false",
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall_time = round(time.perf_counter() - started, 1)
    (sweep_dir / "reproduce_time.json").write_text(json.dumps({"wall_time_s": wall_time, "overrides": extra}))
    return sweep_dir


def machine_facts() -> str:
    """Commit, versions and machine, recorded beside the numbers (reglab.provenance)."""
    from reglab.provenance import describe, provenance

    return describe(provenance())


def write_results(
    path: Path, outcomes: dict[str, Outcome], runs: dict[str, dict], figures: list[str]
) -> None:
    """`runs[preset]`: wall_time_s, jobs, finished and the extra overrides of that preset's sweep."""
    extra = sorted({" ".join(info["overrides"]) for info in runs.values() if info["overrides"]})
    lines = [
        "# Reproduced findings",
        "",
        "Made by `make reproduce` (`python -m reglab.reproduce`): every experiment preset in `conf/experiment/`, "
        "3 seeds each, MNIST-1D unless said otherwise; mean ± std over the finished seeds (the jobs column says how "
        "many of the sweep's jobs finished). Accuracies and gaps in percent.",
        "",
        f"Machine and versions: {machine_facts()}. "
        f"Wall time: {sum(info['wall_time_s'] for info in runs.values()) / 60:.1f} min in all.",
        "",
    ]
    if extra:
        lines += [f"**Extra overrides, not the presets as shipped:** {'; '.join(extra)}", ""]
    lines += [
        "| # | preset | question | reference | reglab (mean ± std) | expected | holds | jobs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, finding in enumerate(FINDINGS, 1):
        if finding.preset not in outcomes:
            continue
        o, info = outcomes[finding.preset], runs[finding.preset]
        lines.append(
            f"| {number} | `{finding.preset}` | {finding.question} | {finding.reference} | {table_cell(o.measured)} | "
            f"{table_cell(o.expected)} | {'yes' if o.holds else '**no**'} | {info['finished']}/{info['jobs']} |"
        )
    notes = [
        (f.preset, outcomes[f.preset].note)
        for f in FINDINGS
        if f.preset in outcomes and outcomes[f.preset].note
    ]
    if notes:
        lines += ["", "## Notes", ""] + [f"- `{preset}`: {note}" for preset, note in notes]
    lines += ["", "## Wall time per preset", ""] + [
        f"- `{p}`: {info['wall_time_s']:.0f} s" for p, info in runs.items()
    ]
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    known = [f.preset for f in FINDINGS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(known), help="comma-separated presets to run")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"), help="the results file to write")
    parser.add_argument("--sweeps", default=str(ROOT / "outputs" / "reproduce"), help="where the sweeps go")
    parser.add_argument(
        "--judge-only", action="store_true", help="run nothing: judge the sweeps already there"
    )
    parser.add_argument(
        "--readme",
        default=str(ROOT / "README.md"),
        help="the file whose findings table to rewrite (between its findings markers; '' for none)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra overrides for every sweep (e.g. trainer.epochs=5)"
    )
    args = parser.parse_args(argv)
    presets = args.presets.split(",")
    unknown = sorted(set(presets) - set(known))
    if unknown:
        parser.error(f"--presets: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    sweeps = Path(args.sweeps)
    for preset in [] if args.judge_only else presets:
        print(f"[reproduce] {preset} ...", flush=True)
        run_preset(preset, sweeps, args.overrides)
    # every finding whose sweep exists is judged, so that one preset can be rerun without the others
    results, runs = {}, {}
    for preset in known:
        timing = sweeps / preset / "reproduce_time.json"
        if timing.exists():
            jobs = read_jobs(sweeps / preset)
            results[preset] = [job.summary for job in jobs if job.ok]  # finished jobs only
            runs[preset] = {
                **json.loads(timing.read_text()),
                "jobs": len(jobs),
                "finished": len(results[preset]),
            }
    outcomes = {f.preset: f.judge(results) for f in FINDINGS if f.preset in results}
    for preset, outcome in outcomes.items():
        print(f"[reproduce] {preset}: {'holds' if outcome.holds else 'DOES NOT HOLD'}: {outcome.measured}")
    out = Path(args.out)
    figures = [str(f.relative_to(out.parent)) for f in copy_figures(sweeps, out.parent / "figures")]
    write_results(out, outcomes, runs, figures)
    write_job_records(out.with_suffix(".json"), results)
    if args.readme:
        write_readme_table(Path(args.readme), outcomes)
    print(f"[reproduce] wrote {out} and {out.with_suffix('.json')}")
    return 0


def table_cell(text: str) -> str:
    """Text for a Markdown table cell: a literal | (as in |w|) would end the cell."""
    return text.replace("|", "\\|")


README_START, README_END = "<!-- findings:start -->", "<!-- findings:end -->"


def write_readme_table(path: Path, outcomes: dict[str, Outcome]) -> None:
    """The README's findings table, between its markers: every judged finding with reglab's numbers as
    docs/results.md states them, so that the README never quotes a number the code no longer produces."""
    text = path.read_text() if path.exists() else ""
    if README_START not in text or README_END not in text:
        return
    rows = [
        "| # | preset | finding | reglab, mean ± std over 3 seeds | holds |",
        "|---|---|---|---|---|",
    ]
    for number, finding in enumerate(FINDINGS, 1):
        if finding.preset in outcomes:
            o = outcomes[finding.preset]
            rows.append(
                f"| {number} | `{finding.preset}` | {finding.question} ({finding.reference}) | {table_cell(o.measured)} | "
                f"{'yes' if o.holds else '**no**'} |"
            )
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    path.write_text(before + README_START + "\n" + "\n".join(rows) + "\n" + README_END + after)


RECORDED = (
    "status",
    "epochs_run",
    "best_epoch",
    "train/acc",
    "val/acc",
    "val/loss",
    "test/acc",
    "test/loss",
    "test/ece",
)


def write_job_records(path: Path, results: dict[str, list[dict]]) -> None:
    """Every finished job's overrides and headline metrics, with the provenance: what tests/test_published.py
    re-runs to check that the published numbers still come out of the code."""
    from reglab.provenance import provenance

    jobs = {
        preset: [{"overrides": s["overrides"], **{key: s.get(key) for key in RECORDED}} for s in summaries]
        for preset, summaries in results.items()
    }
    path.write_text(json.dumps({"provenance": provenance(), "presets": jobs}, indent=1) + "\n")


def copy_figures(sweeps_root: Path, target: Path) -> list[Path]:
    """The sweep plots worth a look, copied next to the results file."""
    copied = []
    for preset, name in (
        ("weight_decay", "report_strength.png"),
        ("dropout", "report_strength.png"),
        ("overfit_baseline", "report_val_loss.png"),
    ):
        source = sweeps_root / preset / name
        if source.exists():
            target.mkdir(parents=True, exist_ok=True)
            copied.append(Path(shutil.copy(source, target / f"{preset}_{name}")))
    return copied


if __name__ == "__main__":
    raise SystemExit(main())
