"""Metrics of a model scored on classes it was not (all) trained for: accuracy over the images of seen classes,
of unseen classes and of all, in the full label space (the cross-dataset protocol), and base-to-novel
accuracy as CoOp and MaPLe report it: base images among the base classes only, novel images among the novel
classes only, and their harmonic mean H."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> float | None:
    return float((predicted == labels).mean()) if len(labels) else None


def transfer_metrics(scores: np.ndarray, labels: Sequence[int], seen: Sequence[bool], base_to_novel: bool = False
                     ) -> dict[str, Any]:
    """``scores``: (images, classes); ``seen``: per class, whether the model was trained for it. ``base_to_novel``:
    the model was trained on base classes only (``data.base_classes``), the protocol that reports base, novel and H;
    they are reported when each side has at least two classes (an accuracy among one class is 1 by construction)."""
    labels_ = np.asarray(labels, dtype=np.int64)
    seen_ = np.asarray(seen, dtype=bool)
    predicted = scores.argmax(axis=1)
    on_seen = seen_[labels_]
    out: dict[str, Any] = {"accuracy_seen": _accuracy(predicted[on_seen], labels_[on_seen]),
                           "accuracy_unseen": _accuracy(predicted[~on_seen], labels_[~on_seen]),
                           "images_seen": int(on_seen.sum()), "images_unseen": int((~on_seen).sum())}
    if base_to_novel and seen_.sum() >= 2 and (~seen_).sum() >= 2:
        parts = {}
        for name, columns, rows in (("base", np.flatnonzero(seen_), on_seen), ("novel", np.flatnonzero(~seen_),
                                                                                 ~on_seen)):
            chosen = columns[scores[rows][:, columns].argmax(axis=1)] if rows.any() else np.zeros(0, np.int64)
            parts[name] = _accuracy(chosen, labels_[rows])
        base, novel = parts["base"], parts["novel"]
        h = 2 * base * novel / (base + novel) if base is not None and novel is not None and base + novel > 0 else None
        out["base_to_novel"] = {"base": base, "novel": novel, "h": h}
    return out
