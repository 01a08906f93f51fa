"""Each `impl: scratch` / `impl: torch` pair trains the same model to matching metrics through the real entrypoint."""

from __future__ import annotations

import statistics

import pytest

from tests.conftest import job_dirs, read_metrics, read_summary, run_train

pytestmark = (
    pytest.mark.slow
)  # whole training runs through train.py: `make test` skips them (`make test-slow` runs them)

QUICK = [
    "logger=none",
    "trainer.plots=false",
    "trainer.save_weights=false",
    "dataset.n_train=500",
    "hydra.callbacks={}",
]
COMPARED = ("test/acc", "test/loss", "train/loss", "val/loss", "weights/l2", "weights/zero_frac")


def sweep(tmp_path, data_root, name, args) -> dict[tuple[str, ...], dict]:
    """Run a multirun; map each job's non-impl overrides to its summary and history, per impl."""
    directory = tmp_path / name
    run_train(["-m", *QUICK, *args, f"hydra.sweep.dir={directory}"], tmp_path, data_root)
    runs: dict = {}
    for job in job_dirs(directory):
        summary = read_summary(job)
        assert summary["status"] == "completed"
        impl = next(o.split("=")[1] for o in summary["overrides"] if ".impl=" in o)
        setting = tuple(sorted(o for o in summary["overrides"] if ".impl=" not in o))
        runs.setdefault(setting, {})[impl] = (summary, read_metrics(job))
    return runs


def assert_pairs_match(runs: dict, rel: float = 1e-5) -> None:
    for setting, pair in runs.items():
        (scratch, scratch_history), (torch_, torch_history) = pair["scratch"], pair["torch"]
        for key in COMPARED:
            assert scratch[key] == pytest.approx(torch_[key], rel=rel, abs=1e-7), (setting, key)
        for mine, theirs in zip(scratch_history, torch_history, strict=True):
            assert mine["loss/total"] == pytest.approx(theirs["loss/total"], rel=rel), setting


@pytest.mark.parametrize(
    ("name", "args", "settings", "rel"),
    [
        (
            "l2",
            [
                "regularizer=l2",
                "regularizer.l2.weight_decay=0.01",
                "regularizer.l2.mode=penalty,coupled,decoupled",
                "regularizer.l2.impl=scratch,torch",
            ],
            3,
            1e-5,
        ),
        (
            "l1",
            [
                "regularizer=l1",
                "regularizer.l1.strength=0.001",
                "regularizer.l1.mode=subgradient,proximal",
                "regularizer.l1.impl=scratch,torch",
            ],
            2,
            1e-5,
        ),
        (
            "stochastic_depth",  # same draws: torch's global generator and the member's are seeded alike
            [
                "model=resmlp",
                "regularizer=stochastic_depth",
                "regularizer.stochastic_depth.p=0.5",
                "regularizer.stochastic_depth.rule=linear,uniform",
                "regularizer.stochastic_depth.impl=scratch,torch",
            ],
            2,
            1e-5,
        ),
        (
            "label_smoothing",
            [
                "regularizer=label_smoothing",
                "regularizer.label_smoothing.eps=0.1",
                "regularizer.label_smoothing.impl=scratch,torch",
            ],
            1,
            1e-4,
        ),
        (  # the same draws in both (each member's generator), so the same mixed batches
            "mixup",
            ["regularizer=mixup", "regularizer.mixup.alpha=0.4", "regularizer.mixup.impl=scratch,torch"],
            1,
            1e-5,
        ),
        (
            "cutmix",
            [
                "dataset=digits",  # images: torchvision's CutMix cuts 2-D boxes only
                "regularizer=cutmix",
                "regularizer.cutmix.alpha=1",
                "regularizer.cutmix.impl=scratch,torch",
            ],
            1,
            1e-5,
        ),
        (
            "swa",
            ["regularizer=swa", "regularizer.swa.start_epoch=1", "regularizer.swa.impl=scratch,torch"],
            1,
            1e-5,
        ),
        (
            "ema",
            ["regularizer=ema", "regularizer.ema.decay=0.9,0.99", "regularizer.ema.impl=scratch,torch"],
            2,
            1e-5,
        ),
    ],
)
def test_every_mode_scratch_equals_torch(tmp_path, data_root, name, args, settings, rel):
    runs = sweep(tmp_path, data_root, name, ["trainer.epochs=3", *args])
    assert len(runs) == settings
    assert_pairs_match(runs, rel=rel)


def test_dropout_scratch_and_torch_train_alike(tmp_path, data_root):
    """Random masks differ between implementations in general (they happen to share the Bernoulli stream on CPU),
    so compare statistically: over seeds, the two training losses agree far better than dropout moves them."""
    runs = sweep(
        tmp_path,
        data_root,
        "dropout",
        [
            "trainer.epochs=6",
            "regularizer=dropout",
            "regularizer.dropout.p=0,0.5",
            "trainer.seed=0,1,2",
            "regularizer.dropout.impl=scratch,torch",
        ],
    )

    def mean_loss(p: str, impl: str) -> float:
        values = [
            pair[impl][1][-1]["loss/data"]
            for setting, pair in runs.items()
            if f"regularizer.dropout.p={p}" in setting
        ]
        return statistics.mean(values)

    dropout_effect = mean_loss("0.5", "torch") - mean_loss("0", "torch")
    assert dropout_effect > 0.1  # dropout clearly raises the training-mode loss
    assert abs(mean_loss("0.5", "scratch") - mean_loss("0.5", "torch")) < 0.2 * dropout_effect
    assert mean_loss("0", "scratch") == pytest.approx(mean_loss("0", "torch"))  # p = 0: no dropout at all
