"""`FusedAdam` takes every step exactly as `torch.optim.Adam(fused=True)` does, through everything a training does to
an optimizer: groups with their own settings, a learning-rate schedule, tensors that stop training, a checkpoint."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch

from reglab.fused_adam import FusedAdam


def _groups(seed: int = 0) -> list[dict]:
    """A stack's kind of groups: per-member biases apart, weight blocks, decay coupled and decoupled."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(6, 100, 40, generator=generator)
    biases = torch.randn(6, 100, generator=generator)
    plain = [biases[k].requires_grad_() for k in range(6)] + [weights[0:2].requires_grad_()]
    return [
        {"params": plain},
        {"params": [weights[2:4].requires_grad_()], "weight_decay": 1e-2},
        {
            "params": [weights[4:6].requires_grad_()],
            "weight_decay": 0.1,
            "decoupled_weight_decay": True,
            "lr": 3e-3,
        },
    ]


def _gradients(groups: list[dict], step: int, stopped: int = 0) -> None:
    """New gradients each step, written into the gradient tensors there are (as a stack's backward pass does:
    models.share_gradients); the first `stopped` tensors get none."""
    generator = torch.Generator().manual_seed(1000 + step)
    for group in groups:
        for p in group["params"]:
            grad = torch.randn(p.shape, generator=generator)
            p.grad = grad if p.grad is None else p.grad.copy_(grad)
    for p in groups[0]["params"][:stopped]:
        p.grad = None


@pytest.fixture
def builtin_steps(monkeypatch) -> list[int]:
    """Counts the steps that FusedAdam left to the built-in: the others took the kept lists."""
    from reglab import fused_adam

    calls = []
    builtin = fused_adam._builtin_step

    def counted(optimizer, closure):
        calls.append(1)
        return builtin(optimizer, closure)

    monkeypatch.setattr(fused_adam, "_builtin_step", counted)
    return calls


def _same(groups: list[dict], other: list[dict]) -> bool:
    """Whether two copies of the groups hold the same parameters, bit for bit."""
    params = [p for group in groups for p in group["params"]]
    others = [p for group in other for p in group["params"]]
    return all(torch.equal(a, b) for a, b in zip(params, others, strict=True))


def test_fused_adam_steps_as_the_builtin_bit_for_bit(builtin_steps):
    builtin_groups, ours_groups = _groups(), _groups()
    builtin = torch.optim.Adam(builtin_groups, lr=1e-2, fused=True)
    ours = FusedAdam(ours_groups, lr=1e-2)
    schedule = torch.optim.lr_scheduler.ExponentialLR(builtin, gamma=0.9)
    for step in range(12):
        stopped = 3 if step >= 6 else 0  # three members' biases stop training halfway
        for groups, optimizer in ((builtin_groups, builtin), (ours_groups, ours)):
            if step == 10:  # gradients handed out anew (models.share_gradients, after a block changed)
                groups[1]["params"][0].grad = torch.zeros_like(groups[1]["params"][0])
            _gradients(groups, step, stopped)
            optimizer.step()
        assert _same(builtin_groups, ours_groups), step
        schedule.step()  # the same learning rates for both
        for ours_group, builtin_group in zip(ours.param_groups, builtin.param_groups, strict=True):
            ours_group["lr"] = builtin_group["lr"]
        if step == 8:  # a checkpoint: the state saved to a file and put back, into a resumed run's optimizer
            saved = io.BytesIO()
            torch.save(ours.state_dict(), saved)
            saved.seek(0)
            ours = FusedAdam(ours_groups, lr=1e-2)
            ours.load_state_dict(torch.load(saved, weights_only=True))
    # the first step, the members that stopped, the checkpoint and the new gradient each made the lists anew
    assert builtin_steps == []
    for a, b in zip(builtin.state_dict()["state"].values(), ours.state_dict()["state"].values(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_state_put_back_by_hand_is_the_one_stepped(builtin_steps):
    """A restored member's state replaces its tensors' state entries, or a block's step count alone
    (checkpoint.restore_optimizer_state): the next step must update and count from that state, not from lists kept
    before."""
    builtin_groups, ours_groups = _groups(), _groups()
    builtin = torch.optim.Adam(builtin_groups, lr=1e-2, fused=True)
    ours = FusedAdam(ours_groups, lr=1e-2)
    put_back = {
        3: lambda optimizer, p: optimizer.state[p].update(step=torch.tensor(1.0)),
        5: lambda optimizer, p: optimizer.state.__setitem__(
            p, {key: torch.zeros_like(v) for key, v in optimizer.state[p].items()}
        ),
    }
    for step in range(7):
        for groups, optimizer in ((builtin_groups, builtin), (ours_groups, ours)):
            if step in put_back:
                put_back[step](optimizer, groups[0]["params"][0])
            _gradients(groups, step)
            optimizer.step()
        assert _same(builtin_groups, ours_groups), step
    assert builtin_steps == []  # the lists made anew after each state put back


def test_a_grad_scalers_scale_and_a_setting_changed_later_take_the_builtin_step(builtin_steps):
    """A GradScaler sets the optimizer's inverse scale and inf flag for a step (the built-in unscales, or skips the
    step and takes its count back); a group switched to AMSGrad after the lists were kept is the built-in's too."""
    builtin_groups, ours_groups = _groups(), _groups()
    builtin = torch.optim.Adam(builtin_groups, lr=1e-2, fused=True)
    ours = FusedAdam(ours_groups, lr=1e-2)
    scaled = {2: torch.tensor(0.0), 3: torch.tensor(1.0)}  # step 3's gradients "overflowed": skipped
    for step in range(7):
        for groups, optimizer in ((builtin_groups, builtin), (ours_groups, ours)):
            if step in scaled:
                optimizer.grad_scale, optimizer.found_inf = torch.tensor(0.5), scaled[step]
            if step == 5:
                optimizer.param_groups[1]["amsgrad"] = True
                optimizer.state[groups[1]["params"][0]]["max_exp_avg_sq"] = torch.zeros_like(
                    groups[1]["params"][0]
                )
            _gradients(groups, step)
            optimizer.step()
            optimizer.grad_scale = optimizer.found_inf = None
        assert _same(builtin_groups, ours_groups), step
    assert len(builtin_steps) == 4  # the two scaled steps and the two AMSGrad ones


def test_building_and_stepping_imports_no_torch_dynamo():
    """torch's compile guards on an optimizer's methods import torch._dynamo (~1 s) on first use: FusedAdam goes
    without them (a fresh interpreter: this one may have imported it already)."""
    code = (
        "import sys, torch\n"
        "from reglab.fused_adam import FusedAdam\n"
        "w = torch.randn(4, 3, requires_grad=True)\n"
        "optimizer = FusedAdam([w], lr=1e-2)\n"
        "for _ in range(2):\n"
        "    w.grad = torch.randn(4, 3)\n"
        "    optimizer.step()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("setting", [{"amsgrad": True}, {"maximize": True}])
def test_settings_the_kept_lists_do_not_serve_take_the_builtin_step(setting):
    builtin_groups, ours_groups = _groups(), _groups()
    builtin = torch.optim.Adam(builtin_groups, lr=1e-2, fused=True, **setting)
    ours = FusedAdam(ours_groups, lr=1e-2, **setting)
    for step in range(4):
        for groups, optimizer in ((builtin_groups, builtin), (ours_groups, ours)):
            _gradients(groups, step)
            optimizer.step()
    assert ours._kept is None
    assert _same(builtin_groups, ours_groups)


def test_a_group_added_later_and_a_copied_optimizer_step_as_the_builtin(builtin_steps):
    builtin_groups, ours_groups = _groups(), _groups()
    builtin = torch.optim.Adam(builtin_groups[:2], lr=1e-2, fused=True)
    ours = FusedAdam(ours_groups[:2], lr=1e-2)
    for step in range(6):
        if step == 2:  # a group added after the lists were kept
            builtin.add_param_group(builtin_groups[2])
            ours.add_param_group(ours_groups[2])
        if step == 4:  # a copy of each optimizer, which trains copies of the tensors
            builtin, ours = copy.deepcopy(builtin), copy.deepcopy(ours)
            builtin_groups, ours_groups = builtin.param_groups, ours.param_groups
        for groups, optimizer in ((builtin_groups, builtin), (ours_groups, ours)):
            _gradients(groups, step)
            optimizer.step()
        assert _same(builtin_groups, ours_groups), step
    assert builtin_steps == []  # the lists made anew after the group was added and for the copy
