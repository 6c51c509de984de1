"""Where and how a job runs: device, precision and autocast, processes (torchrun), seeds and determinism.

Process infrastructure shared by training, evaluation and inference (below ``api`` and ``engine``)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, ContextManager

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32, bf16 or fp16: autocast dtype; parameters always stay fp32
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> ContextManager:
        return autocast(self.device, self.precision)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (a one-element list when not distributed)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj`` on rank 0 (in rank order), None on the others: less traffic than :meth:`gather`."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()


def autocast(device: torch.device, precision: str) -> ContextManager:
    """Autocast to ``precision`` on ``device`` (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
        return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device {name!r}; expected auto, cpu, cuda or cuda:N")


# torch's own CPU probes, by the name of the feature they find (private, hence looked up with a default).
CPU_BF16_PROBES = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))


def cpu_bf16_features() -> list[str]:
    """The instruction sets that give this CPU native bf16 matrix products (AMX, AVX512-BF16). Without one,
    bf16 is emulated and slower than fp32."""
    return [name for name, probe in CPU_BF16_PROBES if getattr(torch.cpu, probe, lambda: False)()]


def auto_precision(device: torch.device) -> tuple[str, str]:
    """What ``precision: auto`` picks on ``device``, and why."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU supports bf16"
        return "fp32", "the GPU has no bf16"
    if device.type == "cpu":
        native = cpu_bf16_features()
        if native:
            return "bf16", f"the CPU multiplies bf16 natively ({', '.join(native)})"
        return "fp32", "the CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated, slower than fp32)"
    return "fp32", f"no bf16 policy for {device.type} devices"


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` (see :func:`auto_precision`) or a forced fp32, bf16 or fp16."""
    if name == "auto":
        return auto_precision(device)[0]
    if name not in DTYPES:
        raise ConfigError(f"precision {name!r}; expected auto, fp32, bf16 or fp16")
    return name


def setup_runtime(device: str = "auto", precision: str = "auto", deterministic: bool = False) -> Runtime:
    """Join the torchrun process group when launched by torchrun; pick the device and precision."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    return Runtime(device=dev, precision=resolve_precision(precision, dev), rank=rank, world=world,
                   local_rank=local_rank)


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def usable_workers(requested: int) -> int:
    """Loader processes: as asked, but no more than the CPUs this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(requested, cpus))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed for one process's epoch: a resumed run reseeds to exactly what it would have had."""
    return (seed + rank) * 100_003 + epoch
