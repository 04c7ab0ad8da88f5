"""``resnet20`` split at a cut layer (reference §2.3), Flax NNX, NHWC.

Layer list (10 "layers"): stem = conv5x5(3->16, pad 2, no bias) + BN + ReLU, then 3 stages x 3
BasicBlocks of widths 32 / 64 / 128, each stage's first block with stride 2 and an option-A
shortcut (subsample by 2, append zero channels). Client = layers ``[:cut]`` + bottleneck conv
(3x3, bias) + sigmoid; server = inverse bottleneck conv + layers ``[cut:]`` + global average pool
+ Linear(128, C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cem_jax.models import layers

WIDTHS = (32, 64, 128)
BLOCKS_PER_STAGE = 3
NUM_LAYERS = 1 + len(WIDTHS) * BLOCKS_PER_STAGE
BN_MOMENTUM = 0.9  # flax convention: = PyTorch momentum 0.1
BN_EPSILON = 1e-5


def _layer_specs() -> list[tuple[int, int, int]]:
    """``(c_in, c_out, stride)`` of the 9 blocks."""
    specs, c = [], 16
    for w in WIDTHS:
        for b in range(BLOCKS_PER_STAGE):
            specs.append((c, w, 2 if b == 0 else 1))
            c = w
    return specs


def check_args(image_size: int, cut_layer: int, bottleneck_channels: int) -> None:
    """Raise ``ValueError`` for sizes / cuts ResNet20 cannot take."""
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(
            f"image_size for resnet20 must be an int >= 8 (three stride-2 stages, each "
            f"rounding odd sizes up like PyTorch's pad-1 convs), got {image_size!r}"
        )
    if not isinstance(cut_layer, int) or not 1 <= cut_layer <= NUM_LAYERS:
        raise ValueError(f"cut_layer for resnet20 must be in [1, {NUM_LAYERS}], got {cut_layer!r}")
    if not isinstance(bottleneck_channels, int) or bottleneck_channels < 0:
        raise ValueError(f"bottleneck_channels must be an int >= 0, got {bottleneck_channels!r}")


def cut_shape(image_size: int, cut_layer: int) -> tuple[int, int, int]:
    """``(h, w, c)`` of the output of layer ``cut_layer - 1`` (before the bottleneck)."""
    side, c = image_size, 16
    for _, c_out, s in _layer_specs()[: cut_layer - 1]:
        side = -(-side // s)  # ceil: conv k3 s2 p1 and the x[::2] shortcut
        c = c_out
    return side, side, c


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, *, rngs: nnx.Rngs, bias: bool = False):
    return layers.Conv(
        c_in,
        c_out,
        k,
        stride,
        padding=k // 2,
        use_bias=bias,
        kernel_init=layers.he_normal_fan_out_init(),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def _bn(c: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(c, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


class Stem(nnx.Module):
    """conv5x5(3->16, pad 2, no bias) + BN + ReLU."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = _conv(3, 16, 5, rngs=rngs)
        self.bn = _bn(16, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class BasicBlock(nnx.Module):
    """conv3x3(s)-BN-ReLU-conv3x3-BN + shortcut, ReLU. ``[B,H,W,c_in] -> [B,H/s,W/s,c_out]``.

    Option-A shortcut when the shape changes: ``x[:, ::s, ::s]`` then zeros appended to reach
    ``c_out`` channels (the reference's ``AvgPool(1, s)`` + ``cat(x, 0*x)``).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv(c_in, c_out, 3, stride, rngs=rngs)
        self.bn1 = _bn(c_out, rngs)
        self.conv2 = _conv(c_out, c_out, 3, rngs=rngs)
        self.bn2 = _bn(c_out, rngs)
        self.stride, self.c_in, self.c_out = stride, c_in, c_out

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        sc = x
        if self.stride != 1 or self.c_in != self.c_out:
            sc = x[:, :: self.stride, :: self.stride]
            sc = jnp.pad(sc, ((0, 0), (0, 0), (0, 0), (0, self.c_out - self.c_in)))
        return jax.nn.relu(y + sc)


def _make_layers(start: int, stop: int, *, rngs: nnx.Rngs) -> nnx.List:
    out: list[nnx.Module] = []
    specs = _layer_specs()
    for i in range(start, stop):
        if i == 0:
            out.append(Stem(rngs=rngs))
        else:
            c_in, c_out, s = specs[i - 1]
            out.append(BasicBlock(c_in, c_out, s, rngs=rngs))
    return nnx.List(out)


class ResNetClient(layers.BottleneckClient):
    """Client: ``[B, H, W, 3] -> [B, h, w, bottleneck_channels]`` in (0, 1)."""

    def __init__(self, cut_layer: int, bottleneck_channels: int, *, rngs: nnx.Rngs):
        self.layers = _make_layers(0, cut_layer, rngs=rngs)
        c = cut_shape(8, cut_layer)[2]
        self.bottleneck = (
            _conv(c, bottleneck_channels, 3, rngs=rngs, bias=True) if bottleneck_channels else None
        )


class ResNetServer(nnx.Module):
    """Server: features ``[B, h, w, c] -> logits [B, num_classes]``."""

    def __init__(
        self, cut_layer: int, bottleneck_channels: int, num_classes: int, *, rngs: nnx.Rngs
    ):
        c = cut_shape(8, cut_layer)[2]
        self.unbottleneck = (
            _conv(bottleneck_channels, c, 3, rngs=rngs, bias=True) if bottleneck_channels else None
        )
        self.layers = _make_layers(cut_layer, NUM_LAYERS, rngs=rngs)
        self.fc = nnx.Linear(
            WIDTHS[-1],
            num_classes,
            kernel_init=layers.torch_kernel_init(),
            bias_init=layers.torch_bias_init(WIDTHS[-1]),
            rngs=rngs,
        )

    def __call__(self, z: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        del rngs  # no dropout in ResNet20
        x = z
        if self.unbottleneck is not None:
            x = self.unbottleneck(x)
        for layer in self.layers:
            x = layer(x)
        return self.fc(jnp.mean(x, axis=(1, 2)))


def resnet20(
    *,
    num_classes: int,
    image_size: int,
    cut_layer: int,
    bottleneck_channels: int,
    rngs: nnx.Rngs,
) -> tuple[ResNetClient, ResNetServer]:
    """Build the (client, server) pair; arguments validated by :func:`check_args`."""
    check_args(image_size, cut_layer, bottleneck_channels)
    client = ResNetClient(cut_layer, bottleneck_channels, rngs=rngs)
    server = ResNetServer(cut_layer, bottleneck_channels, num_classes, rngs=rngs)
    return client, server
