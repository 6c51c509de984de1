"""How many CPU threads a job uses: the cores this process may really use, less those others keep busy.

Why not torch's default (one thread per core it sees)? Measured on 2 shared cores (README,
``benchmarks/threads.py``): with another process keeping one core busy, two OpenMP threads ran a tiny
training 3-4x slower than one thread, because every parallel region waits for the thread that shares
its core with the neighbour (and spins while it waits). On an idle machine two threads are 1.3-1.5x
faster than one. So the default is chosen from what is free now:

* usable cores: the CPU affinity mask, capped by a cgroup CPU quota (containers often see every core
  of the host but may only use a few);
* minus the cores other processes keep busy, sampled from ``/proc/stat`` for 0.1 s (our own CPU time
  is subtracted; data-loader worker processes count as load, so they are counted against the threads);
* at least one thread. Training re-checks at every epoch and adapts; a recognizer (predict, serve, live, the
  Python API) re-checks before its work at most every :data:`RECHECK_SECONDS`.

Why a recognizer must follow the load: one face at a time is many small parallel regions per image, and each
waits for its slowest thread. Measured on 2 shared Zen 4 cores (``benchmarks/speed.py``, README): ViT-B/16 in
bf16 at batch 1 ran at the same per-face speed as at batch 16 on an idle machine, but with two other processes
busy it ran 2.5-3.8x slower per face than at batch 16 on two threads, and 1.0-1.1x on one.

``--threads N`` (``run.threads``) or ``OMP_NUM_THREADS`` fix the count instead.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
SAMPLE_SECONDS = 0.1
RECHECK_SECONDS = 2.0  # a service's calls: /proc/stat read at most this often (about 50 us a read)
_CHOICE_TTL = 30.0  # a process that starts several jobs in a row reuses a recent choice
_last_choice: tuple[float, int, str] | None = None


def affinity_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup CPU quota in cores (cgroup v2 ``cpu.max`` or v1 CFS files), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """Cores this process may run on: affinity, capped by the cgroup quota, shared with the other
    processes torchrun started on this machine (at least 1)."""
    cores = len(affinity_cpus())
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota + 1e-9)))
    local_world = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if local_world.isdigit() and int(local_world) > 1:
        cores //= int(local_world)
    return max(1, cores)


@dataclass(frozen=True)
class CpuSample:
    """CPU time on our cores (busy and total ticks) and our own CPU seconds, at one moment."""

    busy: int
    total: int
    own: float
    wall: float

    @classmethod
    def now(cls) -> "CpuSample | None":
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        wanted = {f"cpu{i}" for i in affinity_cpus()}
        busy = total = 0
        for line in lines:
            parts = line.split()
            if not parts or parts[0] not in wanted:
                continue
            values = [int(v) for v in parts[1:9]]  # user nice system idle iowait irq softirq steal
            total += sum(values)
            busy += sum(values) - values[3] - values[4]  # steal counts as busy: the host took it
        if total == 0:
            return None
        return cls(busy, total, time.process_time(), time.monotonic())

    def others_busy(self, later: "CpuSample") -> float:
        """Cores kept busy by other processes between the two samples (ours subtracted)."""
        total = later.total - self.total
        if total <= 0:
            return 0.0
        n_cpus = len(affinity_cpus())
        busy_cores = (later.busy - self.busy) / total * n_cpus
        own_cores = (later.own - self.own) / max(later.wall - self.wall, 1e-6)
        return max(0.0, busy_cores - own_cores)


def free_threads(others_busy: float, usable: int) -> int:
    """Threads for the cores others leave free: a core counts as taken when it is busy half the time."""
    return max(1, min(usable, usable - math.floor(others_busy + 0.5)))


def choose_threads(sample_seconds: float = SAMPLE_SECONDS) -> tuple[int, str]:
    """(threads, why) for a job starting now."""
    global _last_choice
    if _last_choice and time.monotonic() - _last_choice[0] < _CHOICE_TTL:
        return _last_choice[1], _last_choice[2]
    usable = usable_cpus()
    first = CpuSample.now()
    if first is None or usable == 1:
        threads, why = usable, f"{usable} usable core(s)"
    else:
        time.sleep(sample_seconds)
        second = CpuSample.now()
        busy = first.others_busy(second) if second else 0.0
        threads = free_threads(busy, usable)
        why = f"{usable} usable core(s), {busy:.1f} busy with other work"
    _last_choice = (time.monotonic(), threads, why)
    return threads, why


def set_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads: ``requested`` if > 0, else ``OMP_NUM_THREADS`` if set, else
    :func:`choose_threads`. Returns the count in force."""
    import torch

    if requested:
        threads, why = requested, "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        threads, why = choose_threads()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # ceprompt runs no inter-op parallel work; idle pools only compete
    except RuntimeError:  # already set, or parallel work has started: harmless
        pass
    log.debug("using %d CPU thread(s) (%s)", threads, why)
    return threads


class ThreadGovernor:
    """A long job's thread count: fixed when the user chose it, else re-chosen at each :meth:`recheck` (training:
    every epoch; the demo CLIP's pretraining: every few seconds; a recognizer: :meth:`follow` before each batch)
    from the load other processes put on our cores since the previous one.

    With ``adapt=False`` (``--deterministic``: results depend on the thread count, since torch's CPU
    kernels split some sums per thread) the count is every usable core, whatever the load.
    """

    def __init__(self, requested: int | None, adapt: bool = True, every: float = 0.0) -> None:
        self.every = every
        self._lock = threading.Lock()  # several server threads may follow at once
        self.fixed = bool(requested) or "OMP_NUM_THREADS" in os.environ or not adapt
        self.usable = usable_cpus()
        self.threads = set_threads(requested or (None if adapt else self.usable))
        self.sample = CpuSample.now()
        self.busy = 0.0  # cores other processes kept busy over the last interval (measured when adapting)

    def recheck(self) -> int:
        import torch

        if self.fixed or self.sample is None:
            return self.threads
        now = CpuSample.now()
        if now is None:
            return self.threads
        self.busy = self.sample.others_busy(now)
        self.sample = now
        threads = free_threads(self.busy, self.usable)
        if threads != self.threads:
            log.info("CPU threads %d -> %d (%.1f of %d cores busy with other work)", self.threads, threads,
                     self.busy, self.usable)
            torch.set_num_threads(threads)
            self.threads = threads
        return self.threads

    def follow(self) -> int:
        """Before a short piece of work, in the thread that will run it: re-check the load when :attr:`every`
        seconds have passed since the last check, and make this thread's count the chosen one (torch's thread
        count is kept per calling thread: a server's worker thread does not see a count set elsewhere)."""
        import torch

        if not self.fixed and self.sample is not None and time.monotonic() - self.sample.wall >= self.every:
            with self._lock:
                if time.monotonic() - self.sample.wall >= self.every:
                    self.recheck()
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads

    def why_slow(self) -> str:
        """Why the job may run slower than on an idle machine, or ``""``."""
        if self.busy >= 0.5:
            return (f"other processes keep {self.busy:.1f} of {self.usable} cores busy, so it runs on "
                    f"{self.threads} thread(s)")
        return ""
