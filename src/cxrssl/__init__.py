"""cxrssl: Barlow Twins pretraining on chest X-rays and Faster R-CNN abnormality localisation.

The package holds the pipeline's reusable logic; it never imports snakemake, so every stage can be
used from Python or from the thin scripts under ``scripts/``.
"""

__version__ = "0.1.0"
