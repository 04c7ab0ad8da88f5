"""cem_jax: Conditional Entropy Maximization against model inversion, in JAX/Flax.

The main API, importable from the package (the mathematics of :mod:`cem_jax.entropy` and the restore
path of :mod:`cem_jax.client`, imported on first use so ``import cem_jax`` stays cheap)::

    from cem_jax import cem_loss, fit_mixture, leakage_certificate, leakage_upper_bound
    from cem_jax import mse_lower_bound, MixtureState
    from cem_jax import load_client

>>> import cem_jax
>>> cem_jax.fit_mixture is __import__("cem_jax.entropy").entropy.fit_mixture
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# XLA:CPU flags the steps were measured with (cem_jax.xla_cpu), set before any backend starts; a
# user's own XLA_FLAGS are kept, CEM_JAX_XLA_CPU_FLAGS=0 turns this off.
from cem_jax import xla_cpu as _xla_cpu  # noqa: E402  (after __version__, imports nothing heavy)

_xla_cpu.apply()

# name -> module it lives in (PEP 562 lazy attributes: jax is imported on first use, not by
# `import cem_jax`; the console scripts' flag errors come back before jax starts)
_API = {
    "cem_loss": "cem_jax.entropy",
    "fit_mixture": "cem_jax.entropy",
    "MixtureState": "cem_jax.entropy",
    "leakage_certificate": "cem_jax.entropy",
    "leakage_upper_bound": "cem_jax.entropy",
    "mse_lower_bound": "cem_jax.entropy",
    "load_client": "cem_jax.client",
}
__all__ = [
    "MixtureState",
    "cem_loss",
    "fit_mixture",
    "leakage_certificate",
    "leakage_upper_bound",
    "load_client",
    "mse_lower_bound",
]

if TYPE_CHECKING:  # what type checkers and IDEs see (py.typed)
    from cem_jax.client import load_client
    from cem_jax.entropy import (
        MixtureState,
        cem_loss,
        fit_mixture,
        leakage_certificate,
        leakage_upper_bound,
        mse_lower_bound,
    )


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'cem_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
