"""The data summary of the report: what went into the experiments and what was left out.

:func:`data_summary` reads the prepared tables (VinDr metadata, split and fused boxes, the NIH index
and every quarantine CSV) and returns tidy counts: images per split, boxes per class and split,
DICOM properties, NIH images/patients/findings per official split, and the quarantined items with
their reasons. :func:`write_data_summary` writes them as a standalone HTML page and two CSVs.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import pandas as pd

from cxrssl.classes import NIH_FINDINGS, VINDR_CLASSES, VINDR_NO_FINDING
from cxrssl.errors import BadInputError
from cxrssl.io import atomic_write_csv, atomic_write_text

log = logging.getLogger(__name__)

SPLIT_ORDER = ["train", "val", "test"]
QUARANTINE_COLUMNS = ["stage", "item", "reason"]


def _read_csv(path: str | Path, required: list[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(str(path), "file does not exist")
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "image_index": str, "patient_id": str})
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame(columns=required)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BadInputError(str(path), f"missing columns {missing}")
    return frame


def _ordered_splits(values) -> list[str]:
    present = list(dict.fromkeys(str(v) for v in values))
    return [s for s in SPLIT_ORDER if s in present] + sorted(s for s in present if s not in SPLIT_ORDER)


def data_summary(vindr_metadata: str | Path, vindr_split: str | Path, vindr_fused: str | Path,
                 nih_index: str | Path, quarantine: list[str | Path]) -> dict[str, pd.DataFrame]:
    """Named tables: ``vindr_splits``, ``vindr_boxes``, ``vindr_dicom``, ``nih_splits``,
    ``nih_findings``, ``quarantined`` and the long-format ``counts`` that holds all counts."""
    meta = _read_csv(vindr_metadata, ["image_id", "source_split", "photometric", "bits_stored", "transfer_syntax"])
    split = _read_csv(vindr_split, ["image_id", "split"])
    fused = _read_csv(vindr_fused, ["image_id", "split", "class_name"])
    nih = _read_csv(nih_index, ["image_index", "patient_id", "official_split"])

    fused = fused[fused["class_name"] != VINDR_NO_FINDING]  # a label, not a box
    splits = _ordered_splits(split["split"])
    boxes_per_image = fused.groupby("image_id").size()
    split = split.assign(n_boxes=split["image_id"].map(boxes_per_image).fillna(0).astype(int))
    vindr_splits = pd.DataFrame({
        "images": split.groupby("split").size(),
        "images with boxes": split[split["n_boxes"] > 0].groupby("split").size(),
        "images without boxes": split[split["n_boxes"] == 0].groupby("split").size(),
        "boxes (fused)": split.groupby("split")["n_boxes"].sum(),
    }).reindex(splits).fillna(0).astype(int)
    vindr_splits.loc["total"] = vindr_splits.sum()
    not_split = sorted(set(meta["image_id"]) - set(split["image_id"]))
    if not_split:
        log.info("%d converted VinDr images are in no split", len(not_split))

    unknown = sorted(set(fused["class_name"]) - set(VINDR_CLASSES))
    if unknown:
        raise BadInputError(str(vindr_fused), f"unknown class names {unknown}")
    vindr_boxes = (fused.groupby(["class_name", "split"]).size().unstack("split")
                   .reindex(index=list(VINDR_CLASSES), columns=splits).fillna(0).astype(int))
    vindr_boxes["total"] = vindr_boxes.sum(axis=1)
    vindr_boxes.index.name = "class"

    merged = meta.merge(split[["image_id", "split"]], on="image_id", how="left").fillna({"split": "unused"})
    dicom_rows = []
    for column in ("source_split", "photometric", "bits_stored", "transfer_syntax"):
        counts = merged.groupby([column, "split"]).size().unstack("split", fill_value=0)
        for value, row in counts.iterrows():
            dicom_rows.append({"property": column, "value": str(value), **row.to_dict()})
    vindr_dicom = pd.DataFrame(dicom_rows).fillna(0)
    count_cols = [c for c in [*splits, "unused"] if c in vindr_dicom.columns]
    vindr_dicom = vindr_dicom[["property", "value", *count_cols]]
    vindr_dicom[count_cols] = vindr_dicom[count_cols].astype(int)

    nih_order = _ordered_splits(nih["official_split"])
    nih_splits = pd.DataFrame({
        "images": nih.groupby("official_split").size(),
        "patients": nih.groupby("official_split")["patient_id"].nunique(),
    }).reindex(nih_order).fillna(0).astype(int)
    nih_splits.loc["total"] = [len(nih), nih["patient_id"].nunique()]
    findings = [f for f in NIH_FINDINGS if f in nih.columns]
    nih_findings = (nih.groupby("official_split")[findings].sum().T.reindex(columns=nih_order).fillna(0).astype(int)
                    if findings else pd.DataFrame(columns=nih_order))
    if findings:
        no_finding = (nih[findings].sum(axis=1) == 0).groupby(nih["official_split"]).sum()
        nih_findings.loc["(no finding)"] = no_finding.reindex(nih_order).fillna(0).astype(int)
        nih_findings["total"] = nih_findings.sum(axis=1)
    nih_findings.index.name = "finding"

    frames = []
    for path in quarantine:
        q = _read_csv(path, QUARANTINE_COLUMNS)
        frames.append(q[QUARANTINE_COLUMNS].assign(file=Path(path).name))
    quarantined = (pd.concat(frames, ignore_index=True) if frames
                   else pd.DataFrame(columns=[*QUARANTINE_COLUMNS, "file"]))

    counts = []
    for s, row in vindr_splits.iterrows():
        counts += [{"dataset": "VinDr-CXR", "table": "splits", "name": k, "split": s, "count": int(v)} for k, v in row.items()]
    for cls, row in vindr_boxes.iterrows():
        counts += [{"dataset": "VinDr-CXR", "table": "boxes per class", "name": cls, "split": s, "count": int(v)}
                   for s, v in row.items()]
    for _, row in vindr_dicom.iterrows():
        counts += [{"dataset": "VinDr-CXR", "table": f"DICOM {row['property']}", "name": row["value"], "split": s,
                    "count": int(row[s])} for s in count_cols]
    for s, row in nih_splits.iterrows():
        counts += [{"dataset": "NIH ChestX-ray14", "table": "splits", "name": k, "split": s, "count": int(v)}
                   for k, v in row.items()]
    for finding, row in nih_findings.iterrows():
        counts += [{"dataset": "NIH ChestX-ray14", "table": "findings", "name": finding, "split": s, "count": int(v)}
                   for s, v in row.items()]
    for stage, n in quarantined.groupby("stage").size().items():
        counts.append({"dataset": "all", "table": "quarantined", "name": stage, "split": "", "count": int(n)})
    return {"vindr_splits": vindr_splits, "vindr_boxes": vindr_boxes, "vindr_dicom": vindr_dicom,
            "nih_splits": nih_splits, "nih_findings": nih_findings, "quarantined": quarantined,
            "counts": pd.DataFrame(counts, columns=["dataset", "table", "name", "split", "count"])}


def to_html(tables: dict[str, pd.DataFrame]) -> str:
    """A standalone HTML page with every table of :func:`data_summary`."""
    sections = [
        ("VinDr-CXR: images per split", tables["vindr_splits"], True),
        ("VinDr-CXR: fused boxes per class", tables["vindr_boxes"], True),
        ("VinDr-CXR: DICOM properties of the converted images", tables["vindr_dicom"], False),
        ("NIH ChestX-ray14: images and patients per official split", tables["nih_splits"], True),
        ("NIH ChestX-ray14: positive labels per finding", tables["nih_findings"], True),
    ]
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>cxrssl data summary</title>",
             "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin-bottom:2em}"
             " td,th{border:1px solid #bbb;padding:3px 8px;text-align:right} th{background:#eee}"
             " td:first-child,th:first-child{text-align:left}</style></head><body>",
             "<h1>Data summary</h1>"]
    for title, frame, index in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(frame.to_html(index=index, border=0, escape=True))
    quarantined = tables["quarantined"]
    parts.append(f"<h2>Quarantined items ({len(quarantined)})</h2>")
    if len(quarantined):
        parts.append(quarantined.to_html(index=False, border=0, escape=True))
    else:
        parts.append("<p>No input was quarantined.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_data_summary(vindr_metadata, vindr_split, vindr_fused, nih_index, quarantine, out_html, out_counts,
                       out_quarantined) -> dict[str, pd.DataFrame]:
    """Compute :func:`data_summary` and write the HTML page, the counts CSV and the quarantine CSV."""
    tables = data_summary(vindr_metadata, vindr_split, vindr_fused, nih_index, quarantine)
    atomic_write_text(to_html(tables), out_html)
    atomic_write_csv(tables["counts"], out_counts)
    atomic_write_csv(tables["quarantined"], out_quarantined)
    log.info("data summary: %d VinDr images in splits, %d NIH images, %d quarantined items -> %s",
             int(tables["vindr_splits"].loc["total", "images"]), int(tables["nih_splits"].loc["total", "images"]),
             len(tables["quarantined"]), out_html)
    return tables
