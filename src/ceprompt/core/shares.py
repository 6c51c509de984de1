"""Work split into shares: what makes a long job resumable and lets torchrun's processes divide it.

An inference job over many inputs (``predict``, ``embed``) is cut into **shares**: runs of consecutive images, and
every video on its own. A share is always computed the same way (the same batches), whichever process takes it,
so the output does not depend on how many processes ran. Each finished share is kept beside the output, in a
hidden folder (``.NAME.ceprompt-parts/``), until the whole output is written from them in order; a job that is
interrupted and started again with the same inputs and settings skips the shares it finished.

Under torchrun the shares are dealt to the processes by cost (bytes of image, frames of video), the largest first,
each to the least loaded process. At the end every process sends its finished shares to rank 0, one at a time,
through the process group: nothing assumes the nodes share storage (each keeps its own parts folder), and rank 0
alone writes the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .io_utils import atomic_write
from .runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Share:
    number: int  # position in the output: shares are written in this order
    items: tuple[int, ...]  # the inputs it covers (indices into the job's input list)
    cost: float  # for dealing shares to processes (bytes, frames)


def plan_shares(costs: Sequence[float], alone: Sequence[bool], group: int) -> list[Share]:
    """Consecutive inputs ``group`` at a time, each input marked ``alone`` (a video) in a share of its own."""
    shares: list[Share] = []
    run: list[int] = []

    def close() -> None:
        if run:
            shares.append(Share(len(shares), tuple(run), float(sum(costs[i] for i in run))))
            run.clear()

    for index, single in enumerate(alone):
        if single:
            close()
            run.append(index)
            close()
            continue
        run.append(index)
        if len(run) >= group:
            close()
    close()
    return shares


def deal(shares: Sequence[Share], world: int) -> list[list[Share]]:
    """Each process's shares: the costliest first, each to the process with the least work so far (ties by rank),
    then in output order."""
    load, dealt = [0.0] * world, [[] for _ in range(world)]
    for share in sorted(shares, key=lambda s: (-s.cost, s.number)):
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += share.cost
        dealt[rank].append(share)
    return [sorted(mine, key=lambda s: s.number) for mine in dealt]


def job_key(**parts: Any) -> str:
    """A fingerprint of what a job computes (inputs with their sizes and times, model, settings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class ShareStore:
    """The finished shares of one output, beside it until the output is written."""

    def __init__(self, output: Path, key: str, suffix: str = ".jsonl") -> None:
        self.folder = output.parent / f".{output.name}.ceprompt-parts"
        self.key, self.suffix = key, suffix

    def open(self, rt: Runtime) -> "ShareStore":
        """Keep the shares of an interrupted run of the same job; start afresh otherwise. Rank 0 first (with shared
        storage the others then find its choice), then every other rank in its own folder."""
        if rt.is_main:
            self._adopt()
        rt.barrier()
        if not rt.is_main:
            self._adopt()
        return self

    def _adopt(self) -> None:
        stamp = self.folder / "job.json"
        if self.folder.is_dir():
            try:
                same = json.loads(stamp.read_text()).get("key") == self.key
            except (OSError, ValueError, AttributeError):
                same = False
            if same:
                done = len(list(self.folder.glob(f"share-*{self.suffix}")))
                if done:
                    log.info("continuing an interrupted run: %d finished share(s) kept in %s", done, self.folder)
                return
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(stamp) as tmp:
            tmp.write_text(json.dumps({"key": self.key}) + "\n")

    def path(self, share: Share) -> Path:
        return self.folder / f"share-{share.number:06d}{self.suffix}"

    def done(self, share: Share) -> bool:
        return self.path(share).is_file()

    @contextlib.contextmanager
    def writing(self, share: Share) -> Iterator[Path]:
        """A temporary file for the share's results; it counts as finished once the block succeeds."""
        with atomic_write(self.path(share)) as tmp:
            yield tmp

    def collect(self, rt: Runtime, dealt: Sequence[Sequence[Share]]) -> list[Path]:
        """On rank 0, every share's file in output order: the other ranks send theirs, one share at a time."""
        for rank, shares in enumerate(dealt):
            if rank == 0 or not rt.distributed:
                continue
            for share in shares:
                data = self.path(share).read_bytes() if rt.rank == rank else None
                received = rt.gather_to_main(data)
                if rt.is_main:
                    with atomic_write(self.path(share)) as tmp:
                        tmp.write_bytes(received[rank])
        rt.barrier()
        shares = sorted((s for mine in dealt for s in mine), key=lambda s: s.number)
        return [self.path(s) for s in shares]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def file_costs(paths: Sequence[Path]) -> list[float]:
    out = []
    for path in paths:
        try:
            out.append(float(os.stat(path).st_size))
        except OSError:
            out.append(0.0)
    return out


def start_shares(output: Path, key: Callable[[], str], suffix: str, shares: Sequence[Share], rt: Runtime
                 ) -> tuple[ShareStore, list[list[Share]], list[Share]]:
    """A sharded job begun: its store (the job's fingerprint computed by rank 0, which every process then uses),
    every process's shares, and this process's shares still to do."""
    store = ShareStore(output, rt.gather(key() if rt.is_main else "")[0], suffix).open(rt)
    dealt = deal(shares, rt.world)
    return store, dealt, my_shares(dealt, rt, store)


def my_shares(dealt: Sequence[Sequence[Share]], rt: Runtime, store: "ShareStore") -> list[Share]:
    """This process's shares still to do (those a previous, interrupted run finished are skipped), said in the log
    so that a user of torchrun sees the work divided."""
    mine = list(dealt[rt.rank])
    todo = [s for s in mine if not store.done(s)]
    log.info("process %d of %d: %d share(s) of %d inputs to do%s", rt.rank + 1, rt.world, len(todo),
             sum(len(s.items) for s in todo),
             f" ({len(mine) - len(todo)} finished by an earlier run)" if len(todo) < len(mine) else "")
    return todo
