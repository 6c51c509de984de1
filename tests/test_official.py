"""The authors' released checkpoints (docs/authors-checkpoints.md): files with exactly their keys, shapes and
dtypes (random values) are imported, refused when wrong, and score images exactly as the method with the
authors' settings defines, checked against a reference computation written here from the fact sheet."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ceprompt
from ceprompt.cli import main
from ceprompt.core.errors import CheckpointError
from ceprompt.experiment.config import AUTHORS_PROMPT_NAMES
from ceprompt.model.clip import build_clip, get_arch, tokenize
from ceprompt.weights.build import load_trained
from ceprompt.weights.clip_files import save_clip_safetensors
from ceprompt.weights.official import stage2_schema, vision_schema

from helpers import write_three_file_dataset

ARCH = "tiny-vit-12"  # 12 blocks per tower, so prompt depth 9 fits as in the paper
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
STAGE1_TEMPLATE = "a photo of a {} facial expression, a type of facial expression."


# --- the fact sheet, for ViT-B/16 -----------------------------------------------------------------------

def test_schema_is_the_fact_sheet_for_vit_b16() -> None:
    spec = get_arch("ViT-B-16")
    s1 = vision_schema(spec)
    assert len(s1) == 152
    assert s1["conv1.weight"] == (768, 3, 16, 16) and s1["positional_embedding"] == (197, 768)
    assert s1["transformer.resblocks.11.attn.in_proj_weight"] == (2304, 768)
    assert s1["transformer.resblocks.0.mlp.c_fc.weight"] == (3072, 768)
    assert s1["projection_dist"] == (768, 512) and "proj" not in s1
    s2 = stage2_schema(spec, n_classes=7)
    assert len(s2) == 329
    assert s2["text_encoder.positional_embedding"] == (77, 512)
    assert s2["text_encoder.transformer.resblocks.3.attn.in_proj_weight"] == (1536, 512)
    assert s2["text_encoder.transformer.resblocks.3.mlp.c_proj.weight"] == (512, 2048)
    assert s2["prompt_learner.ctx"] == (2, 512) and s2["prompt_learner.compound_prompts_text.7"] == (2, 512)
    assert s2["prompt_learner.compound_prompt_projections.0.weight"] == (768, 512)
    assert s2["prompt_learner.token_prefix"] == (7, 1, 512) and s2["prompt_learner.token_suffix"] == (7, 74, 512)
    assert "prompt_learner.compound_prompts_text.8" not in s2
    assert stage2_schema(spec, 7, invariant=True)["prompt_learner.token_suffix"] == (7, 73, 512)


# --- files shaped like the authors', with random values --------------------------------------------------

def fp16_exact_clip(seed: int = 0):
    """A CLIP whose weights are fp16 values (OpenAI ships fp16), so fp16 authors' files are exact copies."""
    model = build_clip(ARCH, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def authors_files(clip, dataset: str = "rafdb", invariant: bool = False, seed: int = 1
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(stage-1, stage-2) state dicts with the fact sheet's keys: frozen parts copied from ``clip``,
    trained parts and prompts random, prompt buffers the word embeddings of the authors' prompts."""
    g = torch.Generator().manual_seed(seed)
    spec = get_arch(ARCH)
    sd = clip.state_dict()
    s1 = {}
    for key in vision_schema(spec):
        src = sd["visual.proj" if key == "projection_dist" else f"visual.{key}"]
        trained = key.startswith(("ln_post", "projection_dist")) or (
            key.startswith("transformer.resblocks.") and int(key.split(".")[2]) >= 2)
        s1[key] = (src + 0.05 * torch.randn(src.shape, generator=g) if trained else src).clone()
    s2 = dict(s1)
    for key in [k for k in stage2_schema(spec, 7, invariant=invariant) if k.startswith("text_encoder.")]:
        s2[key] = sd[key[len("text_encoder."):]].clone()
    tw, vw = spec.text_width, spec.vision_width
    s2["prompt_learner.ctx"] = torch.randn(2, tw, generator=g) * 0.2
    if invariant:
        s2["prompt_learner.ctx_invariant"] = torch.randn(1, tw, generator=g) * 0.2
    for j in range(8):
        s2[f"prompt_learner.compound_prompts_text.{j}"] = torch.randn(2, tw, generator=g) * 0.2
        s2[f"prompt_learner.compound_prompt_projections.{j}.weight"] = torch.randn(vw, tw, generator=g) * 0.1
        s2[f"prompt_learner.compound_prompt_projections.{j}.bias"] = torch.randn(vw, generator=g) * 0.1
    s2["prompt_learner.proj.weight"] = torch.randn(vw, tw, generator=g)
    s2["prompt_learner.proj.bias"] = torch.randn(vw, generator=g)
    words = AUTHORS_PROMPT_NAMES[dataset]
    prompts = [("X X X " if invariant else "a photo of ") + f"{w}." for w in words]
    rows = sd["token_embedding.weight"][tokenize(prompts)]
    s2["prompt_learner.token_prefix"] = rows[:, :1].clone()
    s2["prompt_learner.token_suffix"] = rows[:, 3 + int(invariant):].clone()
    return s1, s2


def save(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    torch.save({prefix + k: v.to(dtype) for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    clip = fp16_exact_clip()
    clip_path = root / "ViT-tiny.safetensors"
    save_clip_safetensors(clip, get_arch(ARCH), clip_path)
    data = write_three_file_dataset(root / "RAF-DB", "rafdb", n_train=1, n_test=2, size=48)
    return {"root": root, "clip": clip, "clip_path": clip_path, "data": data}


# --- the reference computation, from the fact sheet's description of the authors' forward passes ----------

def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _block(x, sd, prefix, mask=None):
    """Pre-LN residual block, QuickGELU, one 64-wide head per 64 channels."""
    width = x.shape[-1]
    heads = width // 64
    h = _ln(x, sd, f"{prefix}ln_1")
    q, k, v = (h @ sd[f"{prefix}attn.in_proj_weight"].t() + sd[f"{prefix}attn.in_proj_bias"]).chunk(3, dim=-1)
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    att = (split(q) @ split(k).transpose(-1, -2)) / (width // heads) ** 0.5
    if mask is not None:
        att = att + mask
    out = (att.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape)
    x = x + out @ sd[f"{prefix}attn.out_proj.weight"].t() + sd[f"{prefix}attn.out_proj.bias"]
    h = _ln(x, sd, f"{prefix}ln_2") @ sd[f"{prefix}mlp.c_fc.weight"].t() + sd[f"{prefix}mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[f"{prefix}mlp.c_proj.weight"].t() + sd[f"{prefix}mlp.c_proj.bias"]


def ref_vision(sd, images, deep=None):
    """Vision tower on the authors' keys; ``deep[j-1]`` overwrites positions 1..n before block j."""
    p = sd["conv1.weight"].shape[-1]
    x = F.conv2d(images, sd["conv1.weight"], stride=p).flatten(2).transpose(1, 2)
    x = torch.cat([sd["class_embedding"].expand(len(x), 1, -1), x], dim=1) + sd["positional_embedding"]
    x = _ln(x, sd, "ln_pre")
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(n_blocks):
        if deep is not None and 1 <= i <= len(deep):
            x = torch.cat([x[:, :1], deep[i - 1].expand(len(x), -1, -1), x[:, 1 + deep[i - 1].shape[0]:]], dim=1)
        x = _block(x, sd, f"transformer.resblocks.{i}.")
    return _ln(x, sd, "ln_post") @ sd["projection_dist"]


def ref_text(tsd, embeddings, ids, deep=None, slots=(1, 3)):
    """Text tower on open_clip-style keys from word embeddings; ``deep[j-1]`` fills ``slots`` before block j."""
    n = embeddings.shape[1]
    x = embeddings + tsd["positional_embedding"][:n]
    mask = torch.full((n, n), float("-inf")).triu(1)
    n_blocks = len({k.split(".")[2] for k in tsd if k.startswith("transformer.resblocks.")})
    for i in range(n_blocks):
        if deep is not None and 1 <= i <= len(deep):
            x = torch.cat([x[:, :slots[0]], deep[i - 1].expand(len(x), -1, -1), x[:, slots[1]:]], dim=1)
        x = _block(x, tsd, f"transformer.resblocks.{i}.", mask)
    x = _ln(x, tsd, "ln_final")
    return x[torch.arange(len(x)), ids.argmax(-1)] @ tsd["text_projection"]


def ref_head(tokens, text, normalize_text=True, k=16):
    g, patches = F.normalize(tokens[:, 0], dim=-1), F.normalize(tokens[:, 1:], dim=-1)
    t = F.normalize(text, dim=-1) if normalize_text else text
    s_global = g @ t.t()
    s_local = (patches @ t.t()).topk(min(k, patches.shape[1]), dim=1).values.mean(1)
    return 0.5 * F.normalize(s_local, dim=-1) + 0.5 * F.normalize(s_global, dim=-1)


def ref_pixels(image: Image.Image, size: int, shorter: bool, bicubic: bool) -> torch.Tensor:
    """The authors' test transform: PIL resize (shorter side, or size x size), ToTensor, ImageNet mean/std."""
    resample = Image.BICUBIC if bicubic else Image.BILINEAR
    if shorter:
        w, h = image.size
        image = image.resize((size, round(h * size / w)) if w <= h else (round(w * size / h), size), resample)
    else:
        image = image.resize((size, size), resample)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - IMAGENET[0]) / IMAGENET[1]).unsqueeze(0)


def reference_scores(clip, files, stage: int, image: Image.Image, dataset: str = "rafdb",
                     raw_text: bool = False) -> torch.Tensor:
    s1, s2 = ({k: v.float() for k, v in f.items()} for f in files)
    csd = clip.state_dict()
    tsd = {k: v for k, v in csd.items() if not k.startswith("visual.")}
    words = AUTHORS_PROMPT_NAMES[dataset]
    pixels = ref_pixels(image, 32, shorter=dataset == "rafdb", bicubic=dataset == "rafdb")
    with torch.no_grad():
        if stage == 1:
            ids = tokenize([STAGE1_TEMPLATE.format(w) for w in words])
            text = ref_text(tsd, csd["token_embedding.weight"][ids], ids)
            return ref_head(ref_vision(s1, pixels), text, normalize_text=not raw_text)
        invariant = "prompt_learner.ctx_invariant" in s2
        ids = tokenize([("X X X " if invariant else "a photo of ") + f"{w}." for w in words])
        learned = [s2["prompt_learner.ctx_invariant"]] if invariant else []
        learned.append(s2["prompt_learner.ctx"])
        n = len(words)
        emb = torch.cat([s2["prompt_learner.token_prefix"], *[t.expand(n, -1, -1) for t in learned],
                         s2["prompt_learner.token_suffix"]], dim=1)
        text_deep = [s2[f"prompt_learner.compound_prompts_text.{j}"] for j in range(8)]
        text = ref_text({k[len("text_encoder."):]: v for k, v in s2.items() if k.startswith("text_encoder.")},
                        emb, ids, text_deep)
        vision_deep = [p @ s2[f"prompt_learner.compound_prompt_projections.{j}.weight"].t()
                       + s2[f"prompt_learner.compound_prompt_projections.{j}.bias"] for j, p in enumerate(text_deep)]
        return ref_head(ref_vision(s2, pixels, vision_deep), text)


def face_image(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def ceprompt_scores(checkpoint: Path, image: Image.Image) -> torch.Tensor:
    loaded = load_trained(checkpoint)
    pre = loaded.preprocess
    x = pre.to_tensor()(pre.resize()(image)).unsqueeze(0)
    with torch.no_grad():
        return loaded.model(x, text_features=loaded.model.class_text_features()).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- import and scoring --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, prefix, invariant", [
    (torch.float32, "", False), (torch.float16, "module.", False), (torch.float32, "module.", True),
    (torch.float16, "", True)], ids=["fp32", "fp16-module", "fp32-module-invariant", "fp16-invariant"])
def test_import_and_score_exactly_as_the_authors_method(setup, tmp_path: Path, dtype, prefix, invariant) -> None:
    clip = setup["clip"]
    s1, s2 = authors_files(clip, invariant=invariant)
    s1_path, s2_path = save(s1, tmp_path / "s1.pth", dtype, prefix), save(s2, tmp_path / "s2.pth", dtype, prefix)
    out = tmp_path / "imported"
    assert main(["import-official", "--clip", str(setup["clip_path"]), "--stage1", str(s1_path), "--stage2",
                 str(s2_path), "--dataset", "rafdb", "--out", str(out)]) == 0
    meta2 = json.loads((out / "stage2.json").read_text())
    assert meta2["config"]["compat"] == "authors" and meta2["config"]["cat"]["vision_prompts"] == "overwrite"
    assert meta2["config"]["data"]["prompt_names"][2] == "disgusted" and meta2["class_names"][2] == "disgust"
    assert meta2["imported_from"]["stage2"]["sha256"] and meta2["config"]["eva"]["kd_target"] == "raw"
    files = ({k: v.to(dtype) for k, v in s1.items()}, {k: v.to(dtype) for k, v in s2.items()})  # as stored
    for i in range(2):
        image = face_image(i)
        for stage, ckpt in ((1, out / "stage1.safetensors"), (2, out / "stage2.safetensors")):
            got, want = ceprompt_scores(ckpt, image), reference_scores(clip, files, stage, image)
            assert rel_err(got, want) < 1e-5, (stage, rel_err(got, want))
    assert ceprompt.load(out).checkpoint.name == "stage2.safetensors"  # a folder loads its latest stage


def test_authors_stage1_test_scoring_behind_its_own_switch(setup, tmp_path: Path) -> None:
    """The authors' stage-1 test() scores with unnormalised text embeddings: off by default, on by switch."""
    s1, s2 = authors_files(setup["clip"])
    out = tmp_path / "imp"
    assert main(["import-official", "--clip", str(setup["clip_path"]), "--stage1", str(save(s1, tmp_path / "s1.pth")),
                 "--dataset", "rafdb", "--out", str(out)]) == 0
    image = face_image(3)
    normal = ceprompt_scores(out / "stage1.safetensors", image)
    assert rel_err(normal, reference_scores(setup["clip"], (s1, s2), 1, image)) < 1e-5
    loaded = load_trained(out / "stage1.safetensors", ["eva.raw_text_at_eval=true"])  # what `eval --set` does
    pre = loaded.preprocess
    with torch.no_grad():
        loaded.model.eval()
        raw = loaded.model(pre.to_tensor()(pre.resize()(image)).unsqueeze(0),
                           text_features=loaded.model.class_text_features()).logits
    want = reference_scores(setup["clip"], (s1, s2), 1, image, raw_text=True)
    assert rel_err(raw, want) < 1e-5 and rel_err(raw, normal) > 1e-4
    report = tmp_path / "raw-eval"
    assert main(["eval", "--checkpoint", str(out), "--data", str(setup["data"]), "--out", str(report),
                 "--set", "eva.raw_text_at_eval=true", "--no-progress", "--workers", "0"]) == 0
    assert main(["eval", "--checkpoint", str(out), "--data", str(setup["data"]), "--out", str(tmp_path / "x"),
                 "--set", "head.top_k=3", "--no-progress"]) == 1  # what the model learned cannot change


def test_eval_predict_serve_and_onnx_on_imported_models(setup, tmp_path: Path) -> None:
    clip = setup["clip"]
    s1, s2 = authors_files(clip)
    out = tmp_path / "imp"
    assert main(["import-official", "--clip", str(setup["clip_path"]), "--stage1", str(save(s1, tmp_path / "a.pth")),
                 "--stage2", str(save(s2, tmp_path / "b.pth")), "--dataset", "rafdb", "--out", str(out)]) == 0
    data = setup["data"]
    for stage in (1, 2):
        ckpt = out / f"stage{stage}.safetensors"
        report = tmp_path / f"eval{stage}"
        assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(report),
                     "--no-progress", "--workers", "0", "--precision", "fp32"]) == 0  # exact in fp32
        with open(report / "predictions.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 14
        for row in rows[:3]:  # score_<class> columns are the head's logits, as the reference computes them
            want = reference_scores(clip, (s1, s2), stage, Image.open(row["path"]).convert("RGB"))[0]
            got = torch.tensor([float(row[f"score_{c}"]) for c in ceprompt.load(ckpt).class_names])
            assert (got - want).abs().max() < 2e-6
        pred = tmp_path / f"pred{stage}.csv"
        assert main(["predict", str(ckpt), rows[0]["path"], "--detect", "none", "-o", str(pred), "--no-progress"]) == 0
        assert pred.read_text().count("\n") == 2
        onnx = pytest.importorskip("onnxruntime")
        assert main(["export", "onnx", str(ckpt), str(tmp_path / f"m{stage}.onnx")]) == 0
        assert onnx  # the export's own check compared onnxruntime with PyTorch (1e-4)
    from fastapi.testclient import TestClient

    from ceprompt.server.app import create_app, guarded

    client = TestClient(guarded(create_app(ceprompt.load(out)), "127.0.0.1", 10_000_000),
                        base_url="http://127.0.0.1:8000")
    import io

    buf = io.BytesIO()
    face_image(5).save(buf, format="PNG")
    body = client.post("/api/predict", files={"file": ("f.png", buf.getvalue(), "image/png")},
                       params={"detect": "none"}).json()
    assert body["classes"][2] == "disgust" and len(body["faces"]) == 1


# --- refusals, one line naming the key --------------------------------------------------------------------

def _import(setup, tmp_path, s1, s2=None, dataset="rafdb", clip=None):
    args = ["import-official", "--clip", str(clip or setup["clip_path"]), "--stage1", str(save(s1, tmp_path / "s1.pth")),
            "--dataset", dataset, "--out", str(tmp_path / "out")]
    if s2 is not None:
        args += ["--stage2", str(save(s2, tmp_path / "s2.pth"))]
    return main(args)


def test_missing_extra_and_misshaped_keys_are_named(setup, tmp_path: Path, capsys) -> None:
    s1, s2 = authors_files(setup["clip"])
    broken = dict(s1)
    del broken["transformer.resblocks.5.mlp.c_fc.bias"]
    assert _import(setup, tmp_path, broken) == 1
    assert "missing transformer.resblocks.5.mlp.c_fc.bias" in capsys.readouterr().err
    assert _import(setup, tmp_path, {**s1, "head.weight": torch.zeros(3)}) == 1
    assert "unexpected head.weight" in capsys.readouterr().err
    assert _import(setup, tmp_path, {**s1, "projection_dist": torch.zeros(64, 16)}) == 1
    err = capsys.readouterr().err
    assert re.search(r"wrong shape projection_dist \(64, 16\) \(expected \(64, 32\)\)", err) and err.count("\n") == 1
    broken2 = dict(s2)
    del broken2["prompt_learner.compound_prompt_projections.3.bias"]
    assert _import(setup, tmp_path, s1, broken2) == 1
    assert "missing prompt_learner.compound_prompt_projections.3.bias" in capsys.readouterr().err
    assert not (tmp_path / "out" / "stage1.safetensors").exists()


def test_wrong_clip_dataset_or_stage1_file_is_reported(setup, tmp_path: Path, capsys) -> None:
    s1, s2 = authors_files(setup["clip"])
    other = tmp_path / "other.safetensors"
    save_clip_safetensors(fp16_exact_clip(seed=7), get_arch(ARCH), other)
    assert _import(setup, tmp_path, s1, clip=other) == 1
    err = capsys.readouterr().err
    assert "frozen tensor conv1.weight differs from" in err and "trained on another CLIP" in err
    assert _import(setup, tmp_path, s1, s2, dataset="affectnet7") == 1
    err = capsys.readouterr().err
    assert "class words surprise, fear, disgusted, happy, sad, anger, neutral" in err and "pass --dataset rafdb" in err
    other_s1, _ = authors_files(setup["clip"], seed=9)
    assert _import(setup, tmp_path, other_s1, s2) == 1
    assert "was not trained from this stage-1 file" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        load_trained(tmp_path / "out")
