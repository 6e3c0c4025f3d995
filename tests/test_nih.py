"""NIH ChestX-ray14 indexing: both CSV releases, label and list parsing, split checks, the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrssl.classes import NIH_FINDINGS, NIH_NO_FINDING
from cxrssl.data.nih import (
    INDEX_COLUMNS,
    build_cache,
    build_index,
    index_nih,
    parse_finding_labels,
    read_data_entry,
    read_split_list,
)
from cxrssl.errors import BadInputError, Quarantine

REPO = Path(__file__).resolve().parents[1]
HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
HEADER_2020 = HEADER_2017.replace("Patient Gender", "Patient Sex")


def make_nih(root: Path, header: str = HEADER_2017, layout: str = "kaggle", n_patients: int = 6,
             per_patient: int = 2, side: int = 48) -> pd.DataFrame:
    """A tiny NIH copy: PNGs (one RGBA), Data_Entry CSV with the trailing comma, split lists
    without a final newline. Returns the truth (name, patient, labels, split)."""
    rng = np.random.default_rng(0)
    rows = []
    for patient in range(1, n_patients + 1):
        for k in range(per_patient):
            name = f"{patient:08d}_{k:03d}.png"
            labels = [NIH_FINDINGS[(patient + k) % 14], NIH_FINDINGS[(patient * 3) % 14]] if k else []
            labels = list(dict.fromkeys(labels))
            folder = root / (f"images_{1 + patient % 2:03d}/images" if layout == "kaggle" else "images")
            folder.mkdir(parents=True, exist_ok=True)
            grey = rng.integers(0, 256, size=(side, side), dtype=np.uint8)
            if patient == 2 and k == 0:  # some NIH PNGs are RGBA
                rgba = np.dstack([grey, np.roll(grey, 1), np.roll(grey, 2), np.full_like(grey, 255)])
                Image.fromarray(rgba, mode="RGBA").save(folder / name)
            else:
                cv2.imwrite(str(folder / name), grey)
            rows.append({"name": name, "patient": patient, "labels": labels,
                         "split": "test" if patient % 3 == 0 else "train_val"})
    truth = pd.DataFrame(rows)
    lines = [header]
    for r in rows:
        text = "|".join(r["labels"]) or NIH_NO_FINDING
        lines.append(f"{r['name']},{text},0,{r['patient']},58,M,PA,{side},{side},0.143,0.143,")
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    for split, file in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
        (root / file).write_text("\n".join(truth.loc[truth["split"] == split, "name"]))  # no final newline
    return truth


def test_pandas_sees_the_trailing_comma_column(tmp_path):
    make_nih(tmp_path)
    assert "Unnamed: 11" in pd.read_csv(tmp_path / "Data_Entry_2017.csv").columns


@pytest.mark.parametrize("header", [HEADER_2017, HEADER_2020], ids=["2017", "v2020"])
def test_both_header_releases_give_the_same_index(tmp_path, header):
    truth = make_nih(tmp_path, header=header)
    entries = read_data_entry(tmp_path / "Data_Entry_2017.csv")
    assert "patient_sex" in entries.columns and not any(c.startswith("Unnamed") for c in entries.columns)
    index = build_index(tmp_path, Quarantine("fail"))
    assert list(index.columns) == INDEX_COLUMNS
    assert index["cache_row"].tolist() == list(range(len(truth)))
    merged = index.merge(truth, left_on="image_index", right_on="name", validate="one_to_one")
    assert len(merged) == len(truth)
    assert (merged["official_split"] == merged["split"]).all()
    assert (merged["patient_id"].astype(int) == merged["patient"]).all()
    for row in merged.itertuples():
        expected = [int(f in row.labels) for f in NIH_FINDINGS]
        assert [getattr(row, f) for f in NIH_FINDINGS] == expected
        assert (tmp_path / row.path).is_file() and row.path.endswith(f"/images/{row.image_index}")


def test_tarball_layout(tmp_path):
    truth = make_nih(tmp_path, layout="tarball")
    index = build_index(tmp_path, Quarantine("fail"))
    assert len(index) == len(truth) and index["path"].str.startswith("images/").all()


# --- label and list parsers (property tests) ------------------------------------------------------

@given(st.lists(st.sampled_from(NIH_FINDINGS), unique=True, max_size=6))
def test_finding_labels_round_trip(labels):
    text = "|".join(labels) or NIH_NO_FINDING
    assert parse_finding_labels(text, "row") == tuple(labels)


@given(st.lists(st.sampled_from(NIH_FINDINGS), unique=True, max_size=4),
       st.text(alphabet=st.characters(codec="ascii", exclude_characters="|\r\n"), min_size=1, max_size=12),
       st.integers(0, 4))
def test_unknown_label_is_rejected_naming_the_row(labels, bogus, position):
    if bogus.strip() in NIH_FINDINGS or bogus.strip() == NIH_NO_FINDING:
        return
    parts = list(labels)
    parts.insert(min(position, len(parts)), bogus)
    with pytest.raises(BadInputError) as info:
        parse_finding_labels("|".join(parts), "Data_Entry_2017.csv:line 7")
    assert info.value.item == "Data_Entry_2017.csv:line 7"


@pytest.mark.parametrize("text", ["", "   ", "No Finding|Mass", "Mass|Mass", "Infiltrate", "mass"])
def test_malformed_finding_labels(text):
    with pytest.raises(BadInputError):
        parse_finding_labels(text, "row")


names = st.from_regex(r"[0-9]{8}_[0-9]{3}\.png", fullmatch=True)


@settings(max_examples=60)
@given(st.lists(names, unique=True, max_size=30), st.sampled_from(["\n", "\r\n"]), st.booleans(),
       st.lists(st.integers(0, 30), max_size=3))
def test_split_list_parser(tmp_path_factory, entries, newline, final_newline, blank_at):
    lines = list(entries)
    for i in sorted(blank_at, reverse=True):
        lines.insert(min(i, len(lines)), "  ")
    text = newline.join(lines) + (newline if final_newline else "")
    path = tmp_path_factory.mktemp("lists") / "list.txt"
    path.write_bytes(text.encode())
    assert read_split_list(path) == entries


def test_split_list_duplicate_names_the_line(tmp_path):
    (tmp_path / "l.txt").write_text("00000001_000.png\n00000002_000.png\n00000001_000.png")
    with pytest.raises(BadInputError, match=r"l.txt:line 3.*first at line 1"):
        read_split_list(tmp_path / "l.txt")


# --- split consistency and quarantine -------------------------------------------------------------

def test_unknown_label_fails_naming_file_and_line(tmp_path):
    make_nih(tmp_path)
    csv = tmp_path / "Data_Entry_2017.csv"
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[1], "Infiltrate")
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInputError, match=r"Data_Entry_2017.csv:line 4: unknown finding label 'Infiltrate'"):
        read_data_entry(csv)
    quarantine = Quarantine("skip")
    index = build_index(tmp_path, quarantine)
    bad_name = lines[3].split(",")[0]
    assert bad_name not in set(index["image_index"])
    # the image is then also "listed but not in Data_Entry" for its list
    assert any(item.endswith("line 4") for item, _ in quarantine.items)


def test_image_in_both_or_neither_list(tmp_path):
    truth = make_nih(tmp_path)
    train = (tmp_path / "train_val_list.txt").read_text().split("\n")
    test = (tmp_path / "test_list.txt").read_text().split("\n")
    both, neither = train[0], train[1]
    (tmp_path / "test_list.txt").write_text("\n".join([*test, both]))
    (tmp_path / "train_val_list.txt").write_text("\n".join(t for t in train if t != neither))
    with pytest.raises(BadInputError, match="listed in both"):
        build_index(tmp_path, Quarantine("fail"))
    quarantine = Quarantine("skip")
    index = build_index(tmp_path, quarantine)
    reasons = dict(quarantine.items)
    assert "listed in both" in reasons[both] and "in neither" in reasons[neither]
    assert len(index) == len(truth) - 2


def test_patients_are_disjoint_across_official_splits(tmp_path):
    truth = make_nih(tmp_path)
    index = build_index(tmp_path, Quarantine("fail"))
    patients = index.groupby("official_split")["patient_id"].apply(set)
    assert patients["train_val"].isdisjoint(patients["test"])
    # move one image of a train_val patient into the test list: that patient spans both splits
    moved = truth.loc[truth["split"] == "train_val", "name"].iloc[0]
    patient = truth.loc[truth["name"] == moved, "patient"].iloc[0]
    train = [n for n in (tmp_path / "train_val_list.txt").read_text().split("\n") if n != moved]
    (tmp_path / "train_val_list.txt").write_text("\n".join(train))
    (tmp_path / "test_list.txt").write_text((tmp_path / "test_list.txt").read_text() + "\n" + moved)
    with pytest.raises(BadInputError, match=f"patient {patient} has images in both"):
        build_index(tmp_path, Quarantine("fail"))
    quarantine = Quarantine("skip")
    index = build_index(tmp_path, quarantine)
    assert str(patient) not in set(index["patient_id"])
    assert len(quarantine) == (truth["patient"] == patient).sum()
    patients = index.groupby("official_split")["patient_id"].apply(set)
    assert patients["train_val"].isdisjoint(patients["test"])


def test_missing_image_file(tmp_path):
    truth = make_nih(tmp_path)
    gone = next((tmp_path / "images_001" / "images").glob("*.png"))
    gone.unlink()
    with pytest.raises(BadInputError, match=f"{gone.name}: referenced by Data_Entry_2017.csv but no such PNG"):
        build_index(tmp_path, Quarantine("fail"))
    index = build_index(tmp_path, Quarantine("skip"))
    assert len(index) == len(truth) - 1 and gone.name not in set(index["image_index"])


def test_missing_required_column(tmp_path):
    make_nih(tmp_path, header=HEADER_2017.replace("Patient ID", "PatientIdentifier"))
    with pytest.raises(BadInputError, match=r"missing column\(s\) \['Patient ID'\]"):
        read_data_entry(tmp_path / "Data_Entry_2017.csv")


# --- cache ----------------------------------------------------------------------------------------

def test_cache_shape_values_and_outputs(tmp_path):
    truth = make_nih(tmp_path / "nih", side=64)
    out = tmp_path / "out"
    index = index_nih(tmp_path / "nih", out / "index.csv", out / "cache_24px.npy", out / "q.csv", cache_size=24)
    cache = np.load(out / "cache_24px.npy", mmap_mode="r")
    assert cache.dtype == np.uint8 and cache.shape == (len(truth), 24, 24)
    written = pd.read_csv(out / "index.csv")
    assert list(written.columns) == INDEX_COLUMNS and len(written) == len(index)
    for row in written.itertuples():
        grey = np.asarray(Image.open(tmp_path / "nih" / row.path).convert("L"))  # the paper's reader
        expected = cv2.resize(grey, (24, 24), interpolation=cv2.INTER_AREA)
        assert np.abs(cache[row.cache_row].astype(int) - expected.astype(int)).max() <= 1, row.image_index
    assert len(pd.read_csv(out / "q.csv")) == 0


def test_unreadable_png_is_quarantined_and_its_cache_row_left_empty(tmp_path):
    make_nih(tmp_path / "nih")
    broken = sorted((tmp_path / "nih").glob("images_*/images/*.png"))[0]
    broken.write_bytes(broken.read_bytes()[:60])  # truncated PNG
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match=broken.name):
        index_nih(tmp_path / "nih", out / "index.csv", out / "c.npy", out / "q.csv", cache_size=16)
    assert not (out / "index.csv").exists() and not (out / "c.npy").exists()
    index = index_nih(tmp_path / "nih", out / "index.csv", out / "c.npy", out / "q.csv", cache_size=16,
                      on_bad_input="skip")
    assert broken.name not in set(index["image_index"])
    cache = np.load(out / "c.npy")
    missing_row = sorted(set(range(len(cache))) - set(index["cache_row"]))
    assert len(missing_row) == 1 and not cache[missing_row[0]].any()
    assert pd.read_csv(out / "q.csv")["item"].str.endswith(broken.name).all()


def test_parallel_cache_equals_serial(tmp_path):
    make_nih(tmp_path / "nih")
    a = index_nih(tmp_path / "nih", tmp_path / "a.csv", tmp_path / "a.npy", tmp_path / "qa.csv", 20, workers=1)
    b = index_nih(tmp_path / "nih", tmp_path / "b.csv", tmp_path / "b.npy", tmp_path / "qb.csv", 20, workers=2)
    pd.testing.assert_frame_equal(a, b)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_cache_memory_does_not_grow_with_its_rows(tmp_path, monkeypatch):
    """The rows go to the file as they come (no memory map, whose written pages count as the
    process's RSS: 7.3 GB for NIH at 256 px); the rows still land in place, unread ones zero."""
    import psutil

    import cxrssl.data.nih as nih

    source = tmp_path / "one.png"
    cv2.imwrite(str(source), np.tile(np.arange(32, dtype=np.uint8), (32, 1)))
    n, size = 240, 384  # 35 MB of rows
    index = pd.DataFrame({"cache_row": np.arange(n) * 2, "path": [source.name] * n})  # odd rows never written
    rss, worker = [], nih._cache_worker

    def measured(task):
        rss.append(psutil.Process().memory_info().rss)
        return worker(task)

    monkeypatch.setattr(nih, "_cache_worker", measured)
    build_cache(index, tmp_path, tmp_path / "c.npy", size, workers=0)  # in this process: its RSS is measured
    assert max(rss) - rss[4] < n * size * size / 8, (max(rss) - rss[4]) / 2**20  # after the first images' set-up
    cache = np.load(tmp_path / "c.npy", mmap_mode="r")
    assert cache.shape == (2 * n - 1, size, size) and not cache[1::2].any()
    np.testing.assert_array_equal(cache[0::2], np.broadcast_to(nih.load_grey(source, size), (n, size, size)))


def test_script_runs_standalone(tmp_path):
    make_nih(tmp_path / "nih", header=HEADER_2020, layout="tarball")
    env = dict(os.environ, CXRSSL_PROGRESS="0")
    cmd = [sys.executable, str(REPO / "scripts" / "index_nih.py"), "--root", str(tmp_path / "nih"), "--cache-size", "16",
           "--index", str(tmp_path / "index.csv"), "--cache", str(tmp_path / "c.npy"), "--quarantine",
           str(tmp_path / "q.csv"), "--on-bad-input", "fail", "--log", str(tmp_path / "log")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "c.npy").shape == (12, 16, 16)
    assert "NIH index: 12 images" in (tmp_path / "log").read_text()


# --- hostile text files and dying workers (issue 11) ----------------------------------------------

def test_list_files_with_a_bom_or_undecodable_bytes(tmp_path):
    truth = make_nih(tmp_path)
    train = tmp_path / "train_val_list.txt"
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())  # a BOM must not hide the first image
    assert build_index(tmp_path, Quarantine("fail"))["image_index"].tolist() == sorted(truth["name"])
    test = tmp_path / "test_list.txt"
    test.write_bytes(test.read_bytes() + b"\n0000\xff\xfe_000.png")
    with pytest.raises(BadInputError, match=r"test_list.txt:line \d+: is not valid UTF-8"):
        build_index(tmp_path, Quarantine("fail"))
    quarantine = Quarantine("skip")
    assert len(build_index(tmp_path, quarantine)) == len(truth)
    assert [reason for _, reason in quarantine.items] == ["is not valid UTF-8"]


def test_one_malformed_data_entry_row_is_skipped_not_the_file(tmp_path):
    truth = make_nih(tmp_path)
    csv_path = tmp_path / "Data_Entry_2017.csv"
    lines = csv_path.read_bytes().split(b"\n")
    lines[2] = lines[2] + b",extra,fields"  # more fields than the header: pandas rejected the file
    lines[4] = lines[4].replace(b"M,PA", b"\xff,PA")  # undecodable byte in one row
    lines[5] = b'"' + lines[5]  # a stray quote swallowing what follows
    csv_path.write_bytes(b"\n".join(lines))
    with pytest.raises(BadInputError, match=r"Data_Entry_2017.csv:line 3: has \d+ fields"):
        read_data_entry(csv_path)
    quarantine = Quarantine("skip")
    entries = read_data_entry(csv_path, quarantine)
    bad = {lines[i].split(b",")[0].lstrip(b'"').decode() for i in (2, 4, 5)}
    assert bad.isdisjoint(entries["image_index"])
    assert len(entries) >= len(truth) - 3 - 12 and len(entries) > 0
    assert {item.rsplit(":", 1)[1] for item, _ in quarantine.items} >= {"line 3", "line 5", "line 6"}
    assert all(item.startswith(f"{csv_path}:line ") for item, _ in quarantine.items)


def test_rows_without_the_trailing_comma_are_fine(tmp_path):
    truth = make_nih(tmp_path)
    csv_path = tmp_path / "Data_Entry_2017.csv"
    csv_path.write_text("\n".join(line.rstrip(",") if i else line
                                  for i, line in enumerate(csv_path.read_text().splitlines())) + "\n")
    assert len(read_data_entry(csv_path)) == len(truth)


def test_a_killed_cache_worker_costs_its_image_not_the_run(tmp_path):
    """SIGKILL of an NIH cache worker (as the OOM killer would): the image is quarantined, the run ends."""
    import signal
    import threading
    import time

    import psutil
    import worker_tasks

    truth = make_nih(tmp_path / "nih")
    index = build_index(tmp_path / "nih", Quarantine("fail"))
    victim = tmp_path / "nih" / "stuck.png"
    os.mkfifo(victim)  # opening it blocks: the worker on it is the one we kill, twice (first try and retry)
    index.loc[3, "path"] = victim.name
    quarantine, done = Quarantine("skip"), {}
    thread = threading.Thread(target=lambda: done.setdefault("index", build_cache(
        index, tmp_path / "nih", tmp_path / "c.npy", 16, workers=2, quarantine=quarantine)), daemon=True)
    thread.start()
    for _ in range(2):
        deadline, stuck = time.monotonic() + 60, []
        while not stuck and time.monotonic() < deadline:
            stuck = [w for w in worker_tasks.pool_workers() if worker_tasks.blocked_on_fifo(w)]
            time.sleep(0.05)
        assert stuck, "no cache worker on the stuck image"
        for worker in stuck:
            worker.send_signal(signal.SIGKILL)
        psutil.wait_procs(stuck, timeout=10)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the cache build hung after its worker was killed"
    assert len(done["index"]) == len(truth) - 1 and index.loc[3, "image_index"] not in set(done["index"]["image_index"])
    (item, reason), = quarantine.items
    assert item == str(victim) and "killed by SIGKILL" in reason and "2 attempts" in reason
