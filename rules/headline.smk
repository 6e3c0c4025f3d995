# Headline results: the stages' own summaries formatted as one Markdown page (cxrssl.headline),
# results/headline.md. `make readme` copies it into the README between its markers and CI's
# `make readme-check` fails when the README's figures are not a fresh run's. Stages that add a
# summary append (title, markdown file) to HEADLINE_PARTS in their rule file.

HEADLINE = f"{RESULTS}/headline.md"
PRETRAIN_METRICS_CSV = f"{PRETRAIN_DIR}/metrics.csv"


rule headline:
    input:
        pretrain=lambda wildcards: expand(PRETRAIN_METRICS_CSV, method=config["pretrain"]["methods"]),
        linear=LINEAR_SUMMARY_MD,
        detection=EVAL_SUMMARY,
        differences=EVAL_DIFFERENCES,
        parts=lambda wildcards: [path for _, path in HEADLINE_PARTS],
    output:
        HEADLINE,
    params:
        pretrain=lambda wildcards: " ".join(
            shlex.quote(f"{m}={p}") for m, p in zip(config["pretrain"]["methods"],
                                                    expand(PRETRAIN_METRICS_CSV, method=config["pretrain"]["methods"]))
        ),
        parts=lambda wildcards: " ".join(shlex.quote(f"{title}={path}") for title, path in HEADLINE_PARTS),
    log:
        f"{LOGS}/headline.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        ENV
    shell:
        "\"$CXRSSL_PY\" -m cxrssl.headline --pretrain {params.pretrain} --linear {input.linear:q}"
        " --detection {input.detection:q} --detection-differences {input.differences:q}"
        " --part {params.parts} --out {output:q} > {log:q} 2>&1"


FINAL_TARGETS.append(lambda: [HEADLINE])
