"""Training data: (frontal image, tokenised report) pairs from a pairs table (cxrssl.multimodal.reports).

Images are read once (grey, resized to ``image_size`` x ``image_size``) into a uint8 array in
memory: reading JPEG/PNG files every epoch would cost more than a small model's step on a CPU;
a full MIMIC-CXR run needs a uint8 cache file instead (not written yet). Reports are tokenised
once. Items are ``(epoch, index)`` pairs (:class:`cxrssl.ssl.data.PairSampler`), and each view
is seeded per (seed, epoch, index), so a batch does not depend on workers, ranks or resuming.

The view: a mild random resized crop (scale 0.8-1, aspect 0.9-1.1) and brightness/contrast
jitter; no flips, which would swap the "left"/"right" the reports speak of.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from cxrssl.errors import BadInputError
from cxrssl.multimodal.text import pad_tokens
from cxrssl.ssl.augment import sample_seed


def load_grey(path: str | Path, size: int) -> np.ndarray:
    """An image file as uint8 ``(size, size)`` (RGB/RGBA/16-bit converted to 8-bit grey)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.float32)
                arr = (arr - arr.min()) / max(float(np.ptp(arr)), 1.0) * 255
                im = Image.fromarray(arr.astype(np.uint8))
            return np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise BadInputError(str(path), f"not a readable image ({exc})") from None


class ReportView:
    """Callable ``(uint8 (1, S, S), seed) -> uint8 (1, size, size)``: the training view (module doc)."""

    def __init__(self, size: int, train: bool = True):
        self.size, self.train = size, train
        self.t = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), interpolation=InterpolationMode.BILINEAR,
                                 antialias=True),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ])

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        if not self.train:
            return v2.functional.resize(image, [self.size, self.size], antialias=True)
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(seed)
        try:
            return self.t(image).contiguous()
        finally:
            gen.set_state(saved)


class ReportImageDataset(Dataset):
    """Pairs of one split: item ``(epoch, i)`` -> (uint8 view ``(1, S, S)``, token ids, sentence ids)."""

    def __init__(self, pairs: pd.DataFrame, image_root: str | Path, tokenize, image_size: int, seed: int,
                 train: bool = True):
        if pairs.empty:
            raise ValueError("no report-image pairs in this split")
        root = Path(image_root)
        self.ids = pairs["report_id"].tolist()
        self.images = np.stack([load_grey(root / p, image_size) for p in pairs["image_path"]])
        self.tokens = [tokenize(s) for s in pairs["sentences"]]
        self.view, self.seed = ReportView(image_size, train), int(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]):
        epoch, i = item
        image = torch.from_numpy(self.images[i]).unsqueeze(0)
        return self.view(image, sample_seed(self.seed, epoch, i)), self.tokens[i]


def collate_pairs(items, pad_id: int) -> dict[str, torch.Tensor]:
    """Dataset items -> ``{"images": uint8 (B, 1, S, S), "input_ids", "attention_mask", "sentence_ids"}``.

    Use as ``functools.partial(collate_pairs, pad_id=...)`` (picklable for DataLoader workers).
    """
    batch = pad_tokens([tok for _, tok in items], pad_id)
    batch["images"] = torch.stack([img for img, _ in items])
    return batch
