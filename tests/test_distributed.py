"""Beyond one process (issue 31): predict, embed, eval and video under torchrun (2 CPU processes over gloo) give a
single process's output and divide the work; the device and precision choices for GPUs (mocked capabilities);
what a job changes in the process is restored; resume state read once and each process's teacher cache kept."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ceprompt.cli import main
from ceprompt.core import runtime
from ceprompt.core.errors import ConfigError

from helpers import class_image, train_tiny_runs, write_three_file_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return train_tiny_runs(tmp_path_factory.mktemp("dist"), threads=1)


def torchrun(*args: str, nproc: int = 2, script: str | None = None) -> subprocess.CompletedProcess:
    target = [script] if script else ["-m", "ceprompt"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    from videos import frame, moving, write_video

    folder = tmp_path_factory.mktemp("inputs")
    for i in range(11):
        class_image(i % 7, 7, seed=40 + i, size=64).save(folder / f"face{i:02d}.png")
    positions = moving((10, 20), (200, 40), 8)
    write_video(folder / "clip.mp4", [frame((320, 240), [p]) for p in positions])
    return folder


@pytest.fixture(scope="module")
def verbs(runs, inputs, tmp_path_factory) -> dict:
    """predict, embed and eval in one torchrun job of 2 processes (one after another in the same processes, as a
    user's script may call them), and each in this process alone, with the one thread each of those has."""
    pytest.importorskip("av")
    out = tmp_path_factory.mktemp("verbs")
    common = ["--no-progress", "--device", "cpu", "--precision", "fp32"]
    predict = [str(runs["s2"]), str(inputs), "--detect", "none", "--batch-size", "3", "--video-stride", "1", *common]
    embed = [str(runs["s1"]), str(inputs), "--detect", "none", "--batch-size", "4", *common]
    evaluate = ["--checkpoint", str(runs["s2"]), "--data", str(runs["data"]), "--batch-size", "3", "--workers", "0",
                *common]
    jobs = {name: {"two": [verb, *args, *outputs(out / "two")], "one": [verb, *args, *outputs(out / "one")]}
            for name, verb, args, outputs in (
                ("predict", "predict", predict, lambda d: ["-o", str(d / "rows.csv"), "--summary", str(d / "s.json")]),
                ("embed", "embed", embed, lambda d: ["-o", str(d / "faces.npz")]),
                ("eval", "eval", evaluate, lambda d: ["--out", str(d / "eval")]))}
    proc = torchrun(json.dumps([job["two"] for job in jobs.values()]), script=str(Path(__file__).with_name(
        "torchrun_verbs.py")))
    for job in jobs.values():
        assert main([*job["one"], "--threads", "1"]) == 0
    logs: dict[str, str] = {}
    verb = None
    for line in proc.stderr.splitlines():  # both processes write here: a verb's lines follow its marker
        if line.startswith("@@ceprompt-verb "):
            verb = line.split()[1]
        elif verb is not None:
            logs[verb] = logs.get(verb, "") + line + "\n"
    return {"two": out / "two", "one": out / "one", "logs": logs}


def test_predict_under_torchrun_equals_one_process_and_divides_the_work(verbs) -> None:
    two, one = verbs["two"], verbs["one"]
    assert (two / "rows.csv").read_bytes() == (one / "rows.csv").read_bytes()
    assert (two / "s.json").read_text() == (one / "s.json").read_text()
    with open(one / "rows.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["path"] for r in rows}) == 12 and any(r["frame"] for r in rows)
    # both processes worked, neither did all of it: 4 shares of images (3 per share) and the video's own
    log = verbs["logs"]["predict"]
    done = [int(line.split("process ")[1].split(":")[1].split("share")[0]) for line in log.splitlines()
            if "share(s) of" in line]
    assert len(done) == 2 and min(done) >= 1 and sum(done) == 5, log[-2000:]
    assert not list(two.glob(".*ceprompt-parts"))


def test_embed_under_torchrun_equals_one_process(verbs) -> None:
    two, one = np.load(verbs["two"] / "faces.npz"), np.load(verbs["one"] / "faces.npz")
    assert list(two["paths"]) == list(one["paths"]) and np.array_equal(two["embeddings"], one["embeddings"])


def test_eval_under_torchrun_equals_one_process(verbs) -> None:
    two, one = verbs["two"] / "eval", verbs["one"] / "eval"
    assert (two / "predictions.csv").read_bytes() == (one / "predictions.csv").read_bytes()


def test_a_deterministic_two_process_run_killed_and_resumed_ends_with_the_same_weights(tmp_path: Path) -> None:
    """Each process's teacher cache is saved and given back to that process; the resume state is read by rank 0
    and sent to the other (no storage shared between nodes needed)."""
    import signal
    import time

    from safetensors.torch import load_file

    data = write_three_file_dataset(tmp_path / "RAF-DB", "rafdb", n_train=12, n_test=1)

    def args(name: str) -> list[str]:
        sets = [f"data.root={data}", "backbone.arch=tiny-vit", "data.workers=0", f"run.output_dir={tmp_path}",
                f"run.name={name}", "run.deterministic=true", "run.device=cpu", "run.precision=fp32",
                "optim.batch_size=14", "optim.epochs=8", "optim.warmup_epochs=1", "run.log_to=[]",
                "run.progress=false", "head.top_k=4", "run.final_eval=false"]
        return ["train", "--config", "rafdb_stage1", *[a for s in sets for a in ("--set", s)]]

    torchrun(*args("straight"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ceprompt",
           *args("killed")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    resume = tmp_path / "killed" / "resume.pt"
    while proc.poll() is None and not resume.exists():
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, mid-run
    proc.wait()
    stopped_after = torch.load(resume, weights_only=True)["epoch"]
    torchrun("train", "--resume", str(tmp_path / "killed"))
    state = torch.load(resume, weights_only=True)
    assert len(state["teacher_cache"]["ranks"]) == 2 and stopped_after < 8
    got = load_file(tmp_path / "killed" / "checkpoints" / "last.safetensors")
    want = load_file(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


# --- the GPU choices, on mocked devices ----------------------------------------------------------------------

@pytest.mark.parametrize("capability, precision", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                   ((9, 0), "bf16")])
def test_precision_auto_follows_the_devices_compute_capability(monkeypatch, capability, precision) -> None:
    asked: list[object] = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts as yes there
    chosen, why = runtime.auto_precision(torch.device("cuda:1"))
    assert chosen == precision and f"{capability[0]}.{capability[1]}" in why
    assert asked == [torch.device("cuda:1")]  # the device in use, not GPU 0


def test_cuda_n_under_torchrun_is_refused_and_cuda_takes_the_local_rank(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="each process takes its own GPU"):
        runtime.resolve_device("cuda:1", local_rank=1, local_world=2)
    assert runtime.resolve_device("cuda", local_rank=1, local_world=2) == torch.device("cuda:1")
    assert runtime.resolve_device("cuda:1", local_rank=0, local_world=1) == torch.device("cuda:1")


def test_a_job_leaves_the_process_settings_as_it_found_them(monkeypatch) -> None:
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cuda.matmul.allow_tf32)
    rt = runtime.setup_runtime("cpu", "fp32", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    runtime.teardown_runtime(rt)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32) == before


def test_the_collective_timeout_covers_rank_zeros_checks(monkeypatch) -> None:
    monkeypatch.delenv("CEPROMPT_DIST_TIMEOUT_MINUTES", raising=False)
    assert runtime.dist_timeout().total_seconds() == 3600  # torch's default is 10 minutes
    monkeypatch.setenv("CEPROMPT_DIST_TIMEOUT_MINUTES", "240")
    assert runtime.dist_timeout().total_seconds() == 240 * 60
    monkeypatch.setenv("CEPROMPT_DIST_TIMEOUT_MINUTES", "soon")
    with pytest.raises(ConfigError, match="CEPROMPT_DIST_TIMEOUT_MINUTES"):
        runtime.dist_timeout()


def test_an_fp16_run_resumes_with_its_loss_scale(tmp_path: Path) -> None:
    data = write_three_file_dataset(tmp_path / "RAF-DB", "rafdb", n_train=2, n_test=1)
    sets = [f"data.root={data}", "backbone.arch=tiny-vit", "data.workers=0", f"run.output_dir={tmp_path}",
            "run.name=half", "run.device=cpu", "run.precision=fp16", "optim.batch_size=7", "optim.epochs=1",
            "optim.warmup_epochs=0", "run.log_to=[]", "run.progress=false", "run.final_eval=false"]
    assert main(["train", "--config", "rafdb_stage1", *[a for s in sets for a in ("--set", s)]]) == 0
    saved = torch.load(tmp_path / "half" / "resume.pt", weights_only=True)["scaler"]
    assert saved and saved["scale"] > 0
    assert main(["train", "--resume", str(tmp_path / "half"), "--set", "optim.epochs=2"]) == 0
