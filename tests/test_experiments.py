"""The experiment presets: each composes with the grid it promises, and each runs end to end on a tiny budget."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reglab.schema import validate
from tests.conftest import CONF, job_dirs, read_summary, run_train

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GRID_SIZES = {  # jobs per preset: the product of its sweep values, seeds included
    "overfit_baseline": 3,
    "cnn_baseline": 3,
    "calibration": 9,
    "weight_decay": 15,
    "weight_decay_coupling": 12,
    "dropout": 12,
    "dropout_variants": 24,
    "l1_sparsity": 24,
    "random_labels": 9,
    "early_stopping": 6,
    "small_data": 30,
    "dropout_conv": 18,
    "noise": 12,
    "stochastic_depth": 6,
    "mixup_accuracy": 9,
    "mixup_calibration": 12,
    "weight_averaging": 12,
    "sam": 12,
    "spectral_norm": 6,
}


def sweep_params(preset: str) -> dict[str, str]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    return {key: str(value) for key, value in cfg.hydra.sweeper.params.items()}


def test_every_preset_has_a_known_grid():
    assert set(PRESETS) == set(GRID_SIZES)


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_sweeps_exactly_its_grid(preset):
    params = sweep_params(preset)
    assert params["trainer.seed"] == "0,1,2"  # three seeds each
    assert math.prod(len(values.split(",")) for values in params.values()) == GRID_SIZES[preset]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_value_on_each_preset_grid_is_a_valid_config(preset):
    """A typo in a grid (a key, a value out of range) fails here, not minutes into `make reproduce`."""
    for key, values in sweep_params(preset).items():
        for value in values.split(","):
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose(config_name="config", overrides=[f"experiment={preset}", f"{key}={value}"])
            validate(OmegaConf.to_container(cfg, resolve=True))


def test_every_preset_runs_end_to_end_on_a_tiny_budget(tmp_path, data_root):
    sweep = tmp_path / "presets"
    presets = ",".join(PRESETS)  # a list of presets runs each at its defaults, one job per preset
    run_train(
        [
            "-m",
            f"experiment={presets}",
            "trainer.epochs=2",
            "dataset.n_train=200",
            "logger=none",
            "trainer.plots=false",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        data_root,
    )
    summaries = [read_summary(job) for job in job_dirs(sweep)]
    assert len(summaries) == len(PRESETS)
    assert all(s["status"] in ("completed", "early_stopped") for s in summaries), summaries
