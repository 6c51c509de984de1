"""``ceprompt predict``: expressions of every face in images, folders and videos.

Output: one row per face (CSV or JSON lines, :mod:`.rows`); a video's rows carry each face's time, track id and
smoothed result. A file that cannot be read gets one row with its error and the run goes on; the exit status is 1
if any file failed. The work is cut into shares (:mod:`ceprompt.core.shares`): an output file appears only when
complete, an interrupted run started again skips the shares it finished, and under torchrun the processes divide
the shares and rank 0 writes one output, the same as a single process's.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image
from tqdm import tqdm

from ..api import Explanation, FaceResult, Recognizer
from ..core.errors import CepromptError, ConfigError
from ..core.paths import file_stem
from ..core.ranges import POSITIVE_INT, check
from ..core.runtime import Runtime
from ..core.shares import Share, file_costs, job_key, plan_shares, start_shares
from ..data.images import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from .drawing import annotate, explanation_image
from .predict_plan import PredictPlan, VideoOptions, expand_inputs, plan_predict
from .predict_video import predict_video
from .rows import Record, Writer, error_row, record, write_summary

log = logging.getLogger(__name__)
__all__ = ["PredictPlan", "VideoOptions", "Writer", "expand_inputs", "plan_predict", "run_predict"]


def _stem(index: int, path: Path) -> str:
    return f"{index:05d}_{file_stem(path.stem)}"


def run_predict(rec: Recognizer, plan: PredictPlan, detect: str = "mtcnn", batch_size: int = 32,
                progress: bool = True, rt: Runtime | None = None) -> int:
    """Predict over the plan's files; returns the number of files that failed (on every process)."""
    check("--batch-size", batch_size, POSITIVE_INT)
    rt = rt or Runtime(rec.device, rec.precision)
    if plan.output is None and rt.distributed:
        raise ConfigError("under torchrun, give --output FILE: rank 0 writes it from every process's shares")
    claims = [c for c in (plan.output, plan.summary) if c is not None] if rt.is_main else []
    claims += plan.folders() if rt.is_main else []
    try:
        for claim in claims:
            claim.claim()
        for folder in plan.folders() if not rt.is_main else []:
            folder.join()  # rank 0 holds the folders; the other processes write their pictures into them
        job = _Job(rec, plan, detect, batch_size, progress and rt.is_main)
        failed = job.to_stdout() if plan.output is None else job.to_file(rt)
        for folder in plan.folders() if rt.is_main else []:
            folder.finish()
        return failed
    finally:
        for claim in claims:
            claim.release()


class _Job:
    def __init__(self, rec: Recognizer, plan: PredictPlan, detect: str, batch_size: int, progress: bool) -> None:
        self.rec, self.plan, self.detect, self.batch_size, self.progress = rec, plan, detect, batch_size, progress
        videos = [p.suffix.lower() in VIDEO_SUFFIXES for p in plan.files]
        self.shares = plan_shares(file_costs(plan.files), videos, batch_size)

    def key(self) -> str:
        files = []
        for path in self.plan.files:
            try:
                st = path.stat()
                files.append((str(path), st.st_size, st.st_mtime_ns))
            except OSError:
                files.append((str(path), None, None))
        rec = self.rec
        return job_key(files=files, model=str(rec.checkpoint), meta=rec.meta.get("ceprompt_version"),
                       classes=rec.class_names, precision=rec.precision, detect=self.detect, batch=self.batch_size,
                       fmt=self.plan.fmt, video=self.plan.video, folders=[str(f.path) for f in self.plan.folders()],
                       timeline=bool(self.plan.timeline), explain=bool(self.plan.explain))

    def to_stdout(self) -> int:
        if hasattr(sys.stdout, "reconfigure"):  # file names that are not UTF-8 are written back as the same bytes
            sys.stdout.reconfigure(errors="surrogateescape")
        writer = Writer(sys.stdout, self.plan.fmt, self.rec.class_names)
        summaries: list[Record] = []
        failed: set[str] = set()
        try:
            with self._bar(len(self.shares)) as bar:
                for share in self.shares:
                    for row in self._rows(share, summaries.append):
                        if row["error"]:
                            failed.add(row["path"])
                        writer.write(row)
                    writer.flush()
                    bar.update(1)
        except OSError as exc:  # a closed pipe, a full disk
            raise CepromptError(f"standard output: cannot write the results ({exc.strerror or exc})") from None
        self._write_summary(summaries)
        return len(failed)

    def to_file(self, rt: Runtime) -> int:
        assert self.plan.output is not None
        store, dealt, todo = start_shares(self.plan.output.path, self.key, ".jsonl", self.shares, rt)
        with self._bar(len(todo)) as bar:
            for share in todo:
                with store.writing(share) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
                    for row in self._rows(share, lambda s: fh.write(json.dumps({"summary": s}) + "\n")):
                        fh.write(json.dumps(row) + "\n")
                bar.update(1)
        parts = store.collect(rt, dealt)
        failed = 0
        if rt.is_main:
            failed = self._merge(parts)
            store.remove()
        return int(rt.gather(failed)[0])

    def _merge(self, parts: list[Path]) -> int:
        """The output (and summary) from the finished shares, in order; the number of files with an error."""
        failed: set[str] = set()
        summaries: list[Record] = []

        def rows() -> Iterator[Record]:
            for part in parts:
                with open(part, encoding="utf-8", errors="surrogateescape") as fh:
                    for line in fh:
                        item = json.loads(line)
                        if "summary" in item:
                            summaries.append(item["summary"])
                            continue
                        if item["error"]:
                            failed.add(item["path"])
                        yield item

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
                writer = Writer(fh, self.plan.fmt, self.rec.class_names)
                for row in rows():
                    writer.write(row)

        assert self.plan.output is not None
        try:
            self.plan.output.write_with(write)
        except OSError as exc:  # a full disk: one line, and no partial file left to block a rerun
            raise CepromptError(f"{self.plan.output.path}: cannot write the results ({exc.strerror or exc})") from None
        self._write_summary(summaries)
        return len(failed)

    def _write_summary(self, summaries: list[Record]) -> None:
        summary = self.plan.summary
        if summary is None:
            return
        fmt = "json" if summary.path.suffix.lower() == ".json" else "csv"

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
                write_summary(summaries, self.rec.class_names, fh, fmt)
        try:
            summary.write_with(write)
        except OSError as exc:
            raise CepromptError(f"{summary.path}: cannot write the summary ({exc.strerror or exc})") from None

    def _bar(self, total: int) -> Any:
        return tqdm(total=total, disable=not self.progress, unit="share", desc="predict", dynamic_ncols=True,
                    file=sys.stderr)

    # -- one share ----------------------------------------------------------------------------------------------

    def _rows(self, share: Share, summary: Callable[[Record], object]) -> Iterator[Record]:
        """The rows of one share, in input order; every file's failure is its own error row."""
        files = [(i, self.plan.files[i]) for i in share.items]
        if len(files) == 1 and files[0][1].suffix.lower() in VIDEO_SUFFIXES:
            index, path = files[0]
            plan = self.plan
            yield from predict_video(self.rec, index, path, plan.video, self.detect, self.batch_size, plan.annotate,
                                     plan.timeline, summary if plan.summary else None)
            return
        loaded: list[tuple[int, Path, Image.Image | CepromptError]] = []
        for index, path in files:
            try:
                if not path.is_file():
                    raise CepromptError("no such file" if not path.exists() else "not a regular file")
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    raise CepromptError(f"unsupported file type {path.suffix.lower() or '(none)'}; expected an "
                                        f"image ({', '.join(sorted(IMAGE_SUFFIXES))}) or a video "
                                        f"({', '.join(sorted(VIDEO_SUFFIXES))})")
                loaded.append((index, path, self.rec.load_image(path)))
            except CepromptError as exc:
                loaded.append((index, path, exc))
            except OSError as exc:  # a name too long for the file system, a lost mount: this file's row
                loaded.append((index, path, CepromptError(exc.strerror or str(exc))))
            except MemoryError:
                loaded.append((index, path, CepromptError("out of memory while decoding it")))
        images = [item for item in loaded if not isinstance(item[2], CepromptError)]
        found, explained = self._faces([image for _, _, image in images])
        results = {index: (faces, expl) for (index, _, _), faces, expl in zip(images, found, explained)}
        for index, path, image in loaded:
            try:
                if isinstance(image, CepromptError):
                    raise image
                faces, expl = results[index]
                if isinstance(faces, CepromptError):
                    raise faces
                yield from self._image_rows(index, path, image, faces, expl)
            except CepromptError as exc:
                yield error_row(path, exc)

    def _faces(self, images: list[Image.Image]) -> tuple[list[Any], list[list[Explanation]]]:
        if not self.plan.explain:
            return self.rec.predict_batch(images, self.detect, self.batch_size, on_error="return"), [[]] * len(images)
        found, explained = [], []
        for image in images:  # an explanation carries its face's result: detect and score each image once
            try:
                expl = self.rec.explain(image, detect=self.detect)
                found.append([x.face for x in expl])
                explained.append(expl)
            except CepromptError as exc:
                found.append(exc)
                explained.append([])
        return found, explained

    def _image_rows(self, index: int, path: Path, image: Image.Image, results: list[FaceResult],
                    explanations: list[Explanation]) -> Iterator[Record]:
        if not results:
            yield record(str(path))  # no face: a row with empty fields, not an error
        for j, r in enumerate(results):
            yield record(str(path), r, face=j)
        if self.plan.annotate:
            self.plan.annotate.save(f"{_stem(index, path)}.png", annotate(image, results, self.rec.class_names))
        if self.plan.explain:
            for j, expl in enumerate(explanations):
                self.plan.explain.save(f"{_stem(index, path)}_face{j}.png", explanation_image(expl))
