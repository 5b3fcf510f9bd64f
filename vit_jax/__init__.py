"""vit-jax: the Vision Transformer in JAX/Flax, for Cloud TPU."""

__version__ = "0.1.0"
