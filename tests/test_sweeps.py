"""The W&B sweep files: every run they start must compose with the real config and set what it sweeps."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())  # as `wandb sweep` reads it


def runs_covering_every_value(sweep: dict) -> list[dict]:
    """Runs of a grid sweep, as {key: value}, that together use every value of every parameter: run i takes
    each parameter's i-th value (cycling through shorter lists). The full grid only adds seeds to these."""
    choices = {
        key: spec["values"] if "values" in spec else [spec["value"]]
        for key, spec in sweep["parameters"].items()
    }
    longest = max(len(values) for values in choices.values())
    return [{key: values[i % len(values)] for key, values in choices.items()} for i in range(longest)]


def test_there_is_a_sweep_per_technique():
    assert {path.stem for path in SWEEP_FILES} >= {"l2", "l1", "dropout", "label_smoothing"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda path: path.stem)
def test_sweep_file_runs_train_py_with_hydra_overrides(path):
    sweep = load(path)
    assert sweep["program"] == "train.py" and (ROOT / sweep["program"]).exists()
    assert sweep["method"] == "grid"
    assert sweep["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda path: path.stem)
def test_every_run_of_the_sweep_composes_and_sets_its_values(path):
    runs = runs_covering_every_value(load(path))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for run in runs:
            overrides = [
                f"{key}={value}" for key, value in run.items()
            ]  # as W&B's ${args_no_hyphens} writes them
            cfg = compose(config_name="config", overrides=overrides)
            for key, value in run.items():
                if key == "regularizer":
                    assert value in cfg.regularizer, f"{overrides}: no regularizer.{value} node"
                    continue
                composed = OmegaConf.select(cfg, key, default="<missing>")
                assert composed == value, f"{overrides}: {key} is {composed!r}, not {value!r}"


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda path: path.stem)
def test_wandb_grid_matches_the_hydra_grid_of_the_option(path):
    """`wandb sweep sweeps/X.yaml` and `python train.py regularizer=X -m` sweep the same strengths."""
    parameters = load(path)["parameters"]
    option = parameters["regularizer"]["value"]
    hydra_grid = load(ROOT / "conf" / "regularizer" / f"{option}.yaml")["hydra"]["sweeper"]["params"]
    for key, grid in hydra_grid.items():
        assert [float(v) for v in str(grid).split(",")] == [float(v) for v in parameters[key]["values"]], key
