"""``ceprompt export onnx``: a trained checkpoint as one ONNX graph, image in, probabilities out.

The graph takes RGB face crops of the model's input size with values in [0, 1], shape
(batch, 3, size, size); normalisation, the (prompted) vision tower, the scoring head with the
class text embeddings baked in, and the calibrated softmax are all inside. The export is checked
against PyTorch with onnxruntime before it is kept.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import CepromptError, CheckpointError, ConfigError
from ..core.io_utils import atomic_write
from ..core.paths import output_file
from ..weights.build import load_trained

log = logging.getLogger(__name__)
TOLERANCE = 1e-4


class ProbabilityModel(nn.Module):
    """Normalise, score against fixed class embeddings, softmax with the calibrated temperature."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], temperature: float) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.register_buffer("text_features", model.class_text_features().float())
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = self.model((images - self.mean) / self.std, text_features=self.text_features).logits
        return torch.softmax(scores * self.temperature, dim=-1)


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                opset: int = 18) -> dict[str, Any]:
    """Write ``out`` (.onnx) and ``out`` with .json (classes, input size, check result); returns the check."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError(f"{out}: the output file must end in .onnx")
    for target in (out, out.with_suffix(".json")):  # both checked before anything is loaded or written
        output_file(target, overwrite, "export")
    try:
        import onnxruntime as ort
    except ImportError:
        raise CepromptError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'ceprompt[onnx]'") from None
    loaded = load_trained(checkpoint)
    pre = loaded.preprocess
    temperature = float((loaded.meta.get("calibration") or {}).get("temperature", 1.0))
    wrapper = ProbabilityModel(loaded.model.eval(), pre.mean, pre.std, temperature).eval()
    size = pre.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with atomic_write(out) as tmp:
        try:
            torch.onnx.export(wrapper, (example,), str(tmp), input_names=["image"], output_names=["probabilities"],
                              dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1024)}},
                              opset_version=opset, dynamo=True, external_data=False, verbose=False)
        except Exception as exc:
            raise CheckpointError(f"{loaded.path}: ONNX export failed ({str(exc).splitlines()[0][:300]})") from None
        check = _check(wrapper, str(tmp), size, ort)
        if not check["max_abs_diff"] <= TOLERANCE:  # NaN-safe: a NaN difference fails
            raise CheckpointError(f"{out}: onnxruntime differs from PyTorch by {check['max_abs_diff']:.2e} "
                                  f"(> {TOLERANCE}); not written")
    info = {"checkpoint": str(loaded.path), "class_names": loaded.class_names, "input": {
        "name": "image", "shape": ["batch", 3, size, size], "range": [0, 1], "color": "RGB",
        "crop_policy": "ceprompt.data.faces.align_face"}, "output": "probabilities", "temperature": temperature,
        "check": check}
    with atomic_write(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    return check


def _check(wrapper: nn.Module, path: str, size: int, ort: Any) -> dict[str, float]:
    """Largest difference between onnxruntime and PyTorch on random images at two batch sizes."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    diffs = []
    for batch in (1, 5):
        x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = wrapper(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        diffs.append(np.abs(got - want).max())
    return {"max_abs_diff": float(np.max(diffs)), "tolerance": TOLERANCE}  # np.max keeps a NaN
