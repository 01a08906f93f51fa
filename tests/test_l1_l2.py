"""L1/L2 penalties, coupled and decoupled weight decay, and proximal L1, checked against torch.optim."""

import pytest
import torch
from torch import nn

from reglab.regularizers.l1_l2 import (
    coupled_weight_decay_,
    decoupled_weight_decay_,
    l1_penalty,
    l1_penalty_torch,
    l2_penalty,
    l2_penalty_torch,
    member_decay_split,
    proximal_l1_,
    proximal_l1_torch_,
)

LAMBDA = 0.1


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tensors() -> list[torch.Tensor]:
    """Parameters of a stack of two members: the first dimension indexes the member."""
    g = _generator()
    return [torch.randn(2, 5, 3, generator=g), torch.randn(2, 7, generator=g), torch.zeros(2, 2, 2)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 8),
        nn.LayerNorm(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator(1)
    return torch.randn(32, 2, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def test_penalties_match_builtin_norms_and_flat_formulas():
    tensors = _tensors()
    torch.testing.assert_close(l1_penalty(tensors), l1_penalty_torch(tensors))
    torch.testing.assert_close(l2_penalty(tensors), l2_penalty_torch(tensors))
    for member in range(2):
        flat = torch.cat([t[member].flatten() for t in tensors])
        torch.testing.assert_close(l1_penalty(tensors)[member], flat.abs().sum())
        torch.testing.assert_close(l2_penalty(tensors)[member], flat.dot(flat))  # Σw², no factor 1/2
    assert l1_penalty([]).item() == 0.0 and l2_penalty_torch([]).item() == 0.0


def test_penalty_gradients_agree():
    for scratch, builtin in ((l1_penalty, l1_penalty_torch), (l2_penalty, l2_penalty_torch)):
        grads = []
        for penalty in (scratch, builtin):
            tensors = [t.requires_grad_() for t in _tensors()]
            penalty(tensors).sum().backward()
            grads.append(torch.cat([t.grad.flatten() for t in tensors]))
        torch.testing.assert_close(grads[0], grads[1])


def decayed_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The weights (ndim >= 2) of a plain module: not its biases, not its norm layers' scales."""
    return [p for p in model.parameters() if p.ndim >= 2]


def _names(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    chosen = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in chosen}


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decayed_parameters(model), "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def test_a_members_decay_split_leaves_out_its_biases_unless_asked():
    from reglab.models import Architecture, build_model
    from reglab.regularizers.dropout import DropoutPlan

    arch = Architecture((1, 6), 3, seeds=[0, 1], dropout=[DropoutPlan(), DropoutPlan()])
    model = build_model({"name": "mlp", "hidden": [4], "activation": "relu"}, arch)
    decayed, kept = member_decay_split(model, 1)
    assert [tuple(p.shape) for p in decayed] == [(4, 6), (3, 4)] and [tuple(p.shape) for p in kept] == [
        (4,),
        (3,),
    ]
    assert torch.equal(decayed[0], model.dense1.weight[1])
    everything, nothing = member_decay_split(model, 1, exclude_bias_and_norm=False)
    assert len(everything) == 4 and nothing == []


def _train(model, optimizer, steps, before_step=lambda: None, penalty=lambda: 0.0):
    x, y = _batch()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + penalty()
        loss.backward()
        before_step()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_half_l2_penalty_equals_sgd_weight_decay():
    reference = _model()
    builtin = _train(reference, torch.optim.SGD(decay_parameter_groups(reference, LAMBDA), lr=0.1), steps=1)
    model = _model()
    params = decayed_parameters(model)
    scratch = _train(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        1,
        penalty=lambda: LAMBDA / 2 * l2_penalty([p.unsqueeze(0) for p in params]).sum(),
    )
    torch.testing.assert_close(scratch, builtin)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        lambda params: torch.optim.Adam(params, lr=0.01),
    ],
)
def test_coupled_decay_equals_builtin_weight_decay(make_optimizer):
    reference = _model()
    # The groups carry weight_decay=λ for decayed parameters; the scratch run's optimizer has none.
    builtin = _train(reference, make_optimizer(decay_parameter_groups(reference, LAMBDA)), steps=5)
    model = _model()
    params = decayed_parameters(model)
    optimizer = make_optimizer(model.parameters())
    scratch = _train(model, optimizer, 5, before_step=lambda: coupled_weight_decay_(params, LAMBDA))
    torch.testing.assert_close(scratch, builtin)


def test_adam_plus_decoupled_decay_equals_adamw():
    lr, steps = 0.01, 10
    reference = _model()
    adamw = _train(reference, torch.optim.AdamW(decay_parameter_groups(reference, LAMBDA), lr=lr), steps)

    model = _model()
    params = decayed_parameters(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    scratch = _train(model, optimizer, steps, before_step=lambda: decoupled_weight_decay_(params, lr, LAMBDA))
    torch.testing.assert_close(scratch, adamw, rtol=1e-6, atol=1e-7)

    coupled_model = _model()
    coupled = _train(
        coupled_model, torch.optim.Adam(decay_parameter_groups(coupled_model, LAMBDA), lr=lr), steps
    )
    assert (coupled - adamw).abs().max() > 1e-4  # L2 inside Adam is not weight decay


@pytest.mark.parametrize("decoupled", [True, False])
def test_excluded_parameters_are_not_decayed(decoupled):
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = decayed_parameters(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no data gradient: any change comes from decay alone
    for _ in range(3):
        if decoupled:
            decoupled_weight_decay_(params, lr=0.1, weight_decay=LAMBDA)
        else:
            coupled_weight_decay_(params, LAMBDA)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad.zero_()
    decayed = _names(model, params)
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * LAMBDA) ** 3 if name in decayed else before[name]
        torch.testing.assert_close(p.detach(), expected)
        assert (name in decayed) != torch.equal(p.detach(), before[name])


def test_proximal_l1_scratch_equals_softshrink_exactly():
    g = _generator()
    values = torch.cat([torch.randn(1000, generator=g), torch.tensor([0.3, -0.3, 0.0, 0.30001, -0.29999])])
    scratch, builtin = values.clone(), values.clone()
    proximal_l1_([scratch], 0.3)
    proximal_l1_torch_([builtin], 0.3)
    assert torch.equal(scratch, builtin)
    small = values.abs() <= 0.3
    assert (scratch[small] == 0).all()
    torch.testing.assert_close(scratch[~small], values[~small] - 0.3 * values[~small].sign())


def test_proximal_l1_rejects_negative_threshold():
    with pytest.raises(ValueError, match="threshold=-0.1"):
        proximal_l1_([torch.ones(2)], -0.1)


def _sparse_regression(n: int = 200, features: int = 50, informative: int = 5):
    g = _generator(0)
    x = torch.randn(n, features, generator=g)
    true_w = torch.zeros(features)
    true_w[:informative] = torch.tensor([2.0, -3.0, 1.5, -1.0, 2.5])
    y = x @ true_w + 0.1 * torch.randn(n, generator=g)
    return x, y


def _fit_lasso(proximal: bool, steps: int = 300, lr: float = 0.05, strength: float = 0.1) -> torch.Tensor:
    x, y = _sparse_regression()
    w = torch.zeros(x.shape[1], requires_grad=True)
    for _ in range(steps):
        loss = ((x @ w - y) ** 2).mean() / 2
        if not proximal:
            loss = (
                loss + strength * l1_penalty([w.unsqueeze(0)]).sum()
            )  # subgradient: sign(w) jitters w around 0
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= lr * grad
        if proximal:
            proximal_l1_([w], lr * strength)
    return w.detach()


def test_proximal_l1_gives_exact_zeros_and_subgradient_does_not():
    proximal, subgradient = _fit_lasso(proximal=True), _fit_lasso(proximal=False)
    assert (proximal[5:] == 0).sum() >= 40  # most of the 45 uninformative weights are exactly 0
    assert (proximal[:5] != 0).all()  # and the 5 informative ones survive
    assert (subgradient == 0).sum() <= 1
    assert subgradient[5:].abs().max() < 0.05  # small, but not zero: that is the point


class _OneMemberLinear(nn.Module):
    """A linear map without bias as a stack of one member (weight [K=1, 1, d]), as reglab's models hold it."""

    def __init__(self, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, features))


def _prox_sgd_trajectory(momentum: float, steps: int = 25, lr: float = 0.05) -> list[torch.Tensor]:
    """Weights after each step of reglab's proximal L1 (the L1 technique's after_step hook) on torch's SGD."""
    from reglab.models import member_parameters
    from reglab.regularizers.l1_l2 import L1

    x, y = _sparse_regression()
    model = _OneMemberLinear(x.shape[1])
    ((_, weight),) = member_parameters(
        model, 0
    )  # the member's leaf view [1, d], as the loop's optimizer sees it
    l1 = L1([{"strength": LAMBDA, "mode": "proximal", "impl": "scratch", "exclude_bias_and_norm": True}])
    l1.setup(model)
    optimizer = torch.optim.SGD([weight], lr=lr, momentum=momentum)
    trajectory = []
    for _ in range(steps):
        optimizer.zero_grad()
        (((x @ weight.T).squeeze(1) - y) ** 2).mean().div(2).backward()
        optimizer.step()
        l1.after_step([lr])
        trajectory.append(model.weight.detach()[0, 0].clone())
    return trajectory


def _by_hand(momentum: float, steps: int = 25, lr: float = 0.05) -> list[torch.Tensor]:
    """ISTA (momentum 0) and the proximal heavy-ball step w <- soft(w - lr·b, lr·λ), b <- μ·b + ∇f(w)."""
    x, y = _sparse_regression()
    w, buffer, trajectory = torch.zeros(x.shape[1]), torch.zeros(x.shape[1]), []
    for _ in range(steps):
        gradient = x.T @ (x @ w - y) / len(y)
        buffer = momentum * buffer + gradient
        step = w - lr * buffer
        w = step.sign() * (step.abs() - lr * LAMBDA).clamp(min=0)
        trajectory.append(w)
    return trajectory


def test_proximal_l1_after_plain_sgd_is_exactly_ista():
    for ours, ista in zip(_prox_sgd_trajectory(momentum=0.0), _by_hand(momentum=0.0), strict=True):
        torch.testing.assert_close(ours, ista, rtol=1e-5, atol=1e-6)


def test_proximal_l1_after_momentum_sgd_is_a_proximal_heavy_ball_step_not_ista():
    ours, ista = _prox_sgd_trajectory(momentum=0.9), _by_hand(momentum=0.0)
    for step, heavy_ball in zip(ours, _by_hand(momentum=0.9), strict=True):
        torch.testing.assert_close(step, heavy_ball, rtol=1e-4, atol=1e-5)
    assert (ours[-1] - ista[-1]).abs().max() > 0.1  # the iterates are not ISTA's


@pytest.mark.parametrize("exclude", [True, False])
def test_builtin_weight_decay_follows_exclude_bias_and_norm(tmp_path, data_root, exclude):
    from reglab.loop import Job, Member, Stack, prepare
    from reglab.models import member_parameters
    from tests.test_loop import config

    flag = str(exclude).lower()
    cfg = config(
        data_root,
        "regularizer=l2",
        "regularizer.l2.impl=torch",
        f"regularizer.l2.exclude_bias_and_norm={flag}",
    )
    member = Member(cfg=cfg, run_dir=tmp_path, job=Job())
    model, _, optimizer, _ = prepare(Stack(members=[member], trainer=cfg["trainer"]))
    decayed = {
        id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]
    }
    params = [p for _, p in member_parameters(model, 0)]
    assert all(id(p) in decayed for p in params if p.ndim >= 2)
    assert all((id(p) in decayed) != exclude for p in params if p.ndim < 2)
