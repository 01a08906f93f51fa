"""`make bench-sweeps`: whole sweeps through the stacked launcher against Hydra's basic and joblib launchers.

Each sweep is one `python train.py -m ...` process, timed start to exit (the sweep report included); peak memory is
that of all the sweep's processes together (private pages of each, shared library pages once: bench.TreeMemory,
sampled every 0.1 s). This machine's speed drifts over minutes (the same `make sweep` took 112 s, then 144 s 42
minutes later), so stacked runs bracket every baseline run (stacked, basic, stacked, joblib, stacked) and each
baseline is compared with the mean of the two stacked runs around it: a drift that is steady over the pair weighs
on both sides alike. The workloads and targets are those of issue 10 ("Train a whole sweep as one batched model"):

  1. 48-job grid: regularizer=l2, 4 weight decays x 12 seeds, 150 epochs, logger=none: basic, joblib, stacked
  2. `make sweep`: every technique the MLP takes, at its default strength, and none, 3 seeds (39 jobs): basic vs
     stacked
  3. the 48-job grid with W&B offline: basic vs stacked
  4. a 12-job model=cnn1d grid (2 weight decays x 6 seeds, 50 epochs): basic vs stacked
  5. peak resident memory of the 48-job stack

    python benchmarks/stacked_sweeps.py            # ~30 minutes on 2 cores; rewrites its block of docs/performance.md
    python benchmarks/stacked_sweeps.py --smoke    # tiny sizes, about a minute, writes nothing
    python benchmarks/stacked_sweeps.py --only cnn1d   # one workload (by a word of its name), writes nothing
    python benchmarks/stacked_sweeps.py --device cuda --jobs 256 --basic-jobs 16 --no-write-docs   # on a GPU

On a GPU the basic launcher's 256 jobs would take hours: `--basic-jobs N` times it on the grid's first N jobs and
scales the time per job to the whole grid (the row says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/bench.py: process timing, table and docs helpers)

ROOT = bench.ROOT
DOCS_START, DOCS_END = "<!-- stacked-sweeps:start -->", "<!-- stacked-sweeps:end -->"
SWEEP = [  # = make sweep
    "regularizer=none,l1,l2,dropout,early_stopping,label_smoothing,noise,mixup,cutmix,swa,ema,sam,spectral_norm",
    "trainer.seed=0,1,2",
]
SMOKE_SWEEP = [SWEEP[0].replace(",swa", ""), SWEEP[1]]
LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=joblib"], "stacked": ["hydra/launcher=stacked"]}


@dataclass
class Workload:
    name: str
    overrides: list[str]
    jobs: int
    launchers: tuple[str, ...]
    targets: dict[str, float]  # "joblib" -> the most stacked/joblib may be, ...
    scalable: bool = (
        False  # a seed grid of 4 settings: --basic-jobs may time the basic launcher on fewer seeds
    )


def seeds(n: int) -> str:
    return ",".join(str(s) for s in range(n))


def workloads(args) -> list[Workload]:
    epochs, n_seeds, cnn_epochs = (2, 2, 2) if args.smoke else (150, args.jobs // 4, 50)
    grid = [
        "regularizer=l2",
        "regularizer.l2.weight_decay=0,1e-4,1e-3,1e-2",
        f"trainer.seed={seeds(n_seeds)}",
    ]
    grid += [f"trainer.epochs={epochs}"]
    jobs = 4 * n_seeds
    return [
        Workload(
            f"{jobs}-job l2 grid",
            [*grid, "logger=none"],
            jobs,
            ("basic", "joblib", "stacked"),
            {"basic": 1 / 5, "joblib": 1 / 2.5},
            scalable=True,
        ),
        Workload(
            "make sweep (39 jobs)",
            # smoke: 2 epochs, so without SWA (it starts averaging at epoch 100)
            [*SWEEP, "logger=none"] if not args.smoke else [*SMOKE_SWEEP, "logger=none", "trainer.epochs=2"],
            39 if not args.smoke else 36,
            ("basic", "stacked"),
            {"basic": 1 / 3},
        ),
        Workload(
            f"{jobs}-job l2 grid, W&B offline",
            [*grid, "logger=wandb", "logger.wandb.mode=offline"],
            jobs,
            ("basic", "stacked"),
            {"basic": 1 / 3},
            scalable=True,
        ),
        Workload(
            "12-job cnn1d grid",
            [
                "model=cnn1d",
                "regularizer=l2",
                "regularizer.l2.weight_decay=0,1e-3",
                f"trainer.seed={seeds(6)}",
                f"trainer.epochs={cnn_epochs}",
                "logger=none",
            ],
            12,
            ("basic", "stacked"),
            {"basic": 1 / 2},
        ),
    ]


def run_sweep(args, workload: Workload, launcher: str, workdir: Path, env: dict, run: int) -> bench.Finished:
    """The workload's sweep through one launcher, the `run`-th of the workload, in a directory of its own (a second
    sweep into the same one would find its jobs finished and skip them)."""
    slug = "".join(c if c.isalnum() or c == "-" else "_" for c in workload.name)
    sweep_dir = workdir / f"{slug}-{run}-{launcher}"
    overrides = list(workload.overrides)
    if launcher == "basic" and workload.scalable and args.basic_jobs and args.basic_jobs < workload.jobs:
        overrides = [
            o if not o.startswith("trainer.seed=") else f"trainer.seed={seeds(args.basic_jobs // 4)}"
            for o in overrides
        ]
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *overrides, *LAUNCHERS[launcher]]
    cmd += [f"trainer.device={args.device}", f"dataset.root={args.data_root}", f"hydra.sweep.dir={sweep_dir}"]
    finished = bench.run_process(cmd, workdir, env, timeout_s=3 * 3600)
    summaries = [json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")]
    ok = [s for s in summaries if s["status"] in ("completed", "early_stopped")]
    if len(ok) != len(summaries) or not ok:
        raise RuntimeError(f"{workload.name}, {launcher}: {len(ok)} of {len(summaries)} jobs finished")
    finished.jobs = len(summaries)
    return finished


def rows_for(
    workload: Workload, times: dict[str, bench.Finished], stacked_runs: list[bench.Finished]
) -> list[bench.Row]:
    """One row per baseline, against the mean of the two stacked runs that bracket it (`bracketed`)."""
    rows = []
    for index, launcher in enumerate(workload.launchers[:-1]):
        base = times[launcher]
        base_s = base.wall_s * workload.jobs / base.jobs  # scaled when --basic-jobs timed a part of the grid
        scaled = f" (timed on {base.jobs} jobs, scaled)" if base.jobs != workload.jobs else ""
        around = stacked_runs[index : index + 2]
        stacked_s = sum(run.wall_s for run in around) / len(around)
        ratio = stacked_s / base_s
        limit = workload.targets.get(launcher)
        rows.append(
            bench.Row(
                "",
                f"{workload.name}: {launcher} (A) vs stacked (B)",
                "whole sweep, start to exit" + scaled + "; B: mean of the runs before and after A",
                f"{base_s:.1f} s",
                f"{stacked_s:.1f} s ({' / '.join(f'{run.wall_s:.1f}' for run in around)})",
                f"{ratio:.2f}x ({1 / ratio:.1f}x faster)",
                "-" if limit is None else f"<= {limit:.2f}x ({1 / limit:g}x faster)",
                "info" if limit is None else bench.verdict(ratio <= limit),
            )
        )
    return rows


def bracketed(launchers: tuple[str, ...]) -> list[str]:
    """The order of a workload's runs: stacked before and after every baseline (stacked, basic, stacked, ...)."""
    order = ["stacked"]
    for launcher in launchers[:-1]:
        order += [launcher, "stacked"]
    return order


def memory_row(workload: Workload, stacked_runs: list[bench.Finished], limit_mb: float) -> bench.Row:
    peak = max(run.peak_tree_mb for run in stacked_runs)
    return bench.Row(
        "",
        f"{workload.name}: the stacked launcher's processes together",
        "peak memory of all its processes together, the largest of its runs",
        "-",
        f"{peak:.0f} MB",
        "-",
        f"<= {limit_mb:.0f} MB",
        bench.verdict(peak <= limit_mb),
    )


def write_docs(path: Path, lines: list[str]) -> None:
    text = path.read_text()
    block = "\n".join([DOCS_START, "", *lines, "", DOCS_END])
    if DOCS_START in text:
        before, rest = text.split(DOCS_START, 1)
        text = before + block + rest.split(DOCS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Stacked sweeps (`make bench-sweeps`)\n\n" + block + "\n"
    path.write_text(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--device", default="cpu", help="trainer.device for every run (cpu, cuda)")
    parser.add_argument("--jobs", type=int, default=48, help="jobs of the l2 grid (a multiple of 4)")
    parser.add_argument("--basic-jobs", type=int, help="time the basic launcher on this many jobs and scale")
    parser.add_argument("--workdir", type=Path, help="keep the sweeps here (default: a temp dir)")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data")
    parser.add_argument("--docs", type=Path, default=bench.DOCS)
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction)
    parser.add_argument(
        "--only", nargs="+", metavar="WORD", help="run only the workloads whose name holds one of these words"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.jobs = 8
    if args.write_docs is None:
        args.write_docs = not args.smoke and args.device == "cpu" and not args.only
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data_root = args.data_root.resolve()
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="reglab-sweeps-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = bench.child_env(workdir)
    bench.prepare_data(args.data_root)
    started, rows = time.perf_counter(), []
    load_before = os.getloadavg()[0]
    chosen = [w for w in workloads(args) if not args.only or any(word in w.name for word in args.only)]
    for workload in chosen:
        times, stacked_runs = {}, []
        for run, launcher in enumerate(bracketed(workload.launchers)):
            finished = run_sweep(args, workload, launcher, workdir, env, run)
            if launcher == "stacked":
                stacked_runs.append(finished)
            else:
                times[launcher] = finished
            bench.log(
                f"{workload.name:<32} {launcher:<8} {finished.wall_s:7.1f} s "
                f"({finished.jobs} jobs, peak {finished.peak_rss_mb:.0f} MB, "
                f"all processes {finished.peak_tree_mb:.0f} MB)"
            )
        rows += rows_for(workload, times, stacked_runs)
        if workload.name.endswith("l2 grid"):
            rows.append(memory_row(workload, stacked_runs, 2000))
    for number, row in enumerate(rows, 1):
        row.number = str(number)
    context = bench.context_lines(SimpleArgs(args))
    context[0] = context[0].replace(
        "interleaved, medians; ", "one process per sweep, stacked runs before and after every baseline run; "
    )
    context[0] = context[0].replace(
        "training runs use 1 thread",
        "a lone job trains on 1 thread; the stacked launcher trains a stack per core, the launcher's process one of "
        "them and each other one in a process of its own, on 1 thread (hydra.launcher.processes=auto, "
        "trainer.threads=auto)",
    )
    context.append(f"Device: {args.device}; load average before the first sweep: {load_before:.2f}.  ")
    lines = [*context, "", bench.format_table(rows), "", bench.target_summary(rows)]
    bench.log(f"done in {time.perf_counter() - started:.0f} s")
    print("\n".join(lines))
    if args.write_docs:
        write_docs(args.docs, lines)
        bench.log(f"results written into {args.docs}")
    return 0


class SimpleArgs:
    """What bench.context_lines reads."""

    def __init__(self, args):
        self.smoke, self.repeats = args.smoke, 1


if __name__ == "__main__":
    sys.exit(main())
