"""The loop in-process: the fast tensor path equals the DataLoader path; progress output stays quiet when asked."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reglab.loop import Job, Progress, run_name, train
from tests.conftest import CONF, read_metrics, read_summary


def config(data_root, *overrides) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"dataset.root={data_root}", "logger=none", "trainer.plots=false", *overrides],
        )
    return OmegaConf.to_container(cfg, resolve=True)


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def test_the_tensor_fast_path_trains_exactly_like_the_dataloader_path(tmp_path, data_root):
    for loader in ("tensors", "dataloader"):
        run_dir = tmp_path / loader
        run_dir.mkdir()
        train(
            config(data_root, f"trainer.loader={loader}", "trainer.epochs=3", "regularizer=dropout"),
            run_dir,
            Job(),
        )
    assert without_time(read_metrics(tmp_path / "tensors")) == without_time(
        read_metrics(tmp_path / "dataloader")
    )
    assert read_summary(tmp_path / "tensors")["test/acc"] == read_summary(tmp_path / "dataloader")["test/acc"]


def test_the_validation_objective_is_returned(tmp_path, data_root):
    objective = train(config(data_root, "trainer.epochs=2"), tmp_path, Job())
    assert objective == read_summary(tmp_path)["val/loss"]


def test_progress_is_silent_in_parallel_launchers_and_off_a_terminal(capsys):
    metrics = {"epoch": 1, "train/loss": 1.0, "train/acc": 0.5, "val/loss": 1.2, "val/acc": 0.4}
    for progress in (
        Progress("auto", 10, parallel=True),
        Progress("auto", 10, parallel=False),
        Progress("none", 10, False),
    ):
        progress.update(metrics)
        progress.close()
    assert capsys.readouterr().out == ""  # pytest's captured stdout is not a terminal
    Progress("epochs", 10, parallel=False).update(metrics)
    assert "epoch    1/10" in capsys.readouterr().out


def test_run_names_come_from_the_overrides():
    assert run_name(["regularizer=l2", "regularizer.l2.weight_decay=0.001", "trainer.seed=1"]) == (
        "l2 weight_decay=0.001 seed=1"
    )
    assert run_name([]) == "default"


def test_monte_carlo_dropout_metrics_land_in_the_summary(tmp_path, data_root):
    cfg = config(data_root, "trainer.epochs=2", "regularizer=dropout", "regularizer.dropout.mc_samples=4")
    train(cfg, tmp_path, Job())
    summary = read_summary(tmp_path)
    assert 0.0 < summary["test/mc_acc"] <= 1.0 and summary["test/mc_entropy"] > 0.0
    assert summary["temperature"] > 0.0 and summary["test/ts_ece"] is not None
    assert summary["temperature_at_bound"] in (True, False)


def test_a_wandb_failure_mid_run_never_fails_the_run(tmp_path, capsys):
    from reglab.tracking import RunRecord

    class BrokenRun:
        def log(self, data, step=None):
            raise ConnectionError("service down")

    record = RunRecord(tmp_path, BrokenRun())
    record.log_epoch({"epoch": 1, "train/loss": 0.5})
    record.log_epoch({"epoch": 2, "train/loss": 0.4})
    record.finish()
    assert record.wandb_run is None and "W&B stopped working" in capsys.readouterr().out
    assert len(read_metrics(tmp_path)) == 2  # the file on disk got every epoch


def test_all_techniques_at_once_each_one_active(tmp_path, data_root):
    cfg = config(
        data_root,
        "trainer.epochs=3",
        "regularizer=[l1,l2,dropout,label_smoothing,early_stopping]",
        "regularizer.l1.mode=subgradient",
        "regularizer.l2.mode=penalty",
    )
    train(cfg, tmp_path, Job())
    summary, history = read_summary(tmp_path), read_metrics(tmp_path)
    assert summary["regularizers"] == ["l1", "l2", "dropout", "early_stopping", "label_smoothing"]
    assert all(row["loss/penalty"] > 0 for row in history)  # L1 and L2 penalties in the loss
    assert all(
        row["loss/data"] > row["train/loss"] for row in history[1:]
    )  # dropout + smoothing raise the objective
    assert "test/last_acc" in summary  # early stopping took part (its last-vs-restored comparison)


def test_deterministic_algorithms_change_nothing_on_the_cpu(tmp_path, data_root):
    import torch

    for deterministic in ("true", "false"):
        (tmp_path / deterministic).mkdir()
        cfg = config(
            data_root, "trainer.epochs=2", "dataset.n_train=300", f"trainer.deterministic={deterministic}"
        )
        train(cfg, tmp_path / deterministic, Job())
    assert not torch.are_deterministic_algorithms_enabled()  # a later job is never left in that mode
    assert without_time(read_metrics(tmp_path / "true")) == without_time(read_metrics(tmp_path / "false"))


def test_wandb_steps_are_epochs_so_a_resumed_run_never_logs_an_epoch_twice(tmp_path):
    from reglab.tracking import RunRecord

    class Run:
        steps: list[int] = []

        def log(self, data, step=None):
            self.steps.append(step)

    record = RunRecord(tmp_path, Run())
    for epoch in (1, 2, 3, 2, 3, 4):  # epochs 2 and 3 again after resuming from epoch 1's checkpoint
        record.log_epoch({"epoch": epoch, "train/loss": 0.5})
    record.finish()
    assert Run.steps == [1, 2, 3, 2, 3, 4]  # W&B ignores a step below its current one: no epoch is held twice


def test_the_summary_records_the_optimizer_that_actually_ran(tmp_path, data_root, capsys):
    cases = {
        "adam": (["optimizer=adam"], "Adam", 0.0),
        "adamw_alone": (["optimizer=adamw"], "AdamW", 0.0),
        "decoupled_torch": (
            ["regularizer=l2", "regularizer.l2.mode=decoupled", "regularizer.l2.impl=torch"],
            "AdamW",
            0.001,
        ),
        "coupled_scratch": (["regularizer=l2"], "Adam", 0.0),
    }
    for name, (overrides, expected, decay) in cases.items():
        (tmp_path / name).mkdir()
        train(
            config(data_root, "trainer.epochs=1", "dataset.n_train=200", *overrides), tmp_path / name, Job()
        )
        optimizer = read_summary(tmp_path / name)["optimizer"]
        assert (optimizer["class"], optimizer["weight_decay"]) == (expected, decay), name
        assert f"{expected}(lr=" in capsys.readouterr().out  # and the run's first line says so
    assert "coupled weight decay λ=0.001" in read_summary(tmp_path / "coupled_scratch")["regularization"][0]


def test_setup_process_sets_deterministic_algorithms_as_asked_whatever_was_set_before():
    import torch

    from reglab.loop import setup_process

    trainer = {"flush_denormal": True, "device": "cpu"}
    try:
        for wanted in (True, True, False, False):
            setup_process({**trainer, "deterministic": wanted}, seed=0)
            assert torch.are_deterministic_algorithms_enabled() is wanted
        torch.use_deterministic_algorithms(True, warn_only=True)  # set elsewhere in the process
        setup_process({**trainer, "deterministic": True}, seed=0)
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
