"""`torch.optim.Adam(fused=True)` with less bookkeeping per step, for a stack's many small tensors.

A stack hands the optimizer ~80 tensors (each member's biases apart: models.in_blocks says why). For each of them,
`Adam.step` looks its state up in Python and then adds 1 to its step count in a `_foreach_add_`, which on the CPU
is one small operation per tensor: together ~2.5x the fused kernel's own time (K=24 MLP stack, measured: 765 µs
a step, 275 µs here). `FusedAdam` calls the same kernel with the same arguments from lists it keeps, with the
step counts of a group's tensors as views of one tensor that a single `add_` advances, so every number is the
built-in's (tested against it bit for bit). Whenever a tensor, its gradient or its state is not the one kept
(the first step, a member that stopped training, a restored state), the lists are made anew, with the state of a
tensor that has none made as the built-in makes it. Settings the lists do not serve (AMSGrad, a closure, ...) take
the built-in's own step.

torch keeps torch.compile out of an optimizer's methods with wrappers that import all of torch._dynamo (~1 s and
~80 MB a process) the first time one is called: this optimizer is never compiled (`trainer.compile`
compiles the model), so it adds its groups and takes its steps without them.
"""

from __future__ import annotations

import torch
from torch import Tensor


class FusedAdam(torch.optim.Adam):
    def __init__(self, params, **settings):
        self._kept: list[_Group] | None = None
        super().__init__(params, fused=True, **settings)

    def add_param_group(self, param_group: dict) -> None:
        _unwrapped(torch.optim.Optimizer.add_param_group)(self, param_group)
        self._kept = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None and self._holds():  # lists were kept only for servable groups: they still are
            for kept in self._kept:
                kept.step()
            return None
        if closure is not None or not self._servable():
            self._kept = None
            return _builtin_step(self, closure)
        self._kept = [_Group(group, self.state) for group in self.param_groups]
        for kept in self._kept:
            kept.step()
        return None

    def _holds(self) -> bool:
        """Whether the kept lists still are the optimizer's: its groups, tensors, gradients and state, and no
        gradient scaler's inverse scale or inf flag to apply (torch's GradScaler sets them on the optimizer)."""
        if self._kept is None or len(self._kept) != len(self.param_groups):
            return False
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False
        return all(
            kept.group is group and kept.holds(self.state)
            for kept, group in zip(self._kept, self.param_groups, strict=True)
        )

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._kept = None

    def __setstate__(self, state: dict) -> None:  # a copy or an unpickled optimizer keeps no lists
        super().__setstate__(state)
        self._kept = None

    def _servable(self) -> bool:
        """Whether the kept lists can take the next steps: no GradScaler's scale to apply, every group with the
        kernel's plain settings (no AMSGrad, maximize, capture or tensor lr), its tensors plain ones of one device
        and dtype (the built-in sorts them by both)."""
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False  # a GradScaler's: the built-in unscales and skips steps with inf gradients
        for group in self.param_groups:
            if not _plain_settings(group):
                return False
            stepped = [p for p in group["params"] if p.grad is not None]
            if len({(p.device, p.dtype) for p in stepped}) > 1 or not all(map(_plain_tensor, stepped)):
                return False
        return True


def _plain_tensor(p: Tensor) -> bool:
    """A real floating tensor on the CPU or a GPU with a dense gradient: anything else the built-in checks (and
    rejects with its own error, or handles) on its first step."""
    return p.is_floating_point() and p.device.type in ("cpu", "cuda") and not p.grad.is_sparse


def _plain_settings(group: dict) -> bool:
    """A group with the kernel's plain settings: fused, no AMSGrad, maximize, capture or tensor lr."""
    if any(group.get(key) for key in ("amsgrad", "maximize", "capturable", "differentiable")):
        return False
    return bool(group.get("fused")) and not isinstance(group["lr"], Tensor)


def _unwrapped(method):
    """An optimizer method without torch's torch.compile guard (`torch._disable_dynamo`, which keeps the original
    as `__wrapped__`)."""
    return getattr(method, "__wrapped__", method)


def _builtin_step(optimizer: FusedAdam, closure):
    """`torch.optim.Adam.step` itself, without running the step hooks a second time (torch wraps each optimizer
    class's step with them, this one's too)."""
    step = torch.optim.Adam.step
    return (step.__wrapped__ if getattr(step, "hooked", False) else step)(optimizer, closure)


class _Group:
    """One parameter group's tensors that have a gradient, their gradients and state, as the kernel takes them."""

    def __init__(self, group: dict, state: dict):
        self.group = group
        self.params = [p for p in group["params"] if p.grad is not None]
        self.grads = [p.grad for p in self.params]
        for p in self.params:
            if not state.get(p):
                state[p] = _new_state(p)
        states = [state[p] for p in self.params]
        self.exp_avgs = [s["exp_avg"] for s in states]
        self.exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        # one tensor of step counts; each parameter's state holds a view of its own element
        self.counts = torch.stack([s["step"] for s in states]) if states else torch.zeros(0)
        for k, s in enumerate(states):
            s["step"] = self.counts[k]
        self.steps = [s["step"] for s in states]

    def holds(self, state: dict) -> bool:
        """Whether the group still trains exactly these tensors with exactly these gradients and state, with the
        kernel's plain settings."""
        if not _plain_settings(self.group):
            return False
        params = [p for p in self.group["params"] if p.grad is not None]
        if len(params) != len(self.params):
            return False
        for k, p in enumerate(params):
            s = state.get(p)
            if (
                p is not self.params[k]
                or p.grad is not self.grads[k]
                or s is None
                or s.get("step") is not self.steps[k]
                or s.get("exp_avg") is not self.exp_avgs[k]
                or s.get("exp_avg_sq") is not self.exp_avg_sqs[k]
            ):
                return False
        return True

    def step(self) -> None:
        if not self.params:
            return
        group = self.group
        self.counts.add_(1)
        update = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        update(
            self.params,
            self.grads,
            self.exp_avgs,
            self.exp_avg_sqs,
            [],
            self.steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=_scalar(group["betas"][0]),
            beta2=_scalar(group["betas"][1]),
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )


def _new_state(p: Tensor) -> dict[str, Tensor]:
    """A tensor's state before its first step, as `torch.optim.Adam(fused=True)` makes it (`Adam._init_group`): a
    float32 step count on the tensor's device, both moments zero."""
    return {
        "step": torch.zeros((), dtype=torch.float32, device=p.device),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


def _scalar(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else value
