r"""Train a defended split network, attack it, and report privacy next to utility.

    python -m experiments.run --defense=cem_noise                       # the paper's schedule
    python -m experiments.run --defense=cem_noise --preset=quick \
        --data_dir=../shared/datasets/cifar10_jpeg                     # minutes on a laptop

Re-running the same command with the same ``--workdir`` resumes from the last completed epoch.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

from cem_jax import config as config_lib
from cem_jax import defenses
from cem_jax.models import ARCHS

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "preset",
    "paper",
    list(config_lib.PRESETS),
    "paper: the reference schedule (240 "
    "epochs, full data). quick: 6 epochs on 5,000 images, short attacks (minutes on CPU).",
)
flags.DEFINE_string(
    "defense",
    "cem_noise",
    "Defense preset, cem_X = noise(sigma) + X + CEM; the presets and their defaults: "
    + defenses.describe_presets()
    + ". Every value can be overridden by its flag.",
)
flags.DEFINE_string("dataset", "cifar10", "One of: " + ", ".join(config_lib.DATASETS) + ".")
flags.DEFINE_string(
    "data_dir",
    None,
    "Dataset folder/zip (train/<class>/*.png|jpg + test/<class>/...) or a tfds data_dir. Default: "
    "$CEM_DATA_DIR, then tensorflow-datasets' default location.",
)
flags.DEFINE_enum("arch", None, list(ARCHS), "Split architecture (default vgg11_bn_sgm).")
flags.DEFINE_integer("cut_layer", None, "Cut layer (default: 4 for VGG, 5 for ResNet20).")
flags.DEFINE_integer(
    "bottleneck_channels", None, "Channels of the client's bottleneck (0: none; default 8)."
)
flags.DEFINE_float("sigma", None, "Noise standard deviation (default: the defense's).")
flags.DEFINE_float("lambd", None, "Weight of the CEM loss (default: the defense's).")
flags.DEFINE_enum(
    "cem_mode",
    None,
    list(config_lib.CEM_MODES),
    "gmm: the paper's bound (default); reference: the official code's hinge loss.",
)
flags.DEFINE_integer(
    "clusters_per_class", None, "k-means clusters per class (default 5 VGG, 15 ResNet)."
)
flags.DEFINE_float("dropout_ratio", None, "Dropout ratio for the dropout defenses.")
flags.DEFINE_float("topk_ratio", None, "Fraction of features zeroed by the top-k defenses.")
flags.DEFINE_bool(
    "dropout_rescale", None, "Rescale kept features by 1/(1-r) (default off, as the reference)."
)
flags.DEFINE_enum(
    "topk_scope",
    None,
    list(defenses.TOPK_SCOPES),
    "Top-k per sample (default, what a deployed client can do) or over the whole batch (reference).",
)
flags.DEFINE_float("nopeek_alpha", None, "Weight of the NoPeek distance-correlation loss.")
flags.DEFINE_float(
    "adversarial_alpha", None, "Weight of the adversarial defense's SSIM penalty (default 0.3)."
)
flags.DEFINE_float(
    "ssim_threshold", None, "SSIM above which the adversarial defense penalises (default 0.5)."
)
flags.DEFINE_integer("epochs", None, "Training epochs (paper 240, quick 6).")
flags.DEFINE_integer("batch_size", None, "Global batch size (default 128).")
flags.DEFINE_float(
    "lr", None, "Base learning rate (default 0.05; x0.2 at 25/50/75/87.5% of the epochs)."
)
flags.DEFINE_integer("seed", None, "Random seed (default 125, as the reference).")
flags.DEFINE_integer("train_subset", None, "Train on a class-balanced subset of N images.")
flags.DEFINE_integer("test_subset", None, "Evaluate on a random subset of N test images.")
flags.DEFINE_list("attacks", None, "Attacks to run after training: decoder,gan (empty: none).")
flags.DEFINE_integer("attack_epochs", None, "Decoder attack epochs (paper 50).")
flags.DEFINE_integer("gan_epochs", None, "GAN attack epochs (paper 150).")
flags.DEFINE_integer("attack_train_subset", None, "Train the train-time decoder on N images only.")
flags.DEFINE_integer(
    "gan_train_subset", None, "Train the GAN attack on the first N attacker images."
)
flags.DEFINE_enum(
    "threat_model",
    None,
    list(config_lib.THREAT_MODELS),
    "server_view: the attacker "
    "sees every obfuscation (default); noise_only: the reference's simulation.",
)
flags.DEFINE_string("workdir", None, "Output folder (default runs/<dataset>_<defense>_<preset>).")
flags.DEFINE_integer("num_devices", None, "Devices in the data mesh (default: all).")
flags.DEFINE_string(
    "cache_dir", os.path.expanduser("~/.cache/cem_jax"), "Decoded-dataset cache ('' off)."
)

_OVERRIDES = (
    "defense dataset data_dir arch cut_layer bottleneck_channels sigma lambd cem_mode clusters_per_class "
    "dropout_ratio dropout_rescale topk_ratio topk_scope nopeek_alpha adversarial_alpha ssim_threshold epochs batch_size lr seed train_subset test_subset "
    "attack_epochs gan_epochs attack_train_subset gan_train_subset threat_model"
).split()


def config_from_flags() -> config_lib.RunConfig:
    overrides = {name: getattr(FLAGS, name) for name in _OVERRIDES}
    if overrides["data_dir"] is None:
        overrides["data_dir"] = os.environ.get("CEM_DATA_DIR") or None
    if FLAGS.attacks is not None:
        overrides["attacks"] = tuple(a for a in FLAGS.attacks if a)
    return config_lib.make_config(FLAGS.preset, **overrides)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        cfg = config_from_flags()
    except ValueError as e:
        sys.exit(f"error: {e}")
    workdir = FLAGS.workdir or os.path.join("runs", f"{cfg.dataset}_{cfg.defense}_{FLAGS.preset}")
    from cem_jax import runner  # imported late: flags errors above come back fast

    try:
        runner.run(
            cfg,
            workdir=workdir,
            num_devices=FLAGS.num_devices,
            cache_dir=FLAGS.cache_dir or None,
        )
    except (ValueError, FileNotFoundError, runner.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    t0 = time.time()
    app.run(main)
