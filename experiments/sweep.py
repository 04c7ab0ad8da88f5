r"""Sweep defenses (× σ × λ) and collect the privacy–utility table.

    python -m experiments.sweep --defenses=none,noise,cem_noise --preset=quick \
        --data_dir=../shared/datasets/cifar10_jpeg --root=runs/sweep
    python -m experiments.sweep ... --num_shards=4 --shard_index=$SLURM_ARRAY_TASK_ID   # on a cluster
    python -m experiments.sweep ... --collect_only                                      # the table

Each grid point is an ordinary run (own workdir under ``--root``, resumable); finished points are
skipped. ``--collect_only`` reads every ``results.json`` and prints one table (also written as
``table.md`` and ``table.json`` under ``--root``).
"""

from __future__ import annotations

import itertools
import json
import os
import sys

from absl import app, flags, logging

from cem_jax import config as config_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("defenses", ["none", "noise", "cem_noise"], "Defense presets to sweep.")
flags.DEFINE_list("sigmas", [], "Noise levels to sweep (empty: each defense's default).")
flags.DEFINE_list("lambdas", [], "CEM weights to sweep for cem_* defenses (empty: default).")
flags.DEFINE_enum("preset", "paper", list(config_lib.PRESETS), "Run preset.")
flags.DEFINE_string("dataset", "cifar10", "Dataset.")
flags.DEFINE_string("data_dir", None, "Dataset location (default $CEM_DATA_DIR).")
flags.DEFINE_list("attacks", None, "Attacks per run (default: the preset's).")
flags.DEFINE_string("root", "runs/sweep", "Folder holding one workdir per grid point.")
flags.DEFINE_integer("num_shards", 1, "Split the grid over this many processes.")
flags.DEFINE_integer("shard_index", 0, "This process's shard (0-based).")
flags.DEFINE_bool("collect_only", False, "Only print the table of finished runs.")
flags.DEFINE_string("cache_dir", os.path.expanduser("~/.cache/cem_jax"), "Decoded-dataset cache.")


def grid() -> list[dict]:
    points = []
    sigmas = [float(s) for s in FLAGS.sigmas] or [None]
    lambdas = [float(v) for v in FLAGS.lambdas] or [None]
    for defense in FLAGS.defenses:
        cem = defense.startswith("cem_")
        for sigma, lambd in itertools.product(sigmas, lambdas if cem else [None]):
            if defense == "none" and sigma is not None:
                continue
            points.append({"defense": defense, "sigma": sigma, "lambd": lambd})
    return points


def workdir_of(point: dict) -> str:
    name = point["defense"]
    if point["sigma"] is not None:
        name += f"_s{point['sigma']:g}"
    if point["lambd"] is not None:
        name += f"_l{point['lambd']:g}"
    return os.path.join(FLAGS.root, f"{FLAGS.dataset}_{FLAGS.preset}", name)


def table(rows: list[dict]) -> tuple[str, list[dict]]:
    header = (
        "| defense | σ | λ | acc clean | acc defended | leakage bits (full) | "
        "decoder train-time MSE / PSNR / SSIM | decoder inference-time MSE / PSNR / SSIM | "
        "GAN train-time PSNR |"
    )
    lines = [header, "|" + "---|" * 9]
    records = []
    for point, res in rows:
        d = res["config"]
        spec = config_lib.config_from_dict(d).defense_spec()
        att = res.get("attacks", {})

        def m(attack: str, setting: str, att=att) -> str:
            r = att.get(attack, {}).get(setting)
            return f"{r['mse']:.4f} / {r['psnr']:.2f} / {r['ssim']:.3f}" if r else "-"

        gan = att.get("gan", {}).get("train_time")
        gan_psnr = f"{gan['psnr']:.2f}" if gan else "-"
        fin = res["final"]
        lines.append(
            f"| {spec.name} | {spec.sigma:g} | {spec.lambd if spec.cem else 0:g} | "
            f"{fin['clean_acc']:.4f} | {fin['defended_acc']:.4f} | "
            f"{fin['leakage_bits_full']:.1f} | {m('decoder', 'train_time')} | "
            f"{m('decoder', 'inference_time')} | {gan_psnr} |"
        )
        records.append({"point": point, "final": fin, "attacks": att})
    return "\n".join(lines), records


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not 0 <= FLAGS.shard_index < FLAGS.num_shards:
        sys.exit(f"error: shard_index={FLAGS.shard_index}: accepted 0..{FLAGS.num_shards - 1}.")
    from cem_jax import runner

    points = grid()
    data_dir = FLAGS.data_dir or os.environ.get("CEM_DATA_DIR") or None
    if not FLAGS.collect_only:
        mine = points[FLAGS.shard_index :: FLAGS.num_shards]
        for i, point in enumerate(mine):
            overrides = {k: v for k, v in point.items() if v is not None}
            overrides.update(dataset=FLAGS.dataset, data_dir=data_dir)
            if FLAGS.attacks is not None:
                overrides["attacks"] = tuple(a for a in FLAGS.attacks if a)
            try:
                cfg = config_lib.make_config(FLAGS.preset, **overrides)
                print(f"\n### sweep point {i + 1}/{len(mine)}: {point}", flush=True)
                runner.run(cfg, workdir=workdir_of(point), cache_dir=FLAGS.cache_dir or None)
            except (ValueError, runner.RunError) as e:
                sys.exit(f"error at {point}: {e}")
    rows = []
    for point in points:
        path = os.path.join(workdir_of(point), runner.RESULTS_FILE)
        if os.path.exists(path):
            with open(path) as f:
                rows.append((point, json.load(f)))
    text, records = table(rows)
    print(f"\n{len(rows)}/{len(points)} grid points finished\n{text}")
    os.makedirs(FLAGS.root, exist_ok=True)
    with open(os.path.join(FLAGS.root, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(FLAGS.root, "table.json"), "w") as f:
        json.dump(records, f, indent=2)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
