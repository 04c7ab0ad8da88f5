"""Split models (client encoder + server classifier), Flax NNX, NHWC.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> feature_shape("vgg11_bn_sgm", image_size=32)
(8, 8, 8)
>>> m = build_split_model("vgg11_bn_sgm", num_classes=10, image_size=32, rngs=nnx.Rngs(0))
>>> m.eval()
>>> m(jnp.zeros((2, 32, 32, 3))).shape
(2, 10)
"""

from __future__ import annotations

import jax
from flax import nnx

from cem_jax.models import resnet, vgg

ARCHS = ("vgg11_bn_sgm", "resnet20")
_DEFAULT_CUT = {"vgg11_bn_sgm": 4, "resnet20": 5}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def default_cut_layer(arch: str) -> int:
    """The reference's cut: ``vgg11_bn_sgm`` 4, ``resnet20`` 5."""
    _check_arch(arch)
    return _DEFAULT_CUT[arch]


def feature_shape(
    arch: str, *, image_size: int, cut_layer: int | None = None, bottleneck_channels: int = 8
) -> tuple[int, int, int]:
    """``(h, w, c)`` of the client's output (the tensor the server and the attacker see).

    With ``bottleneck_channels=0`` there is no bottleneck and ``c`` is the cut layer's width.
    """
    _check_arch(arch)
    cut = default_cut_layer(arch) if cut_layer is None else cut_layer
    mod = vgg if arch == "vgg11_bn_sgm" else resnet
    mod.check_args(image_size, cut, bottleneck_channels)
    h, w, c = mod.cut_shape(image_size, cut)
    return h, w, bottleneck_channels or c


class SplitModel(nnx.Module):
    """``client`` (normalised image ``[B, H, W, 3]`` -> features ``[B, h, w, c]`` in (0, 1)) and
    ``server`` (features -> logits ``[B, num_classes]``).

    Train / eval mode via ``model.train()`` / ``model.eval()`` (BatchNorm statistics, dropout).
    """

    def __init__(self, client: nnx.Module, server: nnx.Module):
        self.client = client
        self.server = server

    def encode(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, 3] -> [B, h, w, c]``."""
        return self.client(x)

    def classify(self, z: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``[B, h, w, c] -> [B, num_classes]`` logits; ``rngs`` (stream 'dropout') feeds the
        dropout in train mode, otherwise the model's own stream is used."""
        return self.server(z, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``classify(encode(x))``."""
        return self.classify(self.encode(x), rngs=rngs)


def set_impl(model: nnx.Module, *, conv: str = "auto", pool: str = "reshape") -> None:
    """Switch every :class:`layers.Conv` to ``conv`` (``'auto'``, ``'xla'``, ``'matmul'``) and every
    VGG max-pool to ``pool`` (``'reshape'``, ``'xla'``), in place. Same function either way;
    ``conv='xla', pool='xla'`` is the plain Flax formulation.
    """
    if conv not in ("auto", "xla", "matmul"):
        raise ValueError(f"conv must be 'auto', 'xla' or 'matmul', got {conv!r}")
    if pool not in ("reshape", "xla"):
        raise ValueError(f"pool must be 'reshape' or 'xla', got {pool!r}")
    model.set_attributes(impl=conv, pool_impl=pool, raise_if_not_found=False)


def build_split_model(
    arch: str,
    *,
    num_classes: int,
    image_size: int,
    cut_layer: int | None = None,
    bottleneck_channels: int = 8,
    rngs: nnx.Rngs,
) -> SplitModel:
    """Build ``arch`` split at ``cut_layer`` (default :func:`default_cut_layer`).

    The client ends with a ``bottleneck_channels``-wide 3x3 conv (bias, no ReLU) and a sigmoid;
    the server starts with the inverse 3x3 conv. ``bottleneck_channels=0``: no bottleneck convs,
    the sigmoid is applied to the cut layer's output directly.
    """
    _check_arch(arch)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    cut = default_cut_layer(arch) if cut_layer is None else cut_layer
    build = vgg.vgg11_bn_sgm if arch == "vgg11_bn_sgm" else resnet.resnet20
    client, server = build(
        num_classes=num_classes,
        image_size=image_size,
        cut_layer=cut,
        bottleneck_channels=bottleneck_channels,
        rngs=rngs,
    )
    return SplitModel(client, server)


__all__ = [
    "ARCHS",
    "SplitModel",
    "build_split_model",
    "default_cut_layer",
    "feature_shape",
    "set_impl",
]
