"""The one canonical table of class and finding names.

Every stage (annotation parsing, COCO JSON, both detection engines, reports) takes names and ids
from here. The original study lost a class because its COCO file said "Nodule/Mass" while its
mmdet config said "Nodule_Mass"; ``check_class_names`` makes such a mismatch an error.
"""

from __future__ import annotations

from collections.abc import Iterable

#: The 14 VinDr-CXR abnormality classes, spelled exactly as in the dataset, in class_id order
#: (Kaggle's class_id 0..13). "No finding" (class_id 14) is not a detection class.
VINDR_CLASSES: tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
)
VINDR_NO_FINDING = "No finding"
VINDR_NO_FINDING_ID = 14

#: The 14 NIH ChestX-ray14 findings, spelled as in Data_Entry_2017.csv's "Finding Labels".
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NIH_NO_FINDING = "No Finding"


def coco_categories() -> list[dict]:
    """COCO ``categories`` for the 14 VinDr classes; COCO ids are 1-based (class_id + 1)."""
    return [{"id": i + 1, "name": name, "supercategory": "abnormality"} for i, name in enumerate(VINDR_CLASSES)]


def class_id(name: str) -> int:
    """0-based class id of a VinDr class name; raises KeyError naming the unknown class."""
    try:
        return VINDR_CLASSES.index(name)
    except ValueError:
        raise KeyError(f"unknown VinDr class name {name!r}; expected one of {list(VINDR_CLASSES)}") from None


def check_class_names(names: Iterable[str], where: str) -> None:
    """Raise ValueError if ``names`` is not exactly the canonical table in order."""
    names = list(names)
    if names != list(VINDR_CLASSES):
        missing = [n for n in VINDR_CLASSES if n not in names]
        extra = [n for n in names if n not in VINDR_CLASSES]
        raise ValueError(
            f"{where}: class table differs from cxrssl.classes.VINDR_CLASSES "
            f"(missing {missing}, unexpected {extra}, or a different order)"
        )
