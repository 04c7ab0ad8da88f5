"""Benchmark of the decoder attack's training step, side by side with the same step in PyTorch.

    python -m benchmarks.attack_step                 # JAX vs PyTorch images/s and their ratio
    python -m benchmarks.attack_step --json          # one JSON object
    python -m benchmarks.attack_step --batch 64 --steps 2 --repeats 3   # quick
    python -m benchmarks.attack_step --extras        # + sub-pixel vs transpose, WGAN-GP critic

Times the jitted step of :func:`cem_jax.attacks.decoder_attack` (``res_normN8C64`` decoder, Adam with
weight decay, donated state) at batch 256 on 32 px images with 8x8x8 features from a fixed random
patch-linear + sigmoid + Gaussian-noise client, and the same step in PyTorch
(:mod:`benchmarks.torch_decoder`: same layers, MSE, ``Adam(lr=1e-3, weight_decay=1e-4)``, as many
threads as JAX has cores). PyTorch is optional (``pip install torch``); without it only the JAX step
is timed. The two steps run interleaved (one block of ``--steps`` steps of each per repeat) so that
a shared machine's load hits both alike; reported: median seconds per step over ``--repeats``
blocks (after a warm-up), images/s, and the ratio JAX / PyTorch in images/s.

``--extras`` also times the step with each ``ConvTranspose2x`` implementation, value-and-grad of
one upsampling layer alone (16 -> 32 px, 64 -> 64 channels), and the WGAN-GP critic's loss with its
gradient penalty (half the batch) with the strided convs as im2col matmuls (``auto`` on CPU) or as
plain XLA convolutions.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cem_jax import attacks
from cem_jax.models.decoder import ConvTranspose2x, InversionDecoder

SIDE, FEAT, CH = 32, 8, 8


def _encode_fn(seed: int = 0):
    """``(key, uint8 [B, 32, 32, 3]) -> [B, 8, 8, 8]``: 4x4 patches, a random linear map, sigmoid, noise."""
    w = jnp.asarray(np.random.default_rng(seed).normal(size=(48, CH)).astype(np.float32) / 7.0)

    def encode(key, x):
        b = x.shape[0]
        x = x.astype(jnp.float32) / 255.0
        p = x.reshape(b, FEAT, 4, FEAT, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, FEAT, FEAT, 48)
        z = jax.nn.sigmoid(p @ w - 0.5)
        return z + 0.1 * jax.random.normal(key, z.shape)

    return encode


def _time(fn, steps: int, repeats: int) -> float:
    """Median seconds per call of ``fn()`` (which returns something to block on)."""
    jax.block_until_ready(fn())  # compile + warm-up
    per = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            out = fn()
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t) / steps)
    return statistics.median(per)


def make_attack_step(impl: str, batch: int):
    """A zero-argument callable running one jitted JAX attack step; returns the loss to block on."""
    decoder = InversionDecoder(
        in_channels=CH,
        feature_size=FEAT,
        image_size=SIDE,
        num_blocks=8,
        width=64,
        upsample_impl=impl,
        rngs=nnx.Rngs(0),
    )

    def make_tx(learning_rate):
        return optax.chain(optax.add_decayed_weights(1e-4), optax.adam(learning_rate))

    # the attack's step as cem_jax.attacks builds it; with or without an injected learning rate
    injected = "base_lr" in inspect.signature(attacks._decoder_train_step).parameters
    tx = optax.inject_hyperparams(make_tx)(learning_rate=1e-3) if injected else make_tx(1e-3)
    optimizer = nnx.Optimizer(decoder, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((decoder, optimizer))
    args = (graphdef, _encode_fn(), jax.random.key(1), attacks._Placement(None))
    if injected:
        step = attacks._decoder_train_step(*args, 1e-3)
        step_fn = lambda state, x, i: step(state, x, i, 1.0)  # noqa: E731
    else:
        step_fn = attacks._decoder_train_step(*args)
    images = jnp.asarray(
        np.random.default_rng(0).integers(0, 256, (batch, SIDE, SIDE, 3), dtype=np.uint8)
    )
    box = {"state": state, "i": 0}

    def run():
        box["state"], loss = step_fn(box["state"], images, jnp.int32(box["i"]))
        box["i"] += 1
        return loss

    return run


def bench_attack_step(impl: str, batch: int, steps: int, repeats: int) -> float:
    return _time(make_attack_step(impl, batch), steps, repeats)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_torch_step(batch: int):
    """The PyTorch step (threads = JAX's cores), or ``None`` when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    from benchmarks import torch_decoder

    torch.set_num_threads(_cores())
    return torch_decoder.make_step(batch, side=SIDE, feat=FEAT, ch=CH)


def bench_jax_vs_torch(batch: int, steps: int, repeats: int) -> dict:
    """Median seconds per step of the JAX (``auto``) and PyTorch steps, timed interleaved."""
    fns = {"jax": make_attack_step("auto", batch)}
    torch_step = make_torch_step(batch)
    if torch_step is not None:
        fns["torch"] = torch_step
    for fn in fns.values():  # compile / warm up twice (PyTorch's first steps allocate)
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(steps):
                out = fn()
            jax.block_until_ready(out)  # a torch tensor: returned as is (the step is synchronous)
            per[name].append((time.perf_counter() - t) / steps)
    out: dict = {}
    for name, v in per.items():
        out[f"step_s_{name}"] = statistics.median(v)
        out[f"images_per_s_{name}"] = batch / out[f"step_s_{name}"]
    if torch_step is not None:
        out["torch_threads"] = _cores()
        out["ratio_jax_over_torch"] = out["step_s_torch"] / out["step_s_jax"]
    return out


def bench_upsample_grad(impl: str, batch: int, steps: int, repeats: int) -> float:
    layer = ConvTranspose2x(64, 64, impl=impl, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(0), (batch, 16, 16, 64))

    @jax.jit
    def grad(state, x):
        return jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2), argnums=(0, 1))(
            state, x
        )

    return _time(lambda: grad(state, x), steps, repeats)


def bench_critic_step(conv_impl: str, batch: int, steps: int, repeats: int) -> float:
    """Value-and-grad of the WGAN-GP critic loss (with its gradient penalty) on 32 px images."""
    critic = attacks.WGANCritic(SIDE, rngs=nnx.Rngs(0))
    critic.set_attributes(impl=conv_impl, raise_if_not_found=False)
    graphdef, state = nnx.split(critic)
    real = jax.random.uniform(jax.random.key(1), (batch, SIDE, SIDE, 3))
    fake = jax.random.uniform(jax.random.key(2), (batch, SIDE, SIDE, 3))

    @jax.jit
    def grad(state, real, fake):
        def loss(state):
            d = nnx.merge(graphdef, state)
            w = jnp.mean(d(real)) - jnp.mean(d(fake))
            return -w + 10.0 * attacks._gradient_penalty(d, real, fake, jax.random.key(3))

        return jax.value_and_grad(loss)(state)

    return _time(lambda: grad(state, real, fake), steps, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--extras", action="store_true", help="also the implementation comparisons")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = {
        "backend": jax.default_backend(),
        "batch": args.batch,
        "auto_impl": ConvTranspose2x(1, 1, rngs=nnx.Rngs(0)).resolved_impl(),
        # what XLA ran with: cem_jax adds its XLA:CPU flags on import (cem_jax.xla_cpu)
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    out.update(bench_jax_vs_torch(args.batch, args.steps, args.repeats))
    if args.extras:
        _extras(out, args)
    if args.json:
        print(json.dumps(out))
        return
    print(f"backend {out['backend']}, batch {args.batch}, upsampling auto -> {out['auto_impl']}")
    print(f"XLA_FLAGS: {out['xla_flags'] or '(none)'}")
    print(
        f"  decoder attack step, JAX:     {out['step_s_jax'] * 1e3:8.1f} ms "
        f"({out['images_per_s_jax']:7.1f} images/s)"
    )
    if "step_s_torch" in out:
        print(
            f"  same step, PyTorch ({out['torch_threads']} threads): {out['step_s_torch'] * 1e3:8.1f} ms "
            f"({out['images_per_s_torch']:7.1f} images/s)"
        )
        print(f"  JAX / PyTorch images/s: {out['ratio_jax_over_torch']:.2f}")
    else:
        print("  torch not installed: pip install torch to compare")
    if not args.extras:
        return
    for impl in ("subpixel", "transpose"):
        print(
            f"  {impl:9s}: attack step {out[f'step_s_{impl}'] * 1e3:8.1f} ms "
            f"({out[f'images_per_s_{impl}']:7.1f} images/s); one upsampling value+grad "
            f"{out[f'upsample_grad_s_{impl}'] * 1e3:7.1f} ms"
        )
    print(
        f"  sub-pixel speed-up: step x{out['step_speedup_subpixel']:.2f}, "
        f"upsampling x{out['upsample_grad_speedup_subpixel']:.2f}"
    )
    print(
        f"WGAN-GP critic value+grad with gradient penalty, batch {args.batch // 2}: "
        f"convs 'auto' (strided as im2col matmul on CPU) {out['critic_step_s_auto'] * 1e3:.1f} ms, "
        f"plain XLA {out['critic_step_s_xla'] * 1e3:.1f} ms, x{out['critic_speedup_auto']:.2f}"
    )


def _extras(out: dict, args) -> None:
    for impl in ("subpixel", "transpose"):
        s = bench_upsample_grad(impl, args.batch, args.steps, args.repeats)
        out[f"upsample_grad_s_{impl}"] = s
    for impl in ("subpixel", "transpose"):
        s = bench_attack_step(impl, args.batch, args.steps, args.repeats)
        out[f"step_s_{impl}"] = s
        out[f"images_per_s_{impl}"] = args.batch / s
    for impl in ("auto", "xla"):
        s = bench_critic_step(impl, args.batch // 2, max(1, args.steps // 2), args.repeats)
        out[f"critic_step_s_{impl}"] = s
    out["critic_speedup_auto"] = out["critic_step_s_xla"] / out["critic_step_s_auto"]
    out["step_speedup_subpixel"] = out["step_s_transpose"] / out["step_s_subpixel"]
    out["upsample_grad_speedup_subpixel"] = (
        out["upsample_grad_s_transpose"] / out["upsample_grad_s_subpixel"]
    )


if __name__ == "__main__":
    main()
