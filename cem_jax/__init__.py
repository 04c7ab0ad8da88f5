"""cem_jax: Conditional Entropy Maximization against model inversion, in JAX/Flax."""

from typing import Any

__version__ = "0.1.0"


def load_client(workdir: str, **kwargs: Any) -> Any:
    """The trained client of a finished run: ``client(images [B,H,W,3] in [0,1], key) -> features``.

    See :func:`cem_jax.client.load_client`.
    """
    from cem_jax.client import load_client as _load_client

    return _load_client(workdir, **kwargs)
