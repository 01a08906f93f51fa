"""Early stopping: table-driven score sequences -> (stop epoch, best epoch), best-weight restore, resume."""

import io
import math

import pytest
import torch
from torch import nn

from reglab.regularizers.early_stopping import EarlyStopping, resolve_mode

NAN = math.nan

# (id, constructor kwargs, scores of epochs 0, 1, ..., expected stop epoch or None, best epoch, reason start)
CASES = [
    ("basic", {"patience": 2}, [1.0, 0.8, 0.9, 0.85, 0.7], 3, 1, "patience"),
    ("tie_is_no_improvement", {"patience": 2}, [1.0, 0.5, 0.5, 0.5], 3, 1, "patience"),
    ("min_delta_abs", {"patience": 2, "min_delta": 0.1}, [1.0, 0.95, 0.85, 0.8, 0.79], 4, 2, "patience"),
    # rel, max mode, negative scores: the margin is 5% of |best|. With best instead of |best| the margin would
    # turn negative and epoch 1 (-9.6, not 0.5 better than -10) would count as an improvement.
    (
        "rel_negative_max",
        {"mode": "max", "patience": 2, "min_delta": 0.05, "delta_mode": "rel"},
        [-10.0, -9.6, -9.4, -9.0, -8.9, -8.8],
        None,
        4,
        None,
    ),
    (
        "rel_negative_min",
        {"patience": 2, "min_delta": 0.1, "delta_mode": "rel"},
        [-1.0, -1.05, -1.2, -1.21, -1.22],
        4,
        2,
        "patience",
    ),
    # Improving on the best but never on the baseline counts towards patience (Keras 3 would never stop here).
    ("baseline_never_beaten", {"patience": 2, "baseline": 0.5}, [0.9, 0.8, 0.7, 0.6], 1, 1, "patience"),
    ("baseline_beaten", {"patience": 2, "baseline": 0.5}, [0.9, 0.4, 0.45, 0.42, 0.41], 3, 1, "patience"),
    # Warm-up epochs 0-2 are ignored, even though their scores are the lowest.
    (
        "start_from_epoch",
        {"patience": 1, "start_from_epoch": 3},
        [0.1, 0.2, 0.3, 1.0, 0.9, 0.95],
        5,
        4,
        "patience",
    ),
    ("patience_0", {"patience": 0}, [1.0, 0.9, 0.95, 0.5], 2, 1, "patience"),
    ("patience_0_improving", {"patience": 0}, [1.0, 0.9, 0.8], None, 2, None),
    ("nan", {"patience": 5}, [1.0, 0.9, NAN, 0.5], 2, 1, "non-finite"),
    ("inf", {"patience": 5}, [1.0, math.inf], 1, 0, "non-finite"),
    (
        "stopping_threshold_equal",
        {"stopping_threshold": 0.5},
        [1.0, 0.7, 0.5, 0.4],
        2,
        2,
        "stopping threshold",
    ),
    ("divergence_threshold", {"divergence_threshold": 2.0}, [1.0, 1.5, 2.0, 2.5, 0.1], 3, 0, "divergence"),
    ("accuracy_is_maximized", {"monitor": "val/acc", "patience": 2}, [0.5, 0.6, 0.6, 0.55], 3, 1, "patience"),
    (
        "accuracy_threshold",
        {"monitor": "val/accuracy", "stopping_threshold": 0.9},
        [0.5, 0.95],
        1,
        1,
        "stopping",
    ),
    ("budget_runs_out", {"patience": 5}, [1.0, 0.8, 0.9, 0.85], None, 1, None),
]


def _run(stopper: EarlyStopping, scores, first_epoch: int = 0, model=None) -> int | None:
    for epoch, score in enumerate(scores, start=first_epoch):
        if model is not None:
            with torch.no_grad():
                model.weight.fill_(epoch)  # weights that say which epoch produced them
        if stopper.step(score, epoch, model=model):
            return epoch
    return None


@pytest.mark.parametrize(
    ("kwargs", "scores", "stop_epoch", "best_epoch", "reason"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_sequences(kwargs, scores, stop_epoch, best_epoch, reason):
    stopper = EarlyStopping(**kwargs)
    assert _run(stopper, scores) == stop_epoch
    assert stopper.stopped_epoch == stop_epoch
    assert stopper.best_epoch == best_epoch
    assert stopper.best_score == scores[best_epoch]
    if reason is None:
        assert stopper.stop_reason is None
    else:
        assert stopper.stop_reason.startswith(reason)


def test_patience_reason_reads_well():
    scores = [1.0 - 0.01 * epoch for epoch in range(13)] + [0.9] * 20
    stopper = EarlyStopping(patience=10, min_delta=0.001)
    assert _run(stopper, scores) == 22
    assert stopper.stop_reason == "patience: no improvement > 0.001 in 10 epochs since epoch 12"


def test_nan_reason_names_the_metric_and_epoch():
    stopper = EarlyStopping()
    _run(stopper, [1.0] * 7 + [NAN])
    assert stopper.stop_reason == "non-finite val/loss=nan at epoch 7"


def test_nan_is_ignored_without_check_finite():
    stopper = EarlyStopping(patience=3, check_finite=False)
    assert _run(stopper, [1.0, NAN, 0.5, 0.6]) is None
    assert stopper.best_epoch == 2


def test_step_after_stop_keeps_stopping():
    stopper = EarlyStopping(patience=0)
    _run(stopper, [1.0, 2.0])
    assert stopper.step(0.0, 2) and stopper.stopped_epoch == 1 and stopper.best_score == 1.0


@pytest.mark.parametrize(
    ("monitor", "mode", "expected"),
    [
        ("val/loss", "auto", "min"),
        ("val/acc", "auto", "max"),
        ("val/top1_accuracy", "auto", "max"),
        ("val/acc", "min", "min"),
    ],
)
def test_resolve_mode(monitor, mode, expected):
    assert resolve_mode(monitor, mode) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_delta": -0.1}, "min_delta=-0.1"),
        ({"patience": -1}, "patience=-1"),
        ({"mode": "minimum"}, r"mode='minimum'.*allowed values are \('auto', 'min', 'max'\)"),
        ({"delta_mode": "percent"}, r"delta_mode='percent'.*allowed values are \('abs', 'rel'\)"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EarlyStopping(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "scores"),
    [
        ({"patience": 2}, [3.0, 1.0, 2.0, 2.5, 2.7]),  # stopped by patience
        ({"stopping_threshold": 0.5}, [3.0, 2.0, 0.4]),  # stopped by the threshold
        ({"patience": 10}, [3.0, 1.0, 2.0, 2.5, 2.7]),  # the epoch budget runs out first
    ],
)
def test_restore_loads_the_best_weights_whatever_ended_training(kwargs, scores):
    model = nn.Linear(3, 2)
    stopper = EarlyStopping(**kwargs)
    _run(stopper, scores, model=model)
    assert stopper.restore(model)
    best = scores.index(min(scores))
    assert stopper.best_epoch == best
    assert torch.equal(model.weight.detach(), torch.full((2, 3), float(best)))


def test_restore_is_a_no_op_when_disabled_or_empty():
    model = nn.Linear(3, 2)
    weight = model.weight.detach().clone()
    assert not EarlyStopping().restore(model)  # nothing saved yet
    stopper = EarlyStopping(restore_best=False)
    _run(stopper, [1.0, 0.5], model=model)
    assert stopper.best_state is not None  # kept for saving (best.pt), but never loaded back
    with torch.no_grad():
        model.weight.copy_(weight)
    assert not stopper.restore(model) and torch.equal(model.weight.detach(), weight)


def test_state_dict_round_trip_resumes_to_identical_decisions():
    scores = [1.0, 0.9, 0.95, 0.8, 0.85, 0.84, 0.83, 0.82, 0.9, 0.95]
    kwargs = {"patience": 3, "min_delta": 0.01, "baseline": 0.95}

    reference_model = nn.Linear(3, 2)
    reference = EarlyStopping(**kwargs)
    reference_decisions = [reference.step(s, e, reference_model) for e, s in enumerate(scores)]

    model = nn.Linear(3, 2)
    first = EarlyStopping(**kwargs)
    decisions = [first.step(s, e, model) for e, s in enumerate(scores[:5])]
    buffer = io.BytesIO()
    torch.save({"early_stopping": first.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["early_stopping"]

    resumed = EarlyStopping(**kwargs)
    resumed.load_state_dict(state)
    decisions += [resumed.step(s, e, model) for e, s in enumerate(scores[5:], start=5)]

    assert decisions == reference_decisions and any(decisions)
    for attribute in ("best_score", "best_epoch", "stopped_epoch", "stop_reason", "wait"):
        assert getattr(resumed, attribute) == getattr(reference, attribute)
    assert resumed.restore(model) and torch.equal(model.weight, resumed.best_state["weight"])


def test_load_state_dict_rejects_another_monitor():
    state = EarlyStopping(monitor="val/loss").state_dict()
    with pytest.raises(ValueError, match="monitor='val/loss'"):
        EarlyStopping(monitor="val/acc").load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Every combination of the options: it works, or validation refuses it before training

INF = math.inf
SEQUENCES = {  # scores of epochs 0, 1, ...: non-finite values first, later, throughout, and none
    "nan_first": [NAN, 1.0, 0.9, 0.95, 0.96, 0.97],
    "nan_later": [1.0, 0.9, NAN, NAN, NAN, NAN],
    "all_nan": [NAN, NAN, NAN, NAN],
    "plus_inf_first": [INF, 1.0, 0.9, 1.0, 1.1, 1.2],
    "minus_inf_first": [-INF, 0.1, 0.2, 0.3, 0.4],
    "inf_later": [1.0, 0.8, INF, -INF, 0.7, 0.75, 0.8],
    "finite": [1.0, 0.8, 0.85, 0.9, 0.95, 1.0],
}
OPTION_VALUES = {
    "mode": ["min", "max"],
    "patience": [0, 2],
    "min_delta": [0.0, 0.05],
    "delta_mode": ["abs", "rel"],
    "baseline": [None, 0.9],
    "start_from_epoch": [0, 1],
    "check_finite": [True, False],
    "stopping_threshold": [None, 0.85],
    "divergence_threshold": [None, 2.0, 0.5],
}


def option_combinations():
    import itertools

    names = list(OPTION_VALUES)
    for values in itertools.product(*OPTION_VALUES.values()):
        yield dict(zip(names, values, strict=True))


@pytest.fixture(scope="module")
def early_stopping_config():
    """The composed default config with regularizer=early_stopping, as plain containers."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["regularizer=early_stopping", "logger=none"])
    return OmegaConf.to_container(cfg, resolve=True)


def _feed(stopper: EarlyStopping, scores) -> tuple[int | None, list[float]]:
    """Step through `scores`; returns the stop epoch and the scores early stopping monitored (warm-up and the
    non-finite score that check_finite stops at are not monitored)."""
    monitored = []
    for epoch, score in enumerate(scores):
        stop_at_non_finite = stopper.check_finite and not math.isfinite(score)
        warm_up = stopper.steps < stopper.start_from_epoch
        if not stop_at_non_finite and not warm_up:
            monitored.append(score)
        if stopper.step(score, epoch):
            return epoch, monitored
    return None, monitored


def _check_decisions(stopper: EarlyStopping, scores, options: dict) -> None:
    stop_epoch, monitored = _feed(stopper, scores)
    if stop_epoch is not None:
        assert isinstance(stopper.stop_reason, str) and "None" not in stopper.stop_reason, stopper.stop_reason
        assert stopper.step(0.5, stop_epoch + 1) is True  # stays stopped
    if options["check_finite"] and any(not math.isfinite(s) for s in scores):
        first_non_finite = next(i for i, s in enumerate(scores) if not math.isfinite(s))
        assert stop_epoch is not None and stop_epoch <= first_non_finite
    candidates = [s for s in monitored if not math.isnan(s)]
    if not candidates:
        assert stopper.best_score is None
        return
    best_of_all = min(candidates) if stopper.mode == "min" else max(candidates)
    if options["min_delta"] == 0:
        assert stopper.best_score == best_of_all  # every strictly better score is a new best
    else:  # a margin may keep an earlier best, never a worse-than-everything infinity
        worst = INF if stopper.mode == "min" else -INF
        assert stopper.best_score != worst or best_of_all == worst


def test_every_combination_of_options_works_or_is_refused(early_stopping_config):
    from reglab.errors import ConfigError
    from reglab.schema import validate

    refused = 0
    for options in option_combinations():
        cfg = {**early_stopping_config}
        cfg["regularizer"] = {"early_stopping": {**cfg["regularizer"]["early_stopping"], **options}}
        try:
            validate(cfg)
        except ConfigError as error:
            assert "regularizer.early_stopping." in str(error), error
            refused += 1
            continue
        node = cfg["regularizer"]["early_stopping"]
        for name, scores in SEQUENCES.items():
            try:
                _check_decisions(EarlyStopping(**node), scores, options)
            except Exception as error:
                raise AssertionError(f"{name} {options}: {type(error).__name__}: {error}") from error
    assert 0 < refused < len(list(option_combinations()))  # contradictory thresholds only
