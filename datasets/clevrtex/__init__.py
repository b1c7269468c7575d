"""CLEVRTEX v1 TFDS builder `ast_clevrtex` (configs full, outd, camo)."""

from datasets.clevrtex.clevrtex_dataset_builder import AstClevrtex, ClevrtexConfig

__all__ = ["AstClevrtex", "ClevrtexConfig"]
