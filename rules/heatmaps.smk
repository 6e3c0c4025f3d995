# Stage: heatmaps. Ablation-CAM (or EigenCAM) of every detection run on the test images with most
# boxes (or heatmaps.images), scored against the GT boxes (localization.json: share of heat in the
# boxes, pointing game, ...; the detection summary tabulates them per init), and per engine x
# resolution x seed a panel: rows = images, columns = inits.

from cxrssl.cam.names import heatmap_name, n_heatmaps

HEATMAP_MANIFEST = f"{HEATMAP_RUN}/heatmaps.json"
HEATMAP_PANEL = f"{RESULTS}/heatmaps/{{engine}}/panel_{{res}}px_seed{{seed}}.png"
N_HEATMAPS = n_heatmaps(config["heatmaps"])


rule heatmaps:
    input:
        checkpoint=f"{DET_RUN}/best.pth",
        coco=expand(VINDR_COCO, split="test"),
    output:
        pngs=[
            report(f"{HEATMAP_RUN}/{heatmap_name(i)}", caption="../report/heatmap.rst", category="Heatmaps",
                   subcategory="{engine} {res}px seed {seed}", labels={"init": "{init}", "image": str(i)})
            for i in range(N_HEATMAPS)
        ],
        manifest=HEATMAP_MANIFEST,
        localization=HEATMAP_LOCALIZATION,
    params:
        args=cli("heatmaps"),
        seed=SEED,
    log:
        f"{LOGS}/heatmaps/{{engine}}/{{init}}_{{res}}px_seed{{seed}}.log",
    benchmark:
        f"{BENCH}/heatmaps/{{engine}}/{{init}}_{{res}}px_seed{{seed}}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=8000,
        # Ablation-CAM: minutes per image on a CPU at paper resolution with the default ratio
        runtime=lambda wildcards: 10 + 10 * max(N_HEATMAPS, config["heatmaps"]["n_scored"]),
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/heatmaps.py\" run --engine {wildcards.engine} --checkpoint {input.checkpoint:q}"
        " --coco {input.coco:q} --out-dir $(dirname {output.manifest:q}) --label {wildcards.init:q}"
        " --seed {params.seed} {params.args} --log {log:q}"


rule heatmap_panel:
    input:
        panel_inputs,
    output:
        report(HEATMAP_PANEL, caption="../report/heatmap_panel.rst", category="Heatmaps",
               subcategory="Panels", labels={"engine": "{engine}", "resolution": "{res}px", "seed": "{seed}"}),
    params:
        columns=panel_columns,
        title=lambda wildcards: f"{wildcards.engine}, {wildcards.res} px, seed {wildcards.seed}",
    log:
        f"{LOGS}/heatmap_panel/{{engine}}_{{res}}px_seed{{seed}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/heatmaps.py\" panel {params.columns} --title {params.title:q} --out {output:q} --log {log:q}"


FINAL_TARGETS.append(
    lambda: sorted({expand(HEATMAP_PANEL, engine=r["engine"], res=r["res"], seed=r["seed"])[0] for r in detection_runs()})
)
