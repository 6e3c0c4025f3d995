"""Fuzzing (issue 11): mutated DICOMs, CSVs, configs and checkpoints, a few minutes in all.

Asserted for every case: only a BadInputError (ConfigError for configs) that names the input, no
hang (per-file timeouts in the conversion, pytest-timeout around each test), no silent wrong
output (a case whose expected outcome is known must get it; see tests/fuzzing.py), nothing partial
left behind, and (conversion) no planted patient identifier in any output. The longer campaign
with the same generators is benchmarks/fuzz_campaign.py.
"""

from __future__ import annotations

import copy
import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from fuzzing import (
    FILE_SECRET,
    SECRETS,
    annotation_seed,
    dicom_seeds,
    judge_annotations,
    judge_conversion,
    judge_nih,
    make_dicom,
    mutate_dicom,
    mutate_text,
    nih_seed,
    random_config,
    schema_keys,
    temporary_leftovers,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrssl.config import ConfigError, load_config, load_schema, validate_config
from cxrssl.data.annotations import run_parse
from cxrssl.data.convert import run_convert
from cxrssl.data.dicom import read_dicom
from cxrssl.errors import BadInputError
from cxrssl.privacy import Pseudonymizer
from cxrssl.runtime import load_checkpoint

pytestmark = pytest.mark.timeout(300)


# --- DICOM -----------------------------------------------------------------------------------------

def test_mutated_dicoms_are_converted_consistently_or_quarantined_by_name(tmp_path):
    rng = np.random.default_rng(11)
    seeds = dicom_seeds(tmp_path / "seeds")
    cases = [mutate_dicom(seeds[name], tmp_path / "site" / "train" / f"{FILE_SECRET}_{i:04d}.dicom", rng)
             for i, name in enumerate(rng.choice(sorted(seeds), 160))]
    results, private = tmp_path / "results", tmp_path / "private"
    run_convert([c.path for c in cases], [], results / "img", results / "metadata.csv", results / "q.csv",
                size=32, workers=2, on_bad_input="skip", pseudonymize_ids=True, private_dir=private)
    ids = Pseudonymizer(True, private)
    meta = pd.read_csv(results / "metadata.csv", dtype={"image_id": str}).set_index("image_id")
    quarantined = dict(pd.read_csv(results / "q.csv")[["item", "reason"]].itertuples(index=False))
    outcomes = {}
    for case in cases:
        image_id = ids.image_id(case.path.stem)
        row = meta.loc[image_id].to_dict() if image_id in meta.index else None
        png = cv2.imread(str(results / row["png"]), cv2.IMREAD_UNCHANGED) if row else None
        outcomes[case.path.name] = (case.kind, judge_conversion(case, ids.file_label(case.path), row, quarantined, png))
    bad = {name: o for name, o in outcomes.items() if o[1] not in ("ok", "clean")}
    assert not bad, bad
    assert sum(o[1] == "ok" for o in outcomes.values()) >= 10  # the fuzzing did not only produce garbage
    assert all(len(reason) > 10 for reason in quarantined.values())
    assert not any(secret in reason for reason in quarantined.values() for secret in SECRETS)
    for path in results.rglob("*"):
        for text in (path.name, path.read_bytes().decode("latin-1") if path.is_file() else ""):
            assert not any(secret in text for secret in SECRETS), path
    assert temporary_leftovers(results) == []


def test_a_failing_conversion_leaves_nothing_partial(tmp_path):
    rng = np.random.default_rng(12)
    seeds = dicom_seeds(tmp_path / "seeds")
    cases = [mutate_dicom(seeds["native"], tmp_path / "site" / "train" / f"case{i:03d}.dicom", rng) for i in range(40)]
    with pytest.raises(BadInputError) as info:
        run_convert([c.path for c in cases], [], tmp_path / "out" / "img", tmp_path / "out" / "metadata.csv",
                    tmp_path / "out" / "q.csv", size=32, workers=2, on_bad_input="fail")
    assert any(info.value.item == str(c.path) for c in cases)
    assert not (tmp_path / "out" / "metadata.csv").exists() and temporary_leftovers(tmp_path / "out") == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.one_of(st.integers(-3, 70), st.lists(st.integers(0, 70), min_size=2, max_size=3)),
       cols=st.integers(-3, 70), allocated=st.sampled_from([0, 1, 8, 12, 16, 32, 64]), stored=st.integers(-1, 40),
       center=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
       width=st.one_of(st.none(), st.floats(-10, 1e6)), extra=st.integers(-7, 9))
def test_hostile_header_values_only_raise_bad_input(tmp_path, rows, cols, allocated, stored, center, width, extra):
    """Native data (no C decoder): read in this process, so any exception at all is visible here."""
    path = make_dicom(tmp_path / "h.dcm", np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) % 4096)
    ds = pydicom.dcmread(path)
    try:
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = rows, cols, allocated, stored
        if center is not None and width is not None:
            ds.WindowCenter, ds.WindowWidth = str(center)[:16], width
        if extra > 0:
            ds.PixelData = bytes(ds.PixelData) + bytes(extra)
        elif extra < 0:
            ds.PixelData = bytes(ds.PixelData)[:extra]
        ds.save_as(path, enforce_file_format=False)
    except (OSError, ValueError, OverflowError, TypeError, struct.error):
        return  # pydicom refuses to write such a header at all
    try:
        image, meta = read_dicom(path)
    except BadInputError as exc:
        assert exc.item == str(path)
        return
    assert (rows, cols, allocated) == (48, 40, 16) and extra in (0,)  # the only header that fits the data
    assert image.shape == (48, 40) and np.isfinite(image).all() and meta["orig_height"] == 48


# --- CSV files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["physionet", "kaggle"])
def test_mutated_annotation_files(tmp_path, layout):
    rng = np.random.default_rng(13 if layout == "kaggle" else 14)
    seed = annotation_seed(layout)
    for n in range(60):
        data, touched, kind = mutate_text(seed, rng)
        root = tmp_path / f"{n:03d}"
        outcome, detail = judge_annotations(root, layout, seed, data, touched)
        assert outcome in ("ok", "clean"), (kind, outcome, detail)
        out = root / "out"  # under fail: an error naming the file, and no output at all
        try:
            run_parse(root, layout, out / "annotations.csv", out / "q.csv", "fail")
        except BadInputError as exc:
            assert str(exc).startswith(str(root)), kind
            assert not (out / "annotations.csv").exists() and temporary_leftovers(root) == []


def test_mutated_nih_data_entry_and_list_files(tmp_path):
    rng = np.random.default_rng(15)
    entry_seed, list_seed = nih_seed()
    names = list_seed.decode().split("\n")
    for n in range(80):
        for path, seed, is_list in ((tmp_path / f"{n:03d}" / "Data_Entry_2017.csv", entry_seed, False),
                                    (tmp_path / f"{n:03d}" / "train_val_list.txt", list_seed, True)):
            data, touched, kind = mutate_text(seed, rng)
            outcome, detail = judge_nih(path, data, touched, names, is_list)
            assert outcome in ("ok", "clean"), (path.name, kind, outcome, detail)


# --- configs ---------------------------------------------------------------------------------------

KEYS = schema_keys(load_schema())


@settings(max_examples=150, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 6))
def test_hostile_configs_are_reported_by_key(rnd, n):
    config = random_config(rnd, KEYS, n)
    try:
        validated = validate_config(config, source="fuzz.yaml")
    except ConfigError as exc:
        lines = str(exc).splitlines()
        assert lines[0] == "fuzz.yaml is not valid:" and len(lines) > 1
        known = {k for k, _ in KEYS}
        for line in lines[1:]:
            key = line.strip().split(":")[0].split(" ")[0]
            top = ".".join(p for p in key.split(".") if not p.isdigit())
            assert top == "(top" or top in known or any(top.startswith(k + ".") for k in known), line
        return
    assert validate_config(copy.deepcopy(validated)) == validated  # valid, complete and stable


def test_mutated_yaml_files_name_the_file(tmp_path):
    rng = np.random.default_rng(16)
    seed_path = Path(__file__).resolve().parents[1] / "config.yaml"
    load_config(seed_path)  # the seed itself is valid
    seed = seed_path.read_bytes()
    for n in range(60):
        path = tmp_path / f"c{n:03d}.yaml"
        path.write_bytes(mutate_text(seed, rng)[0])
        try:
            load_config(path)
        except ConfigError as exc:
            assert str(exc).startswith(str(path)), exc


# --- checkpoints -----------------------------------------------------------------------------------

class _Touch:
    """A pickle payload: unpickling it creates the marker file (os.system, the classic, is one step on)."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            import os
            return os.system, (f"touch {self.marker}",)
        if self.how == "exec":
            return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)
        return Path.touch, (self.marker,)


def malicious_checkpoints(folder: Path) -> list[Path]:
    """The payload in each way a checkpoint can be stored: zip and legacy torch.save, raw pickle,
    and nested inside a plausible state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for how in ("touch", "system", "exec"):
        payload = _Touch(folder / "PWNED", how)
        state = {"model": {"w": torch.zeros(2)}, "optimizer": {}, "step": 1, "rng": {}, "metrics": [], "x": payload}
        torch.save(state, folder / f"zip_{how}.pth")
        torch.save(payload, folder / f"legacy_{how}.pth", _use_new_zipfile_serialization=False)
        (folder / f"pickle_{how}.pth").write_bytes(pickle.dumps(payload))
        paths += [folder / f"zip_{how}.pth", folder / f"legacy_{how}.pth", folder / f"pickle_{how}.pth"]
    return paths


def test_malicious_and_mutated_checkpoints_are_refused_by_name(tmp_path):
    for path in malicious_checkpoints(tmp_path / "evil"):
        with pytest.raises(BadInputError) as info:
            load_checkpoint(path, "checkpoint")
        assert info.value.item == str(path)
        assert not (tmp_path / "evil" / "PWNED").exists(), f"{path.name} ran its payload"
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.arange(6.0)}, "step": 3, "metrics": [{"loss": 1.0}]}, good)
    data, rng = good.read_bytes(), np.random.default_rng(17)
    for n in range(80):
        mutated = bytearray(data)
        if n % 2:
            mutated = mutated[:int(rng.integers(0, len(mutated)))]
        for _ in range(int(rng.integers(1, 8))):
            if mutated:
                mutated[int(rng.integers(0, len(mutated)))] = int(rng.integers(0, 256))
        path = tmp_path / f"m{n:03d}.pth"
        path.write_bytes(bytes(mutated))
        try:
            load_checkpoint(path)
        except BadInputError as exc:
            assert exc.item == str(path)


def test_pretraining_resume_refuses_a_malicious_checkpoint(tmp_path):
    from test_nih import make_nih

    from cxrssl.config import section_defaults
    from cxrssl.data.nih import index_nih
    from cxrssl.ssl.train import pretrain

    make_nih(tmp_path / "nih", n_patients=4, per_patient=2, side=24)
    index_nih(tmp_path / "nih", tmp_path / "index.csv", tmp_path / "cache.npy", tmp_path / "q.csv", 16, workers=0)
    settings_ = dict(section_defaults("pretrain"), batch_size=2, epochs=1, image_size=16, workers=0, amp=False)
    settings_["barlowtwins"] = dict(settings_["barlowtwins"], arch="resnet18", init="random", projector=[8, 8])
    out = tmp_path / "run"
    for path in malicious_checkpoints(tmp_path / "evil")[:3]:
        out.mkdir(exist_ok=True)
        (out / "checkpoint.pth").write_bytes(path.read_bytes())
        with pytest.raises(BadInputError) as info:
            pretrain(tmp_path / "index.csv", tmp_path / "cache.npy", out, settings_, device="cpu", threads=1)
        assert info.value.item == str(out / "checkpoint.pth") and "refused" in info.value.reason
        assert not (tmp_path / "evil" / "PWNED").exists()
        assert not (out / "backbone.pth").exists()
