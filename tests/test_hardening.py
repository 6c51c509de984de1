"""Hostile and unusual files, destructive flags, silent wrong results (issue 13, sections 1-3 and 6)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Tuple

import pytest
import torch
import yaml
from safetensors.torch import load_file

import ceprompt
from ceprompt.cli import main
from ceprompt.core.errors import CheckpointError, TrainingError
from ceprompt.core.io_utils import atomic_write
from ceprompt.core.owned_dirs import MARKER
from ceprompt.model.clip import build_clip, get_arch, tokenize
from ceprompt.weights.checkpoint import read_checkpoint, save_checkpoint
from ceprompt.weights.clip_files import load_clip, save_clip_safetensors

from helpers import write_three_file_dataset


def tiny_args(root: Path, data: Path, name: str, *extra: str, clip: Path | None = None) -> list[str]:
    sets = [f"data.root={data}", "data.workers=0", "optim.epochs=1", "optim.batch_size=7", "optim.warmup_epochs=0",
            f"run.output_dir={root / 'runs'}", f"run.name={name}", "run.device=cpu", "run.progress=false",
            "head.top_k=4", "cat.prompt_depth=3", f"backbone.path={clip}" if clip else "backbone.arch=tiny-vit",
            *extra]
    return ["--config", "rafdb_stage1", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_three_file_dataset(tmp_path_factory.mktemp("hard") / "RAF-DB", "rafdb", n_train=2, n_test=1)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lock"}


# --- 1. no code from a file ever runs ----------------------------------------------------------------


class _Exploit(torch.nn.Module):
    """A TorchScript module whose __setstate__ (run by torch.jit.load) prints and writes a file."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.w = state[0]
        self.training = state[1]
        print("pwned by the archive")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w


def _exploit_archive(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_Exploit()), str(path))
    return path


def test_torchscript_code_never_runs(tmp_path: Path, capfd) -> None:
    evil = _exploit_archive(tmp_path / "ViT-B-16.pt")
    with warnings.catch_warnings():  # proof that the archive does run code when torch.jit loads it
        warnings.simplefilter("ignore")
        torch.jit.load(str(evil))
    assert "pwned by the archive" in capfd.readouterr().out
    with pytest.raises(CheckpointError, match="refused to read the TorchScript archive"):
        load_clip(evil)
    assert main(["convert", str(evil), str(tmp_path / "out.safetensors")]) == 1
    captured = capfd.readouterr()
    assert "pwned" not in captured.out + captured.err and "never runs their code" in captured.err
    assert not (tmp_path / "out.safetensors").exists()


def _openai_model_module():
    """OpenAI's own CLIP model code (the openai-clip package), loaded without its package __init__."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openai-clip is not installed")
    path = Path(spec.submodule_search_locations[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quick_gelu_name", ["QuickGELU"])
def test_openai_archive_layout_converts_losslessly(tmp_path: Path, quick_gelu_name: str) -> None:
    oa = _openai_model_module()
    torch.manual_seed(0)
    model = oa.CLIP(embed_dim=48, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                    transformer_layers=2)
    oa.convert_weights(model)  # fp16, as OpenAI ships them
    model.eval()
    image, text = torch.randn(2, 3, 32, 32).half(), tokenize(["a face"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"forward": (image, text), "encode_image": (image,),
                                                "encode_text": (text,)}, check_trace=False)
        torch.jit.save(traced, str(tmp_path / "ViT-tiny.pt"))
    dst = tmp_path / "converted.safetensors"
    assert main(["convert", str(tmp_path / "ViT-tiny.pt"), str(dst)]) == 0
    loaded = load_clip(dst)
    assert loaded.spec.quick_gelu and loaded.format == "safetensors"
    want = {k: v.float() for k, v in model.state_dict().items()}
    got = load_file(dst)
    assert set(want) <= set(got)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _stage1_on_clip_file(root: Path, data: Path, name: str = "s1") -> tuple[Path, Path]:
    clip = root / "clip.safetensors"
    if not clip.exists():
        save_clip_safetensors(build_clip("tiny-vit", seed=0), get_arch("tiny-vit"), clip)
    assert main(["train", *tiny_args(root, data, name, clip=clip)]) == 0
    return clip, root / "runs" / name


def test_recorded_backbone_is_verified_and_found_beside_the_checkpoint(tmp_path: Path, data: Path, capfd,
                                                                      monkeypatch) -> None:
    clip, run = _stage1_on_clip_file(tmp_path, data)
    ckpt = run / "checkpoints" / "best.safetensors"
    # a "bundle": checkpoint and CLIP moved together to a new place, paths recorded relative
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    tensors, meta, _ = read_checkpoint(ckpt)
    shutil.copy(clip, bundle / "clip.safetensors")
    save_checkpoint(bundle / "model.safetensors", tensors,
                    {**meta, "backbone": {**meta["backbone"], "path": "clip.safetensors", "relpath": None}})
    # the working directory holds a TorchScript exploit under the same name: it must not be the one read
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    _exploit_archive(elsewhere / "clip.safetensors")
    monkeypatch.chdir(elsewhere)
    rec = ceprompt.load(bundle / "model.safetensors", device="cpu")
    assert rec.class_names == meta["class_names"]
    # the file beside the checkpoint replaced by the exploit: refused by its SHA-256 before it is opened
    _exploit_archive(bundle / "clip.safetensors")
    with pytest.raises(CheckpointError, match=r"clip.safetensors is not the file it was made with \(SHA-256"):
        ceprompt.load(bundle / "model.safetensors", device="cpu")
    assert "pwned" not in capfd.readouterr().out


def test_verified_hashes_are_cached_by_size_and_mtime(tmp_path: Path, data: Path, monkeypatch) -> None:
    import ceprompt.core.io_utils as io_utils

    monkeypatch.setenv("CEPROMPT_CACHE", str(tmp_path / "cache"))
    clip = tmp_path / "clip.safetensors"
    save_clip_safetensors(build_clip("tiny-vit", seed=0), get_arch("tiny-vit"), clip)
    calls = []
    real = io_utils.sha256_file
    monkeypatch.setattr(io_utils, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    first = io_utils.verified_sha256(clip)
    assert io_utils.verified_sha256(clip) == first and len(calls) == 1
    os.utime(clip, ns=(1, 1))  # touched: hashed again
    assert io_utils.verified_sha256(clip) == first and len(calls) == 2


# --- 2. nothing the user had is lost -------------------------------------------------------------------


def test_overwrite_never_deletes_what_ceprompt_did_not_create(tmp_path: Path, data: Path, monkeypatch,
                                                               capsys) -> None:
    before = snapshot(data)
    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    monkeypatch.chdir(project)
    for name_args in (["--name", "."], ["--name", str(data)], ["--name", ".."]):
        assert main(["train", *tiny_args(tmp_path, data, "x"), *name_args, "--overwrite"]) == 1
        assert "run.name=" in capsys.readouterr().err
    # an existing folder that is not a ceprompt run: the dataset itself, as a run directory
    assert main(["train", *tiny_args(tmp_path, data, data.name), "--output-dir", str(data.parent),
                 "--overwrite"]) == 1
    assert "was not created by ceprompt" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", ".", "--overwrite", "--no-progress"]) == 1
    assert "was not created by ceprompt" in capsys.readouterr().err
    assert snapshot(data) == before and (project / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_run_only_once_the_new_one_has_a_checkpoint(tmp_path: Path, data: Path, capsys,
                                                                          monkeypatch) -> None:
    import ceprompt.model.eva

    assert main(["train", *tiny_args(tmp_path, data, "r")]) == 0
    run = tmp_path / "runs" / "r"
    assert (run / MARKER).is_file()
    before = snapshot(run)
    # invalid inputs (a wrong --data): refused before anything is touched
    assert main(["train", *tiny_args(tmp_path, tmp_path / "no-such-data", "r"), "--overwrite"]) == 1
    assert "dataset root folder not found" in capsys.readouterr().err
    assert snapshot(run) == before
    # a new run that fails in its first epoch: the old run is put back as it was
    real = ceprompt.model.eva.emotion_scores
    monkeypatch.setattr(ceprompt.model.eva, "emotion_scores", lambda *a: real(*a) * float("nan"))
    assert main(["train", *tiny_args(tmp_path, data, "r"), "--overwrite"]) == 1
    assert snapshot(run) == before and not [p for p in run.parent.iterdir() if "replaced" in p.name]
    monkeypatch.undo()
    # a new run that succeeds replaces the old one
    assert main(["train", *tiny_args(tmp_path, data, "r", "run.seed=5"), "--overwrite"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["seed"] == 5
    assert not [p for p in run.parent.iterdir() if "replaced" in p.name]


def test_a_failed_start_does_not_block_a_retry(tmp_path: Path, data: Path, capsys, monkeypatch) -> None:
    import ceprompt.model.eva

    real = ceprompt.model.eva.emotion_scores
    monkeypatch.setattr(ceprompt.model.eva, "emotion_scores", lambda *a: real(*a) * float("nan"))
    assert main(["train", *tiny_args(tmp_path, data, "f")]) == 1
    run = tmp_path / "runs" / "f"
    assert "training stopped: non-finite loss" in (run / "train.log").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 1
    assert "nothing to resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", *tiny_args(tmp_path, data, "f")]) == 0  # the same command again, no --overwrite
    assert (run / "checkpoints" / "best.safetensors").is_file()


def test_a_run_in_use_is_never_written_by_a_second_process(tmp_path: Path, data: Path, capsys) -> None:
    assert main(["train", *tiny_args(tmp_path, data, "busy")]) == 0
    run = tmp_path / "runs" / "busy"
    before = snapshot(run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from ceprompt.core.owned_dirs import DirLock; held = DirLock(Path(sys.argv[1])).acquire(); "
                               "print('locked', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "--resume", str(run), "--set", "optim.epochs=2"]) == 1
        assert f"in use by another ceprompt process (PID {holder.pid})" in capsys.readouterr().err
        assert main(["train", *tiny_args(tmp_path, data, "busy"), "--overwrite"]) == 1
        assert f"PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(run) == before


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_export_checks_both_outputs_before_writing(tmp_path: Path, data: Path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["train", *tiny_args(tmp_path, data, "e")]) == 0
    (tmp_path / "fer.json").write_text("precious")
    assert main(["export", "onnx", str(tmp_path / "runs" / "e"), str(tmp_path / "fer.onnx")]) == 1
    assert "fer.json: already exists" in capsys.readouterr().err
    assert (tmp_path / "fer.json").read_text() == "precious" and not (tmp_path / "fer.onnx").exists()


# --- 3. no silently wrong results ---------------------------------------------------------------------


def test_stage2_refuses_a_changed_stage1_checkpoint(tmp_path: Path, data: Path, capsys) -> None:
    assert main(["train", *tiny_args(tmp_path, data, "s1")]) == 0
    s1 = tmp_path / "runs" / "s1"
    assert main(["train", *tiny_args(tmp_path, data, "s2", "stage=cat"), "--init", str(s1),
                 "--config", "rafdb_stage2"]) == 0
    s2 = tmp_path / "runs" / "s2"
    ceprompt.load(s2, device="cpu")
    # stage 1 retrained under the same name: the stage-2 model no longer describes what it was built on
    assert main(["train", *tiny_args(tmp_path, data, "s1", "run.seed=9"), "--overwrite"]) == 0
    with pytest.raises(CheckpointError) as err:
        ceprompt.load(s2, device="cpu")
    message = str(err.value)
    assert str(s2 / "checkpoints" / "best.safetensors") in message and "s1/checkpoints/best.safetensors" in message
    assert "is not the file it was made with" in message
    capsys.readouterr()
    assert main(["predict", str(s2), str(data), "--detect", "none", "--no-progress"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_non_finite_weights_stop_training_and_are_never_saved(tmp_path: Path, data: Path, capsys,
                                                               monkeypatch) -> None:
    from ceprompt.engine import train as train_module

    assert main(["train", *tiny_args(tmp_path, data, "w")]) == 0
    run = tmp_path / "runs" / "w"
    before = snapshot(run / "checkpoints")

    def nan_lr(optimizer, lr):  # an optimiser step that turns the weights into NaN while the loss is finite
        for group in optimizer.param_groups:
            group["lr"] = float("nan")

    monkeypatch.setattr(train_module, "apply_lr", nan_lr)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "optim.epochs=2"]) == 1
    assert "non-finite weights after epoch 2, batch 1" in capsys.readouterr().err
    assert snapshot(run / "checkpoints") == before
    tensors, meta, _ = read_checkpoint(run)
    tensors[next(iter(tensors))][0] = float("inf")
    with pytest.raises(TrainingError, match="refusing to save non-finite weights"):
        save_checkpoint(tmp_path / "bad.safetensors", tensors, meta)
    assert not (tmp_path / "bad.safetensors").exists()


def test_onnx_check_is_nan_safe(tmp_path: Path, data: Path, capsys, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    import ceprompt.verbs.export_onnx as export_onnx

    assert main(["train", *tiny_args(tmp_path, data, "o")]) == 0
    monkeypatch.setattr(export_onnx, "_check", lambda *a: {"max_abs_diff": float("nan"), "tolerance": 1e-4})
    assert main(["export", "onnx", str(tmp_path / "runs" / "o"), str(tmp_path / "o.onnx")]) == 1
    assert "differs from PyTorch by nan" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


CRAFTED = [
    (lambda m: m.pop("config"), "description field config="),
    (lambda m: m.pop("stage"), "description field stage="),
    (lambda m: m.update(class_names="abc"), "description field class_names='abc'"),
    (lambda m: m.update(class_names=[]), "description field class_names="),
    (lambda m: m.update(calibration={"temperature": "NaN"}), "calibration.temperature"),
    (lambda m: m["clip_spec"].update(vision_heads=0), "clip_spec.vision_heads"),
    (lambda m: m["clip_spec"].update(vision_heads=3), "impossible CLIP shape"),
    (lambda m: m["preprocess"].update(std=[0, 1, 1]), "preprocess.std"),
]


@pytest.mark.parametrize("edit, message", CRAFTED, ids=[m for _, m in CRAFTED])
def test_crafted_checkpoint_metadata_is_refused_in_one_line(tmp_path: Path, data: Path, edit, message) -> None:
    tensors, meta, _ = read_checkpoint(_trained_stage1(tmp_path, data))
    edit(meta)
    save_checkpoint(tmp_path / "crafted.safetensors", tensors, meta)
    with pytest.raises(CheckpointError) as err:
        ceprompt.load(tmp_path / "crafted.safetensors", device="cpu")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wrong_tensor_shapes_are_refused(tmp_path: Path, data: Path) -> None:
    tensors, meta, _ = read_checkpoint(_trained_stage1(tmp_path, data))
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3, 3)
    save_checkpoint(tmp_path / "crafted.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match=re.escape(f"{name} (3, 3) vs")):
        ceprompt.load(tmp_path / "crafted.safetensors", device="cpu")


_STAGE1: dict[str, Path] = {}


def _trained_stage1(tmp_path: Path, data: Path) -> Path:
    if "run" not in _STAGE1 or not _STAGE1["run"].exists():
        root = tmp_path.parent / "shared-stage1"
        assert main(["train", *tiny_args(root, data, "s1")]) == 0
        _STAGE1["run"] = root / "runs" / "s1"
    return _STAGE1["run"]


# --- 6. options and errors: one line, before any work ---------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["predict", "ckpt", "x.png", "--batch-size", "-1"], "argument --batch-size: '-1' is not an integer >= 1"),
    (["predict", "ckpt", "x.png", "--batch-size", "0"], "--batch-size"),
    (["predict", "ckpt", "x.png", "--min-face", "0"], "--min-face"),
    (["predict", "ckpt", "x.png", "--min-face", "-5"], "--min-face"),
    (["predict", "ckpt", "x.png", "--threshold", "1.5"], "--threshold"),
    (["predict", "ckpt", "x.png", "--threshold", "nan"], "--threshold"),
    (["eval", "--checkpoint", "c", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["eval", "--checkpoint", "c", "--data", "d", "--batch-size", "-1"], "--batch-size"),
    (["serve", "--max-upload-mb", "0"], "--max-upload-mb"),
])
def test_numeric_options_are_validated_by_the_parser(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_outputs_are_checked_before_the_model_loads(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    missing_ckpt = str(tmp_path / "no-such-checkpoint")
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    cases = [
        (["predict", missing_ckpt, str(image), "-o", str(blocker / "x.csv")], "file.txt is a file, not a folder"),
        (["predict", missing_ckpt, str(image), "--annotate", str(blocker)], "is a file; expected a folder"),
        (["eval", "--checkpoint", missing_ckpt, "--data", str(tmp_path), "--out", str(blocker / "sub")],
         "file.txt is a file, not a folder"),
        (["eval", "--checkpoint", missing_ckpt, "--data", str(tmp_path), "--out", "/sys/ceprompt-eval"],
         "cannot write in /sys/ceprompt-eval"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and "no-such-checkpoint" not in err and len(err.splitlines()) == 1, err
    # a missing folder for the output file is created, not a traceback
    (tmp_path / "crop.png").write_bytes(b"")
    assert main(["predict", missing_ckpt, str(image), "-o", str(tmp_path / "new" / "x.csv")]) == 1
    assert "no-such-checkpoint" in capsys.readouterr().err and (tmp_path / "new").is_dir()


def test_full_disk_during_a_checkpoint_write_is_one_line(tmp_path: Path, data: Path, capsys,
                                                         monkeypatch) -> None:
    import safetensors.torch

    assert main(["train", *tiny_args(tmp_path, data, "disk")]) == 0
    run = tmp_path / "runs" / "disk"
    before = snapshot(run / "checkpoints")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "optim.epochs=2"]) == 1
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and "previous file, if any, is intact" in err
    assert len(err.splitlines()) == 1
    assert snapshot(run / "checkpoints") == before


def test_resume_with_another_optimiser_is_one_line(tmp_path: Path, data: Path, capsys) -> None:
    assert main(["train", *tiny_args(tmp_path, data, "opt")]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "runs" / "opt"), "--set", "optim.name=sgd",
                 "--set", "optim.epochs=2"]) == 1
    err = capsys.readouterr().err.strip()
    assert "optim.name='adamw' in the saved state, 'sgd' now" in err and len(err.splitlines()) == 1


def test_loading_a_demo_model_says_what_it_is(tmp_path: Path, data: Path) -> None:
    notice = "Demo model: drawn faces only"
    assert main(["train", *tiny_args(tmp_path, data, "demo-like", f"run.notice='{notice}'")]) == 0
    with pytest.warns(UserWarning, match=notice):
        rec = ceprompt.load(tmp_path / "runs" / "demo-like", device="cpu")
    assert rec.notice == notice
    assert json.loads((tmp_path / "runs" / "demo-like" / "checkpoints" / "best.json").read_text())["notice"] == notice
