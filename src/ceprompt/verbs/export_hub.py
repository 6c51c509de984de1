"""``ceprompt export hub``: a trained model as one self-contained folder, ready for ``hf upload``.

The folder holds:

* ``model.safetensors`` - every weight the model needs: the whole CLIP (with the stage-1 weights in
  place) under ``clip.``, and for stage 2 the prompt learner under ``prompt_learner.``;
* ``config.json`` - classes, prompt words, prompts, preprocessing, temperature, compat mode, the
  resolved training config (local paths removed) and where the backbone came from (name, SHA-256);
* ``README.md`` - a model card: metrics, dataset, settings, backbone and its license, usage.

``ceprompt.load(FOLDER)`` and ``ceprompt.load("hf-hub:ORG/NAME[@REV]")`` read it back (safetensors and
JSON only; nothing is unpickled).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..core.errors import CheckpointError, ConfigError
from ..core.io_utils import atomic_write_set, sha256_file
from ..core.paths import output_dir
from ..experiment.config import config_from_dict
from ..model.stages import stage_class
from ..weights.build import HUB_FORMAT, load_trained
from ..weights.checkpoint import non_finite
from ..weights.hub import backbone_license

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
FILES = ("model.safetensors", "config.json", "README.md")


def export_hub(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp16",
               overwrite: bool = False) -> Path:
    """Write the folder; returns it. Existing files other than :data:`FILES` are left alone."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected fp16 or fp32")
    folder = Path(out).expanduser()
    present = [name for name in FILES if (folder / name).exists()]
    if present and not overwrite:
        raise ConfigError(f"{folder / present[0]}: already exists; pass --overwrite to replace the exported files")
    output_dir(folder, "export hub")
    for name in FILES:  # half-written files of an export that was killed
        for stale in folder.glob(f".{name}.*.tmp"):
            stale.unlink()
    loaded = load_trained(checkpoint)
    model = loaded.model
    tensors = {f"clip.{k}": v for k, v in model.clip.state_dict().items()}
    tensors.update(model.own_state_dict())
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in tensors.items()}
    bad = non_finite(tensors)
    if bad:  # fp16 overflows where a weight exceeds 65504
        raise CheckpointError(f"{loaded.path}: {bad[0]} does not fit in {dtype}; use --dtype fp32")
    config = hub_config(loaded.meta, dtype)
    weights, card, config_file = folder / "model.safetensors", folder / "README.md", folder / "config.json"
    # config.json goes in last and names the weights by hash: a folder killed half-way through an --overwrite
    # has no config.json (not a model) or one whose hash the weights fail, never old and new mixed
    with atomic_write_set([weights, card, config_file], commit=config_file) as tmp:
        save_file(tensors, str(tmp[weights]), metadata={"format": "pt", "ceprompt.format": HUB_FORMAT})
        config["weights_sha256"] = sha256_file(tmp[weights])
        tmp[card].write_text(model_card(config, tmp[weights].stat().st_size / 1e6))
        tmp[config_file].write_text(json.dumps(config, indent=2) + "\n")
    return folder


def hub_config(meta: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The checkpoint's description without anything local: no paths, only names and hashes."""
    config = copy.deepcopy(meta["config"])
    config["backbone"].update(path=None, init=None, arch=None)
    config["data"]["root"] = None
    config["run"]["output_dir"] = "runs"
    backbone = meta.get("backbone") or {}
    return {
        "format": HUB_FORMAT,
        "ceprompt_version": __version__,
        "weights_dtype": dtype,
        "stage": meta["stage"],
        "class_names": meta["class_names"],
        "prompt_names": config["data"].get("prompt_names") or meta["class_names"],
        "prompts": meta.get("prompts"),
        "dataset": meta.get("dataset"),
        "compat": config.get("compat", "none"),
        "clip_spec": meta["clip_spec"],
        "preprocess": meta["preprocess"],
        "calibration": meta.get("calibration"),
        "test_metrics": meta.get("test_metrics"),
        "notice": meta.get("notice"),
        "backbone": {k: backbone[k] for k in ("name", "sha256", "format", "arch") if backbone.get(k)},
        "trained_from": {"sha256": meta["init"].get("sha256")} if meta.get("init") else None,
        "config": config,
    }


RESEARCH_DATASETS = {"rafdb": "RAF-DB", "affectnet7": "AffectNet (7 classes)", "affectnet8": "AffectNet (8 classes)",
                     "ferplus": "FERPlus"}


def training_data(config: dict[str, Any]) -> str:
    """What the model was trained on, in words: the run's data.description, else the dataset data.dataset names
    (a folder dataset is the user's own images)."""
    data = config["config"].get("data") or {}
    if data.get("description"):
        return str(data["description"])
    dataset = config.get("dataset")
    return RESEARCH_DATASETS.get(dataset, f"the trainer's own images (a {dataset} dataset)")


def _metrics_table(config: dict[str, Any]) -> str:
    metrics = config.get("test_metrics")
    if not metrics:
        return ("No evaluation was recorded with this checkpoint (an imported model, for example). "
                "Evaluate it with `ceprompt eval --checkpoint ... --data ...`.\n")
    rows = [("accuracy (sample-level)", metrics.get("accuracy")), ("mean class accuracy", metrics.get("mean_class_accuracy")),
            ("macro-F1", metrics.get("macro_f1"))]
    lines = ["| metric | value |", "|---|---|", *[f"| {name} | {value:.4f} |" for name, value in rows
                                                  if isinstance(value, (int, float))]]
    return "\n".join(lines) + f"\n\nOn the test split of the training data ({training_data(config)}; " \
        f"{metrics.get('n')} images), at the checkpoint's best epoch.\n"


def _license(config: dict[str, Any]) -> str:
    described = ((config["config"].get("data") or {}).get("description"))
    data = "" if described else {"rafdb": "RAF-DB", "affectnet7": "AffectNet", "affectnet8": "AffectNet",
                                 "ferplus": "FERPlus"}.get(config.get("dataset"), "")
    research = (f" {data} is released for non-commercial research only." if data else "")
    return (f"The weights derive from the backbone above and were trained on {training_data(config)}; the terms of "
            f"both apply.{research} Check them before any use.")


def _backbone_name(cfg: dict[str, Any], backbone: dict[str, Any]) -> str:
    described = (cfg.get("backbone") or {}).get("description")
    return str(described or backbone.get("name") or backbone.get("arch")
               or "a CLIP file given by path (its name was not recorded; its SHA-256 identifies it)")


def model_card(config: dict[str, Any], size_mb: float) -> str:
    cfg = config["config"]
    stage = stage_class(config["stage"])
    words = ", ".join(f"{c} ({w})" if c != w else c for c, w in zip(config["class_names"], config["prompt_names"]))
    backbone = config["backbone"]
    spec = config["clip_spec"]
    head = cfg["head"]
    settings = [f"compat mode: {config['compat']}", f"head: top-k {head['top_k']}, alpha {head['alpha']}, "
                f"mode {head['mode']}", f"optimiser: {cfg['optim']['name']}, lr {cfg['optim']['lr']}, "
                f"{cfg['optim']['epochs']} epochs, batch {cfg['optim']['batch_size']}"]
    settings.append(stage.describe(config_from_dict(cfg, "config.json (config)").stage_settings))
    pre = config["preprocess"]
    settings.append(f"preprocessing: {pre['image_size']} px, {pre.get('resize', 'square')} resize, "
                    f"{pre.get('interpolation', 'bicubic')}, mean {pre['mean']}, std {pre['std']}")
    temperature = (config.get("calibration") or {}).get("temperature")
    notice = f"\n> **Note:** {config['notice']}\n" if config.get("notice") else ""
    return f"""---
library_name: ceprompt
license: other
pipeline_tag: image-classification
tags:
- facial-expression-recognition
- clip
- ceprompt
---

# CEPrompt facial expression model: {training_data(config)}, {stage.title}
{notice}
A [CEPrompt](https://doi.org/10.1109/TCSVT.2024.3424777) model trained with ceprompt {config['ceprompt_version']}.
Classes (label, with the word used in the prompts where it differs): {words}.

## Evaluation

{_metrics_table(config)}
## Training data and settings

- training data: {training_data(config)} (data.dataset={config.get('dataset')})
{chr(10).join('- ' + s for s in settings)}
- probability temperature: {f'{temperature:.3f} (fitted on the test split; it changes no prediction)' if temperature
                            else '1 (not calibrated)'}

## Backbone

{_backbone_name(cfg, backbone)}: ViT {spec['image_size']} px,
patch {spec['patch_size']}, vision width {spec['vision_width']} x {spec['vision_layers']} blocks, text width
{spec['text_width']} x {spec['text_layers']}{f", SHA-256 {backbone['sha256']}" if backbone.get('sha256') else ''}.
License of the backbone weights: {backbone_license(backbone)}.

## License

{_license(config)}

## Usage

```python
import ceprompt                                  # ceprompt {config['ceprompt_version']} or later
rec = ceprompt.load("hf-hub:ORG/NAME")           # or a local copy of this folder
for face in rec.predict("photo.jpg"):            # MTCNN finds faces (the "face" extra)
    print(face.box, face.label, face.probabilities)
```

ceprompt is installed from its source folder (no package index serves it): in a clone,
`pip install -e ".[face]"`.

```bash
ceprompt predict hf-hub:ORG/NAME photos/ --output faces.csv
ceprompt serve hf-hub:ORG/NAME
```

## Files

- `model.safetensors` ({size_mb:.0f} MB, {config['weights_dtype']}): every weight, the CLIP backbone included.
- `config.json`: classes, prompts, preprocessing, temperature and the full training config.
"""
