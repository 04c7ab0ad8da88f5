r"""Re-run the model inversion attacks on a finished run, without retraining.

    python -m experiments.attack --workdir=runs/cifar10_cem_noise_quick
    python -m experiments.attack --workdir=... --attacks=decoder --attack_epochs=50 --threat_model=noise_only

The run's config, data and final checkpoint are reused; the attack section of ``results.json`` is
replaced only when every attack has finished (an interrupted attack leaves the old file untouched).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from cem_jax import config as config_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The --workdir of a finished experiments.run.", required=True)
flags.DEFINE_list("attacks", None, "Attacks to run: decoder,gan (default: the run's).")
flags.DEFINE_integer("attack_epochs", None, "Decoder attack epochs (default: the run's).")
flags.DEFINE_integer("gan_epochs", None, "GAN attack epochs (default: the run's).")
flags.DEFINE_integer("attack_train_subset", None, "Train the train-time decoder on N images only.")
flags.DEFINE_enum("threat_model", None, list(config_lib.THREAT_MODELS), "Attacker's view.")
flags.DEFINE_integer("attack_seed", None, "Seed of the attacks (default 200).")
flags.DEFINE_string("data_dir", None, "Dataset location, if it moved since training.")
flags.DEFINE_string("cache_dir", os.path.expanduser("~/.cache/cem_jax"), "Decoded-dataset cache.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cem_jax import runner

    overrides = {
        "attack_epochs": FLAGS.attack_epochs,
        "gan_epochs": FLAGS.gan_epochs,
        "attack_train_subset": FLAGS.attack_train_subset,
        "threat_model": FLAGS.threat_model,
        "attack_seed": FLAGS.attack_seed,
        "data_dir": FLAGS.data_dir,
    }
    if FLAGS.attacks is not None:
        overrides["attacks"] = tuple(a for a in FLAGS.attacks if a)
    try:
        runner.attack_workdir(
            FLAGS.workdir,
            overrides={k: v for k, v in overrides.items() if v is not None},
            cache_dir=FLAGS.cache_dir or None,
        )
    except (ValueError, FileNotFoundError, runner.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
