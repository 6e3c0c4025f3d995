"""Small helpers shared by the scripts: logging to the rule's log file, seeding, devices."""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path

import numpy as np


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Log to stderr and, when given, to ``log_file`` (the rule's ``log:``)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return logging.getLogger("cxrssl")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and ask torch for deterministic kernels."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(prefer: str | None = None):
    """``cuda`` when available (or ``prefer``), else ``cpu``."""
    import torch

    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def progress_disabled() -> bool:
    """tqdm bars are off when stderr is not a terminal and CXRSSL_PROGRESS is not set."""
    flag = os.environ.get("CXRSSL_PROGRESS")
    if flag is not None:
        return flag.lower() in ("0", "false", "no")
    return False
