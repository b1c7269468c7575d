"""ast-seg-jax: unsupervised multi-object segmentation with attention and soft-argmax, in JAX/Flax."""

__version__ = "0.1.0"
