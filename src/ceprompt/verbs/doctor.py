"""``ceprompt doctor``: what is installed, which devices work, and whether CLIP loading round-trips."""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.extras import EXTRAS, TRACKER_INSTALL, installed_trackers

# torch and what builds on it are imported by the checks themselves: the tool that diagnoses an installation must
# run on a broken one (torch and torchvision that do not match, say) and say what is wrong.



def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _versions() -> list[tuple[str, str]]:
    rows = [("ceprompt", __version__), ("python", platform.python_version())]
    for dist in ("torch", "torchvision", "open_clip_torch", "safetensors", "transformers"):
        rows.append((dist, _version(dist) or "not installed"))
    return rows


def _extras() -> list[tuple[str, str]]:
    rows = []
    for extra, dists in EXTRAS.items():
        found = [(d, _version(d)) for d in dists]
        missing = [d for d, v in found if v is None]
        state = "installed" if not missing else f"missing {', '.join(missing)}: pip install 'ceprompt[{extra}]'"
        rows.append((extra, f"{state}  ({', '.join(f'{d} {v}' for d, v in found if v)})" if not missing else state))
    return rows


def _cpu() -> list[tuple[str, str]]:
    from ..engine.threads import affinity_cpus, choose_threads, cpu_quota, usable_cpus

    quota = cpu_quota()
    threads, why = choose_threads()
    return [
        ("cores", f"{os.cpu_count()} in the machine, {len(affinity_cpus())} in this process's affinity mask, "
                  f"cgroup quota {'none' if quota is None else f'{quota:g} cores'} -> {usable_cpus()} usable"),
        ("threads", f"{threads} by default now ({why}); --threads N to fix"),
    ]


def _imports() -> tuple[list[tuple[str, str]], bool]:
    """Each of the packages every command needs, imported: (rows, all imported)."""
    rows, ok = [], True
    for module in ("torch", "torchvision", "open_clip"):
        try:
            __import__(module)
            rows.append((module, "imports"))
        except Exception as exc:  # noqa: BLE001 - a diagnosis, whatever the failure
            ok = False
            message = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            hint = ""
            if "torchvision::" in message or ("operator" in message and "does not exist" in message):
                hint = (f" -> torch {_version('torch')} and torchvision {_version('torchvision')} do not match: "
                        "install the torchvision released with your torch (both from the same index, e.g. pip "
                        "install --force-reinstall torch==X torchvision==Y with Y the release made for X)")
            rows.append((module, f"FAILED to import ({message}){hint}"))
    return rows, ok


def _precision(device: Any) -> str:
    from ..core.runtime import auto_precision

    chosen, why = auto_precision(device)
    return f"--precision auto = {chosen}: {why}"


def _devices() -> list[tuple[str, str]]:
    import torch

    rows = [("cpu", _precision(torch.device("cpu")))]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"cuda:{i}", f"{torch.cuda.get_device_name(i)}, {_precision(torch.device('cuda', i))}"))
    else:
        rows.append(("cuda", "not available"))
    return rows


def _write_formats(arch: str, folder: Path) -> dict[str, Path]:
    """The same random CLIP written as a TorchScript archive, a wrapped state dict and safetensors."""
    import torch

    from ..model.clip import build_clip, get_arch, tokenize
    from ..weights.clip_files import save_clip_safetensors

    spec = get_arch(arch)
    model = build_clip(spec, seed=0)
    images = torch.randn(2, 3, spec.image_size, spec.image_size)
    text = tokenize(["a photo of a face", "a smiling face"], spec.context_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace_module(
            model, {"encode_image": (images,), "encode_text": (text,)}, check_trace=False
        )
        torch.jit.save(traced, str(folder / "openai.pt"))
    paths = {"torchscript": folder / "openai.pt", "state_dict": folder / "wrapped.pt",
             "safetensors": folder / "converted.safetensors"}
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, paths["state_dict"])
    save_clip_safetensors(model, spec, paths["safetensors"])
    return paths


def _huggingface_check(folder: Path) -> tuple[str, float] | None:
    """A random transformers CLIPModel saved with its own save_pretrained, read by ceprompt; the relative
    difference of image and text embeddings against transformers' own forward. None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    import torch

    from ..model.clip import tokenize
    from ..weights.clip_files import load_clip

    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8),
        projection_dim=40,
    )
    torch.manual_seed(0)
    hf = transformers.CLIPModel(config).eval()
    transformers.logging.disable_progress_bar()
    hf.save_pretrained(folder / "hf")
    loaded = load_clip(folder / "hf")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    text = tokenize(["a photo of a happy facial expression."])
    with torch.no_grad():
        want_img = hf.get_image_features(pixel_values=images)
        want_txt = hf.get_text_features(input_ids=text)
        want_img = getattr(want_img, "pooler_output", want_img)
        want_txt = getattr(want_txt, "pooler_output", want_txt)
        err = max(((loaded.model.encode_image(images) - want_img).norm() / want_img.norm()).item(),
                  ((loaded.model.encode_text(text) - want_txt).norm() / want_txt.norm()).item())
    return loaded.format, err


def run_doctor(arch: str = "tiny-vit") -> int:
    """Print the report; exit status 1 if a package does not import or a format fails to round-trip."""
    imports, importable = _imports()
    trackers = [(name, "installed" if found else f"not installed: {TRACKER_INSTALL[name]}")
                for name, found in installed_trackers().items()]
    sections = [("versions", _versions()), ("imports", imports), ("optional extras", _extras()),
                ("experiment trackers (run.log_to)", trackers), ("cpu", _cpu())]
    if importable:
        sections.append(("devices", _devices()))
    for title, rows in sections:
        print(f"{title}:")
        for name, value in rows:
            print(f"  {name:16s} {value}")
    if not importable:
        print("devices and the CLIP round trip are skipped until the packages above import")
        return 1
    failed = _round_trip(arch)
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


def _round_trip(arch: str) -> int:
    """A random CLIP written in every format ceprompt reads and read back: the number of formats that failed."""
    import torch

    from ..model.clip import build_clip, get_arch, tokenize
    from ..weights.clip_files import load_clip

    spec = get_arch(arch)
    reference = build_clip(spec, seed=0)
    images = torch.randn(4, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))
    text = tokenize(["a photo of a happy facial expression.", "a photo of a sad facial expression."],
                    spec.context_length)
    with torch.no_grad():
        want_img, want_txt = reference.encode_image(images), reference.encode_text(text)
    failed = 0
    print(f"CLIP round trip ({arch}: {spec.describe()}):")
    logging.getLogger("ceprompt.weights.clip_files").setLevel(logging.WARNING)  # the table says what was loaded
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, path in _write_formats(arch, Path(tmp)).items():
            loaded = load_clip(path)
            with torch.no_grad():
                got_img, got_txt = loaded.model.encode_image(images), loaded.model.encode_text(text)
            err = max(
                ((got_img - want_img).norm() / want_img.norm()).item(),
                ((got_txt - want_txt).norm() / want_txt.norm()).item(),
            )
            ok = loaded.format == fmt and err < 1e-5
            failed += not ok
            print(f"  {fmt:12s} detected as {loaded.format:12s} relative error {err:.1e}  {'ok' if ok else 'FAILED'}")
        hf = _huggingface_check(Path(tmp))
        if hf is None:
            print("  huggingface  skipped (transformers is not installed)")
        else:
            ok = hf[0] == "huggingface" and hf[1] < 1e-5
            failed += not ok
            print(f"  {'huggingface':12s} detected as {hf[0]:12s} relative error {hf[1]:.1e}  "
                  f"{'ok' if ok else 'FAILED'}  (written by transformers)")
    return failed
