r"""Train a defended split network, attack it, and report privacy next to utility.

    cem-run --defense=cem_noise                                  # the paper's schedule
    cem-run --defense=cem_noise --preset=quick                   # minutes on a laptop
    python -m experiments.run --defense=cem_noise --preset=quick  # the same

Re-running the same command with the same ``--workdir`` resumes from the last completed epoch.
On several hosts, start the same command on each (``--coordinator_address=host0:1234
--num_processes=N --process_id=i``, or nothing under SLURM / a TPU pod slice: ``--distributed=auto``
detects it); process 0 writes the outputs.
Every field of :class:`cem_jax.config.RunConfig` has a flag (``--help`` lists them with their
defaults); a flag left unset keeps the preset's value.
"""

from __future__ import annotations

import os
import re

from absl import flags

from cem_jax import config as config_lib
from cem_jax.cli import config_flags

FLAGS = flags.FLAGS
# The flags are defined by define_flags() (main() and the experiments.run shim call it), not at
# import: the package's modules are all imported by doctest collection, and the three programs share
# flag names.
CONFIG_FLAGS: list[str] = []
OWN_FLAGS: list[str] = []


def define_flags(fv: flags.FlagValues = FLAGS) -> list[str]:
    """Defines the program's flags on ``fv`` (once for the global ``FLAGS``); their names."""
    if fv is FLAGS and OWN_FLAGS:
        return OWN_FLAGS
    names = config_flags.define_config_flags(fv)
    flags.DEFINE_enum(
        "preset",
        "paper",
        list(config_lib.PRESETS),
        "paper: the reference schedule (240 epochs, full data). quick: 6 epochs on 5,000 images, "
        "short attacks (minutes on CPU). Flags given explicitly override the preset.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "Output folder (default runs/<dataset>_<defense>_<preset>).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "cache_dir",
        os.path.expanduser("~/.cache/cem_jax"),
        "Decoded-dataset cache ('' off).",
        flag_values=fv,
    )
    own = [*names, "preset", "workdir", *config_flags.define_device_flags(fv), "cache_dir"]
    own += config_flags.define_distributed_flags(fv)
    if fv is FLAGS:
        CONFIG_FLAGS[:], OWN_FLAGS[:] = names, own
    return own


def config_from_flags(fv: flags.FlagValues = FLAGS) -> config_lib.RunConfig:
    """The validated :class:`RunConfig` of the parsed flags (raises ``ValueError`` naming a bad one)."""
    overrides = config_flags.config_overrides(fv, config_flags.config_fields())
    if overrides.get("data_dir") is None:
        overrides["data_dir"] = os.environ.get("CEM_DATA_DIR") or None
    return config_lib.make_config(fv.preset, **overrides)


def default_workdir(dataset: str, defense: str, preset: str) -> str:
    """``runs/<dataset>_<defense>_<preset>``, the dataset's name made a plain folder name.

    >>> default_workdir("tfds:my_set/config:1.0.0", "noise", "quick")
    'runs/tfds_my_set_config_1.0.0_noise_quick'
    """
    return os.path.join("runs", f"{re.sub(r'[^A-Za-z0-9._-]+', '_', dataset)}_{defense}_{preset}")


def _main(argv: list[str]) -> None:
    # expected failures (cem_jax.errors.CemError) end in one "error:" line: config_flags.run_main
    config_flags.check_no_arguments(argv)
    cfg = config_flags.usage_errors(config_from_flags)
    workdir = FLAGS.workdir or default_workdir(cfg.dataset, cfg.defense, FLAGS.preset)
    from cem_jax import runner  # imported late: flags errors above come back fast

    config_flags.initialize_distributed_from_flags(FLAGS)  # before any device is touched
    runner.run(
        cfg,
        workdir=workdir,
        num_devices=FLAGS.num_devices,
        device_index=FLAGS.device_index,
        cache_dir=FLAGS.cache_dir or None,
    )


def main() -> None:
    """Console script ``cem-run`` (and ``python -m experiments.run``)."""
    config_flags.start(__doc__, define_flags(), _main)


if __name__ == "__main__":
    main()
