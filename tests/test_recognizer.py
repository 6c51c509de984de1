"""ceprompt.api.Recognizer: classes switched without touching the shared model, so one recognizer serves many
threads (the web server's per-request classes, a caller's thread pool)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_stages import CLASSES, build

from ceprompt.api import Recognizer
from ceprompt.data.transforms import preprocess_for
from ceprompt.weights.build import LoadedModel

LISTS = [["happy", "sad"], ["calm", "excited", "bored"], ["fear", "happy", "sad", "calm"], ["joy", "angry"],
         ["sadness", "surprised", "neutral"]]


def recognizer(name: str, **options) -> Recognizer:
    """A recognizer on a small stage model; its CPU threads fixed (unless ``threads`` is given: the current count)
    so that answers compared bit for bit are not computed with different thread counts."""
    loaded = LoadedModel(build(name, training=False).eval(), {"calibration": {"temperature": 3.0}}, Path("model"),
                         preprocess_for(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), list(CLASSES.names))
    options.setdefault("threads", torch.get_num_threads())
    return Recognizer(loaded, device="cpu", precision="fp32", **options)


def crops(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def answers(rec: Recognizer, images: list[Image.Image]) -> list[list[tuple[str, float]]]:
    return [[(k, v) for face in faces for k, v in face.probabilities.items()]
            for faces in rec.predict_batch(images, detect="none")]


@pytest.mark.parametrize("name", ["eva", "cat"])
def test_one_recognizer_shared_by_threads_gives_every_call_the_serial_answer(name: str) -> None:
    rec = recognizer(name)
    images = crops()
    trained_before = answers(rec, images)
    text_before = rec.text_features.clone()
    serial = {tuple(c): answers(rec.with_classes(c), images) for c in LISTS}
    jobs = [random.Random(i).choice(LISTS) for i in range(40)]

    def run(classes: list[str]) -> tuple[tuple[str, ...], list]:
        other = rec.with_classes(classes)
        return tuple(classes), answers(other, images)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, jobs))
    assert all(got == serial[classes] for classes, got in results)
    # the trained classes are untouched: the shared recognizer and its model answer as before
    assert rec.class_names == list(CLASSES.names) and rec.model.classes == CLASSES
    assert torch.equal(rec.text_features, text_before) and answers(rec, images) == trained_before
    again = rec.with_classes(list(CLASSES.names))
    assert again.classes_note is None and answers(again, images) == trained_before


def test_with_classes_returns_a_new_recognizer_that_shares_the_model() -> None:
    rec = recognizer("cat")
    other = rec.with_classes(["happy", "bored"])
    assert other is not rec and other.model is rec.model
    assert other.class_names == ["happy", "bored"] and rec.class_names == list(CLASSES.names)
    assert other.class_match.seen == [True, False] and other.temperature == 1.0 and rec.temperature == 3.0
    assert other.classes_note == ("class bored was not trained: scored from its own words, and probabilities use no "
                                  "fitted temperature")
    assert other.detector is rec.detector if _has_mtcnn() else True


def _has_mtcnn() -> bool:
    try:
        import facenet_pytorch  # noqa: F401
    except ImportError:
        return False
    return True
