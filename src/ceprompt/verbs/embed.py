"""``ceprompt embed MODEL INPUTS -o feats.npz [--plot tsne.png]``: the model's image embedding of every face, for
t-SNE or UMAP figures like the paper's, or for your own analysis.

``feats.npz`` holds ``embeddings`` (faces x D, float32, unit length), ``paths``, ``faces`` (the face's index in
its image), ``boxes`` (x0, y0, x1, y1), ``predicted`` (the model's label) and ``folders`` (each image's folder
name: the true class in a dataset laid out as class folders). ``--plot`` draws a t-SNE map (scikit-learn),
coloured by folder when the folders are the model's classes, else by the predicted label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..api import Recognizer
from ..core.errors import CepromptError
from ..core.io_utils import atomic_write
from ..data.images import IMAGE_SUFFIXES
from .predict import expand_inputs


def image_files(inputs: Sequence[str]) -> list[Path]:
    """The files given and the images in the folders given (as predict finds them, videos aside)."""
    files = expand_inputs(inputs, IMAGE_SUFFIXES)
    if not files:
        raise CepromptError(f"no images in {list(inputs)}")
    return files


def embed_files(rec: Recognizer, files: list[Path], detect: str = "mtcnn", batch_size: int = 32
                ) -> dict[str, np.ndarray]:
    faces = rec.embed(files, detect=detect, batch_size=batch_size)
    if not faces:
        raise CepromptError("no face found in any input (use --detect none for images that are face crops)")
    counts: dict[int, int] = {}
    face_index = []
    for f in faces:
        face_index.append(counts.get(f.image, 0))
        counts[f.image] = face_index[-1] + 1
    return {
        "embeddings": np.stack([f.embedding for f in faces]).astype(np.float32),
        "paths": np.array([str(files[f.image]) for f in faces]),
        "faces": np.array(face_index),
        "boxes": np.array([f.box for f in faces], dtype=np.float32),
        "predicted": np.array([f.label for f in faces]),
        "folders": np.array([files[f.image].parent.name for f in faces]),
    }


def save_npz(features: dict[str, np.ndarray], path: Path) -> Path:
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **features)
    return path


def plot_tsne(features: dict[str, np.ndarray], class_names: Sequence[str], path: Path, seed: int = 0) -> Path:
    """A 2-D t-SNE map of the embeddings, one colour per class."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise CepromptError("--plot needs scikit-learn: pip install scikit-learn") from None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = features["embeddings"]
    if len(x) < 3:
        raise CepromptError(f"--plot needs at least 3 faces, found {len(x)}")
    by_folder = set(features["folders"]) <= set(class_names)
    colour_by = features["folders"] if by_folder else features["predicted"]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
