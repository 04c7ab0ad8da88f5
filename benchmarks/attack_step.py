"""Benchmark of the decoder attack's training step: sub-pixel vs plain transposed convolution.

    python -m benchmarks.attack_step                 # table
    python -m benchmarks.attack_step --json          # one JSON object
    python -m benchmarks.attack_step --batch 64 --steps 3   # quick

Times the jitted step of :func:`cem_jax.attacks.decoder_attack` (``res_normN8C64`` decoder, Adam with
weight decay, donated state) at batch 256 on 32 px images with 8x8x8 features from a fixed random
patch-linear + sigmoid + Gaussian-noise client, once with each ``ConvTranspose2x`` implementation.
Also times value-and-grad of one upsampling layer alone (16 -> 32 px, 64 -> 64 channels), and of
the WGAN-GP critic's loss with its gradient penalty (half the batch) with the strided convs as im2col
matmuls (``auto`` on CPU) or as plain XLA convolutions. Reported:
median seconds per step over ``--repeats`` timed blocks of ``--steps`` steps (after a warm-up
compile), and images/s.
"""

from __future__ import annotations

import argparse
import json
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


def bench_attack_step(impl: str, batch: int, steps: int, repeats: int) -> float:
    decoder = InversionDecoder(
        in_channels=CH,
        feature_size=FEAT,
        image_size=SIDE,
        num_blocks=8,
        width=64,
        upsample_impl=impl,
        rngs=nnx.Rngs(0),
    )
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3))
    optimizer = nnx.Optimizer(decoder, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((decoder, optimizer))
    step_fn = attacks._decoder_train_step(
        graphdef, _encode_fn(), jax.random.key(1), attacks._Placement(None)
    )
    images = jnp.asarray(
        np.random.default_rng(0).integers(0, 256, (batch, SIDE, SIDE, 3), dtype=np.uint8)
    )
    box = {"state": state, "i": 0}

    def run():
        box["state"], loss = step_fn(box["state"], images, jnp.int32(box["i"]))
        box["i"] += 1
        return loss

    return _time(run, steps, repeats)


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
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = {
        "backend": jax.default_backend(),
        "batch": args.batch,
        "auto_impl": ConvTranspose2x(1, 1, rngs=nnx.Rngs(0)).resolved_impl(),
    }
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
    if args.json:
        print(json.dumps(out))
        return
    print(f"backend {out['backend']}, batch {args.batch}, auto -> {out['auto_impl']}")
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


if __name__ == "__main__":
    main()
