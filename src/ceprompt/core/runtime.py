"""Where and how a job runs: device, precision and autocast, processes (torchrun), seeds and determinism.

Process infrastructure shared by training, evaluation and inference (below ``api`` and ``engine``)."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np
import torch
import torch.distributed as dist

from .errors import CepromptError, ConfigError

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32, bf16 or fp16: autocast dtype; parameters always stay fp32
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    saved: dict[str, Any] | None = None  # process-wide settings setup_runtime changed, restored by teardown

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

    def from_main(self, load: Callable[[], Any]) -> Any:
        """``load()`` run on rank 0 only and its value sent to every process: a file only rank 0 wrote (a
        checkpoint, the resume state) is read once, and other nodes need no shared storage to get it. A
        CepromptError on rank 0 is raised on every rank."""
        if not self.distributed:
            return load()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box = [("value", load())]
            except CepromptError as exc:
                box = [("error", (type(exc), str(exc)))]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value[0](value[1])
        return value

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


def resolve_device(name: str, local_rank: int = 0, local_world: int = 1) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` (under torchrun: this process's GPU, ``cuda:LOCAL_RANK``) or ``cuda:N``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
        if name != "cuda" and local_world > 1:  # every process would take the same GPU
            raise ConfigError(f"--device {name} under torchrun with {local_world} processes on this node: each "
                              "process takes its own GPU (cuda:LOCAL_RANK); pass --device cuda, and choose the "
                              "GPUs with CUDA_VISIBLE_DEVICES")
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
        # torch.cuda.is_bf16_supported() says yes before Ampere too (it counts emulation, slow there) and asks
        # about the current GPU, not this one: the device's own compute capability decides
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bf16", f"compute capability {major}.{minor} computes bf16 natively"
        return "fp16", (f"compute capability {major}.{minor} has no native bf16; fp16 with a loss scaler in "
                        "training")
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


DEFAULT_DIST_TIMEOUT_MINUTES = 60.0  # rank 0 checks every image while the others wait in the first collective


def dist_timeout() -> datetime.timedelta:
    """How long a collective may wait: ``$CEPROMPT_DIST_TIMEOUT_MINUTES`` (default 60, not torch's 10: checking
    AffectNet's 280k images on network storage takes longer than that)."""
    raw = os.environ.get("CEPROMPT_DIST_TIMEOUT_MINUTES", "")
    try:
        minutes = float(raw) if raw else DEFAULT_DIST_TIMEOUT_MINUTES
    except ValueError:
        raise ConfigError(f"CEPROMPT_DIST_TIMEOUT_MINUTES={raw!r}; expected a number of minutes") from None
    if not 0 < minutes <= 7 * 24 * 60:
        raise ConfigError(f"CEPROMPT_DIST_TIMEOUT_MINUTES={raw!r}; expected minutes in (0, 10080]")
    return datetime.timedelta(minutes=minutes)


def setup_runtime(device: str = "auto", precision: str = "auto", deterministic: bool = False) -> Runtime:
    """Join the torchrun process group when launched by torchrun (once per process); pick the device and precision.

    Numerics are the same for every verb (train, eval, predict, serve: torch's own TF32 defaults, never changed);
    what a job switches on for itself (cuDNN autotuning, deterministic algorithms) is switched back by
    :func:`teardown_runtime`, so ``ceprompt.train()`` leaves the process as it found it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = resolve_device(device, local_rank, local_world)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # joined once per process and left at exit: a script under torchrun may run several verbs one after another,
        # and a group left and joined again reads the old group's addresses from torchrun's store and cannot connect
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=dist_timeout())
        atexit.register(_leave_group)
    saved = {"deterministic": torch.are_deterministic_algorithms_enabled(),
             "cudnn_benchmark": torch.backends.cudnn.benchmark,
             "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotuning once pays
    return Runtime(device=dev, precision=resolve_precision(precision, dev), rank=rank, world=world,
                   local_rank=local_rank, saved=saved)


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def teardown_runtime(rt: Runtime) -> None:
    """Switch back what :func:`setup_runtime` switched on for the job (the process group stays, see there)."""
    if rt.saved:
        torch.use_deterministic_algorithms(rt.saved["deterministic"])
        torch.backends.cudnn.benchmark = rt.saved["cudnn_benchmark"]
        if rt.saved["cublas_workspace"] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


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
