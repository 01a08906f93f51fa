"""One prepared check for a machine with a GPU: does reglab run there, and how many samples/s does it train?

    python benchmarks/gpu_check.py                 # on a CUDA machine: fp32, bf16 and torch.compile, MLP and CNN
    python benchmarks/gpu_check.py --device cpu --epochs 2   # the same script on the CPU (what the tests run)

Each case is a real `train.py` run (`trainer.device=...`, `logger=none`); samples/s = training samples x epochs /
the run's `train_time_s` (the batch loops alone). It prints one table and, with --json, writes the rows there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name: overrides
    "mlp fp32": [],
    "mlp bf16": ["trainer.precision=bf16"],
    "mlp compiled": ["trainer.compile=true"],
    "cnn1d fp32": ["model=cnn1d"],
    "cnn1d bf16 compiled": ["model=cnn1d", "trainer.precision=bf16", "trainer.compile=true"],
    "mlp dropout+l2+label smoothing": ["regularizer=[dropout,l2,label_smoothing]"],
}


def run_case(
    name: str, overrides: list[str], device: str, epochs: int, workdir: Path, data_root: Path
) -> dict:
    run_dir = workdir / name.replace(" ", "_").replace("+", "_")
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "logger=none",
        "trainer.plots=false",
        f"trainer.device={device}",
        f"trainer.epochs={epochs}",
        f"hydra.run.dir={run_dir}",
        f"dataset.root={data_root}",
        *overrides,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        return {"case": name, "status": f"failed: {result.stderr.strip().splitlines()[-1][:120]}"}
    summary = json.loads((run_dir / "summary.json").read_text())
    samples = len_train(summary) * summary["epochs_run"]
    return {
        "case": name,
        "status": summary["status"],
        "device": summary["device"],
        "samples_per_s": round(samples / summary["train_time_s"]),
        "train_time_s": summary["train_time_s"],
        "test_acc": round(summary["test/acc"], 4),
    }


def len_train(summary: dict) -> int:
    return summary["hparams"]["dataset.n_train"] or 3200  # MNIST-1D: 4000 minus the 800 held out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu", "auto"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data", help="where MNIST-1D is cached")
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES)
    )
    args = parser.parse_args(argv)
    chosen = args.cases.split(",")
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            run_case(name, CASES[name], args.device, args.epochs, Path(tmp), args.data_root.resolve())
            for name in chosen
        ]
    print("| case | status | device | samples/s | train time (s) | test acc |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['status']} | {r.get('device', '-')} | {r.get('samples_per_s', '-')} | "
            f"{r.get('train_time_s', '-')} | {r.get('test_acc', '-')} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["status"] in ("completed", "early_stopped") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
