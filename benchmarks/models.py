"""Speed of the split models on this machine: per-layer convs / pools and the whole train step.

    python -m benchmarks.models               # whole step, plain Flax vs CPU-fast layers
    python -m benchmarks.models --layers      # + per-shape forward+backward timings of each op
    python -m benchmarks.models --arch resnet20 --image-size 64 --batch 64

Timings are noisy on a shared 2-core CPU: the variants are run round-robin and the median is shown,
so compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cem_jax.models import build_split_model, layers, set_impl

# Distinct conv shapes (H=W of the input, c_in, c_out, kernel, stride) of the default splits.
VGG_CONVS_32 = [
    (32, 3, 64, 3, 1),
    (16, 64, 128, 3, 1),
    (8, 128, 8, 3, 1),  # bottleneck
    (8, 8, 128, 3, 1),  # inverse bottleneck
    (8, 128, 256, 3, 1),
    (8, 256, 256, 3, 1),
    (4, 256, 512, 3, 1),
    (4, 512, 512, 3, 1),
    (2, 512, 512, 3, 1),
]
RESNET_CONVS_64 = [
    (64, 3, 16, 5, 1),  # stem
    (64, 16, 32, 3, 2),
    (32, 32, 32, 3, 1),
    (32, 32, 64, 3, 2),
    (16, 64, 64, 3, 1),
    (16, 64, 8, 3, 1),  # bottleneck
    (16, 8, 64, 3, 1),  # inverse bottleneck
    (16, 64, 128, 3, 2),
    (8, 128, 128, 3, 1),
]
# The decoder attack's 3x3 convs (res_normN8C64 from 8x8x8 features to 32 px): its first ResBlock,
# the eight 64->64 ResBlocks at 8x8 (17 of its 20 3x3 convs, most of its FLOPs), the head at 32x32.
DECODER_CONVS_32 = [
    (8, 8, 64, 3, 1),
    (8, 64, 64, 3, 1),
    (32, 64, 3, 3, 1),
    (32, 3, 3, 3, 1),
]
VGG_POOLS_32 = [(32, 64), (16, 128), (8, 256), (4, 512), (2, 512)]


def round_robin(fns: dict, n: int, cpu: dict | None = None) -> dict[str, float]:
    """Median wall seconds per call of each ``name -> (jitted fn, args)``, run interleaved.

    ``cpu``, if given, receives the median process CPU seconds per call (all threads): on a
    machine shared with other jobs, CPU seconds / cores estimates the unloaded wall time.
    """
    for f, a in fns.values():
        jax.block_until_ready(f(*a))
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for k, (f, a) in fns.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(*a))
            times[k].append(time.perf_counter() - t)
            cpus[k].append(time.process_time() - c)
    if cpu is not None:
        cpu.update({k: statistics.median(v) for k, v in cpus.items()})
    return {k: statistics.median(v) for k, v in times.items()}


CONV_SETS = {
    "vgg": ("VGG11 cut 4, 32 px", VGG_CONVS_32),
    "resnet": ("ResNet20, 64 px", RESNET_CONVS_64),
    "decoder": ("decoder res_normN8C64, 8x8 features -> 32 px", DECODER_CONVS_32),
}


def bench_convs(batch: int, n: int, sets: Sequence[str] = tuple(CONV_SETS)) -> None:
    key = jax.random.key(0)
    for title, shapes in (CONV_SETS[name] for name in sets):
        print(f"\nconv forward+backward (d/dx, d/dkernel), B={batch}, {title}  [ms]")
        for h, ci, co, k, s in shapes:
            x = jax.random.normal(key, (batch, h, h, ci))
            w = jax.random.normal(key, (k, k, ci, co)) * 0.05
            fns = {}
            for impl in ("xla", "matmul"):

                def loss(x, w, impl=impl, s=s, k=k):
                    y = layers.conv2d(x, w, strides=s, padding=k // 2, impl=impl)
                    return jnp.sum(y * y)

                fns[impl] = (jax.jit(jax.grad(loss, argnums=(0, 1))), (x, w))
            r = round_robin(fns, n)
            auto = "matmul" if layers.use_matmul((h, h), (k, k), ci, co, (s, s)) else "xla"
            gflop = 3 * 2 * batch * (h // s) ** 2 * k * k * ci * co / 1e9
            print(
                f"  {h:3d}x{h:<3d} {ci:4d}->{co:<4d} k{k} s{s}: xla {r['xla'] * 1e3:8.1f}  "
                f"matmul {r['matmul'] * 1e3:8.1f}  ({gflop:5.2f} GFLOP)  rule -> {auto}",
                flush=True,
            )
    print(f"\n2x2 max-pool forward+backward, B={batch}, VGG11 32 px  [ms]")
    for h, c in VGG_POOLS_32:
        x = jax.random.normal(key, (batch, h, h, c))
        fns = {
            impl: (
                jax.jit(jax.grad(lambda x, i=impl: jnp.sum(layers.max_pool_2x2(x, impl=i) ** 2))),
                (x,),
            )
            for impl in ("xla", "reshape")
        }
        r = round_robin(fns, n)
        print(
            f"  {h:3d}x{h:<3d} c={c:4d}: xla {r['xla'] * 1e3:7.1f}  reshape {r['reshape'] * 1e3:7.1f}"
        )
    print(f"\nBatchNorm (train mode) forward+backward, B={batch}  [ms]")
    for h, c in VGG_POOLS_32[:3]:
        x = jax.random.normal(key, (batch, h, h, c))
        bn = nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
        bn_grad = nnx.jit(nnx.grad(lambda bn, x: jnp.sum(bn(x) ** 2), argnums=1))

        relu = lambda x: jnp.sum(jax.nn.relu(x) ** 2)
        r = round_robin({"bn": (bn_grad, (bn, x)), "relu": (jax.jit(jax.grad(relu)), (x,))}, n)
        print(
            f"  {h:3d}x{h:<3d} c={c:4d}: batchnorm {r['bn'] * 1e3:7.1f}  (relu for scale {r['relu'] * 1e3:6.1f})"
        )


def make_step(model: nnx.Module, lr: float = 0.05):
    """A jitted SGD step (cross-entropy, train mode, dropout): ``step(model, opt, x, y, rngs)``."""
    opt = nnx.Optimizer(model, optax.sgd(lr, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y, rngs):
        def loss_fn(model, rngs):
            logits = model(x, rngs=rngs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model, rngs)
        opt.update(model, grads)
        return loss

    return step, opt


def bench_step(arch: str, image_size: int, batch: int, n: int) -> None:
    print(f"\nfull train step ({arch}, {image_size} px, B={batch}: forward+backward+SGD)")
    variants = {
        "plain (xla conv, reduce_window pool)": ("xla", "xla"),
        "rule conv, reduce_window pool": ("auto", "xla"),
        "rule conv, reshape pool (default)": ("auto", "reshape"),
    }
    fns = {}
    key = jax.random.key(1)
    x = jax.random.normal(key, (batch, image_size, image_size, 3))
    y = jax.random.randint(key, (batch,), 0, 10)
    for name, (conv, pool) in variants.items():
        model = build_split_model(arch, num_classes=10, image_size=image_size, rngs=nnx.Rngs(0))
        set_impl(model, conv=conv, pool=pool)
        model.train()
        step, opt = make_step(model)
        args = (model, opt, x, y, nnx.Rngs(dropout=key))
        fns[name] = (step, args)
    cpu: dict[str, float] = {}
    r = round_robin(fns, n, cpu)
    cores = len(os.sched_getaffinity(0))
    for name, t in r.items():
        print(
            f"  {name:40s} {t * 1e3:8.1f} ms/step  {batch / t:7.1f} img/s   "
            f"(CPU {cpu[name]:6.2f} s/step; {cores} cores -> {batch * cores / cpu[name]:6.1f} img/s "
            f"if unshared)"
        )


def main() -> None:
    from cem_jax import xla_cpu

    xla_cpu.tune_malloc()  # as the cem-* programs run (cem_jax.xla_cpu; CEM_JAX_MALLOC=0: off)
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="vgg11_bn_sgm")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", action="store_true", help="also time each conv / pool / BN shape")
    p.add_argument(
        "--conv_sets",
        default=",".join(CONV_SETS),
        help=f"with --layers: which conv shape lists, comma-separated, of {sorted(CONV_SETS)}",
    )
    a = p.parse_args()
    sets = [s for s in a.conv_sets.split(",") if s]
    if unknown := sorted(set(sets) - set(CONV_SETS)):
        p.error(f"--conv_sets: unknown {unknown}; accepted: {sorted(CONV_SETS)}")
    print(f"backend {jax.default_backend()}, devices {jax.devices()}")
    if a.layers:
        bench_convs(a.batch, a.repeats, sets)
    bench_step(a.arch, a.image_size, a.batch, a.repeats)


if __name__ == "__main__":
    main()
