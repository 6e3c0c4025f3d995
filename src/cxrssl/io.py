"""Atomic file output: write to a temporary file in the target folder, then rename.

A crash or a kill never leaves a half-written file under the final name, so Snakemake (and a
rerun) never mistakes a partial output for a complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    ``suffix`` defaults to the target's suffix so libraries that infer the format from the file
    name (PIL, matplotlib, numpy) keep working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give outputs the usual permissions (shared HPC projects).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(obj: Any, path: str | Path, indent: int | None = 2) -> None:
    atomic_write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n", path)


def atomic_write_csv(frame, path: str | Path, index: bool = False) -> None:
    """Write a pandas DataFrame as CSV atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file (checkpoints survive a kill mid-write)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_savefig(fig, path: str | Path, **kwargs: Any) -> None:
    """``fig.savefig`` through a temporary file."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
