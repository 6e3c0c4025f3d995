# Stage: data preparation. VinDr-CXR DICOMs -> resized PNGs + metadata.csv; NIH ChestX-ray14 ->
# index.csv + resized uint8 cache. Both read the demo dataset when demo.enabled (demo_ready()).

import os
from glob import glob

from cxrssl.data.convert import worker_mem_mb


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
        privacy=cli("privacy"),
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
    priority: PRIORITY["prepare"]
    resources:
        # the parent plus one worker per thread, each sized for the largest frame it may accept
        mem_mb=lambda wildcards, threads: 1000 + threads * worker_mem_mb(config["vindr"]["convert"]["max_decoded_mb"]),
        runtime=lambda wildcards, threads: 10 + len(vindr_dicom_files()) // (100 * threads),
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/convert_dicom.py\" --dicom-dirs {params.dirs:q} --out-dir {params.images:q}"
        " --metadata {output.metadata:q} --quarantine {output.quarantine:q} --workers {threads}"
        " --on-bad-input {params.on_bad_input} {params.args} {params.privacy} --log {log:q}"


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
    priority: PRIORITY["prepare"]
    resources:
        # the cache is written row by row (no memory map); workers hold one 1024 px image each
        mem_mb=lambda wildcards, threads: 1000 + 200 * threads,
        runtime=lambda wildcards, threads: 10 + 112120 // (3000 * threads),
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/index_nih.py\" {params.args} --index {output.index:q} --cache {output.cache:q}"
        " --quarantine {output.quarantine:q} --workers {threads} --on-bad-input {params.on_bad_input} --log {log:q}"


FINAL_TARGETS.append(lambda: [VINDR_METADATA, VINDR_CONVERT_QUARANTINE, NIH_INDEX, NIH_CACHE, NIH_QUARANTINE])
