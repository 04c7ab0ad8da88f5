"""Tests of cem_jax/train.py: schedule, optimizer semantics, training, resume, NaN, bad workdirs."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cem_jax import config as config_lib
from cem_jax import data as data_lib
from cem_jax import train
from cem_jax.checkpoint import Checkpointer


def small_config(**kw):
    base = dict(
        dataset="synthetic",
        defense="cem_noise",
        epochs=2,
        batch_size=32,
        eval_batch_size=64,
        kmeans_iterations=5,
        attacks=(),
        seed=3,
    )
    base.update(kw)
    return config_lib.make_config("paper", **base)


@pytest.fixture(scope="module")
def tiny_data():
    return data_lib.synthetic_dataset(
        num_train=128, num_test=64, image_size=32, num_classes=4, seed=1
    )


def test_lr_schedule_milestones_match_reference():
    cfg = config_lib.make_config("paper", attacks=())
    sched = train.lr_schedule(cfg, steps_per_epoch=391)

    # epoch e (1-based) starts at step (e-1)*391; decay 0.2 at epochs 60/120/180/210 (0-based boundaries)
    def lr_at_epoch(e):
        return float(sched((e - 1) * 391))

    assert lr_at_epoch(1) == pytest.approx(0.05)  # epoch 1 trains (reference: lr 0)
    assert lr_at_epoch(60) == pytest.approx(0.05)
    assert lr_at_epoch(61) == pytest.approx(0.01)
    assert lr_at_epoch(121) == pytest.approx(0.002)
    assert lr_at_epoch(181) == pytest.approx(0.0004)
    assert lr_at_epoch(211) == pytest.approx(0.00008)
    assert lr_at_epoch(240) == pytest.approx(0.00008)
    # a short run: the 25 % milestone rounds to epoch 0 at 1 epoch; epoch 1 still trains at the base
    for epochs in (1, 2):
        short = train.lr_schedule(dataclasses.replace(cfg, epochs=epochs), steps_per_epoch=10)
        assert float(short(0)) == pytest.approx(0.05) and float(short(9)) == pytest.approx(0.05)
        assert float(short(10)) < 0.05  # the decays come after it


def test_adversary_decoder_rate_follows_reference_multistep():
    # reference §3.3: Adam 1e-3, MultiStepLR milestones [60, 150, 240, 260], gamma 0.2, 240 epochs
    cfg = config_lib.make_config("paper", defense="adversarial", attacks=())
    sched = train.adversary_lr_schedule(cfg, steps_per_epoch=391)

    def lr_at_epoch(e):
        return float(sched((e - 1) * 391))

    assert lr_at_epoch(1) == pytest.approx(1e-3)
    assert lr_at_epoch(60) == pytest.approx(1e-3)
    assert lr_at_epoch(61) == pytest.approx(2e-4)
    assert lr_at_epoch(150) == pytest.approx(2e-4)
    assert lr_at_epoch(151) == pytest.approx(4e-5)
    assert lr_at_epoch(240) == pytest.approx(4e-5)
    # the Adam step the trainer builds uses that rate: after the first milestone an update is 5x smaller
    adv_tx = train.build_adversary(cfg, (8, 8, 16), 32, steps_per_epoch=1).tx
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.5])}
    st = adv_tx.init(p)
    first, st = adv_tx.update(g, st, p)
    for _ in range(59):
        _, st = adv_tx.update(g, st, p)
    after, _ = adv_tx.update(g, st, p)  # step 61 (epoch 61 with one step per epoch)
    np.testing.assert_allclose(np.asarray(after["w"]), np.asarray(first["w"]) * 0.2, rtol=1e-4)


def test_optimizer_is_pytorch_sgd_with_coupled_weight_decay():
    cfg = config_lib.make_config("paper", attacks=(), epochs=4, lr=0.1, weight_decay=0.01)
    tx = train.make_optimizer(cfg, steps_per_epoch=1)
    p = {"w": jnp.array([1.0, -2.0, 3.0])}
    state = tx.init(p)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=3).astype(np.float32) for _ in range(4)]
    # PyTorch SGD: d = g + wd*p; buf = m*buf + d; p -= lr(step)*buf
    pn, buf = np.array([1.0, -2.0, 3.0]), np.zeros(3)
    lrs = [
        0.1,
        0.02,
        0.004,
        0.0008,
    ]  # milestones at epochs 1, 2, 3 (0.25/0.5/0.75 of 4), 0.875 -> 4
    for t, g in enumerate(grads):
        upd, state = tx.update({"w": jnp.asarray(g)}, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, upd)
        d = g + 0.01 * pn
        buf = 0.9 * buf + d
        pn = pn - lrs[t] * buf
    np.testing.assert_allclose(np.asarray(p["w"]), pn, rtol=1e-5)


@pytest.mark.slow
def test_training_learns_and_reports(tmp_path):
    ds = data_lib.synthetic_dataset(
        num_train=512, num_test=128, image_size=32, num_classes=4, seed=1
    )
    cfg = small_config(epochs=3, batch_size=64)
    res = train.train(cfg, ds, workdir=str(tmp_path))
    h = res.history
    assert [m["epoch"] for m in h] == [1, 2, 3]
    for m in h:
        for k in ("loss", "ce", "cem", "clean_acc", "defended_acc", "leakage_bits", "steps_per_s"):
            assert k in m and np.isfinite(m[k]), k
    # synthetic classes are easy: far above chance (0.25) after 3 short epochs (24 steps)
    assert h[-1]["clean_acc"] > 0.5
    assert h[-1]["ce"] < h[0]["ce"]
    assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 3
    # only the last refresh computes the full-covariance certificate, equal to a separate pass's
    assert [("leakage_bits_full" in m) for m in h] == [False, False, True]
    full = res.trainer.leakage_bound(res.state, covariance="full")
    np.testing.assert_allclose(h[-1]["leakage_bits_full"], full, rtol=1e-5)
    assert h[-1]["leakage_bits_full"] <= h[-1]["leakage_bits"] + 1e-3


@pytest.mark.slow
def test_resume_gives_same_result_as_uninterrupted(tiny_data, tmp_path):
    cfg = small_config(epochs=2)
    full = train.train(cfg, tiny_data, workdir=str(tmp_path / "full"))

    class Killed(Exception):
        pass

    def kill_in_epoch_2(epoch, trainer):
        if epoch == 2:
            raise Killed  # as if the process died mid-way through epoch 2

    t0 = time.perf_counter()
    with pytest.raises(Killed):
        train.train(cfg, tiny_data, workdir=str(tmp_path / "part"), on_epoch_start=kill_in_epoch_2)
    first_process_s = time.perf_counter() - t0
    ckpt = Checkpointer(str(tmp_path / "part" / "checkpoints"))
    assert ckpt.latest_step() == 1
    _, meta = ckpt.restore(train.Trainer(cfg, tiny_data).init_state())
    ckpt.close()
    assert 0 < meta["train_wall_time_s"] <= first_process_s
    t0 = time.perf_counter()
    resumed = train.train(cfg, tiny_data, workdir=str(tmp_path / "part"))
    second_process_s = time.perf_counter() - t0
    assert resumed.resumed_from_epoch == 1
    # the wall time counts the epoch trained before the kill too
    assert resumed.prior_wall_time_s == pytest.approx(meta["train_wall_time_s"])
    assert second_process_s < resumed.wall_time_s <= second_process_s + first_process_s
    # a checkpoint written before the field existed: its history's epoch times, a lower bound
    assert (
        train.previous_wall_time_s({"history": [{"epoch_time_s": 2.0}, {"epoch_time_s": 3.5}]})
        == 5.5
    )
    for k in ("loss", "clean_acc", "defended_acc", "leakage_bits"):
        assert resumed.final[k] == pytest.approx(full.final[k], rel=1e-4, abs=1e-5), k
    a = jax.tree.leaves(full.state.params)
    b = jax.tree.leaves(resumed.state.params)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_other_config_in_workdir_is_refused(tiny_data, tmp_path):
    train.train(small_config(epochs=1), tiny_data, workdir=str(tmp_path))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(train.IncompatibleCheckpointError, match="sigma"):
        train.train(small_config(epochs=1, sigma=0.5), tiny_data, workdir=str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    cfg = small_config(epochs=2)

    def poison_epoch_2(epoch, trainer):
        if epoch == 2:
            step = trainer.step

            def poisoned(state, idx):
                bad = jax.tree.map(lambda p: p * jnp.nan, state.params)
                return step(state.replace(params=bad), idx)

            trainer.step = poisoned

    with pytest.raises(train.NaNLossError, match=r"epoch 2, step \d+"):
        train.train(cfg, tiny_data, workdir=str(tmp_path), on_epoch_start=poison_epoch_2)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.latest_step() == 1
    state, meta = ckpt.restore(train.Trainer(cfg, tiny_data).init_state())
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert meta["epoch"] == 1


def test_client_fn_applies_the_defense(tiny_data):
    cfg = small_config(defense="noise", sigma=0.3)
    tr = train.Trainer(cfg, tiny_data)
    state = tr.init_state()
    encode = tr.client_fn(state)
    imgs = jnp.asarray(tiny_data.test_images[:8])
    z1 = encode(jax.random.key(0), imgs)
    z2 = encode(jax.random.key(1), imgs)
    clean = tr.model(state).encode(data_lib.normalize(imgs, tr.mean, tr.std))
    assert z1.shape == (8, *tr.feature_shape)
    # fresh noise per query, with the defense's standard deviation around the clean features
    assert not np.allclose(z1, z2)
    np.testing.assert_allclose(np.std(np.asarray(z1 - clean)), 0.3, rtol=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("defense", sorted(__import__("cem_jax.defenses").defenses.DEFENSES))
def test_every_defense_trains_and_compiles_once(defense, tiny_data):
    cfg = small_config(defense=defense, batch_size=16, epochs=1)
    tr = train.Trainer(cfg, tiny_data)
    state = tr.init_state()
    if tr.defense.cem:
        state, _ = tr.refresh_mixture(state, 1)
    before = jax.tree.map(np.asarray, state.params)
    order = tr.epoch_order(1)
    with jax.set_mesh(tr.mesh):
        for i in range(3):
            state, m = tr.step(state, order[i])
            assert np.isfinite(float(m["loss"])), (defense, m)
    assert tr.steps.train._cache_size() == 1  # one compilation per configuration
    moved = [
        not np.allclose(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))
    ]
    assert any(moved)
    d = tr.defense
    assert ("cem" in m) == d.cem
    assert ("dcor" in m) == (d.nopeek_alpha > 0)
    if d.adversarial_alpha > 0:
        assert 0.0 <= float(m["adv_ssim"]) <= 1.0 and np.isfinite(float(m["adv_loss"]))
        assert state.adv is not None
    # the server, the evaluation and the attacker see the same obfuscation
    enc = tr.client_fn(state)
    x = jnp.asarray(tiny_data.test_images[:16])
    clean = tr.model(state).encode(tr._preprocess(x))
    key = jax.random.key(11)
    np.testing.assert_allclose(enc(key, x), d.obfuscate(key, clean), rtol=1e-5, atol=1e-6)


def test_cem_term_enters_the_client_gradient_only_through_lambda(tiny_data):
    """loss == ce + λ·L_C after a refresh; λ = 0 trains exactly like noise alone; λ > 0 moves only
    the client differently (L_C depends on the client's features only)."""
    sigma = 0.2

    def one_step(defense, lambd):
        cfg = small_config(
            defense=defense,
            sigma=sigma,
            lambd=lambd,
            batch_size=16,
            epochs=1,
            lambda_schedule="constant",  # λ itself (the inverse_lr schedule has its own test)
        )
        tr = train.Trainer(cfg, tiny_data)
        state = tr.init_state()
        state, _ = tr.refresh_mixture(state, 1)  # the noise run fits one too (unused)
        with jax.set_mesh(tr.mesh):
            new, m = tr.step(state, tr.epoch_order(1)[0])
        return tr, jax.tree.map(np.asarray, new.params), {k: float(v) for k, v in m.items()}

    tr, p_noise, m_noise = one_step("noise", None)
    _, p_zero, m_zero = one_step("cem_noise", 0.0)
    _, p_cem, m_cem = one_step("cem_noise", 2.0)
    assert m_cem["cem"] > 0
    np.testing.assert_allclose(m_cem["loss"], m_cem["ce"] + 2.0 * m_cem["cem"], rtol=1e-5)
    np.testing.assert_allclose(m_zero["loss"], m_zero["ce"], rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, p_noise, p_zero)  # λ = 0: noise alone
    client = [
        not np.allclose(a, b, rtol=0, atol=0)
        for a, b in zip(jax.tree.leaves(p_zero["client"]), jax.tree.leaves(p_cem["client"]))
    ]
    assert any(client)  # λ > 0 changes the client's update
    for a, b in zip(jax.tree.leaves(p_zero["server"]), jax.tree.leaves(p_cem["server"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # ... and not the server's


@pytest.mark.parametrize("schedule, late", [("inverse_lr", 5.0), ("constant", 1.0)])
def test_inverse_lr_lambda_schedule_scales_the_cem_term_like_the_reference(
    tiny_data, schedule, late
):
    # inverse_lr (the default): λ_eff = λ·lr₀/lr(t), ×5 after the first ×0.2 learning-rate
    # milestone (the official 0.001/lr); constant: λ throughout.
    cfg = small_config(
        defense="cem_noise",
        lambd=0.5,
        batch_size=16,
        lr_milestones=(0.5,),
        epochs=2,
        lambda_schedule=schedule,
    )
    tr = train.Trainer(cfg, tiny_data)
    state, _ = tr.refresh_mixture(tr.init_state(), 1)
    idx = tr.epoch_order(1)[0]
    with jax.set_mesh(tr.mesh):
        for step, factor in ((0, 1.0), (tr.steps_per_epoch + 2, late)):
            s = jax.tree.map(lambda a: jnp.array(a, copy=True), state)  # the step donates it
            s = s.replace(step=jnp.asarray(step, state.step.dtype))
            _, m = tr.step(s, idx)
            np.testing.assert_allclose(float(m["lr"]), cfg.lr / 5.0 ** (step > 0), rtol=1e-6)
            np.testing.assert_allclose(
                float(m["loss"]), float(m["ce"]) + 0.5 * factor * float(m["cem"]), rtol=1e-5
            )
    with pytest.raises(ValueError, match="lambda_schedule"):
        small_config(lambda_schedule="cosine")


def test_equal_configs_share_one_compiled_step(tiny_data):
    """Two Trainers (two runs in one process) with equal configs trace and compile each step once;
    another config gets its own."""
    cfg_kw = dict(defense="cem_noise", batch_size=16, epochs=1, seed=123)
    cfg = small_config(**cfg_kw)
    train.compiled_steps.cache_clear()  # other tests may have compiled an equal spec already
    counts = []
    for _ in range(2):
        tr = train.Trainer(cfg, tiny_data)
        before = dict(train.TRACES)
        state, _ = tr.refresh_mixture(tr.init_state(), 1)
        with jax.set_mesh(tr.mesh):
            state, m = tr.step(state, tr.epoch_order(1)[0])
        tr.evaluate(state, 1)
        float(m["loss"])
        counts.append(
            {k: train.TRACES[k] - before.get(k, 0) for k in ("train", "eval", "features")}
        )
    assert counts[0] == {"train": 1, "eval": 1, "features": 1}  # first Trainer: one trace each
    assert counts[1] == {"train": 0, "eval": 0, "features": 0}  # equal config: none
    assert train.compiled_steps(tr.spec, tr.mesh).train._cache_size() == 1
    other = train.Trainer(small_config(defense="cem_noise", sigma=0.3, batch_size=16), tiny_data)
    assert other.spec != tr.spec and other.steps is not tr.steps
    # the spec is a value: rebuilding it from the same config gives an equal, hashable key
    again = train.Trainer(cfg, tiny_data)
    assert again.spec == tr.spec and hash(again.spec) == hash(tr.spec) and again.steps is tr.steps
    # the seed is an argument (the key and the initial state), not part of the program
    assert train.Trainer(small_config(**{**cfg_kw, "seed": 124}), tiny_data).steps is tr.steps


def test_init_state_is_a_fresh_copy_the_step_may_donate(tiny_data):
    """The step donates its state: a second init_state() after a step must still hold the initial
    weights (not the donated, deleted buffers) and give the same first step."""
    tr = train.Trainer(small_config(defense="noise", batch_size=16, epochs=1), tiny_data)
    idx = tr.epoch_order(1)[0]
    losses = []
    with jax.set_mesh(tr.mesh):
        for _ in range(2):
            state, m = tr.step(tr.init_state(), idx)
            losses.append(float(m["loss"]))
    assert losses[0] == losses[1]


# ------------------------------------------------------------ one-cycle, Nesterov, label smoothing
def _onecycle_numpy(lr, warmup_fraction, epochs, steps_per_epoch, t):
    """The closed form: lr·min(t/W, (T − t)/(T − W)) clipped to [0, lr], W = round(f·T)."""
    total = epochs * steps_per_epoch
    warm = int(np.floor(warmup_fraction * total + 0.5))
    t = np.asarray(t, np.float64)
    return lr * np.clip(np.minimum(t / warm, (total - t) / (total - warm)), 0.0, 1.0)


def test_onecycle_schedule_matches_its_closed_form():
    cfg = config_lib.make_config("cifar_full", epochs=10, lr=0.2, warmup_fraction=0.2, attacks=())
    spe = 196  # 50,000 images at batch 256 (the last partial batch dropped)
    sched = train.lr_schedule(cfg, steps_per_epoch=spe)
    total, warm = 1960, 392
    steps = [0, 1, 100, 391, 392, 393, 1000, 1959, 1960, 2500]
    got = np.array([float(sched(t)) for t in steps])
    np.testing.assert_allclose(got, _onecycle_numpy(0.2, 0.2, 10, spe, steps), rtol=1e-6, atol=1e-9)
    assert got[0] == 0.0 and got[4] == pytest.approx(0.2)  # from 0, peak at the end of warm-up
    assert got[-3] == pytest.approx(0.2 / (total - warm)) and got[-2] == got[-1] == 0.0
    assert train.onecycle_steps(0.2, 10, spe) == (warm, total)
    # jitted and vectorised like an optax schedule
    ts = jnp.arange(0, total + 1, 7)
    np.testing.assert_allclose(
        jax.jit(sched)(ts), _onecycle_numpy(0.2, 0.2, 10, spe, np.asarray(ts)), rtol=1e-5, atol=1e-8
    )
    # the optimizer built from the config follows it (SGD without momentum or decay: Δw = −lr(t)·g)
    flat = dataclasses.replace(cfg, momentum=0.0, weight_decay=0.0, nesterov=False)
    tx = train.make_optimizer(flat, steps_per_epoch=spe)
    w, g = {"w": jnp.array([1.0])}, {"w": jnp.array([2.0])}
    state = tx.init(w)
    for t in range(3):
        upd, state = tx.update(g, state, w)
        np.testing.assert_allclose(
            upd["w"], -2.0 * _onecycle_numpy(0.2, 0.2, 10, spe, t), rtol=1e-6, atol=1e-12
        )


def test_nesterov_momentum_is_pytorchs():
    """PyTorch SGD(nesterov=True) with coupled weight decay: d = g + wd·w; b = m·b + d;
    w -= lr·(d + m·b)."""
    lr, m, wd = 0.1, 0.9, 5e-4
    tx = train.sgd_optimizer(lambda t: lr, wd, m, nesterov=True)
    w = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(w)
    w_np, buf = np.array([1.0, -2.0]), np.zeros(2)
    for g in ([0.5, 0.25], [-1.0, 0.5], [0.3, 0.3]):
        upd, state = tx.update({"w": jnp.array(g)}, state, w)
        w = {"w": w["w"] + upd["w"]}
        d = np.array(g) + wd * w_np
        buf = m * buf + d
        w_np = w_np - lr * (d + m * buf)
        np.testing.assert_allclose(w["w"], w_np, rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.2])
def test_label_smoothing_cross_entropy_matches_numpy(eps):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 6)
    targets = (1 - eps) * np.eye(10)[labels] + eps / 10
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    logp -= logits.max(1, keepdims=True)
    want = -(targets * logp).sum(1).mean()
    got = train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_inverse_lr_lambda_under_onecycle_is_capped_and_flat_in_the_warm_up():
    lr, f, epochs, spe = 0.2, 0.2, 10, 100  # T = 1000, W = 200
    sched = train.onecycle_schedule(lr, f, epochs, spe)

    def lam(t):
        return float(
            train.inverse_lr_lambda(
                0.32,
                "onecycle",
                lr,
                sched,
                t,
                warmup_fraction=f,
                epochs=epochs,
                steps_per_epoch=spe,
            )
        )

    for t in (0, 1, 100, 199, 200):  # the warm-up: λ itself (λ rises with decays, not warm-ups)
        assert lam(t) == pytest.approx(0.32)
    for t in (300, 600, 900, 960):  # the decay: λ·lr₀/lr(t)
        assert lam(t) == pytest.approx(0.32 * lr / float(sched(t)), rel=1e-5)
    cap = train.INVERSE_LR_MAX_FACTOR
    for t in (969, 990, 999, 1000, 1500):  # the last 1/25 of the decay and beyond: ×25
        assert lam(t) == pytest.approx(0.32 * cap, rel=1e-5)
    # multistep keeps λ·lr₀/lr(t), uncapped
    ms = train.multistep_schedule(0.05, (0.5, 0.75), 0.2, 4, 10)
    for t, factor in ((0, 1), (20, 5), (35, 25)):
        got = train.inverse_lr_lambda(
            0.32, "multistep", 0.05, ms, t, warmup_fraction=f, epochs=4, steps_per_epoch=10
        )
        assert float(got) == pytest.approx(0.32 * factor, rel=1e-5)


def test_onecycle_step_scales_the_cem_term_and_smooths_the_labels(tiny_data):
    """The train step reads the one-cycle rate, its capped λ factor and the label smoothing."""
    lambd, f = 0.5, 0.25
    cfg = small_config(
        defense="cem_noise",
        lambd=lambd,
        batch_size=16,
        epochs=2,
        lr=0.1,
        lr_schedule="onecycle",
        warmup_fraction=f,
        nesterov=True,
        label_smoothing=0.1,
        lambda_schedule="inverse_lr",
    )
    tr = train.Trainer(cfg, tiny_data)
    spe = tr.steps_per_epoch
    warm, total = train.onecycle_steps(f, 2, spe)
    state, _ = tr.refresh_mixture(tr.init_state(), 1)
    idx = tr.epoch_order(1)[0]
    with jax.set_mesh(tr.mesh):
        for step in (1, warm + (total - warm) // 2, total):
            s = jax.tree.map(lambda a: jnp.array(a, copy=True), state)  # the step donates it
            s = s.replace(step=jnp.asarray(step, state.step.dtype))
            _, m = tr.step(s, idx)
            lr_t = float(_onecycle_numpy(0.1, f, 2, spe, step))
            np.testing.assert_allclose(float(m["lr"]), lr_t, rtol=1e-5, atol=1e-9)
            factor = 1.0 if step < warm else min(0.1 / lr_t if lr_t else np.inf, 25.0)
            np.testing.assert_allclose(
                float(m["loss"]), float(m["ce"]) + lambd * factor * float(m["cem"]), rtol=1e-5
            )
    # the step's cross-entropy is train.cross_entropy (tested above) with the config's ε
    assert (tr.spec.label_smoothing, tr.spec.nesterov) == (0.1, True)
