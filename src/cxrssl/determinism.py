"""Same result on every machine of a kind: pin the CPU kernels before torch is imported.

torch picks its vectorised CPU kernels (ATen), oneDNN its convolutions and MKL its matrix
products by the vector units of the processor it runs on. Two x86 machines of one kind, one with
AVX-512 and one without, then add the same numbers in different orders, and a training run
drifts apart after a few hundred steps. :func:`pin_cpu_kernels` sets, unless the user already
set them:

* ``ATEN_CPU_CAPABILITY=avx2``: torch's own kernels use the AVX2 code path;
* ``DNNL_MAX_CPU_ISA=AVX2``: oneDNN (convolutions) uses at most AVX2;
* ``MKL_CBWR=AVX2,STRICT``: MKL's conditional numerical reproducibility mode for AVX2 machines
  (matrix products give bit-identical results on any AVX2 processor, Intel or AMD).

They take effect only when set before torch (and MKL, oneDNN) load, which is why ``cxrssl``
sets them on import and the scripts import ``cxrssl`` first. On processors without AVX2 (or
not x86) nothing is set. ``CXRSSL_PIN_CPU=0`` turns the pinning off (for speed measurements).
Thread counts are the other half (:func:`cxrssl.runtime.configure_threads`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}


def _has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return " avx2" in line
    except OSError:
        return False
    return False


def pin_cpu_kernels() -> dict[str, str]:
    """Set the variables of :data:`PINNED` that are not set yet; returns those now in effect."""
    if os.environ.get("CXRSSL_PIN_CPU", "1").lower() in ("0", "false", "no") or not _has_avx2():
        return {}
    for key, value in PINNED.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in PINNED}


def _cache_sizes() -> str:
    """``L1d 48K L2 2048K L3 491520K`` of cpu0 (Linux sysfs), or '' where it is not readable."""
    out = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            out.append(f"L{level}{'d' if kind == 'Data' else ''} {size}")
    return " ".join(out)


def _cpu_model() -> str:
    fields = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "cpu family", "model", "stepping") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        return platform.processor() or "unknown processor"
    if not fields:
        return platform.processor() or "unknown processor"
    return f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')} " \
           f"stepping {fields.get('stepping', '?')}"


def machine_kind() -> str:
    """What a CPU run's floats depend on beyond the config and seed: the processor (vendor, family,
    model, stepping), its caches (oneDNN sizes its convolution blocks to them), the kernels in use
    (pinned or native) and the torch version. Two runs with the same string compute the same numbers."""
    import importlib.metadata

    pinned = {k: os.environ.get(k) for k in PINNED}
    kernels = "AVX2 kernels (pinned)" if pinned == PINNED else "native kernels"
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    caches = _cache_sizes()
    return ", ".join(p for p in (f"{platform.machine()} {_cpu_model()}", f"caches {caches}" if caches else "",
                                 kernels, f"torch {torch_version}") if p)
