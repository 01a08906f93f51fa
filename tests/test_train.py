"""The real entrypoint end to end: a single run, a grid sweep, W&B offline, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.conftest import TINY, job_dirs, read_metrics, read_summary, run_train

EPOCH_KEYS = {
    "epoch",
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "lr",
    "time_s",
    "gap/val_loss",
    "gap/val_acc",
    "val/nll",
    "val/ece",
    "val/confidence",
    "weights/l2",
    "weights/l1",
    "weights/zero_frac",
    "weights/small_frac",
    "loss/data",
    "loss/penalty",
    "loss/total",
}
SUMMARY_KEYS = {
    "status",
    "epochs_run",
    "best_epoch",
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "test/loss",
    "test/acc",
    "gap/val_acc",
    "gap/val_loss",
    "gap/test_acc",
    "gap/test_loss",
    "overrides",
    "wall_time_s",
    "test/ece",
    "test/nll",
    "test/confidence",
    "overfit_onset_epoch",
}


def test_a_single_run_leaves_the_promised_files(tmp_path, data_root):
    run_dir = tmp_path / "run"
    result = run_train(
        ["logger=none", "trainer.epochs=4", "dataset.n_train=300", f"hydra.run.dir={run_dir}"],
        tmp_path,
        data_root,
    )
    assert (
        "test" in result.stdout and str(run_dir) in result.stdout
    )  # the closing summary says where files are
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / ".hydra" / "overrides.yaml").exists()
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert EPOCH_KEYS <= set(metrics[0])
    summary = read_summary(run_dir)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "completed" and summary["epochs_run"] == 4
    assert summary["gap/val_acc"] == pytest.approx(summary["train/acc"] - summary["val/acc"])
    assert summary["gap/val_loss"] == pytest.approx(summary["val/loss"] - summary["train/loss"])
    assert summary["gap/test_acc"] == pytest.approx(summary["train/acc"] - summary["test/acc"])
    assert summary["gap/test_loss"] == pytest.approx(summary["test/loss"] - summary["train/loss"])
    assert "trainer.epochs=4" in summary["overrides"]
    for name in ("best.pt", "last.pt"):
        weights = torch.load(run_dir / name, weights_only=True)
        assert any(key.endswith("weight") for key in weights)
    for plot in ("curves.png", "reliability.png", "weights.png"):
        assert (run_dir / plot).stat().st_size > 1000
    assert not (run_dir / "checkpoint.pt").exists()  # removed once the run has finished


def test_a_key_in_metrics_and_summary_means_the_same_in_both(tmp_path, data_root):
    """One name, one meaning: without early stopping the evaluated model is the last epoch's, so every key that
    the last metrics.jsonl row and summary.json share must hold the same number in both."""
    run_dir = tmp_path / "run"
    run_train(["logger=none", *TINY, f"hydra.run.dir={run_dir}"], tmp_path, data_root)
    last_epoch, summary = read_metrics(run_dir)[-1], read_summary(run_dir)
    shared = sorted(set(last_epoch) & set(summary))
    for key in shared:
        assert summary[key] == pytest.approx(last_epoch[key], rel=1e-9, abs=1e-12), key
    assert {"train/acc", "val/loss", "gap/val_acc", "gap/val_loss", "weights/l2"} <= set(shared)


def test_the_l2_grid_runs_one_job_per_value(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    run_train(["-m", "regularizer=l2", "logger=none", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path, data_root)
    jobs = job_dirs(sweep)
    decays = sorted(read_summary(j)["hparams"]["regularizer.l2.weight_decay"] for j in jobs)
    assert decays == [0, 1e-5, 1e-4, 1e-3, 1e-2]
    for job in jobs:
        summary = read_summary(job)
        decay = summary["hparams"]["regularizer.l2.weight_decay"]
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["regularizer"]["l2"]["weight_decay"] == decay
        assert any(o.startswith("regularizer.l2.weight_decay=") for o in summary["overrides"])
        assert summary["regularizers"] == ["l2"]
    assert (sweep / "report.md").exists()  # the sweep callback compared the jobs


def test_a_value_on_the_command_line_replaces_the_grid(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    run_train(
        [
            "-m",
            "regularizer=l2",
            "regularizer.l2.weight_decay=0.003",
            "logger=none",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        data_root,
    )
    jobs = job_dirs(sweep)
    assert [read_summary(j)["hparams"]["regularizer.l2.weight_decay"] for j in jobs] == [0.003]


def test_a_multirun_with_wandb_offline_makes_one_run_per_job(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    run_train(
        ["-m", "regularizer=dropout", "logger.wandb.mode=offline", *TINY, f"hydra.sweep.dir={sweep}"],
        tmp_path,
        data_root,
    )
    jobs = job_dirs(sweep)
    assert len(jobs) == 4
    for job in jobs:
        runs = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, job
    run_ids = {next((j / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[1] for j in jobs}
    assert len(run_ids) == 4  # never one run reused by the next job


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("regularizer.dropout.p=1.5", "regularizer.dropout.p"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("dataset.n_train=99999", "dataset.n_train"),
        ("model=cnn", "model"),
    ],
)
def test_bad_input_fails_before_training_with_one_clear_line(tmp_path, data_root, override, key):
    run_dir = tmp_path / "run"
    args = ["logger=none", f"hydra.run.dir={run_dir}", override]
    if override.startswith("regularizer.dropout"):
        args.insert(0, "regularizer=dropout")
    result = run_train(args, tmp_path, data_root, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and key in errors[0] and "not allowed" in errors[0], result.stderr
    assert not run_dir.exists()  # nothing left behind that looks like a run


def test_an_unknown_group_option_fails_cleanly(tmp_path, data_root):
    result = run_train(
        ["dataset=imagenet", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
        data_root,
        check=False,
    )
    assert result.returncode != 0
    assert "imagenet" in result.stderr and "mnist1d" in result.stderr  # Hydra lists the available options


def test_summary_is_valid_json_even_for_a_diverged_run(tmp_path, data_root):
    run_dir = tmp_path / "run"
    run_train(
        ["logger=none", *TINY, "optimizer=sgd", "optimizer.lr=1e30", f"hydra.run.dir={run_dir}"],
        tmp_path,
        data_root,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epochs_run"] == 1


def test_runs_started_at_the_same_moment_get_their_own_directories(tmp_path, data_root):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "logger=none",
        "trainer.epochs=1",
        "trainer.plots=false",
        "trainer.save_weights=false",
        f"dataset.root={data_root}",
    ]
    processes = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL) for _ in range(4)
    ]
    assert [p.wait(timeout=300) for p in processes] == [0, 0, 0, 0]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 4 and all((run / "summary.json").exists() for run in runs)


def test_a_run_imports_only_what_it_uses(tmp_path, data_root):
    """W&B only with the logger on, matplotlib only when plotting, never torchmetrics/torchvision/optuna for
    MNIST-1D: each costs seconds of start-up on every job of a sweep."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = (
        "import runpy, sys\n"
        f"sys.argv = ['train.py', 'logger=none', 'trainer.plots=false', 'trainer.epochs=1', "
        f"'hydra.run.dir={tmp_path / 'run'}', 'dataset.root={data_root}']\n"
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n"
        "print(sorted(m for m in ('wandb', 'matplotlib', 'torchmetrics', 'torchvision', 'optuna', 'sklearn')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# with the stacked launcher, each batch of n_jobs trials Optuna asks for trains as one stack
@pytest.mark.parametrize(
    "launcher", [[], ["hydra/launcher=stacked", "hydra.sweeper.n_jobs=3"]], ids=["basic", "stacked"]
)
def test_the_optuna_search_writes_its_best_parameters(tmp_path, data_root, launcher):
    sweep = tmp_path / "search"
    result = run_train(
        [
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=3",
            "trainer.epochs=2",
            "dataset.n_train=300",
            "logger=none",
            "trainer.plots=false",
            *launcher,
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        data_root,
    )
    assert result.stdout.startswith("[reglab] OptunaSweeper: 3 trials, minimize the validation loss, over\n")
    assert "[reglab]   optimizer.lr: tag(log, interval(1e-4, 1e-1))" in result.stdout  # the search space
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {
        "regularizer.l2.weight_decay",
        "regularizer.dropout.p",
        "regularizer.label_smoothing.eps",
        "optimizer.lr",
    }
    summaries = [read_summary(job) for job in job_dirs(sweep)]
    values = [summary["val/loss"] for summary in summaries]
    assert len(values) == 3 and best["best_value"] == pytest.approx(min(values))
    if launcher:  # the three trials trained together
        assert all(summary["stack"]["size"] == 3 for summary in summaries)
