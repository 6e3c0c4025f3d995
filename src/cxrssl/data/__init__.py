"""Data preparation: DICOM reading and conversion (VinDr-CXR), NIH ChestX-ray14 indexing.

Submodules are imported on demand (``cxrssl.data.dicom``, ``cxrssl.data.convert``,
``cxrssl.data.nih``, ``cxrssl.data.annotations``) so that importing one stage does not pull in the
image libraries of another.
"""
