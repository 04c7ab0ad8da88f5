"""Benchmark of the per-epoch mixture refresh, as the training loop runs it after every epoch.

    python -m benchmarks.refresh                 # table: the refresh and its three parts
    python -m benchmarks.refresh --json          # one JSON object
    python -m benchmarks.refresh --num_images 5000 --repeats 1   # quick

Builds a :class:`cem_jax.train.Trainer` of ``--preset`` (default ``cifar_full``: VGG11-BN cut 4, the
paper's 8x8x8 features) with ``cem_noise`` on ``--num_images`` synthetic 32 px images (50,000: the
CIFAR-10 training set), then times, after one warm-up call each (compilation, k-means++):

- ``refresh_s``: :meth:`Trainer.refresh_mixture` whole, warm-started as from epoch 2 on (median of
  ``--repeats``);
- ``features_s``: its clean feature pass over the images alone (:meth:`Trainer.features`: the client's
  forward pass in eval-size batches), and ``features_images_per_s``;
- ``fit_s``: :func:`cem_jax.entropy.fit_mixture` on those features, warm-started;
- ``bound_s``: the diagonal leakage bound on them (what each epoch's history records).

On the 2-core CPU the feature pass is nearly all of the refresh. Before commit 017de90 the client's
16x16 64->128 conv ran as an im2col matmul there (a 295 MB patch matrix per batch of 500); on a
machine at half the usual speed the refresh took 83.9 s with it and 35.4 s with XLA's convolution
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json

import jax

from benchmarks import timing


def measure(num_images: int, repeats: int, preset: str = "cifar_full") -> dict[str, float]:
    """The figures of the module docstring, in seconds (and images/s), keyed by name."""
    from cem_jax import config as config_lib
    from cem_jax import data as data_lib
    from cem_jax import entropy, train

    ds = data_lib.synthetic_dataset(
        num_train=num_images, num_test=64, image_size=32, num_classes=10, seed=0
    )
    cfg = config_lib.make_config(preset, defense="cem_noise", epochs=1)
    if cfg.batch_size > num_images:  # the trainer needs one training batch (no step is run here)
        cfg = config_lib.make_config(preset, defense="cem_noise", epochs=1, batch_size=num_images)
    tr = train.Trainer(cfg, ds)
    state = tr.init_state()
    state, _ = tr.refresh_mixture(state, 1)  # compiles, k-means++: epoch 1's refresh
    sigma = tr.defense.sigma

    def refresh():
        nonlocal state
        state, _ = tr.refresh_mixture(state, 2)
        return state.mixture

    refresh_s = timing.median_seconds(refresh, repeats=repeats, warmup=False)
    feats = jax.block_until_ready(tr.features(state, ds.train_images))
    features_s = timing.median_seconds(
        tr.features, state, ds.train_images, repeats=repeats, warmup=False
    )
    labels = train.feature_labels(tr.train_labels, tr.mesh)
    with jax.set_mesh(tr.mesh):

        def fit():
            return entropy.fit_mixture(
                feats,
                labels,
                num_classes=tr.num_classes,
                clusters_per_class=tr.clusters,
                key=jax.random.key(0),
                previous=state.mixture,
                iterations=cfg.kmeans_iterations,
            )

        def bound():
            return entropy.leakage_upper_bound(feats, labels, state.mixture, sigma=sigma)

        fit_s = timing.median_seconds(fit, repeats=repeats)
        bound_s = timing.median_seconds(bound, repeats=repeats)
    return {
        "num_images": num_images,
        "refresh_s": refresh_s,
        "features_s": features_s,
        "features_images_per_s": num_images / features_s,
        "fit_s": fit_s,
        "bound_s": bound_s,
    }


def main(argv: list[str] | None = None) -> None:
    from cem_jax import xla_cpu

    xla_cpu.tune_malloc()  # as the cem-* programs run (cem_jax.xla_cpu; CEM_JAX_MALLOC=0: off)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_images", type=int, default=50_000, help="synthetic training images")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each part (median)")
    p.add_argument(
        "--preset", default="cifar_full", help="the run preset the trainer is built from"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.num_images < 10 or args.repeats < 1:
        p.error("--num_images must be >= 10 (one per class) and --repeats >= 1")
    r = measure(args.num_images, args.repeats, args.preset)
    if args.json:
        print(json.dumps(r))
        return
    print(
        f"mixture refresh, preset {args.preset}, cem_noise, {args.num_images} images, "
        f"{jax.device_count()} x {jax.devices()[0].platform} (median of {args.repeats})"
    )
    print(f"  refresh_mixture (warm start)  {r['refresh_s']:8.2f} s")
    print(
        f"    feature pass                {r['features_s']:8.2f} s  "
        f"({r['features_images_per_s']:.0f} images/s)"
    )
    print(f"    fit_mixture                 {r['fit_s']:8.2f} s")
    print(f"    diagonal leakage bound      {r['bound_s']:8.2f} s")


if __name__ == "__main__":
    main()
