"""reglab's error types, run statuses and run-only keys, free of heavy imports so the entrypoint can report bad input fast.

Bad input (`ConfigError`, `DatasetUnavailable`, `CheckpointError`) stops a run before training with one line that
says what is wrong and what to do; everything else that goes wrong inside a job is recorded as status `failed`.
"""

from __future__ import annotations

from pathlib import Path

FINISHED = ("completed", "early_stopped")  # statuses whose numbers count (reports average only these)
STATUSES = (*FINISHED, "diverged", "failed", "interrupted")  # interrupted: stopped by a signal, not requeued
# config keys that say how a job runs and what it keeps, not what it trains (logger.* too): the report groups jobs
# across them, and resuming a sweep recognises a job's records whatever they are set to
RUN_ONLY_KEYS = (
    "trainer.resume",
    "trainer.progress",
    "trainer.plots",
    "trainer.save_weights",
    "trainer.on_error",
    "trainer.checkpoint_every",
    "dataset.root",
    "dataset.download",
)


def override_key(override: str) -> str:
    """`+a.b=1` -> `a.b`; `~a.b` -> `a.b`; `regularizer=[l2,dropout]` -> `regularizer`."""
    return override.lstrip("+~").split("=", 1)[0]


def run_only(key: str) -> bool:
    """Whether an override's key (or config group) only says how a job runs: RUN_ONLY_KEYS and the logger's."""
    return key in RUN_ONLY_KEYS or key == "logger" or key.startswith("logger.")


class ConfigError(ValueError):
    """A config value that reglab cannot run with; raised before any training starts."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, not reglab's, or made for another model or optimizer."""


EXPECTED_FILES = {
    "mnist": "MNIST/raw/train-images-idx3-ubyte (and the other three IDX files)",
    "fashion_mnist": "FashionMNIST/raw/train-images-idx3-ubyte (and the other three IDX files)",
    "cifar10": "cifar-10-batches-py/data_batch_1..5 and test_batch",
}


class DatasetUnavailable(RuntimeError):
    """The files of a torchvision data set are missing and could not be downloaded."""

    def __init__(self, name: str, root: Path, download: bool, cause: Exception):
        where = Path(root).resolve() / EXPECTED_FILES[name]
        how = "the download failed" if download else "dataset.download=false"
        super().__init__(
            f"dataset={name}: files not found and {how} ({type(cause).__name__}: {cause}). "
            f"Put the files at {where}, or set dataset.root to the folder that holds them."
        )


BAD_INPUT = (ConfigError, DatasetUnavailable, CheckpointError)
