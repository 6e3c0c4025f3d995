# Stage: image-report multimodal pretraining (arXiv 2401.01524) and zero-shot lesion localisation.
#
# The method is registered like every other one (its block pretrain.multimodal, listed in
# pretrain.methods; its backbone.pth + backbone.json in the same run folder, so `multimodal` is an
# init of linear evaluation and detection through init_checkpoint()), but it trains on
# (report, frontal image) pairs of a report corpus, not on the NIH cache, with a text encoder: its
# data, loop and outputs differ from the shared NIH loop's (rule pretrain), so it has its own
# rules here and `ruleorder` gives them its run folder (cxrssl.config.OWN_RULE_METHODS). A method
# of the shared loop stays one module + one schema block.
#
# prepare_reports: pairs with quarantine and a patient-disjoint split (the demo's NIH test patients
# are held out). pretrain_multimodal: resumable (checkpoint.pth not declared, as in rule pretrain).
# zeroshot: per box layout of zeroshot.layouts, similarity maps scored with the baselines; the
# threshold is chosen on validation images. localization_comparison: CAMs and similarity maps in
# one table (cxrssl.evaluation.localization scores both).

MM_METHOD = "multimodal"
MM_DIR = expand(PRETRAIN_DIR, method=MM_METHOD)[0]
MM_PAIRS = f"{PREP}/reports/pairs.csv"
MM_PAIRS_QUARANTINE = f"{PREP}/reports/quarantine.csv"
ZEROSHOT_RUN = f"{RESULTS}/zeroshot/{MM_METHOD}/{{boxes}}"
ZEROSHOT_LOCALIZATION = f"{ZEROSHOT_RUN}/localization.json"
LOC_COMPARISON = f"{RESULTS}/zeroshot/localization_comparison.csv"
LOC_COMPARISON_MD = f"{RESULTS}/zeroshot/localization_comparison.md"
# the block's data settings go to prepare_reports, the rest to training only (no needless reruns)
MM_DATA_KEYS = ("reports_root", "layout", "val_fraction", "test_fraction")
MM_TRAIN_ONLY = tuple(k for k in section_schema(f"pretrain.{MM_METHOD}")["properties"] if k not in MM_DATA_KEYS)


ruleorder: pretrain_multimodal > pretrain


wildcard_constraints:
    boxes="nih|rsna|ms_cxr",


rule prepare_reports:
    input:
        report_inputs,
    output:
        pairs=MM_PAIRS,
        quarantine=MM_PAIRS_QUARANTINE,
    params:
        args=cli(f"pretrain.{MM_METHOD}", exclude=MM_TRAIN_ONLY),
        hold_out=demo_hold_out_flag,
        seed=SEED,
        on_bad_input=ON_BAD_INPUT,
    log:
        f"{LOGS}/multimodal/prepare_reports.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30 if DEMO["enabled"] else 4 * 60,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/prepare_reports.py\" --out {output.pairs:q} --quarantine {output.quarantine:q}"
        " --seed {params.seed} --on-bad-input {params.on_bad_input} {params.hold_out} {params.args} --log {log:q}"


rule pretrain_multimodal:
    input:
        pairs=MM_PAIRS,
        init=mm_init_input,
    output:
        backbone=expand(PRETRAIN_BACKBONE, method=MM_METHOD)[0],
        sidecar=expand(PRETRAIN_SIDECAR, method=MM_METHOD)[0],
        model=f"{MM_DIR}/model.pth",
        model_json=f"{MM_DIR}/model.json",
        text=directory(f"{MM_DIR}/text_encoder"),
        val=f"{MM_DIR}/val.csv",
        metrics=report(expand(PRETRAIN_METRICS, method=MM_METHOD)[0], caption="../report/pretrain_multimodal_metrics.rst",
                       category="Pretraining", labels={"method": MM_METHOD, "file": "metrics.csv"}),
        plot=report(expand(PRETRAIN_PLOT, method=MM_METHOD)[0], caption="../report/pretrain_multimodal_loss.rst",
                    category="Pretraining", labels={"method": MM_METHOD, "file": "loss.png"}),
    log:
        f"{LOGS}/pretrain/{MM_METHOD}.log",
    benchmark:
        f"{BENCH}/pretrain/{MM_METHOD}.tsv"
    params:
        torch_threads=TORCH_THREADS,
        args=cli(f"pretrain.{MM_METHOD}", exclude=("init",) if mm_init_input(None) else ()),
        imagenet=lambda wildcards: imagenet_flag(config["pretrain"][MM_METHOD]["arch"]),
        seed=SEED,
        out_dir=lambda wildcards, output: str(Path(output.backbone).parent),
        launcher=torch_launcher,
        init=mm_init_flag,
    threads: TORCH_THREADS + config["pretrain"][MM_METHOD]["workers"]
    resources:
        mem_mb=16000,
        runtime=60 if DEMO["enabled"] else 72 * 60,
        gpu=0,
    conda:
        ENV
    shell:
        "{params.launcher} \"$CXRSSL_SCRIPTS/pretrain_multimodal.py\" --pairs {input.pairs:q} --out-dir {params.out_dir:q}"
        " --seed {params.seed} --threads {params.torch_threads} {params.imagenet} {params.args} {params.init}"
        " --log-file {log:q}"


rule zeroshot:
    input:
        ready=lambda wildcards: demo_ready(),
        model_json=f"{MM_DIR}/model.json",
        model=f"{MM_DIR}/model.pth",
        boxes=lambda wildcards: zeroshot_paths(wildcards.boxes)[0],
    output:
        localization=ZEROSHOT_LOCALIZATION,
        summary=report(f"{ZEROSHOT_RUN}/summary.csv", caption="../report/zeroshot_summary.rst",
                       category="Zero-shot localisation", labels={"boxes": "{boxes}", "file": "summary.csv"}),
        scores=f"{ZEROSHOT_RUN}/scores.csv",
        panel=report(f"{ZEROSHOT_RUN}/panel.png", caption="../report/zeroshot_panel.rst",
                     category="Zero-shot localisation", labels={"boxes": "{boxes}", "file": "panel.png"}),
    params:
        args=cli("zeroshot", exclude=ZEROSHOT_PATH_KEYS),
        images=lambda wildcards: zeroshot_paths(wildcards.boxes)[1],
        seed=SEED,
        out_dir=lambda wildcards, output: str(Path(output.localization).parent),
        torch_threads=TORCH_THREADS,
        on_bad_input=ON_BAD_INPUT,
    log:
        f"{LOGS}/zeroshot/{MM_METHOD}_{{boxes}}.log",
    benchmark:
        f"{BENCH}/zeroshot/{MM_METHOD}_{{boxes}}.tsv"
    conda:
        ENV
    threads: TORCH_THREADS
    resources:
        mem_mb=8000,
        runtime=30 if DEMO["enabled"] else 4 * 60,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/zeroshot.py\" --run-dir $(dirname {input.model_json:q}) --layout {wildcards.boxes}"
        " --boxes {input.boxes:q} --images {params.images:q} --out-dir {params.out_dir:q} --seed {params.seed}"
        " --threads {params.torch_threads} --on-bad-input {params.on_bad_input} {params.args} --log {log:q}"


rule localization_comparison:
    input:
        cams=[path for _, path in localized_runs()],
        zeroshot=lambda wildcards: zeroshot_outputs(),
    output:
        csv=report(LOC_COMPARISON, caption="../report/localization_comparison.rst",
                   category="Zero-shot localisation", labels={"file": "localization_comparison.csv"}),
        markdown=report(LOC_COMPARISON_MD, caption="../report/localization_comparison.rst",
                        category="Zero-shot localisation", labels={"file": "localization_comparison.md"}),
    params:
        flags=localization_comparison_flags,
    log:
        f"{LOGS}/zeroshot/localization_comparison.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/summarize_localization.py\" {params.flags} --csv {output.csv:q}"
        " --markdown {output.markdown:q} --log {log:q}"


FINAL_TARGETS.append(
    lambda: [*zeroshot_outputs(), LOC_COMPARISON, LOC_COMPARISON_MD] if MM_METHOD in config["pretrain"]["methods"] else []
)

if MM_METHOD in config["pretrain"]["methods"]:
    HEADLINE_PARTS.append(("Localisation maps against the boxes (detector CAMs and zero-shot image-text similarity, "
                           "beside random and centre-prior baselines; 95% CIs)", LOC_COMPARISON_MD))
