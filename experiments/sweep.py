r"""Sweep defenses × σ × λ × seeds, then collect the table and the privacy–utility plot.

    python -m experiments.sweep --defenses=none,noise,cem_noise --sigmas=0.05,0.1 --seeds=1,2,3 \
        --preset=quick --data_dir=../shared/datasets/cifar10_jpeg --root=runs/sweep
    python -m experiments.sweep ... --num_shards=4 --shard_index=$SLURM_ARRAY_TASK_ID   # on a cluster
    python -m experiments.sweep ... --collect_only          # table.md, table.json, privacy_utility.png

The same program is installed as ``cem-sweep``; it lives in :mod:`cem_jax.cli.sweep`.
"""

from __future__ import annotations

from cem_jax.cli import sweep as _cli
from cem_jax.cli.sweep import FLAGS, main

_cli.define_flags()  # here, at import: tests parse FLAGS of this module directly

__all__ = ["FLAGS", "main"]

if __name__ == "__main__":
    main()
