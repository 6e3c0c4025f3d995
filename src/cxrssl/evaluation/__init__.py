"""Detection evaluation: COCO and VinBigData metrics with a bootstrap CI, and the run comparison."""

from cxrssl.evaluation.metrics import evaluate, format_table
from cxrssl.evaluation.summary import Run, write_summary

__all__ = ["evaluate", "format_table", "Run", "write_summary"]
