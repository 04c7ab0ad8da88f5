"""``vgg11_bn_sgm`` split at a cut layer (reference §2.1), Flax NNX, NHWC.

cfg 'A' = ``[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]``; every entry (max-pools
included) is one "layer" for the cut. Client = entries ``[:cut]`` + bottleneck conv (3x3, bias, no
ReLU) + sigmoid. Server = inverse bottleneck conv (3x3, bias, no BN/ReLU) + entries ``[cut:]`` +
flatten + Dropout(0.5) -> Linear(F, 512) -> ReLU -> Dropout(0.5) -> Linear(512, 512) -> ReLU ->
Linear(512, C), ``F = 512 * s**2`` with ``s`` the side after the five pools (floor halvings:
1 for 32-63 px, 2 for 64-95 px; the reference hard-codes 512 / 2048 and breaks from 96 px).
"""

from __future__ import annotations

import jax
from flax import nnx

from cem_jax.models import layers

CFG_A: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
BN_MOMENTUM = 0.9  # flax convention: = PyTorch momentum 0.1
BN_EPSILON = 1e-5


def check_args(image_size: int, cut_layer: int, bottleneck_channels: int) -> None:
    """Raise ``ValueError`` for sizes / cuts VGG11 cannot take."""
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(
            f"image_size for vgg11_bn_sgm must be an int >= 32 (five 2x2 max-pools, each "
            f"flooring odd sizes like PyTorch), got {image_size!r}"
        )
    if not isinstance(cut_layer, int) or not 1 <= cut_layer <= len(CFG_A):
        raise ValueError(
            f"cut_layer for vgg11_bn_sgm must be in [1, {len(CFG_A)}], got {cut_layer!r}"
        )
    if not isinstance(bottleneck_channels, int) or bottleneck_channels < 0:
        raise ValueError(f"bottleneck_channels must be an int >= 0, got {bottleneck_channels!r}")


def cut_shape(image_size: int, cut_layer: int) -> tuple[int, int, int]:
    """``(h, w, c)`` of the output of cfg entry ``cut_layer - 1`` (before the bottleneck)."""
    side, ch = image_size, 3
    for v in CFG_A[:cut_layer]:
        if v == "M":
            side //= 2
        else:
            ch = int(v)
    return side, side, ch


class ConvBNReLU(nnx.Module):
    """3x3 conv (pad 1, bias) -> BatchNorm -> ReLU: ``[B, H, W, c_in] -> [B, H, W, c_out]``."""

    def __init__(self, c_in: int, c_out: int, *, torch_init: bool, rngs: nnx.Rngs):
        if torch_init:
            kinit, binit = layers.torch_kernel_init(), layers.torch_bias_init(9 * c_in)
        else:
            kinit, binit = layers.xavier_uniform_init(), nnx.initializers.zeros_init()
        self.conv = layers.Conv(
            c_in, c_out, 3, padding=1, kernel_init=kinit, bias_init=binit, rngs=rngs
        )
        self.bn = nnx.BatchNorm(c_out, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class MaxPool(nnx.Module):
    """2x2 / stride 2 max-pool (:func:`layers.max_pool_2x2`); ``pool_impl`` picks the formulation."""

    def __init__(self, pool_impl: str = "reshape"):
        self.pool_impl = pool_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.max_pool_2x2(x, impl=self.pool_impl)


def _make_layers(entries, c_in: int, *, torch_init: bool, rngs: nnx.Rngs) -> nnx.List:
    out = []
    for v in entries:
        if v == "M":
            out.append(MaxPool())
        else:
            out.append(ConvBNReLU(c_in, int(v), torch_init=torch_init, rngs=rngs))
            c_in = int(v)
    return nnx.List(out)


class VGGClient(layers.BottleneckClient):
    """Client: ``[B, H, W, 3] -> [B, h, w, bottleneck_channels]`` in (0, 1)."""

    def __init__(self, cut_layer: int, bottleneck_channels: int, *, rngs: nnx.Rngs):
        self.layers = _make_layers(CFG_A[:cut_layer], 3, torch_init=False, rngs=rngs)
        c = cut_shape(32, cut_layer)[2]
        if bottleneck_channels > 0:
            self.bottleneck = layers.Conv(
                c,
                bottleneck_channels,
                3,
                padding=1,
                kernel_init=layers.xavier_uniform_init(),
                bias_init=nnx.initializers.zeros_init(),
                rngs=rngs,
            )
        else:
            self.bottleneck = None


class VGGServer(nnx.Module):
    """Server: features ``[B, h, w, c] -> logits [B, num_classes]``."""

    def __init__(
        self,
        cut_layer: int,
        bottleneck_channels: int,
        num_classes: int,
        image_size: int,
        *,
        rngs: nnx.Rngs,
    ):
        c = cut_shape(image_size, cut_layer)[2]
        if bottleneck_channels > 0:
            self.unbottleneck = layers.Conv(
                bottleneck_channels,
                c,
                3,
                padding=1,
                kernel_init=layers.torch_kernel_init(),
                bias_init=layers.torch_bias_init(9 * bottleneck_channels),
                rngs=rngs,
            )
        else:
            self.unbottleneck = None
        self.layers = _make_layers(CFG_A[cut_layer:], c, torch_init=True, rngs=rngs)
        side = cut_shape(image_size, len(CFG_A))[0]
        flat = 512 * side**2  # 512 (32-63 px), 2048 (64-95 px), like the reference up to 95 px

        def linear(i: int, o: int) -> nnx.Linear:
            return nnx.Linear(
                i,
                o,
                kernel_init=layers.torch_kernel_init(),
                bias_init=layers.torch_bias_init(i),
                rngs=rngs,
            )

        self.drop1 = nnx.Dropout(0.5, rngs=rngs)
        self.fc1 = linear(flat, 512)
        self.drop2 = nnx.Dropout(0.5, rngs=rngs)
        self.fc2 = linear(512, 512)
        self.fc3 = linear(512, num_classes)

    def __call__(self, z: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = z
        if self.unbottleneck is not None:
            x = self.unbottleneck(x)
        for layer in self.layers:
            x = layer(x)
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(self.drop1(x, rngs=rngs)))
        x = jax.nn.relu(self.fc2(self.drop2(x, rngs=rngs)))
        return self.fc3(x)


def vgg11_bn_sgm(
    *,
    num_classes: int,
    image_size: int,
    cut_layer: int,
    bottleneck_channels: int,
    rngs: nnx.Rngs,
) -> tuple[VGGClient, VGGServer]:
    """Build the (client, server) pair; arguments validated by :func:`check_args`."""
    check_args(image_size, cut_layer, bottleneck_channels)
    client = VGGClient(cut_layer, bottleneck_channels, rngs=rngs)
    server = VGGServer(cut_layer, bottleneck_channels, num_classes, image_size, rngs=rngs)
    return client, server


__all__ = ["CFG_A", "VGGClient", "VGGServer", "vgg11_bn_sgm", "cut_shape", "check_args"]
