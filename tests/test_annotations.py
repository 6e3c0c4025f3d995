"""VinDr-CXR annotation parsing (cxrssl.data.annotations): both layouts, row-level validation."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrssl.classes import VINDR_CLASSES, VINDR_NO_FINDING, VINDR_NO_FINDING_ID
from cxrssl.data.annotations import (
    COLUMNS,
    KAGGLE_HEADER,
    PHYSIONET_HEADER,
    read_vindr_annotations,
    run_parse,
)
from cxrssl.errors import BadInputError, Quarantine

ROOT = Path(__file__).resolve().parents[1]
HYPO = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------ helpers / strategies


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else repr(value)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def physionet_record(row: dict) -> list[str]:
    return [row["image_id"], row["rad_id"], row["class_name"], *(_fmt(row[c]) for c in ("x_min", "y_min", "x_max", "y_max"))]


def kaggle_record(row: dict) -> list[str]:
    return [row["image_id"], row["class_name"], str(row["class_id"]), row["rad_id"],
            *(_fmt(row[c]) for c in ("x_min", "y_min", "x_max", "y_max"))]


def write_layout(root: Path, layout: str, train: list[dict], test: list[dict] | None = None) -> None:
    if layout == "physionet":
        write_csv(root / "annotations/annotations_train.csv", PHYSIONET_HEADER, [physionet_record(r) for r in train])
        write_csv(root / "annotations/annotations_test.csv", PHYSIONET_HEADER,
                  [physionet_record(r) for r in (test or [])])
    else:
        write_csv(root / "train.csv", KAGGLE_HEADER, [kaggle_record(r) for r in train])


coord = st.floats(min_value=0, max_value=4000, allow_nan=False, allow_infinity=False)
extent = st.floats(min_value=1.5, max_value=1000, allow_nan=False, allow_infinity=False)  # >= MIN_BOX_SIDE


@st.composite
def valid_rows(draw) -> dict:
    image_id = draw(st.text("0123456789abcdef", min_size=1, max_size=12))
    rad_id = f"R{draw(st.integers(1, 17))}"
    if draw(st.booleans()):
        return dict(image_id=image_id, rad_id=rad_id, class_name=VINDR_NO_FINDING, class_id=VINDR_NO_FINDING_ID,
                    x_min=math.nan, y_min=math.nan, x_max=math.nan, y_max=math.nan)
    cid = draw(st.integers(0, len(VINDR_CLASSES) - 1))
    x0, y0, w, h = draw(coord), draw(coord), draw(extent), draw(extent)
    if x0 + w <= x0 or y0 + h <= y0:  # float absorption near large values
        w, h = 2.0, 2.0
    return dict(image_id=image_id, rad_id=rad_id, class_name=VINDR_CLASSES[cid], class_id=cid,
                x_min=x0, y_min=y0, x_max=x0 + w, y_max=y0 + h)


def row_key(row: dict) -> tuple:
    """What makes a reader row unique (a repeated one is a bad row)."""
    return (row["image_id"], row["rad_id"], row["class_name"], *(_fmt(row[c]) for c in ("x_min", "y_min", "x_max", "y_max")))


unique_rows = dict(unique_by=row_key)


def assert_same_rows(frame: pd.DataFrame, rows: list[dict], source_split: str) -> None:
    assert list(frame.columns) == COLUMNS
    assert len(frame) == len(rows)
    for got, want in zip(frame.to_dict("records"), rows):
        assert got["source_split"] == source_split
        for key, value in want.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[key]), key
            else:
                assert got[key] == value, key


# ------------------------------------------------------------------ round trips


@HYPO
@given(train=st.lists(valid_rows(), min_size=1, max_size=15, **unique_rows),
       test=st.lists(valid_rows(), max_size=5, **unique_rows))
def test_physionet_round_trip(tmp_path_factory, train, test):
    # image ids of the test file get their own prefix (an image in both files is an error).
    test = [dict(r, image_id="t" + r["image_id"]) for r in test]
    root = tmp_path_factory.mktemp("physionet")
    write_layout(root, "physionet", train, test)
    frame = read_vindr_annotations(root, "physionet", Quarantine("fail"))
    assert_same_rows(frame[frame["source_split"] == "train"], train, "train")
    assert_same_rows(frame[frame["source_split"] == "test"], test, "test")


@HYPO
@given(rows=st.lists(valid_rows(), min_size=1, max_size=15, **unique_rows))
def test_kaggle_round_trip(tmp_path_factory, rows):
    root = tmp_path_factory.mktemp("kaggle")
    write_layout(root, "kaggle", rows)
    frame = read_vindr_annotations(root, "kaggle", Quarantine("fail"))
    assert_same_rows(frame, rows, "train")


def test_run_parse_writes_contract(tmp_path):
    rows = [
        dict(image_id="a1", rad_id="R1", class_name="Nodule/Mass", class_id=8, x_min=1.5, y_min=2.0, x_max=30.0, y_max=40.0),
        dict(image_id="a1", rad_id="R2", class_name=VINDR_NO_FINDING, class_id=14,
             x_min=math.nan, y_min=math.nan, x_max=math.nan, y_max=math.nan),
    ]
    write_layout(tmp_path / "vindr", "kaggle", rows)
    out, quarantine = tmp_path / "out/annotations.csv", tmp_path / "out/quarantine.csv"
    run_parse(tmp_path / "vindr", "kaggle", out, quarantine, "fail")
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    assert lines[1] == "a1,R1,Nodule/Mass,8,1.5,2.0,30.0,40.0,train"
    assert lines[2] == "a1,R2,No finding,14,,,,,train"  # empty coordinates for No finding
    assert pd.read_csv(quarantine).empty


# ------------------------------------------------------------------ bad rows

GOOD = dict(image_id="img0", rad_id="R1", class_name="Cardiomegaly", class_id=3,
            x_min=10.0, y_min=20.0, x_max=110.0, y_max=220.0)


def _mutations(layout: str) -> dict[str, callable]:
    """Ways of breaking one valid record of ``layout`` (index positions of its header)."""
    h = PHYSIONET_HEADER if layout == "physionet" else KAGGLE_HEADER
    ix = {name: h.index(name) for name in h}

    def setf(name, value):
        def f(rec):
            rec = list(rec)
            rec[ix[name]] = value
            return rec
        return f

    muts = {
        "unknown class": setf("class_name", "Nodule_Mass"),
        "non-numeric": setf("x_min", "12px"),
        "inf": setf("y_max", "inf"),
        "comma decimal": setf("x_max", "1,5"),
        "inverted x": lambda r: setf("x_max", "5")(r),
        "inverted y": lambda r: setf("y_max", "20")(r),
        "negative": setf("y_min", "-3"),
        "nan coords on a box": lambda r: setf("x_min", "")(setf("y_min", "")(setf("x_max", "")(setf("y_max", "")(r)))),
        "partly empty": setf("y_min", ""),
        "no finding with coords": setf("class_name", VINDR_NO_FINDING),
        "too many fields": lambda r: list(r) + ["extra"],
        "too few fields": lambda r: list(r)[:-1],
        "empty image id": setf("image_id", ""),
        "path in image id": setf("image_id", "../etc"),
    }
    if layout == "kaggle":
        muts["class id mismatch"] = setf("class_id", "4")
        muts["class id not int"] = setf("class_id", "3.0")
        muts["no finding wrong id"] = lambda r: setf("class_id", "13")(setf("class_name", VINDR_NO_FINDING)(
            [*r[:4], "", "", "", ""]))
    return muts


@pytest.mark.parametrize("layout", ["physionet", "kaggle"])
def test_each_mutation_names_the_row(tmp_path, layout):
    record = physionet_record(GOOD) if layout == "physionet" else kaggle_record(GOOD)
    for name, mutate in _mutations(layout).items():
        root = tmp_path / layout / name.replace(" ", "_")
        path = root / ("annotations/annotations_train.csv" if layout == "physionet" else "train.csv")
        header = PHYSIONET_HEADER if layout == "physionet" else KAGGLE_HEADER
        other = physionet_record(dict(GOOD, rad_id="R2")) if layout == "physionet" else kaggle_record(dict(GOOD, rad_id="R2"))
        write_csv(path, header, [record, mutate(record), other])
        if layout == "physionet":
            write_csv(root / "annotations/annotations_test.csv", header, [])
        with pytest.raises(BadInputError) as err:
            read_vindr_annotations(root, layout, Quarantine("fail"))
        assert err.value.item == f"{path}:row 2 (line 3)", name
        # Under skip the bad row is recorded and the good ones are kept.
        quarantine = Quarantine("skip")
        frame = read_vindr_annotations(root, layout, quarantine)
        assert len(frame) == 2 and len(quarantine) == 1, name
        assert quarantine.items[0][0] == f"{path}:row 2 (line 3)"


def test_kaggle_class_id_message_names_canonical_table(tmp_path):
    write_layout(tmp_path, "kaggle", [dict(GOOD, class_id=4)])
    with pytest.raises(BadInputError, match=r"class_id 4 does not match class_name 'Cardiomegaly'.*says 3"):
        read_vindr_annotations(tmp_path, "kaggle", Quarantine("fail"))


def test_line_numbers_follow_quoted_newlines(tmp_path):
    path = tmp_path / "train.csv"
    bad_multiline = ["img\n0", "Cardiomegaly", "3", "R1", "1", "1", "5", "5"]
    bad = kaggle_record(dict(GOOD, x_min=500.0))  # inverted
    write_csv(path, KAGGLE_HEADER, [bad_multiline, bad])
    quarantine = Quarantine("skip")
    read_vindr_annotations(tmp_path, "kaggle", quarantine)
    assert [item for item, _ in quarantine.items] == [f"{path}:row 1 (line 2)", f"{path}:row 2 (line 4)"]


garbage_field = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@HYPO
@given(layout=st.sampled_from(["physionet", "kaggle"]),
       garbage=st.lists(st.lists(garbage_field, max_size=10), min_size=1, max_size=5),
       raw_bytes=st.binary(max_size=20))
def test_garbage_rows_only_raise_bad_input(tmp_path_factory, layout, garbage, raw_bytes):
    """Random garbage between valid rows: BadInputError naming a row, never another exception."""
    root = tmp_path_factory.mktemp("garbage")
    header = PHYSIONET_HEADER if layout == "physionet" else KAGGLE_HEADER
    good = physionet_record(GOOD) if layout == "physionet" else kaggle_record(GOOD)
    path = root / ("annotations/annotations_train.csv" if layout == "physionet" else "train.csv")
    other = physionet_record(dict(GOOD, rad_id="R2")) if layout == "physionet" else kaggle_record(dict(GOOD, rad_id="R2"))
    write_csv(path, header, [good, *garbage, other])
    with path.open("ab") as fh:  # plus a line of arbitrary bytes (maybe not UTF-8)
        fh.write(raw_bytes.replace(b"\n", b" ").replace(b"\r", b" ") + b"\n")
    if layout == "physionet":
        write_csv(root / "annotations/annotations_test.csv", header, [])
    try:
        read_vindr_annotations(root, layout, Quarantine("fail"))
    except BadInputError as exc:
        assert exc.item.startswith(f"{path}:row ") and "(line " in exc.item
    quarantine = Quarantine("skip")
    frame = read_vindr_annotations(root, layout, quarantine)
    assert (frame["image_id"] == "img0").sum() >= 2  # the valid rows always survive
    assert all(item.startswith(f"{path}:row ") for item, _ in quarantine.items)


# ------------------------------------------------------------------ file-level errors


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_wrong_header_is_never_skipped(tmp_path, policy):
    write_csv(tmp_path / "train.csv", PHYSIONET_HEADER, [physionet_record(GOOD)])  # physionet header, kaggle layout
    with pytest.raises(BadInputError, match=r"train.csv:line 1: wrong header for the kaggle layout"):
        read_vindr_annotations(tmp_path, "kaggle", Quarantine(policy))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(BadInputError, match="annotations_train.csv: annotation file is missing"):
        read_vindr_annotations(tmp_path, "physionet", Quarantine("skip"))
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(BadInputError, match="empty"):
        read_vindr_annotations(tmp_path, "kaggle", Quarantine("skip"))


def test_header_with_bom_and_blank_lines(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(("\ufeff" + ",".join(KAGGLE_HEADER) + "\r\n" + ",".join(kaggle_record(GOOD)) + "\r\n\r\n")
                     .encode("utf-8"))
    frame = read_vindr_annotations(tmp_path, "kaggle", Quarantine("fail"))
    assert len(frame) == 1 and frame.loc[0, "x_max"] == 110.0


def test_image_in_both_physionet_files_is_quarantined(tmp_path):
    write_layout(tmp_path, "physionet", [GOOD, dict(GOOD, image_id="img1")], [dict(GOOD, rad_id="R8")])
    with pytest.raises(BadInputError, match="img0.*both the train and test"):
        read_vindr_annotations(tmp_path, "physionet", Quarantine("fail"))
    quarantine = Quarantine("skip")
    frame = read_vindr_annotations(tmp_path, "physionet", quarantine)
    assert frame["image_id"].tolist() == ["img1"] and len(quarantine) == 1


def test_script_help_and_run(tmp_path):
    write_layout(tmp_path / "vindr", "physionet", [GOOD], [dict(GOOD, image_id="t1")])
    help_text = subprocess.run([sys.executable, ROOT / "scripts/parse_annotations.py", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--layout" in help_text and "--on-bad-input" in help_text
    out = tmp_path / "annotations.csv"
    subprocess.run([sys.executable, ROOT / "scripts/parse_annotations.py", "--root", tmp_path / "vindr",
                    "--layout", "physionet", "--annotations", out, "--quarantine", tmp_path / "q.csv",
                    "--log", tmp_path / "log.txt"], check=True, capture_output=True)
    assert pd.read_csv(out)["source_split"].tolist() == ["train", "test"]
    assert "valid rows" in (tmp_path / "log.txt").read_text()


# ------------------------------------------------------------------ hostile rows (issue 11)


@pytest.mark.parametrize("layout", ["physionet", "kaggle"])
def test_csv_module_errors_are_bad_rows(tmp_path, layout):
    """A field over the csv module's 128 kB limit raised csv.Error outside the per-row check."""
    header = PHYSIONET_HEADER if layout == "physionet" else KAGGLE_HEADER
    good = physionet_record(GOOD) if layout == "physionet" else kaggle_record(GOOD)
    other = physionet_record(dict(GOOD, rad_id="R2")) if layout == "physionet" else kaggle_record(dict(GOOD, rad_id="R2"))
    path = tmp_path / ("annotations/annotations_train.csv" if layout == "physionet" else "train.csv")
    write_csv(path, header, [good])
    with path.open("a") as fh:
        fh.write("x" * 200_000 + ",R1,Cardiomegaly\n")
        fh.write(",".join(other) + "\n")
    if layout == "physionet":
        write_csv(tmp_path / "annotations/annotations_test.csv", header, [])
    with pytest.raises(BadInputError, match=r"row 2 \(line 3\): malformed CSV record.*field larger than field limit"):
        read_vindr_annotations(tmp_path, layout, Quarantine("fail"))
    quarantine = Quarantine("skip")
    frame = read_vindr_annotations(tmp_path, layout, quarantine)
    assert frame["rad_id"].tolist() == ["R1", "R2"] and len(quarantine) == 1


@pytest.mark.parametrize("width", [1e-13, 0.5, 0.999])
def test_degenerate_boxes_are_rejected_at_the_row(tmp_path, width):
    write_layout(tmp_path, "kaggle", [GOOD, dict(GOOD, rad_id="R2", x_max=GOOD["x_min"] + width)])
    with pytest.raises(BadInputError, match=r"train.csv:row 2 \(line 3\): degenerate box"):
        read_vindr_annotations(tmp_path, "kaggle", Quarantine("fail"))


def test_repeated_reader_rows_are_dropped_and_named(tmp_path, caplog):
    nf = dict(image_id="img1", rad_id="R3", class_name=VINDR_NO_FINDING, class_id=14,
              x_min=math.nan, y_min=math.nan, x_max=math.nan, y_max=math.nan)
    write_layout(tmp_path, "kaggle", [GOOD, GOOD, dict(GOOD, rad_id="R2"), GOOD, nf, nf])
    frame = read_vindr_annotations(tmp_path, "kaggle", Quarantine("fail"))
    assert frame["rad_id"].tolist() == ["R1", "R2", "R3"]
    assert "3 repeated reader row(s) dropped" in caplog.text and "row 2 (line 3) = row 1 (line 2)" in caplog.text
