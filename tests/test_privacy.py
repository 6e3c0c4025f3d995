"""Identifiers in file names (cxrssl.privacy): relative paths, pseudonymous ids, the private mapping."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_dicom import PATIENT_ID, PATIENT_NAME, ramp, write_dicom

from cxrssl.data.annotations import KAGGLE_HEADER, run_parse
from cxrssl.data.convert import CACHE_INDEX_NAME, run_convert
from cxrssl.errors import BadInputError
from cxrssl.privacy import PSEUDONYM, Pseudonymizer, restore_ids

#: File names as a site might make them: patient names and ids (fake).
NAMED = ["Doe_John_PID1234567", "Roe_Jane_PID7654321", "Mustermann_Erika_PID5550001"]
SECRETS = ["Doe", "John", "PID1234567", "Roe", "Jane", "PID7654321", "Mustermann", "Erika", "PID5550001",
           PATIENT_NAME, PATIENT_ID]


def site_dataset(root: Path) -> list[Path]:
    paths = [write_dicom(root / "train" / f"{NAMED[0]}.dicom", ramp()),
             write_dicom(root / "test" / f"{NAMED[1]}.dcm", ramp(72, 56))]
    bad = root / "train" / f"{NAMED[2]}.dicom"
    bad.write_bytes(paths[0].read_bytes()[:3000])  # truncated: it will be quarantined, by name
    return [*paths, bad]


def assert_no_secret_under(folder: Path) -> None:
    for path in folder.rglob("*"):
        for text in (path.name, path.read_bytes().decode("latin-1") if path.is_file() else ""):
            for secret in SECRETS:
                assert secret not in text, f"{secret!r} leaked into {path}"


def convert(tmp_path: Path, pseudonymize: bool) -> object:
    results, private = tmp_path / "results", tmp_path / "private"
    handler = logging.FileHandler(results / "logs" / "convert.log")
    logging.getLogger().addHandler(handler)
    try:
        return run_convert([], [tmp_path / "site" / "train", tmp_path / "site" / "test"], results / "img",
                           results / "metadata.csv", results / "quarantine.csv", size=32, on_bad_input="skip",
                           pseudonymize_ids=pseudonymize, private_dir=private)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def test_pseudonymised_conversion_leaks_no_identifier(tmp_path):
    site_dataset(tmp_path / "site")
    (tmp_path / "results" / "logs").mkdir(parents=True)
    first = convert(tmp_path, pseudonymize=False)  # an earlier run with real names ...
    assert sorted(first.metadata["image_id"]) == sorted(NAMED[:2])
    assert NAMED[2] in (tmp_path / "results" / "logs" / "convert.log").read_text()
    (tmp_path / "results" / "logs" / "convert.log").unlink()  # (its log is expected to name them)
    second = convert(tmp_path, pseudonymize=True)  # ... then with pseudonyms: nothing of it may stay
    assert all(PSEUDONYM.fullmatch(i) for i in second.metadata["image_id"]) and len(second.converted) == 2
    third = convert(tmp_path, pseudonymize=True)
    assert third.converted == [] and sorted(third.cached) == sorted(second.metadata["image_id"])  # stable ids
    assert_no_secret_under(tmp_path / "results")
    quarantined = pd.read_csv(tmp_path / "results" / "quarantine.csv")
    (item,) = quarantined["item"]
    assert item.startswith("train/p") and item.endswith(".dicom")
    mapping = pd.read_csv(tmp_path / "private" / "ids_convert.csv")
    assert set(mapping["original_id"]) == set(NAMED)
    assert (tmp_path / "private" / "ids_convert.csv").stat().st_mode & 0o077 == 0
    assert mapping.set_index("image_id").loc[item.split("/")[1].split(".")[0], "original_id"] == NAMED[2]
    cache = pd.read_csv(tmp_path / "results" / "img" / CACHE_INDEX_NAME, keep_default_na=False)
    assert (cache["source"] == "").all()


def test_annotations_get_the_same_pseudonyms_as_the_images(tmp_path):
    private = tmp_path / "private"
    rows = [[NAMED[0], "Cardiomegaly", "3", "R1", "10", "20", "110", "220"], [NAMED[1], "No finding", "14", "R2", "", "", "", ""]]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "train.csv").write_text("\n".join(",".join(r) for r in [KAGGLE_HEADER, *rows]) + "\n")
    frame = run_parse(tmp_path / "site", "kaggle", tmp_path / "results" / "annotations.csv", tmp_path / "results" / "q.csv",
                      pseudonymize_ids=True, private_dir=private)
    ids = Pseudonymizer(True, private)
    assert frame["image_id"].tolist() == [ids.image_id(NAMED[0]), ids.image_id(NAMED[1])]
    assert_no_secret_under(tmp_path / "results")


def test_the_salt_is_made_once_and_checked(tmp_path):
    a, b = Pseudonymizer(True, tmp_path / "p"), Pseudonymizer(True, tmp_path / "p")
    assert a.image_id("x") == b.image_id("x") != Pseudonymizer(True, tmp_path / "other").image_id("x")
    salt = tmp_path / "p" / "salt.txt"
    assert salt.stat().st_mode & 0o077 == 0 and sorted(p.name for p in salt.parent.iterdir()) == ["salt.txt"]
    assert Pseudonymizer(False).image_id("x") == "x"
    salt.write_text("guessable\n")
    with pytest.raises(BadInputError, match="salt.txt: not a salt"):
        Pseudonymizer(True, tmp_path / "p")


def test_scrub_replaces_every_spelling_of_the_file(tmp_path):
    ids = Pseudonymizer(True, tmp_path / "p")
    path = tmp_path / "train" / f"{NAMED[0]}.dicom"
    text = f"[Errno 13] Permission denied: '{path}' ({path.name}; id {NAMED[0]})"
    scrubbed = ids.scrub(text, path)
    assert not any(secret in scrubbed for secret in SECRETS) and ids.image_id(NAMED[0]) in scrubbed


class _NoBoxes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.roi_heads = torch.nn.Module()
        self.roi_heads.score_thresh = 0.5

    def forward(self, images):
        return [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([3])} for _ in images]


def test_predict_with_pseudonyms_keeps_the_kaggle_format(tmp_path, monkeypatch):
    from cxrssl.detection import predict

    meta = {"engine": "torchvision", "arch": "resnet18", "init": "random", "res": 64, "input_size": 32,
            "input_bit_depth": 8, "score_thr": 0.5, "settings": {}}
    monkeypatch.setattr(predict, "load_detector", lambda path, device, score_thr=None: (_NoBoxes(), meta))
    paths = site_dataset(tmp_path / "site")
    out, private = tmp_path / "predictions", tmp_path / "private"
    plain = predict.predict_files("best.pth", paths[:2], tmp_path / "plain", on_bad_input="skip")
    hidden = predict.predict_files("best.pth", paths, out, on_bad_input="skip", pseudonymize_ids=True,
                                   private_dir=private)
    assert list(hidden.columns) == ["image_id", "PredictionString"]
    assert all(PSEUDONYM.fullmatch(i) for i in hidden["image_id"])
    assert_no_secret_under(out)
    restored = restore_ids(pd.read_csv(out / "submission.csv"), private / "ids_predict.csv")
    pd.testing.assert_frame_equal(restored.sort_values("image_id").reset_index(drop=True),
                                  plain.sort_values("image_id").reset_index(drop=True))
    with pytest.raises(BadInputError, match="not in the table"):
        restore_ids(pd.DataFrame({"image_id": ["p" + "0" * 20]}), private / "ids_predict.csv")
    assert sorted(p.stem for p in (out / "overlays").iterdir()) == sorted(hidden["image_id"])


def test_other_folder_names_are_never_stored_with_pseudonyms(tmp_path):
    patient_folder = tmp_path / "site" / "Doe_John"  # a site that files images per patient
    path = write_dicom(patient_folder / "img1.dicom", ramp())
    results = tmp_path / "results"
    with pytest.raises(BadInputError, match="none of the 1 DICOMs"):
        run_convert([path], [], results / "img", results / "metadata.csv", results / "q.csv", size=32,
                    on_bad_input="skip", pseudonymize_ids=True, private_dir=tmp_path / "private")
    (item, reason), = pd.read_csv(results / "q.csv")[["item", "reason"]].itertuples(index=False)
    assert item.startswith("(folder)/p") and "not in a train or test folder" in reason
    assert_no_secret_under(results)
