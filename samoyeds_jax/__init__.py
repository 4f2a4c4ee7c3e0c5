"""samoyeds-jax: memory-lean, fast Mixture-of-Experts inference in JAX (Flax NNX modules)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
