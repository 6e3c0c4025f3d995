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


# --- live tracking: one small interface over dvclive, MLflow, TensorBoard (or nothing) ----------
#
# The training loops compute their losses and metrics once (they write metrics.csv, history.csv,
# train_log.csv); they hand the same numbers to a Tracker as they go, so a run can be watched
# while it trains (`dvc plots show`, `mlflow ui`, `tensorboard --logdir`). Which back end: the
# top-level ``tracking`` section of the config, set once per process by :func:`configure` (the
# scripts do it from their flags); a process that never calls it tracks nothing.

BACKENDS = ("dvclive", "mlflow", "tensorboard", "none")
_SETTINGS: dict = {"backend": "none", "dir": None, "every_n_steps": 1, "mlflow_uri": "results/mlruns"}


def configure(settings: dict | None) -> dict:
    """Set the process's tracking settings (the ``tracking`` config section); returns them."""
    merged = {**_SETTINGS, **(settings or {})}
    if merged["backend"] not in BACKENDS:
        raise ValueError(f"tracking.backend must be one of {BACKENDS}, got {merged['backend']!r}")
    if int(merged["every_n_steps"]) < 1:
        raise ValueError(f"tracking.every_n_steps must be >= 1, got {merged['every_n_steps']!r}")
    _SETTINGS.update(merged)
    return dict(_SETTINGS)


def current_settings() -> dict:
    return dict(_SETTINGS)


def _flat(params: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}/"))
        else:
            out[name] = value
    return out


def _plain(value):
    """A parameter value as YAML/JSON-safe plain data (paths and other objects become strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


class Tracker:
    """Live metrics of one run. This base class is the ``none`` back end: it records nothing.

    ``log_metric(name, value, step)`` logs one number at a step (names like ``train/loss``;
    None and NaN are skipped); ``log_step`` logs per-step values, thinned to every
    ``every_n_steps``-th step; ``log_epoch`` logs epoch-level values (always). ``next_step``
    flushes (dvclive rewrites its summary ``metrics.json``); ``close`` ends the run.
    """

    backend = "none"

    def __init__(self, every_n_steps: int = 1):
        self.every_n_steps = max(1, int(every_n_steps))

    # -- interface --
    def log_params(self, params: dict) -> None:
        self._params(_plain(params))

    def log_metric(self, name: str, value, step: int) -> None:
        if value is None or isinstance(value, bool):
            return
        value = float(value)
        if math.isfinite(value):
            self._metric(name, value, int(step))

    def log_step(self, values: dict, step: int, prefix: str = "train/") -> None:
        if int(step) % self.every_n_steps == 0 or int(step) == 1:
            self.log_epoch(values, step, prefix)

    def log_epoch(self, values: dict, step: int, prefix: str = "") -> None:
        for name, value in values.items():
            self.log_metric(f"{prefix}{name}", value, step)
        self.next_step()

    def log_rows(self, rows: list[dict], step_key: str = "iter", epoch_keys: tuple[str, ...] = ()) -> None:
        """One epoch of per-iteration log rows (a train_log.csv's): each row's values at its
        ``step_key`` as per-step values, then the ``epoch_keys`` of the last row (val metrics)."""
        for row in rows:
            self.log_step({k: v for k, v in row.items() if k not in (step_key, "epoch", *epoch_keys)},
                          row[step_key])
        if rows:
            last = rows[-1]
            self.log_epoch({k: last[k] for k in epoch_keys if k in last}, last[step_key])

    def next_step(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- back-end hooks --
    def _params(self, params: dict) -> None:
        pass

    def _metric(self, name: str, value: float, step: int) -> None:
        pass


class DVCLiveTracker(Tracker):
    """dvclive in ``<run dir>/<dir>``: ``metrics.json`` (latest values), ``params.yaml``,
    ``plots/metrics/<name>.tsv`` (one row per logged step).

    ``save_dvc_exp=False`` and ``dvcyaml=None``: it never creates an experiment or writes a
    dvc.yaml of its own, so it works the same under `dvc exp run`, `dvc repro`, Snakemake or
    alone; the repository's dvc.yaml declares these files as metrics and plots. ``close`` writes
    the summary but never calls ``Live.end()``, which inside `dvc exp run` would try to make the
    folder git-tracked (it lies in a DVC stage output).
    """

    backend = "dvclive"

    def __init__(self, folder: Path, every_n_steps: int = 1, resume: bool = False):
        super().__init__(every_n_steps)
        from dvclive import Live

        logging.getLogger("dvclive").setLevel(logging.WARNING)
        self.live = Live(str(folder), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)
        self._dirty = False

    def _params(self, params: dict) -> None:
        self.live.log_params(params)

    def _metric(self, name: str, value: float, step: int) -> None:
        if name.split("/")[0] == "step":  # dvclive's summary holds the step under that key
            raise ValueError(f"metric name {name!r}: 'step' is reserved by dvclive")
        self.live.step = step
        self.live.log_metric(name, value)
        self._dirty = True

    def next_step(self) -> None:
        if self._dirty:
            self.live.make_summary()
            self._dirty = False

    def close(self) -> None:
        self.next_step()


def mlflow_tracking_uri(uri: str) -> str:
    """A URI as given (``sqlite:///...``, ``http://...``, ``file:...``); a plain path ending in
    ``.db`` becomes an SQLite store, any other plain path a local file store."""
    if "://" in uri or uri.startswith("file:"):
        return uri
    path = Path(uri).resolve()
    return f"sqlite:///{path}" if path.suffix == ".db" else path.as_uri()


class MLflowTracker(Tracker):
    """One MLflow run (experiment = the stage, run name = the run) in the store at ``uri``
    (:func:`mlflow_tracking_uri`; a file store opens with
    ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <path>``)."""

    backend = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, every_n_steps: int = 1):
        super().__init__(every_n_steps)
        from mlflow.tracking import MlflowClient

        uri = mlflow_tracking_uri(uri)
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; it is the one
            # store that concurrent jobs can write without a server or a shared database lock.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = self.client.create_experiment(experiment)
            except Exception:  # another job created it first (parallel runs of one stage)
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
        experiment_id = found.experiment_id if found is not None else experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def _params(self, params: dict) -> None:
        for key, value in _flat(params).items():
            self.client.log_param(self.run_id, key, str(value)[:6000])

    def _metric(self, name: str, value: float, step: int) -> None:
        self.client.log_metric(self.run_id, name, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TensorBoardTracker(Tracker):
    """TensorBoard event files in ``<run dir>/<dir>`` (``tensorboard --logdir results``)."""

    backend = "tensorboard"

    def __init__(self, folder: Path, every_n_steps: int = 1):
        super().__init__(every_n_steps)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def _params(self, params: dict) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in _flat(params).items())
        self.writer.add_text("params", text)

    def _metric(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, global_step=step)

    def next_step(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def live_dir(run_dir: str | Path, settings: dict | None = None) -> Path:
    """Folder of a run's live logs: ``<run dir>/<tracking.dir>`` (default: the back end's name)."""
    s = settings or _SETTINGS
    return Path(run_dir) / (s.get("dir") or s["backend"])


def start(run_dir: str | Path, name: str, params: dict | None = None, *, enabled: bool = True,
          resume: bool = False, settings: dict | None = None) -> Tracker:
    """A Tracker for the run in ``run_dir`` (``name`` e.g. ``pretrain/barlowtwins``), with
    ``params`` logged. ``enabled=False`` (DDP ranks other than 0) gives the ``none`` tracker.
    ``resume`` (dvclive) continues the live logs of an interrupted run instead of clearing them."""
    s = {**_SETTINGS, **(settings or {})}
    backend = s["backend"] if enabled else "none"
    every = int(s["every_n_steps"])
    if backend == "dvclive":
        tracker: Tracker = DVCLiveTracker(live_dir(run_dir, s), every, resume=resume)
    elif backend == "mlflow":
        stage, _, run = name.partition("/")
        tracker = MLflowTracker(str(s["mlflow_uri"]), stage, run or stage, every)
    elif backend == "tensorboard":
        tracker = TensorBoardTracker(live_dir(run_dir, s), every)
    elif backend == "none":
        tracker = Tracker(every)
    else:
        raise ValueError(f"tracking.backend must be one of {BACKENDS}, got {backend!r}")
    if params and backend != "none":
        tracker.log_params(params)
    return tracker
