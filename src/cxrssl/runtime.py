"""Run plumbing shared by every training loop (pretraining, linear evaluation, detection).

One place for what each loop needs and must do alike:

* **Processes**: :func:`init_distributed` reads torchrun's (or SLURM's) rank variables and starts
  nccl (CUDA) or gloo (CPU); :class:`AllReduceBatchNorm` / :func:`sync_batchnorm` normalise over
  the batch of every rank.
* **Threads**: :func:`configure_threads` fixes torch's intra- and inter-op thread counts, so a CPU
  result does not depend on how many cores the scheduler happened to give the job.
* **RNG state**: :func:`rng_state` / :func:`set_rng_state` capture Python, NumPy, torch and CUDA
  generators as plain tensors, lists and numbers, so checkpoints load with ``weights_only=True``.
* **Fingerprints**: :func:`sha256_file` and :func:`fingerprint` hash what determines a run's
  result, so a resume only continues a run made with the same settings, data and initial weights.
* **Checkpoints**: :func:`save_checkpoint` writes atomically; :func:`load_checkpoint` never
  unpickles code (``weights_only=True``) and turns any file it refuses into a
  :class:`~cxrssl.errors.BadInputError` naming the file. No file's content is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from cxrssl.errors import BadInputError
from cxrssl.io import atomic_torch_save

log = logging.getLogger(__name__)


# --- processes ----------------------------------------------------------------------------------

def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Autograd-aware sum over ranks: the backward pass sums every rank's gradient.

    ``torch.distributed.nn.functional.all_reduce`` is the public differentiable collective; torch
    2.14 flags it in favour of a private module, so that warning is silenced here only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_reduce is deprecated.*")
        return dist_fn.all_reduce(x)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Autograd-aware concatenation of every rank's ``x`` along dim 0 (``x`` itself with one process).

    Gradients flow back to each rank's own slice, so contrastive losses that use the other ranks'
    samples as negatives train like one process with the whole batch.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather is deprecated.*")
        return torch.cat(dist_fn.all_gather(x), dim=0)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _rank_env() -> tuple[int, int, int]:
    """(world, rank, local rank) from torchrun's variables, else SLURM's (srun-launched tasks)."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"]), int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
    return 1, 0, 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Start the process group when there is more than one process; pick this rank's device.

    Ranks come from torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or from srun-launched
    SLURM tasks (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` with ``MASTER_ADDR`` /
    ``MASTER_PORT`` set by the job: the rules' ``torch_launcher``). ``device``: ``cpu``, ``cuda``,
    ``cuda:N`` or None (CUDA when available); with several processes each takes
    ``cuda:LOCAL_RANK``, modulo the GPUs it sees (a task that SLURM bound to one GPU sees it as 0).
    """
    world, rank, local = _rank_env()
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available")
        dev = (torch.device("cuda", local % torch.cuda.device_count()) if world > 1 or kind == "cuda"
               else torch.device(kind))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        log.info("rank %d/%d on %s (%s)", rank, world, dev, dist.get_backend())
    return DistInfo(rank, world, local, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj: Any, world_size: int) -> list:
    """Every rank's ``obj`` (a list of one without a process group)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batch of all ranks (any device, any backend), autograd-aware.

    ``torch.nn.SyncBatchNorm`` only runs on accelerators; on CPU (gloo) every BatchNorm becomes
    this one, so DDP on CPU trains exactly like one process with the whole batch. Same
    parameters and buffers as ``BatchNorm1d/2d``, so state dicts stay torchvision's. Without a
    process group it is plain batch norm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        # two passes (mean, then squared deviations): as exact as single-process batch norm
        stats = all_reduce_sum(torch.cat([x.sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        shape = [1, c] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / n  # biased, used to normalise
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Synchronise every BatchNorm across ranks: SyncBatchNorm on accelerators, else all-reduce BN."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
        if module.track_running_stats:
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
            out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out


# --- threads ------------------------------------------------------------------------------------

def configure_threads(threads: int | None, world_size: int | None = None) -> int:
    """Fix torch's CPU thread counts for this process; returns the intra-op count.

    ``threads`` is the job's budget shared by all ranks on the node (None: leave torch's
    default); ``world_size`` defaults to torchrun's ``LOCAL_WORLD_SIZE`` (1 without it: one
    process, or srun-launched SLURM tasks, each with CPUs of its own). CPU reductions split their
    work by thread count, so the count is part of what makes a CPU result reproducible: rules
    pass a count from the config, never the number of cores a scheduler happened to grant. The
    inter-op pool gets one thread (the loops here run no parallel graph branches).
    """
    if not threads:
        return torch.get_num_threads()
    if world_size is None:
        world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = max(1, int(threads) // max(1, world_size))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started: keep what is there
        pass
    return n


# --- RNG state ------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors, lists and numbers only."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    random.setstate(_to_tuples(state["python"]))


def _to_lists(obj):
    return [_to_lists(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuples(obj):
    return tuple(_to_tuples(o) for o in obj) if isinstance(obj, list) else obj


# --- fingerprints ---------------------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(parts: dict[str, Any], files: dict[str, str | Path | None] | None = None) -> str:
    """SHA-256 of ``parts`` (JSON, keys sorted) and of the content of each existing file in ``files``.

    ``files`` maps a name to a path (or to a non-path value such as ``"random"``, which is
    hashed as text): initial weights and data files whose content, not name, decides the result.
    """
    keyed = dict(parts)
    for name, value in (files or {}).items():
        if value is not None and Path(str(value)).is_file():
            keyed[name] = sha256_file(value)
        else:
            keyed[name] = None if value is None else str(value)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()


# --- checkpoints ----------------------------------------------------------------------------------

def save_checkpoint(obj: dict, path: str | Path) -> None:
    """``torch.save`` through a temporary file: a kill mid-write leaves the previous file intact.

    Only tensors, containers and plain values belong in ``obj`` (what :func:`load_checkpoint`
    accepts); metadata that another program rebuilds a model from is JSON-able data, never code.
    """
    atomic_torch_save(obj, path)


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """Load a checkpoint without unpickling code; refusals become a BadInputError naming ``path``.

    ``weights_only=True`` admits tensors, containers and plain values; a file holding anything
    else (a pickled object, a payload that would run code) is refused, as is a file that is not
    a torch checkpoint at all (truncated, empty, another format). ``what`` says in the message
    what the file was supposed to be (e.g. "resume checkpoint", "backbone checkpoint").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ValueError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(
            str(path),
            f"not a loadable {what}: only tensors and plain data are accepted, code and pickled "
            f"objects are refused ({type(exc).__name__}: {first[:300]})",
        ) from None


class CompileError(RuntimeError):
    """``torch.compile`` could not compile a model the config asked to compile (no silent eager fallback)."""


def compile_module(module: nn.Module, setting: str, device: torch.device, mode: str | None = None,
                   backend: str = "inductor") -> nn.Module:
    """Compile ``module`` in place (``nn.Module.compile``: its state dict keys stay as they are).

    ``setting`` names the config key (``pretrain.compile``) for the messages. Compilation is lazy
    (first call); :func:`compile_failure` turns a failure there into a :class:`CompileError`. The
    inductor backend needs a C compiler on a CPU: checked here so a run fails before its first step.
    """
    import shutil

    if backend == "inductor" and device.type == "cpu" and not (os.environ.get("CC") or shutil.which("gcc")
                                                               or shutil.which("cc") or shutil.which("clang")):
        raise CompileError(f"{setting}: torch.compile's inductor backend needs a C compiler on a CPU (gcc/cc/clang "
                           f"or $CC) and none was found; install one or set {setting}: false")
    module.compile(mode=mode, backend=backend)
    log.info("%s: model compiled with torch.compile (backend %s, mode %s); the first steps compile", setting,
             backend, mode or "default")
    return module


def compile_failure(setting: str, error: BaseException) -> CompileError | None:
    """A :class:`CompileError` for ``error`` when it came from torch.compile (else None)."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    if isinstance(error, TorchDynamoException):
        return CompileError(f"{setting}: torch.compile failed ({type(error).__name__}: {str(error)[:500]}); "
                            f"set {setting}: false to train eagerly")
    return None
