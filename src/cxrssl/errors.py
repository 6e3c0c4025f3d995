"""Bad-input handling: one error type that names the offending item, and a quarantine.

With ``on_bad_input: fail`` the first bad item raises :class:`BadInputError`; with ``skip`` it is
recorded in a :class:`Quarantine` and the stage goes on. The quarantine report is written
atomically next to the stage's outputs so the report and the HTML summary can list it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cxrssl.io import atomic_write_csv

log = logging.getLogger(__name__)

POLICIES = ("fail", "skip")


class BadInputError(ValueError):
    """An input file or row that cannot be used; ``item`` names it (path, or path:row)."""

    def __init__(self, item: str, reason: str):
        self.item = str(item)
        self.reason = reason
        super().__init__(f"{self.item}: {reason}")


@dataclass
class Quarantine:
    """Collects bad items under the ``skip`` policy; re-raises them under ``fail``."""

    policy: str = "fail"
    stage: str = ""
    items: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"on_bad_input must be one of {POLICIES}, got {self.policy!r}")

    def add(self, error: BadInputError) -> None:
        """Record ``error`` (policy skip) or raise it (policy fail)."""
        if self.policy == "fail":
            raise error
        log.warning("quarantined %s", error)
        self.items.append((error.item, error.reason))

    def __len__(self) -> int:
        return len(self.items)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"stage": [self.stage] * len(self.items),
             "item": [i for i, _ in self.items],
             "reason": [r for _, r in self.items]},
            columns=["stage", "item", "reason"],
        )

    def write(self, path: str | Path) -> None:
        """Write the report (header only when nothing was quarantined)."""
        atomic_write_csv(self.to_frame(), path)
