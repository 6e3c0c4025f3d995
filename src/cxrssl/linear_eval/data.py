"""Reading the NIH index and uint8 image cache (contract in CONTRIBUTING.md) for classification."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from cxrssl.classes import NIH_FINDINGS
from cxrssl.errors import BadInputError
from cxrssl.data.nih import open_cache  # noqa: F401  (re-exported)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INDEX_COLUMNS = ("image_index", "patient_id", "official_split", "cache_row", *NIH_FINDINGS)
OFFICIAL_SPLITS = ("train_val", "test")


def _bad_rows(path: Path, mask: np.ndarray, frame: pd.DataFrame, what: str) -> BadInputError:
    rows = np.flatnonzero(mask)
    # line numbers of the CSV file: header is line 1
    where = ", ".join(f"line {r + 2} ({frame['image_index'].iloc[r]})" for r in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return BadInputError(f"{path}", f"{what}: {where}{more}")


def load_nih_index(path: str | Path, n_cache_rows: int | None = None) -> pd.DataFrame:
    """The NIH index with its columns checked (labels 0/1, known splits, valid cache rows).

    Also checks the official lists are patient-disjoint: a patient on both sides would leak
    into the test split.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIH index {path} does not exist")
    frame = pd.read_csv(path, dtype={"patient_id": str, "image_index": str, "official_split": str})
    missing = [c for c in INDEX_COLUMNS if c not in frame.columns]
    if missing:
        raise BadInputError(str(path), f"missing columns {missing}")
    if frame.empty:
        raise BadInputError(str(path), "no rows")
    bad = ~frame["official_split"].isin(OFFICIAL_SPLITS).to_numpy()
    if bad.any():
        raise _bad_rows(path, bad, frame, f"official_split must be one of {OFFICIAL_SPLITS}")
    bad = frame["patient_id"].isna().to_numpy()
    if bad.any():
        raise _bad_rows(path, bad, frame, "empty patient_id")
    labels = frame[list(NIH_FINDINGS)].apply(pd.to_numeric, errors="coerce")
    bad = ~labels.isin([0, 1]).all(axis=1).to_numpy()
    if bad.any():
        raise _bad_rows(path, bad, frame, "finding columns must hold 0 or 1")
    frame[list(NIH_FINDINGS)] = labels.astype(np.int8)
    rows = pd.to_numeric(frame["cache_row"], errors="coerce")
    bad = rows.isna() | (rows < 0) | (rows != rows.round())
    if n_cache_rows is not None:
        bad |= rows >= n_cache_rows
    bad = bad.to_numpy(dtype=bool)
    if bad.any():
        limit = f" below {n_cache_rows}" if n_cache_rows is not None else ""
        raise _bad_rows(path, bad, frame, f"cache_row must be a non-negative integer{limit}")
    frame["cache_row"] = rows.astype(np.int64)
    sides = frame.groupby("patient_id")["official_split"].nunique()
    both = sides.index[sides > 1].tolist()
    if both:
        raise BadInputError(str(path), f"patients on both the train_val and the test list: {both[:5]}"
                            f"{' ...' if len(both) > 5 else ''} (the official lists are patient-disjoint)")
    return frame




def grey_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """One grey channel -> the three channels ImageNet-style backbones expect."""
    return image.expand(3, -1, -1)


def image_transform(image_size: int, augment: bool) -> v2.Compose:
    """uint8 ``(1, S, S)`` -> normalised float ``(3, image_size, image_size)``.

    Evaluation: resize the shorter side and centre-crop. Training with ``augment``: a random
    resized crop (60-100 % of the area, near-square) and a horizontal flip.
    """
    if augment:
        geometry = [v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(0.9, 1.1), antialias=True),
                    v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([
        *geometry,
        v2.ToDtype(torch.float32, scale=True),
        v2.Lambda(grey_to_rgb),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class CacheImages(Dataset):
    """Rows of the memory-mapped cache with their 14 labels.

    ``cache`` is the cache file (or an array already in memory, for tests). A file is mapped
    lazily in each process and the map is never pickled: under the spawn / forkserver start
    methods every DataLoader worker receives the dataset by pickling, and a pickled memory map is
    a full copy of the cache (7.35 GB for NIH at 256 px) per worker.
    """

    def __init__(self, cache: str | Path | np.ndarray, rows: np.ndarray, labels: np.ndarray, transform):
        if len(rows) != len(labels):
            raise ValueError("rows and labels differ in length")
        if isinstance(cache, (str, Path)):
            self.cache_path: Path | None = Path(cache)
            self._cache = None
        else:
            self.cache_path = getattr(cache, "filename", None) and Path(cache.filename)
            self._cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cache(self) -> np.ndarray:
        if self._cache is None:
            self._cache = open_cache(self.cache_path)
        return self._cache

    def __getitem__(self, i: int):
        image = torch.from_numpy(np.array(self.cache[self.rows[i]]))[None]
        return self.transform(image), self.labels[i]

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.cache_path is not None:
            state["_cache"] = None  # each worker maps the file itself
        return state
