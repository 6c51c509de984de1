"""Models by name and on the Hugging Face Hub, offline: a temporary HF cache written by huggingface_hub itself
(downloading from a local stand-in for the Hub), CLIP names, exported models, and the installable wheel."""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import sysconfig
import threading
import venv
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import ceprompt
from ceprompt.cli import main
from ceprompt.model.clip import build_clip

from helpers import train_tiny_runs, write_three_file_dataset

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OPENAI_B16_REPO = "timm/vit_base_patch16_clip_224.openai"  # where open_clip's registry puts ViT-B-16:openai


class _Hub(http.server.BaseHTTPRequestHandler):
    """The few endpoints huggingface_hub's downloads use, served from a folder ``ORG/NAME/FILE``."""

    root: Path

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, send_body: bool = True):
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._handle(True)

    def do_HEAD(self) -> None:
        self._handle(False)

    def _handle(self, send_body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 5:
            repo = self.root / parts[2] / parts[3]
            files = sorted(p for p in repo.iterdir() if p.is_file()) if repo.is_dir() else []
            if not files:
                return self._send(404, headers={"X-Error-Code": "RepoNotFound"})
            if parts[4] == "tree":
                listing = [{"type": "file", "path": p.name, "size": p.stat().st_size,
                            "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files]
            else:
                listing = {"id": f"{parts[2]}/{parts[3]}", "sha": COMMIT, "siblings": [{"rfilename": p.name}
                                                                                         for p in files]}
            return self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, send_body)
        if len(parts) >= 5 and parts[2] == "resolve":
            path = self.root / parts[0] / parts[1] / "/".join(parts[4:])
            if path.is_file():
                data = path.read_bytes()
                return self._send(200, data, {"X-Repo-Commit": COMMIT,
                                              "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, send_body)
            return self._send(404, headers={"X-Error-Code": "EntryNotFound"})
        self._send(404)


def fill_cache(repos: Path, cache: Path, downloads: list[tuple[str, str | None]]) -> None:
    """Download ``(repo, file)`` pairs (``file`` None: the whole repo) into ``cache`` from a local Hub."""
    from huggingface_hub import hf_hub_download, snapshot_download

    handler = type("Hub", (_Hub,), {"root": repos})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for repo, filename in downloads:
            if filename is None:
                snapshot_download(repo, cache_dir=cache, endpoint=endpoint)
            else:
                hf_hub_download(repo, filename, cache_dir=cache, endpoint=endpoint)
    finally:
        server.shutdown()


def offline_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "CEPROMPT_CACHE": str(cache.parent / "cc")}


def run(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ceprompt", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    repos = root / "repos"
    clip = build_clip("tiny-vit", seed=0)
    b16 = repos / OPENAI_B16_REPO
    b16.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(b16 / "open_clip_model.safetensors"))
    gelu = repos / "lab" / "tiny-gelu-clip"
    gelu.mkdir(parents=True)
    import dataclasses

    from ceprompt.model.clip import get_arch

    gelu_model = build_clip(dataclasses.replace(get_arch("tiny-vit"), quick_gelu=False), seed=1)
    save_file({k: v.contiguous() for k, v in gelu_model.state_dict().items()}, str(gelu / "open_clip_model.safetensors"))
    (gelu / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": False}}))
    runs = train_tiny_runs(root / "trained")
    assert main(["export", "hub", str(runs["s2"]), str(repos / "lab" / "fer-tiny"), "--dtype", "fp32"]) == 0
    cache = root / "hf-cache"
    fill_cache(repos, cache, [(OPENAI_B16_REPO, "open_clip_model.safetensors"),
                              ("lab/tiny-gelu-clip", None), ("lab/fer-tiny", None)])
    return {"root": root, "cache": cache, "clip": clip, "gelu": gelu_model, "runs": runs, "repos": repos}


def test_cache_has_the_layout_huggingface_hub_writes(hub) -> None:
    snapshot = hub["cache"] / "models--lab--fer-tiny" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_symlink() and (hub["cache"] / "models--lab--fer-tiny" / "refs" /
                                                               "main").read_text() == COMMIT


def test_clip_names_resolve_offline_from_the_cache(hub, tmp_path: Path) -> None:
    env = offline_env(hub["cache"])
    data = write_three_file_dataset(tmp_path / "RAF-DB", "rafdb", n_train=1, n_test=1)
    sets = [f"data.root={data}", "data.workers=0", "optim.epochs=1", "optim.batch_size=7", "optim.warmup_epochs=0",
            "head.top_k=4", "run.device=cpu"]
    # the shipped config names ViT-B-16: no --clip, no path
    out = run(["train", "--config", "rafdb_stage1", *[a for s in sets for a in ("--set", s)], "--output-dir",
               str(tmp_path / "runs"), "--name", "named", "--no-progress"], env)
    assert out.returncode == 0, out.stderr[-2000:]
    meta = json.loads((tmp_path / "runs" / "named" / "checkpoints" / "best.json").read_text())
    assert meta["backbone"]["name"] == "ViT-B-16:openai"
    assert "models--timm--vit_base_patch16_clip_224.openai/snapshots" in meta["backbone"]["path"]
    # an hf-hub: open_clip repo records its activation (GELU here) in open_clip_config.json
    code = ("import sys, torch; from ceprompt.weights.build import load_backbone; from ceprompt.experiment.config import "
            "BackboneConfig; b = load_backbone(BackboneConfig(path=sys.argv[1])); print(b.spec.quick_gelu); "
            "torch.save(b.clip.state_dict(), sys.argv[2])")
    out = subprocess.run([sys.executable, "-c", code, "hf-hub:lab/tiny-gelu-clip", str(tmp_path / "sd.pt")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"
    got = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert all(torch.equal(got[k], v) for k, v in hub["gelu"].state_dict().items())
    # a name whose file is not cached, offline: one line saying which file is needed and where
    missing = run(["train", "--config", "rafdb_stage1", "--clip", "ViT-L-14:openai",
                   *[a for s in sets for a in ("--set", s)], "--output-dir", str(tmp_path / "runs"), "--name", "l14"],
                  env)
    err = missing.stderr.strip().splitlines()[-1]
    assert missing.returncode == 1 and "ViT-L-14:openai: needs open_clip_model.safetensors" in err
    assert "timm/vit_large_patch14_clip_224.openai" in err and str(hub["cache"]) in err


def test_without_a_network_the_cache_is_used_at_once_and_said_once(hub, tmp_path: Path) -> None:
    """No HF_HUB_OFFLINE, and the Hub unreachable (a closed port stands in for a machine without internet):
    one warning, the cached file used, a missing one refused in seconds with the command that fetches it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {k: v for k, v in offline_env(hub["cache"]).items()
           if k not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed}"
    code = ("import sys; from ceprompt.weights.hub import hub_reachable, resolve_clip\n"
            "print(resolve_clip('ViT-B-16').path)\n"
            "try:\n    resolve_clip('ViT-L-14:openai')\n"
            "finally:\n    print('probes', hub_reachable.cache_info().misses)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    # the mechanism, not the clock: one quick probe for the whole process, then the cache; no retry loop
    assert "probes 1" in out.stdout and "Retrying" not in out.stderr and "retry" not in out.stderr.lower()
    assert "models--timm--vit_base_patch16_clip_224.openai" in out.stdout
    assert out.stderr.count("cannot be reached") == 1, out.stderr[-3000:]
    assert "ViT-L-14:openai: needs open_clip_model.safetensors" in out.stderr
    assert "`hf download timm/vit_large_patch14_clip_224.openai" in out.stderr


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_an_exported_model_loads_from_the_hub_offline_with_the_same_predictions(hub, tmp_path: Path) -> None:
    env = offline_env(hub["cache"])
    image = tmp_path / "face.png"
    Image.new("RGB", (80, 80), (150, 120, 100)).save(image)
    original = tmp_path / "original.csv"
    assert main(["predict", str(hub["runs"]["s2"]), str(image), "--detect", "none", "-o", str(original),
                 "--no-progress"]) == 0
    from_hub = tmp_path / "hub.csv"
    out = run(["predict", "hf-hub:lab/fer-tiny", str(image), "--detect", "none", "-o", str(from_hub), "--no-progress"],
              env)
    assert out.returncode == 0, out.stderr[-2000:]
    want, got = _rows(original)[0], _rows(from_hub)[0]
    assert got["label"] == want["label"]
    assert all(abs(float(got[k]) - float(want[k])) < 1e-5 for k in want if k.startswith("prob_"))
    code = ("import sys, ceprompt; r = ceprompt.load(sys.argv[1], device='cpu'); "
            "print(r.predict(sys.argv[2], detect='none')[0].label)")
    out = subprocess.run([sys.executable, "-c", code, "hf-hub:lab/fer-tiny@main", str(image)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1] == want["label"], out.stderr[-2000:]


def test_export_hub_folder_is_self_contained_and_loads_without_unpickling(hub, tmp_path: Path,
                                                                          monkeypatch) -> None:
    runs = hub["runs"]
    folder = tmp_path / "export"
    assert main(["export", "hub", str(runs["s2"]), str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config_text = (folder / "config.json").read_text()
    assert str(runs["s2"].parent) not in config_text  # no local paths
    config = json.loads(config_text)
    assert config["stage"] == "cat" and config["weights_dtype"] == "fp16" and config["class_names"][0] == "surprise"
    weights = load_file(folder / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert any(k.startswith("clip.visual.") for k in weights) and any(k.startswith("prompt_learner.") for k in weights)
    card = (folder / "README.md").read_text()
    for needle in ("## Evaluation", "accuracy (sample-level)", "rafdb", "License of the backbone weights",
                   'ceprompt.load("hf-hub:ORG/NAME")', "pipeline_tag: image-classification"):
        assert needle in card, needle
    assert main(["export", "hub", str(runs["s2"]), str(folder)]) == 1  # no silent replacement

    def refuse(*args, **kwargs):
        raise AssertionError("a model folder must load without unpickling anything")

    monkeypatch.setattr(torch, "load", refuse)
    import pickle

    monkeypatch.setattr(pickle, "load", refuse)
    rec = ceprompt.load(folder, device="cpu")
    face = Image.new("RGB", (64, 64), (120, 110, 100))
    monkeypatch.undo()
    want = ceprompt.load(runs["s2"], device="cpu").predict(face, detect="none")[0].probabilities
    got = rec.predict(face, detect="none")[0].probabilities
    assert got == pytest.approx(want, abs=2e-3)  # fp16 weights


def test_the_model_card_names_the_data_and_backbone_it_was_given(hub) -> None:
    from ceprompt.verbs.export_hub import hub_config, model_card
    from ceprompt.weights.build import load_trained

    config = hub_config(load_trained(hub["runs"]["s2"]).meta, "fp16")
    card = model_card(config, 1.0)  # trained on data in RAF-DB's layout, no description: taken as RAF-DB
    assert "test split of the training data (RAF-DB;" in card and "non-commercial research" in card
    assert "pip install ceprompt" not in card and 'pip install -e ".[face]"' in card
    config["config"]["data"]["description"] = "faces drawn by `ceprompt demo`, in RAF-DB's folder layout (not RAF-DB)"
    config["config"]["backbone"]["description"] = "the demo CLIP"
    card = model_card(config, 1.0)  # the demo's: its images are not RAF-DB, and RAF-DB's terms are not claimed
    assert "on the rafdb test split" not in card and "RAF-DB is released" not in card
    assert "(not RAF-DB)" in card and "the demo CLIP: ViT" in card and "user-supplied" not in card


def test_the_wheel_installs_and_runs_in_a_fresh_environment(hub, tmp_path: Path) -> None:
    """python -m build gives a wheel with the configs and the web page; installed into a new venv that sees
    this environment's torch, it runs doctor and a prediction."""
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(dist.glob("ceprompt-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "ceprompt/configs/rafdb_stage1.yaml" in names and "ceprompt/server/static/app.js" in names
    assert "ceprompt/server/static/index.html" in names
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # torch and the other dependencies come from this environment (a path entry, not its .pth files)
    Path(site, "deps-from-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    where = subprocess.run([str(python), "-c", "import ceprompt; print(ceprompt.__file__, ceprompt.__version__)"],
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(env_dir)) and ceprompt.__version__ in where
    exe = env_dir / "bin" / "ceprompt"
    doctor = subprocess.run([str(exe), "doctor"], capture_output=True, text=True, timeout=600)
    assert doctor.returncode == 0 and "all checks passed" in doctor.stdout, doctor.stderr[-2000:]
    image = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (120, 110, 100)).save(image)
    pred = subprocess.run([str(exe), "predict", str(hub["runs"]["s1"]), str(image), "--detect", "none",
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert pred.returncode == 0 and len(list(csv.DictReader(io.StringIO(pred.stdout)))) == 1, pred.stderr[-2000:]
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout
    assert version.strip() == f"ceprompt {ceprompt.__version__}"
