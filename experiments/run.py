r"""Train a defended split network, attack it, and report privacy next to utility.

    python -m experiments.run --defense=cem_noise                       # the paper's schedule
    python -m experiments.run --defense=cem_noise --preset=quick \
        --data_dir=../shared/datasets/cifar10_jpeg                     # minutes on a laptop

Re-running the same command with the same ``--workdir`` resumes from the last completed epoch.
The same program is installed as ``cem-run``; it lives in :mod:`cem_jax.cli.run`.
"""

from __future__ import annotations

from cem_jax.cli import run as _cli
from cem_jax.cli.run import FLAGS, config_from_flags, main

_cli.define_flags()  # here, at import: tests parse FLAGS of this module directly

__all__ = ["FLAGS", "config_from_flags", "main"]

if __name__ == "__main__":
    main()
