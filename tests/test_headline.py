"""The headline results (cxrssl.headline): formatted from the stages' summaries, kept in the README."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cxrssl.errors import BadInputError
from cxrssl.determinism import machine_kind
from cxrssl.headline import BEGIN, END, compare, headline, machine_of, main, update_readme

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def summaries(tmp_path):
    pd.DataFrame({"step": [1, 2, 3], "epoch": [1, 1, 2], "loss": [500.0, 420.5, 377.25]}).to_csv(
        tmp_path / "bt.csv", index=False)
    (tmp_path / "linear.md").write_text("| init | 5 % labels |\n| --- | --- |\n| random | 0.600 [0.550, 0.650] |\n")
    pd.DataFrame([{"engine": "torchvision", "init": "barlowtwins", "res": 128, "mAP50": 0.41, "mAP50_bca_low": 0.3,
                   "mAP50_bca_high": 0.5, "voc_mAP": 0.45, "loc_energy_in_box": 0.2, "loc_energy_in_box_low": 0.1,
                   "loc_energy_in_box_high": 0.3, "loc_pointing_game": 0.5}]).to_csv(tmp_path / "det.csv", index=False)
    pd.DataFrame([{"engine": "torchvision", "init": "barlowtwins", "baseline": "random", "res": 128,
                   "delta_mAP50": 0.05, "delta_bca_low": -0.02, "delta_bca_high": 0.11, "p_value": 0.2}]).to_csv(
        tmp_path / "diff.csv", index=False)
    (tmp_path / "seg.md").write_text("| init | Dice |\n| --- | --- |\n| random | 0.9 |\n")
    return tmp_path


def test_headline_formats_every_stage_from_its_own_summary(summaries):
    text = headline([("barlowtwins", summaries / "bt.csv")], summaries / "linear.md", summaries / "det.csv",
                    summaries / "diff.csv", [("Segmentation", summaries / "seg.md")])
    assert "| barlowtwins | 3 | 500.00 -> 377.25 |" in text
    assert "| random | 0.600 [0.550, 0.650] |" in text
    assert "| torchvision | barlowtwins | 128 px | 0.410 [0.300, 0.500] | 0.450 | 0.200 [0.100, 0.300] | 0.500 |" in text
    assert "| torchvision: barlowtwins - random | 128 px | +0.050 [-0.020, +0.110] | 0.200 |" in text
    assert text.index("Pretraining") < text.index("Linear") < text.index("Detection") < text.index("Segmentation")


def test_readme_block_is_replaced_and_checked(summaries):
    readme = summaries / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{BEGIN}\nold figures\n{END}\n\nafter\n")
    assert update_readme(readme, "new figures\n", check=True) is False
    assert "old figures" in readme.read_text()  # check mode never writes
    assert update_readme(readme, "new figures\n") is False
    content = readme.read_text()
    assert f"{BEGIN}\nnew figures\n{END}" in content and content.startswith("# x\n\nbefore") and content.endswith("after\n")
    assert update_readme(readme, "new figures\n", check=True) is True
    (summaries / "headline.md").write_text("other figures\n")
    assert main(["--headline", str(summaries / "headline.md"), "--readme", str(readme), "--check"]) == 1
    assert main(["--headline", str(summaries / "headline.md"), "--readme", str(readme)]) == 0
    assert main(["--headline", str(summaries / "headline.md"), "--readme", str(readme), "--check"]) == 0
    assert main(["--headline", str(summaries / "missing.md"), "--readme", str(readme), "--check"]) == 2


def test_readme_check_compares_every_figure_on_the_same_kind_of_machine_and_the_tables_on_another(summaries):
    """Bit-identical figures are a same-machine-kind promise: on another kind the check still
    fails for any change to the tables (rows, labels, columns), but not for figures alone."""
    readme = summaries / "README.md"
    readme.write_text(f"# x\n{BEGIN}\nold\n{END}\n")
    run = headline([("bt", summaries / "bt.csv")], summaries / "linear.md", machine="kind A")
    assert machine_of(run) == "kind A" and run.rstrip().endswith("*Computed on: kind A.*")
    assert main(["--headline", _write(summaries, "a.md", run), "--readme", str(readme)]) == 0
    drifted = run.replace("0.600 [0.550, 0.650]", "0.612 [0.550, 0.661]")
    assert compare(run, drifted) == (True, True, 2)
    assert main(["--headline", _write(summaries, "b.md", drifted), "--readme", str(readme), "--check"]) == 1
    elsewhere = drifted.replace("kind A", "kind B")
    assert compare(run, elsewhere) == (False, True, 2)
    assert main(["--headline", _write(summaries, "c.md", elsewhere), "--readme", str(readme), "--check"]) == 0
    for changed in (elsewhere.replace("| random |", "| imagenet |"), elsewhere + "| extra | 1 |\n",
                    elsewhere.replace("5 % labels", "10 % labels")):
        assert compare(run, changed)[1] is False
        assert main(["--headline", _write(summaries, "d.md", changed), "--readme", str(readme), "--check"]) == 1
    unrecorded = run.replace("*Computed on: kind A.*", "")  # a README from before the machine line
    readme.write_text(f"# x\n{BEGIN}\n{unrecorded}\n{END}\n")
    assert compare(unrecorded, run)[:2] == (False, True)


def test_machine_kind_names_the_processor_caches_kernels_and_torch():
    kind = machine_kind()
    assert "torch " in kind and ("AVX2 kernels (pinned)" in kind or "native kernels" in kind)
    assert kind == machine_kind()  # a property of the machine, not of the call


def _write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return str(folder / name)


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"no markers\n{END}\n{BEGIN}\n")
    with pytest.raises(BadInputError, match="markers"):
        update_readme(readme, "x")


def test_the_project_readme_has_one_generated_block():
    text = (ROOT / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1


def test_module_runs_as_a_command(summaries):
    out = summaries / "h.md"
    done = subprocess.run([sys.executable, "-m", "cxrssl.headline", "--pretrain", f"bt={summaries / 'bt.csv'}",
                           "--linear", str(summaries / "linear.md"), "--detection", str(summaries / "det.csv"),
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "377.25" in out.read_text() and "0.410" in out.read_text()
