"""File names of a heatmap run, shared by the package and rules/heatmaps.smk (no heavy imports)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def n_heatmaps(settings: Mapping[str, Any]) -> int:
    """How many heatmap PNGs a run writes: one per explicit image id, else ``n_images``."""
    return len(settings["images"]) if settings.get("images") else int(settings["n_images"])


def heatmap_name(index: int) -> str:
    return f"heatmap_{index:02d}.png"
