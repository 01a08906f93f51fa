"""Label smoothing from scratch vs F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from reglab.regularizers.label_smoothing import label_smoothing_cross_entropy, smooth_targets

EPSILONS = [0.0, 0.1, 0.3, 1.0]
REDUCTIONS = ["mean", "sum", "none"]


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits_and_targets(n: int = 32, classes: int = 7, *extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator()
    logits = 3 * torch.randn(n, classes, *extra, generator=g, dtype=torch.float64)
    return logits, torch.randint(0, classes, (n, *extra), generator=g)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", EPSILONS)
def test_uniform_equals_torch_label_smoothing(eps, reduction):
    logits, target = _logits_and_targets()
    scratch_logits = logits.clone().requires_grad_()
    torch_logits = logits.clone().requires_grad_()
    scratch = label_smoothing_cross_entropy(scratch_logits, target, eps, reduction=reduction)
    builtin = F.cross_entropy(torch_logits, target, label_smoothing=eps, reduction=reduction)
    torch.testing.assert_close(scratch, builtin)
    scratch.sum().backward()
    builtin.sum().backward()
    torch.testing.assert_close(scratch_logits.grad, torch_logits.grad)


def test_zero_eps_is_plain_cross_entropy():
    logits, target = _logits_and_targets()
    for variant in ("uniform", "off_target"):
        torch.testing.assert_close(
            label_smoothing_cross_entropy(logits, target, 0.0, variant), F.cross_entropy(logits, target)
        )


def test_extra_dimensions_like_torch():
    logits, target = _logits_and_targets(4, 5, 6)  # (N, K, L), e.g. per-position classification
    torch.testing.assert_close(
        label_smoothing_cross_entropy(logits, target, 0.2),
        F.cross_entropy(logits, target, label_smoothing=0.2),
    )


def test_off_target_reproduces_the_classic_targets():
    q = smooth_targets(torch.tensor([0, 2]), num_classes=3, eps=0.1, variant="off_target")
    torch.testing.assert_close(q, torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]]))


def test_uniform_targets():
    q = smooth_targets(torch.tensor([1]), num_classes=4, eps=0.2)
    torch.testing.assert_close(q, torch.tensor([[0.05, 0.85, 0.05, 0.05]]))  # 1 - ε + ε/K on the true class


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", ["uniform", "off_target"])
def test_closed_form_equals_soft_target_cross_entropy(variant, reduction):
    logits, target = _logits_and_targets()
    q = smooth_targets(target, logits.shape[1], 0.25, variant).double()
    scratch = label_smoothing_cross_entropy(logits, target, 0.25, variant, reduction)
    # F.cross_entropy with a probability matrix as target computes -Σ_k q_k log p_k: an independent check.
    torch.testing.assert_close(scratch, F.cross_entropy(logits, q, reduction=reduction))
    per_sample = -(q * torch.log_softmax(logits, dim=1)).sum(dim=1)
    torch.testing.assert_close(
        label_smoothing_cross_entropy(logits, target, 0.25, variant, "none"), per_sample
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": 1.5}, "eps=1.5"),
        ({"eps": -0.1}, "eps=-0.1"),
        ({"eps": 0.1, "variant": "gaussian"}, "variant='gaussian'.*allowed values"),
        ({"eps": 0.1, "reduction": "avg"}, "reduction='avg'.*allowed values"),
    ],
)
def test_invalid_arguments(kwargs, message):
    logits, target = _logits_and_targets()
    with pytest.raises(ValueError, match=message):
        label_smoothing_cross_entropy(logits, target, **kwargs)


def test_off_target_needs_two_classes():
    with pytest.raises(ValueError, match="num_classes=1"):
        smooth_targets(torch.tensor([0]), 1, 0.1, "off_target")


@pytest.mark.parametrize("variant", ["uniform", "off_target"])
def test_the_training_path_equals_the_closed_form_and_the_builtin(variant):
    """What training computes for scratch label smoothing (the `batch` hook smooths the targets, the loss is the
    soft-target cross-entropy), for two members of a stack, against the closed form and F.cross_entropy."""
    from reglab.regularizers import build_regularization
    from reglab.regularizers.base import Targets

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 16, 5, generator=generator)
    labels = torch.randint(0, 5, (2, 16), generator=generator)
    regs = build_regularization(
        [{"label_smoothing": {"eps": 0.2, "variant": variant, "impl": "scratch"}}, {}]
    )
    targets = Targets(labels, 5)
    regs.batch(logits, targets)
    loss = regs.data_loss(logits, targets)
    closed_form = label_smoothing_cross_entropy(logits[0], labels[0], 0.2, variant)
    torch.testing.assert_close(loss[0], closed_form)
    if variant == "uniform":
        torch.testing.assert_close(loss[0], F.cross_entropy(logits[0], labels[0], label_smoothing=0.2))
    # the member without it: untouched, its lone run's plain cross-entropy
    assert torch.equal(loss[1], Targets(labels[1:], 5).cross_entropy(logits[1:])[0])
    torch.testing.assert_close(loss[1], F.cross_entropy(logits[1], labels[1]))
