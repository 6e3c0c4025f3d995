"""Detection evaluation: COCO metrics and the VinBigData competition metric with bootstrap intervals,
paired differences between runs, the run comparison, and the heatmap localisation scorer
(:mod:`cxrssl.evaluation.localization`)."""

from cxrssl.evaluation.metrics import evaluate, format_table
from cxrssl.evaluation.summary import Run, write_summary

__all__ = ["evaluate", "format_table", "Run", "write_summary"]
