"""The model zoo: an MLP, a 1-D CNN for signals and a 2-D CNN for images.

Input and output sizes come from the data set (`input_shape`, `num_classes`), never from the user. Dropout layers
are placed by the `DropoutPlan` that the dropout regularizer hands over: dense dropout after every hidden dense layer,
channel-wise (or element-wise) dropout after every conv block, optional input dropout. Without dropout the plan's
rates are 0 and the layers are `nn.Identity`, so an unregularized model carries no dead weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reglab.errors import ConfigError
from reglab.regularizers.dropout import build_dropout

MODELS = ("mlp", "cnn1d", "cnn")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class DropoutPlan:
    """Where and how strongly the model drops activations."""

    p: float = 0.0  # after every hidden dense layer
    input_p: float = 0.0  # on the input
    conv_p: float = 0.0  # after every conv block
    conv_kind: str = "channel"  # channel: whole feature maps; element: single activations
    impl: str = "scratch"  # scratch | torch

    def dense(self, p: float) -> nn.Module:
        return build_dropout(p, impl=self.impl, spatial_dims=0)

    def conv(self, spatial_dims: int) -> nn.Module:
        dims = spatial_dims if self.conv_kind == "channel" else 0
        return build_dropout(self.conv_p, impl=self.impl, spatial_dims=dims)


def build_model(cfg, input_shape: tuple[int, ...], num_classes: int, dropout: DropoutPlan) -> nn.Module:
    """The network that `cfg` (the `model` config node) names, sized for the data."""
    activation = ACTIVATIONS[cfg["activation"]]
    if cfg["name"] == "mlp":
        return mlp(input_shape, list(cfg["hidden"]), num_classes, activation, dropout)
    spatial_dims = len(input_shape) - 1
    wanted = {"cnn1d": 1, "cnn": 2}.get(cfg["name"])
    if wanted is None:
        raise ConfigError("model", cfg["name"], f"one of {', '.join(MODELS)}")
    if spatial_dims != wanted:
        kind = "1-D signals (model=cnn1d)" if spatial_dims == 1 else "2-D images (model=cnn)"
        raise ConfigError(
            "model", cfg["name"], f"this data set holds {kind}; model=mlp works with any data set"
        )
    conv_layers = conv_stack(
        input_shape[0], list(cfg["channels"]), cfg["kernel_size"], spatial_dims, activation, dropout
    )
    return conv_net(conv_layers, input_shape, list(cfg["hidden"]), num_classes, activation, dropout)


def mlp(input_shape, hidden: list[int], num_classes: int, activation, dropout: DropoutPlan) -> nn.Sequential:
    """Flatten -> [input dropout] -> (Linear -> activation -> dropout) per hidden width -> Linear."""
    width = 1
    for size in input_shape:
        width *= size
    return nn.Sequential(
        nn.Flatten(),
        dropout.dense(dropout.input_p),
        *dense_head(width, hidden, num_classes, activation, dropout),
    )


def dense_head(
    width: int, hidden: list[int], num_classes: int, activation, dropout: DropoutPlan
) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), activation(), dropout.dense(dropout.p)]
        width = size
    return [*layers, nn.Linear(width, num_classes)]


def conv_stack(
    in_channels: int,
    channels: list[int],
    kernel_size: int | list[int],
    spatial_dims: int,
    activation,
    dropout,
):
    """1-D: strided convolutions (each halves the length). 2-D: conv -> activation -> 2x2 max-pool blocks.
    `kernel_size` is one size for every layer or one per layer."""
    sizes = [kernel_size] * len(channels) if isinstance(kernel_size, int) else list(kernel_size)
    if len(sizes) != len(channels):
        raise ConfigError(
            "model.kernel_size", kernel_size, f"one size, or one per layer ({len(channels)} layers)"
        )
    layers: list[nn.Module] = [dropout.dense(dropout.input_p)]
    for out_channels, kernel_size in zip(channels, sizes, strict=True):
        if spatial_dims == 1:
            layers += [
                nn.Conv1d(in_channels, out_channels, kernel_size, stride=2, padding=kernel_size // 2),
                activation(),
            ]
        else:
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
                activation(),
                nn.MaxPool2d(2),
            ]
        layers.append(dropout.conv(spatial_dims))
        in_channels = out_channels
    return layers


def channels_of(layers) -> list[int]:
    return [layer.out_channels for layer in layers if isinstance(layer, (nn.Conv1d, nn.Conv2d))]


def conv_net(
    conv_layers, input_shape, hidden: list[int], num_classes: int, activation, dropout
) -> nn.Sequential:
    features = nn.Sequential(*conv_layers, nn.Flatten())
    try:
        with torch.no_grad():
            width = features.eval()(torch.zeros(1, *input_shape)).shape[
                1
            ]  # flattened size after the conv stack
    except RuntimeError as err:  # torch: "Output size is too small" once the blocks have halved it to nothing
        raise ConfigError(
            "model.channels",
            channels_of(conv_layers),
            f"fewer conv blocks for inputs of shape "
            f"{tuple(input_shape)}: each block halves the size ({str(err).splitlines()[0][:80]})",
        ) from None
    return nn.Sequential(*features, *dense_head(width, hidden, num_classes, activation, dropout)).train()
