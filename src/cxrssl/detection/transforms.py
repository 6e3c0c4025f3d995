"""Image and box transforms of the detection stage.

Resizing and ImageNet normalisation happen inside the model (GeneralizedRCNNTransform); here images
become float tensors in [0, 1] with three equal channels, and training images are flipped.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from cxrssl.errors import BadInputError


def to_grey(array: np.ndarray, item: str | Path) -> np.ndarray:
    """A 2-D grey image from a grey, grey+alpha, RGB(A) or single-channel array (OpenCV order)."""
    if array.ndim == 2:
        return array
    if array.ndim == 3 and array.shape[2] == 1:
        return array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 2:  # grey + alpha
        return array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2GRAY)
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2GRAY)
    raise BadInputError(str(item), f"unsupported image shape {array.shape}")


def read_grey_image(path: str | Path) -> np.ndarray:
    """Read an 8- or 16-bit PNG (or any format OpenCV reads) as a 2-D grey array, dtype kept."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(str(path), "image file does not exist")
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise BadInputError(str(path), "not a readable image (corrupt or unsupported format)")
    return to_grey(array, path)


def to_unit_float(array: np.ndarray, item: str | Path = "image") -> np.ndarray:
    """Scale an integer image by its dtype's range (8- and 16-bit PNGs) to float32 in [0, 1].

    Float arrays are taken to be in [0, 1] already and clipped.
    """
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        if info.min < 0:
            raise BadInputError(str(item), f"signed pixel type {array.dtype} is not a display-ready image")
        return array.astype(np.float32) / float(info.max)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise BadInputError(str(item), "image holds NaN or infinite values")
        return np.clip(array, 0.0, 1.0).astype(np.float32)
    raise BadInputError(str(item), f"unsupported pixel type {array.dtype}")


def to_model_tensor(grey: np.ndarray, item: str | Path = "image") -> torch.Tensor:
    """(3, H, W) float tensor in [0, 1]: the grey image repeated on the RGB channels."""
    unit = torch.from_numpy(np.ascontiguousarray(to_unit_float(grey, item)))
    return unit.unsqueeze(0).expand(3, -1, -1).contiguous()


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a (C, H, W) image left-right and its (N, 4) xyxy boxes with it."""
    width = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.flip(-1), flipped
