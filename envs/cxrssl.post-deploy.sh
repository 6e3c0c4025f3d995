#!/usr/bin/env bash
# Snakemake runs this inside the new environment right after creating it from cxrssl.yaml: install
# the cxrssl package of this checkout (editable, so the environment follows code changes). Snakemake
# runs it in the workflow's working directory; set CXRSSL_SOURCE when that is not the checkout.
set -euo pipefail
src=${CXRSSL_SOURCE:-$PWD}
if [ ! -f "$src/pyproject.toml" ] || [ ! -d "$src/src/cxrssl" ]; then
    echo "cxrssl post-deploy: $src is not the cxrssl checkout; set CXRSSL_SOURCE=/path/to/checkout" >&2
    exit 1
fi
python -m pip install --no-deps --no-build-isolation -e "$src"
