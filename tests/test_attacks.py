"""Tests of cem_jax.attacks: the decoder and GAN inversion attacks."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cem_jax import attacks, parallel

try:
    from cem_jax.entropy import mse_lower_bound
except ImportError:  # pragma: no cover - fallback until entropy.py lands

    def mse_lower_bound(conditional_entropy, dim):
        return math.exp(2.0 * float(conditional_entropy) / dim) / (2.0 * math.pi * math.e)


# --------------------------------------------------------------------------------------------------
# Linear-Gaussian toy: x ~ N(0, I_d), z = A x + sigma * eps. The MMSE estimator is linear, so a
# linear decoder trained by the attack must reach the closed-form MMSE, and nothing may beat the
# entropy floor.

D_IN, D_OUT, SIGMA = 16, 12, 0.5


def _toy():
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(D_OUT, D_IN)) / math.sqrt(D_IN)).astype(np.float32)
    a_j = jnp.asarray(a)

    def encode(key, x):
        return x @ a_j.T + SIGMA * jax.random.normal(key, (x.shape[0], D_OUT))

    x_train = rng.normal(size=(8000, D_IN)).astype(np.float32)
    x_eval = rng.normal(size=(3500, D_IN)).astype(np.float32)
    return a, encode, x_train, x_eval


TOY_CONFIG = attacks.DecoderAttackConfig(
    max_steps=3000, batch_size=200, lr=1e-2, weight_decay=0.0, eval_batch_size=1000, eval_every=50
)


def test_linear_gaussian_toy_reaches_mmse_and_respects_entropy_floor():
    a, encode, x_train, x_eval = _toy()
    post_cov = np.linalg.inv(np.eye(D_IN) + a.T.astype(np.float64) @ a / SIGMA**2)
    mmse = np.trace(post_cov) / D_IN
    _, logdet = np.linalg.slogdet(2 * np.pi * np.e * post_cov)
    h_x_given_z = 0.5 * logdet
    floor = float(mse_lower_bound(h_x_given_z, D_IN))
    np.testing.assert_allclose(floor, np.linalg.det(post_cov) ** (1 / D_IN), rtol=1e-4)
    assert floor < mmse

    calls = []
    result = attacks.decoder_attack(
        encode,
        x_train,
        x_eval,
        config=TOY_CONFIG,
        key=jax.random.key(1),
        feature_shape=(D_OUT,),
        decoder=nnx.Linear(D_OUT, D_IN, rngs=nnx.Rngs(0)),
        progress=calls.append,
    )
    mse = result.metrics["mse"]
    assert abs(mse - mmse) < 0.1 * mmse, (mse, mmse)
    assert mse >= floor
    # Its excess risk over the Bayes estimator W* = (A^T A + sigma^2 I)^-1 A^T, computed in closed
    # form from the learned weights, is small: MSE(W) = MMSE + tr((W - W*) C (W - W*)^T) / d with
    # C = A A^T + sigma^2 I the covariance of z (and the bias adds |b|^2 / d).
    w_opt = np.linalg.solve(a.T @ a + SIGMA**2 * np.eye(D_IN), a.T)
    w = np.asarray(result.decoder.kernel[...], np.float64).T
    b = np.asarray(result.decoder.bias[...], np.float64)
    cov_z = a @ a.T + SIGMA**2 * np.eye(D_OUT)
    excess = (np.trace((w - w_opt) @ cov_z @ (w - w_opt).T) + b @ b) / D_IN
    assert excess < 0.05 * mmse
    np.testing.assert_allclose(mse, mmse + excess, rtol=0.05)  # eval MSE = its expectation
    assert math.isnan(result.metrics["ssim"])  # not images
    assert result.examples.shape == (16, D_IN)
    # Converged by the plateau rule, well inside the budget, and the curve says so.
    assert result.converged and result.steps < TOY_CONFIG.max_steps
    assert [c["step"] for c in calls] == [h["step"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(50, result.steps + 1, 50))
    assert all(c["attack"] == "decoder" for c in calls) and calls[-1]["converged"]
    scales = [h["lr_scale"] for h in result.history]
    assert scales[0] == 1.0 and scales[-1] == pytest.approx(0.2**TOY_CONFIG.lr_decays)
    vals = [h["val_mse"] for h in result.history]
    best = result.history[[h["step"] for h in result.history].index(result.best_step)]
    assert best["val_mse"] == min(vals)  # the best-validation weights are the ones returned
    # Plateau rule: the last `patience` validations did not improve by 0.5 % on the one before.
    ref = vals[-TOY_CONFIG.patience - 1]
    assert all(v >= ref * (1 - TOY_CONFIG.min_improvement) for v in vals[-TOY_CONFIG.patience :])
    assert result.extra == {"num_train": 7200, "num_val": 800}


def test_budget_too_small_is_reported_unconverged():
    _, encode, x_train, x_eval = _toy()
    cfg = attacks.DecoderAttackConfig(
        max_steps=30, batch_size=200, lr=1e-2, eval_batch_size=500, eval_every=10
    )
    r = attacks.decoder_attack(
        encode,
        x_train[:2000],
        x_eval[:500],
        config=cfg,
        key=jax.random.key(2),
        feature_shape=(D_OUT,),
        decoder=nnx.Linear(D_OUT, D_IN, rngs=nnx.Rngs(0)),
    )
    assert not r.converged and r.steps == 30 and len(r.history) == 3
    assert r.summary()["converged"] is False and r.summary()["steps"] == 30


def test_mean_image_baseline_matches_numpy():
    _, _, test = _image_setup()
    train = _image_setup()[1]
    got = attacks.mean_image_baseline(train, test, batch_size=16)
    from cem_jax import metrics

    mean = train.astype(np.float64).mean(0) / 255.0
    x01 = test.astype(np.float64) / 255.0
    per = ((x01 - mean) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(got["mse"], per.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["psnr"], np.mean(-10 * np.log10(per)), rtol=1e-5)
    ssim = np.asarray(metrics.ssim(np.broadcast_to(mean, x01.shape), x01)).mean()
    np.testing.assert_allclose(got["ssim"], ssim, rtol=1e-4, atol=1e-5)


def test_split_validation_is_disjoint_and_refuses_bad_sizes():
    x = np.arange(100)[:, None]
    fit, val = attacks.split_validation(x, 0.1, batch_size=32, key=jax.random.key(0))
    assert len(val) == 10 and len(fit) == 90
    assert sorted(np.concatenate([fit, val])[:, 0].tolist()) == list(range(100))
    with pytest.raises(ValueError, match="fewer than one batch"):
        attacks.split_validation(x, 0.1, batch_size=91, key=jax.random.key(0))
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        attacks.split_validation(x, 1.5, batch_size=8, key=jax.random.key(0))


def test_mesh_of_one_device_matches_no_mesh():
    _, encode, x_train, x_eval = _toy()
    cfg = attacks.DecoderAttackConfig(
        max_steps=9, batch_size=200, lr=1e-2, eval_batch_size=500, eval_every=3
    )
    kw = dict(config=cfg, key=jax.random.key(3), feature_shape=(D_OUT,))
    lin = nnx.Linear(D_OUT, D_IN, rngs=nnx.Rngs(0))
    before = np.asarray(lin.kernel[...]).copy()
    plain = attacks.decoder_attack(encode, x_train[:2000], x_eval[:700], decoder=lin, **kw)
    meshed = attacks.decoder_attack(
        encode, x_train[:2000], x_eval[:700], decoder=lin, mesh=parallel.make_mesh(1), **kw
    )
    np.testing.assert_array_equal(np.asarray(lin.kernel[...]), before)  # input not modified
    for k in ("mse", "psnr"):
        np.testing.assert_allclose(plain.metrics[k], meshed.metrics[k], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(plain.decoder.kernel[...]), np.asarray(meshed.decoder.kernel[...]), rtol=1e-6
    )
    for a, b in zip(plain.history, meshed.history):
        np.testing.assert_allclose(a["val_mse"], b["val_mse"], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Small images end to end.

SIDE, FEAT, CH = 16, 4, 8


def _image_setup():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(210, 4, 4, 3)).astype(np.float32)
    smooth = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)
    images = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    w = jnp.asarray(rng.normal(size=(4 * 4 * 3, CH)).astype(np.float32) / 7.0)

    def encode(key, x):
        x = x.astype(jnp.float32) / 255.0
        b = x.shape[0]
        patches = x.reshape(b, FEAT, 4, FEAT, 4, 3).transpose(0, 1, 3, 2, 4, 5)
        z = jax.nn.sigmoid(patches.reshape(b, FEAT, FEAT, 48) @ w - 0.5)
        return z + 0.05 * jax.random.normal(key, z.shape)

    return encode, images[:160], images[160:]


IMG_CONFIG = attacks.DecoderAttackConfig(
    max_steps=16,
    batch_size=32,
    lr=3e-3,
    decoder="res_normN1C8",
    eval_batch_size=32,
    num_examples=5,
    eval_every=4,
)


@pytest.fixture(scope="module")
def image_attack():
    encode, train, test = _image_setup()
    result = attacks.decoder_attack(
        encode,
        train,
        test,
        config=IMG_CONFIG,
        key=jax.random.key(0),
        feature_shape=(FEAT, FEAT, CH),
    )
    return encode, train, test, result


def test_decoder_attack_on_images_learns_and_reports_metrics_in_range(image_attack):
    _, _, test, result = image_attack
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.history[-1]["val_mse"] < result.history[0]["val_mse"]
    m = result.metrics
    assert 0.0 < m["mse"] < 1.0
    assert 0.0 < m["psnr"] < 100.0 and 0.0 < m["ref_psnr"] < 100.0
    assert -1.0 <= m["ssim"] <= 1.0 and -1.0 <= m["ref_ssim"] <= 1.0
    assert result.examples.shape == (5, SIDE, SIDE, 3)
    assert np.all((result.examples > 0) & (result.examples < 1))
    assert result.wall_time_s > 0
    # The decoder's mean eval MSE must beat predicting the training mean image... or at least be
    # finite and below the variance of the pixels around 0.5 (a trivially bad reconstruction).
    x01 = test.astype(np.float64) / 255.0
    assert m["mse"] < np.mean((x01 - 0.5) ** 2) * 1.5


def test_split_encode_trains_the_same_decoder_as_the_plain_encode(image_attack):
    """The decoder attack with a SplitEncode (the client run once on the training images, only the
    noise drawn per step) equals the attack on the same encode as one function: same curve, same
    final decoder up to float32 rounding of the batched features."""
    encode, train, test, plain = image_attack
    w = jnp.asarray(np.random.default_rng(5).normal(size=(48, CH)).astype(np.float32) / 7.0)

    def features(x):
        x = x.astype(jnp.float32) / 255.0
        b = x.shape[0]
        patches = x.reshape(b, FEAT, 4, FEAT, 4, 3).transpose(0, 1, 3, 2, 4, 5)
        return jax.nn.sigmoid(patches.reshape(b, FEAT, FEAT, 48) @ w - 0.5)

    def obfuscate(key, z):
        return z + 0.05 * jax.random.normal(key, z.shape)

    split = attacks.SplitEncode(features, obfuscate)
    calls = []
    counted = attacks.SplitEncode(lambda x: calls.append(x.shape) or features(x), obfuscate)
    run = lambda enc: attacks.decoder_attack(  # noqa: E731
        enc, train, test, config=IMG_CONFIG, key=jax.random.key(0), feature_shape=(FEAT, FEAT, CH)
    )
    a, b = run(lambda key, x: obfuscate(key, features(x))), run(counted)
    assert [h["step"] for h in a.history] == [h["step"] for h in b.history]
    np.testing.assert_allclose(
        [h["val_mse"] for h in a.history], [h["val_mse"] for h in b.history], rtol=1e-4
    )
    np.testing.assert_allclose(a.metrics["mse"], b.metrics["mse"], rtol=1e-4)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5),
        jax.tree.map(np.asarray, nnx.state(a.decoder)),
        jax.tree.map(np.asarray, nnx.state(b.decoder)),
    )
    # the training steps never ran the client: it was traced for the precomputation (one batch
    # shape), the validation and the evaluation only, not once per step shape in the step
    assert split(jax.random.key(1), train[:2]).shape == (2, FEAT, FEAT, CH)
    assert len(calls) <= 4


def test_a_second_attack_on_the_same_split_encode_compiles_nothing(image_attack):
    """The decoder attack of the second data setting (another key, other images, a fresh decoder)
    reuses the jitted steps the first one compiled on the same client: no function is traced
    again, and the result is the one a fresh client object gives (the same function)."""
    _, train, test, _ = image_attack
    w = jnp.asarray(np.random.default_rng(5).normal(size=(48, CH)).astype(np.float32) / 7.0)
    traces = []

    def features(x):
        traces.append("features")  # runs when traced, not when a compiled function runs
        x = x.astype(jnp.float32) / 255.0
        b = x.shape[0]
        patches = x.reshape(b, FEAT, 4, FEAT, 4, 3).transpose(0, 1, 3, 2, 4, 5)
        return jax.nn.sigmoid(patches.reshape(b, FEAT, FEAT, 48) @ w - 0.5)

    def obfuscate(key, z):
        traces.append("obfuscate")
        return z + 0.05 * jax.random.normal(key, z.shape)

    def run(enc, key, images):
        return attacks.decoder_attack(
            enc, images, test, config=IMG_CONFIG, key=key, feature_shape=(FEAT, FEAT, CH)
        )

    shared = attacks.SplitEncode(features, obfuscate)
    run(shared, jax.random.key(0), train)
    first = len(traces)
    assert first > 0 and shared.compiled
    second = run(shared, jax.random.key(1), train[: len(train) - 10])
    # _check_encode traces encode once per call (eval_shape, no compilation); nothing else may
    checked = len(traces) - first
    assert checked <= 2, traces[first:]
    fresh = run(
        attacks.SplitEncode(features, obfuscate), jax.random.key(1), train[: len(train) - 10]
    )
    assert [h["val_mse"] for h in second.history] == [h["val_mse"] for h in fresh.history]
    assert second.metrics["mse"] == fresh.metrics["mse"]
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.tree.map(np.asarray, nnx.state(second.decoder)),
        jax.tree.map(np.asarray, nnx.state(fresh.decoder)),
    )


def test_evaluate_decoder_matches_a_direct_computation(image_attack):
    from cem_jax import metrics

    encode, _, test, result = image_attack
    key = jax.random.key(7)
    out = attacks.evaluate_decoder(
        encode, result.decoder, test, key=key, batch_size=32, num_examples=3
    )
    # Direct: batches of 32 (the last one short: 50 = 32 + 18), noise key fold_in(key, b).
    dec = result.decoder
    dec.eval()
    apply = nnx.jit(lambda m, z: m(z))
    mses, ssims, ref_psnr = [], [], []
    for b, start in enumerate(range(0, len(test), 32)):
        x = test[start : start + 32]
        rec = np.asarray(apply(dec, encode(jax.random.fold_in(key, b), jnp.asarray(x))), np.float64)
        x01 = x.astype(np.float64) / 255.0
        per = ((rec - x01) ** 2).mean(axis=(1, 2, 3))
        mses.append(per)
        ssims.append(np.asarray(metrics.ssim(rec, x01)))
        ref_psnr.append(np.full(len(x), 10 * np.log10(1 / per.mean())))
        if b == 0:
            first = rec[:3]
    dec.train()
    mses = np.concatenate(mses)
    np.testing.assert_allclose(out["mse"], mses.mean(), rtol=1e-4)
    np.testing.assert_allclose(out["psnr"], np.mean(10 * np.log10(1 / mses)), rtol=1e-4)
    np.testing.assert_allclose(out["ssim"], np.concatenate(ssims).mean(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(out["ref_psnr"], np.concatenate(ref_psnr).mean(), rtol=1e-4)
    np.testing.assert_allclose(out["examples"], first, rtol=1e-4, atol=1e-5)


GAN_CONFIG = attacks.GanAttackConfig(
    max_steps=4,
    batch_size=32,
    n_critic=2,
    critic_width=8,
    eval_batch_size=32,
    num_examples=2,
    eval_every=2,
)


@pytest.mark.slow
def test_gan_attack_runs_from_the_decoder(image_attack):
    encode, train, test, result = image_attack
    before = jax.tree.map(np.array, nnx.state(result.decoder))
    cfg = GAN_CONFIG
    calls = []
    gan = attacks.gan_attack(
        encode,
        train,
        test,
        config=cfg,
        key=jax.random.key(1),
        init_decoder=result.decoder,
        progress=calls.append,
    )
    for k in ("mse", "psnr", "ssim", "ref_psnr", "ref_ssim"):
        assert np.isfinite(gan.metrics[k]), k
    assert 0 < gan.metrics["mse"] < 1
    assert len(calls) == 2 and calls[0]["attack"] == "gan"
    assert gan.extra["generator_steps"] == 2 and gan.steps == 4
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["val_mse"]) for h in gan.history)
    assert gan.examples.shape == (2, SIDE, SIDE, 3)
    after = jax.tree.map(np.array, nnx.state(result.decoder))
    jax.tree.map(np.testing.assert_array_equal, before, after)  # init_decoder not modified
    # The generator was trained: its parameters moved away from the decoder's.
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
        nnx.state(gan.decoder, nnx.Param),
        nnx.state(result.decoder, nnx.Param),
    )
    assert max(jax.tree.leaves(moved)) > 0


def test_wgan_critic_shapes():
    for side in (32, 48, 64, 40):
        critic = nnx.eval_shape(lambda s=side: attacks.WGANCritic(s, width=4, rngs=nnx.Rngs(0)))
        assert critic.head.kernel.shape == (math.ceil(side / 8),) * 2 + (16, 1)
        out = jax.eval_shape(
            lambda m, x: m(x), critic, jax.ShapeDtypeStruct((3, side, side, 3), jnp.float32)
        )
        assert out.shape == (3,)


def test_gradient_penalty_of_a_linear_critic():
    # For D(x) = <w, x> the input gradient is w everywhere: GP = (||w|| - 1)^2.
    class Lin(nnx.Module):
        def __init__(self, w):
            self.w = w

        def __call__(self, x):
            return jnp.sum(x * self.w, axis=(1, 2, 3))

    w = jnp.full((1, 2, 2, 3), 0.5)  # ||w|| = sqrt(12) / 2
    real, fake = jnp.zeros((4, 2, 2, 3)), jnp.ones((4, 2, 2, 3))
    gp = attacks._gradient_penalty(Lin(w), real, fake, jax.random.key(0))
    np.testing.assert_allclose(gp, (math.sqrt(12) / 2 - 1) ** 2, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Settings and validation.


def test_split_settings():
    train = np.arange(30)[:, None]
    test = np.arange(100, 120)[:, None]
    s = attacks.split_settings(train, test)
    assert s["train_time"][0] is train and s["train_time"][1] is test
    np.testing.assert_array_equal(s["inference_time"][0], test[:18])
    np.testing.assert_array_equal(s["inference_time"][1], test[18:])
    with pytest.raises(ValueError, match="test_images"):
        attacks.split_settings(train, test[:1])


def test_bad_inputs_raise():
    _, encode, x_train, x_eval = _toy()
    kw = dict(
        config=TOY_CONFIG,
        key=jax.random.key(0),
        decoder=nnx.Linear(D_OUT, D_IN, rngs=nnx.Rngs(0)),
    )
    with pytest.raises(ValueError, match="eval_images"):
        attacks.decoder_attack(encode, x_train, x_eval[:, :8], feature_shape=(D_OUT,), **kw)
    with pytest.raises(ValueError, match="batch_size=200"):
        attacks.decoder_attack(encode, x_train[:100], x_eval, feature_shape=(D_OUT,), **kw)
    with pytest.raises(ValueError, match="feature_shape"):
        attacks.decoder_attack(encode, x_train, x_eval, feature_shape=(D_OUT + 1,), **kw)
    with pytest.raises(ValueError, match="decoder"):
        attacks.decoder_attack(
            encode,
            x_train,
            x_eval,
            feature_shape=(D_OUT,),
            **{**kw, "decoder": nnx.Linear(D_OUT, D_IN + 1, rngs=nnx.Rngs(0))},
        )
    with pytest.raises(ValueError, match="train_images"):
        attacks.decoder_attack(encode, x_train.astype(np.int32), x_eval, feature_shape=None, **kw)
    for bad in (
        dict(max_steps=0),
        dict(batch_size=-1),
        dict(batch_size=2.5),
        dict(lr=0.0),
        dict(weight_decay=-1e-4),
        dict(num_examples=-1),
        dict(val_fraction=1.0),
        dict(eval_every=0),
        dict(lr_decay=1.5),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            attacks.DecoderAttackConfig(**bad)
    for bad in (
        dict(n_critic=0),
        dict(critic_width=0),
        dict(b1=1.0),
        dict(gp_weight=-1.0),
        dict(mse_weight=-1.0),
        dict(critic_lr=0),
        dict(generator_lr=-1e-4),
        dict(max_steps=5),  # < n_critic: no generator step
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            attacks.GanAttackConfig(**bad)


# --------------------------------------------------------------------------------------------------
# White-box attack


def test_total_variation_matches_numpy():
    x = np.random.default_rng(0).uniform(size=(3, 5, 4, 2)).astype(np.float32)
    expected = np.abs(np.diff(x, axis=1)).sum((1, 2, 3)) + np.abs(np.diff(x, axis=2)).sum((1, 2, 3))
    np.testing.assert_allclose(attacks.total_variation(jnp.asarray(x)), expected, rtol=1e-5)


@pytest.mark.parametrize("drop", [False, True])
def test_whitebox_inverts_a_known_client_without_data(drop):
    encode, train, test = _image_setup()  # noisy sigmoid of 4x4 patches: invertible up to noise
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(48, 48)))
    w = jnp.asarray(q.astype(np.float32))  # orthogonal: the noise is not amplified

    def features(x):
        b = x.shape[0]
        patches = x.reshape(b, FEAT, 4, FEAT, 4, 3).transpose(0, 1, 3, 2, 4, 5)
        return jax.nn.sigmoid(patches.reshape(b, FEAT, FEAT, 48) @ w - 0.5)

    sigma = 0.005

    def observe(key, x):
        z = features(_to01(x))
        z = z + sigma * jax.random.normal(key, z.shape)
        if drop:  # a dropped feature arrives as an exact 0 and must be ignored by the attacker
            z = jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), z.shape) < 0.2, 0.0, z)
        return z

    cfg = attacks.WhiteboxAttackConfig(
        max_steps=3000,
        lr=0.1,
        tv_weight=0.01,
        batch_size=16,
        num_images=24,
        eval_every=50,
        tolerance=5e-3,
    )
    calls = []
    r = attacks.whitebox_attack(
        features,
        observe,
        test,
        config=cfg,
        key=jax.random.key(0),
        sigma=sigma,
        progress=calls.append,
    )
    base = attacks.mean_image_baseline(train, test[:24])
    assert r.extra["num_images"] == 24 and r.decoder is None
    assert r.metrics["mse"] < 0.1 * base["mse"], (r.metrics["mse"], base["mse"])
    assert r.converged and r.steps < 3000 and calls and calls[-1]["converged"]
    objectives = [h["loss"] for h in r.history if h["batch"] == 0]
    assert objectives == sorted(objectives, reverse=True)  # the objective decreases
    assert r.examples.shape == (16, SIDE, SIDE, 3)


def _to01(x):
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x


# --------------------------------------------------------------------------------------------------
# Resuming a killed attack (attacks.Resume): the result is the uninterrupted attack's


class _Killed(Exception):
    pass


def _kill_at(step: int, calls: list):
    def progress(d: dict) -> None:
        calls.append(d["step"])
        if d["step"] == step:
            raise _Killed  # after the checkpoint of this validation was written

    return progress


def _untimed_curve(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "steps_per_s"} for h in history]


def _assert_same_attack(a: attacks.AttackResult, b: attacks.AttackResult) -> None:
    assert _untimed_curve(a.history) == _untimed_curve(b.history)
    assert (a.steps, a.best_step, a.converged) == (b.steps, b.best_step, b.converged)
    assert a.metrics == b.metrics
    np.testing.assert_array_equal(a.examples, b.examples)
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.tree.map(np.asarray, nnx.state(a.decoder)),
        jax.tree.map(np.asarray, nnx.state(b.decoder)),
    )


def test_batches_from_a_start_step_continue_the_uninterrupted_sequence():
    import itertools

    key = jax.random.key(3)
    n, bs = 50, 8  # 6 batches per pass, 2 images left out of each
    whole = list(itertools.islice(attacks._batches(key, n, bs), 20))
    for start in (0, 1, 6, 7, 13):
        part = list(itertools.islice(attacks._batches(key, n, bs, start=start), 20 - start))
        np.testing.assert_array_equal(np.stack(part), np.stack(whole[start:]))


def test_killed_decoder_attack_resumes_to_the_uninterrupted_result(image_attack, tmp_path):
    import io

    encode, train, test, whole = image_attack  # uninterrupted, no checkpoints
    out = io.StringIO()
    resume = attacks.Resume(str(tmp_path / "dec"), identity={"run": 1}, every_s=0, stream=out)
    kwargs = dict(config=IMG_CONFIG, key=jax.random.key(0), feature_shape=(FEAT, FEAT, CH))
    first: list[int] = []
    with pytest.raises(_Killed):
        attacks.decoder_attack(
            encode, train, test, **kwargs, resume=resume, progress=_kill_at(8, first)
        )
    assert first == [4, 8]
    second: list[int] = []
    resumed = attacks.decoder_attack(
        encode, train, test, **kwargs, resume=resume, progress=_kill_at(-1, second)
    )
    assert second == [12, 16]  # steps 1-8 were not trained again
    assert "decoder attack resumed from its checkpoint at step 8/16" in out.getvalue()
    assert resumed.extra["resumed_at_step"] == 8
    _assert_same_attack(resumed, whole)
    assert resumed.wall_time_s > 0

    # finished: restored as it ended, nothing trained
    third: list[int] = []
    again = attacks.decoder_attack(
        encode, train, test, **kwargs, resume=resume, progress=_kill_at(-1, third)
    )
    assert third == [] and "at step 16/16 (finished there)" in out.getvalue()
    _assert_same_attack(again, whole)


def test_attack_checkpoint_of_another_attack_or_a_damaged_one_is_discarded(image_attack, tmp_path):
    import io

    encode, train, test, whole = image_attack
    kwargs = dict(config=IMG_CONFIG, key=jax.random.key(0), feature_shape=(FEAT, FEAT, CH))
    out = io.StringIO()
    other = attacks.Resume(str(tmp_path / "dec"), identity={"run": 2}, every_s=0, stream=out)
    with pytest.raises(_Killed):
        attacks.decoder_attack(
            encode, train, test, **kwargs, resume=other, progress=_kill_at(12, [])
        )
    # the same folder, another client: the checkpoint at step 12 must not be used
    resume = attacks.Resume(str(tmp_path / "dec"), identity={"run": 1}, every_s=0, stream=out)
    calls: list[int] = []
    with pytest.raises(_Killed):
        attacks.decoder_attack(
            encode, train, test, **kwargs, resume=resume, progress=_kill_at(8, calls)
        )
    assert calls == [4, 8]
    assert "of another attack or another client; the attack starts afresh" in out.getvalue()
    # damage the step-8 checkpoint's arrays: it is discarded too, and the attack starts afresh
    data_files = [f for f in (tmp_path / "dec" / "8" / "state").rglob("*") if f.parent.name == "d"]
    assert data_files
    for f in data_files:
        os.truncate(f, 10)
    calls.clear()
    result = attacks.decoder_attack(
        encode, train, test, **kwargs, resume=resume, progress=_kill_at(-1, calls)
    )
    assert calls == [4, 8, 12, 16]
    assert "does not restore" in out.getvalue() or "does not read" in out.getvalue()
    _assert_same_attack(result, whole)


@pytest.mark.slow
def test_killed_gan_attack_resumes_to_the_uninterrupted_result(image_attack, tmp_path):
    import io

    encode, train, test, result = image_attack
    cfg = dataclasses.replace(GAN_CONFIG, max_steps=6)
    kwargs = dict(config=cfg, key=jax.random.key(1), init_decoder=result.decoder)
    whole = attacks.gan_attack(encode, train, test, **kwargs)
    out = io.StringIO()
    resume = attacks.Resume(str(tmp_path / "gan"), identity={}, every_s=0, stream=out)
    with pytest.raises(_Killed):
        attacks.gan_attack(encode, train, test, **kwargs, resume=resume, progress=_kill_at(4, []))
    calls: list[int] = []
    resumed = attacks.gan_attack(
        encode, train, test, **kwargs, resume=resume, progress=_kill_at(-1, calls)
    )
    assert calls == [6] and "gan attack resumed from its checkpoint at step 4/6" in out.getvalue()
    assert resumed.extra["generator_steps"] == whole.extra["generator_steps"] == 3
    _assert_same_attack(resumed, whole)
    # another starting decoder: the GAN checkpoint is not used
    other = attacks.decoder_attack(
        encode,
        train,
        test,
        config=dataclasses.replace(IMG_CONFIG, max_steps=4),
        key=jax.random.key(0),
        feature_shape=(FEAT, FEAT, CH),
    )
    calls.clear()
    attacks.gan_attack(
        encode,
        train,
        test,
        **{**kwargs, "init_decoder": other.decoder},
        resume=resume,
        progress=_kill_at(-1, calls),
    )
    assert calls == [2, 4, 6] and "starts afresh" in out.getvalue()
