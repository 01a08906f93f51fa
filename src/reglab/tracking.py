"""The record of a run: metrics.jsonl and summary.json on disk, mirrored to Weights & Biases when it is on.

The files on disk are the source of truth (the sweep report reads only them); W&B is a mirror that must never fail
or block a run. W&B starts online only with credentials, otherwise offline into the run directory; its start-up
is bounded, and if it cannot start the run goes on without it and says so.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import tempfile
from pathlib import Path

import torch


def write_atomic(path: Path, write) -> None:
    """Write to a temporary file, flush it to disk, then rename over `path`: a crash mid-write never leaves a
    truncated file, and the previous version (a checkpoint, a summary) survives any failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2, default=_json_default).encode()))


def write_summary(run_dir: Path, summary: dict, wandb_run=None) -> None:
    """summary.json (NaN/inf stored as null, as JSON has neither), mirrored into the W&B run summary."""
    write_json_atomic(Path(run_dir) / "summary.json", {k: _finite_or_none(v) for k, v in summary.items()})
    if wandb_run is not None:
        try:
            wandb_run.summary.update({k: v for k, v in summary.items() if v is not None})
        except (
            Exception
        ) as err:  # W&B may already be broken when a job fails; the file on disk is what counts
            print(f"[reglab] W&B summary update failed: {type(err).__name__}: {err}")


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _finite_or_none(value):
    """JSON has no NaN/inf: store them as null (a diverged run's loss)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RunRecord:
    """Appends per-epoch metrics to metrics.jsonl (and W&B), writes summary.json at the end."""

    def __init__(self, run_dir: Path, wandb_run=None, log_images: bool = True):
        self.run_dir = Path(run_dir)
        self.wandb_run = wandb_run
        self.upload_images = log_images
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in finish)

    def log_epoch(self, metrics: dict[str, float]) -> None:
        clean = {k: _finite_or_none(v) for k, v in metrics.items()}
        self._metrics_file.write(json.dumps(clean) + "\n")
        self._metrics_file.flush()
        # the epoch is W&B's step: after a crash and a resume from an earlier checkpoint, W&B drops the epochs it
        # already holds (their values are the same, resume being exact) instead of holding them twice
        self._to_wandb(lambda run: run.log(metrics, step=int(metrics["epoch"])))

    def _to_wandb(self, send) -> None:
        """Mirror to W&B; if W&B breaks mid-run, say so once and go on with the files on disk alone."""
        if self.wandb_run is None:
            return
        try:
            send(self.wandb_run)
        except Exception as err:
            print(f"[reglab] W&B stopped working ({type(err).__name__}: {err}); going on without it")
            self.wandb_run = None

    def write_summary(self, summary: dict) -> None:
        write_summary(self.run_dir, summary, self.wandb_run)

    def log_images(self, paths: list[Path]) -> None:
        if self.wandb_run is None or not paths or not self.upload_images:
            return
        import wandb

        self._to_wandb(lambda run: run.log({f"plots/{Path(p).stem}": wandb.Image(str(p)) for p in paths}))

    def finish(self, failed: bool = False) -> None:
        self._metrics_file.close()
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            try:
                run.finish(exit_code=1 if failed else 0)
            except (
                Exception
            ) as err:  # a W&B problem at the very end must not turn a finished run into a failure
                print(
                    f"[reglab] W&B finish failed ({type(err).__name__}: {err}); the files on disk are complete"
                )


def has_wandb_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """auto -> WANDB_MODE if set, else online with credentials, offline without (never a login prompt)."""
    if mode == "auto":
        legacy = {"dryrun": "offline", "run": "online"}  # older spellings W&B still reads from WANDB_MODE
        from_env = os.environ.get("WANDB_MODE", "")
        return legacy.get(from_env, from_env) or ("online" if has_wandb_credentials() else "offline")
    return mode


def start_wandb(logger_cfg, *, run_dir, name, group, job_type, config, tags, resume_id=None):
    """Start a W&B run, or return None (logger off, W&B disabled, or W&B could not start)."""
    if logger_cfg is None or logger_cfg.get("name") != "wandb":
        return None
    wcfg = logger_cfg["wandb"]
    mode = resolve_wandb_mode(wcfg["mode"])
    if mode == "disabled":
        return None
    if mode == "online" and not has_wandb_credentials():
        print("[reglab] W&B online was asked for but no credentials are set (wandb login): logging offline")
        mode = "offline"  # never a login prompt
    try:
        import wandb
    except ImportError:
        print("[reglab] wandb is not installed: going on without W&B")
        return None
    kwargs = dict(
        project=wcfg["project"],
        entity=wcfg["entity"],
        name=name,
        group=group,
        job_type=job_type,
        tags=sorted(set(tags) | set(wcfg["tags"])),
        config=config,
        dir=str(run_dir),
        id=resume_id,
        resume="allow" if resume_id else None,
        # a stack logs K runs from one process at once: each init makes a new run and leaves the others alone
        reinit="create_new",
    )
    for attempt_mode in [mode, "offline"] if mode == "online" else [mode]:
        try:
            settings = wandb.Settings(init_timeout=float(wcfg["init_timeout"]), console="off", silent=True)
            run = wandb.init(mode=attempt_mode, settings=settings, **kwargs)
            run.define_metric("*", step_metric="epoch")
            if attempt_mode != mode:
                print(
                    f"[reglab] W&B could not start online; logging offline into {run_dir}/wandb (make wandb-sync)"
                )
            return run
        except (
            Exception
        ) as err:  # W&B raises many types (UsageError, CommError, timeouts): none may stop the run
            print(
                f"[reglab] W&B {attempt_mode} start failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            )
    print("[reglab] going on without W&B; metrics.jsonl and summary.json are complete")
    return None
