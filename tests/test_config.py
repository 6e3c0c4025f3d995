"""The config schema: defaults are the paper's, errors name the key, flags round-trip."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxrssl.config import (
    ConfigError,
    add_section_args,
    load_config,
    section_args,
    section_defaults,
    section_to_cli,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]


def test_repository_config_is_valid():
    config = load_config(REPO / "config.yaml")
    assert config["demo"]["enabled"] is True
    assert config["nih"]["root"].startswith(config["demo"]["root"])


def test_paper_config_is_valid_and_holds_the_papers_settings():
    config = load_config(REPO / "config" / "paper.yaml")
    assert config["demo"]["enabled"] is False
    pre, bt = config["pretrain"], config["pretrain"]["barlowtwins"]
    assert (bt["arch"], pre["batch_size"], pre["epochs"], bt["lambd"]) == ("resnet50", 768, 800, 0.0051)
    assert bt["projector"] == [8192, 8192, 8192] and bt["weight_decay"] == 1e-6
    det = config["detection"]
    assert (det["lr"], det["momentum"], det["weight_decay"], det["warmup_iters"]) == (0.005, 0.9, 1e-4, 500)
    assert (det["epochs"], det["batch_size"], det["frozen_stages"], det["norm_eval"]) == (50, 32, 1, True)
    assert det["resolutions"] == [224, 640]


def test_defaults_are_filled_in_nested_sections():
    config = validate_config({})
    assert config["vindr"]["fusion"]["iou_thr"] == 0.6
    assert config["vindr"]["convert"]["bit_depth"] == 8
    assert config["linear_eval"]["fractions"] == [0.01, 0.1, 1.0]


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"pretrain": {"barlowtwins": {"lr_weights": -1}}}, "pretrain.barlowtwins.lr_weights"),
        ({"vindr": {"layout": "dropbox"}}, "vindr.layout"),
        ({"detection": {"resolutions": [0]}}, "detection.resolutions.0"),
        ({"vindr": {"fusion": {"iou_thr": 2}}}, "vindr.fusion.iou_thr"),
        ({"pretrian": {}}, "(top level)"),
        ({"on_bad_input": "ignore"}, "on_bad_input"),
    ],
)
def test_invalid_values_are_reported_with_their_key(bad, key):
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    assert f"  {key}:" in str(info.value)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(path)


def test_flags_round_trip_through_the_schema():
    values = dict(section_defaults("pretrain.barlowtwins"), projector=[16, 8], lambd=0.01)
    parser = argparse.ArgumentParser()
    add_section_args(parser, "pretrain.barlowtwins")
    parsed = section_args(parser.parse_args(section_to_cli("pretrain.barlowtwins", values)), "pretrain.barlowtwins")
    assert parsed == values


def test_excluded_settings_are_neither_flags_nor_rendered():
    values = section_defaults("linear_eval")
    rendered = section_to_cli("linear_eval", values, exclude=("inits", "fractions"))
    assert "--inits" not in rendered and "--fractions" not in rendered
    parser = argparse.ArgumentParser()
    add_section_args(parser, "linear_eval", exclude=("inits", "fractions"))
    assert parser.parse_args(rendered).epochs == values["epochs"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--inits", "random"])


def test_snakemake_refuses_an_invalid_config_before_running_anything(tmp_path):
    bad = yaml.safe_load((REPO / "config.yaml").read_text())
    bad["vindr"]["fusion"]["iou_thr"] = 7
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(bad))
    proc = _dry_run(config, tmp_path)
    assert proc.returncode != 0
    assert "iou_thr" in proc.stdout + proc.stderr


def _dry_run(config: Path, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(config), "--directory",
                           str(workdir), "-s", str(REPO / "Snakefile")], capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("text, line", [("seed: 1\nseed: 2\n", 2),
                                        ("detection:\n  epochs: 1\n  lr: 0.1\n  epochs: 3\n", 4),
                                        ("a: &a {p: 1}\nb:\n  <<: *a\n  q: 2\n  q: 3\n", 5)])
def test_a_key_given_twice_is_an_error_naming_file_and_line(tmp_path, text, line):
    """PyYAML keeps the last of a duplicated key without a word: a block written twice loses its first copy."""
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="given twice") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:") and f"line {line}" in str(info.value)


def test_a_key_overriding_a_merged_one_is_not_a_duplicate():
    """`<<: *anchor` then the same key is YAML's merge override, which must keep working."""
    from cxrssl.config import strict_yaml_load

    assert strict_yaml_load("a: &a {p: 1, q: 1}\nb:\n  <<: *a\n  p: 2\n") == {"a": {"p": 1, "q": 1},
                                                                              "b": {"p": 2, "q": 1}}


def test_shipped_schema_and_configs_have_no_key_given_twice():
    """The schema once held its zeroshot block twice (the loader kept one silently)."""
    from cxrssl.config import read_config_file, schema_path, strict_yaml_load

    strict_yaml_load(schema_path().read_text())
    for path in [REPO / "config.yaml", *sorted((REPO / "config").glob("*.yaml")), *sorted((REPO / "profiles").rglob("*.yaml"))]:
        read_config_file(path)


def test_snakemake_refuses_a_config_file_with_a_block_given_twice(tmp_path):
    text = (REPO / "config.yaml").read_text() + "\nseed: 3\n"  # config.yaml sets seed already
    config = tmp_path / "twice.yaml"
    config.write_text(text)
    proc = _dry_run(config, tmp_path)
    assert proc.returncode != 0
    assert "'seed' given twice" in proc.stdout + proc.stderr


def test_every_setting_is_documented_and_well_formed():
    """Unquoted commas in flow-style YAML silently split a description into a stray key."""
    from cxrssl.config import load_schema

    known = {"type", "default", "description", "enum", "minimum", "maximum", "exclusiveMinimum",
             "exclusiveMaximum", "items", "minItems", "maxItems", "properties", "additionalProperties", "pattern",
             "minLength", "uniqueItems"}

    def walk(node, path):
        for name, prop in node.get("properties", {}).items():
            where = f"{path}.{name}".lstrip(".")
            assert isinstance(prop, dict) and "type" in prop, where
            assert set(prop) <= known, f"{where}: unexpected keys {set(prop) - known}"
            assert prop.get("description") or prop["type"] == "object", f"{where}: no description"
            walk(prop, where)

    walk(load_schema(), "")


# --- hostile configs (issue 11) -------------------------------------------------------------------

@pytest.mark.parametrize(
    "bad, key",
    [
        ({"results_dir": ""}, "results_dir"),
        ({"results_dir": "  "}, "results_dir"),
        ({"vindr": {"root": ""}}, "vindr.root"),
        ({"pretrain": {"lambd": float("nan")}}, "pretrain.lambd"),
        ({"detection": {"lr": float("inf")}}, "detection.lr"),
        ({"vindr": {"fusion": {"iou_thr": float("nan")}}}, "vindr.fusion.iou_thr"),
        ({"linear_eval": {"fractions": [0.1, float("nan")]}}, "linear_eval.fractions.1"),
        ({"vindr": {"convert": {"size": 1_000_000}}}, "vindr.convert.size"),
        ({"vindr": {"convert": {"max_decoded_mb": 0}}}, "vindr.convert.max_decoded_mb"),
        ({"detection": {"inits": ["random", "../../etc"]}}, "detection.inits.1"),
        ({"linear_eval": {"inits": ["ok", "with space"]}}, "linear_eval.inits.1"),
        ({"detection": {"inits": ["random", "random"]}}, "detection.inits"),
        ({"evaluation": {"seeds": [-1]}}, "evaluation.seeds.0"),
        ({"evaluation": {"seeds": [0, 0]}}, "evaluation.seeds"),
    ],
)
def test_hostile_values_are_reported_with_their_key(bad, key):
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    assert f"  {key}:" in str(info.value)


@pytest.mark.parametrize(
    "bad, keys",
    [
        ({"pretrain": {"image_size": 300}}, ["pretrain.image_size", "nih.cache_size"]),
        ({"linear_eval": {"image_size": 300}}, ["linear_eval.image_size", "nih.cache_size"]),
        ({"detection": {"resolutions": [224, 2048]}}, ["detection.resolutions", "vindr.convert.size"]),
        ({"pretrain": {"barlowtwins": {"arch": "resnet18"}}}, ["pretrain.barlowtwins.arch", "detection.arch"]),
        ({"pretrain": {"vicreg": {"arch": "resnet18"}}, "detection": {"inits": ["random", "vicreg"]}},
         ["pretrain.vicreg.arch", "detection.arch"]),
        ({"privacy": {"pseudonymize_ids": True, "private_dir": "results/private"}}, ["privacy.private_dir", "results_dir"]),
        ({"pretrain": {"gmml": {"arch": "vit_tiny_patch8"}}, "detection": {"inits": ["random", "gmml"],
                                                                        "engines": ["mmdet"]}},
         ["pretrain.gmml.arch", "detection.engine", "mmdet"]),
    ],
)
def test_settings_that_must_agree_are_cross_checked(bad, keys):
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    line = next(line for line in str(info.value).splitlines() if "[check:" in line)
    assert all(key in line for key in keys), line


def test_cross_checks_pass_when_the_settings_agree():
    validate_config({"pretrain": {"barlowtwins": {"arch": "resnet18"}}, "detection": {"arch": "resnet18"}})
    validate_config({"pretrain": {"barlowtwins": {"arch": "resnet18"}}, "detection": {"inits": ["random", "imagenet"]}})
    validate_config({"pretrain": {"gmml": {"arch": "vit_tiny_patch8"}}})  # not a detection init
    # a ViT method is detected through ViTDet on its own arch (torchvision engine)
    validate_config({"pretrain": {"gmml": {"arch": "vit_tiny_patch8"}}, "detection": {"inits": ["random", "gmml"]}})
    validate_config({"privacy": {"pseudonymize_ids": True, "private_dir": "private"}})


@pytest.mark.parametrize("text, words", [("", "is empty"), ("# only a comment\n", "is empty"),
                                         ("- a\n- b\n", "expected a mapping"), ("just text", "expected a mapping"),
                                         ("pretrain: {epochs: [1\n", "not valid YAML"),
                                         (b"seed: 1\nresults_dir: r\xffsults\n", "not UTF-8")])
def test_empty_or_malformed_yaml_names_the_file(tmp_path, text, words):
    path = tmp_path / "site.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=words) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:")
