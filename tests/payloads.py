"""A real malicious checkpoint for the security tests: unpickling it runs code that creates a file.

``torch.load(..., weights_only=False)`` (the unsafe load) executes the payload; cxrssl must load
checkpoints with ``weights_only=True`` (:func:`cxrssl.runtime.load_checkpoint`), which refuses it.
"""

from __future__ import annotations

from pathlib import Path

import torch


class CreatesFile:
    """Unpickles as ``open(marker, "w")``: the file appears if the payload is executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_checkpoint(path: Path, marker: Path, layout: str = "detector") -> Path:
    """A torch checkpoint shaped like a cxrssl file (``detector``: meta + model; ``state_dict``: a
    backbone state dict; ``resume``: a last.pth) with the payload inside."""
    payload = CreatesFile(marker)
    if layout == "detector":
        obj = {"meta": {"format": 2, "engine": "torchvision", "note": payload},
               "model": {"w": torch.zeros(1)}}
    elif layout == "state_dict":
        obj = {"conv1.weight": torch.zeros(1), "evil": payload}
    elif layout == "resume":
        obj = {"model": {}, "fingerprint": payload, "epoch": 1}
    else:
        raise ValueError(layout)
    torch.save(obj, path)
    return path


def check_payload_is_live(tmp_path: Path) -> None:
    """The payload really runs under an unsafe load (so a test that sees no marker means something)."""
    marker = tmp_path / "proof_the_payload_runs"
    path = malicious_checkpoint(tmp_path / "probe.pth", marker)
    torch.load(path, weights_only=False)
    assert marker.exists(), "the payload did not run under torch.load(weights_only=False)"
    marker.unlink()
