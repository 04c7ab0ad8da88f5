r"""Re-run the model inversion attacks on a finished run, without retraining.

    cem-attack --workdir=runs/cifar10_cem_noise_quick
    cem-attack --workdir=... --attacks=decoder --attack_steps=10000 --threat_model=noise_only
    python -m experiments.attack --workdir=...                   # the same

The run's config, data and final checkpoint are reused; every config field the trained client does not
depend on (the attacks', the data location, the evaluation batch) can be overridden by its flag. The
attack section of ``results.json`` is replaced only when every attack has finished (an interrupted
attack leaves the old file untouched).
"""

from __future__ import annotations

import os

from absl import flags

from cem_jax import config as config_lib
from cem_jax.cli import config_flags

FLAGS = flags.FLAGS


def attack_fields() -> list[str]:
    """The RunConfig fields a re-attack may change: those outside the training fingerprint."""
    trained = set(config_lib.RunConfig().training_fingerprint())
    return [name for name in config_flags.config_fields() if name not in trained]


CONFIG_FLAGS: list[str] = []
OWN_FLAGS: list[str] = []


def define_flags(fv: flags.FlagValues = FLAGS) -> list[str]:
    """Defines the program's flags on ``fv`` (once for the global ``FLAGS``); their names."""
    if fv is FLAGS and OWN_FLAGS:
        return OWN_FLAGS
    flags.DEFINE_string(
        "workdir", None, "The --workdir of a finished run.", required=True, flag_values=fv
    )
    names = config_flags.define_config_flags(
        fv, only=attack_fields(), unset_note="default: the run's"
    )
    flags.DEFINE_string(
        "cache_dir",
        os.path.expanduser("~/.cache/cem_jax"),
        "Decoded-dataset cache ('' off).",
        flag_values=fv,
    )
    own = ["workdir", *names, "cache_dir", *config_flags.define_device_flags(fv)]
    own += config_flags.define_distributed_flags(fv)
    if fv is FLAGS:
        CONFIG_FLAGS[:], OWN_FLAGS[:] = names, own
    return own


def _main(argv: list[str]) -> None:
    # expected failures (cem_jax.errors.CemError) end in one "error:" line: config_flags.run_main
    config_flags.check_no_arguments(argv)
    from cem_jax import runner

    config_flags.initialize_distributed_from_flags(FLAGS)  # before any device is touched
    runner.attack_workdir(
        FLAGS.workdir,
        overrides=config_flags.config_overrides(FLAGS, CONFIG_FLAGS),
        cache_dir=FLAGS.cache_dir or None,
        num_devices=FLAGS.num_devices,
        device_index=FLAGS.device_index,
    )


def main() -> None:
    """Console script ``cem-attack`` (and ``python -m experiments.attack``)."""
    config_flags.start(__doc__, define_flags(), _main)


if __name__ == "__main__":
    main()
