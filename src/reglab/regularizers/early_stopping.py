"""Early stopping: end training when a validation metric stops improving, and keep the best weights.

Training longer fits the training set ever better while the validation score eventually gets worse; early
stopping picks the epoch count on validation data (for a quadratic model and gradient descent it acts like an
L2 penalty whose strength shrinks as 1/(lr·epochs), Goodfellow et al. 2016, section 7.8). With scores s_t:

    improved(t)  <=>  s_t < best - δ   (mode "min")        or   s_t > best + δ   (mode "max")
    δ = min_delta ("abs")   or   δ = min_delta · |best| ("rel")

and training stops once ``patience`` monitored epochs in a row did not improve.

Semantics follow Keras 3 ``keras.callbacks.EarlyStopping`` where Keras and Lightning agree; every choice:

- Improvement is strict: better than the best by *more than* δ; a tie is no improvement (both).
- ``patience``: stop at the ``patience``-th non-improving epoch in a row, so patience=0 and patience=1 both
  stop at the first non-improving epoch (both libraries count the same way).
- ``mode="auto"``: "max" when the monitor name contains "acc" (accuracy), else "min". Keras 3 asks the
  compiled metric for its direction and raises for unknown names; we have no compiled metrics.
- ``baseline`` (Keras; Lightning has none): the best score and best weights are tracked as usual, but the
  patience counter only resets when the score also beats the baseline, so training stops if the model has not
  improved over the baseline within ``patience`` epochs. Keras 3 skips the stop check on any epoch that beats
  the previous best, so a model that keeps creeping up without reaching the baseline is never stopped, despite
  its docstring; here such epochs count towards patience. Keras also never stops at epoch 0 (an ``epoch > 0``
  guard); we have no such guard.
- ``start_from_epoch`` (Keras): the first ``start_from_epoch`` calls to ``step`` are not monitored at all
  (warm-up), counted by the object itself so that it does not matter whether the caller numbers epochs from 0
  (Keras) or from 1 (reglab's loop): both skip the same number of epochs. Warm-up epochs neither set the best score nor count towards patience. The non-finite check still runs during
  warm-up, because a NaN loss never recovers.
- ``check_finite`` (Lightning; Keras has a separate TerminateOnNaN callback): a NaN or ±inf score stops at
  once. With ``check_finite=False`` a NaN score is never an improvement and counts towards patience, and
  ±inf compare as numbers: any finite score improves on a best of +inf (mode "min"), whatever min_delta.
  ``stopping_threshold`` (Lightning): stop as soon as the score is at least as good as it (Lightning
  requires strictly better). ``divergence_threshold`` (Lightning): stop as soon as the score is worse than it.
  Unlike Lightning, the best score is updated before the thresholds are checked, so the epoch that reaches
  the stopping threshold is the one whose weights are restored. A divergence threshold that is not worse than
  the stopping threshold would stop every run at its first monitored epoch: reglab's config validation
  refuses it.
- ``min_delta < 0`` is an error: Keras takes abs(min_delta) and Lightning flips its sign, both silently.
- ``restore_best`` (Keras ``restore_best_weights``): ``step(..., model=model)`` keeps a copy of the weights of
  the best epoch, and ``restore(model)`` loads them back. The caller calls ``restore`` when training ends for
  *any* reason, patience, a threshold or simply the epoch budget running out; tf.keras 2.x only restored when
  early stopping triggered, so a run that used all its epochs kept its last, not its best, weights.

No global state: everything lives on the object, and ``state_dict()`` holds only Python scalars, strings and
tensors, so it can be saved in a checkpoint that ``torch.load(..., weights_only=True)`` reads back.
"""

from __future__ import annotations

import math
import sys

from torch import Tensor, nn

from reglab.errors import ConfigError
from reglab.regularizers.base import Technique
from reglab.specs import boolean, choice, integer, number, optional

MODES = ("auto", "min", "max")
DELTA_MODES = ("abs", "rel")
# what an epoch's metrics row holds that early stopping may watch
MONITORABLE = (
    "val/loss",
    "val/acc",
    "val/nll",
    "val/ece",
    "val/confidence",
    "train/loss",
    "train/acc",
    "gap/val_loss",
)


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"EarlyStopping: unknown {key}={value!r}; allowed values are {allowed}")


def resolve_mode(monitor: str, mode: str) -> str:
    """'min' or 'max': ``mode`` itself, or for "auto" 'max' when ``monitor`` names an accuracy, else 'min'."""
    _check_choice("mode", mode, MODES)
    if mode != "auto":
        return mode
    return "max" if "acc" in monitor.lower() else "min"


class EarlyStopping:
    """Decides after each epoch whether to stop, and keeps the best weights; see the module docstring."""

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: str = "auto",
        patience: int = 10,
        min_delta: float = 0.0,
        delta_mode: str = "abs",
        baseline: float | None = None,
        start_from_epoch: int = 0,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        restore_best: bool = True,
    ) -> None:
        _check_choice("delta_mode", delta_mode, DELTA_MODES)
        if min_delta < 0:
            raise ValueError(
                "EarlyStopping: min_delta must be >= 0 (the direction comes from mode), "
                f"got min_delta={min_delta}"
            )
        if patience < 0:
            raise ValueError(f"EarlyStopping: patience must be >= 0, got patience={patience}")
        self.monitor = monitor
        self.mode = resolve_mode(monitor, mode)
        self.patience = patience
        self.min_delta = min_delta
        self.delta_mode = delta_mode
        self.baseline = baseline
        self.start_from_epoch = start_from_epoch
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.restore_best = restore_best
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0  # monitored epochs since the last epoch that improved (and beat the baseline)
        self.steps = 0  # calls to step(), for the warm-up
        self.stopped_epoch: int | None = None
        self.stop_reason: str | None = None
        self.best_state: dict[str, Tensor] | None = None

    @classmethod
    def tracker(cls, monitor: str = "val/loss") -> EarlyStopping:
        """One that never stops training: it only keeps the best epoch and its weights (reglab's best.pt when
        early stopping is off)."""
        return cls(monitor=monitor, patience=sys.maxsize, check_finite=False)

    def _better(self, value: float, reference: float) -> bool:
        return value < reference if self.mode == "min" else value > reference

    def _is_improvement(self, value: float, reference: float | None) -> bool:
        """Better than ``reference`` by more than min_delta (absolute) or min_delta·|reference| (relative).

        NaN is never an improvement; any score is one over no reference at all. Against an infinite reference
        (a best of +inf when minimizing) a margin means nothing (inf − δ·inf is NaN): plain "better" decides.
        """
        if math.isnan(value):
            return False
        if reference is None:
            return True  # the first monitored score that is a number is the best so far
        if not math.isfinite(reference):
            return self._better(value, reference)
        # abs(reference) keeps the margin positive for negative scores (e.g. a log-likelihood).
        delta = self.min_delta if self.delta_mode == "abs" else self.min_delta * abs(reference)
        shifted = reference - delta if self.mode == "min" else reference + delta
        return self._better(value, shifted)

    def _stop(self, epoch: int, reason: str) -> bool:
        self.stopped_epoch = epoch
        self.stop_reason = reason
        return True

    def _record_best(self, value: float, epoch: int, model: nn.Module | None) -> None:
        self.best_score, self.best_epoch = value, epoch
        if model is not None:  # kept even without restore_best: the caller may save them (reglab's best.pt)
            # Clones stay on the parameters' device: no host transfer, at the price of one model's memory.
            self.best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}

    def step(self, value: float | Tensor, epoch: int, model: nn.Module | None = None) -> bool:
        """Feed the monitored score of ``epoch``; returns True when training should stop now.

        Pass ``model`` to keep a copy of its weights whenever the score is a new best. Once stopped, further
        calls keep returning True and change nothing.
        """
        if self.stop_reason is not None:
            return True
        value = float(value)
        if self.check_finite and not math.isfinite(value):
            return self._stop(epoch, f"non-finite {self.monitor}={value} at epoch {epoch}")
        self.steps += 1
        if self.steps <= self.start_from_epoch:
            return False
        if self._is_improvement(value, self.best_score):
            self._record_best(value, epoch, model)
            beats_baseline = self.baseline is None or self._is_improvement(value, self.baseline)
            self.wait = 0 if beats_baseline else self.wait + 1
        else:
            self.wait += 1
        return self._check_stop(value, epoch)

    def _check_stop(self, value: float, epoch: int) -> bool:
        threshold, divergence = self.stopping_threshold, self.divergence_threshold
        if threshold is not None and (value == threshold or self._better(value, threshold)):
            return self._stop(
                epoch, f"stopping threshold reached: {self.monitor}={value:.6g} at epoch {epoch}"
            )
        if divergence is not None and self._better(divergence, value):
            return self._stop(
                epoch, f"divergence threshold exceeded: {self.monitor}={value:.6g} at epoch {epoch}"
            )
        if self.wait > 0 and self.wait >= self.patience:
            return self._stop(epoch, self._patience_reason())
        return False

    def _patience_reason(self) -> str:
        if self.best_score is None:  # only NaN scores so far (check_finite=False lets them through)
            return f"patience: no {self.monitor} but NaN in {self.wait} monitored epochs"
        unit = "%" if self.delta_mode == "rel" else ""
        delta = self.min_delta * 100 if self.delta_mode == "rel" else self.min_delta
        reason = (
            f"patience: no improvement > {delta:g}{unit} in {self.wait} epochs since epoch {self.best_epoch}"
        )
        if self.baseline is not None and not self._is_improvement(self.best_score, self.baseline):
            reason += f" (baseline {self.baseline:g} never beaten)"
        return reason

    def restore(self, model: nn.Module) -> bool:
        """Load the best epoch's weights into ``model``; returns False, doing nothing, when none were kept."""
        if not self.restore_best or self.best_state is None:
            return False
        model.load_state_dict(self.best_state)
        return True

    def state_dict(self) -> dict:
        """Progress so far (not the configuration), as plain Python values and tensors."""
        return {
            "monitor": self.monitor,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "steps": self.steps,
            "stopped_epoch": self.stopped_epoch,
            "stop_reason": self.stop_reason,
            "best_state": None if self.best_state is None else dict(self.best_state),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``; the monitored metric must be the same."""
        if state["monitor"] != self.monitor:
            raise ValueError(
                f"EarlyStopping: state was saved for monitor={state['monitor']!r}, this one monitors "
                f"{self.monitor!r}; build it with the same monitor to resume"
            )
        self.best_score = state["best_score"]
        self.best_epoch = state["best_epoch"]
        self.wait = state["wait"]
        self.steps = state["steps"]
        self.stopped_epoch = state["stopped_epoch"]
        self.stop_reason = state["stop_reason"]
        self.best_state = state["best_state"]


class EarlyStoppingTechnique(Technique):
    """Stops a member when its monitored metric stops improving; restores its best weights at the end."""

    name = "early_stopping"
    keys = {
        "monitor": choice(*MONITORABLE),
        "mode": choice(*MODES),
        "patience": integer(0),
        "min_delta": number(0),
        "delta_mode": choice(*DELTA_MODES),
        "baseline": optional(number()),
        "start_from_epoch": integer(0),
        "check_finite": boolean(),
        "stopping_threshold": optional(number()),
        "divergence_threshold": optional(number()),
        "restore_best": boolean(),
    }
    strength_key = "patience"
    order = 40

    @classmethod
    def check(cls, settings, cfg):
        """A divergence threshold that is not worse than the stopping threshold stops every run at once: each
        score either reaches the one or passes the other."""
        stopping, divergence = settings["stopping_threshold"], settings["divergence_threshold"]
        if stopping is None or divergence is None:
            return
        minimizing = resolve_mode(settings["monitor"], settings["mode"]) == "min"
        if (divergence > stopping) if minimizing else (divergence < stopping):
            return
        direction = "above" if minimizing else "below"
        raise ConfigError(
            "regularizer.early_stopping.divergence_threshold",
            divergence,
            f"null or a number {direction} stopping_threshold={stopping:g} when {settings['monitor']} is "
            f"{'minimized' if minimizing else 'maximized'} (otherwise every score stops training at once)",
        )

    def __init__(self, settings, seeds=None):
        super().__init__(settings, seeds)
        self.stoppers = {k: EarlyStopping(**s) for k, s in enumerate(settings) if s is not None}

    def end_epoch(self, member, metrics, epoch, model):
        stopper = self.stoppers.get(member)
        return stopper is not None and stopper.step(metrics[stopper.monitor], epoch, model=model)

    def selection(self, member):
        return self.stoppers.get(member)

    def state_dict(self, member):
        return self.stoppers[member].state_dict() if member in self.stoppers else {}

    def load_state_dict(self, member, state):
        if member in self.stoppers:
            self.stoppers[member].load_state_dict(state)
