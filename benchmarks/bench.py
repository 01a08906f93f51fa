"""`make bench`: reglab's speed and memory against a hand-written PyTorch loop, each against a target, in one table.

Every comparison runs in the same invocation, interleaved (A, B, A, B, ...) and repeated; the table shows medians
and ratios, because absolute times on a shared machine are noise. What runs:

  1. reglab's default run (`python train.py logger=none`) vs the same training written as a plain PyTorch script
     (benchmarks/handwritten_loop.py): whole process and training time, and the test accuracy of both (repeat i
     uses seed i). reglab with each speed setting off (trainer.flush_denormal, trainer.fused_optimizer) shows
     what each setting buys.
  2. reglab with W&B offline and every diagnostic and plot on, against the same hand-written loop.
  3. From-scratch regularizers vs the PyTorch built-ins, forward + backward (torch.utils.benchmark, 1 thread).
  4. A 12-job grid sweep: Hydra's basic launcher (jobs one after another) vs hydra/launcher=joblib.
  5. Peak resident memory of the default run (getrusage of the finished process).
  6. The same training through a Lightning Trainer: reported as skipped unless `lightning` is importable.

    python benchmarks/bench.py                 # full run, ~8 minutes on 2 cores; rewrites docs/performance.md
    python benchmarks/bench.py --smoke         # every comparison on tiny sizes, well under a minute, no docs
    python benchmarks/bench.py --repeats 5 --workdir /tmp/bench --no-write-docs
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from types import SimpleNamespace

from reglab.provenance import cpu_model, git_commit

ROOT = Path(__file__).resolve().parents[1]
HANDWRITTEN = ROOT / "benchmarks" / "handwritten_loop.py"
DOCS = ROOT / "docs" / "performance.md"
DOCS_START, DOCS_END = "<!-- bench:start -->", "<!-- bench:end -->"

# ---------------------------------------------------------------------------------------------------------------------
# Sizes and targets

FULL = SimpleNamespace(
    epochs=150,  # reglab's default trainer.epochs (~6000 steps, the MNIST-1D reference)
    repeats=3,  # each comparison 3 times, interleaved; medians over the repeats
    grid_decays="0,1e-5,1e-4,1e-3,1e-2,1e-1",  # 6 weight decays x 2 seeds = 12 jobs
    grid_seeds="0,1",
    grid_epochs=150,  # each job is a default run (150 epochs): the sweeps users actually launch
    micro_time_s=0.5,  # torch.utils.benchmark min_run_time per measurement
)
SMOKE = SimpleNamespace(
    epochs=2, repeats=1, grid_decays="0,1e-3", grid_seeds="0", grid_epochs=2, micro_time_s=0.01
)

MAX_WHOLE_PROCESS = 0.9  # reglab default / hand-written loop, whole process
MAX_TRAINING_TIME = 0.7  # ... training time (the epochs loop, per-epoch validation included)
MAX_WANDB_WHOLE_PROCESS = 1.1  # reglab + W&B offline + all diagnostics and plots / hand-written loop
MAX_JOBLIB_GRID = 0.6  # joblib launcher / basic launcher, wall time of the 12-job grid
MAX_STACKED_GRID = 0.5  # stacked launcher / basic launcher, the same grid (one process, one batched model)
MAX_STACKED_VS_JOBLIB = 0.8  # stacked launcher / joblib launcher, the same grid
MAX_PEAK_RSS_MB = 1500  # peak resident memory of the default run, 1 MB = 10^6 bytes
MICRO_CASES = [  # (technique, input shape, max ratio from scratch / built-in)
    ("dropout p=0.5", (100, 100), 1.5),
    ("dropout p=0.5", (256, 4096), 1.5),
    ("label smoothing eps=0.1", (100, 10), 1.3),
    ("label smoothing eps=0.1", (256, 1000), 1.3),
    ("channel dropout p=0.5", (32, 64, 16, 16), 1.5),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, 1 repeat: checks that everything runs"
    )
    parser.add_argument("--repeats", type=int, help="repeats of every comparison (default 3, smoke 1)")
    parser.add_argument("--workdir", type=Path, help="run outputs go here and are kept (default: a temp dir)")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data", help="MNIST-1D cache directory")
    parser.add_argument(
        "--grid-epochs", type=int, help="epochs per job of the grid sweep (default 150, smoke 2)"
    )
    parser.add_argument(
        "--docs", type=Path, default=DOCS, help="the Markdown file whose results block to rewrite"
    )
    parser.add_argument(
        "--write-docs",
        action=argparse.BooleanOptionalAction,
        help="rewrite the results block of --docs (default: on for the full run, off with --smoke)",
    )
    args = parser.parse_args(argv)
    args.sizes = SimpleNamespace(**vars(SMOKE if args.smoke else FULL))
    if args.grid_epochs:
        args.sizes.grid_epochs = args.grid_epochs
    args.repeats = args.repeats or args.sizes.repeats
    if args.write_docs is None:
        args.write_docs = not args.smoke
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Whole processes: wall time from start to exit and peak resident memory, from the kernel's own accounting


@dataclass
class Finished:
    wall_s: float
    peak_rss_mb: float  # the largest single process (the kernel's ru_maxrss)
    stdout: str
    # all its processes together, shared library pages counted once (`TreeMemory`), sampled every 0.1 s
    peak_tree_mb: float = 0.0


def run_process(cmd: list[str], cwd: Path, env: dict, timeout_s: float = 900) -> Finished:
    """Run `cmd` to its exit; wait4 gives this one child's rusage (ru_maxrss in KiB on Linux: the largest of the
    process and its descendants); a sampler adds up the resident memory of the whole process tree."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        killer = threading.Timer(timeout_s, process.kill)
        killer.start()
        sampler = TreeMemory(process.pid)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall_s = time.perf_counter() - started
        sampler.stop()
        killer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {process.returncode}:\n{stdout[-2000:]}\n{stderr[-3000:]}"
        )
    return Finished(
        wall_s=wall_s,
        peak_rss_mb=usage.ru_maxrss * 1024 / 1e6,
        stdout=stdout,
        peak_tree_mb=sampler.peak_mb,
    )


class TreeMemory(threading.Thread):
    """The peak memory of a process and all its descendants together, read from /proc every 0.1 s (a stacked
    launcher trains stacks in processes of their own; ru_maxrss counts only the largest process). Each process's
    private pages (resident minus file-backed: its heap, torch's Python objects) count once per process, the
    file-backed ones (torch's libraries, mapped by all of them) once in all, at the largest process's count: an
    upper bound of their summed proportional set sizes that costs microseconds to read (smaps_rollup, which gives
    PSS itself, took ~18 ms a process here and slowed the sweeps it measured)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.done.wait(0.1):
            private, shared = 0, 0
            for pid in [self.pid, *descendants(self.pid)]:
                try:
                    _, resident, file_backed = map(int, Path(f"/proc/{pid}/statm").read_text().split()[:3])
                except (OSError, ValueError):
                    continue  # the process ended in between
                private += resident - file_backed
                shared = max(shared, file_backed)
            self.peak_mb = max(self.peak_mb, (private + shared) * page / 1e6)

    def stop(self) -> None:
        self.done.set()
        self.join()


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in Path(f"/proc/{parent}/task/{task}/children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def child_env(workdir: Path) -> dict:
    """The same environment for every run: reglab importable, W&B files inside the work directory."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        env[var] = str(workdir / "wandb-home")
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")
    return env


# ---------------------------------------------------------------------------------------------------------------------
# Comparisons 1, 2 and 5: single runs


@dataclass
class Variant:
    """One way to run the training; `command(seed, run_dir)` builds its command line."""

    name: str
    command: Callable[[int, Path], list[str]]
    reglab: bool = True  # reglab writes summary.json/metrics.jsonl; the others print one JSON line


def single_run_variants(args: argparse.Namespace) -> list[Variant]:
    python, epochs = sys.executable, args.sizes.epochs

    def reglab(*overrides: str) -> Callable[[int, Path], list[str]]:
        smaller = [f"trainer.epochs={epochs}"] if epochs != FULL.epochs else []
        return lambda seed, run_dir: [
            *[python, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
            *[f"dataset.root={args.data_root}", f"trainer.seed={seed}", *smaller],
        ]

    handwritten = [python, str(HANDWRITTEN), "--data-root", str(args.data_root), "--epochs", str(epochs)]
    return [
        Variant("hand-written loop", lambda seed, run_dir: [*handwritten, "--seed", str(seed)], reglab=False),
        Variant("reglab default", reglab("logger=none")),
        Variant("reglab flush_denormal=false", reglab("logger=none", "trainer.flush_denormal=false")),
        Variant("reglab fused_optimizer=false", reglab("logger=none", "trainer.fused_optimizer=false")),
        Variant("reglab + W&B offline", reglab("logger=wandb", "logger.wandb.mode=offline")),
        Variant("import torch", lambda seed, run_dir: [python, "-c", "import torch"], reglab=False),
    ]


def run_single(variant: Variant, seed: int, workdir: Path, env: dict) -> dict:
    """wall_s, peak_rss_mb and, for training runs, loop_s, train_s, test_acc and test_loss.

    loop_s is the training time from the end of epoch 1 to the end of the last epoch, per-epoch evaluation
    included: reglab's per-epoch `time_s` counts from the start of `train()` (data, model and optimizer set-up
    included), so the first epoch's own duration cannot be told apart there; both sides leave it out. train_s is
    the training steps alone, summed over all epochs (reglab's summary `train_time_s`).
    """
    run_dir = workdir / "runs" / f"{re.sub(r'[^a-z0-9]+', '-', variant.name.lower())}-seed{seed}"
    finished = run_process(variant.command(seed, run_dir), workdir, env)
    result = {"wall_s": finished.wall_s, "peak_rss_mb": finished.peak_rss_mb}
    if variant.reglab:
        summary = json.loads((run_dir / "summary.json").read_text())
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        result.update(
            loop_s=epochs[-1]["time_s"] - epochs[0]["time_s"],  # time_s counts from the start of train()
            train_s=summary["train_time_s"],
            test_acc=summary["test/acc"],
            test_loss=summary["test/loss"],
        )
    elif variant.name == "hand-written loop":
        printed = json.loads(finished.stdout.strip().splitlines()[-1])
        result.update(
            loop_s=printed["after_first_epoch_s"],
            train_s=printed["train_time_s"],
            test_acc=printed["test_acc"],
            test_loss=printed["test_loss"],
        )
    return result


def measure_single_runs(args: argparse.Namespace, workdir: Path, env: dict) -> dict[str, list[dict]]:
    """Every variant once per repeat, in turn (A, B, C, ..., A, B, C, ...); repeat i trains with seed i."""
    variants = single_run_variants(args)
    results: dict[str, list[dict]] = {v.name: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            result = run_single(variant, repeat, workdir, env)
            results[variant.name].append(result)
            log(f"repeat {repeat + 1}/{args.repeats}  {variant.name:<30} {result['wall_s']:6.2f} s")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Comparison 4: a grid sweep through two launchers


def grid_overrides(sizes: SimpleNamespace) -> list[str]:
    return [
        "logger=none",
        "regularizer=l2",
        f"regularizer.l2.weight_decay={sizes.grid_decays}",
        f"trainer.seed={sizes.grid_seeds}",
        f"trainer.epochs={sizes.grid_epochs}",
    ]


def grid_size(sizes: SimpleNamespace) -> int:
    return len(sizes.grid_decays.split(",")) * len(sizes.grid_seeds.split(","))


GRID_LAUNCHERS = {  # how each grid variant is launched: its extra overrides
    "basic": [],
    "joblib": ["hydra/launcher=joblib"],
    "stacked, 1 thread": ["hydra/launcher=stacked", "hydra.launcher.processes=1", "trainer.threads=1"],
    "stacked, 2 threads": ["hydra/launcher=stacked", "hydra.launcher.processes=1", "trainer.threads=2"],
    "stacked, 2 processes": ["hydra/launcher=stacked", "hydra.launcher.processes=2", "trainer.threads=1"],
}


def run_grid(args: argparse.Namespace, launcher: str, repeat: int, workdir: Path, env: dict) -> float:
    sweep_dir = workdir / "grids" / f"{launcher.replace(', ', '-').replace(' ', '')}-{repeat}"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *grid_overrides(args.sizes)]
    cmd += [f"dataset.root={args.data_root}", f"hydra.sweep.dir={sweep_dir}", *GRID_LAUNCHERS[launcher]]
    finished = run_process(cmd, workdir, env)
    completed = [
        p for p in sweep_dir.glob("*/summary.json") if json.loads(p.read_text())["status"] == "completed"
    ]
    if len(completed) != grid_size(args.sizes):
        raise RuntimeError(f"{launcher} grid: {len(completed)} of {grid_size(args.sizes)} jobs completed")
    return finished.wall_s


def measure_grids(args: argparse.Namespace, workdir: Path, env: dict) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {launcher: [] for launcher in GRID_LAUNCHERS}
    for repeat in range(args.repeats):
        for launcher in results:
            results[launcher].append(run_grid(args, launcher, repeat, workdir, env))
            log(f"repeat {repeat + 1}/{args.repeats}  grid, {launcher:<24} {results[launcher][-1]:6.2f} s")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Comparison 3: from scratch vs built-in, forward + backward


def micro_pair(technique: str, shape: tuple[int, ...]) -> tuple[str, str, Callable, Callable, dict]:
    """(built-in name, scratch name, built-in fn, scratch fn, inputs); each fn maps the inputs to a 0-d loss or
    a tensor, and the timed statement differentiates it with respect to the input."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from reglab.regularizers.base import soft_cross_entropy
    from reglab.regularizers.dropout import channel_dropout, dropout
    from reglab.regularizers.label_smoothing import smooth_targets

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, requires_grad=True)
    if technique.startswith("label smoothing"):
        target = torch.randint(0, shape[1], (shape[0],), generator=generator)
        return (
            "F.cross_entropy(label_smoothing=)",
            "smoothed targets + soft_cross_entropy",  # what scratch label smoothing trains with
            lambda z: F.cross_entropy(z, target, label_smoothing=0.1),
            lambda z: soft_cross_entropy(z, smooth_targets(target, z.shape[1], 0.1)),
            {"x": x, "grad_out": None},
        )
    grad_out = torch.randn(shape, generator=generator)
    if technique.startswith("channel"):
        return (
            "nn.Dropout2d",
            "channel_dropout",
            nn.Dropout2d(0.5),
            lambda z: channel_dropout(z, 0.5),
            {"x": x, "grad_out": grad_out},
        )
    return "nn.Dropout", "dropout", nn.Dropout(0.5), lambda z: dropout(z, 0.5), {"x": x, "grad_out": grad_out}


def time_forward_backward(fn: Callable, inputs: dict, min_run_time: float) -> float:
    """Median seconds of one forward + backward pass (torch.utils.benchmark, 1 thread)."""
    import torch
    from torch.utils.benchmark import Timer

    timer = Timer(
        stmt="torch.autograd.grad(fn(x), x, grad_out)",
        globals={"torch": torch, "fn": fn, **inputs},
        num_threads=1,
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure_micro(args: argparse.Namespace) -> list[dict]:
    """Built-in then from scratch for every case, the whole set once per repeat."""
    import torch

    torch.set_num_threads(1)
    cases = [
        dict(zip(("builtin", "scratch", "builtin_fn", "scratch_fn", "inputs"), micro_pair(t, s), strict=True))
        | {"technique": t, "shape": s, "max_ratio": r, "builtin_s": [], "scratch_s": []}
        for t, s, r in MICRO_CASES
    ]
    for repeat in range(args.repeats):
        for case in cases:
            case["builtin_s"].append(
                time_forward_backward(case["builtin_fn"], case["inputs"], args.sizes.micro_time_s)
            )
            case["scratch_s"].append(
                time_forward_backward(case["scratch_fn"], case["inputs"], args.sizes.micro_time_s)
            )
        log(f"repeat {repeat + 1}/{args.repeats}  micro-benchmarks done")
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    number: str
    comparison: str
    measure: str
    a: str  # the baseline
    b: str  # the candidate
    ratio: str  # b / a: median ratio and the per-repeat range
    target: str
    result: str  # PASS | FAIL | info | skipped


def ratio_cell(a: list[float], b: list[float]) -> tuple[float, str]:
    """The ratio of the medians, and the range of the per-repeat ratios (how noisy it is)."""
    ratio = median(b) / median(a)
    per_repeat = [y / x for x, y in zip(a, b, strict=True)]
    spread = f" ({min(per_repeat):.2f}-{max(per_repeat):.2f})" if len(per_repeat) > 1 else ""
    return ratio, f"{ratio:.2f}x{spread}"


def ratio_row(number, comparison, measure, a, b, unit, max_ratio=None) -> Row:
    scale, fmt = {"s": (1.0, "{:.2f} s"), "us": (1e6, "{:.1f} µs")}[unit]
    ratio, cell = ratio_cell(a, b)
    target, result = ("-", "info") if max_ratio is None else (f"<= {max_ratio}x", verdict(ratio <= max_ratio))
    return Row(
        number,
        comparison,
        measure,
        fmt.format(median(a) * scale),
        fmt.format(median(b) * scale),
        cell,
        target,
        result,
    )


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def accuracy_cell(runs: list[dict]) -> str:
    accs = [100 * r["test_acc"] for r in runs]
    spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
    return f"{statistics.mean(accs):.1f}{spread} %"


def accuracy_row(number, comparison, a: list[dict], b: list[dict]) -> Row:
    """Test accuracy over the seeds: 'bit-identical' when every seed's test loss is exactly equal, otherwise a
    noise check, which passes when the mean difference is within 2 seed-to-seed standard deviations."""
    acc_a, acc_b = [100 * r["test_acc"] for r in a], [100 * r["test_acc"] for r in b]
    delta = statistics.mean(acc_b) - statistics.mean(acc_a)
    if all(x["test_loss"] == y["test_loss"] for x, y in zip(a, b, strict=True)):
        result = "PASS (bit-identical)"
    elif len(a) < 2:
        result = "n/a (1 seed)"
    else:
        noise = 2 * max(statistics.stdev(acc_a), statistics.stdev(acc_b))
        result = verdict(abs(delta) <= noise) + f" (2 std = {noise:.1f} pt)"
    seeds = f"seeds 0-{len(a) - 1}" if len(a) > 1 else "seed 0"
    return Row(
        number,
        comparison,
        f"test accuracy, {seeds}",
        accuracy_cell(a),
        accuracy_cell(b),
        f"{delta:+.1f} pt",
        "within seed noise",
        result,
    )


def build_rows(
    single: dict[str, list[dict]], grids: dict[str, list[float]], micro: list[dict], sizes
) -> list[Row]:
    return [
        *training_rows(single),
        *speed_setting_rows(single),
        wandb_row(single),
        *micro_rows(micro),
        *grid_rows(grids, sizes),
        *memory_rows(single),
        lightning_row(),
    ]


def series(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs]


TIMED_MEASURES = [  # (key of a run's result, what the row calls it, the target B/A of the default run)
    ("wall_s", "whole process, start to exit", MAX_WHOLE_PROCESS),
    ("loop_s", "training time: epochs 2..E incl. per-epoch eval", MAX_TRAINING_TIME),
    ("train_s", "training steps only (eval excluded)", None),
]


def training_rows(single: dict[str, list[dict]]) -> list[Row]:
    hand, reglab = single["hand-written loop"], single["reglab default"]
    what = "hand-written loop (A) vs reglab default (B)"
    return [
        *[
            ratio_row("1", what, measure, series(hand, key), series(reglab, key), "s", target)
            for key, measure, target in TIMED_MEASURES
        ],
        accuracy_row("1", what, hand, reglab),
    ]


def speed_setting_rows(single: dict[str, list[dict]]) -> list[Row]:
    """Each speed setting turned off on its own (A) against the default (B): B/A is what the setting buys."""
    rows, default = [], single["reglab default"]
    for setting in ("flush_denormal", "fused_optimizer"):
        off = single[f"reglab {setting}=false"]
        what = f"{setting}=false (A) vs true, the default (B)"
        rows += [
            ratio_row("1", what, measure, series(off, key), series(default, key), "s")
            for key, measure, _ in TIMED_MEASURES
        ]
        rows.append(accuracy_row("1", what, off, default))
    return rows


def wandb_row(single: dict[str, list[dict]]) -> Row:
    what = "hand-written loop (A) vs reglab + W&B offline, all diagnostics and plots (B)"
    hand, wandb = single["hand-written loop"], single["reglab + W&B offline"]
    return ratio_row(
        "2",
        what,
        "whole process, start to exit",
        series(hand, "wall_s"),
        series(wandb, "wall_s"),
        "s",
        MAX_WANDB_WHOLE_PROCESS,
    )


def micro_rows(micro: list[dict]) -> list[Row]:
    return [
        ratio_row(
            "3",
            f"{case['builtin']} (A) vs reglab {case['scratch']} (B)",
            f"{case['technique']}, forward + backward, {tuple(case['shape'])}",
            case["builtin_s"],
            case["scratch_s"],
            "us",
            case["max_ratio"],
        )
        for case in micro
    ]


def grid_rows(grids: dict[str, list[float]], sizes) -> list[Row]:
    grid = f"{grid_size(sizes)}-job grid ({sizes.grid_epochs} epochs each)"
    pairs = [
        ("basic", "joblib", MAX_JOBLIB_GRID),
        ("basic", "stacked, 1 thread", MAX_STACKED_GRID),
        ("joblib", "stacked, 1 thread", MAX_STACKED_VS_JOBLIB),
        ("joblib", "stacked, 2 threads", MAX_STACKED_VS_JOBLIB),
        ("basic", "stacked, 2 processes", MAX_STACKED_GRID),
        ("joblib", "stacked, 2 processes", MAX_STACKED_VS_JOBLIB),
    ]
    return [
        ratio_row(
            "4",
            f"{grid}: {a} launcher (A) vs {b} (B)",
            "whole sweep, start to exit",
            grids[a],
            grids[b],
            "s",
            limit,
        )
        for a, b, limit in pairs
    ]


def memory_rows(single: dict[str, list[dict]]) -> list[Row]:
    def peak(name: str) -> float:
        return median(series(single[name], "peak_rss_mb"))

    reglab, hand, floor = peak("reglab default"), peak("hand-written loop"), peak("import torch")
    return [
        Row(
            "5",
            "hand-written loop (A) vs reglab default (B)",
            "peak resident memory (ru_maxrss)",
            f"{hand:.0f} MB",
            f"{reglab:.0f} MB",
            f"{reglab / hand:.2f}x",
            f"<= {MAX_PEAK_RSS_MB} MB",
            verdict(reglab <= MAX_PEAK_RSS_MB),
        ),
        Row(
            "5",
            "`python -c 'import torch'` alone",
            "peak resident memory (ru_maxrss)",
            "-",
            f"{floor:.0f} MB",
            "-",
            "-",
            "info",
        ),
    ]


def lightning_row() -> Row:
    found = importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning")
    note = "importable, but no Lightning variant is written" if found else "lightning is not installed"
    return Row(
        "6",
        "the same training through a Lightning Trainer",
        "not run",
        "-",
        "-",
        "-",
        "-",
        f"skipped: {note}",
    )


def format_table(rows: list[Row]) -> str:
    header = ["#", "comparison", "measure", "A", "B", "B/A (per repeat)", "target", "result"]
    cells = [header] + [
        [r.number, r.comparison, r.measure, r.a, r.b, r.ratio, r.target, r.result] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def target_summary(rows: list[Row]) -> str:
    judged = [r for r in rows if r.result.startswith(("PASS", "FAIL"))]
    failed = [f"{r.comparison}: {r.measure}" for r in judged if r.result.startswith("FAIL")]
    line = f"Targets: {len(judged) - len(failed)} of {len(judged)} PASS."
    return line + "".join(f"\n- FAIL: {f}" for f in failed)


# ---------------------------------------------------------------------------------------------------------------------
# Context: hardware, versions, date; and the results block of docs/performance.md


def memory_gib() -> str:
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        return f"{kib / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        return "unknown memory"


def memory_bandwidth() -> str:
    """One thread's copy rate (bytes read + written per second) from a block that fits in the caches (1 MiB) and
    from one that does not (256 MiB), the best of three rounds each. A stack moves K members' weights, gradients,
    optimizer states and activations every step (~6 MB for the 24 MLPs a core trains in the 48-job grid), so
    stacked sweeps gain less on a host whose memory is slow: the line tells such a machine apart from a fast one
    of the same CPU model (docs/performance.md)."""
    import numpy as np

    rates = []
    for mib, copies in ((1, 500), (256, 4)):
        source = np.ones(mib * 2**18, dtype=np.float32)
        target = np.empty_like(source)
        np.copyto(target, source)  # the pages exist before the clock starts
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(copies):
                np.copyto(target, source)
            best = min(best, time.perf_counter() - start)
        rates.append(2 * mib * copies / 1024 / best)
    return f"memory copy {rates[0]:.0f} GiB/s in cache (1 MiB), {rates[1]:.0f} GiB/s from RAM (256 MiB), one thread"


def context_lines(args: argparse.Namespace) -> list[str]:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mode = "smoke (tiny sizes)" if args.smoke else "full"
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return [
        f"Date: {now}; mode: {mode}, {args.repeats} repeat(s), interleaved, medians; training runs use 1 thread.",
        f"Hardware: {cpu_model()}, {cores} cores, {memory_gib()}, {platform.system()} {platform.machine()}; "
        f"{memory_bandwidth()}.",
        f"Versions: Python {platform.python_version()}, torch {version('torch')}, reglab {version('reglab')} "
        f"({git_commit()}), hydra-core {version('hydra-core')}, wandb {version('wandb')}.",
    ]


def write_docs(path: Path, context: list[str], table: str, targets: str) -> None:
    """Replace the text between the bench markers of `path` (create the file with just the block if needed)."""
    block = "\n".join(
        [DOCS_START, "", *[f"{line}  " for line in context], "", table, "", targets, "", DOCS_END]
    )
    text = path.read_text() if path.exists() else f"# Performance\n\n{DOCS_START}\n{DOCS_END}\n"
    if DOCS_START not in text or DOCS_END not in text:
        text = text.rstrip("\n") + f"\n\n{DOCS_START}\n{DOCS_END}\n"
    before, rest = text.split(DOCS_START, 1)
    after = rest.split(DOCS_END, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(before + block + after)


# ---------------------------------------------------------------------------------------------------------------------
# Main


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def prepare_data(data_root: Path) -> None:
    """Generate the MNIST-1D cache once, before anything is timed."""
    from reglab.data import load_dataset, mnist1d_config

    load_dataset(mnist1d_config(str(data_root)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.data_root = args.data_root.resolve()
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="reglab-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = child_env(workdir)
    started = time.perf_counter()
    try:
        prepare_data(args.data_root)
        single = measure_single_runs(args, workdir, env)
        grids = measure_grids(args, workdir, env)
        micro = measure_micro(args)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = build_rows(single, grids, micro, args.sizes)
    context, table, targets = context_lines(args), format_table(rows), target_summary(rows)
    log(f"done in {time.perf_counter() - started:.0f} s")
    print("\n".join([*context, "", table, "", targets]))
    if args.write_docs:
        write_docs(args.docs, context, table, targets)
        log(f"results written into {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
