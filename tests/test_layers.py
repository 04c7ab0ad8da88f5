"""Tests for cem_jax.models.layers: the conv paths, the 2x2 max-pool and the init helpers."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cem_jax.models import layers

# (H, c_in, c_out, kernel, stride, padding): every conv shape of VGG11 cut 4 and ResNet20, with small
# channel counts where the channel count does not change the code path.
SHAPES = [
    (32, 3, 16, 3, 1, "SAME"),  # VGG first conv
    (8, 16, 8, 3, 1, 1),  # bottleneck
    (8, 8, 16, 3, 1, 1),  # inverse bottleneck
    (4, 16, 16, 3, 1, 1),
    (2, 32, 16, 3, 1, 1),  # end of VGG at 32 px: matmul path under 'auto'
    (1, 8, 8, 3, 1, "SAME"),
    (3, 8, 8, 3, 1, 1),
    (16, 3, 16, 5, 1, 2),  # ResNet stem
    (16, 16, 32, 3, 2, 1),  # ResNet stride-2 conv, PyTorch padding
    (9, 8, 8, 3, 2, "SAME"),  # odd size, asymmetric SAME padding
    (8, 8, 16, 5, 2, 2),  # WGAN-GP critic's 5x5 stride-2 conv
    (6, 8, 8, 3, 1, "VALID"),
    (6, 8, 8, 3, 1, ((0, 2), (1, 0))),
    (8, 8, 3, 1, 1, 0),  # decoder head's 1x1 shortcut: a plain dot under 'auto' on CPU
    (6, 8, 12, 2, 1, ((0, 1), (0, 1))),  # decoder's sub-pixel upsampling conv (2x2, 4*c_out)
    (6, 32, 3, 3, 1, 1),  # decoder head's thin 3x3 conv: col2im under 'auto' on CPU
]


def _impls(s, auto=True):
    return (
        ("xla", "matmul", "xla_dotgrad")
        + (("col2im",) if s == 1 else ())
        + (("auto",) if auto else ())
    )


def _pads(padding, h, k, s):
    return layers.resolve_padding(padding, (h, h), (k, k), (s, s))


def numpy_conv(x, w, s, pads):
    """Direct-loop cross-correlation, independent of XLA."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    w = np.asarray(w, np.float64)
    kh, kw = w.shape[:2]
    ho = (x.shape[1] - kh) // s + 1
    wo = (x.shape[2] - kw) // s + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * s : i * s + kh, j * s : j * s + kw, :]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
    return out


def _xw(h, ci, co, k, seed=0):
    kx, kk = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (2, h, h, ci)), jax.random.normal(kk, (k, k, ci, co)) / k


@pytest.mark.parametrize("h,ci,co,k,s,padding", SHAPES)
def test_conv2d_paths_equal_numpy_and_lax(h, ci, co, k, s, padding):
    x, w = _xw(h, ci, co, k)
    pads = _pads(padding, h, k, s)
    ref = numpy_conv(x, w, s, pads)
    lax_out = jax.lax.conv_general_dilated(
        x, w, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    for impl in _impls(s):
        out = layers.conv2d(x, w, strides=s, padding=padding, impl=impl)
        chex.assert_shape(out, ref.shape)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(out, lax_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h,ci,co,k,s,padding", SHAPES)
def test_conv2d_gradients_equal(h, ci, co, k, s, padding):
    x, w = _xw(h, ci, co, k, seed=1)
    pads = _pads(padding, h, k, s)
    target = jax.random.normal(jax.random.key(2), numpy_conv(x[:1], w, s, pads).shape[1:])

    def loss_lax(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(jnp.sin(y) * target)

    gx_ref, gw_ref = jax.grad(loss_lax, argnums=(0, 1))(x, w)
    for impl in _impls(s, auto=False):
        loss = lambda x, w, impl=impl: jnp.sum(
            jnp.sin(layers.conv2d(x, w, strides=s, padding=padding, impl=impl)) * target
        )
        gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
        # float32 sums of up to B*H*W terms in a different order: tolerance relative to the scale
        np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5 * np.abs(gx_ref).max())
        np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=1e-5 * np.abs(gw_ref).max())


@pytest.mark.parametrize("h,ci,co,k,s,padding", [(8, 8, 16, 5, 2, 2), (9, 8, 8, 3, 2, "SAME")])
def test_conv2d_second_derivatives_equal(h, ci, co, k, s, padding):
    # a gradient penalty differentiates the input gradient again (WGAN-GP critic)
    x, w = _xw(h, ci, co, k, seed=3)
    pads = _pads(padding, h, k, s)

    def penalty(conv, w, x):
        g = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, w))))(x)
        return jnp.sum((jnp.sqrt(jnp.sum(g**2, axis=(1, 2, 3))) - 1.0) ** 2)

    def lax_conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    ref = jax.grad(penalty, argnums=1)(lax_conv, w, x)
    for impl in ("xla", "matmul", "xla_dotgrad", "auto"):
        conv = lambda x, w, impl=impl: layers.conv2d(x, w, strides=s, padding=padding, impl=impl)
        got = jax.grad(penalty, argnums=1)(conv, w, x)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("impl", ["xla", "matmul", "auto"])
@pytest.mark.parametrize("h,padding", [(8, "SAME"), (2, "SAME"), (5, ((1, 1), (1, 1)))])
def test_conv_module_equals_nnx_conv(impl, h, padding):
    ours = layers.Conv(6, 5, 3, padding=padding, impl=impl, rngs=nnx.Rngs(0))
    ref = nnx.Conv(6, 5, (3, 3), padding=padding, rngs=nnx.Rngs(1))
    chex.assert_equal_shape([ours.kernel[...], ref.kernel[...]])
    chex.assert_equal_shape([ours.bias[...], ref.bias[...]])
    ref.kernel[...] = ours.kernel[...]
    ref.bias[...] = jnp.linspace(-1.0, 1.0, 5)
    ours.bias[...] = ref.bias[...]
    x = jax.random.normal(jax.random.key(3), (3, h, h, 6))
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_conv_without_bias_and_stride():
    conv = layers.Conv(4, 3, 3, 2, padding=1, use_bias=False, rngs=nnx.Rngs(0))
    assert conv.bias is None
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 4))
    np.testing.assert_allclose(
        conv(x), numpy_conv(x, conv.kernel[...], 2, ((1, 1), (1, 1))), rtol=1e-5, atol=1e-5
    )


def test_use_matmul_rule():
    # CPU and a map smaller than the kernel -> matmul; otherwise XLA; never on other backends.
    assert layers.use_matmul((2, 2), (3, 3), 512, 512, (1, 1), backend="cpu")
    assert layers.use_matmul((4, 2), (3, 3), 8, 8, (1, 1), backend="cpu")
    assert not layers.use_matmul((4, 4), (3, 3), 512, 512, (1, 1), backend="cpu")
    # big stride-1 convs on maps of 16x16 and more: XLA's kernel gradient was slow there without
    # YNNPACK (d); with it (cem_jax.xla_cpu's flags) XLA is faster, forward pass included
    assert layers.use_matmul((16, 16), (3, 3), 64, 128, (1, 1), backend="cpu", ynn=False)
    assert not layers.use_matmul((16, 16), (3, 3), 64, 128, (1, 1), backend="cpu", ynn=True)
    assert not layers.use_matmul((16, 16), (3, 3), 64, 64, (1, 1), backend="cpu", ynn=True)
    assert not layers.use_matmul((32, 32), (3, 3), 32, 32, (1, 1), backend="cpu")
    assert not layers.use_matmul((16, 16), (3, 3), 64, 8, (1, 1), backend="cpu")
    assert not layers.use_matmul((8, 8), (3, 3), 256, 256, (1, 1), backend="cpu")
    # kernels of at most 2x2 at stride 1 (1x1 shortcut, sub-pixel upsampling): a cheap im2col,
    # unless XLA hands them to YNNPACK (cem_jax.xla_cpu), which is faster there, at any map size
    assert layers.use_matmul((32, 32), (1, 1), 64, 3, (1, 1), backend="cpu", ynn=False)
    assert layers.use_matmul((8, 8), (2, 2), 64, 256, (1, 1), backend="cpu", ynn=False)
    assert not layers.use_matmul((32, 32), (1, 1), 64, 3, (1, 1), backend="cpu", ynn=True)
    assert not layers.use_matmul((16, 16), (2, 2), 64, 256, (1, 1), backend="cpu", ynn=True)
    assert layers.use_matmul((16, 16), (2, 2), 64, 256, (2, 2), backend="cpu", ynn=True)  # (b)
    assert not layers.use_matmul((8, 8), (2, 2), 64, 256, (1, 1), backend="gpu")


def test_ynn_rule_follows_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise")
    assert not layers.use_matmul((8, 8), (2, 2), 64, 256, (1, 1), backend="cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=eltwise")
    assert layers.use_matmul((8, 8), (2, 2), 64, 256, (1, 1), backend="cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert layers.use_matmul((8, 8), (2, 2), 64, 256, (1, 1), backend="cpu")


def test_use_dotgrad_rule():
    # stride-1 kernels of at most 2x2 left on XLA (the decoder's 1x1 shortcuts and sub-pixel
    # upsamplings): XLA's forward and input gradient, the kernel gradient as one matmul
    assert layers.use_dotgrad((32, 32), (1, 1), 64, 3, (1, 1), backend="cpu")
    assert layers.use_dotgrad((16, 16), (2, 2), 64, 256, (1, 1), backend="cpu")
    assert not layers.use_dotgrad((8, 8), (3, 3), 64, 64, (1, 1), backend="cpu")
    assert not layers.use_dotgrad((16, 16), (2, 2), 64, 256, (2, 2), backend="cpu")
    assert not layers.use_dotgrad((32, 32), (1, 1), 64, 3, (1, 1), backend="gpu")


def test_auto_takes_the_kernel_gradient_as_a_dot(monkeypatch):
    # under YNN, 'auto' leaves a 1x1 stride-1 conv on XLA (its forward is XLA's conv) but takes
    # its kernel gradient as a dot_general; plain 'xla' has no dot anywhere
    monkeypatch.setattr(layers, "_ynn_enabled", lambda: True)
    x, w = _xw(8, 6, 3, 1)

    def jaxprs(impl):
        conv = lambda x, w: layers.conv2d(x, w, padding=0, impl=impl)  # noqa: E731
        fwd = str(jax.make_jaxpr(conv)(x, w))
        grad = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(conv(x, w) ** 2)))(w))
        return fwd, grad

    fwd, grad = jaxprs("auto")
    assert "conv_general_dilated" in fwd and "dot_general" not in fwd
    assert "dot_general" in grad
    fwd, grad = jaxprs("xla")
    assert "dot_general" not in fwd + grad


def test_use_col2im_rule():
    # thin (<= 4 channel) stride-1 outputs with kh*kw*c_out <= c_in: the decoder head's 3x3 64->3
    assert layers.use_col2im((32, 32), (3, 3), 64, 3, (1, 1), backend="cpu")
    assert not layers.use_col2im((32, 32), (3, 3), 64, 3, (1, 1), backend="gpu")
    assert not layers.use_col2im((32, 32), (3, 3), 3, 3, (1, 1), backend="cpu")
    assert not layers.use_col2im((16, 16), (3, 3), 64, 8, (1, 1), backend="cpu")  # bottleneck
    assert not layers.use_col2im((8, 8), (3, 3), 128, 8, (1, 1), backend="cpu")
    assert not layers.use_col2im((32, 32), (1, 1), 64, 3, (1, 1), backend="cpu")
    assert not layers.use_col2im((32, 32), (3, 3), 64, 3, (2, 2), backend="cpu")
    # strided convs: XLA:CPU's dilated-conv gradients fall back to a naive loop
    assert layers.use_matmul((8, 8), (5, 5), 128, 256, (2, 2), backend="cpu")
    assert layers.use_matmul((64, 64), (3, 3), 16, 32, (2, 2), backend="cpu")
    assert not layers.use_matmul((8, 8), (5, 5), 128, 256, (2, 2), backend="gpu")
    assert not layers.use_matmul((2, 2), (3, 3), 512, 512, (1, 1), backend="gpu")


def test_conv_bad_inputs():
    x, w = _xw(4, 3, 2, 3)
    with pytest.raises(ValueError, match="impl"):
        layers.conv2d(x, w, impl="fast")
    with pytest.raises(ValueError, match="stride 1"):
        layers.conv2d(x, w, strides=2, impl="col2im")
    with pytest.raises(ValueError, match="padding"):
        layers.conv2d(x, w, padding="FULL")
    with pytest.raises(ValueError, match="padding"):
        layers.conv2d(x, w, padding=-1)
    with pytest.raises(ValueError, match="strides"):
        layers.conv2d(x, w, strides=0)
    with pytest.raises(ValueError, match="kernel"):
        layers.conv2d(x, w[:, :, :2])
    with pytest.raises(ValueError, match="impl"):
        layers.Conv(3, 2, 3, impl="gemm", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        layers.Conv(0, 2, 3, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------- max-pool


def numpy_max_pool_grad(x, g):
    """Value and gradient of 2x2/2 max-pool; gradient to the first maximum in row-major order."""
    x = np.asarray(x)
    b, h, w, c = x.shape
    out = np.zeros((b, h // 2, w // 2, c))
    dx = np.zeros_like(x)
    for n in range(b):
        for i in range(h // 2):
            for j in range(w // 2):
                for ch in range(c):
                    win = x[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, ch].ravel()
                    a = int(np.argmax(win))
                    out[n, i, j, ch] = win[a]
                    dx[n, 2 * i + a // 2, 2 * j + a % 2, ch] = g[n, i, j, ch]
    return out, dx


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (1, 5, 7, 2), (2, 2, 2, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_equals_nnx_max_pool(shape, ties):
    key = jax.random.key(sum(shape))
    if ties:  # few distinct values: many windows have tied maxima (like zeros after a ReLU)
        x = jax.random.randint(key, shape, 0, 2).astype(jnp.float32)
    else:
        x = jax.random.normal(key, shape)
    g = jax.random.normal(jax.random.key(7), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    ref_out, ref_dx = numpy_max_pool_grad(x, np.asarray(g))
    for impl in ("reshape", "xla"):
        out, vjp = jax.vjp(lambda x, impl=impl: layers.max_pool_2x2(x, impl=impl), x)
        np.testing.assert_array_equal(out, ref_out)
        np.testing.assert_array_equal(vjp(g)[0], ref_dx)
    out, vjp = jax.vjp(lambda x: nnx.max_pool(x, (2, 2), (2, 2)), x)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(vjp(g)[0], ref_dx)


def test_max_pool_under_jit_and_bad_input():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    f = jax.jit(jax.grad(lambda x: jnp.sum(layers.max_pool_2x2(x) ** 2)))
    r = jax.grad(lambda x: jnp.sum(nnx.max_pool(x, (2, 2), (2, 2)) ** 2))(x)
    np.testing.assert_allclose(f(x), r, rtol=1e-6)
    with pytest.raises(ValueError, match="impl"):
        layers.max_pool_2x2(x, impl="fast")
    with pytest.raises(ValueError, match="B, H, W, C"):
        layers.max_pool_2x2(x[0])


# ---------------------------------------------------------------------------------- inits


def test_torch_default_inits():
    fan_in = 3 * 3 * 64
    w = layers.torch_kernel_init()(jax.random.key(0), (3, 3, 64, 128))
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt 5): sqrt(6/(1+5)) * sqrt(3/fan_in)
    assert float(jnp.max(jnp.abs(w))) <= bound
    np.testing.assert_allclose(float(jnp.max(jnp.abs(w))), bound, rtol=0.01)
    np.testing.assert_allclose(float(jnp.var(w)), bound**2 / 3, rtol=0.03)
    b = layers.torch_bias_init(fan_in)(jax.random.key(1), (4096,))
    assert float(jnp.max(jnp.abs(b))) <= bound
    np.testing.assert_allclose(float(jnp.var(b)), bound**2 / 3, rtol=0.1)
    with pytest.raises(ValueError, match="fan_in"):
        layers.torch_bias_init(0)


def test_xavier_and_he_inits():
    shape = (3, 3, 64, 128)
    w = layers.xavier_uniform_init()(jax.random.key(0), shape)
    bound = math.sqrt(6.0 / (9 * 64 + 9 * 128))
    assert float(jnp.max(jnp.abs(w))) <= bound
    np.testing.assert_allclose(float(jnp.var(w)), bound**2 / 3, rtol=0.03)
    w = layers.he_normal_fan_out_init()(jax.random.key(1), shape)
    np.testing.assert_allclose(float(jnp.std(w)), math.sqrt(2.0 / (9 * 128)), rtol=0.02)
    # untruncated normal: some samples beyond 2 std
    assert float(jnp.max(jnp.abs(w))) > 2.5 * math.sqrt(2.0 / (9 * 128))


def test_materialize_is_the_identity_bit_for_bit():
    # every value but subnormals, which XLA:CPU flushes to zero in any arithmetic op
    assert float(jax.jit(lambda v: v * 1.5)(jnp.float32(3e-39))) == 0.0
    x = jnp.array([1.5, -0.0, 0.0, jnp.inf, -jnp.inf, jnp.nan, 2e-38, -1e38, 7.0], jnp.float32)
    for anchor in (jnp.ones((2, 3)), jnp.full((2, 3), jnp.nan), jnp.full((1,), -jnp.inf)):
        out = layers.materialize(x, anchor)
        np.testing.assert_array_equal(
            np.asarray(out).view(np.uint32), np.asarray(x).view(np.uint32)
        )
    g = jax.grad(lambda x: jnp.sum(jnp.sin(layers.materialize(x, x)) * 3.0))(jnp.arange(4.0))
    np.testing.assert_array_equal(g, 3.0 * np.cos(np.arange(4.0, dtype=np.float32)))
