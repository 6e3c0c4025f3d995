"""Build mmcv 2.1.0 with compiled ops for the mmdet engine (``make mmcv``).

PyPI carries only mmcv's source distribution, and as published it does not compile against
torch 2.14: its setup.py forces ``-std=c++14``/``-std=c++17`` while torch's headers need C++20. The
recipe (../shared/wheels/BUILD.md): download the sdist, switch those flags to ``-std=c++20``, build
with ``MMCV_WITH_OPS=1`` and ``--no-build-isolation`` (against the installed torch) using
setuptools < 70 (mmcv's setup.py imports ``pkg_resources``). The old setuptools goes into a private
overlay folder on PYTHONPATH, so the project's environment is not downgraded. CUDA kernels are
built (``FORCE_CUDA=1``) when nvcc and a CUDA build of torch are present; otherwise CPU ops only.
About 12 minutes on 2 cores for CPU ops, much longer with CUDA.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

from cxrssl.io import atomic_write_text

log = logging.getLogger(__name__)

MMCV_VERSION = "2.1.0"
BUILD_REQUIREMENTS = ("setuptools<70", "wheel", "ninja")
_STD_FLAG = re.compile(r"([-/]std[=:]c\+\+)(?:14|17)(?!\d)")


def patch_cxx_standard(text: str) -> tuple[str, int]:
    """Replace ``-std=c++14``/``-std=c++17`` (and MSVC's ``/std:c++14|17``) by C++20."""
    return _STD_FLAG.subn(r"\g<1>20", text)


def patch_setup_py(path: str | Path) -> int:
    """Patch mmcv's setup.py in place; returns the number of flags changed (0 if already patched)."""
    path = Path(path)
    text = path.read_text()
    new, count = patch_cxx_standard(text)
    if count == 0 and "c++20" not in text:
        raise RuntimeError(f"{path}: found no -std=c++14/-std=c++17 flag to raise to C++20; this mmcv source "
                           "differs from 2.1.0 (see ../shared/wheels/BUILD.md)")
    if count:
        atomic_write_text(new, path)
    log.info("%s: %d C++ standard flag(s) set to c++20", path, count)
    return count


def find_nvcc() -> str | None:
    """nvcc on PATH or under CUDA_HOME/CUDA_PATH."""
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def want_cuda(mode: str = "auto", nvcc: str | None = None, torch_cuda: str | None = None) -> bool:
    """Whether to build CUDA kernels: ``auto`` when nvcc and a CUDA torch are present."""
    if mode == "no":
        return False
    if mode not in ("auto", "yes"):
        raise ValueError(f"cuda must be auto, yes or no, got {mode!r}")
    ok = nvcc is not None and torch_cuda is not None
    if mode == "yes" and not ok:
        raise RuntimeError(f"--cuda yes needs nvcc (found: {nvcc}) and a CUDA build of torch "
                           f"(torch.version.cuda: {torch_cuda})")
    return ok


def build_environment(base: dict[str, str], cuda: bool, jobs: int, overlay: Path | None) -> dict[str, str]:
    """Environment of the ``pip wheel`` call."""
    env = dict(base)
    env["MMCV_WITH_OPS"] = "1"
    env["MAX_JOBS"] = str(jobs)
    if cuda:
        env["FORCE_CUDA"] = "1"
    else:
        env["FORCE_CUDA"] = "0"
        # mmcv builds CUDA ops whenever torch sees a GPU; without nvcc that build would fail.
        env["CUDA_VISIBLE_DEVICES"] = ""
    if overlay is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(overlay), *filter(None, [base.get("PYTHONPATH")])])
        env["PATH"] = os.pathsep.join([str(overlay / "bin"), base.get("PATH", "")])
    return env


def _run(cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
    """Run a command, streaming its output into the log; raise naming it on failure."""
    log.info("$ %s", " ".join(cmd))
    with subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.info("  %s", line.rstrip())
    if proc.returncode:
        raise RuntimeError(f"command failed with exit status {proc.returncode}: {' '.join(cmd)}")


def _setuptools_ok() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("setuptools").split(".")[0]) < 70
    except PackageNotFoundError:
        return False


def _extract_data(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract ``tar`` under ``dest`` with tarfile's "data" filter; on Pythons before it existed
    (3.11.0-3.11.3, e.g. Debian 12's 3.11.2), refuse the same dangers by hand: members outside
    ``dest`` (absolute paths, ``..``), links, devices."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or os.path.isabs(member.name) or (
                target != root and root not in target.parents):
            raise RuntimeError(f"{tar.name}: refusing to extract {member.name!r} (outside the folder or not a plain "
                               "file or folder)")
    tar.extractall(dest)


def build_mmcv(out_dir: str | Path, work_dir: str | Path, sdist: str | Path | None = None, cuda: str = "auto",
               jobs: int | None = None, run: Callable[..., None] = _run) -> Path:
    """Download (unless ``sdist`` is given), patch and build the mmcv wheel; returns its path."""
    import torch

    out_dir, work_dir = Path(out_dir).resolve(), Path(work_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    nvcc = find_nvcc()
    use_cuda = want_cuda(cuda, nvcc, torch.version.cuda)
    jobs = jobs or os.cpu_count() or 1
    log.info("torch %s (CUDA %s), nvcc %s -> building %s ops with %d jobs", torch.__version__, torch.version.cuda,
             nvcc, "CUDA + CPU" if use_cuda else "CPU", jobs)

    if sdist is None:
        run([*pip, "download", "--no-deps", "--no-binary", ":all:", f"mmcv=={MMCV_VERSION}", "-d", str(work_dir)])
        found = sorted(work_dir.glob(f"mmcv-{MMCV_VERSION}.tar.gz"))
        if not found:
            raise RuntimeError(f"pip download left no mmcv-{MMCV_VERSION}.tar.gz in {work_dir}")
        sdist = found[0]
    sdist = Path(sdist)
    src = work_dir / f"mmcv-{MMCV_VERSION}"
    if src.exists():
        shutil.rmtree(src)
    with tarfile.open(sdist) as tar:
        _extract_data(tar, Path(work_dir))
    if not (src / "setup.py").is_file():
        raise RuntimeError(f"{sdist}: no mmcv-{MMCV_VERSION}/setup.py inside")
    patch_setup_py(src / "setup.py")

    overlay = None
    if not _setuptools_ok():
        overlay = work_dir / "build-tools"
        run([*pip, "install", "--target", str(overlay), "--upgrade", *BUILD_REQUIREMENTS])
    env = build_environment(dict(os.environ), use_cuda, jobs, overlay)
    before = set(out_dir.glob(f"mmcv-{MMCV_VERSION}-*.whl"))
    run([*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(out_dir), str(src)], env=env)
    wheels = sorted(set(out_dir.glob(f"mmcv-{MMCV_VERSION}-*.whl")) - before) or sorted(
        out_dir.glob(f"mmcv-{MMCV_VERSION}-*.whl"))
    if not wheels:
        raise RuntimeError(f"the build finished but left no mmcv-{MMCV_VERSION} wheel in {out_dir}")
    log.info("built %s; install it with `make install-mmdet MMCV_WHEEL=%s`", wheels[-1], wheels[-1])
    return wheels[-1]
