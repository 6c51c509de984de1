"""Classification metrics over a whole test set (docs/method.md section 5).

Accuracy is counted over samples, not averaged over batches (the reference's mistake when the
last batch is smaller).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]) -> dict:
    """accuracy, mean class accuracy (mean recall over classes present), macro-F1 (over classes
    present in the labels or the predictions), per-class precision/recall/F1/support, confusion matrix."""
    n = len(class_names)
    cm = confusion_matrix(y_true, y_pred, n)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = support > 0
    active = present | (predicted > 0)
    total = int(cm.sum())
    return {
        "n": total,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "mean_class_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[active].mean()) if active.any() else 0.0,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }


def fit_temperature(scores: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """Temperature scaling (Guo et al., 2017): the T minimising the NLL of softmax(T x scores).

    CEPrompt's scores are cosine-based and lie in [-1, 1]; a softmax of them is almost flat.
    T turns them into usable probabilities without changing any prediction.
    """
    import torch

    s = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(s * log_t.exp(), y)
        loss.backward()
        return loss

    before = torch.nn.functional.cross_entropy(s, y).item()
    opt.step(nll)
    t = float(log_t.detach().exp().clamp(1e-2, 1e4))
    after = torch.nn.functional.cross_entropy(s * t, y).item()
    return {"temperature": t, "nll_at_1": before, "nll": after}
