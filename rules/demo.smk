# Stage: demo. The synthetic dataset in the real NIH ChestX-ray14 and VinDr-CXR layouts, written
# where nih.root and vindr.root point by default, so downstream rules read it like the real data;
# plus reports of the NIH-like images (IU X-ray and MIMIC-CXR layouts) and a held-out localisation
# set (NIH BBox_List_2017.csv, RSNA stage_2_train_labels.csv and MS-CXR layouts) under reports/.

import os
import sys

DEMO_ROOT = os.path.normpath(DEMO["root"])
DEMO_MANIFEST = f"{DEMO_ROOT}/manifest.json"
# The files downstream rules name as inputs (paths built from nih.root / vindr.root match these
# when those roots are DEMO_ROOT/nih and DEMO_ROOT/vindr, the defaults).
DEMO_NIH_FILES = [
    f"{DEMO_ROOT}/nih/{name}"
    for name in ("Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt", "BBox_List_2017.csv")
]
DEMO_VINDR_FILES = [
    f"{DEMO_ROOT}/vindr/{name}"
    for name in (
        "train.csv",
        "annotations/annotations_train.csv",
        "annotations/annotations_test.csv",
        "annotations/image_labels_train.csv",
        "annotations/image_labels_test.csv",
    )
]
# Reports and box files (cxrssl.demo.reports.KEY_FILES), for the multimodal method.
DEMO_REPORT_FILES = [
    f"{DEMO_ROOT}/reports/{name}"
    for name in (
        "iu_xray/indiana_projections.csv",
        "mimic_cxr/mimic-cxr-2.0.0-metadata.csv",
        "nih_link.csv",
        "localization/nih/BBox_List_2017.csv",
        "localization/rsna/stage_2_train_labels.csv",
        "localization/ms_cxr/MS_CXR_Local_Alignment_v1.1.0.csv",
    )
]

if DEMO["enabled"]:
    for _root, _key in ((NIH_ROOT, "nih"), (VINDR_ROOT, "vindr")):
        if os.path.normpath(_root) != f"{DEMO_ROOT}/{_key}":
            print(
                f"NOTE: demo.enabled is true but {_key}.root ({_root}) is not {DEMO_ROOT}/{_key}: "
                f"the demo data will be generated but the {_key} stages read {_root}.",
                file=sys.stderr,
            )

    checkpoint make_demo_data:
        output:
            manifest=DEMO_MANIFEST,
            preview=report(
                f"{DEMO_ROOT}/preview.png",
                caption="../report/demo.rst",
                category="Data",
                subcategory="Synthetic demo dataset",
            ),
            nih=DEMO_NIH_FILES,
            vindr=DEMO_VINDR_FILES,
            reports=DEMO_REPORT_FILES,
        log:
            f"{LOGS}/demo/make_demo_data.log",
        benchmark:
            f"{BENCH}/demo/make_demo_data.tsv"
        params:
            args=cli("demo"),
            seed=SEED,
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
        conda:
            ENV
        shell:
            "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/make_demo_data.py\" {params.args} --seed {params.seed} --log {log}"

    FINAL_TARGETS.append(lambda: [DEMO_MANIFEST, f"{DEMO_ROOT}/preview.png"])
