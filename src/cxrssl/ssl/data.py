"""Pretraining data: the NIH uint8 cache (train_val images only) and a resumable sampler.

:class:`NIHImages` gives each sample to the method's per-sample function (two augmented views for
the joint-embedding methods, a view and its corruption for GMML) together with a seed of its own,
``sample_seed(seed, epoch, index)``, and access to the other images (GMML's donor patches).

:class:`PairSampler` yields ``(epoch, index)`` pairs, so each DataLoader worker knows the epoch of
the sample it augments (no shared state to keep in sync) and the views are seeded per
``(seed, epoch, index)``. Its order is a seeded permutation per epoch cut into global batches;
rank ``r`` takes the ``r``-th contiguous slice of every global batch. Global batches are therefore
the same images for any number of ranks, and the sampler can start mid-epoch (resume).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from cxrssl.errors import BadInputError
from cxrssl.ssl.augment import TwoViews, sample_seed
from cxrssl.data.nih import open_cache  # noqa: F401  (re-exported)

PRETRAIN_SPLIT = "train_val"
_INDEX_COLUMNS = ("image_index", "official_split", "cache_row")




def _where(path: Path, row: int) -> str:
    """``file:row N (line L)`` for 0-based data row ``row`` (line counts the header)."""
    return f"{path}:row {row + 1} (line {row + 2})"


def pretrain_rows(index_path: str | Path, n_cache: int) -> pd.DataFrame:
    """The ``train_val`` rows of the NIH index (never the official test images), checked."""
    index_path = Path(index_path)
    frame = pd.read_csv(index_path)
    missing = [c for c in _INDEX_COLUMNS if c not in frame.columns]
    if missing:
        raise BadInputError(str(index_path), f"missing column(s) {missing}; has {list(frame.columns)}")
    bad_split = ~frame["official_split"].isin(["train_val", "test"])
    if bad_split.any():
        row = int(np.flatnonzero(bad_split.to_numpy())[0])
        raise BadInputError(_where(index_path, row),
                            f"official_split {str(frame['official_split'].iloc[row])!r} is not train_val or test")
    rows = pd.to_numeric(frame["cache_row"], errors="coerce")
    bad_row = rows.isna() | (rows < 0) | (rows >= n_cache) | (rows % 1 != 0)
    if bad_row.any():
        row = int(np.flatnonzero(bad_row.to_numpy())[0])
        raise BadInputError(_where(index_path, row),
                            f"cache_row {str(frame['cache_row'].iloc[row])!r} is not a row of the cache "
                            f"(0..{n_cache - 1})")
    frame = frame.assign(cache_row=rows.astype(np.int64))
    return frame[frame["official_split"] == PRETRAIN_SPLIT].reset_index(drop=True)


class NIHImages(Dataset):
    """``sample(self, i, seed)`` of each ``train_val`` image; items are ``(epoch, i)`` pairs.

    ``sample`` is the method's per-sample function (picklable: it travels to loader workers);
    :meth:`image` reads image ``i`` as uint8 ``(1, S, S)``. The memory map is opened lazily in
    each process and never pickled.
    """

    def __init__(self, index_path: str | Path, cache_path: str | Path, sample, seed: int):
        self.cache_path = Path(cache_path)
        cache = open_cache(self.cache_path)
        self.image_size = int(cache.shape[1])
        self.rows = pretrain_rows(index_path, len(cache))["cache_row"].to_numpy()
        if len(self.rows) == 0:
            raise BadInputError(str(index_path), f"no {PRETRAIN_SPLIT} images to pretrain on")
        self.sample, self.seed = sample, int(seed)
        self._cache: np.ndarray | None = None  # opened lazily: each worker maps the file itself

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> torch.Tensor:
        if self._cache is None:
            self._cache = open_cache(self.cache_path)
        return torch.from_numpy(np.array(self._cache[self.rows[i]], copy=True)).unsqueeze(0)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, i = item
        return self.sample(self, i, sample_seed(self.seed, epoch, i))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None  # never pickle a memory map into worker processes
        return state


class ViewPair:
    """Per-sample function of the two-view methods: ``views(image i, seed)``."""

    def __init__(self, views: TwoViews):
        self.views = views

    def __call__(self, images: NIHImages, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views(images.image(i), seed)


class NIHPairDataset(NIHImages):
    """Two augmented uint8 views of each ``train_val`` image; items are ``(epoch, i)`` pairs."""

    def __init__(self, index_path: str | Path, cache_path: str | Path, views: TwoViews, seed: int):
        super().__init__(index_path, cache_path, ViewPair(views), seed)
        self.views = views


class PairSampler(Sampler[tuple[int, int]]):
    """Seeded per-epoch permutation in global batches; rank ``rank`` gets its slice of each batch.

    The incomplete last global batch of an epoch is dropped (BatchNorm needs full batches).
    Call :meth:`set_epoch` before iterating; ``start_batch`` skips batches already trained.
    """

    def __init__(self, n: int, global_batch: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by {world_size} processes")
        if n < global_batch:
            raise ValueError(f"{n} training images are fewer than one batch of {global_batch}")
        self.n, self.global_batch, self.world_size, self.rank, self.seed = n, global_batch, world_size, rank, seed
        self.local_batch = global_batch // world_size
        self.batches_per_epoch = n // global_batch
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * self.global_batch + self.rank * self.local_batch
            for i in order[start:start + self.local_batch]:
                yield self.epoch, i
