"""The ``cxrssl <verb>`` entry point and the workflow conventions (issue 14): every verb answers
``--help``, the CLI runs the same functions as the scripts, config/README.md matches the schema,
the workflow catalog file, ``snakemake --lint`` and ``pip check``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from cxrssl.cli import PACKAGE_VERBS, SCRIPT_VERBS

REPO = Path(__file__).resolve().parents[1]


def cxrssl(*args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cxrssl", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"cxrssl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_overview_lists_every_verb_and_unknown_verbs_fail():
    out = cxrssl("--help").stdout
    for verb in [*PACKAGE_VERBS, *SCRIPT_VERBS]:
        assert re.search(rf"^  {re.escape(verb)}\s", out, re.M), f"cxrssl --help lacks {verb}"
    bad = cxrssl("no-such-verb", check=False)
    assert bad.returncode == 2 and "unknown verb" in bad.stderr
    assert cxrssl(check=False).returncode == 2  # no verb: usage, and an error status


def test_every_script_has_a_verb_and_every_verb_has_help():
    scripts = {p.name for p in (REPO / "scripts").glob("*.py")}
    covered = {s for s, _ in SCRIPT_VERBS.values()} | {"predict.py", "evaluate.py"}
    assert scripts == covered, f"scripts without a cxrssl verb: {scripts - covered}"
    for verb in [*PACKAGE_VERBS, *SCRIPT_VERBS]:
        out = cxrssl(verb, "--help").stdout
        assert out.startswith("usage: cxrssl") and "--" in out, (verb, out[:300])


def test_package_verbs_are_the_scripts_functions():
    # predict: the same parser as cxrssl-predict; evaluate: scripts/evaluate.py only calls the package's main
    assert "--checkpoint" in cxrssl("predict", "--help").stdout
    assert "cxrssl.evaluation.command import main" in (REPO / "scripts/evaluate.py").read_text()
    assert "cxrssl.detection.predict import main" in (REPO / "scripts/predict.py").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["cxrssl"] == "cxrssl.cli:main"
    assert project["scripts"]["cxrssl-predict"] == "cxrssl.detection.predict:main"


def test_evaluate_and_export_run_through_the_cli(tmp_path):
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "class1"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20],
                                                    "score": 0.9}]))
    cxrssl("evaluate", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "res.json"), "--out",
           str(tmp_path / "m.json"), "--bootstrap", "0", "--no-finding", "false")
    assert json.loads((tmp_path / "m.json").read_text())["mAP50"] == pytest.approx(1.0)

    from test_export import make_backbone

    backbone = make_backbone(tmp_path / "results", "barlowtwins", "resnet18")
    out = cxrssl("export", str(backbone), "--out-dir", str(tmp_path / "exported"), "--config",
                 str(REPO / "config.yaml")).stdout
    assert json.loads(out)["name"] == "barlowtwins_resnet18"
    card = json.loads((tmp_path / "exported/model_card.json").read_text())
    assert card["data"]["synthetic_demo"] is True and card["config_fingerprint_of"] == "config"


def test_a_stage_verb_runs_its_script(tmp_path):
    """cxrssl summarize-linear-eval is scripts/summarize_linear_eval.py (the rule's command)."""
    bad = cxrssl("summarize-linear-eval", "--metrics", str(tmp_path / "missing.json"), "--summary",
                 str(tmp_path / "s.csv"), "--plot", str(tmp_path / "p.png"), check=False)
    assert bad.returncode != 0 and "missing.json" in bad.stderr


# --- workflow conventions ------------------------------------------------------------------------

def test_config_readme_is_generated_from_the_schema():
    from cxrssl.config_docs import render, undocumented

    assert undocumented() == []
    text = render()
    assert (REPO / "config/README.md").read_text() == text, "config/README.md is stale: run `make config-docs`"
    from cxrssl.config import load_schema

    def keys(props, prefix=""):
        for name, prop in props.items():
            yield prefix + name
            yield from keys(prop.get("properties", {}), f"{prefix}{name}.")

    for key in keys(load_schema()["properties"]):
        assert f"`{key}`" in text, f"config/README.md does not describe {key}"
    assert cxrssl("config-docs", "--check").returncode == 0
    assert "config-docs:" in (REPO / "Makefile").read_text()


def test_config_docs_check_fails_on_a_stale_page(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text((REPO / "config/README.md").read_text().replace("`seed`", "`sead`"))
    proc = cxrssl("config-docs", "--check", "--out", str(stale), check=False)
    assert proc.returncode == 1 and "out of date" in proc.stdout


def test_workflow_catalog_file():
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    usage = catalog["usage"]
    assert usage["mandatory-flags"]["desc"] and "--configfile" in usage["mandatory-flags"]["flags"]
    assert usage["software-stack-deployment"]["conda"] is True
    assert usage["report"] is True
    assert (REPO / "Snakefile").is_file() and (REPO / "config/README.md").is_file()


def test_snakemake_lint_is_clean(tmp_path):
    from conftest import bare_env

    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "-s", str(REPO / "Snakefile"),
                           "--directory", str(tmp_path), "--configfile", str(REPO / "config.yaml")],
                          capture_output=True, text=True, env=bare_env(), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in out, out[-6000:]


def test_pip_check_is_clean():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


#: Declared dependencies that no module imports by name, and why they are needed.
IMPORTED_INDIRECTLY = {
    "pylibjpeg-openjpeg": "pydicom's JPEG 2000 decoder plugin (through pylibjpeg)",
    "pylibjpeg-libjpeg": "pydicom's JPEG / JPEG-LS decoder plugin (through pylibjpeg)",
    "pylibjpeg-rle": "pydicom's RLE decoder plugin (through pylibjpeg)",
    "pylibjpeg": "pydicom's decoder plugin interface (cxrssl.data.dicom)",
    "python-gdcm": "pydicom's GDCM decoder (JPEG 2000 / JPEG-LS fallback, cxrssl.data.dicom)",
    "dvclive": "the default live-tracking back end (issue 14's tracker)",
    "onnxscript": "torch.onnx's exporter needs it (cxrssl.export)",
    "onnx": "the ONNX model format (the export test checks the graph with it)",
    "iterative-stratification": "imported as iterstrat",
}


def test_every_declared_dependency_is_used():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!\[ ;]", d, maxsplit=1)[0] for d in project["dependencies"]]
    source = "\n".join(p.read_text() for folder in ("src", "tests", "scripts") for p in (REPO / folder).rglob("*.py"))
    imported = set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_][\w]*)", source, re.M))
    by_dist: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            by_dist.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    unused = [n for n in names if n not in IMPORTED_INDIRECTLY
              and not (by_dist.get(n.lower().replace("_", "-"), set()) & imported)]
    assert not unused, f"declared but never imported (or list them in IMPORTED_INDIRECTLY): {unused}"
