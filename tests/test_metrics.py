"""Sample-level metrics on hand-checked examples."""

from __future__ import annotations

import pytest

from ceprompt.engine.metrics import classification_metrics


def test_metrics_by_hand() -> None:
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["per_class"]["c"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}


def test_accuracy_is_per_sample_not_per_batch() -> None:
    # batches of 4 and 1: per-batch averaging would give (3/4 + 0) / 2 = 0.375
    m = classification_metrics([0, 0, 0, 0, 1], [0, 0, 0, 1, 0], ["x", "y"])
    assert m["accuracy"] == pytest.approx(3 / 5)


def test_absent_classes_do_not_count_in_means() -> None:
    m = classification_metrics([0, 1], [0, 1], ["x", "y", "never"])
    assert m["mean_class_accuracy"] == 1.0 and m["macro_f1"] == 1.0
