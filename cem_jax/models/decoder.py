"""The inversion decoder ``res_normN{N}C{C}`` of the decoder attack (reference §6.2), Flax NNX, NHWC.

Layer list for features ``[B, s, s, c]`` and images ``[B, H, H, 3]`` with ``u = log2(H / s)``:

1. ``ResBlock(c -> C)``, ReLU
2. ``N`` x [``ResBlock(C -> C)``, ReLU]
3. ``u`` x [``ConvTranspose(C -> C, k3, s2, p1, output_padding 1)``, BN, ReLU]
4. ``ResBlock(C -> 3)``
5. Sigmoid

``ResBlock`` is pre-activation: ``h = relu(bn0(x)); h = relu(bn1(conv3x3(h))); h = conv3x3(h);
out = h + shortcut(x)`` with the shortcut the identity when the channels match, otherwise a 1x1 conv
without bias followed by BN. BatchNorm momentum 0.9 (PyTorch's 0.1), epsilon 1e-5. Parameters use
PyTorch's default initialisation (uniform in ``±1/sqrt(fan_in)`` for kernels and biases).

Unlike the reference (which computes ``u = int(log2(H // s))`` and silently produces a wrong-sized
image when ``H / s`` is not a power of two), ``u`` must be an exact integer and the output always has
the requested ``image_size``.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> dec = decoder_from_name("res_normN1C8", in_channels=8, feature_size=8, image_size=32,
...                         rngs=nnx.Rngs(0))
>>> dec(jnp.zeros((2, 8, 8, 8))).shape
(2, 32, 32, 3)
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from cem_jax.models.layers import Conv, conv2d, materialize, torch_bias_init, torch_kernel_init

_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(in_ch: int, out_ch: int, kernel: int, *, bias: bool, rngs: nnx.Rngs) -> Conv:
    pad = (kernel - 1) // 2
    return Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        padding=((pad, pad), (pad, pad)),
        use_bias=bias,
        kernel_init=torch_kernel_init(),
        bias_init=torch_bias_init(in_ch * kernel * kernel),
        rngs=rngs,
    )


def _bn(ch: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(ch, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, rngs=rngs)


# Sub-pixel selection for ConvTranspose(k3, s2, p1, op1) along one spatial axis: output row 2a+r
# receives x[a + d] * W[k] exactly when _SUBPIXEL[d, r, k] == 1 (d in {0, 1}, r in {0, 1}).
# From y[2i + k - 1] += x[i] W[k]: r=0 <- (d=0, k=1); r=1 <- (d=0, k=2) and (d=1, k=0).
_SUBPIXEL = np.zeros((2, 2, 3), np.float32)
_SUBPIXEL[0, 0, 1] = 1.0
_SUBPIXEL[0, 1, 2] = 1.0
_SUBPIXEL[1, 1, 0] = 1.0


class ConvTranspose2x(nnx.Module):
    """PyTorch ``ConvTranspose2d(in, out, 3, stride=2, padding=1, output_padding=1)``: doubles H, W.

    The parameter ``kernel`` has shape ``[3, 3, in, out]`` with PyTorch semantics (no flip):
    ``y[n, 2i + kh - 1, 2j + kw - 1, o] += x[n, i, j, c] * kernel[kh, kw, c, o]``, i.e.
    ``kernel[kh, kw, c, o] == torch_weight[c, o, kh, kw]``. Two exact implementations:

    - ``"transpose"``: ``lax.conv_transpose`` (a stride-1 conv of the 2x-dilated input with the
      spatially flipped kernel, padding ``(1, 2)`` per axis);
    - ``"subpixel"``: a 2x2 stride-1 conv producing ``4 * out`` channels, then depth-to-space. The
      2x2 kernel is rearranged from ``kernel`` inside the call. About 3x faster to differentiate
      on CPU.

    ``impl="auto"`` picks ``"subpixel"`` when tracing for the CPU backend, ``"transpose"`` otherwise.
    Input ``[B, h, w, in]`` -> output ``[B, 2h, 2w, out]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if impl not in ("auto", "transpose", "subpixel"):
            raise ValueError(f"impl={impl!r}: accepted 'auto', 'transpose', 'subpixel'.")
        self.in_features = in_features
        self.out_features = out_features
        self.impl = impl
        # PyTorch computes the fan-in of a transposed conv from weight.size(1) = out channels.
        fan_in = out_features * 9
        init = nnx.initializers.variance_scaling(
            1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2
        )
        self.kernel = nnx.Param(init(rngs.params(), (3, 3, in_features, out_features)))
        self.bias = (
            nnx.Param(torch_bias_init(fan_in)(rngs.params(), (out_features,))) if use_bias else None
        )

    def resolved_impl(self) -> str:
        """The implementation used when traced now (``"auto"`` resolved on the default backend)."""
        if self.impl != "auto":
            return self.impl
        return "subpixel" if jax.default_backend() == "cpu" else "transpose"

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        if self.resolved_impl() == "subpixel":
            y = _subpixel_conv_transpose(x, kernel)
        else:
            y = lax.conv_transpose(
                x,
                kernel[::-1, ::-1],
                strides=(2, 2),
                padding=((1, 2), (1, 2)),
                dimension_numbers=_DIMS,
            )
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def _subpixel_conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Exact sub-pixel form of ConvTranspose(k3, s2, p1, op1). ``kernel`` ``[3, 3, in, out]``."""
    b, h, w, _ = x.shape
    out = kernel.shape[-1]
    sel = jnp.asarray(_SUBPIXEL, kernel.dtype)
    # k2[dh, dw, c, r, t, o] = sum_{kh, kw} sel[dh, r, kh] sel[dw, t, kw] kernel[kh, kw, c, o]
    k2 = jnp.einsum("ark,bsl,klco->abcrso", sel, sel, kernel)
    k2 = k2.reshape(2, 2, kernel.shape[2], 4 * out)
    # through the per-shape CPU rule: at 16x16 64->256 XLA's kernel gradient took 143 ms of the
    # adversarial defense's step (batch 128), the im2col matmul is far cheaper
    y = conv2d(x, k2, padding=((0, 1), (0, 1)))
    y = y.reshape(b, h, w, 2, 2, out).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, out)


class ResBlock(nnx.Module):
    """Pre-activation residual block (reference ARCH:12-51). ``[B, h, w, in] -> [B, h, w, out]``."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.bn0 = _bn(in_features, rngs)
        self.conv1 = _conv(in_features, out_features, 3, bias=True, rngs=rngs)
        self.bn1 = _bn(out_features, rngs)
        self.conv2 = _conv(out_features, out_features, 3, bias=True, rngs=rngs)
        if in_features != out_features:
            self.shortcut_conv = _conv(in_features, out_features, 1, bias=False, rngs=rngs)
            self.shortcut_bn = _bn(out_features, rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.bn0(x))
        h = jax.nn.relu(self.bn1(self.conv1(h)))
        h = self.conv2(h)
        if self.shortcut_conv is None:
            return h + x
        return h + self.shortcut_bn(self.shortcut_conv(x))


def num_upsamplings(feature_size: int, image_size: int) -> int:
    """``log2(image_size / feature_size)``; raises unless it is an integer >= 0."""
    if feature_size < 1 or image_size < 1:
        raise ValueError(
            f"feature_size={feature_size}, image_size={image_size}: both must be positive."
        )
    ratio = image_size // feature_size
    if image_size % feature_size or ratio & (ratio - 1):
        raise ValueError(
            f"image_size={image_size} / feature_size={feature_size} must be a power of two (1, 2, "
            "4, ...): the decoder upsamples by stride-2 transposed convolutions only."
        )
    return ratio.bit_length() - 1


class InversionDecoder(nnx.Module):
    """``res_normN{num_blocks}C{width}``: features ``[B, s, s, c]`` -> images ``[B, H, H, 3]`` in (0, 1).

    Args:
      in_channels: ``c``, channels of the features.
      feature_size: ``s``, spatial side of the features.
      image_size: ``H``; ``H / s`` must be a power of two.
      num_blocks: ``N``, the number of ``C -> C`` residual blocks.
      width: ``C``.
      rngs: parameter initialisation.
      upsample_impl: ``"auto"``, ``"transpose"`` or ``"subpixel"`` (see :class:`ConvTranspose2x`).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        feature_size: int,
        image_size: int,
        num_blocks: int = 8,
        width: int = 64,
        rngs: nnx.Rngs,
        upsample_impl: str = "auto",
    ):
        for name, value in (("in_channels", in_channels), ("num_blocks", num_blocks)):
            if value < (1 if name == "in_channels" else 0):
                raise ValueError(f"{name}={value}: must be >= {1 if name == 'in_channels' else 0}.")
        if width < 1:
            raise ValueError(f"width={width}: must be >= 1.")
        u = num_upsamplings(feature_size, image_size)
        self.in_channels = in_channels
        self.feature_size = feature_size
        self.image_size = image_size
        self.stem = ResBlock(in_channels, width, rngs=rngs)
        self.blocks = nnx.List([ResBlock(width, width, rngs=rngs) for _ in range(num_blocks)])
        self.ups = nnx.List(
            [ConvTranspose2x(width, width, impl=upsample_impl, rngs=rngs) for _ in range(u)]
        )
        self.up_bns = nnx.List([_bn(width, rngs) for _ in range(u)])
        self.head = ResBlock(width, 3, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        """``z`` ``[B, s, s, c]`` -> ``[B, H, H, 3]`` in (0, 1)."""
        s, c = self.feature_size, self.in_channels
        if z.ndim != 4 or z.shape[1:] != (s, s, c):
            raise ValueError(f"z.shape={z.shape}: expected [B, {s}, {s}, {c}].")
        h = jax.nn.relu(self.stem(z))
        for block in self.blocks:
            # materialize (an identity) keeps the residual stream computed once: without it XLA:CPU
            # fuses each block's sum back into every later consumer, so the kernel gradients of the
            # later blocks recompute the whole stream (up to 8 sums deep, in the transposes feeding
            # them). Decoder attack step, batch 256, one quiet process: 188 -> 229 images/s.
            h = materialize(jax.nn.relu(block(h)), z)
        for up, bn in zip(self.ups, self.up_bns):
            h = jax.nn.relu(bn(up(h)))
        return jax.nn.sigmoid(self.head(h))


_NAME = re.compile(r"res_normN(\d+)C(\d+)")


def decoder_from_name(
    name: str,
    *,
    in_channels: int,
    feature_size: int,
    image_size: int,
    rngs: nnx.Rngs,
) -> InversionDecoder:
    """Builds ``res_normN{N}C{C}`` (e.g. ``"res_normN8C64"``); any other name raises ValueError."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(
            f"decoder={name!r}: accepted names of the form 'res_normN<blocks>C<width>', "
            "e.g. 'res_normN8C64'."
        )
    return InversionDecoder(
        in_channels=in_channels,
        feature_size=feature_size,
        image_size=image_size,
        num_blocks=int(m.group(1)),
        width=int(m.group(2)),
        rngs=rngs,
    )
