"""Data sets as in-memory tensors, split into train / validation / test.

Every data set comes back as a `DataSplits`: float inputs shaped (N, C, *spatial) and int64 labels, small enough to
live on the training device, so the loop draws batches by `randperm` indexing instead of a DataLoader (measured
~15% faster here, and no worker processes). `n_train` and `label_noise` apply to every set the same way, after the
split, and only to the training part: validation and test labels stay clean.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reglab.errors import ConfigError, DatasetUnavailable

DATASETS = ("mnist1d", "digits", "mnist", "fashion_mnist", "cifar10")
TORCHVISION_SETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


@dataclass
class DataSplits:
    """Train / validation / test tensors of one data set. For a stack of K members, `y_train` is [K, N]: the inputs
    are shared, the training labels are each member's own (they differ under `dataset.label_noise`)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, channels first: (C, L) for signals, (C, H, W) for images."""
        return tuple(self.x_train.shape[1:])

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.x_test, self.y_test

    def splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Each split's inputs and labels (a stack's training labels are [K, N])."""
        return {"train": (self.x_train, self.y_train), "val": (self.x_val, self.y_val), "test": self.test}

    def to(self, device: torch.device, keep_train_on_host: bool = False) -> DataSplits:
        """Move the splits to the training device (the training split stays on the host for a DataLoader)."""
        host = ("x_train", "y_train") if keep_train_on_host else ()
        moved = {
            k: v.to(device) if isinstance(v, Tensor) and k not in host else v for k, v in vars(self).items()
        }
        return DataSplits(**moved)


def load_stack_data(nodes: list) -> DataSplits:
    """The splits for a stack: one `dataset` config node per member, alike but for `label_noise`."""
    loaded = {}
    for node in nodes:
        key = node["label_noise"]
        if key not in loaded:
            loaded[key] = load_dataset(node)
    first = loaded[nodes[0]["label_noise"]]
    y_train = torch.stack([loaded[node["label_noise"]].y_train for node in nodes])
    return DataSplits(**{**vars(first), "y_train": y_train})


def mnist1d_config(root, **changes) -> dict:
    """The `dataset=mnist1d` settings as a plain mapping, for scripts and tests that load data without Hydra."""
    defaults = {
        "name": "mnist1d",
        "root": str(root),
        "val_fraction": 0.2,
        "split_seed": 0,
        "n_train": None,
        "label_noise": 0.0,
        "augment": False,
    }
    return {**defaults, **changes}


def load_dataset(cfg) -> DataSplits:
    """Build the splits that `cfg` (the `dataset` config node) describes."""
    if cfg["name"] == "mnist1d":
        x, y, x_test, y_test = _mnist1d_arrays(Path(cfg["root"]))
    elif cfg["name"] == "digits":
        x, y, x_test, y_test = _digits_arrays(cfg["test_fraction"], cfg["split_seed"])
    elif cfg["name"] in TORCHVISION_SETS:
        x, y, x_test, y_test = _torchvision_arrays(cfg["name"], Path(cfg["root"]), cfg["download"])
    else:
        raise ConfigError("dataset.name", cfg["name"], f"one of {', '.join(DATASETS)}")
    num_classes = int(max(y.max(), y_test.max())) + 1
    rng = np.random.default_rng(cfg["split_seed"])
    train_idx, val_idx = _split_indices(len(y), cfg["val_fraction"], rng)
    if cfg["n_train"] is not None:
        if cfg["n_train"] > len(train_idx):
            raise ConfigError(
                "dataset.n_train", cfg["n_train"], f"at most {len(train_idx)} for {cfg['name']}"
            )
        train_idx = train_idx[: cfg["n_train"]]
    y_train = _with_label_noise(y[train_idx], cfg["label_noise"], num_classes, rng)
    if cfg["name"] in TORCHVISION_SETS:  # standardize each channel with the training split's statistics only
        train_pixels = x[train_idx]
        mean, std = (
            train_pixels.mean(axis=(0, 2, 3), keepdims=True),
            train_pixels.std(axis=(0, 2, 3), keepdims=True),
        )
        x, x_test = (x - mean) / std, (x_test - mean) / std
    return DataSplits(
        name=cfg["name"],
        x_train=torch.as_tensor(x[train_idx], dtype=torch.float32),
        y_train=torch.as_tensor(y_train, dtype=torch.int64),
        x_val=torch.as_tensor(x[val_idx], dtype=torch.float32),
        y_val=torch.as_tensor(y[val_idx], dtype=torch.int64),
        x_test=torch.as_tensor(x_test, dtype=torch.float32),
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
        num_classes=num_classes,
    )


def _split_indices(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


def _with_label_noise(
    y: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Replace a `fraction` of the labels by uniformly random classes (which may equal the true one)."""
    y = y.copy()
    n_noisy = int(round(len(y) * fraction))
    noisy = rng.choice(len(y), size=n_noisy, replace=False)
    y[noisy] = rng.integers(0, num_classes, size=n_noisy)
    return y


def shift_and_flip(x: Tensor, generator: torch.Generator, max_shift: int = 4) -> Tensor:
    """Standard image augmentation on a batch (N, C, H, W), on its own device: every image is translated by up to
    `max_shift` pixels in each direction (zero padding, as in a padded random crop) and mirrored with probability
    1/2. The random draws come from `generator` (on the host), so runs stay reproducible and resumable."""
    n, channels, height, width = x.shape
    shifts = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
    mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (max_shift, max_shift, max_shift, max_shift))
    rows = (shifts[0, :, None] + torch.arange(height, device=x.device))[:, None, :, None]
    cols = (shifts[1, :, None] + torch.arange(width, device=x.device))[:, None, None, :]
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    crops = padded[samples, torch.arange(channels, device=x.device)[None, :, None, None], rows, cols]
    return torch.where(mirror[:, None, None, None], crops.flip(-1), crops)


# ---------------------------------------------------------------------------------------------------------------------
# MNIST-1D: generated with the package's own generator (never its downloader), cached as .npz.


def _mnist1d_arrays(root: Path):
    cache = root / "mnist1d.npz"
    if not cache.exists():
        arrays = _generate_mnist1d()
        _atomic_savez(cache, **arrays)
    with np.load(cache) as d:
        return d["x"][:, None, :], d["y"], d["x_test"][:, None, :], d["y_test"]


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """The official MNIST-1D arrays (seed 42; identical to the published pickle), made offline in ~1.5 s."""
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds python's and numpy's global generators: keep the caller's state intact.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {"x": d["x"], "y": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}


def _atomic_savez(path: Path, **arrays) -> None:
    """Write then rename, so that parallel jobs never read a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# scikit-learn's 8x8 digits: bundled with the package, no download.


def _digits_arrays(test_fraction: float, seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]  # pixel values are 0..16
    order = np.random.default_rng(seed + 1).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, rest = order[:n_test], order[n_test:]
    return x[rest], d.target[rest], x[test], d.target[test]


# ---------------------------------------------------------------------------------------------------------------------
# torchvision sets: read (or downloaded) into `root` in torchvision's own on-disk format, then kept in memory.


def _torchvision_arrays(name: str, root: Path, download: bool):
    from torchvision import datasets

    cls = getattr(datasets, TORCHVISION_SETS[name])
    try:
        # stacks side by side load the same set at once: one process downloads, the others wait and then read it
        with _exclusive(root / ".reglab-download.lock") if download else contextlib.nullcontext():
            train = cls(root=str(root), train=True, download=download)
            test = cls(root=str(root), train=False, download=download)
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError... depending on what failed
        raise DatasetUnavailable(name, root, download, err) from err
    return (*_torchvision_tensors(train), *_torchvision_tensors(test))


@contextlib.contextmanager
def _exclusive(lock_file: Path):
    """Hold an exclusive lock on `lock_file` (created if need be) while the block runs."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _torchvision_tensors(ds) -> tuple[np.ndarray, np.ndarray]:
    data = ds.data.numpy() if isinstance(ds.data, Tensor) else np.asarray(ds.data)
    x = data.astype(np.float32) / 255.0
    x = x[:, None, :, :] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # grey (N,H,W) or colour (N,H,W,C)
    return x, np.asarray(ds.targets, dtype=np.int64)
