"""cxrssl: self-supervised pretraining on chest X-rays and abnormality localisation.

The package holds the pipeline's reusable logic; it never imports snakemake, so every stage can be
used from Python or from the thin scripts under ``scripts/``.

Importing the package pins the CPU math libraries to one instruction set (see
:mod:`cxrssl.determinism`) before torch loads, so a CPU result is the same on every machine of
a kind, whichever vector units its processor has.
"""

from cxrssl import determinism as _determinism

_determinism.pin_cpu_kernels()

__version__ = "0.2.0"
