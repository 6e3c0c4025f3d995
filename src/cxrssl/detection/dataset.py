"""The VinDr COCO JSON (``coco_{split}.json``) as a torchvision-detection dataset.

``file_name`` is relative to the JSON's folder; boxes are COCO ``[x, y, w, h]`` in the pixels of
the converted PNG and become xyxy tensors; the label is the COCO category id (1..14). The JSON is
checked up front so a bad file stops with the annotation or image it concerns, not deep inside a
training loop.

Which images a training set holds is :func:`training_image_ids`, the rule of mmdet's
``filter_cfg`` (``filter_empty_gt``, ``min_size``), so both engines train on the same images:
``detection.train_on_empty`` keeps or drops the images without boxes (the paper's mmdet 2.x config
dropped them), and images whose short side is below :data:`TRAIN_MIN_SIZE` are never trained on.
Val and test sets keep every image.

Augmentation randomness is a function of ``(seed, epoch, index)`` only, so a run resumed from a
checkpoint, or read by any number of workers or ranks, sees the same flips.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cxrssl.classes import check_class_names, coco_categories
from cxrssl.detection.transforms import hflip, read_grey_image, to_model_tensor
from cxrssl.errors import BadInputError

#: Boxes may overhang the image by this many pixels (rounding in the conversion) before it is an error.
BOX_TOLERANCE = 1.0
#: Training images need a short side of at least this many pixels (mmdet's filter_cfg min_size).
TRAIN_MIN_SIZE = 32


def training_image_ids(coco: dict, train_on_empty: bool, min_size: int = TRAIN_MIN_SIZE) -> list[int]:
    """COCO ids of the images a training set uses, in id order (mmdet's ``filter_data`` rule)."""
    with_boxes = {int(a["image_id"]) for a in coco["annotations"]}
    return sorted(int(im["id"]) for im in coco["images"]
                  if (train_on_empty or int(im["id"]) in with_boxes)
                  and min(int(im["width"]), int(im["height"])) >= min_size)


def load_coco(path: str | Path) -> dict:
    """Read and check a COCO detection JSON of the pipeline; errors name the file and the entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(str(path), "COCO JSON does not exist") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(str(path), f"not valid JSON: {exc}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise BadInputError(str(path), f"missing list {key!r}")
    cats = sorted(data["categories"], key=lambda c: c.get("id", -1))
    try:
        check_class_names([c["name"] for c in cats], where=str(path))
    except KeyError:
        raise BadInputError(str(path), "a category has no 'name'") from None
    except ValueError as exc:
        raise BadInputError(str(path), str(exc)) from None
    if [c["id"] for c in cats] != [c["id"] for c in coco_categories()]:
        raise BadInputError(str(path), "category ids are not 1..14 in cxrssl.classes order")
    images = {}
    for i, img in enumerate(data["images"]):
        try:
            image_id, width, height, name = int(img["id"]), int(img["width"]), int(img["height"]), img["file_name"]
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"{path}:images[{i}]", "needs integer id, width, height and a file_name") from None
        if image_id in images:
            raise BadInputError(f"{path}:images[{i}]", f"duplicate image id {image_id}")
        if width <= 0 or height <= 0:
            raise BadInputError(f"{path}:images[{i}]", f"bad size {width}x{height}")
        images[image_id] = (width, height, name)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}:annotations[{i}] (id {ann.get('id')})"
        if ann.get("image_id") not in images:
            raise BadInputError(where, f"image_id {ann.get('image_id')!r} is not in images")
        if ann.get("category_id") not in range(1, len(cats) + 1):
            raise BadInputError(where, f"category_id {ann.get('category_id')!r} is not in 1..{len(cats)}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise BadInputError(where, f"bbox {bbox!r} is not [x, y, w, h]")
        x, y, w, h = bbox
        width, height, _ = images[ann["image_id"]]
        if w <= 0 or h <= 0:
            raise BadInputError(where, f"empty box {bbox}")
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
            raise BadInputError(where, f"box {bbox} lies outside the {width}x{height} image")
    return data


def input_format(json_path: str | Path) -> tuple[int, int]:
    """Longest side and bit depth of a split's PNGs (prediction converts new images the same way)."""
    json_path = Path(json_path)
    images = json.loads(json_path.read_text())["images"]
    if not images:
        raise BadInputError(str(json_path), "no images")
    size = max(max(int(im["width"]), int(im["height"])) for im in images)
    dtype = read_grey_image(json_path.parent / images[0]["file_name"]).dtype
    return size, 16 if dtype == np.uint16 else 8


class CocoDetection(Dataset):
    """Items are ``(image (3,H,W) float in [0,1], target dict)`` with xyxy ``boxes``, ``labels``
    (COCO category ids) and ``image_id`` (the COCO id), as torchvision detection models expect."""

    def __init__(self, json_path: str | Path, hflip_prob: float = 0.0, seed: int = 0,
                 train_on_empty: bool | None = None):
        """``train_on_empty`` None keeps every image (val/test); True/False makes it a training set
        (:func:`training_image_ids`)."""
        self.json_path = Path(json_path)
        self.root = self.json_path.parent
        self.coco = load_coco(self.json_path)
        self.hflip_prob = float(hflip_prob)
        self.seed = int(seed)
        self.epoch = 0
        self.images = sorted(self.coco["images"], key=lambda im: int(im["id"]))
        if train_on_empty is not None:
            keep = set(training_image_ids(self.coco, train_on_empty))
            self.images = [im for im in self.images if int(im["id"]) in keep]
        boxes: dict[int, list] = {int(im["id"]): [] for im in self.images}
        for ann in sorted(self.coco["annotations"], key=lambda a: (a["image_id"], a.get("id", 0))):
            if int(ann["image_id"]) in boxes:
                boxes[int(ann["image_id"])].append(ann)
        self._anns = boxes

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before iterating)."""
        self.epoch = int(epoch)

    def image_path(self, index: int) -> Path:
        return self.root / self.images[index]["file_name"]

    def __getitem__(self, index: int):
        info = self.images[index]
        path = self.image_path(index)
        grey = read_grey_image(path)
        if grey.shape != (int(info["height"]), int(info["width"])):
            raise BadInputError(str(path), f"image is {grey.shape[1]}x{grey.shape[0]} but {self.json_path} says "
                                           f"{info['width']}x{info['height']}")
        image = to_model_tensor(grey, path)
        anns = self._anns[int(info["id"])]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        # Clip the tolerated overhang so flipped boxes stay inside the image too.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.shape[-1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.shape[-2])
        labels = torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64)
        if self.hflip_prob > 0:
            draw = np.random.default_rng([self.seed, self.epoch, index]).random()
            if draw < self.hflip_prob:
                image, boxes = hflip(image, boxes)
        target = {"boxes": boxes, "labels": labels, "image_id": int(info["id"])}
        return image, target


def collate(batch):
    """Detection batches are lists (images differ in size)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
