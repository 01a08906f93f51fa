"""A sweep says how many jobs it runs, over which values, before the first one starts, under every launcher."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from reglab.schema import describe_grid, describe_search
from tests.conftest import TINY, job_dirs, read_summary, run_train


def test_the_grid_of_four_options_is_counted_and_listed():
    jobs = [
        [f"a={a}", f"b={b}", "regularizer=[l2,dropout]", "trainer.epochs=3"]
        for a in ("0", "1e-3", "1e-2")
        for b in ("0.1", "0.3")
    ]
    assert describe_grid(jobs) == [
        "[reglab] sweep: 6 jobs = 3 x 2 over",
        "[reglab]   a: 0, 1e-3, 1e-2 (3)",
        "[reglab]   b: 0.1, 0.3 (2)",
    ]
    assert describe_grid([["trainer.epochs=3"]]) == [
        "[reglab] sweep: 1 job, no key takes more than one value"
    ]


def test_an_optuna_search_prints_its_trials_and_search_space():
    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {
                    "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                    "direction": "minimize",
                    "n_trials": 50,
                    "params": {"regularizer.dropout.p": "interval(0.0, 0.6)"},
                },
                "overrides": {"task": ["optimizer.lr=tag(log, interval(1e-4, 1e-1))", "trainer.epochs=3"]},
            }
        }
    )
    assert describe_search(config) == [
        "[reglab] OptunaSweeper: 50 trials, minimize the validation loss, over",
        "[reglab]   regularizer.dropout.p: interval(0.0, 0.6)",
        "[reglab]   optimizer.lr: tag(log, interval(1e-4, 1e-1))",
    ]


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_every_launcher_prints_the_grid_of_the_options_before_anything_runs(tmp_path, data_root, launcher):
    """Four techniques at once multiply their grids: 5 x 4 x 4 x 3 = 240 jobs. An invalid epoch count stops the
    sweep right after the grid is printed, before any job starts, so the test costs no training."""
    sweep = tmp_path / "sweep"
    result = run_train(
        [
            "-m",
            f"hydra/launcher={launcher}",
            "regularizer=[l2,dropout,label_smoothing,early_stopping]",
            "trainer.epochs=0",
            "logger=none",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        data_root,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        "[reglab] sweep: 240 jobs = 5 x 4 x 4 x 3 over",
        "[reglab]   regularizer.l2.weight_decay: 0, 1e-05, 0.0001, 0.001, 0.01 (5)",
        "[reglab]   regularizer.dropout.p: 0, 0.1, 0.3, 0.5 (4)",
        "[reglab]   regularizer.label_smoothing.eps: 0, 0.05, 0.1, 0.2 (4)",
        "[reglab]   regularizer.early_stopping.patience: 3, 10, 30 (3)",
    ]
    assert not sweep.exists() or not job_dirs(sweep)


@pytest.mark.slow
def test_other_techniques_at_fixed_strengths_sweep_only_one_grid(tmp_path, data_root):
    """What the README promises: `'regularizer=[l2,dropout]' regularizer.dropout.p=0.3` runs l2's 5 values with
    dropout fixed at 0.3, and says so before the first job trains."""
    sweep = tmp_path / "sweep"
    result = run_train(
        ["-m", "regularizer=[l2,dropout]", "regularizer.dropout.p=0.3", "logger=none", *TINY]
        + [f"hydra.sweep.dir={sweep}"],
        tmp_path,
        data_root,
    )
    summaries = [read_summary(job) for job in job_dirs(sweep)]
    assert sorted(s["hparams"]["regularizer.l2.weight_decay"] for s in summaries) == [
        0,
        1e-5,
        1e-4,
        1e-3,
        1e-2,
    ]
    assert {s["hparams"]["regularizer.dropout.p"] for s in summaries} == {0.3}
    grid = "[reglab] sweep: 5 jobs over\n[reglab]   regularizer.l2.weight_decay: 0, 1e-05, 0.0001, 0.001, 0.01 (5)"
    assert result.stdout.index(grid) < re.search(r"\[reglab\] completed after", result.stdout).start()
