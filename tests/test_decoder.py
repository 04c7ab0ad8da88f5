"""Tests of cem_jax.models.decoder: the res_normN decoder and the transposed convolution."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cem_jax.models import decoder as dec
from cem_jax.models import layers


def _torch_conv_transpose_numpy(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """PyTorch ConvTranspose2d(k3, s2, p1, op1) by its definition: scatter, then crop.

    ``y_full[2i + kh, 2j + kw] += x[i, j] @ w[kh, kw]`` over the uncropped output, then rows and
    columns ``[p, p + 2h)`` are kept (``p = 1``; the output padding adds the last row/column).
    """
    b, h, w_, _ = x.shape
    full = np.zeros((b, 2 * h + 2, 2 * w_ + 2, w.shape[-1]), np.float64)
    for i in range(h):
        for j in range(w_):
            for kh in range(3):
                for kw in range(3):
                    full[:, 2 * i + kh, 2 * j + kw] += x[:, i, j].astype(np.float64) @ w[kh, kw]
    return full[:, 1 : 1 + 2 * h, 1 : 1 + 2 * w_]


def _dilated_conv_definition(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The same op as a conv of the 2x lhs-dilated input with the flipped kernel, pad (1, 2)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel[::-1, ::-1],
        window_strides=(1, 1),
        padding=((1, 2), (1, 2)),
        lhs_dilation=(2, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize("impl", ["transpose", "subpixel"])
def test_conv_transpose_matches_pytorch_definition(impl):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)
    layer = dec.ConvTranspose2x(4, 6, impl=impl, rngs=nnx.Rngs(1))
    kernel = np.asarray(layer.kernel[...])
    bias = np.asarray(layer.bias[...])
    y = layer(jnp.asarray(x))
    assert y.shape == (2, 10, 6, 6)
    expected = _torch_conv_transpose_numpy(x, kernel) + bias
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_conv_transpose_paths_equal_in_values_and_gradients():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 4, 4, 5)).astype(np.float32))
    cot = jnp.asarray(rng.normal(size=(3, 8, 8, 7)).astype(np.float32))
    kernel = dec.ConvTranspose2x(5, 7, use_bias=False, rngs=nnx.Rngs(2)).kernel[...]

    def loss(impl):
        def f(x, k):
            layer = dec.ConvTranspose2x(5, 7, use_bias=False, impl=impl, rngs=nnx.Rngs(2))
            layer.kernel[...] = k
            return jnp.sum(layer(x) * cot)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    def loss_def(x, k):
        return jnp.sum(_dilated_conv_definition(x, k) * cot)

    ref_val, ref_grads = jax.jit(jax.value_and_grad(loss_def, argnums=(0, 1)))(x, kernel)
    for impl in ("transpose", "subpixel"):
        val, grads = loss(impl)(x, kernel)
        np.testing.assert_allclose(val, ref_val, rtol=1e-4)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_conv_transpose_auto_uses_subpixel_on_cpu():
    layer = dec.ConvTranspose2x(2, 2, rngs=nnx.Rngs(0))
    expected = "subpixel" if jax.default_backend() == "cpu" else "transpose"
    assert layer.resolved_impl() == expected
    with pytest.raises(ValueError, match="impl"):
        dec.ConvTranspose2x(2, 2, impl="fft", rngs=nnx.Rngs(0))


def test_pytorch_default_init_bounds():
    layer = dec.ConvTranspose2x(16, 32, rngs=nnx.Rngs(0))
    bound = 1.0 / math.sqrt(32 * 9)  # PyTorch: fan_in of a transposed conv = out_channels * k * k
    k = np.asarray(layer.kernel[...])
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    np.testing.assert_allclose(k.std(), bound / math.sqrt(3), rtol=0.05)
    conv = dec.ResBlock(16, 8, rngs=nnx.Rngs(0)).conv1
    cb = 1.0 / math.sqrt(16 * 9)
    ck = np.asarray(conv.kernel[...])
    assert np.abs(ck).max() <= cb and np.abs(ck).max() > 0.9 * cb
    assert np.abs(np.asarray(conv.bias[...])).max() <= cb


@nnx.jit
def _apply(module, z):
    return module(z)


@pytest.mark.parametrize("image_size,feature_size", [(32, 8), (48, 12), (64, 16)])
def test_decoder_shape_and_range(image_size, feature_size):
    d = dec.decoder_from_name(
        "res_normN1C8",
        in_channels=8,
        feature_size=feature_size,
        image_size=image_size,
        rngs=nnx.Rngs(0),
    )
    assert len(d.ups) == 2
    z = jax.random.normal(jax.random.key(0), (2, feature_size, feature_size, 8))
    y = _apply(d, z)
    chex.assert_shape(y, (2, image_size, image_size, 3))
    assert bool(jnp.all((y > 0) & (y < 1)))
    d.eval()
    y_eval = _apply(d, z)
    chex.assert_shape(y_eval, (2, image_size, image_size, 3))
    assert bool(jnp.all((y_eval > 0) & (y_eval < 1)))


def _resblock_params(cin: int, cout: int) -> int:
    n = 2 * cin + (9 * cin * cout + cout) + 2 * cout + (9 * cout * cout + cout)
    if cin != cout:
        n += cin * cout + 2 * cout
    return n


def test_res_norm_n8c64_layer_list():
    d = dec.decoder_from_name(
        "res_normN8C64", in_channels=8, feature_size=8, image_size=32, rngs=nnx.Rngs(0)
    )
    assert len(d.blocks) == 8 and len(d.ups) == 2
    expected = (
        _resblock_params(8, 64)
        + 8 * _resblock_params(64, 64)
        + 2 * (9 * 64 * 64 + 64 + 2 * 64)  # ConvTranspose (with bias) + BN
        + _resblock_params(64, 3)
    )
    params = nnx.state(d, nnx.Param)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == expected
    bns = [m for _, m in nnx.iter_graph(d) if isinstance(m, nnx.BatchNorm)]
    assert len(bns) == 2 * 10 + 2 + 2  # two per ResBlock, two shortcut BNs, two after upsampling
    assert all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in bns)
    assert d.blocks[0].shortcut_conv is None and d.stem.shortcut_conv.bias is None


def test_batchnorm_running_average_matches_pytorch_momentum():
    d = dec.decoder_from_name(
        "res_normN0C4", in_channels=3, feature_size=4, image_size=4, rngs=nnx.Rngs(0)
    )
    assert len(d.ups) == 0
    z = jax.random.normal(jax.random.key(1), (16, 4, 4, 3)) + 2.0
    _apply(d, z)
    # PyTorch: running = 0.9 * running + 0.1 * batch_mean, starting from 0.
    np.testing.assert_allclose(
        np.asarray(d.stem.bn0.mean[...]), 0.1 * np.asarray(z).mean(axis=(0, 1, 2)), rtol=1e-5
    )


def test_bad_names_and_sizes_raise():
    kw = dict(in_channels=8, feature_size=8, image_size=32, rngs=nnx.Rngs(0))
    for name in ("res_normN8", "resnet", "res_normN8C64x", ""):
        with pytest.raises(ValueError, match="decoder="):
            dec.decoder_from_name(name, **kw)
    with pytest.raises(ValueError, match="power of two"):
        dec.decoder_from_name(
            "res_normN1C8", in_channels=8, feature_size=8, image_size=24, rngs=nnx.Rngs(0)
        )
    with pytest.raises(ValueError, match="power of two"):
        dec.decoder_from_name(
            "res_normN1C8", in_channels=8, feature_size=12, image_size=32, rngs=nnx.Rngs(0)
        )
    assert dec.num_upsamplings(12, 48) == 2 and dec.num_upsamplings(8, 8) == 0
    d = dec.decoder_from_name("res_normN1C8", **kw)
    with pytest.raises(ValueError, match="z.shape"):
        d(jnp.zeros((2, 8, 8, 4)))


def test_decoder_fast_paths_equal_plain_formulation():
    # the CPU rule's im2col / col2im convs and the sub-pixel upsampling against plain XLA convs
    # and lax.conv_transpose: same loss and parameter gradients in train mode (BN batch stats)
    kw = dict(in_channels=8, feature_size=4, image_size=16, num_blocks=1, width=32)
    fast = dec.InversionDecoder(**kw, rngs=nnx.Rngs(0))
    plain = dec.InversionDecoder(**kw, upsample_impl="transpose", rngs=nnx.Rngs(0))
    plain.set_attributes(impl="xla", raise_if_not_found=False)
    for up in plain.ups:
        up.impl = "transpose"
    z = jax.random.normal(jax.random.key(0), (4, 4, 4, 8))
    target = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))

    def value_and_grads(d):
        return nnx.value_and_grad(lambda d: jnp.mean((d(z) - target) ** 2))(d)

    v_fast, g_fast = value_and_grads(fast)
    v_plain, g_plain = value_and_grads(plain)
    np.testing.assert_allclose(v_fast, v_plain, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain), strict=True):
        # a bias right before a BN has a zero gradient up to rounding (~1e-10): absolute floor
        atol = max(1e-4 * np.abs(np.asarray(b)).max(), 1e-7)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=atol)


def _relus_in_compiled_step(monkeypatch, materialize) -> int:
    """ReLUs (``maximum``) in the compiled train step of ``res_normN8C16`` on 8x8 features."""
    monkeypatch.setattr(dec, "materialize", materialize)
    model = dec.decoder_from_name(
        "res_normN8C16", in_channels=8, feature_size=8, image_size=32, rngs=nnx.Rngs(0)
    )
    graphdef, state = nnx.split(model)

    def step(state, z, target):
        d = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda d: jnp.mean((d(z) - target) ** 2))(d)
        return nnx.state(d), grads, loss

    z, target = jnp.ones((8, 8, 8, 8)), jnp.ones((8, 32, 32, 3))
    return jax.jit(step).lower(state, z, target).compile().as_text().count(" maximum(")


def test_residual_stream_is_computed_once(monkeypatch):
    # Without materialize, XLA:CPU recomputes each block's output (relu of the residual sum) in
    # every later consumer, up to 8 blocks deep, inside the kernel gradients' transposes.
    if jax.default_backend() != "cpu":
        return  # materialize is the identity elsewhere; nothing to compare
    fused = _relus_in_compiled_step(monkeypatch, lambda x, anchor: x)
    kept = _relus_in_compiled_step(monkeypatch, layers.materialize)
    assert kept < 0.6 * fused, (kept, fused)
