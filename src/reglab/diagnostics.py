"""Overfitting diagnostics of one run: calibration, weight statistics, the onset of overfitting, and plots.

The training loop calls `prediction_metrics` and `weight_statistics` once per epoch, `fit_temperature`
(temperature scaling), `overfit_onset_epoch` and `diagnose` at the end, and the `plot_*` functions to draw a run's figures. matplotlib is imported only inside
the plotting functions, which build a bare `matplotlib.figure.Figure` (no pyplot): nothing is registered
globally, no backend is switched, and each figure is freed with its last reference, so thousands of jobs in one
process do not accumulate figures.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import numbers
import os
import signal
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from statistics import median
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

UNDERFIT_TRAIN_ACC = 0.8  # below this training accuracy the model has not even fit its training data
WELL_CALIBRATED_ECE = 0.03  # ECE under 3 points: confidence matches accuracy about as well as models get
SPARSE_ZERO_FRAC = 0.01  # more than 1% exact zeros is a deliberate sparsity pattern (L1 proximal), not chance


# ----------------------------------------------------------------------------------------------------------------
# Calibration and per-epoch prediction metrics


def _calibration_bins(confidences: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    """Per confidence bin: (sample count, number correct, sum of confidences), shape (..., n_bins, 3): samples
    along the last dimension, one model per index of the leading ones.

    Bin b holds the confidences in (b/n_bins, (b+1)/n_bins]: right-closed, as in Guo et al. (2017); a confidence
    of exactly 0 falls into bin 0.
    """
    confidences = confidences.detach().float()
    correct = correct.detach().to(confidences.dtype)
    inner_edges = torch.linspace(0, 1, n_bins + 1, device=confidences.device)[1:-1]
    bin_index = torch.bucketize(confidences, inner_edges)  # right=False: edge[b-1] < confidence <= edge[b]
    per_sample = torch.stack([torch.ones_like(confidences), correct, confidences], dim=-1)
    # a one-hot matrix product instead of a scatter-add (index_add_), whose CUDA kernel adds in a
    # non-deterministic order: the same logits give the same ECE on every device and every run
    membership = torch.nn.functional.one_hot(bin_index, n_bins).to(per_sample.dtype)
    return membership.transpose(-1, -2) @ per_sample


def expected_calibration_error(confidences: Tensor, correct: Tensor, n_bins: int = 15) -> Tensor:
    """Expected calibration error of top-label confidences (Guo et al. 2017), as a 0-d tensor (no host sync), or one
    per model for samples along the last dimension of [models, N].

    ECE = Σ_b (|B_b|/N)·|acc(B_b) − conf(B_b)| over `n_bins` equal-width bins (lo, hi] of the confidence, which
    simplifies to Σ_b |Σ_{i∈B_b} (correct_i − confidence_i)| / N. `correct` is 1 where the top-label prediction
    is right. torchmetrics bins [lo, hi) instead and gives confidences of exactly 1.0 a bin of their own; the
    two agree unless a confidence lies exactly on a bin edge. N = 0 gives NaN.
    """
    counts, n_correct, confidence_sum = _calibration_bins(confidences, correct, n_bins).unbind(dim=-1)
    return (n_correct - confidence_sum).abs().sum(-1) / counts.sum(-1)


def _top_label(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each sample's log-probability of its target, top-label confidence and correctness, in fp32.

    log p_c = (z_c − m) − log Σ exp(z − m) with m the top logit, without the full log_softmax: over 10 classes its CPU
    kernel took 12.8 ms for a K=24 stack's training split (76800 rows), these few operations ~6 (measured, torch
    2.14). The prediction is the logits' argmax (the first of equal ones). Each row on its own, as before."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    logits = logits.detach().float()
    top_logit, predictions = logits.max(dim=-1)
    shifted = logits - top_logit.unsqueeze(-1)
    log_normalizer = shifted.exp().sum(-1).log()
    target_log_prob = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normalizer
    return target_log_prob, (-log_normalizer).exp(), (predictions == targets).float()


def prediction_metrics(
    logits: Tensor, targets: Tensor, n_bins: int = 15, calibration: bool = True
) -> dict[str, Tensor]:
    """Metrics of class predictions as 0-d tensors on the logits' device (nothing is copied to the host); for
    logits [K, N, classes] and targets [K, N], of K models at once, each metric a [K] tensor, member k's value
    exactly what its logits alone give (tests/test_diagnostics.py).

    "nll": mean cross-entropy −log p(target) without label smoothing; "acc": fraction of correct top-label
    predictions; "ece": `expected_calibration_error` with `n_bins` bins; "confidence": mean top-label
    probability. `targets` are class indices. `calibration=False`: nll and acc alone (the binning is over half the
    cost: 4.7 of 9 ms for a K=24 stack's training split, measured).
    """
    target_log_probs, confidences, correct = _top_label(logits, targets)
    metrics = {"nll": -target_log_probs.mean(-1), "acc": correct.mean(-1)}
    if calibration:
        metrics["ece"] = expected_calibration_error(confidences, correct, n_bins)
        metrics["confidence"] = confidences.mean(-1)
    return metrics


TEMPERATURE_BOUNDS = (
    0.05,
    20.0,
)  # T below 0.05 or above 20 is no calibration but a sign of degenerate logits


class TemperatureFit(NamedTuple):
    temperature: float
    at_bound: bool  # the NLL optimum lies at or beyond a bound of the search: T is that bound


def _nll_slope(logits: Tensor, targets: Tensor, inverse_temperature: float) -> float:
    """d/dβ of the mean NLL of softmax(β·logits): mean over samples of E_p[z] − z_target (float64)."""
    probs = torch.softmax(inverse_temperature * logits, dim=1)
    expected_logit = (probs * logits).sum(dim=1)
    return (expected_logit - logits.gather(1, targets.unsqueeze(1)).squeeze(1)).mean().item()


def fit_temperature(
    logits: Tensor, targets: Tensor, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, halvings: int = 60
) -> TemperatureFit:
    """Temperature scaling (Guo et al. 2017): the T in `bounds` that minimizes NLL(softmax(logits / T), targets)
    on validation data; divide test logits by it before the softmax (the argmax, so accuracy, is unchanged).

    As a function of the inverse temperature β = 1/T the NLL is convex (log-sum-exp of functions linear in β,
    minus one), so its slope mean_i(E_p[z_i] − z_i,target) rises with β and the minimizer is where the slope
    changes sign: found by bisection on log β over [1/T_max, 1/T_min] (`halvings` = 60 leaves an interval far
    below float64's resolution), in float64, deterministic. When the slope has one sign over the whole interval
    the optimum lies outside it: T is the nearer bound and `at_bound` is True. Perfectly separated validation
    logits do that (the NLL keeps falling as T -> 0, and an unbounded optimizer returns wherever its line search
    stopped), and so do logits that carry no information (T -> inf, uniform predictions).
    """
    logits, targets = logits.detach().double(), targets.detach()
    t_min, t_max = bounds
    low, high = -math.log(t_max), -math.log(t_min)  # log β: β = 1/T runs from 1/T_max to 1/T_min
    if _nll_slope(logits, targets, math.exp(low)) >= 0:
        return TemperatureFit(t_max, True)
    if _nll_slope(logits, targets, math.exp(high)) <= 0:
        return TemperatureFit(t_min, True)
    for _ in range(halvings):
        middle = (low + high) / 2
        if _nll_slope(logits, targets, math.exp(middle)) < 0:
            low = middle
        else:
            high = middle
    return TemperatureFit(math.exp(-(low + high) / 2), False)


# ----------------------------------------------------------------------------------------------------------------
# Weight statistics


def weight_statistics(weights: Sequence[Tensor], small: float = 1e-3) -> dict[str, float]:
    """Size and sparsity of one model's weight tensors (matrices and kernels, ndim >= 2: `models.member_weights`).

    "weights/l2" = sqrt(Σw²) (the Euclidean norm, not its square), "weights/l1" = Σ|w|, "weights/zero_frac" =
    fraction of weights exactly 0, "weights/small_frac" = fraction with |w| < `small`. One host sync in all.
    """
    weights = [w.detach() for w in weights]
    if not weights:
        return {"weights/l2": 0.0, "weights/l1": 0.0, "weights/zero_frac": 0.0, "weights/small_frac": 0.0}
    per_tensor = [
        torch.stack(
            [
                w.square().sum(dtype=torch.float64),
                w.abs().sum(dtype=torch.float64),
                (w == 0).sum().double(),
                (w.abs() < small).sum().double(),
            ]
        )
        for w in weights
    ]
    square_sum, abs_sum, n_zero, n_small = torch.stack(per_tensor).sum(dim=0).tolist()
    n_weights = sum(w.numel() for w in weights)
    return {
        "weights/l2": math.sqrt(square_sum),
        "weights/l1": abs_sum,
        "weights/zero_frac": n_zero / n_weights,
        "weights/small_frac": n_small / n_weights,
    }


@contextlib.contextmanager
def one_thread():
    """Run a block on one thread: torch splits a sum over more than 32768 numbers, and LAPACK an SVD, between threads
    with other rounding, so metrics and diagnostics run here for a member of a stack (as many threads as members,
    up to the cores) to report what its lone run (one thread) does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def spectral_norms(weights: Sequence[Tensor]) -> dict[str, float]:
    """The largest singular value σ_max of each weight matrix (a kernel [out, in, k…] as the matrix [out, in·k…],
    as spectral normalization sees it): "weights/sigma_max" = the largest over the layers, "weights/lipschitz_bound"
    = their product Π σ_max, an upper bound on the network's Lipschitz constant (ReLU, tanh and max-pooling are
    1-Lipschitz; for a convolution the matrix norm is a proxy, not the operator norm). Exact SVD, once per run."""
    matrices = [w.detach().flatten(1).double() for w in weights if w.ndim >= 2]
    if not matrices:
        return {}
    if not all(torch.isfinite(m).all() for m in matrices):  # a diverged model: no SVD of NaNs
        return {"weights/sigma_max": math.nan, "weights/lipschitz_bound": math.nan}
    with one_thread():
        values = torch.stack([torch.linalg.matrix_norm(m, ord=2) for m in matrices]).tolist()
    return {"weights/sigma_max": max(values), "weights/lipschitz_bound": math.prod(values)}


SHARPNESS_RHO = 0.05  # SAM's default radius (Foret et al. 2021), the same for every run so that runs compare
# samples per forward pass: the gradient's saved activations then stay small for a whole stack (K members x N
# samples x the widest layer at once took ~130 MB more for 24 MNIST-1D MLPs; 512 at a time, ~1/8 of it)
SHARPNESS_CHUNK = 512


def sharpness(
    model, members: list[int], x: Tensor, y: Tensor, rho: float = SHARPNESS_RHO
) -> dict[int, float]:
    """First-order worst-case sharpness of each listed member's training loss, the quantity SAM minimizes (Foret et
    al. 2021): L(w + ρ·g/‖g‖₂) − L(w), g = ∇L(w), L = mean cross-entropy over (x, y[k]), eval mode (no dropout),
    ρ = 0.05 for every run: a larger value is a sharper minimum.

    `model` is a stack (models.py) and y holds every member's labels [K, N]; the listed members are measured
    together (one gradient of the sum of their losses: each member's part is its own), their weights moved and put
    back exactly; the others never change. L and g are sums over chunks of SHARPNESS_CHUNK samples, each divided
    by N: the same for a member alone or in any stack."""
    from reglab.models import predict

    model.eval()
    stacked = list(model.parameters())
    chunks = list(zip(x.split(SHARPNESS_CHUNK), y.split(SHARPNESS_CHUNK, dim=1), strict=True))

    def losses(xc: Tensor, yc: Tensor, of: list[int]) -> Tensor:
        """Each member's (of `of`) share of L from one chunk: its summed cross-entropy / N."""
        logits = predict(model, xc, len(stacked[0])).float()
        return torch.stack([F.cross_entropy(logits[k], yc[k], reduction="sum") for k in of]) / len(x)

    def mean_losses() -> dict[int, float]:
        with torch.no_grad():
            return dict(zip(members, sum(losses(xc, yc, members) for xc, yc in chunks).tolist(), strict=True))

    before = mean_losses()
    finite = [k for k in members if math.isfinite(before[k])]  # a diverged member is not measured
    if not finite:
        return dict.fromkeys(members, math.nan)
    grads = [torch.zeros_like(p) for p in stacked]
    with torch.enable_grad():
        for xc, yc in chunks:
            for total, g in zip(
                grads, torch.autograd.grad(losses(xc, yc, finite).sum(), stacked), strict=True
            ):
                total.add_(g)
    saved = [p.detach().clone() for p in stacked]
    with torch.no_grad():
        for k in finite:
            member_grads = [g[k] for g in grads]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in member_grads]))
            for p, g in zip(stacked, member_grads, strict=True):
                p[k].add_(g * (rho / (norm + 1e-12)))
        after = mean_losses()
        for p, w in zip(stacked, saved, strict=True):
            p.copy_(w)
    return {k: after[k] - before[k] if k in finite else math.nan for k in members}


# ----------------------------------------------------------------------------------------------------------------
# Onset of overfitting


def _finite(value: object) -> float | None:
    """`value` as a float if it is a finite number, else None (missing keys, null, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value) if math.isfinite(value) else None


def _running_median(values: Sequence[float], window: int) -> list[float]:
    """The median of each value's window of `window` epochs: centred on it, shifted inwards at the two ends of
    the run so that every median is over a full window (the first and last epochs are as noise-proof as the
    rest); over the whole run when it is shorter than `window`."""
    window = min(window, len(values))
    last_start = len(values) - window
    starts = [min(max(0, i - window // 2), last_start) for i in range(len(values))]
    return [median(values[start : start + window]) for start in starts]


@dataclass(frozen=True)
class _LossCurves:
    """A run's validation and training loss, smoothed by a running median (see `overfit_onset_epoch`)."""

    epochs: list[int]
    val: list[float]  # running median of the validation loss
    train: list[float]  # running median of the training loss
    lowest: int  # index of the lowest validation loss, unsmoothed (the first one on ties)

    @property
    def epochs_after_lowest(self) -> int:
        return len(self.val) - self.lowest - 1

    def threshold(self, min_rise: float, min_abs_rise: float) -> float:
        """The smoothed loss at the lowest epoch plus the tolerance max(min_rise · level, min_abs_rise)."""
        lowest = self.val[self.lowest]
        return lowest + max(min_rise * lowest, min_abs_rise)

    def sustained_rise_start(self, threshold: float) -> int | None:
        """Index of the first epoch after the lowest from which the smoothed validation loss stays above
        `threshold` to the end of the run; None if it ends at or below it."""
        start = None
        for index in range(len(self.val) - 1, self.lowest, -1):
            if self.val[index] <= threshold:
                break
            start = index
        return start


def _loss_curves(history: Sequence[Mapping], window: int) -> _LossCurves | None:
    """The smoothed curves of a run's history, read up to its first non-finite epoch; None without any."""
    epochs, val, train = [], [], []
    for index, row in enumerate(history):
        val_loss, train_loss = _finite(row.get("val/loss")), _finite(row.get("train/loss"))
        if val_loss is None or train_loss is None:
            break  # divergence (or a damaged record): what follows says nothing about generalization
        epochs.append(int(row.get("epoch", index + 1)))
        val.append(val_loss)
        train.append(train_loss)
    if not epochs:
        return None
    lowest = min(range(len(val)), key=val.__getitem__)
    return _LossCurves(epochs, _running_median(val, window), _running_median(train, window), lowest)


def overfit_onset_epoch(
    history: Sequence[Mapping],
    min_rise: float = 0.05,
    window: int = 5,
    min_abs_rise: float = 0.01,
    min_epochs: int = 3,
) -> int | None:
    """The epoch from which the run overfits: where a sustained rise of validation loss begins; None if none.

    `history` is the list of per-epoch records (keys "epoch", "val/loss", "train/loss"); it is read up to the
    first epoch whose losses are missing or not finite (a diverged run stops being about generalization there).
    Both losses are smoothed by a running median over `window` epochs centred on each epoch (5 by default; the
    windows of the first and last epochs are shifted inwards to stay full), so that one or two outlying epochs
    can neither start nor interrupt a rise. Let m be the epoch of the lowest validation loss (the first on ties;
    `best_epoch` unless early stopping monitors another metric), L the smoothed loss at m (the median of its
    window, so that one lucky epoch does not set the bar) and tolerance = max(`min_rise` · L, `min_abs_rise`)
    (5% of the loss, but at least 0.01 nats, so that a loss near 0 does not count a negligible wiggle). The
    onset is the first epoch after m from which the smoothed validation loss stays above L + tolerance until
    the end of the run, provided that

    1. it stays there for at least `min_epochs` epochs (3): fewer epochs after the minimum, as when early
       stopping with patience < 3 ends the run, are too few to tell a rise from noise (None);
    2. the smoothed training loss ends below its level at m (if both losses rise, the optimization is unstable,
       which is not overfitting).

    So the onset comes after the epoch of lowest validation loss, where the rise has passed the tolerance (for
    a clean U-shaped curve a few epochs after its minimum); a flat or noisy plateau that never leaves the
    tolerance band has no onset however late its minimum falls, and a late rise has its onset where it begins,
    not at a minimum long before. A rise that recedes before the end (epoch-wise double descent) is not
    reported: the question is whether the final model overfits.
    """
    curves = _loss_curves(history, window)
    if curves is None:
        return None
    start = curves.sustained_rise_start(curves.threshold(min_rise, min_abs_rise))
    if start is None or len(curves.val) - start < min_epochs:
        return None
    train_kept_falling = curves.train[-1] < curves.train[curves.lowest]
    return curves.epochs[start] if train_kept_falling else None


# ----------------------------------------------------------------------------------------------------------------
# Plain-language diagnosis


def _overfitting_line(history: Sequence[Mapping], summary: Mapping) -> str:
    curves = _loss_curves(history, window=5)
    gap = _finite(summary.get("gap/test_acc"))
    gap_text = f"; train-test accuracy gap {100 * gap:.1f} points" if gap is not None else ""
    if curves is None:
        return "no overfitting diagnosis: no epoch with finite training and validation loss"
    lowest, lowest_epoch, end = curves.val[curves.lowest], curves.epochs[curves.lowest], curves.val[-1]
    rise = end / lowest - 1 if lowest > 0 else math.inf
    onset = overfit_onset_epoch(history)
    if onset is not None:
        return (
            f"overfitting from epoch {onset}: validation loss stays more than 5% above its lowest level "
            f"({lowest:.3g} at epoch {lowest_epoch}) from then on and ends at {end:.3g} ({rise:+.0%}), while "
            f"training loss fell ({curves.train[curves.lowest]:.3g} -> {curves.train[-1]:.3g}){gap_text}"
        )
    if curves.epochs_after_lowest == 0:
        return f"no overfitting detected: validation loss was still at its lowest in the last epoch{gap_text}"
    if curves.epochs_after_lowest < 3:
        return (
            f"too early to tell: only {curves.epochs_after_lowest} epochs after the lowest validation loss "
            f"(epoch {lowest_epoch}), 3 are needed to tell a rise from noise{gap_text}"
        )
    return (
        f"no overfitting detected: validation loss ends {rise:+.0%} from its lowest level "
        f"(epoch {lowest_epoch}){gap_text}"
    )


def _underfitting_line(summary: Mapping) -> str | None:
    train_acc = _finite(summary.get("train/acc"))
    if train_acc is None or train_acc >= UNDERFIT_TRAIN_ACC:
        return None
    return (
        f"training accuracy only {train_acc:.0%}: the model underfits; try more epochs, a larger model or "
        "learning rate, or weaker regularization"
    )


def _calibration_line(summary: Mapping) -> str | None:
    ece = _finite(summary.get("test/ece"))
    if ece is None:
        return None
    if ece < WELL_CALIBRATED_ECE:
        return f"well calibrated: test ECE {ece:.3f}"
    confidence, accuracy = _finite(summary.get("test/confidence")), _finite(summary.get("test/acc"))
    if confidence is None or accuracy is None:
        return f"miscalibrated: test ECE {ece:.3f}"
    direction = "overconfident" if confidence > accuracy else "underconfident"
    return f"{direction}: test ECE {ece:.3f} (mean confidence {confidence:.0%} vs accuracy {accuracy:.0%})"


def _sparsity_line(summary: Mapping) -> str | None:
    zero_frac = _finite(summary.get("weights/zero_frac"))
    if zero_frac is None or zero_frac <= SPARSE_ZERO_FRAC:
        return None
    small_frac = _finite(summary.get("weights/small_frac"))
    small_text = f" ({small_frac:.1%} below 1e-3)" if small_frac is not None else ""
    return f"sparse weights: {zero_frac:.1%} of the weights are exactly zero{small_text}"


def _status_line(summary: Mapping) -> str | None:
    status, epochs_run = summary.get("status"), summary.get("epochs_run")
    if status == "failed":
        return f"run failed after {epochs_run} epochs: {summary.get('error') or 'no error message recorded'}"
    if status == "diverged":
        return (
            f"training diverged (non-finite loss) after {epochs_run} epochs: "
            "lower the learning rate or the regularization strength"
        )
    if status == "early_stopped":
        return (
            f"early stopping ended training after epoch {epochs_run}; best epoch {summary.get('best_epoch')}"
        )
    return None


def diagnose(history: Sequence[Mapping], summary: Mapping) -> list[str]:
    """A few lines of plain-language diagnosis of a finished run, from its per-epoch history and summary.

    In order: how the run ended (failed, diverged, early stopped; nothing for a completed run), whether and from
    when it overfits (`overfit_onset_epoch`), underfitting (training accuracy below 80%), calibration (test ECE),
    sparsity (more than 1% exact zeros). Missing or null values only drop the lines that need them.
    """
    lines = [
        _status_line(summary),
        _overfitting_line(history, summary),
        _underfitting_line(summary),
        _calibration_line(summary),
        _sparsity_line(summary),
    ]
    return [line for line in lines if line]


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib imported lazily; bare Figures, freed when the function returns)


PLOT_WORKERS = 4  # at most this many drawing processes: each one imports torch and matplotlib (~0.3 GB)


class Plotter:
    """Draws runs' figures: here, or for a stack (`workers` > 1) in up to PLOT_WORKERS processes. Drawing is pure
    Python, ~0.5 s a run, so the 48 runs of a stack finishing together took 24 s of one core while its other cores
    sat idle. `draw` returns a `Drawing`, whose `result()` is the figure's path or raises what drawing it raised."""

    def __init__(self, workers: int = 1):
        self.workers = min(workers, PLOT_WORKERS)
        self.pool = None

    def draw(self, function, *args) -> Drawing:
        if self.workers > 1:
            try:
                if self.pool is None:  # started on first use: a stack whose runs all fail never starts one
                    self.pool = ProcessPoolExecutor(
                        self.workers,
                        mp_context=multiprocessing.get_context("spawn"),
                        initializer=_plot_worker,
                        initargs=(os.getpid(),),
                    )
                return Drawing(function, args, self.pool.submit(function, *args))
            except BrokenProcessPool:  # a drawing process died: from now on figures are drawn here
                self.close()
                self.workers = 1
        return Drawing(function, args)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


@dataclass
class Drawing:
    """One figure: drawn by a process of the plotter (`future`), or here when it is asked for. A drawing process
    that dies (a signal, out of memory) costs time only, never a figure: it is drawn here instead."""

    function: Callable
    args: tuple
    future: Future | None = None

    def result(self) -> Path:
        if self.future is not None:
            try:
                return self.future.result()
            except BrokenProcessPool:
                pass
        return self.function(*self.args)


def _plot_worker(owner: int) -> None:
    """A drawing process leaves Ctrl-C, SIGTERM and the cluster's requeue signal to the training process (which
    finishes or checkpoints its runs, figures included) and takes one thread: the stack's process has the cores."""
    from reglab.preemption import requeue_signal, signal_when_parent_dies

    for sig in (signal.SIGINT, signal.SIGTERM, requeue_signal()):
        signal.signal(sig, signal.SIG_IGN)
    # its owner died (out of memory, killed): nothing left to draw for
    signal_when_parent_dies(signal.SIGKILL, owner)
    torch.set_num_threads(1)


def _figure(size: tuple[float, float], margins: dict):
    """A bare Figure with fixed margins: a layout engine (constrained, tight) measures every text box first and
    cost ~0.15 s per figure here, about half of drawing it; every run writes three of them."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    figure.subplots_adjust(**margins)
    return figure


# A run's three figures are drawn into figures kept from the run before, with its values put in: a new figure's first
# drawing made every tick, text and patch (reliability.png took 69 ms, 35 ms redrawn; measured), and a stack draws 3
# figures for each of its members at its end. Kept per thread (a plotter draws in one) and per kind; the figure a run
# gets is pixel for pixel the one a new figure gives (tests/test_diagnostics.py).
_kept = threading.local()


def _kept_figure(kind: Hashable, build: Callable):
    """This thread's figure of one kind, built on first use (`build()` returns the object that holds it)."""
    figures = _kept.__dict__.setdefault("figures", {})
    if kind not in figures:
        figures[kind] = build()
    return figures[kind]


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # PNG: zlib level 1 instead of PIL's 6, 11% less time per figure for 11% larger files (measured, three figures)
    png = {"pil_kwargs": {"compress_level": 1}} if path.suffix.lower() == ".png" else {}
    figure.savefig(path, dpi=100, **png)
    return path


def _rescaled(axes, verticals: Sequence = ()) -> None:
    """Axis limits from the data the axes show now, as a new figure's autoscaling sets them. Vertical lines
    (`axvline`) count at their x alone, put in as it is: the axes would find it through the display transform of
    the view they have, which left a limit's last digit to the figure drawn before (seen on a log axis)."""
    shown = [line for line in verticals if line.get_visible()]
    for line in shown:
        line.set_visible(False)
    try:
        axes.relim(visible_only=True)
    finally:
        for line in shown:
            line.set_visible(True)
    for line in shown:  # after relim, which starts the data limits afresh
        axes.update_datalim([(line.get_xdata()[0], 0.0)], updatey=False)
    axes.autoscale_view()


def _series(history: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    """Epochs and values of one metric; missing or non-finite values become NaN (a gap in the line)."""
    epochs = [int(row.get("epoch", index + 1)) for index, row in enumerate(history)]
    values = [_finite(row.get(key)) for row in history]
    return epochs, [math.nan if value is None else value for value in values]


def _finite_panels(history: Sequence[Mapping]) -> bool:
    """Whether both panels of curves.png have a finite value to show (a run that diverged at once has none)."""
    return all(
        any(
            _finite(row.get(f"{split}/{metric}")) is not None for row in history for split in ("train", "val")
        )
        for metric in ("loss", "acc")
    )


class _CurvesFigure:
    """curves.png's figure: per panel (loss, accuracy) the training and validation lines, and the epoch markers."""

    MARKERS = (
        ("best epoch", "tab:green", "--"),
        ("overfitting onset", "tab:red", ":"),
        ("early stop", "black", "-."),
    )

    def __init__(self) -> None:
        self.figure = _figure((11, 4.2), dict(left=0.06, right=0.985, bottom=0.12, top=0.88, wspace=0.18))
        self.panels = dict(zip(("loss", "acc"), self.figure.subplots(1, 2), strict=True))
        self.lines, self.markers = {}, {}
        for metric, axes in self.panels.items():
            for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
                (self.lines[metric, split],) = axes.plot([], [], color=color, label=split)
            self.markers[metric] = [
                axes.axvline(0, color=color, linestyle=style, linewidth=1) for _, color, style in self.MARKERS
            ]
            axes.xaxis.get_major_locator().set_params(integer=True)
            axes.set_xlabel("epoch")
            axes.set_ylabel("loss" if metric == "loss" else "accuracy")
            axes.grid(alpha=0.3)
        self.panels["acc"].set_ylim(0, 1.02)

    def show(self, history: Sequence[Mapping], epochs: Sequence[int | None], title: str) -> None:
        for metric, axes in self.panels.items():
            for split in ("train", "val"):
                self.lines[metric, split].set_data(*_series(history, f"{split}/{metric}"))
            shown = []
            for line, epoch, (label, _, _) in zip(self.markers[metric], epochs, self.MARKERS, strict=True):
                line.set_visible(epoch is not None)
                if epoch is not None:
                    line.set_xdata([epoch, epoch])
                    line.set_label(f"{label} ({epoch})")
                    shown.append(line)
            _rescaled(axes, self.markers[metric])
            axes.legend(
                handles=[self.lines[metric, "train"], self.lines[metric, "val"], *shown],
                fontsize="small",
                loc="upper center" if metric == "loss" else "lower right",
            )
        self.figure.suptitle(title)


def plot_curves(
    history: Sequence[Mapping],
    path: str | Path,
    *,
    best_epoch: int | None = None,
    onset_epoch: int | None = None,
    stop_epoch: int | None = None,
    title: str | None = None,
) -> Path:
    """curves.png: loss (left) and accuracy (right) per epoch, training vs validation, with vertical markers at
    the best epoch, the overfitting onset and the early stop (each only if given). Returns `path`."""
    # a panel without a finite value would keep the last run's limits (matplotlib autoscales from data only): such
    # a run gets a new figure
    curves = _kept_figure("curves", _CurvesFigure) if _finite_panels(history) else _CurvesFigure()
    curves.show(history, (best_epoch, onset_epoch, stop_epoch), title or "training vs validation")
    return _save(curves.figure, path)


class _ReliabilityFigure:
    """reliability.png's figure: each bin's share of the samples and its accuracy as bars, and the diagonal."""

    def __init__(self, n_bins: int) -> None:
        self.figure = _figure((5.5, 5), dict(left=0.13, right=0.97, bottom=0.1, top=0.92))
        self.axes = axes = self.figure.subplots()
        lower_edges, zeros = [b / n_bins for b in range(n_bins)], [0.0] * n_bins
        bars = partial(axes.bar, lower_edges, zeros, width=1 / n_bins, align="edge")
        self.share = bars(color="grey", alpha=0.25, label="share of samples")
        self.accuracy = bars(edgecolor="tab:blue", fill=False, label="accuracy")
        axes.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("top-label confidence")
        axes.set_ylabel("accuracy in the bin")
        axes.legend(loc="upper left", fontsize="small")

    def show(self, share: list[float], accuracy: list[float], title: str) -> None:
        for bars, heights in ((self.share, share), (self.accuracy, accuracy)):
            for bar, height in zip(bars, heights, strict=True):
                bar.set_height(height)
        self.axes.set_title(title)


def plot_reliability(logits: Tensor, targets: Tensor, path: str | Path, n_bins: int = 15) -> Path:
    """reliability.png: accuracy per top-label confidence bin against the diagonal of perfect calibration, with
    each bin's share of the samples as a faint histogram and the ECE in the title. Returns `path`."""
    _, confidences, correct = _top_label(logits, targets)
    counts, n_correct, _ = _calibration_bins(confidences, correct, n_bins).cpu().unbind(dim=1)
    ece = expected_calibration_error(confidences, correct, n_bins).item()
    filled = counts > 0
    accuracy = torch.where(filled, n_correct / counts.clamp(min=1), torch.nan).tolist()
    share = (counts / counts.sum().clamp(min=1)).tolist()
    reliability = _kept_figure(("reliability", n_bins), partial(_ReliabilityFigure, n_bins))
    reliability.show(
        share, accuracy, f"reliability: ECE {ece:.3f} ({n_bins} bins, {int(counts.sum())} samples)"
    )
    return _save(reliability.figure, path)


class _WeightsFigure:
    """weights.png's figure: the histogram of log |w| as steps over a log axis (`nonzero`), or none (every weight
    is zero), and the 1e-3 threshold."""

    def __init__(self, nonzero: bool) -> None:
        from matplotlib.ticker import FuncFormatter, NullLocator

        self.figure = _figure((6.5, 4.2), dict(left=0.12, right=0.97, bottom=0.12, top=0.9))
        self.axes = axes = self.figure.subplots()
        self.steps = None
        if nonzero:
            self.steps = axes.stairs([0.0], [1.0, 10.0], fill=True, alpha=0.7, label="nonzero weights")
            axes.set_xscale("log")
            axes.xaxis.set_minor_locator(NullLocator())  # ticks at decades only: each tick costs time to draw
            # "1e-3" in plain text: the default "10^-3" is typeset by mathtext, ~60 ms a figure, a fifth of a run's
            # three
            axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"1e{math.log10(value):.0f}"))
        self.threshold = axes.axvline(
            1e-3, color="tab:red", linestyle=":", linewidth=1, label="|w| = 1e-3 (small)"
        )
        axes.set_xlabel("|w|")
        axes.set_ylabel("number of weights")

    def show(self, counts: Tensor | None, edges: Tensor | None, zero_frac: float, title: str) -> None:
        if self.steps is not None:
            self.steps.set_data(counts.numpy(), edges.numpy())
        _rescaled(self.axes, [self.threshold])
        handles = [self.threshold] if self.steps is None else [self.steps, self.threshold]
        self.axes.legend(
            handles=handles, fontsize="small", title=f"exact zeros: {zero_frac:.1%}", loc="upper left"
        )
        self.axes.set_title(title)


def plot_weight_histogram(weights: Sequence[Tensor], path: str | Path, n_bins: int = 60) -> Path:
    """weights.png: histogram of |w| (log x axis) over one model's weight tensors (ndim >= 2), with the fraction of
    exact zeros (which a log axis cannot show) in the title and the 1e-3 "small" threshold marked. Returns `path`."""
    weights = [w.detach() for w in weights]
    magnitudes = torch.cat([w.flatten().float().cpu() for w in weights]).abs() if weights else torch.zeros(0)
    zero_frac = (magnitudes == 0).float().mean().item() if magnitudes.numel() else 0.0
    log_magnitudes = magnitudes[magnitudes > 0].log10()
    counts = edges = None
    if log_magnitudes.numel():
        low, high = log_magnitudes.min().item(), log_magnitudes.max().item() + 1e-6
        counts = torch.histc(log_magnitudes, bins=n_bins, min=low, max=high)
        edges = torch.logspace(low, high, n_bins + 1, dtype=torch.float64)
    histogram = _kept_figure(("weights", counts is not None), partial(_WeightsFigure, counts is not None))
    histogram.show(
        counts, edges, zero_frac, f"|w| of {magnitudes.numel():,} weights in {len(weights)} tensors"
    )
    return _save(histogram.figure, path)
