"""``ceprompt embed MODEL INPUTS -o feats.npz [--plot tsne.png]``: the model's image embedding of every face, for
t-SNE or UMAP figures like the paper's, or for your own analysis.

``feats.npz`` holds ``embeddings`` (faces x D, float32, unit length), ``paths``, ``faces`` (the face's index in
its image), ``boxes`` (x0, y0, x1, y1), ``predicted`` (the model's label) and ``folders`` (each image's folder
name: the true class in a dataset laid out as class folders). ``--plot`` draws a t-SNE map (scikit-learn),
coloured by folder when the folders name the model's classes (directly or through the alias table), else by the
predicted label.

The images are embedded a share at a time (:mod:`ceprompt.core.shares`): memory holds one share's faces, not every
face of every input; an interrupted run started again skips the shares it finished, and under torchrun the
processes divide them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ..api import Recognizer
from ..core.errors import CepromptError
from ..core.outputs import OutputFile, save_figure
from ..core.runtime import Runtime
from ..core.shares import file_costs, job_key, plan_shares, start_shares
from ..data.class_names import canonical

log = logging.getLogger(__name__)
FIELDS = ("embeddings", "paths", "faces", "boxes", "predicted", "folders")


def embed_share(rec: Recognizer, files: list[Path], detect: str, batch_size: int) -> tuple[dict[str, np.ndarray], int]:
    """The faces of ``files`` (their arrays as :data:`FIELDS`), and how many files could not be read."""
    results, vectors = rec._predict(files, detect, batch_size, on_error="return")
    rows, failed, width = [], 0, None
    for path, faces, embedded in zip(files, results, vectors):
        if isinstance(faces, CepromptError):
            failed += 1
            log.warning("%s", str(faces) if str(faces).startswith(str(path)) else f"{path}: {faces}")
            continue
        for j, (face, vector) in enumerate(zip(faces, embedded)):
            rows.append((vector, str(path), j, face.box, face.label, path.parent.name))
            width = len(vector)
    if not rows:
        return {}, failed
    vectors_, paths, index, boxes, labels, folders = zip(*rows)
    return {"embeddings": np.stack(vectors_).astype(np.float32).reshape(-1, width), "paths": np.array(paths),
            "faces": np.array(index), "boxes": np.array(boxes, dtype=np.float32), "predicted": np.array(labels),
            "folders": np.array(folders)}, failed


def run_embed(rec: Recognizer, files: list[Path], output: OutputFile, detect: str = "mtcnn", batch_size: int = 32,
              progress: bool = True, rt: Runtime | None = None) -> tuple[dict[str, np.ndarray] | None, int]:
    """Embed every face of ``files`` into ``output``; (the features on rank 0, None elsewhere; files that failed)."""
    rt = rt or Runtime(rec.device, rec.precision)
    shares = plan_shares(file_costs(files), [False] * len(files), batch_size)
    store, dealt, todo = start_shares(
        output.path, lambda: job_key(files=[str(f) for f in files], model=str(rec.checkpoint), detect=detect,
                                     batch=batch_size, precision=rec.precision, classes=rec.class_names),
        ".npz", shares, rt)
    failed = 0
    for share in tqdm(todo, disable=not (progress and rt.is_main), unit="share", desc="embed", dynamic_ncols=True,
                      file=sys.stderr):
        features, bad = embed_share(rec, [files[i] for i in share.items], detect, batch_size)
        failed += bad
        with store.writing(share) as tmp:
            save_npz({"failed": np.array(bad), **features}, tmp)
    parts = store.collect(rt, dealt)
    if not rt.is_main:
        return None, 0
    merged, failed = merge(parts)
    if not merged:
        raise CepromptError("no face found in any input (use --detect none for images that are face crops)")
    output.write_with(lambda tmp: save_npz(merged, tmp))
    store.remove()
    return merged, failed


def merge(parts: list[Path]) -> tuple[dict[str, np.ndarray], int]:
    """The shares' arrays, concatenated in order, and the files that failed in all."""
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in FIELDS}
    failed = 0
    for part in parts:
        with np.load(part, allow_pickle=False) as data:  # ceprompt's own parts; never a pickle
            failed += int(data["failed"])
            if "embeddings" in data:
                for name in FIELDS:
                    pieces[name].append(data[name])
    if not pieces["embeddings"]:
        return {}, failed
    return {name: np.concatenate(values) for name, values in pieces.items()}, failed


def save_npz(features: dict[str, np.ndarray], path: Path) -> Path:
    with open(path, "wb") as fh:  # a file object: given a name, numpy would append ".npz" to it
        np.savez(fh, **features)
    return path


def check_plotting() -> None:
    """``--plot`` needs scikit-learn: said before any image is embedded."""
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        raise CepromptError("--plot needs scikit-learn: pip install scikit-learn") from None


def plot_tsne(features: dict[str, np.ndarray], class_names: Sequence[str], path: Path,
              class_aliases: Sequence[str] | None = None, seed: int = 0) -> Path:
    """A 2-D t-SNE map of the embeddings, one colour per class."""
    check_plotting()
    import matplotlib
    from sklearn.manifold import TSNE

    from ..data.class_names import parse_aliases

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = features["embeddings"]
    if len(x) < 3:
        raise CepromptError(f"--plot needs at least 3 faces, found {len(x)}")
    extra = parse_aliases(class_aliases)
    by_name = {canonical(c, extra): c for c in class_names}
    folders = [by_name.get(canonical(str(f), extra)) for f in features["folders"]]
    by_folder = all(f is not None for f in folders)  # folders named by class (or alias: angry, happiness)
    colour_by = np.array(folders) if by_folder else features["predicted"]
    points = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for name in class_names:
        mask = colour_by == name
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=10, label=f"{name} ({int(mask.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {len(x)} face embeddings, coloured by {'folder (true class)' if by_folder else 'prediction'}")
    ax.legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    return save_figure(fig, path, 110)
