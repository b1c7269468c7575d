"""Running a trained model on users' images: loading, segmentation, object lists and latents.

Images of any size are resized (bilinear, whole image, no crop) to the model's input size; label maps come
back at the image's original size (nearest). Object positions and boxes are given in the original image's
pixel coordinates.
"""

import functools
import os

import jax
import numpy as np
from PIL import Image

from ast_seg_jax import image_io
from ast_seg_jax.models.ast_model import predicted_labels

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# PIL modes with a faithful RGB meaning (8-bit, and 16-bit greyscale); others (e.g. CMYK, float) are refused.
SUPPORTED_MODES = image_io.SUPPORTED_MODES


def list_images(path: str) -> list[str]:
    """`path` itself if it is a file, else the image files directly inside the folder, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is neither an image file nor a folder.")
    files = sorted(
        os.path.join(path, f)
        for f in os.listdir(path)
        if f.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(path, f))
    )
    if not files:
        raise FileNotFoundError(
            f"The folder {path!r} holds no image ({', '.join(IMAGE_EXTENSIONS)})."
        )
    return files


def load_image(
    path: str, *, max_side: int = image_io.MAX_IMAGE_SIDE, downscale: bool = False
) -> np.ndarray:
    """An RGB uint8 [h, w, 3] array, decoded exactly as the folder dataset decodes training images
    (`image_io.decode_image`); a clear `image_io.ImageError` (a ValueError) for unreadable files,
    unsupported modes and images over `max_side` pixels per side (unless `downscale`)."""
    return image_io.decode_image(path, max_side=max_side, downscale=downscale)


def resize_for_model(image: np.ndarray, image_hw) -> np.ndarray:
    """uint8 [h, w, 3] -> float32 [H, W, 3] in [0, 1] at the model's size (PIL bilinear)."""
    h, w = image_hw
    resized = Image.fromarray(image).resize((w, h), Image.BILINEAR)
    return np.asarray(resized, np.float32) / 255.0


def _apply_and_segment(model, variables, image):
    out = model.apply(variables, image, None, train=False)
    return out, predicted_labels(model, out, image)


class Segmenter:
    """Applies a trained AST model to single images."""

    def __init__(self, model, variables, image_hw):
        self.model = model
        self.variables = variables
        self.image_hw = tuple(image_hw)
        self._apply = jax.jit(functools.partial(_apply_and_segment, model))

    def __call__(self, image: np.ndarray) -> dict:
        """Segments one RGB uint8 image of any size.

        Returns:
          A dict with `labels` (uint8 [h, w] at the original size, 0 = background), `objects` (a list of
          dicts, one per slot), and the latents `z_what` [k, z], `xy` [k, 2], `scale` [k, 2],
          `activation_logit` [k] (model coordinates: x, y in [-1, 1]).
        """
        h0, w0 = image.shape[:2]
        x = resize_for_model(image, self.image_hw)[None]
        out, labels_small = self._apply(self.variables, x)
        labels_small = np.asarray(labels_small)[0].astype(np.uint8)
        labels = np.asarray(
            Image.fromarray(labels_small).resize((w0, h0), Image.NEAREST), np.uint8
        )
        xy = np.asarray(out.xy)[0]
        scale = np.asarray(out.scale)[0]
        act = np.asarray(out.activation_logit)[0]
        objects = []
        for k in range(xy.shape[0]):
            mask = labels == k + 1
            area = int(mask.sum())
            obj = {
                "slot": k + 1,
                "visible": area > 0,
                "pixel_area": area,
                # Centre in pixels of the original image (align_corners=False convention).
                "center_xy": [
                    float((xy[k, 0] + 1) * w0 / 2 - 0.5),
                    float((xy[k, 1] + 1) * h0 / 2 - 0.5),
                ],
                # Size of the glimpse's support in pixels (the object spans 2/s of the image side).
                "glimpse_size_wh": [float(w0 / scale[k, 0]), float(h0 / scale[k, 1])],
                "activation_logit": float(act[k]),
                "bbox_xyxy": None,
            }
            if area:
                rows, cols = np.nonzero(mask)
                obj["bbox_xyxy"] = [
                    int(cols.min()),
                    int(rows.min()),
                    int(cols.max()) + 1,
                    int(rows.max()) + 1,
                ]
            objects.append(obj)
        return {
            "labels": labels,
            "objects": objects,
            "z_what": np.asarray(out.z_what)[0],
            "xy": xy,
            "scale": scale,
            "activation_logit": act,
        }
