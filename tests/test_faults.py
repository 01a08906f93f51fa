"""Faults injected one by one: a job that raises, a NaN loss, SIGTERM then resume, a broken checkpoint, W&B down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from reglab import checkpoint
from tests.conftest import ROOT, TINY, job_dirs, read_metrics, read_summary, run_train

pytestmark = (
    pytest.mark.slow
)  # subprocess runs, signals and sweeps: `make test` skips them (`make test-slow` runs them)

QUICK = ["logger=none", "trainer.plots=false", "trainer.save_weights=false"]


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def in_process_sweep(monkeypatch, tmp_path, data_root, args):
    """Run train.py's Hydra app inside this process (basic launcher), so a test can patch the loop."""
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(
        sys,
        "argv",
        ["train.py", "--config-path", str(ROOT / "conf"), "-m", *args, f"dataset.root={data_root}"],
    )
    GlobalHydra.instance().clear()
    import train

    train.train()


def test_an_exception_in_one_job_is_recorded_and_the_sweep_goes_on(monkeypatch, tmp_path, data_root):
    import reglab.loop

    real_epoch = reglab.loop.train_one_epoch

    def failing_epoch(model, data, optimizer, *args):
        if optimizer.param_groups[0]["lr"] == 0.02:
            raise RuntimeError("injected fault")
        return real_epoch(model, data, optimizer, *args)

    monkeypatch.setattr(reglab.loop, "train_one_epoch", failing_epoch)
    sweep = tmp_path / "sweep"
    in_process_sweep(
        monkeypatch,
        tmp_path,
        data_root,
        [*QUICK, *TINY, "optimizer.lr=0.01,0.02,0.03", f"hydra.sweep.dir={sweep}"],
    )
    statuses = [read_summary(job)["status"] for job in job_dirs(sweep)]
    assert statuses == ["completed", "failed", "completed"]
    assert "injected fault" in read_summary(job_dirs(sweep)[1])["error"]
    report = (sweep / "report.md").read_text()
    assert "injected fault" in report


def test_a_nan_loss_is_detected_as_divergence_and_the_sweep_goes_on(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    run_train(
        ["-m", *QUICK, *TINY, "optimizer=sgd", "optimizer.lr=0.05,1e30", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        data_root,
    )
    first, second = (read_summary(job) for job in job_dirs(sweep))
    assert first["status"] == "completed"
    assert second["status"] == "diverged" and "non-finite" in second["stop_reason"]
    assert "diverged" in (sweep / "report.md").read_text()


def test_same_config_and_seed_give_identical_metrics(tmp_path, data_root):
    runs = []
    for name in ("a", "b"):
        run_train(
            [*QUICK, *TINY, "regularizer=dropout", f"hydra.run.dir={tmp_path / name}"], tmp_path, data_root
        )
        runs.append(without_time(read_metrics(tmp_path / name)))
    assert runs[0] == runs[1]


def start_run(args, cwd, data_root):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"dataset.root={data_root}"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epochs(metrics_file, epochs: int, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= epochs:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("the run did not reach the epoch in time")


def test_sigterm_then_resume_ends_exactly_like_an_uninterrupted_run(tmp_path, data_root):
    args = [
        *QUICK,
        "trainer.epochs=40",
        "regularizer=[dropout,early_stopping]",
        "regularizer.early_stopping.patience=100",
        "trainer.checkpoint_every=0",
    ]
    interrupted = tmp_path / "interrupted"
    process = start_run([*args, f"hydra.run.dir={interrupted}"], tmp_path, data_root)
    wait_for_epochs(interrupted / "metrics.jsonl", 3, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, (out, err)
    assert (interrupted / "checkpoint.pt").exists() and not (interrupted / "summary.json").exists()
    assert "trainer.resume=true" in out
    run_train([*args, "trainer.resume=true", f"hydra.run.dir={interrupted}"], tmp_path, data_root)

    straight = tmp_path / "straight"
    run_train([*args, f"hydra.run.dir={straight}"], tmp_path, data_root)
    assert without_time(read_metrics(interrupted)) == without_time(read_metrics(straight))
    resumed, reference = read_summary(interrupted), read_summary(straight)
    for key in ("test/acc", "test/loss", "val/loss", "best_epoch", "epochs_run", "weights/l2"):
        assert resumed[key] == reference[key], key


def test_rerunning_a_sweep_with_resume_skips_finished_jobs(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    args = ["-m", *QUICK, *TINY, "trainer.seed=0,1,2", f"hydra.sweep.dir={sweep}"]
    run_train(args, tmp_path, data_root)
    jobs = job_dirs(sweep)
    (jobs[2] / "summary.json").unlink()  # as if the third job had been killed before it finished
    finished_at = [(job / "summary.json").stat().st_mtime_ns for job in jobs[:2]]
    result = run_train([*args, "trainer.resume=true"], tmp_path, data_root)
    assert result.stdout.count("already finished") == 2
    assert [(job / "summary.json").stat().st_mtime_ns for job in jobs[:2]] == finished_at
    assert read_summary(jobs[2])["status"] == "completed"


def test_resuming_a_sweep_with_another_grid_skips_only_its_own_finished_jobs(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    run_train(["-m", *QUICK, *TINY, "trainer.seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path, data_root)
    # the same directories, other jobs (and a logger setting, which does not change what a job trains)
    args = ["-m", *QUICK, *TINY, "trainer.seed=1,5", "logger=none", "trainer.resume=true"]
    result = run_train([*args, f"hydra.sweep.dir={sweep}"], tmp_path, data_root)
    assert result.stdout.count("already finished") == 0  # job 0 is now seed 1, job 1 seed 5
    assert result.stdout.count("held another job's run") == 2
    assert [read_summary(job)["seed"] for job in job_dirs(sweep)] == [1, 5]
    result = run_train([*args, f"hydra.sweep.dir={sweep}"], tmp_path, data_root)
    assert result.stdout.count("already finished") == 2


def test_a_checkpoint_of_another_job_is_not_resumed(tmp_path):
    from reglab.errors import CheckpointError
    from reglab.loop import Job, Member

    member = Member(
        cfg={"trainer": {"resume": True}}, run_dir=tmp_path, job=Job(overrides=["trainer.seed=1"])
    )
    checkpoint.write_atomic(
        tmp_path / checkpoint.FILENAME,
        lambda f: torch.save({"format": checkpoint.FORMAT, "epoch": 3, "overrides": ["trainer.seed=0"]}, f),
    )
    with pytest.raises(CheckpointError, match="checkpoint of another job .trainer.seed=0."):
        checkpoint.load_for_resume(member)
    member.job.overrides = ["trainer.seed=0", "trainer.resume=true", "logger=none"]  # the same job
    assert checkpoint.load_for_resume(member)["epoch"] == 3


def test_a_truncated_or_foreign_checkpoint_gives_a_clear_error(tmp_path, data_root):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    broken = run_dir / "checkpoint.pt"
    torch.save({"format": checkpoint.FORMAT, "model": torch.zeros(1000)}, broken)
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(broken)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(checkpoint.CheckpointError, match="not a reglab checkpoint"):
        checkpoint.load(foreign)
    result = run_train(
        [*QUICK, *TINY, "trainer.resume=true", f"hydra.run.dir={run_dir}"], tmp_path, data_root, check=False
    )
    assert result.returncode == 2
    assert "not a readable checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_wandb_unreachable_never_fails_the_run(tmp_path, data_root, monkeypatch):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed port on this machine
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.delenv("WANDB_MODE")
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = run_train(
        [
            "logger=wandb",
            "logger.wandb.mode=online",
            "logger.wandb.init_timeout=3",
            *TINY,
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        data_root,
    )
    assert time.monotonic() - started < 90
    assert "W&B could not start online" in result.stdout
    assert read_summary(run_dir)["status"] == "completed"
    assert list((run_dir / "wandb").glob("offline-run-*"))
    for path in run_dir.rglob("*"):  # the API key is never written anywhere
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=stacked"]], ids=["basic", "stacked"])
def test_an_invalid_value_anywhere_in_a_grid_stops_the_sweep_before_any_job(tmp_path, data_root, launcher):
    sweep = tmp_path / "sweep"
    result = run_train(
        [
            "-m",
            *QUICK,
            *TINY,
            *launcher,
            "regularizer=dropout",
            "regularizer.dropout.p=0.2,1.5",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        data_root,
        check=False,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("reglab: error")]
    assert len(errors) == 1 and "regularizer.dropout.p=1.5 is not allowed" in errors[0]
    assert not sweep.exists()  # no job started, and nothing left behind


def test_bad_input_only_the_data_reveals_is_recorded_and_the_sweep_goes_on(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    result = run_train(
        ["-m", *QUICK, "trainer.epochs=2", "dataset.n_train=300,99999", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        data_root,
    )
    good, bad = (read_summary(job) for job in job_dirs(sweep))
    assert good["status"] == "completed"
    assert bad["status"] == "failed" and "dataset.n_train=99999" in bad["error"]
    assert "dataset.n_train=99999 is not allowed" in result.stderr
    assert "dataset.n_train=99999" in (sweep / "report.md").read_text()


def test_a_checkpoint_of_another_model_gives_a_clear_error(tmp_path, data_root):
    run_dir = tmp_path / "run"
    process = start_run(
        [*QUICK, "trainer.epochs=40", "trainer.checkpoint_every=1", f"hydra.run.dir={run_dir}"],
        tmp_path,
        data_root,
    )
    wait_for_epochs(run_dir / "metrics.jsonl", 2, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    result = run_train(
        [*QUICK, "trainer.epochs=40", "model.hidden=[50]", "trainer.resume=true", f"hydra.run.dir={run_dir}"],
        tmp_path,
        data_root,
        check=False,
    )
    assert result.returncode == 2
    assert "does not fit this config" in result.stderr and "Traceback" not in result.stderr


def test_last_weights_are_the_final_ones_even_when_early_stopping_restores(tmp_path, data_root):
    from reglab.models import Architecture, build_model, load_member_state, predict
    from reglab.regularizers.dropout import DropoutPlan

    run_dir = tmp_path / "run"
    run_train(
        [
            "logger=none",
            "trainer.plots=false",
            "trainer.epochs=20",
            "regularizer=early_stopping",
            "regularizer.early_stopping.patience=3",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        data_root,
    )
    summary = read_summary(run_dir)
    from reglab.data import load_dataset, mnist1d_config

    data = load_dataset(mnist1d_config(str(data_root)))
    model = build_model(
        {"name": "mlp", "hidden": [100, 100], "activation": "relu"},
        Architecture((1, 40), 10, seeds=[0], dropout=[DropoutPlan()]),
    )
    accuracy = {}
    for name in ("best", "last"):
        load_member_state(model, 0, torch.load(run_dir / f"{name}.pt", weights_only=True))
        with torch.no_grad():
            accuracy[name] = (
                (predict(model, data.x_test, 1)[0].argmax(1) == data.y_test).float().mean().item()
            )
    assert accuracy["last"] == pytest.approx(summary["test/last_acc"])
    assert accuracy["best"] == pytest.approx(summary["test/acc"])  # the restored, evaluated model
    assert summary["best_epoch"] < summary["epochs_run"]  # so the two differ: the test can tell them apart


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, data_root):
    run_dir = tmp_path / "run"
    args = [
        "logger=wandb",
        "logger.wandb.mode=offline",
        "trainer.plots=false",
        "trainer.epochs=40",
        "trainer.checkpoint_every=0",
        f"hydra.run.dir={run_dir}",
    ]
    process = start_run(args, tmp_path, data_root)
    wait_for_epochs(run_dir / "metrics.jsonl", 2, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    run_train([*args, "trainer.resume=true"], tmp_path, data_root)
    run_ids = {path.name.rsplit("-", 1)[1] for path in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(run_ids) == 1


def test_a_job_is_recognised_by_its_overrides_as_hydra_writes_them_whatever_says_how_it_runs():
    swept = ["regularizer.l2.weight_decay=0.0001", "regularizer=[l2,dropout]", "trainer.deterministic=True"]
    typed = ["trainer.deterministic=true", "regularizer=[l2, dropout]", "regularizer.l2.weight_decay=1e-4"]
    run_only = ["trainer.resume=true", "logger=wandb", "logger.wandb.mode=offline", "dataset.root=/elsewhere"]
    assert checkpoint.job_key(swept) == checkpoint.job_key([*typed, *run_only])
    assert checkpoint.job_key(swept) != checkpoint.job_key([*swept[:2], "trainer.deterministic=false"])
    assert checkpoint.job_key(["trainer.seed=0"]) != checkpoint.job_key(["trainer.seed=0", "+extra=1"])
