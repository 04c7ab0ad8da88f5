"""cem_jax: Conditional Entropy Maximization against model inversion, in JAX/Flax."""
