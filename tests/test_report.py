"""The sweep report: aggregation over seeds, failed and incomplete jobs, files, CLI, Hydra callback, W&B."""

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reglab import report

SRC = Path(__file__).resolve().parents[1] / "src"


def write_job(
    sweep: Path,
    number: int,
    overrides: list[str],
    summary: dict | None,
    val_losses: list[float] = (1.0, 0.8, 0.9),
    truncate: bool = False,
) -> Path:
    """A job directory as the training loop writes it (see the run-directory contract in reglab.report)."""
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    lines = [
        json.dumps({"epoch": epoch, "train/loss": 1.0 / epoch, "val/loss": loss})
        for epoch, loss in enumerate(val_losses, start=1)
    ]
    text = "\n".join(lines) + "\n"
    (job / "metrics.jsonl").write_text(text + '{"epoch": 4, "val/lo' if truncate else text)
    if summary is not None:
        (job / "summary.json").write_text(json.dumps({"overrides": overrides, **summary}))
    return job


def finished(test_acc: float, status: str = "completed", val_loss: float = 1.0, **extra) -> dict:
    return {
        "status": status,
        "val/loss": val_loss,
        "error": None,
        "epochs_run": 3,
        "best_epoch": 2,
        "overfit_onset_epoch": 2,
        "train/acc": 1.0,
        "val/acc": test_acc + 0.01,
        "test/acc": test_acc,
        "test/ece": 0.1,
        "test/nll": 1.5,
        "gap/test_acc": 1.0 - test_acc,
        "weights/zero_frac": 0.0,
        **extra,
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """9 jobs, 4 groups: two seeds of no regularization, three weight decays; a failed job with an error, a
    diverged job, a job killed mid-write (no summary.json, truncated metrics.jsonl)."""
    root = tmp_path / "multirun" / "12-00-00-000001-42"
    none, l2 = ["regularizer=none", "trainer.epochs=5"], ["regularizer=l2", "trainer.epochs=5"]
    write_job(root, 0, [*none, "trainer.seed=0"], finished(0.60, **{"weights/zero_frac": 0.0}))
    write_job(root, 1, [*none, "trainer.seed=1", "hydra.verbose=true"], finished(0.64))
    write_job(
        root, 2, [*l2, "regularizer.l2.weight_decay=0.001", "trainer.seed=0"], finished(0.70), (1.0, 0.6, 0.7)
    )
    early = finished(0.66, status="early_stopped", overfit_onset_epoch=None, **{"weights/zero_frac": 0.02})
    write_job(root, 3, [*l2, "regularizer.l2.weight_decay=0.001", "trainer.seed=1"], early, (1.0, 0.8, 0.9))
    failed = {
        "status": "failed",
        "error": "RuntimeError: out of memory | retry\nTraceback ...",
        "epochs_run": 1,
    }
    write_job(root, 4, [*l2, "regularizer.l2.weight_decay=0.001", "trainer.seed=2"], failed)
    write_job(root, 5, [*l2, "regularizer.l2.weight_decay=0", "trainer.seed=0"], finished(0.62))
    diverged = {
        "status": "diverged",
        "error": None,
        "epochs_run": 2,
        "test/acc": None,
        "train/acc": float("nan"),
    }
    write_job(root, 6, [*l2, "regularizer.l2.weight_decay=0", "trainer.seed=1"], diverged)
    write_job(root, 7, [*l2, "regularizer.l2.weight_decay=0", "trainer.seed=2"], None, truncate=True)
    # the lowest validation loss, though not the highest test accuracy (that is weight_decay=0.001's 68%)
    write_job(
        root, 8, [*l2, "regularizer.l2.weight_decay=0.01", "trainer.seed=0"], finished(0.65, val_loss=0.9)
    )
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as file:
        return {row["group"]: row for row in csv.DictReader(file)}


def test_groups_ignore_seed_and_hydra_overrides_and_sort_by_strength(sweep):
    groups = report.group_jobs(report.read_jobs(sweep))
    assert [g.label for g in groups] == [
        "none",
        "l2 weight_decay=0",
        "l2 weight_decay=0.001",
        "l2 weight_decay=0.01",
    ]
    assert [len(g.jobs) for g in groups] == [2, 3, 3, 1]
    assert [len(g.ok_jobs) for g in groups] == [2, 1, 2, 1]


def test_means_and_stds_over_seeds_match_hand_computed_values(sweep):
    report.write_report(sweep, verbose=False)
    rows = csv_rows(sweep / "report.csv")
    none, weak, decay, strong = (
        rows[k] for k in ("none", "l2 weight_decay=0", "l2 weight_decay=0.001", "l2 weight_decay=0.01")
    )
    assert float(none["test/acc_mean"]) == pytest.approx(0.62)
    assert float(none["test/acc_std"]) == pytest.approx(statistics.stdev([0.60, 0.64]))  # 0.0283, sample std
    assert float(decay["test/acc_mean"]) == pytest.approx(0.68)  # seeds 0.70 and 0.66; the failed seed is out
    assert float(decay["gap/test_acc_mean"]) == pytest.approx(0.32)
    assert float(decay["weights/zero_frac_mean"]) == pytest.approx(0.01)
    assert float(decay["overfit_frac"]) == pytest.approx(0.5)  # one of the two seeds overfits
    assert (decay["n"], decay["n_not_ok"], decay["l2.weight_decay"]) == ("2", "1", "0.001")
    assert (weak["n"], weak["n_not_ok"], float(weak["test/acc_mean"])) == ("1", "2", 0.62)
    assert weak["test/acc_std"] == "" and strong["test/acc_std"] == ""  # one seed: no std
    assert float(strong["l2.weight_decay"]) == 0.01 and none["l2.weight_decay"] == ""


def test_report_files_table_and_failure_section(sweep):
    markdown_path = report.write_report(sweep, verbose=False)
    for name in ("report.md", "report.csv", "report_strength.png", "report_val_loss.png"):
        assert (sweep / name).stat().st_size > 0, name
    assert (sweep / "report_strength.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = markdown_path.read_text()
    assert "**`l2 weight_decay=0.01`**" in markdown and "| **0.900** |" in markdown  # the selected row
    assert "`l2 weight_decay=0.001` | 2 (+1 excluded) |" in markdown
    assert "Overrides shared by every job: `trainer.epochs=5`" in markdown
    failures = markdown.split("## Failed, diverged or incomplete jobs")[1]
    assert "| `4` | `l2 weight_decay=0.001` | failed | RuntimeError: out of memory \\| retry |" in failures
    assert "| `6` | `l2 weight_decay=0` | diverged | diverged after 2 epochs |" in failures
    assert (
        "| `7` | `l2 weight_decay=0` | incomplete | incomplete (no summary.json), last logged epoch 3 |"
        in failures
    )
    assert "Traceback" not in failures  # only the error's first line


def test_the_winner_is_selected_on_validation_loss_never_on_test_accuracy(sweep):
    """weight_decay=0.001 has the best test accuracy (68%), weight_decay=0.01 the lowest validation loss: the
    report must name the latter, with its test accuracy beside it, in report.md and report.csv alike."""
    markdown = report.write_report(sweep, verbose=False).read_text()
    assert (
        "Selected by lowest mean validation loss (`val/loss`, the sweep's objective): `l2 weight_decay=0.01`, "
        "val loss 0.900; its test accuracy 65.0% (n=1)." in markdown
    )
    assert "**68.0" not in markdown and "**`l2 weight_decay=0.001`**" not in markdown
    rows = csv_rows(sweep / "report.csv")
    assert {group for group, row in rows.items() if row["selected"] == "1"} == {"l2 weight_decay=0.01"}


def test_wandb_report_run_names_the_validation_selected_group(sweep):
    report.write_report(sweep, verbose=False)
    logged, summary = [], {}
    run = types.SimpleNamespace(log=logged.append, summary=summary)
    report.log_report_to_wandb(run, sweep)
    assert summary["selected/group"] == "l2 weight_decay=0.01"
    assert summary["selected/val_loss"] == pytest.approx(0.9)
    assert summary["selected/test_acc"] == pytest.approx(0.65)
    assert "val/loss" in summary["selected/rule"] and not any(key.startswith("best/") for key in summary)


def test_truncated_metrics_and_mean_validation_curve(sweep):
    assert [r["epoch"] for r in report.read_history(sweep / "7" / "metrics.jsonl")] == [1, 2, 3]
    decay = report.group_jobs(report.read_jobs(sweep))[2]
    epochs, losses = report._mean_curve(decay)
    assert epochs == [1, 2, 3]
    assert losses == pytest.approx([1.0, 0.7, 0.8])  # mean of (1.0, 0.6, 0.7) and (1.0, 0.8, 0.9)


def test_command_line_prints_table_and_writes_to_out_dir(sweep, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "68.0 ± 2.8" in printed and "l2 weight_decay=0.001" in printed
    assert f"wrote {out / 'report.md'}" in printed
    assert not (sweep / "report.md").exists()
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_thousands_of_jobs_report_in_seconds(tmp_path):
    sweep = tmp_path / "big"
    weight_decays = [0, *(10.0**k for k in range(-6, 0))] + [2e-1, 5e-1, 3e-6, 3e-5, 3e-4, 3e-3, 3e-2]
    number = 0
    for weight_decay in weight_decays * 2:  # 2 x 14 values x 10 p x ~7 seeds > 1900 jobs
        for p in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            for seed in range(7):
                overrides = [
                    "regularizer=[l2,dropout]",
                    f"regularizer.l2.weight_decay={weight_decay:g}",
                    f"regularizer.dropout.p={p}",
                    f"trainer.seed={seed}",
                ]
                job = sweep / str(number)
                job.mkdir(parents=True)
                summary = finished(
                    0.5 + p / 4 - weight_decay / 10 + seed / 1000, regularizers=["l2", "dropout"]
                )
                (job / "summary.json").write_text(json.dumps({"overrides": overrides, **summary}))
                (job / "metrics.jsonl").write_text(
                    '{"epoch": 1, "val/loss": 1.0}\n{"epoch": 2, "val/loss": 0.9}\n'
                )
                number += 1
    start = time.perf_counter()
    report.write_report(sweep, verbose=False)
    seconds = time.perf_counter() - start
    assert number > 1900
    assert len(csv_rows(sweep / "report.csv")) == 140
    assert seconds < 10, f"report of {number} jobs took {seconds:.1f} s"


def test_callback_never_raises_and_warns(tmp_path, caplog):
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path / "missing")}}, "logger": {"name": "none"}}
    )
    report.SweepReportCallback().on_multirun_end(config)
    assert "no sweep report" in caplog.text


def test_callback_logs_report_as_offline_wandb_run(sweep, tmp_path, monkeypatch):
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    started = []

    def start_wandb(logger_cfg, *, run_dir, name, group, job_type, config, tags):
        import wandb

        started.append({"group": group, "job_type": job_type})
        return wandb.init(mode="offline", dir=run_dir, project="reglab-test", name=name, group=group,
                          job_type=job_type, config=config, tags=tags)  # fmt: skip

    monkeypatch.setitem(sys.modules, "reglab.tracking", types.SimpleNamespace(start_wandb=start_wandb))
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(sweep)}}, "logger": {"name": "wandb", "wandb": {"mode": "offline"}}}
    )
    report.SweepReportCallback().on_multirun_end(config)
    import wandb

    assert started == [{"group": sweep.name, "job_type": "report"}]
    assert wandb.run is None  # finished
    assert (sweep / "report.md").exists()
    assert list((sweep / "wandb").glob("offline-run-*/run-*.wandb"))


APP = """
import json, sys
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path=None, config_name="config")
def main(cfg):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = {"status": "completed", "test/acc": 0.5 + cfg.p, "overrides": list(HydraConfig.get().overrides.task)}
    (run_dir / "summary.json").write_text(json.dumps(summary))

if __name__ == "__main__":
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name="config", node={"p": 0.0, "seed": 0, "logger": {"name": "none"}})
    main()
"""


def test_hydra_multirun_calls_the_callback_with_its_sweep_dir(tmp_path):
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    command = [
        sys.executable,
        "app.py",
        "-m",
        "p=0.1,0.2",
        "+trainer.seed=0,1",
        "hydra.sweep.dir=multirun/${now:%H-%M-%S-%f}",
        "+hydra.callbacks.report._target_=reglab.report.SweepReportCallback",
    ]
    subprocess.run(
        command, cwd=tmp_path, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(SRC)}
    )
    (sweep,) = (tmp_path / "multirun").iterdir()
    rows = csv_rows(sweep / "report.csv")
    assert set(rows) == {"none, p=0.1", "none, p=0.2"}
    assert math.isclose(float(rows["none, p=0.2"]["test/acc_mean"]), 0.7)
    assert rows["none, p=0.2"]["n"] == "2"
