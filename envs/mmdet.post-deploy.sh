#!/usr/bin/env bash
# Snakemake runs this inside the new environment right after creating it from mmdet.yaml: install the
# mmcv wheel with compiled ops ($MMCV_WHEEL, built by `make mmcv`; PyPI has only an sdist that does
# not compile against torch 2.14), then this checkout's cxrssl package (editable, no dependencies).
set -euo pipefail
src=${CXRSSL_SOURCE:-$PWD}
if [ ! -f "$src/pyproject.toml" ] || [ ! -d "$src/src/cxrssl" ]; then
    echo "mmdet post-deploy: $src is not the cxrssl checkout; set CXRSSL_SOURCE=/path/to/checkout" >&2
    exit 1
fi
if [ -z "${MMCV_WHEEL:-}" ] || [ ! -f "$MMCV_WHEEL" ]; then
    echo "mmdet post-deploy: set MMCV_WHEEL to an mmcv-2.1.0 wheel with compiled ops (make mmcv)" >&2
    exit 1
fi
python -m pip install --no-deps "$MMCV_WHEEL"
python -m pip install --no-deps --no-build-isolation -e "$src"
