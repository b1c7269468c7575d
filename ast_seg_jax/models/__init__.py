"""Flax modules of AST and the pure functions they are built from."""

from ast_seg_jax.models.ast_model import AST
from ast_seg_jax.models.background import BackgroundAutoencoder
from ast_seg_jax.models.build import build_model

__all__ = ["AST", "BackgroundAutoencoder", "build_model"]
