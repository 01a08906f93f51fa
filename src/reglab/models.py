"""The model zoo, as stacks: K independent networks of one architecture trained side by side.

Every layer holds its parameters stacked along a leading member dimension, one slice per *member* (one job of a
sweep), and computes all K at once on inputs shaped [K, B, ...]: a dense layer is one batched matmul,
y_k = x_k W_kᵀ + b_k (`torch.baddbmm`). An ordinary run is simply K = 1. The optimizer never sees the stacked
tensors: it updates each member's slice as a tensor of its own (`member_parameters`, leaf views into the stack
that receive their slice of the gradient, `share_gradients`), or a run of members that share its settings as one
block (`member_block`) where that rounds each member alike, exactly as it would update a network trained alone,
so member k's results equal its one-by-one run bit for bit (tests/test_stack.py).

The networks: an MLP, a 1-D CNN for signals and a 2-D CNN for images, and their residual versions (He et al. 2016):
a residual MLP for any data and a small ResNet for signals and images, whose blocks compute y = act(x + f(x)).
Input and output sizes come from the data set, never from the user. Convolutions are written as unfold + batched
matmul: measured here, that keeps a member's outputs identical whatever K is, where grouped convolutions pick other
algorithms for other shapes. Dropout layers sit where each member's `DropoutPlan` asks (see
regularizers/dropout.py); other techniques put layers of their own at the same sites and at the end of every
residual branch (`Technique.model_layer`: Gaussian noise, stochastic depth).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.errors import ConfigError
from reglab.regularizers.base import Site
from reglab.regularizers.dropout import DropoutPlan, StackedDropout

MODELS = ("mlp", "cnn1d", "cnn", "resmlp", "resnet")
CONV_DIMS = {"cnn1d": (1,), "cnn": (2,), "resnet": (1, 2)}  # the spatial dimensions each conv network takes
# ReLU in place: the tensors it takes (a layer's fresh output) are needed by no other op, and evaluating a stack on
# a whole split saves writing a second activation of ~30 MB per layer (K = 24, 3200 samples)
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "tanh": nn.Tanh}


def _stacked_uniform(
    weight_shape: tuple[int, ...], fan_in: int, generators: list[torch.Generator]
) -> tuple[nn.Parameter, nn.Parameter]:
    """Weights [K, *weight_shape] and biases [K, out], initialized as `nn.Linear`/`nn.Conv*` are by default:
    uniform in ±1/√fan_in, member k's drawn from its own generator (weight first, then bias, like PyTorch)."""
    bound = 1 / math.sqrt(fan_in)
    weight = torch.empty(len(generators), *weight_shape)
    bias = torch.empty(len(generators), weight_shape[0])
    for k, generator in enumerate(generators):
        weight[k].uniform_(-bound, bound, generator=generator)
        bias[k].uniform_(-bound, bound, generator=generator)
    return nn.Parameter(weight), nn.Parameter(bias)


def effective_weight(layer: nn.Module) -> Tensor:
    """The weight a stacked layer computes with: its parameter, or what a technique's `weight_transform` makes of it
    (spectral normalization's W/σ(W); regularizers/spectral_norm.py)."""
    return layer.weight if layer.weight_transform is None else layer.weight_transform(layer.weight)


class StackedLinear(nn.Module):
    """K dense layers: x [K, B, in] -> [K, B, out], y_k = x_k W_kᵀ + b_k."""

    weight_transform = None  # a technique may set W [K, ...] -> W' [K, ...] for the forward pass

    def __init__(self, in_features: int, out_features: int, generators: list[torch.Generator]):
        super().__init__()
        self.weight, self.bias = _stacked_uniform((out_features, in_features), in_features, generators)

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, effective_weight(self).transpose(1, 2))


class StackedConv(nn.Module):
    """K convolutions (1-D or 2-D), as unfold + batched matmul: the patches of every position times the kernels.

    Default stride: 2 in 1-D (each layer halves the length), 1 in 2-D. Padding kernel_size // 2, like the CNNs
    before. Initialized as `nn.Conv1d/2d` are by default (uniform ±1/√fan_in, fan_in = in_channels · kernel elements).
    """

    weight_transform = None  # as StackedLinear's

    def __init__(self, in_channels, out_channels, kernel_size, spatial_dims, generators, stride=None):
        super().__init__()
        self.kernel, self.spatial_dims = kernel_size, spatial_dims
        self.stride = stride if stride is not None else 2 if spatial_dims == 1 else 1
        shape = (out_channels, in_channels, *[kernel_size] * spatial_dims)
        self.weight, self.bias = _stacked_uniform(shape, in_channels * kernel_size**spatial_dims, generators)

    def forward(self, x: Tensor) -> Tensor:
        members, batch = x.shape[:2]
        patches, out_size = self._patches(x.flatten(0, 1))  # [K·B, positions, C·k…]
        patches = patches.reshape(members, -1, patches.shape[-1])  # [K, B·positions, C·k…]
        weight = effective_weight(self).flatten(2)  # [K, out, C·k…]
        out = torch.baddbmm(self.bias.unsqueeze(1), patches, weight.transpose(1, 2))  # [K, B·positions, out]
        return (
            out.view(members, batch, -1, weight.shape[1])
            .transpose(2, 3)
            .reshape(members, batch, -1, *out_size)
        )

    def output_size(self, size: list[int]) -> list[int]:
        """Spatial size after this convolution: (s + 2·padding − kernel) // stride + 1 per dimension."""
        return [(s + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1 for s in size]

    def _patches(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        pad = self.kernel // 2
        if self.spatial_dims == 1:
            padded = F.pad(x, (pad, pad))
            windows = padded.unfold(2, self.kernel, self.stride)  # [N, C, L_out, k]
            # one copy into the row-per-position layout the matmul takes (two copies before, forward and backward)
            return windows.permute(0, 2, 1, 3).flatten(2), (windows.shape[2],)
        patches = F.unfold(x, self.kernel, padding=pad, stride=self.stride)  # [N, C·k·k, positions]
        return patches.transpose(1, 2), tuple(self.output_size(list(x.shape[2:])))


class PerSample(nn.Module):
    """Applies a layer that knows nothing of members (max-pooling) to [K, B, ...] by folding K into the batch."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(x.flatten(0, 1))
        return out.view(*x.shape[:2], *out.shape[1:])


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2)


class GlobalAveragePool(nn.Module):
    """[K, B, C, *spatial] -> [K, B, C]: each channel's mean over its positions."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(3).mean(3)


class Residual(nn.Module):
    """A residual block (He et al. 2016): y = act(shortcut(x) + branch(x)), the shortcut the identity, or a strided
    1x1 convolution where the block changes the shape. The branch ends with the layers techniques put there
    (stochastic depth drops the whole branch of a sample: y = act(x) for it)."""

    def __init__(self, branch: list[nn.Module], activation: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.branch = named(branch, output=False)
        self.shortcut = shortcut
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.activation(identity + self.branch(x))


@dataclass
class Architecture:
    """What `build_model` needs beyond the config: the data's shape and classes, and one entry per member."""

    input_shape: tuple[int, ...]
    num_classes: int
    seeds: list[int]  # each member's initialization seed
    dropout: list[DropoutPlan]  # each member's dropout
    # the techniques' own layers at a site of the network, for all members (Regularization.model_layers)
    layers: Callable[[Site, list[torch.Generator]], list[nn.Module]] | None = None


def build_model(cfg, arch: Architecture, noise: list[torch.Generator] | None = None) -> nn.Sequential:
    """The stack of networks that `cfg` (the `model` config node) names, sized for the data.

    `noise` holds each member's generator for dropout masks (default: generators seeded by the member seeds)."""
    generators = [torch.Generator().manual_seed(seed) for seed in arch.seeds]
    noise = noise if noise is not None else [torch.Generator().manual_seed(seed) for seed in arch.seeds]
    activation = ACTIVATIONS[cfg["activation"]]
    layers = Layers(generators, noise, arch, activation)
    if cfg["name"] == "mlp":
        width = math.prod(arch.input_shape)
        body = [Flatten(), *layers.at("input")]
    elif cfg["name"] == "resmlp":
        body, width = residual_mlp_body(cfg, arch, layers)
    elif cfg["name"] == "resnet":
        body, width = residual_conv_body(cfg, arch, layers)
    else:
        body, width = conv_body(cfg, arch, layers)
    return named(body + layers.dense_head(width, list(cfg["hidden"]), arch.num_classes))


def named(layers: list[nn.Module], output: bool = True) -> nn.Sequential:
    """A Sequential whose weights have names that do not depend on where dropout sits: conv1, dense1, ..., output
    (so that best.pt of a run with dropout loads into one without); `output=False` names the last one by its kind."""
    names, counts = [], {}
    for position, layer in enumerate(layers):
        kind = {StackedConv: "conv", StackedLinear: "dense"}.get(type(layer), type(layer).__name__.lower())
        counts[kind] = counts.get(kind, 0) + 1
        names.append("output" if output and position == len(layers) - 1 else f"{kind}{counts[kind]}")
    return nn.Sequential(OrderedDict(zip(names, layers, strict=True)))


class Layers:
    """Builds layers for all members at once: their init generators, their noise generators (dropout masks and
    every other random draw of a forward pass), what their techniques put into the network, and the activation."""

    def __init__(self, generators, noise, arch: Architecture, activation):
        self.generators, self.noise, self.arch, self.activation = generators, noise, arch, activation

    def at(self, where: str, spatial_dims: int = 0) -> list[nn.Module]:
        """What the members' techniques put at `where` (input | dense | conv): dropout, then the others' layers."""
        dropout = StackedDropout.at(where, self.arch.dropout, self.noise, spatial_dims)
        return ([dropout] if dropout is not None else []) + self.techniques(Site(where, spatial_dims))

    def branch_end(self, depth: int, blocks: int, spatial_dims: int = 0) -> list[nn.Module]:
        """What the techniques put at the end of residual block `depth`'s branch (of `blocks`)."""
        return self.techniques(Site("branch", spatial_dims, depth, blocks))

    def techniques(self, site: Site) -> list[nn.Module]:
        return self.arch.layers(site, self.noise) if self.arch.layers is not None else []

    def dense_head(self, width: int, hidden: list[int], num_classes: int) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [StackedLinear(width, size, self.generators), self.activation(), *self.at("dense")]
            width = size
        return [*layers, StackedLinear(width, num_classes, self.generators)]


def residual_mlp_body(cfg, arch: Architecture, layers: Layers) -> tuple[list[nn.Module], int]:
    """Flatten, a dense layer to `width`, then `blocks` residual blocks y = act(x + W₂·act(W₁·x)) (bias terms
    included); returns the layers and the width."""
    width, blocks = cfg["width"], cfg["blocks"]
    body = [Flatten(), *layers.at("input")]
    body += [StackedLinear(math.prod(arch.input_shape), width, layers.generators), layers.activation()]
    body += layers.at("dense")
    for depth in range(1, blocks + 1):
        branch = [StackedLinear(width, width, layers.generators), layers.activation(), *layers.at("dense")]
        branch += [StackedLinear(width, width, layers.generators), *layers.branch_end(depth, blocks)]
        body.append(Residual(branch, layers.activation()))
    return body, width


def residual_conv_body(cfg, arch: Architecture, layers: Layers) -> tuple[list[nn.Module], int]:
    """A small ResNet: a stem convolution to channels[0], then one residual block per further entry of `channels`,
    y = act(shortcut(x) + conv₂(act(conv₁(x)))), then global average pooling; returns the layers and the channels.

    A block that keeps the channels keeps the size (stride 1, identity shortcut); one that changes them halves the
    size (conv₁ and a 1x1 shortcut convolution with stride 2), down to 1 at most. The stem has the CNNs' stride
    (2 in 1-D, 1 in 2-D)."""
    spatial_dims = conv_dims(cfg, arch)
    channels, kernel = list(cfg["channels"]), cfg["kernel_size"]
    if not isinstance(kernel, int) or kernel % 2 == 0:
        raise ConfigError(
            "model.kernel_size", kernel, "one odd size for model=resnet (a block keeps the size it is given)"
        )
    stem = StackedConv(arch.input_shape[0], channels[0], kernel, spatial_dims, layers.generators)
    body = [*layers.at("input"), stem, layers.activation(), *layers.at("conv", spatial_dims)]
    blocks = len(channels) - 1
    for depth, (c_in, c_out) in enumerate(pairwise(channels), start=1):
        stride = 1 if c_in == c_out else 2
        branch = [
            StackedConv(c_in, c_out, kernel, spatial_dims, layers.generators, stride),
            layers.activation(),
        ]
        branch += layers.at("conv", spatial_dims)
        branch += [StackedConv(c_out, c_out, kernel, spatial_dims, layers.generators, stride=1)]
        branch += layers.branch_end(depth, blocks, spatial_dims)
        shortcut = (
            StackedConv(c_in, c_out, 1, spatial_dims, layers.generators, stride) if stride > 1 else None
        )
        body.append(Residual(branch, layers.activation(), shortcut))
    return [*body, GlobalAveragePool()], channels[-1]


def conv_dims(cfg, arch: Architecture) -> int:
    """The spatial dimensions of the data (1 or 2), checked against what the conv network `cfg` names takes."""
    spatial_dims = len(arch.input_shape) - 1
    wanted = CONV_DIMS.get(cfg["name"])
    if wanted is None:
        raise ConfigError("model", cfg["name"], f"one of {', '.join(MODELS)}")
    if spatial_dims not in wanted:
        kind = "1-D signals (model=cnn1d)" if spatial_dims == 1 else "2-D images (model=cnn)"
        raise ConfigError(
            "model",
            cfg["name"],
            f"this data set holds {kind}; model=mlp and model=resmlp work with any data set",
        )
    return spatial_dims


def conv_body(cfg, arch: Architecture, layers: Layers) -> tuple[list[nn.Module], int]:
    """Conv blocks then a flatten; returns the layers and the flattened width."""
    spatial_dims = conv_dims(cfg, arch)
    channels = list(cfg["channels"])
    kernel_size = cfg["kernel_size"]
    sizes = [kernel_size] * len(channels) if isinstance(kernel_size, int) else list(kernel_size)
    if len(sizes) != len(channels):
        raise ConfigError(
            "model.kernel_size", kernel_size, f"one size, or one per layer ({len(channels)} layers)"
        )
    body: list[nn.Module] = [*layers.at("input")]
    size = list(arch.input_shape[1:])
    in_channels = arch.input_shape[0]
    for out_channels, kernel in zip(channels, sizes, strict=True):
        conv = StackedConv(in_channels, out_channels, kernel, spatial_dims, layers.generators)
        body += [conv, layers.activation()]
        size = conv.output_size(size)
        if spatial_dims == 2:
            body.append(PerSample(nn.MaxPool2d(2)))
            size = [s // 2 for s in size]
        body += layers.at("conv", spatial_dims)
        in_channels = out_channels
        if min(size) < 1:
            raise ConfigError(
                "model.channels",
                channels,
                f"fewer conv blocks for inputs of shape {tuple(arch.input_shape)}: each block halves the size",
            )
    return [*body, Flatten()], in_channels * math.prod(size)


# ---------------------------------------------------------------------------------------------------------------------
# One member's view of the stack


def unwrapped(model: nn.Module) -> nn.Module:
    """The model itself when `model` is its `torch.compile` wrapper (same parameters, other names)."""
    return getattr(model, "_orig_mod", model)


def member_state(model: nn.Module, member: int) -> dict[str, Tensor]:
    """Member `member`'s weights under the model's names ('dense1.weight'), as if it had been trained alone
    (best.pt, last.pt)."""
    return {name: tensor[member].detach().clone() for name, tensor in unwrapped(model).state_dict().items()}


def load_member_state(model: nn.Module, member: int, state: dict[str, Tensor]) -> None:
    """Load one member's weights (from `member_state`) into its slice of the stack."""
    with torch.no_grad():
        for name, tensor in state.items():
            unwrapped(model).get_parameter(name)[member].copy_(tensor)


class MemberView:
    """One member of a stack seen as a lone model: its own `state_dict()` and `load_state_dict()`."""

    def __init__(self, model: nn.Module, member: int):
        self.model, self.member = model, member

    def state_dict(self) -> dict[str, Tensor]:
        return member_state(self.model, self.member)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        load_member_state(self.model, self.member, state)


def member_parameters(model: nn.Module, member: int) -> list[tuple[str, Tensor]]:
    """(name, tensor) of one member's parameters, in layer order: leaf views of its slice of each stacked parameter.

    The views are made once per model (after it moved to its device) and kept, so that the optimizer, weight decay
    and the proximal step update the member in place, each slice as a tensor of its own. Their gradients come from
    `share_gradients`."""
    return [(name, slices[member]) for name, _, slices in _slices(model)]


def _slices(model: nn.Module) -> list[tuple[str, nn.Parameter, list[Tensor]]]:
    """(name, stacked parameter, its per-member leaf views), made on first use and kept on the model."""
    model = unwrapped(model)
    if "_member_slices" not in model.__dict__:
        model.__dict__["_member_slices"] = [
            (name, param, [param.detach()[k].requires_grad_() for k in range(param.shape[0])])
            for name, param in model.named_parameters()
        ]
    return model.__dict__["_member_slices"]


def member_block(model: nn.Module, name: str, first: int, stop: int) -> Tensor:
    """A leaf view of members first..stop-1 of parameter `name` as one tensor [stop - first, ...], made once and
    kept: the optimizer updates a run of members that share its settings in one call per tensor instead of one per
    member (each call costs more than the arithmetic of a small layer). Its gradient comes from `share_gradients`."""
    blocks = unwrapped(model).__dict__.setdefault("_member_blocks", {})
    if (name, first, stop) not in blocks:
        param = unwrapped(model).get_parameter(name)
        blocks[(name, first, stop)] = param.detach()[first:stop].requires_grad_()
    return blocks[(name, first, stop)]


# A fused CPU optimizer kernel computes 8 (AVX2) or 16 (AVX-512) elements at a time and a tensor's last few one by one,
# with other rounding (aten/src/ATen/native/cpu/FusedAdamKernel.cpp). In a block its members are updated as if alone
# only when each one's element count is a multiple of the widest vector: then no member's elements shift between the
# two paths. Measured: blocks of [100, 40] and [10, 100] weights update bit for bit as alone, of [100] biases not.
FUSED_LANES = 16


def in_blocks(model: nn.Module, views: list[Tensor], lanes: bool = True) -> list[Tensor]:
    """Members' parameter views (from `member_parameters`) that share the optimizer's settings, with every run of
    consecutive members of a parameter replaced by one `member_block`; with `lanes` (a fused CPU kernel), only of
    the parameters whose per-member element count is a multiple of `FUSED_LANES`."""
    owner = {id(view): (name, k) for name, _, slices in _slices(model) for k, view in enumerate(slices)}
    members: dict[str, list[int]] = {}
    for view in views:
        name, k = owner[id(view)]
        members.setdefault(name, []).append(k)
    tensors = []
    for name, param, slices in _slices(model):
        aligned = not lanes or param[0].numel() % FUSED_LANES == 0
        for first, stop in runs(sorted(set(members.get(name, [])))):
            if stop - first > 1 and aligned:
                tensors.append(member_block(model, name, first, stop))
            else:
                tensors += slices[first:stop]
    return tensors


def runs(numbers: list[int], key: Callable[[int], object] = lambda n: None) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]: the runs of consecutive numbers (with equal `key`), as ranges."""
    found: list[tuple[int, int]] = []
    for n in numbers:
        if found and found[-1][1] == n and key(n) == key(found[-1][0]):
            found[-1] = (found[-1][0], n + 1)
        else:
            found.append((n, n + 1))
    return found


def find_block(model: nn.Module, name: str, member: int, among: set[int]) -> tuple[Tensor, int] | None:
    """The block of parameter `name` that holds `member` and whose id is in `among` (the optimizer's tensors: a
    technique may have blocks of its own over other runs), and the member's index in it; None if there is none."""
    for (block_name, first, stop), block in unwrapped(model).__dict__.get("_member_blocks", {}).items():
        if block_name == name and first <= member < stop and id(block) in among:
            return block, member - first
    return None


def clear_gradients(model: nn.Module) -> None:
    """Zero the stacked gradients in place before a backward pass, which then adds into them (0 + g is g): the
    members' slices keep viewing the same tensors, so `share_gradients` hands them out once, not every step."""
    grads = [param.grad for _, param, _ in _slices(model) if param.grad is not None]
    if grads:  # none before the first backward pass
        torch._foreach_zero_(grads)


def share_gradients(model: nn.Module, members: list[int]) -> None:
    """Hand each listed member its slice of the stacked gradients (views, no copy); the others get none, so the
    optimizer skips their own tensors. Every block (`member_block`) gets its slice too: a member that has finished
    keeps being updated inside its block, and nothing reads its slice after it finished.

    The stacked gradients stay from step to step (`clear_gradients`), and the views are handed out again only when
    the training members or the blocks change: K views per parameter every step cost more than the optimizer's
    update of a small layer (1.4 ms of a 48-member step, measured)."""
    model = unwrapped(model)
    blocks = model.__dict__.get("_member_blocks", {})
    shared = (tuple(members), tuple(blocks), tuple(id(param.grad) for _, param, _ in _slices(model)))
    if model.__dict__.get("_gradients_shared_as") == shared:
        return
    training = set(members)
    for _, param, slices in _slices(model):
        grads = param.grad.unbind(0)
        for k, view in enumerate(slices):
            view.grad = grads[k] if k in training else None
    for (name, first, stop), block in blocks.items():
        block.grad = model.get_parameter(name).grad[first:stop]
    model.__dict__["_gradients_shared_as"] = shared


def member_weights(model: nn.Module, member: int, output_layer: bool = True) -> list[Tensor]:
    """One member's weight matrices and kernels (ndim >= 2): what weight decay and weight statistics act on.
    `output_layer=False` leaves out the last dense layer (max-norm constrains hidden units only)."""
    weights = [p for _, p in member_parameters(model, member) if p.ndim >= 2]
    return weights if output_layer else weights[:-1]


def predict(model: nn.Module, x: Tensor, members: int) -> Tensor:
    """The logits of every member for the same inputs x [B, ...]: [K, B, classes]."""
    return model(x.unsqueeze(0).expand(members, *x.shape))
