"""What the speed benchmark's cases share: timing, autocast, the random models and batches."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ceprompt.model.clip import build_clip, get_arch
from ceprompt.model.head import HeadConfig
from ceprompt.model.stage import BuildOptions, ClassWords, Stage, TrainBatch
from ceprompt.model.stages import stage_class

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["surprise", "fear", "disgust", "happy", "sad", "anger", "neutral"]
PRECISIONS = ("fp32", "bf16")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_description() -> tuple[str, list[str]]:
    """(model name, the flags of :data:`CPU_FLAGS` it has): which CPU a result was measured on."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model, [f for f in CPU_FLAGS if f in flags]


def autocast(device: str, precision: str):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def throughput(fn: Callable[[], None], images_per_call: int, calls: int, device: str = "cpu", warmup: int = 1) -> float:
    """Images per second of the median call (shared machines drift; the median resists it)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(calls, 1)):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return images_per_call / statistics.median(times)


def interleaved(cases: dict[str, tuple[Callable[[], None], int]], rounds: int, device: str = "cpu") -> dict[str, float]:
    """Images per second of each case, ``{name: (call, images per call)}``: each is warmed up once, then the
    cases take turns for ``rounds`` rounds and the median call counts. Taking turns makes a shared machine's
    drift hit every case alike, so the ratios between them hold even when the absolute figures move."""
    for fn, _ in cases.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(max(rounds, 1)):
        for name, (fn, _) in cases.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: images / statistics.median(times[name]) for name, (_, images) in cases.items()}


def peak_memory_reset(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return None


def head_for(arch: str) -> HeadConfig:
    return HeadConfig(top_k=min(16, get_arch(arch).num_patches))


def batch_for(arch: str, n: int, device: str) -> TrainBatch:
    """A training batch; each image its own repeatable view (sample i, not flipped) for the teacher cache."""
    size = get_arch(arch).image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g).to(device)
    return TrainBatch(images, labels, torch.arange(n), torch.zeros(n, dtype=torch.long))


def stage_model(name: str, arch: str, device: str, training: bool = True, grad_checkpointing: bool = False,
                teacher_cache: bool = True, **settings) -> Stage:
    """A stage of the registry on random weights of ``arch``, built as the trainer builds it."""
    cls = stage_class(name)
    section = cls.settings_type(**settings)
    section.fill_compat(authors=False)
    options = BuildOptions(training=training, grad_checkpointing=grad_checkpointing, teacher_cache=teacher_cache)
    return cls.build(build_clip(arch, seed=0), section, head_for(arch), ClassWords.of(CLASSES), options).to(device)


def stage1_model(arch: str, device: str, kd_weight: float = 1.0, **options) -> Stage:
    return stage_model("eva", arch, device, training=kd_weight > 0, kd_weight=kd_weight, **options)


def stage2_model(arch: str, device: str, **options) -> Stage:
    depth = min(9, get_arch(arch).vision_layers, get_arch(arch).text_layers)
    return stage_model("cat", arch, device, prompt_depth=depth, **options)


# A process that keeps one core busy (a shared machine) and ends with the benchmark that started it, even when
# that one is killed: it spins only while its parent lives.
BUSY_NEIGHBOUR = [sys.executable, "-c", "import os, sys\nwhile os.getppid() == int(sys.argv[1]):\n    pass",
                  str(os.getpid())]
