"""Layers shared by the models: a CPU-fast convolution, an exact 2x2 max-pool, PyTorch-style inits.

XLA's CPU convolution is very slow on some shapes (a 3x3 conv on a 2x2 map takes seconds at batch
128), so :class:`Conv` computes the same function either with ``lax.conv_general_dilated`` or as
im2col patches times one matmul, or (thin outputs) one matmul to every tap's output then a
shifted sum, or XLA's conv with its kernel gradient as one matmul, choosing per shape at trace time
(:func:`use_col2im`, :func:`use_matmul`, :func:`use_dotgrad`).

Everything is NHWC; kernels are ``[kh, kw, c_in, c_out]`` exactly like ``nnx.Conv``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

Impl = Literal["auto", "xla", "matmul", "col2im", "xla_dotgrad"]
_IMPLS = ("auto", "xla", "matmul", "col2im", "xla_dotgrad")
Padding = str | int | Sequence[tuple[int, int]]
_DN = ("NHWC", "HWIO", "NHWC")


# --------------------------------------------------------------------------------------------------
# Initialisers
# --------------------------------------------------------------------------------------------------


def torch_kernel_init() -> jax.nn.initializers.Initializer:
    """PyTorch's default Conv/Linear weight init, ``kaiming_uniform_(a=sqrt(5))``.

    That is ``U(-b, b)`` with ``b = gain * sqrt(3 / fan_in)``, ``gain = sqrt(2 / (1 + 5))``,
    i.e. ``b = 1 / sqrt(fan_in)``; fan_in = ``kh*kw*c_in`` (conv) or ``in_features`` (linear).
    """
    return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> jax.nn.initializers.Initializer:
    """PyTorch's default bias init ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    if fan_in <= 0:
        raise ValueError(f"fan_in must be positive, got {fan_in!r}")
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def xavier_uniform_init() -> jax.nn.initializers.Initializer:
    """Xavier/Glorot uniform (gain 1), same fans as PyTorch for HWIO kernels and [in, out] weights."""
    return jax.nn.initializers.xavier_uniform()


def he_normal_fan_out_init() -> jax.nn.initializers.Initializer:
    """``N(0, sqrt(2 / (kh*kw*c_out)))`` (untruncated), the ResNet reference's conv init."""
    return jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# --------------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------------


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        t = (v, v)
    else:
        t = tuple(int(a) for a in v)
    if len(t) != 2 or min(t) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return t  # type: ignore[return-value]


def resolve_padding(
    padding: Padding, in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit ``((top, bottom), (left, right))`` padding, the way ``nnx.Conv`` resolves it.

    ``'SAME'`` / ``'VALID'`` follow ``lax.padtype_to_pads``; an int ``p`` means ``((p, p), (p, p))``
    (PyTorch's ``padding=p``); a sequence of two pairs is taken as is.
    """
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
        pads = lax.padtype_to_pads(in_hw, kernel_hw, strides, padding.upper())
        return tuple((int(a), int(b)) for a, b in pads)  # type: ignore[return-value]
    if isinstance(padding, int):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding!r}")
        return ((padding, padding), (padding, padding))
    pads = tuple((int(a), int(b)) for a, b in padding)
    if len(pads) != 2 or min(min(p) for p in pads) < 0:
        raise ValueError(f"padding pairs must be two non-negative pairs, got {padding!r}")
    return pads  # type: ignore[return-value]


def use_matmul(
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    c_in: int,
    c_out: int,
    strides: tuple[int, int],
    backend: str | None = None,
    ynn: bool | None = None,
) -> bool:
    """The rule: im2col + matmul instead of XLA's conv, decided per shape at trace time.

    Only on CPU, in four cases, the last two only when XLA does not hand dots to YNNPACK
    (``ynn``; default: whether ``XLA_FLAGS`` enables it, as ``import cem_jax`` does, see
    :mod:`cem_jax.xla_cpu`). Figures: forward + both gradients of one conv, ms, XLA vs matmul,
    batch 128 unless noted (``python -m benchmarks.models --layers``).

    (a) The map is smaller than the kernel in some direction (XLA takes a very slow path):
        2x2 512->512: 1532 vs 29 (2026-12-07, with YNNPACK: 3782 vs 97); 2x2 128->128: 75 vs 5;
        1x1: 110 vs 27.
    (b) The conv is strided. XLA:CPU computes the kernel gradient, and any second derivative (the
        WGAN-GP critic's gradient penalty), as a dilated convolution that runs a naive loop.
        Batch 64: 8x8 128->256 k5 s2: 792 vs 48; 64x64 16->32 k3 s2: 122 vs 78; 32x32 32->64
        k3 s2: 47 vs 40; 16x16 64->128 k5 s2: 54 vs 82 (the one loss). The whole critic step
        with its gradient penalty, batch 32: 2692 vs 269.
    (c) Without YNNPACK: stride 1 with a kernel of at most 2x2 (im2col copies the input at most
        4 times; a 1x1 kernel is a plain dot). Batch 256, the decoder's shapes: 32x32 64->3 k1
        (the head's shortcut): 130 vs 36; 8x8 64->256 k2 (its first sub-pixel upsampling): 57
        vs 32. With YNNPACK they stay on XLA: the decoder attack step (batch 256, interleaved in
        one process, 5 rounds twice) 213 -> 220 images/s.
    (d) Without YNNPACK: at least 16x16 positions with ``c_in >= 32`` and ``c_out >= 64``,
        where XLA's kernel-gradient convolution was slow (measured 2026-11-29, before the flags):
        16x16 64->128: 153-161 vs 114-124; 16x16 64->64: 110 vs 93; 16x16 128->256: 494 vs 344;
        32x32 64->128 (batch 64): 357 vs 236. With YNNPACK (re-measured 2026-12-07, jaxlib
        0.10.2) XLA wins: 16x16 64->128 205 vs 270 (batch 256: 196 vs 472), 16x16 64->64 99 vs
        183. Interleaved in one process, the VGG11 cut-4 train step with these convs on XLA:
        85.9 -> 90.7 images/s (``cem_noise``, batch 256), 85.4 -> 90.0 (``none``, batch 128); the
        client's forward pass alone (the mixture refresh's features of the training set) 571 ->
        1,317 images/s: the im2col copied a 295 MB patch matrix per batch of 500 for one dot.

    Everything else stays on XLA, which is as fast or faster there: 32x32 32->32: 141 vs 157;
    8x8 128->128: 46 vs 56; 4x4 512->512: 128 vs 125 (a tie); thin outputs lose badly as a
    matmul (16x16 64->8: 19 vs 91; 8x8 128->8: 9 vs 38).

    Also tried and dropped: XLA's forward and input gradient with the kernel gradient as ``kh``
    GEMMs over row-shifted inputs (a custom VJP). It was exact but never clearly faster than the
    better of the two paths (16x16 64->128: 139 ms; 8x8 256->256: 166 vs 165). With YNNPACK, the
    kernel gradient as one im2col matmul (``'xla_dotgrad'``): 16x16 64->128, batch 256, 400 ms
    against XLA's 196.
    """
    if (backend or jax.default_backend()) != "cpu":
        return False
    if max(strides) > 1:
        return True
    ynn = _ynn_enabled() if ynn is None else ynn
    if max(kernel_hw) <= 2:
        return not ynn
    if not ynn and in_hw[0] * in_hw[1] >= 256 and c_in >= 32 and c_out >= 64:
        return True
    return in_hw[0] < kernel_hw[0] or in_hw[1] < kernel_hw[1]


def _ynn_enabled() -> bool:
    """Whether ``XLA_FLAGS`` hands dots to YNNPACK (``--xla_cpu_experimental_ynn_fusion_type``
    naming ``dot``), as :mod:`cem_jax.xla_cpu` sets it."""
    for tok in os.environ.get("XLA_FLAGS", "").split():
        name, _, value = tok.lstrip("-").partition("=")
        if name == "xla_cpu_experimental_ynn_fusion_type":
            return "dot" in value.split(",")
    return False


def use_col2im(
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    c_in: int,
    c_out: int,
    strides: tuple[int, int],
    backend: str | None = None,
) -> bool:
    """The rule for the ``'col2im'`` path (checked before :func:`use_matmul`): CPU, stride 1, a
    kernel larger than 2x2, at most 4 output channels and ``kh*kw*c_out <= c_in``.

    That is the decoder head's 3x3 64->3 conv at 32x32, where XLA's conv (thin output) and the
    im2col matmul (9x the input copied for 3 outputs) are both slow. Forward + both gradients,
    batch 256, ms: XLA 181, im2col matmul 376, col2im 140. The decoder attack step, interleaved
    runs of 9 repeats on a loaded 2-core machine: x1.10 and x1.07 (faster in 8 of 9 repeats each);
    two noisier runs (load ~7) gave x0.95 and x0.93. It loses on the clients' 8-channel bottlenecks
    (16x16 64->8: 29 vs 47; 8x8 128->8: 12 vs 16), hence ``c_out <= 4``.
    """
    if (backend or jax.default_backend()) != "cpu":
        return False
    return (
        max(strides) == 1
        and max(kernel_hw) > 2
        and c_out <= 4
        and kernel_hw[0] * kernel_hw[1] * c_out <= c_in
    )


def use_dotgrad(
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    c_in: int,
    c_out: int,
    strides: tuple[int, int],
    backend: str | None = None,
) -> bool:
    """The rule for ``'xla_dotgrad'`` (checked after :func:`use_col2im` and :func:`use_matmul`, so
    only for convs left on XLA): CPU, stride 1, a kernel of at most 2x2.

    XLA:CPU computes a kernel gradient as a convolution over the batch, which needs the input
    transposed to ``[C, H, W, B]``; it fuses that transpose with the input's producers (BatchNorm,
    ReLU, the residual sums), a strided loop that is slow on large maps. For a kernel of at most
    2x2 the im2col copy is cheap (at most 4x the input, none for 1x1), so the kernel gradient is
    one ``patches^T @ grad`` matmul instead; the forward and the input gradient stay on XLA.
    Kernel gradient of the decoder head's 1x1 64->3 shortcut at 32x32, batch 256: XLA 141 ms,
    matmul 33 ms. The decoder attack step (batch 256, interleaved in one process on a quiet CPU):
    see docs/benchmarks.md.
    """
    if (backend or jax.default_backend()) != "cpu":
        return False
    return max(strides) == 1 and max(kernel_hw) <= 2


def _conv_xla_dotgrad(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """``lax.conv_general_dilated`` whose kernel gradient is ``patches^T @ g`` (same function)."""

    def conv(x, kernel):
        return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN)

    @jax.custom_vjp
    def f(x, kernel):
        return conv(x, kernel)

    def fwd(x, kernel):
        return conv(x, kernel), (x, kernel)

    def bwd(res, g):
        x, kernel = res
        _, vjp_x = jax.vjp(lambda x: conv(x, kernel), x)
        kh, kw, ci, co = kernel.shape
        pt = _patches(x, (kh, kw), strides, pads)
        n = pt.shape[0] * pt.shape[1] * pt.shape[2]
        dk = lax.dot_general(
            pt.reshape(n, kh * kw * ci), g.reshape(n, co), (((0,), (0,)), ((), ()))
        )
        return vjp_x(g)[0], dk.reshape(kernel.shape).astype(kernel.dtype)

    f.defvjp(fwd, bwd)
    return f(x, kernel)


def _col2im(
    x: jax.Array, kernel: jax.Array, pads: tuple[tuple[int, int], tuple[int, int]]
) -> jax.Array:
    """Stride-1 conv as ``z = x @ [W_00 | W_01 | ...]`` (every tap's contribution at every input
    position, one dot) then ``y[p] = sum_ij zpad_ij[p + (i, j)]`` (zero padding commutes with the
    per-position dot). Cheap when ``kh*kw*c_out`` is small next to ``c_in``."""
    kh, kw, ci, co = kernel.shape
    b, h, w, _ = x.shape
    wk = kernel.transpose(2, 0, 1, 3).reshape(ci, kh * kw * co)
    z = (x.reshape(b * h * w, ci) @ wk).reshape(b, h, w, kh, kw, co)
    z = jnp.pad(z, ((0, 0), pads[0], pads[1], (0, 0), (0, 0), (0, 0)))
    ho, wo = h + sum(pads[0]) - kh + 1, w + sum(pads[1]) - kw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            t = z[:, i : i + ho, j : j + wo, i, j, :]
            y = t if y is None else y + t
    return y


def _patches(
    x: jax.Array,
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """im2col: ``[B, H, W, C] -> [B, Ho, Wo, kh*kw*C]``, ordered (i, j, c) like an HWIO kernel."""
    kh, kw = kernel_hw
    sh, sw = strides
    b, _, _, c = x.shape
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    hp, wp = xp.shape[1], xp.shape[2]
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    cols = [
        lax.slice(
            xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    impl: Impl = "auto",
) -> jax.Array:
    """2-D convolution (cross-correlation like every deep-learning framework), NHWC / HWIO.

    Args:
      x: ``[B, H, W, C_in]``.
      kernel: ``[kh, kw, C_in, C_out]``.
      strides: int or pair.
      padding: ``'SAME'``, ``'VALID'``, int (symmetric, PyTorch style) or ``((t, b), (l, r))``.
      impl: ``'xla'`` (``lax.conv_general_dilated``), ``'matmul'`` (im2col + one dot),
        ``'col2im'`` (one dot to every tap's output, then a shifted sum; stride 1 only),
        ``'xla_dotgrad'`` (XLA's conv, its kernel gradient as im2col + one dot) or ``'auto'``
        (:func:`use_col2im`, then :func:`use_matmul`, then :func:`use_dotgrad`). All compute the
        same function.

    Returns:
      ``[B, Ho, Wo, C_out]``.

    >>> x = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3)
    >>> k = jnp.ones((3, 3, 3, 4))
    >>> bool(jnp.allclose(conv2d(x, k, impl="xla"), conv2d(x, k, impl="matmul")))
    True
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, _IMPLS))}, got {impl!r}")
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"x must be [B, H, W, C] and kernel [kh, kw, C, C_out] with matching C, got "
            f"x {x.shape} and kernel {kernel.shape}"
        )
    st = _pair(strides, "strides")
    khw = (int(kernel.shape[0]), int(kernel.shape[1]))
    in_hw = (int(x.shape[1]), int(x.shape[2]))
    pads = resolve_padding(padding, in_hw, khw, st)
    shape = (in_hw, khw, x.shape[-1], kernel.shape[-1], st)
    if impl == "auto":
        impl = (
            "col2im"
            if use_col2im(*shape)
            else "matmul"
            if use_matmul(*shape)
            else "xla_dotgrad"
            if use_dotgrad(*shape)
            else "xla"
        )
    if impl == "xla_dotgrad":
        return _conv_xla_dotgrad(x, kernel, st, pads)
    if impl == "xla":
        return lax.conv_general_dilated(x, kernel, st, pads, dimension_numbers=_DN)
    if impl == "col2im":
        if max(st) > 1:
            raise ValueError(f"impl='col2im' needs stride 1, got strides {st}")
        return _col2im(x, kernel, pads)
    pt = _patches(x, khw, st, pads)
    b, ho, wo, k = pt.shape
    out = pt.reshape(b * ho * wo, k) @ kernel.reshape(k, kernel.shape[-1])
    return out.reshape(b, ho, wo, kernel.shape[-1])


class Conv(nnx.Module):
    """Drop-in for ``nnx.Conv`` (same ``kernel [kh, kw, c_in, c_out]`` and ``bias [c_out]``
    parameters, same function), computed by :func:`conv2d` with the per-shape CPU rule.

    ``padding`` additionally accepts an int ``p`` meaning PyTorch's symmetric ``padding=p``.

    >>> conv = Conv(3, 8, 3, rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((2, 5, 5, 3))).shape
    (2, 5, 5, 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        padding: Padding = "SAME",
        use_bias: bool = True,
        kernel_init: jax.nn.initializers.Initializer | None = None,
        bias_init: jax.nn.initializers.Initializer | None = None,
        impl: Impl = "auto",
        rngs: nnx.Rngs,
    ):
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}"
            )
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, _IMPLS))}, got {impl!r}")
        kh, kw = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        if not isinstance(padding, str | int):
            padding = tuple((int(a), int(b)) for a, b in padding)
        self.padding = padding
        self.impl = impl
        self.in_features, self.out_features = in_features, out_features
        kernel_init = kernel_init or nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, in_features, out_features)))
        if use_bias:
            bias_init = bias_init or nnx.initializers.zeros_init()
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,)))
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, c_in] -> [B, Ho, Wo, c_out]``."""
        y = conv2d(x, self.kernel[...], strides=self.strides, padding=self.padding, impl=self.impl)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def materialize(x: jax.Array, anchor: jax.Array) -> jax.Array:
    """``x`` itself, kept as one computed array on XLA:CPU instead of recomputed in every consumer.

    XLA:CPU fuses cheap elementwise producers into each of their consumers, recomputing them, and
    it drops ``lax.optimization_barrier`` before fusion. In a residual stack that recomputes the
    whole stream (``h_k = relu(c_k + h_{k-1})``, up to 8 sums deep in the decoder) inside the
    transposes that feed the kernel gradients. A divide by a value the compiler cannot fold is
    not duplicated there, so on CPU this returns ``x / one`` with
    ``one = 1 + 0 * nan_to_num(anchor[0, ..., 0])`` (``nan_to_num`` keeps it at 1 whatever
    ``anchor`` holds). ``x / 1 == x`` in IEEE arithmetic for every value, NaN and infinities
    included, and so is the gradient; the one exception, a subnormal ``x``, XLA:CPU flushes to zero
    in every arithmetic op anyway (flush-to-zero), so no consumer sees a difference. Elsewhere
    (GPU, TPU) it returns ``x`` untouched. ``anchor`` is any array computed in the same program
    (the layer's input). In the decoder attack's compiled step the ReLUs drop from 395 to 160
    (``tests/test_decoder.py``), and the step (batch 256, one quiet process) runs at 188 -> 229
    images/s (docs/benchmarks.md).

    >>> x = jnp.array([1.5, -0.0, jnp.inf, -2.0])
    >>> bool(jnp.all(materialize(x, jnp.ones(3)) == x))
    True
    """
    if jax.default_backend() != "cpu":
        return x
    first = lax.stop_gradient(anchor.reshape(-1)[0])
    one = 1.0 + 0.0 * jnp.nan_to_num(first).astype(x.dtype)
    return x / one


# --------------------------------------------------------------------------------------------------
# The client side of a split model
# --------------------------------------------------------------------------------------------------


class BottleneckClient(nnx.Module):
    """Base of the split clients: ``self.layers`` in order, then the optional ``self.bottleneck``
    conv, then a sigmoid (features in (0, 1), reference §2). Subclasses build both in ``__init__``.
    """

    layers: nnx.List
    bottleneck: Conv | None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, 3] -> [B, h, w, c]`` in (0, 1)."""
        for layer in self.layers:
            x = layer(x)
        if self.bottleneck is not None:
            x = self.bottleneck(x)
        return jax.nn.sigmoid(x)


# --------------------------------------------------------------------------------------------------
# 2x2 max-pool
# --------------------------------------------------------------------------------------------------


def _windows(x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, H/2, W/2, 4, C]``, window order (0,0), (0,1), (1,0), (1,1)."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // 2, w // 2, 4, c)


@jax.custom_vjp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
    return jnp.max(_windows(x), axis=3)


def _max_pool_fwd(x):
    win = _windows(x)
    first = jnp.argmax(win, axis=3)  # first maximum in row-major window order
    return jnp.max(win, axis=3), (first, x.shape)


def _max_pool_bwd(res, g):
    first, shape = res
    b, h, w, c = shape
    onehot = (first[:, :, :, None, :] == jnp.arange(4)[:, None]).astype(g.dtype)
    dwin = onehot * g[:, :, :, None, :]
    dx = dwin.reshape(b, h // 2, w // 2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    dx = dx.reshape(b, h // 2 * 2, w // 2 * 2, c)
    dx = jnp.pad(dx, ((0, 0), (0, h - h // 2 * 2), (0, w - w // 2 * 2), (0, 0)))
    return (dx,)


_max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_2x2(x: jax.Array, *, impl: Literal["reshape", "xla"] = "reshape") -> jax.Array:
    """2x2 max-pool, stride 2, VALID (odd trailing row/column dropped): ``[B,H,W,C] -> [B,H/2,W/2,C]``.

    Equal to ``nnx.max_pool(x, (2, 2), (2, 2))`` in value and gradient: on ties the whole
    gradient goes to the first maximum in row-major window order, like XLA's select-and-scatter
    (and PyTorch). ``impl='reshape'`` uses a reshape + max with that gradient written out;
    ``impl='xla'`` calls ``nnx.max_pool`` (``lax.reduce_window``).

    >>> x = jnp.array([[1.0, 3.0], [3.0, 2.0]]).reshape(1, 2, 2, 1)
    >>> jax.grad(lambda x: max_pool_2x2(x).sum())(x).reshape(2, 2)
    Array([[0., 1.],
           [0., 0.]], dtype=float32)
    """
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}")
    if impl == "xla":
        return nnx.max_pool(x, (2, 2), (2, 2))
    if impl != "reshape":
        raise ValueError(f"impl must be 'reshape' or 'xla', got {impl!r}")
    return _max_pool_2x2(x)
