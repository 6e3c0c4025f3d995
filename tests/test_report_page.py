"""The report's first page (cxrssl.report_page): the headline tables as reStructuredText that docutils
renders (as the Snakemake report does) into HTML tables with every init and interval."""

from __future__ import annotations

import pandas as pd
import pytest
from docutils.core import publish_parts

from cxrssl.errors import BadInputError
from cxrssl.report_page import headline_rst


def tables(tmp_path):
    linear = pd.DataFrame({"init": ["random", "random", "barlowtwins", "barlowtwins"], "arch": ["resnet18"] * 4,
                           "fraction": [0.1, 1.0, 0.1, 1.0], "test_mean_auc": [0.61, 0.66, 0.70, 0.7349]})
    detection = pd.DataFrame({"engine": ["torchvision"] * 2, "init": ["random", "barlowtwins"], "res": [64, 64],
                              "n_seeds": [1, 1], "mAP50": [0.1, 0.25], "mAP50_bca_low": [0.05, 0.2],
                              "mAP50_bca_high": [0.15, 0.31], "mAP50_ci_low": [0.04, 0.19],
                              "mAP50_ci_high": [0.16, 0.3], "voc_mAP": [0.2, float("nan")]})
    diffs = pd.DataFrame({"engine": ["torchvision"], "res": [64], "init": ["barlowtwins"], "baseline": ["random"],
                          "delta_mAP50": [0.15], "delta_bca_low": [0.1], "delta_bca_high": [0.2], "p_value": [0.004]})
    paths = []
    for name, frame in (("linear.csv", linear), ("det.csv", detection), ("diff.csv", diffs)):
        frame.to_csv(tmp_path / name, index=False)
        paths.append(tmp_path / name)
    return paths


def test_headline_renders_every_init_with_its_intervals(tmp_path):
    text = headline_rst(*tables(tmp_path))
    parts = publish_parts(text, writer="html", settings_overrides={"halt_level": 2})
    html = parts["html_body"]
    assert html.count("<table") == 3
    for cell in ("10 % labels", "100 % labels", "0.735", "0.610", "[0.200, 0.310]", "[0.190, 0.300]",
                 "barlowtwins − random", "+0.150", "0.004", "n/a"):
        assert cell in html, cell


def test_a_summary_without_its_columns_is_refused(tmp_path):
    linear, det, diff = tables(tmp_path)
    pd.DataFrame({"init": ["random"]}).to_csv(det, index=False)
    with pytest.raises(BadInputError, match="det.csv.*mAP50"):
        headline_rst(linear, det, diff)
