"""Data sets: splits, subsampling, label noise, the torchvision formats on tiny fixture files, augmentation."""

from __future__ import annotations

import pickle
import random
import struct

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from reglab.data import DatasetUnavailable, load_dataset, shift_and_flip


def dataset_cfg(name="mnist1d", root="data", **overrides):
    base = {
        "name": name,
        "root": str(root),
        "val_fraction": 0.2,
        "split_seed": 0,
        "n_train": None,
        "label_noise": 0.0,
        "test_fraction": 0.2,
        "download": False,
        "augment": False,
    }
    return OmegaConf.create({**base, **overrides})


def test_mnist1d_splits_are_the_official_sizes_and_fixed(data_root):
    data = load_dataset(dataset_cfg(root=data_root))
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (3200, 800, 1000)
    assert data.input_shape == (1, 40) and data.num_classes == 10
    again = load_dataset(dataset_cfg(root=data_root))
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_val, again.y_val)


def test_generation_leaves_the_global_random_state_alone(tmp_path):
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    load_dataset(dataset_cfg(root=tmp_path))  # generates (mnist1d's generator reseeds both globals)
    assert (random.random(), np.random.rand()) == expected
    assert (tmp_path / "mnist1d.npz").exists()


def test_n_train_subsamples_and_label_noise_only_touches_training_labels(data_root):
    clean = load_dataset(dataset_cfg(root=data_root, n_train=500))
    noisy = load_dataset(dataset_cfg(root=data_root, n_train=500, label_noise=1.0))
    assert len(clean.y_train) == 500
    assert torch.equal(clean.x_train, noisy.x_train)
    changed = (clean.y_train != noisy.y_train).float().mean().item()
    assert 0.85 < changed < 0.95  # random labels keep the true class by chance 1 time in 10
    assert torch.equal(clean.y_val, noisy.y_val) and torch.equal(clean.y_test, noisy.y_test)
    half = load_dataset(dataset_cfg(root=data_root, label_noise=0.5))
    full = load_dataset(dataset_cfg(root=data_root))
    assert 0.40 < (half.y_train != full.y_train).float().mean().item() < 0.50


def test_digits_come_from_scikit_learn():
    data = load_dataset(dataset_cfg("digits"))
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 1797


def write_idx(path, array: np.ndarray) -> None:
    """The IDX format MNIST ships in: magic (0x08 = uint8, then ndim), big-endian dims, raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_style_sets_read_torchvision_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("t10k", 20)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    data = load_dataset(dataset_cfg(name, tmp_path, val_fraction=0.1))
    assert data.input_shape == (1, 28, 28) and (len(data.y_train), len(data.y_val)) == (45, 5)
    assert len(data.y_test) == 20 and data.num_classes == 10
    assert abs(data.x_train.mean().item()) < 0.2  # normalized with the training set's statistics


def test_cifar10_reads_torchvision_batches(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    # torchvision checks the md5 of every file even without downloading: expect None (= only that it exists)
    monkeypatch.setattr(CIFAR10, "train_list", [[name, None] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[name, None] for name, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": None})
    data = load_dataset(dataset_cfg("cifar10", tmp_path, val_fraction=0.1))
    assert (
        data.input_shape == (3, 32, 32)
        and len(data.y_train) + len(data.y_val) == 50
        and len(data.y_test) == 10
    )


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset(dataset_cfg("mnist", tmp_path))
    message = str(info.value)
    assert "dataset=mnist" in message and str(tmp_path / "MNIST" / "raw") in message and "download" in message


def test_shift_and_flip_moves_a_single_pixel_as_drawn():
    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 3, 3] = 1.0
    out = shift_and_flip(x, torch.Generator().manual_seed(0), max_shift=2)
    generator = torch.Generator().manual_seed(0)  # replay the draws
    shifts = torch.randint(0, 5, (2, 64), generator=generator)
    mirror = torch.rand(64, generator=generator) < 0.5
    for i in range(64):
        row, col = 3 - (shifts[0, i].item() - 2), 3 - (shifts[1, i].item() - 2)
        if mirror[i]:
            col = 7 - col
        expected = torch.zeros(8, 8)
        expected[row, col] = 1.0
        assert torch.equal(out[i, 0], expected), i
    assert out.sum() == 64  # a shift of at most 2 never pushes the pixel at (3, 3) out of the image
