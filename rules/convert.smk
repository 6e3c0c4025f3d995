# Stage: data preparation. VinDr-CXR DICOMs -> resized PNGs + metadata.csv; NIH ChestX-ray14 ->
# index.csv + resized uint8 cache. Both read the demo dataset when demo.enabled (demo_ready()).

import os
from glob import glob


def vindr_dicom_dirs():
    """The DICOM folders of either layout (PhysioNet: train/ and test/; Kaggle: train/, test/ if present)."""
    return [f"{VINDR_ROOT}/{split}" for split in ("train", "test")]


def vindr_dicom_files():
    """Every DICOM of the layout's folders (sorted); an error naming the folders when there are none."""
    files = sorted(f for d in vindr_dicom_dirs() for pattern in ("*.dicom", "*.dcm") for f in glob(f"{d}/{pattern}"))
    if not files:
        raise WorkflowError(f"no DICOMs in {VINDR_ROOT}/train or {VINDR_ROOT}/test: set vindr.root "
                            "(and vindr.layout) to your VinDr-CXR copy, or enable the demo")
    return files


def vindr_dicom_inputs(wildcards):
    """The DICOM folders as inputs (a folder's mtime changes when a file is added or removed).

    Listing 15,000 DICOMs as inputs would flood every log with their names; the folders plus the
    listing digest in params (below) rerun the rule on the same events, and the per-file cache in
    the script keeps a rerun cheap: only new or changed files are converted.
    """
    ready = demo_ready()  # waits for the demo generator when demo.enabled
    vindr_dicom_files()  # fail early and clearly when there is nothing to convert
    return [*ready, *(d for d in vindr_dicom_dirs() if os.path.isdir(d))]


def vindr_dicom_listing(wildcards):
    """Digest of the DICOM names, sizes and mtimes: a changed set of files reruns the rule."""
    import hashlib

    demo_ready()
    digest = hashlib.sha256()
    for path in vindr_dicom_files():
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


rule convert_dicom:
    input:
        vindr_dicom_inputs,
    output:
        metadata=report(VINDR_METADATA, caption="../report/convert_metadata.rst", category="Data",
                        subcategory="VinDr-CXR conversion"),
        quarantine=report(VINDR_CONVERT_QUARANTINE, caption="../report/convert_quarantine.rst", category="Data",
                          subcategory="VinDr-CXR conversion"),
    params:
        args=cli("vindr.convert"),
        on_bad_input=ON_BAD_INPUT,
        dirs=vindr_dicom_dirs(),
        listing=vindr_dicom_listing,
        images=VINDR_IMAGES,
    log:
        f"{LOGS}/convert_dicom.log",
    benchmark:
        f"{BENCH}/convert_dicom.tsv"
    conda:
        ENV
    threads: workflow.cores
    resources:
        # one decoded radiograph (float) per worker plus the interpreter
        mem_mb=lambda wildcards, threads: 1000 + 600 * threads,
        runtime=lambda wildcards, threads: 10 + len(vindr_dicom_files()) // (100 * threads),
    shell:
        "python {SCRIPTS}/convert_dicom.py --dicom-dirs {params.dirs:q} --out-dir {params.images:q}"
        " --metadata {output.metadata:q} --quarantine {output.quarantine:q} --workers {threads}"
        " --on-bad-input {params.on_bad_input} {params.args} --log {log:q}"


def nih_inputs(wildcards):
    return [*demo_ready(), f"{NIH_ROOT}/Data_Entry_2017.csv", f"{NIH_ROOT}/train_val_list.txt", f"{NIH_ROOT}/test_list.txt"]


rule index_nih:
    input:
        nih_inputs,
    output:
        index=NIH_INDEX,
        cache=NIH_CACHE,
        quarantine=report(NIH_QUARANTINE, caption="../report/convert_nih_quarantine.rst",
                          category="Data", subcategory="NIH ChestX-ray14 index"),
    params:
        args=cli("nih"),
        on_bad_input=ON_BAD_INPUT,
    log:
        f"{LOGS}/index_nih.log",
    benchmark:
        f"{BENCH}/index_nih.tsv"
    conda:
        ENV
    threads: workflow.cores
    resources:
        # the cache is written through a memory map; workers hold one 1024 px image each
        mem_mb=lambda wildcards, threads: 1000 + 200 * threads,
        runtime=lambda wildcards, threads: 10 + 112120 // (3000 * threads),
    shell:
        "python {SCRIPTS}/index_nih.py {params.args} --index {output.index:q} --cache {output.cache:q}"
        " --quarantine {output.quarantine:q} --workers {threads} --on-bad-input {params.on_bad_input} --log {log:q}"


FINAL_TARGETS.append(lambda: [VINDR_METADATA, VINDR_CONVERT_QUARANTINE, NIH_INDEX, NIH_CACHE, NIH_QUARANTINE])
