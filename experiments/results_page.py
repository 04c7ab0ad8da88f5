"""``python -m experiments.results_page``: see :mod:`cem_jax.cli.results_page`."""

from cem_jax.cli.results_page import main

if __name__ == "__main__":
    main()
