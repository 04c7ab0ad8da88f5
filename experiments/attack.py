r"""Re-run the model inversion attacks on a finished run, without retraining.

    python -m experiments.attack --workdir=runs/cifar10_cem_noise_quick
    python -m experiments.attack --workdir=... --attacks=decoder --attack_steps=10000 --threat_model=noise_only

The same program is installed as ``cem-attack``; it lives in :mod:`cem_jax.cli.attack`.
"""

from __future__ import annotations

from cem_jax.cli import attack as _cli
from cem_jax.cli.attack import FLAGS, main

_cli.define_flags()  # here, at import: tests parse FLAGS of this module directly

__all__ = ["FLAGS", "main"]

if __name__ == "__main__":
    main()
