"""Tests for cem_jax.models: split VGG11-BN-sgm and ResNet20."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cem_jax.models import (
    ARCHS,
    build_split_model,
    default_cut_layer,
    feature_shape,
    resnet,
    set_impl,
)


def _shapes(model, image_size, batch=2):
    """(features, logits) shapes without running the model."""
    model.eval()
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    z = jax.eval_shape(model.encode, x)
    logits = jax.eval_shape(model.classify, z)
    return z.shape, logits.shape


# Reference §2.2 (CHW there, HWC here).
TABLE = [
    ("vgg11_bn_sgm", 4, 32, (8, 8, 8)),
    ("vgg11_bn_sgm", 4, 48, (12, 12, 8)),
    ("vgg11_bn_sgm", 4, 64, (16, 16, 8)),
    ("vgg11_bn_sgm", 3, 32, (16, 16, 8)),
    ("vgg11_bn_sgm", 3, 48, (24, 24, 8)),
    ("vgg11_bn_sgm", 3, 64, (32, 32, 8)),
    ("resnet20", 5, 32, (8, 8, 8)),
    ("resnet20", 5, 64, (16, 16, 8)),
    ("resnet20", 4, 32, (16, 16, 8)),
    ("resnet20", 4, 64, (32, 32, 8)),
]


@pytest.mark.parametrize("arch,cut,size,expected", TABLE)
def test_feature_shapes_match_reference_table(arch, cut, size, expected):
    assert feature_shape(arch, image_size=size, cut_layer=cut) == expected
    model = build_split_model(arch, num_classes=7, image_size=size, cut_layer=cut, rngs=nnx.Rngs(0))
    z, logits = _shapes(model, size, batch=3)
    assert z == (3, *expected)
    assert logits == (3, 7)


def test_default_cuts_and_other_cuts():
    assert default_cut_layer("vgg11_bn_sgm") == 4
    assert default_cut_layer("resnet20") == 5
    assert feature_shape("vgg11_bn_sgm", image_size=32) == (8, 8, 8)
    assert feature_shape("resnet20", image_size=64) == (16, 16, 8)
    # every cut builds and the shapes agree with feature_shape, incl. no bottleneck
    for arch, n in (("vgg11_bn_sgm", 13), ("resnet20", 10)):
        for cut in (1, n // 2, n):
            for bott in (0, 4):
                m = build_split_model(
                    arch,
                    num_classes=3,
                    image_size=32,
                    cut_layer=cut,
                    bottleneck_channels=bott,
                    rngs=nnx.Rngs(0),
                )
                z, logits = _shapes(m, 32)
                fs = feature_shape(arch, image_size=32, cut_layer=cut, bottleneck_channels=bott)
                assert z == (2, *fs), (arch, cut, bott)
                assert logits == (2, 3)
    # no bottleneck at VGG cut 4: the cut layer's 128 channels
    assert feature_shape("vgg11_bn_sgm", image_size=32, bottleneck_channels=0) == (8, 8, 128)


def _count(tree):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))


def test_vgg_param_counts_by_hand():
    model = build_split_model("vgg11_bn_sgm", num_classes=10, image_size=32, rngs=nnx.Rngs(0))

    def conv(ci, co):
        return 3 * 3 * ci * co + co

    def bn(c):
        return 2 * c  # scale + bias (running stats are not parameters)

    client = conv(3, 64) + bn(64) + conv(64, 128) + bn(128) + conv(128, 8)
    server = conv(8, 128)  # inverse bottleneck, no BN
    for ci, co in [(128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]:
        server += conv(ci, co) + bn(co)
    server += (512 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    assert _count(nnx.state(model.client, nnx.Param)) == client
    assert _count(nnx.state(model.server, nnx.Param)) == server
    # batch stats: mean and var of each BN
    assert _count(nnx.state(model.client, nnx.BatchStat)) == 2 * (64 + 128)
    # the head's first Linear sees 512 * (H/32)^2 inputs
    m64 = build_split_model("vgg11_bn_sgm", num_classes=10, image_size=64, rngs=nnx.Rngs(0))
    assert m64.server.fc1.kernel.shape == (2048, 512)


@pytest.mark.parametrize(
    "arch,size", [("vgg11_bn_sgm", 48), ("vgg11_bn_sgm", 40), ("resnet20", 60)]
)
def test_odd_sizes_follow_pytorch_rounding(arch, size):
    """VGG pools floor (48 px: 24, 12, 6, 3, 1 -> F = 512); ResNet stride-2 stages round up
    (60 px at cut 5: 60 -> 30 -> 15)."""
    m = build_split_model(arch, num_classes=5, image_size=size, rngs=nnx.Rngs(0))
    z, logits = _shapes(m, size)
    assert logits == (2, 5)
    if arch == "resnet20":
        assert z == (2, 15, 15, 8)
    else:
        assert z == (2, size // 4, size // 4, 8)
        assert m.server.fc1.kernel.shape == (512, 512)


def test_resnet_param_counts_by_hand():
    model = build_split_model("resnet20", num_classes=200, image_size=64, rngs=nnx.Rngs(0))

    def block(ci, co):
        return 9 * ci * co + 2 * co + 9 * co * co + 2 * co

    client = 25 * 3 * 16 + 2 * 16 + block(16, 32) + 2 * block(32, 32) + block(32, 64)
    client += 9 * 64 * 8 + 8
    server = 9 * 8 * 64 + 64 + 2 * block(64, 64) + block(64, 128) + 2 * block(128, 128)
    server += 128 * 200 + 200
    assert _count(nnx.state(model.client, nnx.Param)) == client
    assert _count(nnx.state(model.server, nnx.Param)) == server


def test_sigmoid_range_and_bottleneck_zero():
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    for arch in ARCHS:
        for bott in (8, 0):
            m = build_split_model(
                arch, num_classes=10, image_size=32, bottleneck_channels=bott, rngs=nnx.Rngs(1)
            )
            m.eval()
            z = m.encode(x)
            pre = x
            for layer in m.client.layers:
                pre = layer(pre)
            if bott:
                pre = m.client.bottleneck(pre)
            assert z.shape[-1] == (bott or pre.shape[-1])
            np.testing.assert_allclose(z, 1 / (1 + np.exp(-np.asarray(pre, np.float64))), atol=1e-6)
            assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
            unsaturated = np.abs(np.asarray(pre)) < 15  # float32 sigmoid rounds to 1 beyond ~17
            assert unsaturated.mean() > 0.5
            zu = np.asarray(z)[unsaturated]
            assert zu.min() > 0.0 and zu.max() < 1.0
            assert float(z.std()) > 1e-3  # not a constant


def test_train_vs_eval_and_determinism():
    model = build_split_model("vgg11_bn_sgm", num_classes=10, image_size=32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    model.train()
    assert model.server.drop1.deterministic is False
    assert model.client.layers[0].bn.use_running_average is False
    a = model(x, rngs=nnx.Rngs(dropout=1))
    b = model(x, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(a, b)  # dropout differs
    stats_after = model.client.layers[0].bn.mean[...]
    assert float(jnp.abs(stats_after).max()) > 0  # BN running mean moved
    model.eval()
    assert model.server.drop1.deterministic is True
    e1 = model(x)
    e2 = model(x, rngs=nnx.Rngs(dropout=5))
    np.testing.assert_array_equal(e1, e2)
    # eval BN uses running statistics: a single-image batch gives the same row as in the batch
    np.testing.assert_allclose(model(x[:1])[0], e1[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(e1, a)


def test_bn_momentum_matches_pytorch():
    model = build_split_model("resnet20", num_classes=10, image_size=32, rngs=nnx.Rngs(0))
    bn = model.client.layers[0].bn
    assert bn.momentum == pytest.approx(0.9) and bn.epsilon == pytest.approx(1e-5)
    # one train step from zero: running mean = 0.1 * batch mean of the conv output
    x = jax.random.normal(jax.random.key(3), (3, 32, 32, 3))
    model.train()
    pre = model.client.layers[0].conv(x)
    model.encode(x)
    np.testing.assert_allclose(bn.mean[...], 0.1 * pre.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_initialisation():
    m = build_split_model("vgg11_bn_sgm", num_classes=10, image_size=32, rngs=nnx.Rngs(0))
    # client: Xavier uniform, zero bias
    k = m.client.layers[2].conv.kernel[...]
    assert float(jnp.abs(m.client.layers[2].conv.bias[...]).max()) == 0.0
    assert float(jnp.abs(k).max()) <= math.sqrt(6 / (9 * 64 + 9 * 128))
    assert float(jnp.abs(m.client.bottleneck.bias[...]).max()) == 0.0
    # server / head: PyTorch defaults, U(+-1/sqrt(fan_in)) for weights and bias
    for conv, fan_in in ((m.server.unbottleneck, 9 * 8), (m.server.layers[0].conv, 9 * 128)):
        b = 1 / math.sqrt(fan_in)
        assert float(jnp.abs(conv.kernel[...]).max()) <= b
        assert float(jnp.abs(conv.bias[...]).max()) <= b
        assert float(jnp.abs(conv.bias[...]).max()) > 0
    assert float(jnp.abs(m.server.fc1.kernel[...]).max()) <= 1 / math.sqrt(512)
    # ResNet convs ~ N(0, sqrt(2 / (9 * c_out)))
    r = build_split_model("resnet20", num_classes=10, image_size=64, rngs=nnx.Rngs(0))
    k = r.server.layers[-1].conv1.kernel[...]
    np.testing.assert_allclose(float(k.std()), math.sqrt(2 / (9 * 128)), rtol=0.03)


def test_option_a_shortcut():
    """With the residual branch zeroed (BN scale 0), a stride-2 block is relu(pad(x[::2, ::2]))."""
    block = resnet.BasicBlock(16, 32, 2, rngs=nnx.Rngs(0))
    block.bn2.scale[...] = jnp.zeros(32)
    block.eval()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    y = block(x)
    expected = np.zeros((2, 4, 4, 32), np.float32)
    expected[..., :16] = np.maximum(np.asarray(x)[:, ::2, ::2], 0)
    np.testing.assert_allclose(y, expected, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(arch="vgg16"), "arch"),
        (dict(image_size=31), "image_size"),
        (dict(image_size=32.0), "image_size"),
        (dict(cut_layer=0), "cut_layer"),
        (dict(cut_layer=14), "cut_layer"),
        (dict(arch="resnet20", cut_layer=11), "cut_layer"),
        (dict(arch="resnet20", image_size=7), "image_size"),
        (dict(bottleneck_channels=-1), "bottleneck_channels"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = dict(arch="vgg11_bn_sgm", num_classes=10, image_size=32, cut_layer=None)
    args.update(kwargs)
    arch = args.pop("arch")
    with pytest.raises(ValueError, match=match):
        build_split_model(arch, **args, rngs=nnx.Rngs(0))
    if "num_classes" not in kwargs:
        args.pop("num_classes")
        with pytest.raises(ValueError, match=match):
            feature_shape(arch, **args)


def test_bad_impl_raises():
    m = build_split_model("resnet20", num_classes=10, image_size=32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="conv"):
        set_impl(m, conv="gemm")
    with pytest.raises(ValueError, match="pool"):
        set_impl(m, pool="avg")


def _fast_and_plain(arch, fn):
    model = build_split_model(arch, num_classes=10, image_size=32, rngs=nnx.Rngs(0))
    set_impl(model, conv="matmul", pool="reshape")  # every conv on the im2col path
    fast = fn(model)
    set_impl(model, conv="xla", pool="xla")
    return fast, fn(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_path_equals_plain_path_logits(arch):
    """Same parameters: im2col convs + reshape pool vs XLA conv + reduce_window: same logits."""
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

    def logits(model):
        model.eval()
        return model(x)

    fast, plain = _fast_and_plain(arch, logits)
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_path_equals_plain_path_gradients(arch):
    """Train mode, fixed dropout key: same loss and parameter gradients on both paths."""
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    y = jnp.array([1, 2, 3])

    def loss_and_grads(model):
        model.train()

        def loss_fn(model):
            out = model(x, rngs=nnx.Rngs(dropout=0))
            return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(3), y])

        return nnx.value_and_grad(loss_fn)(nnx.clone(model))

    (l1, g1), (l2, g2) = _fast_and_plain(arch, loss_and_grads)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    chex.assert_trees_all_close(g1, g2, rtol=1e-4, atol=1e-5)
