"""Benchmark of the decoder attack's training step, side by side with the same step in PyTorch.

    python -m benchmarks.attack_step                 # JAX vs PyTorch images/s and their ratio
    python -m benchmarks.attack_step --json          # one JSON object
    python -m benchmarks.attack_step --batch 64 --steps 2 --repeats 3   # quick
    python -m benchmarks.attack_step --extras        # + sub-pixel vs transpose, WGAN-GP critic

Times the jitted step of :func:`cem_jax.attacks.decoder_attack` (``res_normN8C64`` decoder, Adam with
weight decay, donated state) at batch 256 on 32 px images with 8x8x8 features from a fixed random
patch-linear + sigmoid + Gaussian-noise client, and the same step in PyTorch
(:mod:`benchmarks.torch_decoder`: same layers, MSE, ``Adam(lr=1e-3, weight_decay=1e-4)``, as many
threads as JAX has cores), by default in a process of its own (``--torch_process=own``,
:mod:`benchmarks.step_worker`: its own allocator and heap, set up as the ``cem-*`` programs set
theirs up; ``same``: in this process, beside the JAX step). PyTorch is optional (``pip install
torch``); without it only the JAX step is timed. The two steps run interleaved (one block of
``--steps`` steps of each per repeat, the other one idle meanwhile) so that a shared machine's load
hits both alike; reported: median seconds per step over ``--repeats``
blocks (after a warm-up), images/s, and the ratio JAX / PyTorch in images/s.

Then, not to perturb those timings, the roofline figures (:mod:`benchmarks.roofline`):
``gflop_per_image``, XLA's count of the compiled JAX step (``gflop_counted``: ``"step"``, the
``jitted`` attribute of the callable ``attacks._decoder_train_step`` returns, lowered with the
arguments its wrapper passes; ``"decoder_value_and_grad"`` where there is none, an equivalent jitted
client + value-and-grad of the same MSE loss of the same decoder built here, Adam's elementwise
update left out); ``matmul_gflops``, the float32 2048x2048 ``jnp.dot`` rate in this process; and
``gflops_jax`` / ``gflops_torch``, images/s x ``gflop_per_image`` (PyTorch computes the same step).
Measured on the 2-core CPU: 0.345 GFLOP per image for the decoder's value-and-grad at batch 64 and
256.

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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import roofline, timing
from cem_jax import attacks
from cem_jax.models.decoder import ConvTranspose2x, InversionDecoder

SIDE, FEAT, CH = 32, 8, 8
KEY_SEED, LR = 1, 1e-3  # the attack step's key and learning rate


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


def _decoder(impl: str) -> InversionDecoder:
    """The attack's ``res_normN8C64`` decoder for 8x8x8 features and 32 px images."""
    return InversionDecoder(
        in_channels=CH,
        feature_size=FEAT,
        image_size=SIDE,
        num_blocks=8,
        width=64,
        upsample_impl=impl,
        rngs=nnx.Rngs(0),
    )


def _images(batch: int) -> jax.Array:
    return jnp.asarray(
        np.random.default_rng(0).integers(0, 256, (batch, SIDE, SIDE, 3), dtype=np.uint8)
    )


class AttackStep:
    """One jitted JAX attack step per call (returns the loss to block on), and its FLOP count."""

    def __init__(self, impl: str, step: Callable, state: Any, images: jax.Array, injected: bool):
        self.impl, self.step, self.state, self.images = impl, step, state, images
        self.injected = injected  # the step takes a learning-rate scale (4 arguments)
        self.i = 0

    def __call__(self) -> jax.Array:
        extra = (1.0,) if self.injected else ()
        self.state, loss = self.step(self.state, self.images, jnp.int32(self.i), *extra)
        self.i += 1
        return loss

    def _jitted_args(self, jitted: Callable) -> tuple:
        """The arguments of the jitted step, by parameter name, as the attack's wrapper passes
        them (``KeyError`` for a name not known here)."""
        values = {
            "state": self.state,
            "batch": self.images,
            "key": jax.random.key(KEY_SEED),
            "step": jnp.int32(self.i),
            "base_lr": jnp.float32(LR),
            "scale": jnp.float32(1.0),
        }
        return tuple(values[name] for name in inspect.signature(jitted).parameters)

    def gflop_per_image(self) -> tuple[float, str]:
        """``(GFLOP per image, what was counted)``: ``"step"``, XLA's count of the attack's own
        jitted step (the ``jitted`` attribute of ``attacks._decoder_train_step(...)`` when it has
        one, or the step itself when it is a ``jax.jit``); else ``"decoder_value_and_grad"``,
        :func:`decoder_grad_gflop` (the step without Adam's elementwise update)."""
        jitted = getattr(self.step, "jitted", None)
        if jitted is None and hasattr(self.step, "lower"):
            jitted = self.step
        if jitted is not None:
            try:
                gflop = roofline.compiled_gflop(jitted, *self._jitted_args(jitted))
                return gflop / len(self.images), "step"
            except (KeyError, TypeError, ValueError):  # a signature not known here
                pass
        return decoder_grad_gflop(self.impl, len(self.images)), "decoder_value_and_grad"


def decoder_grad_gflop(impl: str, batch: int) -> float:
    """GFLOP per image of a jitted function equivalent to the attack step but for the optimizer:
    the client's features of ``batch`` uint8 images, then value-and-grad of the same MSE loss of
    the same decoder (train mode, its batch statistics updated). Adam's update (a few elementwise
    operations per parameter) is left out."""
    graphdef, state = nnx.split(_decoder(impl))
    encode = _encode_fn()

    @jax.jit
    def value_and_grad(state, images, key):
        decoder = nnx.merge(graphdef, state)
        feats = jax.lax.stop_gradient(encode(key, images))
        target = images.astype(jnp.float32) / 255.0

        def loss_fn(d):
            return jnp.mean((d(feats) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(decoder)
        return nnx.state(decoder), grads, loss

    gflop = roofline.compiled_gflop(value_and_grad, state, _images(batch), jax.random.key(KEY_SEED))
    return gflop / batch


def make_attack_step(impl: str, batch: int) -> AttackStep:
    """The JAX attack step (:class:`AttackStep`: call it to run one step)."""
    decoder = _decoder(impl)

    def make_tx(learning_rate):
        return optax.chain(optax.add_decayed_weights(1e-4), optax.adam(learning_rate))

    # the attack's step as cem_jax.attacks builds it; with or without an injected learning rate
    injected = "base_lr" in inspect.signature(attacks._decoder_train_step).parameters
    tx = optax.inject_hyperparams(make_tx)(learning_rate=LR) if injected else make_tx(LR)
    optimizer = nnx.Optimizer(decoder, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((decoder, optimizer))
    args = (graphdef, _encode_fn(), jax.random.key(KEY_SEED), attacks._Placement(None))
    step = attacks._decoder_train_step(*args, *((LR,) if injected else ()))
    return AttackStep(impl, step, state, _images(batch), injected)


def bench_attack_step(impl: str, batch: int, steps: int, repeats: int) -> float:
    return timing.median_seconds(make_attack_step(impl, batch), repeats=repeats, calls=steps)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_kwargs(batch: int) -> dict:
    return {"batch": batch, "side": SIDE, "feat": FEAT, "ch": CH, "threads": _cores()}


def make_torch_step(batch: int):
    """The PyTorch step in this process (threads = JAX's cores), or ``None`` when torch is not
    installed."""
    if not _has_torch():
        return None
    from benchmarks import torch_decoder

    return torch_decoder.make_step(**_torch_kwargs(batch))


def _in_process(fn: Callable) -> Callable[[int], float]:
    """``steps -> seconds`` of ``steps`` calls of ``fn`` back to back, the last one waited on."""
    return lambda steps: timing.block_seconds(fn, calls=steps)


def bench_jax_vs_torch(batch: int, steps: int, repeats: int, torch_process: str = "own") -> dict:
    """Median seconds per step of the JAX (``auto``) and PyTorch steps, timed interleaved; then
    (not to perturb the timings) the roofline figures: GFLOP per image of the JAX step, the matmul
    peak, and the achieved GFLOP/s of each (the PyTorch step given the JAX step's count).

    ``torch_process``: ``"own"``, the PyTorch step in a worker process of its own
    (:mod:`benchmarks.step_worker`, set up as the programs set theirs up), idle while the JAX step
    is timed; ``"same"``, in this process beside the JAX step (sharing its allocator and heap)."""
    if torch_process not in ("own", "same"):
        raise ValueError(f"torch_process must be 'own' or 'same', got {torch_process!r}")
    jax_step = make_attack_step("auto", batch)
    for _ in range(2):  # compile / warm up
        jax.block_until_ready(jax_step())
    blocks: dict[str, Callable[[int], float]] = {"jax": _in_process(jax_step)}
    worker = None
    if torch_process == "own" and _has_torch():
        from benchmarks import step_worker

        # warms up in the worker (two steps: PyTorch's first steps allocate)
        worker = step_worker.StepWorker(
            "benchmarks.torch_decoder:make_step", **_torch_kwargs(batch)
        )
        blocks["torch"] = worker.time
    elif torch_process == "same" and (torch_step := make_torch_step(batch)) is not None:
        for _ in range(2):
            torch_step()
        blocks["torch"] = _in_process(torch_step)
    per: dict[str, list[float]] = {k: [] for k in blocks}
    try:
        for _ in range(repeats):
            for name, block in blocks.items():
                per[name].append(block(steps) / steps)
    finally:
        if worker is not None:
            worker.close()
    out: dict = {}
    for name, v in per.items():
        out[f"step_s_{name}"] = statistics.median(v)
        out[f"images_per_s_{name}"] = batch / out[f"step_s_{name}"]
    if "torch" in per:
        out["torch_threads"] = _cores()
        out["torch_process"] = torch_process
        out["ratio_jax_over_torch"] = out["step_s_torch"] / out["step_s_jax"]
    out["gflop_per_image"], out["gflop_counted"] = jax_step.gflop_per_image()
    out["matmul_gflops"] = roofline.matmul_peak_gflops()
    for name in per:
        out[f"gflops_{name}"] = out[f"images_per_s_{name}"] * out["gflop_per_image"]
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

    return timing.median_seconds(grad, state, x, repeats=repeats, calls=steps)


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

    return timing.median_seconds(grad, state, real, fake, repeats=repeats, calls=steps)


def main() -> None:
    from cem_jax import xla_cpu

    xla_cpu.tune_malloc()  # as the cem-* programs run (cem_jax.xla_cpu; CEM_JAX_MALLOC=0: off)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--torch_process",
        choices=("own", "same"),
        default="own",
        help="the PyTorch step in a process of its own (own) or beside the JAX step (same)",
    )
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
    out.update(bench_jax_vs_torch(args.batch, args.steps, args.repeats, args.torch_process))
    if args.extras:
        _extras(out, args)
    if args.json:
        print(json.dumps(out))
        return
    print(f"backend {out['backend']}, batch {args.batch}, upsampling auto -> {out['auto_impl']}")
    print(f"XLA_FLAGS: {out['xla_flags'] or '(none)'}")
    print(
        f"  decoder attack step, JAX:     {out['step_s_jax'] * 1e3:8.1f} ms "
        f"({out['images_per_s_jax']:7.1f} images/s){_roof(out, 'jax')}"
    )
    if "step_s_torch" in out:
        print(
            f"  same step, PyTorch ({out['torch_threads']} threads, {out['torch_process']} process): "
            f"{out['step_s_torch'] * 1e3:8.1f} ms "
            f"({out['images_per_s_torch']:7.1f} images/s){_roof(out, 'torch')}"
        )
        print(f"  JAX / PyTorch images/s: {out['ratio_jax_over_torch']:.2f}")
    else:
        print("  torch not installed: pip install torch to compare")
    counted = {
        "step": "the compiled JAX step",
        "decoder_value_and_grad": "the decoder's value-and-grad, Adam's update left out",
    }[out["gflop_counted"]]
    print(
        f"  {out['gflop_per_image']:.3f} GFLOP per image (XLA's count of {counted}; PyTorch "
        f"given the same); % peak: of a float32 2048x2048 jnp.dot, {out['matmul_gflops']:.1f} "
        "GFLOP/s in this process"
    )
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


def _roof(out: dict, name: str) -> str:
    """``", <GFLOP/s> GFLOP/s, <%> % of peak"`` of the step ``name``."""
    gflops = out[f"gflops_{name}"]
    return f", {gflops:6.1f} GFLOP/s, {roofline.percent_of_peak(gflops, out['matmul_gflops']):.0f}% of peak"


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
