"""Built-in synthetic scenes: `generator.generate` (numpy) and the TFDS builder `AstShapes` (`ast_shapes`)."""

from datasets.shapes.shapes_dataset_builder import AstShapes, ShapesConfig

__all__ = ["AstShapes", "ShapesConfig"]
