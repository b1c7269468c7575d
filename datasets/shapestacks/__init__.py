"""ShapeStacks TFDS builder `ast_shapestacks` (config default)."""

from datasets.shapestacks.shapestacks_dataset_builder import (
    AstShapestacks,
    ShapestacksConfig,
)

__all__ = ["AstShapestacks", "ShapestacksConfig"]
