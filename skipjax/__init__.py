"""skipjax: depth sparsity in Transformers, in JAX/Flax."""

__version__ = "0.1.0"
