"""DeepMind multi_object_datasets TFDS builder `ast_multi_object` (configs objects_room, clevr_with_masks)."""

from datasets.multi_object.multi_object_dataset_builder import (
    CLEVR_WITH_MASKS,
    OBJECTS_ROOM,
    AstMultiObject,
    MultiObjectConfig,
)

__all__ = ["CLEVR_WITH_MASKS", "OBJECTS_ROOM", "AstMultiObject", "MultiObjectConfig"]
