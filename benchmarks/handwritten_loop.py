"""The baseline of `make bench`: reglab's default experiment written as a plain PyTorch script.

This is the loop a typical user writes, with PyTorch's defaults: a `DataLoader` over a `TensorDataset`
(shuffled, batch 100), `torch.optim.Adam(lr=1e-2)` (no fused kernel, denormals not flushed), a validation pass
after every epoch and one test evaluation at the end. It trains the same network (MLP 40-100-100-10) on the same
MNIST-1D train/validation/test split as `python train.py` (loaded through reglab's data module, so the arrays are
identical), for the same 150 epochs, on one CPU thread (what reglab's default `trainer.threads=auto` gives a lone run).

It prints one JSON line, with its timings defined exactly like reglab's:
    train_time_s  the training steps only (summed over epochs, evaluation excluded) = summary.json train_time_s
    loop_time_s   from the start of the first epoch to the end of the last, per-epoch validation included
    after_first_epoch_s  from the end of epoch 1 to the end of the last epoch, per-epoch validation included
                  = the difference of the last and the first `time_s` in reglab's metrics.jsonl
    test_acc      accuracy on the 1000 test signals after the last epoch

    python benchmarks/handwritten_loop.py --seed 0 --epochs 150 --data-root data
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reglab.data import load_dataset, mnist1d_config

# ---------------------------------------------------------------------------------------------------------------------
# Settings (reglab's defaults, written out)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--epochs", type=int, default=150)  # 150 epochs x 32 steps ~ the reference's 6000 steps
parser.add_argument("--data-root", default="data")  # where reglab caches mnist1d.npz
args = parser.parse_args()

batch_size = 100  # the MNIST-1D reference MLP's batch size
lr = 1e-2  # the MNIST-1D reference learning rate
torch.set_num_threads(1)  # the thread count reglab uses by default
torch.manual_seed(args.seed)

# ---------------------------------------------------------------------------------------------------------------------
# Data: the same 3200 / 800 / 1000 split that reglab's dataset=mnist1d gives

data = load_dataset(mnist1d_config(args.data_root))
train_loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=batch_size, shuffle=True)
val_loader = DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=1000)
test_loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=1000)

# ---------------------------------------------------------------------------------------------------------------------
# Model and optimizer

model = nn.Sequential(
    nn.Flatten(),
    nn.Linear(40, 100),
    nn.ReLU(),
    nn.Linear(100, 100),
    nn.ReLU(),
    nn.Linear(100, 10),
)
optimizer = torch.optim.Adam(model.parameters(), lr=lr)


def evaluate(loader: DataLoader) -> tuple[float, float]:
    """Mean loss and accuracy over a loader, in eval mode without gradients."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            count += len(y)
    return loss_sum / count, correct / count


# ---------------------------------------------------------------------------------------------------------------------
# Training

train_time_s = 0.0
loop_started = time.perf_counter()
for epoch in range(1, args.epochs + 1):
    model.train()
    epoch_started = time.perf_counter()
    running_loss = 0.0
    for x, y in train_loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
    train_time_s += time.perf_counter() - epoch_started
    val_loss, val_acc = evaluate(val_loader)
    if epoch == 1:
        first_epoch_done = time.perf_counter()
loop_ended = time.perf_counter()
loop_time_s, after_first_epoch_s = loop_ended - loop_started, loop_ended - first_epoch_done

# ---------------------------------------------------------------------------------------------------------------------
# Test evaluation and the record

test_loss, test_acc = evaluate(test_loader)
print(
    json.dumps(
        {
            "train_time_s": round(train_time_s, 4),
            "loop_time_s": round(loop_time_s, 4),
            "after_first_epoch_s": round(after_first_epoch_s, 4),
            "train_loss": running_loss / len(train_loader),
            "val_acc": val_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
        }
    )
)
