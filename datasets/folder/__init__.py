"""Image-folder dataset read directly with tf.data (DIR/{train,test}/images, optional masks)."""

from datasets.folder.folder_dataset import FolderDataset

__all__ = ["FolderDataset"]
