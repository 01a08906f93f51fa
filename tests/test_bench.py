"""`make bench`: the smoke run prints every comparison in one table, and the docs block is rewritten in place.

Timings are never asserted: on a shared machine they are noise; the benchmark itself judges its targets.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"

# Every row of the table: its comparison's number, the start of the comparison, a fragment of the measure.
EXPECTED_ROWS = [
    ("1", "hand-written loop (A) vs reglab default (B)", "whole process, start to exit"),
    ("1", "hand-written loop (A) vs reglab default (B)", "training time: epochs 2..E"),
    ("1", "hand-written loop (A) vs reglab default (B)", "training steps only"),
    ("1", "hand-written loop (A) vs reglab default (B)", "test accuracy"),
    ("1", "flush_denormal=false (A) vs true, the default (B)", "training time: epochs 2..E"),
    ("1", "flush_denormal=false (A) vs true, the default (B)", "whole process, start to exit"),
    ("1", "flush_denormal=false (A) vs true, the default (B)", "training steps only"),
    ("1", "flush_denormal=false (A) vs true, the default (B)", "test accuracy"),
    ("1", "fused_optimizer=false (A) vs true, the default (B)", "training time: epochs 2..E"),
    ("1", "fused_optimizer=false (A) vs true, the default (B)", "whole process, start to exit"),
    ("1", "fused_optimizer=false (A) vs true, the default (B)", "training steps only"),
    ("1", "fused_optimizer=false (A) vs true, the default (B)", "test accuracy"),
    ("2", "hand-written loop (A) vs reglab + W&B offline", "whole process, start to exit"),
    ("3", "nn.Dropout (A) vs reglab dropout (B)", "(100, 100)"),
    ("3", "nn.Dropout (A) vs reglab dropout (B)", "(256, 4096)"),
    (
        "3",
        "F.cross_entropy(label_smoothing=) (A) vs reglab smoothed targets + soft_cross_entropy (B)",
        "(100, 10)",
    ),
    (
        "3",
        "F.cross_entropy(label_smoothing=) (A) vs reglab smoothed targets + soft_cross_entropy (B)",
        "(256, 1000)",
    ),
    ("3", "nn.Dropout2d (A) vs reglab channel_dropout (B)", "(32, 64, 16, 16)"),
    ("4", "2-job grid", "whole sweep, start to exit"),
    ("5", "hand-written loop (A) vs reglab default (B)", "peak resident memory"),
    ("5", "`python -c 'import torch'` alone", "peak resident memory"),
    ("6", "the same training through a Lightning Trainer", "not run"),
]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table line in `text` (the separator line left out)."""
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|-")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def load_bench(path: Path = BENCH, name: str = "reglab_bench"):
    """benchmarks/ is not a package: import a benchmark (bench.py by default) from its path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_prints_every_row_and_writes_only_into_tmp(tmp_path, data_root):
    docs = tmp_path / "performance.md"
    docs.write_text(
        "# Performance\n\nprose before\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\nprose after\n"
    )
    cmd = [sys.executable, str(BENCH), "--smoke", "--workdir", str(tmp_path / "work")]
    cmd += ["--data-root", str(data_root), "--docs", str(docs), "--write-docs"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

    rows = table_rows(result.stdout)
    assert rows[0][:3] == ["#", "comparison", "measure"]
    for number, comparison, measure in EXPECTED_ROWS:
        assert any(
            row[0] == number and row[1].startswith(comparison) and measure in row[2] for row in rows
        ), (number, comparison, measure)
    assert "Targets:" in result.stdout
    assert "Hardware:" in result.stdout and "Versions:" in result.stdout

    written = docs.read_text()
    assert "prose before" in written and "prose after" in written and "old" not in written
    assert table_rows(written)[0][:3] == ["#", "comparison", "measure"]


def test_write_docs_replaces_only_the_results_block(tmp_path):
    bench = load_bench()
    docs = tmp_path / "performance.md"
    docs.write_text(f"intro\n{bench.DOCS_START}\nstale table\n{bench.DOCS_END}\noutro\n")
    bench.write_docs(docs, ["Date: today"], "| new table |", "Targets: 1 of 1 PASS.")
    text = docs.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "stale table" not in text and "| new table |" in text and "Date: today" in text


def test_write_docs_creates_a_missing_file(tmp_path):
    bench = load_bench()
    docs = tmp_path / "docs" / "performance.md"
    bench.write_docs(docs, ["Date: today"], "| table |", "Targets: 0 of 0 PASS.")
    assert "| table |" in docs.read_text()


def test_ratio_rows_judge_the_median_ratio():
    bench = load_bench()
    passed = bench.ratio_row("1", "A vs B", "time", [10.0, 12.0, 11.0], [6.0, 7.0, 9.0], "s", 0.7)
    failed = bench.ratio_row("1", "A vs B", "time", [10.0, 12.0, 11.0], [8.0, 9.0, 9.0], "s", 0.7)
    assert passed.result == "PASS" and passed.ratio.startswith("0.64x")
    assert failed.result == "FAIL"
    assert bench.ratio_row("1", "A vs B", "time", [1.0], [2.0], "s").result == "info"


@pytest.mark.slow  # ~14 s on a slow 2-core machine; make test-slow (and CI) runs it
def test_the_gpu_check_script_runs_on_the_cpu(tmp_path):
    """The prepared GPU check must work the day a GPU is lent: run two of its cases on the CPU."""
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--cases",
            "mlp fp32,mlp bf16",
            "--json",
            str(out),
            "--data-root",
            str(tmp_path / "data"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["mlp fp32", "mlp bf16"]
    assert all(r["device"] == "cpu" and r["samples_per_s"] > 0 for r in rows)


def test_the_paper_cnn_protocol_trains_on_the_set_it_names(data_root):
    """benchmarks/mnist1d_paper_cnn.py, docs/results.md's evidence on the CNN gap: 4000 = every training signal
    in stored order (the paper), 3200 = exactly reglab's training split."""
    spec = importlib.util.spec_from_file_location("paper_cnn", ROOT / "benchmarks" / "mnist1d_paper_cnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from reglab.data import _mnist1d_arrays, load_dataset, mnist1d_config

    x, y, x_test, _ = module.training_set(4000, str(data_root))
    stored_x, stored_y, stored_x_test, _ = _mnist1d_arrays(data_root)
    assert x.shape == (4000, 1, 40) and (y.numpy() == stored_y).all()
    assert (x.numpy() == stored_x.astype("float32")).all() and len(x_test) == len(stored_x_test) == 1000
    x, y, _, _ = module.training_set(3200, str(data_root))
    reglab_split = load_dataset(mnist1d_config(str(data_root)))
    assert torch.equal(x, reglab_split.x_train) and torch.equal(y, reglab_split.y_train)


def test_the_paper_cnn_protocol_script_runs(data_root):
    script = ROOT / "benchmarks" / "mnist1d_paper_cnn.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, str(script), "--seeds", "0", "1", "--steps", "20", "--eval-every", "10"]
    command += ["--n-train", "3200", "--padding", "2", "--order", "shuffled", "--data-root", str(data_root)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=True)
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(line["runs"]) == 2 and 0.0 <= line["final"] <= line["peak"] <= 100.0


def test_sweep_benchmark_brackets_every_baseline_between_stacked_runs():
    """`make bench-sweeps` runs stacked, basic, stacked, joblib, stacked, and compares each baseline with the mean of
    the two stacked runs around it (the machine's speed drifts over minutes)."""
    sweeps = load_bench(
        ROOT / "benchmarks" / "stacked_sweeps.py", "reglab_stacked_sweeps"
    )  # imports bench itself

    launchers = ("basic", "joblib", "stacked")
    assert sweeps.bracketed(launchers) == ["stacked", "basic", "stacked", "joblib", "stacked"]
    workload = sweeps.Workload("grid", [], 48, launchers, {"basic": 1 / 5, "joblib": 1 / 2.5})

    def run(wall_s, jobs=48):
        finished = sweeps.bench.Finished(wall_s=wall_s, peak_rss_mb=0.0, stdout="")
        finished.jobs = jobs
        return finished

    times = {"basic": run(100.0, jobs=16), "joblib": run(200.0)}
    basic, joblib = sweeps.rows_for(workload, times, [run(80.0), run(100.0), run(120.0)])
    assert basic.a == "300.0 s" and basic.b.startswith("90.0 s (80.0 / 100.0)")  # 16 jobs scaled to 48
    assert joblib.a == "200.0 s" and joblib.b.startswith("110.0 s (100.0 / 120.0)")
    assert basic.result == "FAIL" and joblib.result == "FAIL"  # 0.30x > 0.20x; 0.55x > 0.40x


def test_the_context_line_names_the_memory_bandwidth():
    """The Hardware line says how fast one thread copies in cache and from RAM (machines of one CPU model differ)."""
    bench = load_bench(ROOT / "benchmarks" / "bench.py", "reglab_bench_context")
    probe = bench.memory_bandwidth()
    rates = [float(x) for x in re.findall(r"(\d+) GiB/s", probe)]
    assert len(rates) == 2 and all(rate > 0 for rate in rates), probe
    args = SimpleNamespace(smoke=True, repeats=1)
    hardware = next(line for line in bench.context_lines(args) if line.startswith("Hardware:"))
    assert "GiB/s in cache (1 MiB)" in hardware and "GiB/s from RAM (256 MiB)" in hardware
