"""``ceprompt doctor``: what is installed, which devices work, and whether CLIP loading round-trips."""

from __future__ import annotations

import platform
import tempfile
import warnings
from pathlib import Path

import torch

from . import __version__
from .clip_backbone import build_clip, get_arch, tokenize
from .clip_files import load_clip, save_clip_safetensors


def _versions() -> list[tuple[str, str]]:
    import importlib.metadata as md

    rows = [("ceprompt", __version__), ("python", platform.python_version())]
    for dist in ("torch", "torchvision", "open_clip_torch", "safetensors", "facenet-pytorch", "transformers"):
        try:
            rows.append((dist, md.version(dist)))
        except md.PackageNotFoundError:
            rows.append((dist, "not installed"))
    return rows


def _cpu_bf16() -> str:
    """Without AMX or AVX512-BF16, bf16 on a CPU is emulated and slower than fp32."""
    native = [name for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
              if getattr(torch.cpu, probe, lambda: False)()]
    return f"native ({', '.join(native)})" if native else "emulated (slower than fp32 here: keep --precision fp32)"


def _devices() -> list[tuple[str, str]]:
    rows = [("cpu", f"{torch.get_num_threads()} threads, bf16 {_cpu_bf16()}")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(i)
            rows.append((f"cuda:{i}", f"{name}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        rows.append(("cuda", "not available"))
    return rows


def _write_formats(arch: str, folder: Path) -> dict[str, Path]:
    """The same random CLIP written as a TorchScript archive, a wrapped state dict and safetensors."""
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


def run_doctor(arch: str = "tiny-vit") -> int:
    """Print the report; exit status 1 if any format failed to round-trip."""
    print("versions:")
    for name, value in _versions():
        print(f"  {name:16s} {value}")
    print("devices:")
    for name, value in _devices():
        print(f"  {name:16s} {value}")
    spec = get_arch(arch)
    reference = build_clip(spec, seed=0)
    images = torch.randn(4, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))
    text = tokenize(["a photo of a happy facial expression.", "a photo of a sad facial expression."],
                    spec.context_length)
    with torch.no_grad():
        want_img, want_txt = reference.encode_image(images), reference.encode_text(text)
    failed = 0
    print(f"CLIP round trip ({arch}: {spec.describe()}):")
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
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0
