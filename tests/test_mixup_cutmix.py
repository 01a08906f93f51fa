"""Mixup and cutmix: scratch equals torchvision's MixUp/CutMix on the same draws; the composable targets (label
smoothing, then mixing) and their loss; bad values; clean train metrics; exact resume."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from reglab import reproduce
from reglab.errors import ConfigError
from reglab.loop import Job, train
from reglab.preemption import Interrupted
from reglab.regularizers import build_regularization
from reglab.regularizers.base import Targets, soft_cross_entropy
from reglab.regularizers.cutmix import cutmix, draw_box
from reglab.regularizers.mixup import as_images, draw_lambda, drawing_from, mixup, previous_sample
from reglab.schema import validate
from reglab.tracking import RunRecord
from tests.conftest import read_metrics, read_summary
from tests.test_config import composed
from tests.test_loop import config, without_time

CLASSES = 10


def batch(shape: tuple[int, ...], seed: int, soft: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs [B, ...] and targets [B, C]: one-hot, or arbitrary distributions (smoothed, mixed...)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if soft:
        return x, torch.softmax(3 * torch.randn(shape[0], CLASSES, generator=g), -1)
    return x, F.one_hot(torch.randint(CLASSES, (shape[0],), generator=g), CLASSES).float()


def twin_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
@pytest.mark.parametrize("shape", [(16, 1, 40), (16, 3, 8, 12)])
@pytest.mark.parametrize("soft", [False, True])
def test_scratch_mixup_equals_torchvision_on_the_same_draws(alpha, shape, soft):
    for seed in range(5):
        x, q = batch(shape, seed, soft)
        mine, theirs = twin_generators(seed)
        with drawing_from(mine):
            lam = draw_lambda(alpha)
            x_scratch, q_scratch = mixup(x, q, lam, previous_sample(len(x)))
        with drawing_from(theirs):
            x_torch, q_torch = v2.MixUp(alpha=alpha)(as_images(x), q)
        assert torch.equal(x_scratch, x_torch.view_as(x)) and torch.equal(q_scratch, q_torch)
        assert torch.equal(mine.get_state(), theirs.get_state())  # the same draws, no more, no fewer
        # the formula itself: sample i mixed with sample i-1, weights λ and 1-λ
        torch.testing.assert_close(x_scratch[3], lam * x[3] + (1 - lam) * x[2])
        torch.testing.assert_close(q_scratch[0], lam * q[0] + (1 - lam) * q[-1])


@pytest.mark.parametrize("alpha", [0.2, 1.0])
@pytest.mark.parametrize("soft", [False, True])
def test_scratch_cutmix_equals_torchvision_on_images_on_the_same_draws(alpha, soft):
    for seed in range(20):
        x, q = batch((8, 3, 9, 14), seed, soft)
        mine, theirs = twin_generators(seed)
        with drawing_from(mine):
            box, lam = draw_box(draw_lambda(alpha), (9, 14))
            x_scratch, q_scratch = cutmix(x, q, box, lam, previous_sample(len(x)))
        with drawing_from(theirs):
            x_torch, q_torch = v2.CutMix(alpha=alpha)(x, q)
        assert torch.equal(x_scratch, x_torch) and torch.equal(q_scratch, q_torch)
        assert torch.equal(mine.get_state(), theirs.get_state())


def test_the_cutmix_box_covers_about_one_minus_lambda_and_the_targets_follow_its_area():
    g = torch.Generator().manual_seed(0)
    x, q = batch((6, 2, 40), 1, soft=False)
    for lam in (0.1, 0.3, 0.5, 0.9):
        for _ in range(20):
            with drawing_from(g):
                (segment,), kept = draw_box(lam, (40,))
            length = segment.stop - segment.start
            assert kept == 1 - length / 40
            assert length <= 2 * int(0.5 * (1 - lam) * 40)  # a segment of about (1-λ)·L, shorter when clipped
            mixed, q_mixed = cutmix(x, q, (segment,), kept, previous_sample(6))
            inside = torch.zeros(40, dtype=torch.bool)
            inside[segment] = True
            assert torch.equal(mixed[..., inside], x.roll(1, 0)[..., inside])
            assert torch.equal(mixed[..., ~inside], x[..., ~inside])
            torch.testing.assert_close(q_mixed, kept * q + (1 - kept) * q.roll(1, 0))
        # unclipped boxes: 2-D area (2·int(r·H))·(2·int(r·W)) with r = √(1-λ)/2
        with drawing_from(g):
            (rows, cols), kept = draw_box(lam, (64, 64))
        if rows.start > 0 and cols.start > 0 and rows.stop < 64 and cols.stop < 64:
            assert (rows.stop - rows.start) == 2 * int(0.5 * math.sqrt(1 - lam) * 64)


def losses(targets: Targets, logits: torch.Tensor) -> list[torch.Tensor]:
    return list(targets.cross_entropy(logits).unbind())


def test_untouched_targets_keep_the_plain_cross_entropy_and_builtin_smoothing_its_call():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 32, CLASSES, generator=g), torch.randint(CLASSES, (3, 32), generator=g)
    targets = Targets(labels, CLASSES)
    plain = targets.cross_entropy(logits)
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(3, 32).mean(1)
    torch.testing.assert_close(plain, reference, rtol=1e-6, atol=0)
    alone = [Targets(labels[k : k + 1], CLASSES).cross_entropy(logits[k : k + 1])[0] for k in range(3)]
    assert all(torch.equal(plain[k], alone[k]) for k in range(3))  # a member's loss is that of its lone run
    targets.smooth_in_loss(1, 0.1)
    result = losses(targets, logits)
    assert torch.equal(result[0], plain[0]) and torch.equal(result[2], plain[2])
    assert torch.equal(result[1], F.cross_entropy(logits[1], labels[1], label_smoothing=0.1))


def test_soft_cross_entropy_against_one_hot_is_cross_entropy_and_against_smoothed_is_label_smoothing():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(64, CLASSES, generator=g), torch.randint(CLASSES, (64,), generator=g)
    onehot = F.one_hot(labels, CLASSES).float()
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), F.cross_entropy(logits, labels))
    smoothed = 0.9 * onehot + 0.1 / CLASSES
    torch.testing.assert_close(
        soft_cross_entropy(logits, smoothed), F.cross_entropy(logits, labels, label_smoothing=0.1)
    )


def regularization(*nodes: dict, seeds=None):
    return build_regularization(list(nodes), seeds or [0] * len(nodes))


@pytest.mark.parametrize("technique", ["mixup", "cutmix"])
def test_label_smoothing_then_mixing_in_both_implementations(technique):
    """Member 0 smooths in scratch then mixes; member 1 mixes and leaves ε to F.cross_entropy (impl=torch); member
    2 uses neither. Both smoothed members train against the same targets: smoothing commutes with a convex mix."""
    g = torch.Generator().manual_seed(2)
    x, labels = torch.randn(3, 16, 1, 40, generator=g), torch.randint(CLASSES, (3, 16), generator=g)
    labels[1] = labels[0]
    x[1] = x[0]
    logits = torch.randn(3, 16, CLASSES, generator=g)
    logits[1] = logits[0]
    mixing = {technique: {"alpha": 1.0, "impl": "scratch"}}
    regs = regularization(
        {"label_smoothing": {"eps": 0.2, "variant": "uniform", "impl": "scratch"}, **mixing},
        {"label_smoothing": {"eps": 0.2, "variant": "uniform", "impl": "torch"}, **mixing},
        {},
        seeds=[5, 5, 5],
    )
    assert regs.names(0) == ["label_smoothing", technique]  # hook order: smoothing first
    targets = Targets(labels, CLASSES)
    mixed = regs.batch(x, targets)
    assert torch.equal(mixed[0], mixed[1]) and not torch.equal(mixed[0], x[0])
    assert torch.equal(mixed[2], x[2])  # a member without the techniques sees its batch untouched
    expected = (
        targets.distribution(1) * 0.8 + 0.2 / CLASSES
    )  # member 1's mix of one-hot targets, smoothed after
    torch.testing.assert_close(targets.distribution(0), expected)
    loss = regs.data_loss(logits, targets)
    torch.testing.assert_close(loss[0], soft_cross_entropy(logits[0], expected))
    torch.testing.assert_close(loss[1], loss[0])
    assert torch.equal(loss[2], Targets(labels[2:], CLASSES).cross_entropy(logits[2:])[0])  # its plain loss


def test_alpha_zero_leaves_the_member_untouched():
    regs = regularization({"mixup": {"alpha": 0.0, "impl": "scratch"}})
    x, labels = torch.randn(1, 8, 1, 40), torch.randint(CLASSES, (1, 8))
    targets = Targets(labels, CLASSES)
    assert regs.batch(x, targets) is x and not targets.soft


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["regularizer=mixup", "regularizer.mixup.alpha=-0.5"], "regularizer.mixup.alpha"),
        (["regularizer=mixup", "regularizer.mixup.impl=timm"], "regularizer.mixup.impl"),
        (["regularizer=cutmix", "regularizer.cutmix.alpha=nan"], "regularizer.cutmix.alpha"),
        (["regularizer=cutmix", "regularizer.cutmix.impl=torch"], "regularizer.cutmix.impl"),
    ],
)
def test_bad_values_give_one_line_errors(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(composed(*overrides))
    assert err.value.key == key and "\n" not in str(err.value)


def test_cutmix_with_torchvision_is_valid_for_images():
    validate(composed("regularizer=cutmix", "regularizer.cutmix.impl=torch", "dataset=digits", "model=cnn"))


QUICK = ["trainer.epochs=4", "dataset.n_train=300", "trainer.save_weights=true", "trainer.checkpoint_every=0"]
COMPOSED = ["regularizer=[label_smoothing,mixup,cutmix,dropout]", "regularizer.mixup.alpha=0.4"]


def test_train_metrics_are_measured_on_clean_data_and_the_mixed_objective_is_loss_data(tmp_path, data_root):
    from reglab.data import load_dataset
    from reglab.models import Architecture, MemberView, build_model, predict
    from reglab.regularizers.dropout import DropoutPlan

    cfg = config(data_root, *QUICK, "regularizer=mixup", "regularizer.mixup.alpha=1")
    train(cfg, tmp_path, Job())
    data = load_dataset(cfg["dataset"])
    model = build_model(cfg["model"], Architecture(data.input_shape, data.num_classes, [0], [DropoutPlan()]))
    MemberView(model, 0).load_state_dict(torch.load(tmp_path / "last.pt"))
    model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(predict(model, data.x_train, 1)[0], data.y_train).item()
    last = read_metrics(tmp_path)[-1]
    assert last["train/loss"] == pytest.approx(clean, rel=1e-5)
    assert last["loss/data"] > last["train/loss"]  # mixed targets are harder to fit than the clean labels


def test_an_interrupted_run_resumes_exactly(tmp_path, data_root, monkeypatch):
    """The mixing generators are in the checkpoint: stopped after epoch 2 and resumed, the run ends bit for bit
    like an uninterrupted one."""
    cfg = config(data_root, *QUICK, *COMPOSED)
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
    train(cfg, tmp_path / "straight", Job())
    log_epoch = RunRecord.log_epoch

    def stop_after_two(record, metrics):
        log_epoch(record, metrics)
        if metrics["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop checkpoints at the end of the epoch and stops

    monkeypatch.setattr(RunRecord, "log_epoch", stop_after_two)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "resumed", Job())
    monkeypatch.setattr(RunRecord, "log_epoch", log_epoch)
    train(config(data_root, *QUICK, *COMPOSED, "trainer.resume=true"), tmp_path / "resumed", Job())
    assert without_time(read_metrics(tmp_path / "resumed")) == without_time(
        read_metrics(tmp_path / "straight")
    )
    resumed, straight = (
        torch.load(tmp_path / "resumed" / "last.pt"),
        torch.load(tmp_path / "straight" / "last.pt"),
    )
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)
    assert read_summary(tmp_path / "resumed")["test/acc"] == read_summary(tmp_path / "straight")["test/acc"]


def test_the_findings_judge_accuracy_on_the_cnn_and_calibration_over_alpha():
    def job(regularizers, acc, ece, alpha=None):
        hparams = {} if alpha is None else {"regularizer.mixup.alpha": alpha}
        return {"regularizers": regularizers, "hparams": hparams, "test/acc": acc, "test/ece": ece}

    cnn = [job([], 0.90, 0.08), job(["mixup"], 0.94, 0.07), job(["cutmix"], 0.905, 0.2)]
    mlp = [
        job(["mixup"], 0.62, ece, alpha) for alpha, ece in ((0, 0.31), (0.2, 0.12), (0.4, 0.09), (1, 0.05))
    ]
    results = {"mixup_accuracy": cnn, "mixup_calibration": mlp}
    accuracy = reproduce.mixup_accuracy(results)
    assert not accuracy.holds  # cutmix gains only half a point
    assert "α=0.2 62.0" in accuracy.note  # the MLP's accuracies, read from the calibration sweep
    assert reproduce.mixup_accuracy({**results, "mixup_accuracy": [*cnn, job(["cutmix"], 0.93, 0.2)]}).holds
    assert reproduce.mixup_calibration(results).holds
    mlp[2]["test/ece"] = 0.4
    assert not reproduce.mixup_calibration(results).holds


def test_plain_cross_entropy_keeps_its_precision_for_confident_and_shifted_logits():
    """A confident, right model's loss is near 0: computed as logsumexp(z) − z_y it would round at the size of the
    largest logit (the mean's relative error 2e-3 at a shift of 100, 2e-2 at 1000); shifted by the maximum first it
    keeps F.cross_entropy's own float32 precision, in the training loss and in the evaluation's nll alike."""
    from reglab import diagnostics
    from reglab.regularizers.base import cross_entropy

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(CLASSES, (2, 64), generator=g)
    confident = torch.randn(2, 64, CLASSES, generator=g) + 12 * F.one_hot(labels, CLASSES)  # losses ~1e-4

    def relative_error(value, exact):
        return ((value.double() - exact).abs() / exact).max().item()

    for shift in (0.0, 100.0, 1000.0):
        logits = confident + shift
        flat = (logits.flatten(0, 1), labels.flatten())
        exact = F.cross_entropy(flat[0].double(), flat[1], reduction="none").view(2, 64)
        builtin = F.cross_entropy(*flat, reduction="none").view(2, 64)
        ours = cross_entropy(logits, labels)
        assert relative_error(ours, exact) <= 1.5 * relative_error(builtin, exact)
        assert relative_error(ours.mean(1), exact.mean(1)) < 5e-4
        nll = diagnostics.prediction_metrics(logits, labels)["nll"]
        assert relative_error(nll, exact.mean(1)) < 5e-4
