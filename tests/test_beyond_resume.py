"""SWA, EMA, SAM, spectral norm and coupled L2 keep their state in checkpoints: an interrupted, resumed run ends exactly like an
uninterrupted one (the averages, counts, u and v, and SAM's replayed dropout noise)."""

from __future__ import annotations

import pytest

import reglab.loop
from reglab.loop import Job, train
from reglab.preemption import Interrupted
from tests.conftest import read_metrics, read_summary
from tests.test_loop import config

QUICK = [
    "trainer.epochs=4",
    "dataset.n_train=300",
    "trainer.save_weights=false",
    "trainer.checkpoint_every=0",
]
TECHNIQUES = {
    "swa_sam_spectral_norm": [
        "regularizer=[swa,sam,spectral_norm,dropout]",
        "regularizer.swa.start_epoch=2",
        "regularizer.swa.lr=0.003",
        "regularizer.swa.anneal_epochs=2",
        "regularizer.dropout.p=0.3",
    ],
    "ema": ["regularizer=ema", "regularizer.ema.decay=0.9"],
    # coupled decay acts on blocks of its own (models.member_block): Adam's state must still come back
    "l2_coupled": ["regularizer=l2", "regularizer.l2.weight_decay=0.01"],
}


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_an_interrupted_run_resumes_exactly(tmp_path, data_root, monkeypatch, name):
    cfg = config(data_root, *QUICK, *TECHNIQUES[name])
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir(), interrupted.mkdir()
    train(cfg, straight, Job())

    epoch = reglab.loop.train_one_epoch

    def stop_after_two_epochs(model, batches, optimizer, regs, precision, stack, lrs):
        losses = epoch(model, batches, optimizer, regs, precision, stack, lrs)
        if stack.members[0].epoch == 1:  # in the second epoch: checkpoint and stop at its end, as on SIGTERM
            stack.stop_requested = "SIGTERM"
        return losses

    monkeypatch.setattr(reglab.loop, "train_one_epoch", stop_after_two_epochs)
    with pytest.raises(Interrupted):
        train(cfg, interrupted, Job())
    monkeypatch.setattr(reglab.loop, "train_one_epoch", epoch)
    assert len(read_metrics(interrupted)) == 2
    train(config(data_root, *QUICK, *TECHNIQUES[name], "trainer.resume=true"), interrupted, Job())
    assert without_time(read_metrics(interrupted)) == without_time(read_metrics(straight))
    resumed, reference = read_summary(interrupted), read_summary(straight)
    for key in ("test/acc", "test/loss", "test/last_loss", "val/loss", "weights/l2", "sharpness"):
        if key in reference:
            assert resumed[key] == reference[key], key
