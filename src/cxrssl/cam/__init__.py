"""Detector heatmaps: fast Ablation-CAM / EigenCAM through grad-cam, per-run PNGs and panels.

Names are imported lazily so that ``rules/heatmaps.smk`` can use :mod:`cxrssl.cam.names` without
loading torch and grad-cam while Snakemake builds the DAG.
"""

from importlib import import_module

_EXPORTS = {
    "FastAblationCAM": "ablation", "FPNReshape": "ablation", "fpn_reshape_transform": "ablation",
    "top_channels": "ablation", "PaddingAwareCAM": "ablation", "PaddedEigenCAM": "ablation",
    "PaddedAblationCAM": "ablation",
    "CamResult": "heatmaps", "compute_cam": "heatmaps", "library_ablation_cam": "heatmaps", "load_model": "heatmaps",
    "make_panel": "heatmaps", "render_run": "heatmaps", "select_images": "heatmaps", "geometry_of": "heatmaps",
    "heatmap_name": "names", "n_heatmaps": "names",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"cxrssl.cam.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cxrssl.cam' has no attribute {name!r}")
