"""What a newcomer trips on (issue 23): commands that exist, settings that are used or refused (never silently
ignored), the demo folder as a model, figures from one source, errors that name the mix-up, quiet logs."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from PIL import Image

import ceprompt
from ceprompt.cli import main

from helpers import quick_train_sets, write_three_file_dataset

HERE = Path(__file__).resolve()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_three_file_dataset(tmp_path_factory.mktemp("newcomer") / "RAF-DB", "rafdb", n_train=2, n_test=1)


def sets(root: Path, data: Path, name: str, *extra: str) -> list[str]:
    return quick_train_sets(data, root, name, "cat.prompt_depth=3", *extra)


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory, data) -> Path:
    """A folder laid out as `ceprompt demo` leaves it: stage1/ and stage2/ runs inside."""
    root = tmp_path_factory.mktemp("demo-like") / "demo"
    assert main(["train", "--config", "rafdb_stage1", *sets(root, data, "stage1", "backbone.arch=tiny-vit")]) == 0
    assert main(["train", "--config", "rafdb_stage2", "--init", str(root / "stage1"),
                 *sets(root, data, "stage2")]) == 0
    return root


def face(tmp_path: Path) -> Path:
    path = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (150, 120, 100)).save(path)
    return path


# --- settings used or refused, never ignored ---

def test_init_with_a_stage1_config_is_refused(tmp_path: Path, data: Path, capsys) -> None:
    args = ["train", "--config", "rafdb_stage1", "--init", str(tmp_path / "s1"),
            *sets(tmp_path, data, "x", "backbone.arch=tiny-vit")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--init" in err and "stage 1" in err and not (tmp_path / "x").exists()


def test_top_k_beyond_the_patches_is_refused(tmp_path: Path, data: Path, capsys) -> None:
    args = ["train", "--config", "rafdb_stage1", *sets(tmp_path, data, "k", "backbone.arch=tiny-vit", "head.top_k=100")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "head.top_k=100" in err and "has 64 patches" in err and not (tmp_path / "k").exists()


def test_random_weights_are_said_loudly_and_recorded(tmp_path: Path, data: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ceprompt"):
        assert main(["train", "--config", "rafdb_stage1", *sets(tmp_path, data, "r", "backbone.arch=tiny-vit")]) == 0
    assert any("random weights" in r.getMessage() and "ViT-B-16" in r.getMessage() for r in caplog.records)
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert config["backbone"]["path"] is None and config["backbone"]["arch"] == "tiny-vit"


def test_zero_shot_says_which_settings_and_refuses_a_checkpoint(tmp_path: Path, data: Path, demo_like: Path,
                                                                capsys, caplog) -> None:
    assert main(["eval", "--zero-shot", "--checkpoint", str(demo_like / "stage1"), "--data", str(data)]) == 1
    assert "give one of them" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(demo_like / "stage1"), "--clip", "x.pt", "--data", str(data)]) == 1
    assert "--clip is for --zero-shot" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="ceprompt"):
        assert main(["eval", "--zero-shot", "--data", str(data), "--set", "backbone.arch=tiny-vit", "--set",
                     "head.top_k=4", "--out", str(tmp_path / "zs"), "--no-progress", "--workers", "0"]) == 0
    assert any("shipped config rafdb_stage1" in r.getMessage() for r in caplog.records)


# --- the demo folder, extended runs ---

def test_the_demo_folder_is_a_model(demo_like: Path, tmp_path: Path) -> None:
    rec = ceprompt.load(demo_like, device="cpu")
    assert rec.checkpoint == demo_like / "stage2" / "checkpoints" / "best.safetensors"
    assert main(["predict", str(demo_like), str(face(tmp_path)), "--detect", "none", "-o", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 0


def test_extending_stage1_keeps_the_file_stage2_was_built_on(tmp_path: Path) -> None:
    """More epochs find a better one (42 training faces: the first epoch is at chance), and a new best replaces
    the file the stage-2 run recorded; it is kept under its hash, and the stage-2 run loads as before."""
    data = write_three_file_dataset(tmp_path / "RAF-DB", "rafdb", n_train=6, n_test=2)
    root = tmp_path / "runs"
    assert main(["train", "--config", "rafdb_stage1", *sets(root, data, "s1", "backbone.arch=tiny-vit")]) == 0
    assert main(["train", "--config", "rafdb_stage2", "--init", str(root / "s1"), *sets(root, data, "s2")]) == 0
    image = face(tmp_path)
    before = ceprompt.load(root / "s2", device="cpu", precision="fp32").predict(image, detect="none")[0]
    best = root / "s1" / "checkpoints" / "best.safetensors"
    old = best.read_bytes()
    assert main(["train", "--resume", str(root / "s1"), "--set", "optim.epochs=4"]) == 0
    assert best.read_bytes() != old
    kept = list(best.parent.glob("best-*.safetensors"))
    assert len(kept) == 1 and kept[0].read_bytes() == old
    after = ceprompt.load(root / "s2", device="cpu", precision="fp32").predict(image, detect="none")[0]
    assert after.probabilities == before.probabilities


def test_an_unchanged_best_leaves_no_copy_and_no_lock(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "runs"
    assert main(["train", "--config", "rafdb_stage1", *sets(root, data, "s1", "backbone.arch=tiny-vit")]) == 0
    best = root / "s1" / "checkpoints" / "best.safetensors"
    before = best.read_bytes()
    # resuming a finished run trains no epoch; its final evaluation fits the same temperature, so the best
    # checkpoint is the same file (its hash, which stage-2 runs record, unchanged) and needs no kept copy
    assert main(["train", "--resume", str(root / "s1")]) == 0
    assert best.read_bytes() == before
    assert not list(best.parent.glob("best-*.safetensors")) and not (root / "s1" / ".lock").exists()


# --- errors that name the mix-up ---

def test_a_failed_eval_leaves_no_empty_folder(tmp_path: Path, data: Path, monkeypatch) -> None:
    out = tmp_path / "reports" / "e1"
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--data", str(data), "--out", str(out)]) == 1
    assert not (tmp_path / "reports").exists()
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--data", str(data)]) == 1
    assert not (tmp_path / "runs").exists()  # the default runs/eval-<time>


def test_swapped_predict_arguments_are_named(tmp_path: Path, demo_like: Path, capsys) -> None:
    image = face(tmp_path)
    assert main(["predict", str(image), str(demo_like)]) == 1
    err = capsys.readouterr().err
    assert "an image or video, not a model" in err and "ceprompt predict MODEL" in err


def test_convert_checks_the_output_name_first(tmp_path: Path, capsys) -> None:
    (tmp_path / "x.json").write_text("{}")
    assert main(["convert", str(tmp_path / "clip.pt"), str(tmp_path / "x.pt")]) == 1
    assert "must end in .safetensors" in capsys.readouterr().err


def test_label_errors_give_the_line_and_come_with_the_image_errors(tmp_path: Path, capsys) -> None:
    root = write_three_file_dataset(tmp_path / "RAF-DB", "rafdb", n_train=1, n_test=1)
    labels = root / "EmoLabel" / "image_class_labels.txt"
    lines = labels.read_text().splitlines()
    lines[2] = lines[2].split()[0] + " 9"  # line 3: a label outside 1..7
    labels.write_text("\n".join(lines) + "\n")
    images = sorted((root / "Image" / "aligned_224").iterdir())
    images[-1].unlink()  # and a missing image: both reported by the same attempt
    assert main(["train", "--config", "rafdb_stage1", *sets(tmp_path, root, "t", "backbone.arch=tiny-vit")]) == 1
    err = capsys.readouterr().err
    assert "image_class_labels.txt:3:" in err and "outside 1..7" in err
    assert f"{images[-1]}: missing image file" in err


def test_a_demo_folder_in_the_way_names_the_option(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    (out / "stage1").mkdir(parents=True)
    (out / ".ceprompt-run").touch()
    assert main(["demo", "--quick", "--out", str(out)]) == 1
    assert "--out" in capsys.readouterr().err


def test_plain_ceprompt_prints_the_commands(capsys) -> None:
    assert main([]) == 0
    assert "train" in capsys.readouterr().out


def test_each_export_format_has_its_own_help() -> None:
    out = subprocess.run([sys.executable, "-m", "ceprompt", "export", "onnx", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and ".onnx" in out.stdout and "--dtype" not in out.stdout


def test_every_option_has_help() -> None:
    from ceprompt.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    yield from parsers(sub)

    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in parsers(build_parser()) for a in p._actions
               if not a.help and a.dest not in ("help", "verb", "format")]
    assert not missing, missing


# --- figures from one source, and examples that represent the result ---

def test_demo_help_quotes_no_figures() -> None:
    from ceprompt.cli import build_parser

    verbs = next(a for a in build_parser()._actions if a.dest == "verb")
    texts = [verbs.choices["demo"].description or "", *(a.help for a in verbs._choices_actions if a.dest == "demo")]
    assert texts[-1] and not any(ch.isdigit() for text in texts for ch in text), texts  # times live in README


def test_examples_are_right_and_wrong_in_proportion() -> None:
    from ceprompt.demo.report import representative_examples

    rows = []
    for name, right in (("happy", 9), ("sad", 3), ("fear", 0)):  # per class: 9, 3 and 0 right out of 9
        rows += [{"true": name, "predicted": name if i < right else "other", "path": f"{name}{i}"} for i in range(9)]
    picked = representative_examples(rows, per_class=3)
    assert [sum(r["true"] == r["predicted"] for r in group) for group in picked] == [3, 1, 0]
    assert representative_examples(rows, per_class=3) == picked  # seeded


# --- quiet, useful logs ---

def test_paths_in_logs_are_absolute_or_home_relative(monkeypatch, tmp_path: Path) -> None:
    from ceprompt.core.paths import shown

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / ".." if (tmp_path / "..").exists() else tmp_path)
    assert shown(tmp_path / ".cache" / "x.pt") == "~/.cache/x.pt"
    assert shown("relative/file.pt").startswith("/") and ".." not in shown("../x")


def test_the_models_notice_warning_points_at_the_caller(demo_like: Path) -> None:
    from ceprompt.weights.checkpoint import read_checkpoint, save_checkpoint

    best = demo_like / "stage2" / "checkpoints" / "best.safetensors"
    tensors, meta, _ = read_checkpoint(best)
    noticed = best.with_name("noticed.safetensors")
    save_checkpoint(noticed, tensors, {**meta, "notice": "drawn faces only"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ceprompt.load(noticed, device="cpu")
    assert [w.filename for w in caught if "drawn faces" in str(w.message)] == [str(HERE)]


def test_the_page_has_a_favicon() -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ceprompt.server import app as server_app

    html = (Path(server_app.__file__).parent / "static" / "index.html").read_text()
    assert 'rel="icon"' in html

    class Rec:  # the routes for static files need no model
        meta, class_names, notice, checkpoint, temperature = {}, [], None, "", 1.0
        preprocess = type("P", (), {"image_size": 64})()
    client = TestClient(server_app.create_app(Rec()))
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response.headers["content-type"].startswith("image/svg")


def test_hub_commands_are_named_as_the_installed_huggingface_hub_names_them(monkeypatch) -> None:
    import importlib.metadata as md

    from ceprompt.weights.hub import hub_command

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "2.4.0" if name == "huggingface_hub" else real(name))
    assert hub_command("upload") == "hf upload"
    monkeypatch.setattr(md, "version", lambda name: "0.30.2" if name == "huggingface_hub" else real(name))
    assert hub_command("download") == "huggingface-cli download"


def test_readme_tells_cpu_users_how_to_avoid_the_cuda_libraries() -> None:
    readme = (HERE.parents[1] / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme.split("## The demo")[0]
