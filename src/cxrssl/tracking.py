"""Experiment tracking: one small ``metrics.json`` with the headline numbers of a whole run.

DVC compares runs through this file (``dvc metrics show``, ``dvc metrics diff``, ``dvc exp show``).
It nests by run so DVC's flattened names read like paths, e.g.
``detection.torchvision.barlowtwins_640px_seed0.mAP50`` or
``linear_eval.barlowtwins.frac0_01.test_mean_auc``. Names never contain dots (DVC splits on them),
hence ``frac0_01`` for the label fraction 0.01.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrssl.errors import BadInputError
from cxrssl.io import atomic_write_json

log = logging.getLogger(__name__)

DETECTION_KEYS = ("mAP50", "mAP", "mAP75", "voc_mAP")
LINEAR_KEYS = ("test_mean_auc", "val_mean_auc")
# evaluation run folder: .../evaluation/<engine>/<init>_<res>px_seed<seed>/metrics.json
_RUN_NAME = re.compile(r"^(?P<init>.+)_(?P<res>\d+)px_seed(?P<seed>\d+)$")


def fraction_key(fraction: float) -> str:
    """Dot-free name of a label fraction: 0.01 -> ``frac0_01``, 1.0 -> ``frac1_0``."""
    value = float(fraction)
    if not 0 < value <= 1:  # also rejects NaN
        raise ValueError(f"label fraction must be in (0, 1], got {fraction!r}")
    # shortest round-tripping digits without exponent, as in the linear-eval run folders (frac0.01)
    return "frac" + np.format_float_positional(value, trim="0").replace(".", "_")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise BadInputError(str(path), "metrics file does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(str(path), f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadInputError(str(path), f"expected a JSON object, got {type(data).__name__}")
    return data


def _number(path: Path, key: str, value) -> float | None:
    """A metric as a JSON number; None stays None (a metric that was undefined, e.g. no positives)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(str(path), f"{key} is not a number: {value!r}")
    return None if math.isnan(value) else round(float(value), 6)


def detection_entry(path: str | Path) -> tuple[str, str, dict]:
    """(engine, run name, headline metrics) of one evaluation run's ``metrics.json``.

    The engine and run name come from the folder layout ``<engine>/<init>_<res>px_seed<seed>/``.
    """
    path = Path(path)
    run, engine = path.parent.name, path.parent.parent.name
    if not _RUN_NAME.match(run) or not engine:
        raise BadInputError(str(path), "not inside an evaluation run folder <engine>/<init>_<res>px_seed<seed>/")
    data = _read_json(path)
    missing = [k for k in DETECTION_KEYS if k not in data]
    if missing:
        raise BadInputError(str(path), f"not an evaluation metrics file: missing {missing}")
    return engine, run, {k: _number(path, k, data[k]) for k in DETECTION_KEYS}


def linear_entry(path: str | Path) -> tuple[str, str, dict]:
    """(init, fraction key, mean AUCs) of one linear-evaluation run's ``metrics.json``."""
    path = Path(path)
    data = _read_json(path)
    missing = [k for k in ("init", "fraction", *LINEAR_KEYS) if k not in data]
    if missing:
        raise BadInputError(str(path), f"not a linear-evaluation metrics file: missing {missing}")
    try:
        key = fraction_key(data["fraction"])
    except (TypeError, ValueError) as exc:
        raise BadInputError(str(path), f"bad fraction: {exc}") from exc
    return str(data["init"]), key, {k: _number(path, k, data[k]) for k in LINEAR_KEYS}


def collect_metrics(detection: Sequence[str | Path] = (), linear: Sequence[str | Path] = ()) -> dict:
    """The run's headline numbers: detection mAPs per engine x run, linear-probe AUCs per init x fraction.

    Two files describing the same run (same engine and run name, or same init and fraction) are an
    error rather than a silent overwrite.
    """
    out: dict = {"detection": {}, "linear_eval": {}}
    for path in detection:
        engine, run, values = detection_entry(path)
        runs = out["detection"].setdefault(engine, {})
        if run in runs:
            raise BadInputError(str(path), f"a second metrics file for detection run {engine}/{run}")
        runs[run] = values
    for path in linear:
        init, key, values = linear_entry(path)
        runs = out["linear_eval"].setdefault(init, {})
        if key in runs:
            raise BadInputError(str(path), f"a second metrics file for linear-evaluation run {init}/{key}")
        runs[key] = values
    return out


def write_metrics(detection: Sequence[str | Path], linear: Sequence[str | Path], output: str | Path) -> dict:
    """Collect the headline metrics and write them atomically to ``output`` (JSON)."""
    metrics = collect_metrics(detection, linear)
    atomic_write_json(metrics, output)
    n_det = sum(len(v) for v in metrics["detection"].values())
    n_lin = sum(len(v) for v in metrics["linear_eval"].values())
    log.info("wrote %s: %d detection runs, %d linear-evaluation runs", output, n_det, n_lin)
    return metrics


def paths_under(paths: Sequence[str], folders: Sequence[str], first: Sequence[str] = ()) -> list[str]:
    """``first``, then the ``paths`` that lie inside one of ``folders``; each path once, order kept.

    The Snakemake stage targets use it to pick, from every registered final output, those that belong
    to one DVC stage's output folders (a plain path comparison: nothing is read from disk).
    """
    prefixes = tuple(os.path.normpath(f) + os.sep for f in folders)
    inside = [p for p in paths if os.path.normpath(p).startswith(prefixes)]
    return list(dict.fromkeys([*first, *inside]))
