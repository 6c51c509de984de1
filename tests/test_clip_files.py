"""Loading CLIP weights in every supported format, each written by that format's own reference code."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

from ceprompt.cli import main
from ceprompt.core.errors import CheckpointError
from ceprompt.model.clip import tokenize
from ceprompt.weights.clip_files import detect_format, load_clip

PROMPTS = [
    "a photo of a happy facial expression, a type of facial expression.",
    "a photo of a surprise facial expression, a type of facial expression.",
    "a photo of neutral.",
]


def open_clip_model(quick_gelu: bool = True, seed: int = 0, text_width: int = 64) -> CLIP:
    """A tiny random CLIP built with open_clip's own classes (heads follow the 64-wide convention)."""
    torch.manual_seed(seed)
    model = CLIP(
        48,
        CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=8, image_size=32),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=text_width, heads=text_width // 64, layers=2),
        quick_gelu=quick_gelu,
    )
    # open_clip initialises these to zero/constant; random values make the comparison meaningful
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def images(size: int = 32, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_matches(path: Path, reference: CLIP, fmt: str) -> None:
    loaded = load_clip(path)
    assert loaded.format == fmt
    with torch.no_grad():
        text = tokenize(PROMPTS)
        assert rel_err(loaded.model.encode_image(images()), reference.encode_image(images())) < 1e-5
        assert rel_err(loaded.model.encode_text(text), reference.encode_text(text)) < 1e-5


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_torchscript_archive(tmp_path: Path, quick_gelu: bool) -> None:
    model = open_clip_model(quick_gelu)
    del model.vocab_size
    model.register_buffer("input_resolution", torch.tensor(32))  # OpenAI's archives carry these
    model.register_buffer("vocab_size", torch.tensor(49408))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(
            model, {"encode_image": (images(),), "encode_text": (tokenize(PROMPTS),)}, check_trace=False
        )
        torch.jit.save(traced, str(tmp_path / "ViT-tiny.pt"))
    loaded = load_clip(tmp_path / "ViT-tiny.pt")
    assert loaded.spec.quick_gelu is quick_gelu  # read from the archive's module names
    assert_matches(tmp_path / "ViT-tiny.pt", model, "torchscript")


@pytest.mark.parametrize("layout", ["plain", "wrapped", "module_prefix", "legacy"])
def test_torch_state_dict(tmp_path: Path, layout: str) -> None:
    model = open_clip_model()
    sd = model.state_dict()
    path = tmp_path / "clip.bin"
    if layout == "plain":
        torch.save(sd, path)
    elif layout == "wrapped":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif layout == "module_prefix":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        torch.save({k: v.half() for k, v in sd.items()}, path, _use_new_zipfile_serialization=False)
        model = model.half().float()  # OpenAI ships fp16 weights; compare against the rounded model
    assert_matches(path, model, "state_dict")


def test_safetensors_state_dict(tmp_path: Path) -> None:
    model = open_clip_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    assert_matches(tmp_path / "clip.safetensors", model, "safetensors")


def hf_model(hidden_act: str = "quick_gelu"):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408, hidden_act=hidden_act),
        vision_config=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8, hidden_act=hidden_act),
        projection_dim=40,
    )
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval()


def _features(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_huggingface_folder(tmp_path: Path, weights: str, hidden_act: str) -> None:
    model = hf_model(hidden_act)
    folder = tmp_path / "clip-hf"
    model.save_pretrained(folder)
    if weights == "pytorch_model.bin":
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / weights)
    loaded = load_clip(folder)
    assert loaded.format == "huggingface"
    # heads (2 and 3) are not multiples of 64-wide heads: they must come from config.json
    assert (loaded.spec.vision_heads, loaded.spec.text_heads) == (3, 2)
    assert loaded.spec.quick_gelu is (hidden_act == "quick_gelu")
    text = tokenize(PROMPTS)
    with torch.no_grad():
        want_img = _features(model.get_image_features(pixel_values=images()))
        want_txt = _features(model.get_text_features(input_ids=text))
        assert rel_err(loaded.model.encode_image(images()), want_img) < 1e-5
        assert rel_err(loaded.model.encode_text(text), want_txt) < 1e-5


def test_tokenizer_matches_open_clip() -> None:
    prompts = PROMPTS + [
        "a photo of a disgust facial expression, a type of facial expression.",
        "a photo of contempt.",
        "A Face With RAISED eyebrows, and an open mouth!",
        "",
        "word " * 100,  # longer than the context: truncated, ends with the end token
    ]
    assert torch.equal(tokenize(prompts), open_clip.tokenize(prompts))
    assert torch.equal(tokenize(prompts, context_length=16), open_clip.tokenize(prompts, context_length=16))


def test_convert_round_trip_and_sidecar(tmp_path: Path) -> None:
    model = hf_model()
    model.save_pretrained(tmp_path / "hf")
    dst = tmp_path / "out" / "clip.safetensors"
    assert main(["convert", str(tmp_path / "hf"), str(dst)]) == 0
    sidecar = json.loads(dst.with_suffix(".json").read_text())
    assert sidecar["clip_spec"]["vision_heads"] == 3
    assert sidecar["source"]["format"] == "huggingface"
    # the safetensors file alone records the architecture (heads 3/2 could not be inferred)
    dst.with_suffix(".json").unlink()
    loaded = load_clip(dst)
    assert (loaded.format, loaded.spec.vision_heads, loaded.spec.text_heads) == ("safetensors", 3, 2)
    with torch.no_grad():
        want = _features(model.get_image_features(pixel_values=images()))
        assert rel_err(loaded.model.encode_image(images()), want) < 1e-5


def test_convert_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    model = open_clip_model()
    torch.save(model.state_dict(), tmp_path / "a.pt")
    dst = tmp_path / "b.safetensors"
    dst.write_bytes(b"precious")
    assert main(["convert", str(tmp_path / "a.pt"), str(dst)]) == 1
    assert dst.read_bytes() == b"precious"
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "a.pt"), str(dst), "--overwrite"]) == 0
    assert detect_format(dst) == "safetensors"


def _error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_file_error(tmp_path: Path, capsys) -> None:
    err = _error_line(capsys, ["convert", str(tmp_path / "nope.pt"), str(tmp_path / "x.safetensors")])
    assert "nope.pt" in err and "no such file" in err


def test_non_clip_checkpoint_error(tmp_path: Path, capsys) -> None:
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet.pth")
    err = _error_line(capsys, ["convert", str(tmp_path / "resnet.pth"), str(tmp_path / "x.safetensors")])
    assert "resnet.pth" in err and "not a CLIP checkpoint" in err


@pytest.mark.parametrize("kind", ["zip", "safetensors", "legacy"])
def test_truncated_file_error(tmp_path: Path, capsys, kind: str) -> None:
    sd = open_clip_model().state_dict()
    path = tmp_path / f"cut.{kind}"
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=kind == "zip")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _error_line(capsys, ["convert", str(path), str(tmp_path / "x.safetensors")])
    assert str(path) in err and ("truncated" in err or "corrupt" in err)


def test_unknown_format_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "weights.pt").write_text("these are not weights\n")
    err = _error_line(capsys, ["convert", str(tmp_path / "weights.pt"), str(tmp_path / "x.safetensors")])
    assert "weights.pt" in err and "unknown format" in err


def test_mismatched_widths_error(tmp_path: Path, capsys) -> None:
    sd = open_clip_model().state_dict()
    sd["text_projection"] = torch.randn(64, 32)  # vision projects to 48, text to 32
    torch.save(sd, tmp_path / "bad.pt")
    err = _error_line(capsys, ["convert", str(tmp_path / "bad.pt"), str(tmp_path / "x.safetensors")])
    assert "bad.pt" in err and "mismatched vision/text embedding widths" in err and "48" in err and "32" in err


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_clip(path)
    assert "pwned" not in capsys.readouterr().out
    # also a raw pickle stream, not written by torch.save
    path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError):
        load_clip(path)
    assert "pwned" not in capsys.readouterr().out
