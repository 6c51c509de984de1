"""CPU threads: usable cores (affinity, cgroup quota), the load-aware default, --threads, and doctor's rows."""

from __future__ import annotations

import csv
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import ceprompt.engine.threads as threads
from ceprompt.cli import main
from ceprompt.engine.threads import CpuSample, ThreadGovernor, cpu_quota, free_threads

from helpers import write_three_file_dataset


def test_cgroup_quota_v2_and_v1(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(tmp_path) is None


def test_usable_cores_follow_affinity_quota_and_torchrun(monkeypatch) -> None:
    monkeypatch.setattr(threads, "affinity_cpus", lambda: list(range(16)))
    monkeypatch.setattr(threads, "cpu_quota", lambda: 2.5)  # a container that sees 16 cores, may use 2.5
    assert threads.usable_cpus() == 2
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)
    assert threads.usable_cpus() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share the machine
    assert threads.usable_cpus() == 4


def test_busy_cores_are_left_to_their_owners(monkeypatch) -> None:
    assert [free_threads(busy, 2) for busy in (0.0, 0.3, 0.6, 1.0, 2.0, 3.5)] == [2, 2, 1, 1, 1, 1]
    assert free_threads(2.2, 8) == 6
    monkeypatch.setattr(threads, "affinity_cpus", lambda: [0, 1])
    before = CpuSample(busy=1000, total=4000, own=10.0, wall=100.0)
    # 2 cores over 1 s (200 ticks each): 300 busy ticks = 1.5 cores, of which 0.5 core was our own time
    after = CpuSample(busy=1300, total=4400, own=10.5, wall=101.0)
    assert before.others_busy(after) == pytest.approx(1.0)


def test_the_governor_adapts_to_a_neighbour_between_epochs(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "choose_threads", lambda: (2, "test"))
    monkeypatch.setattr(threads, "affinity_cpus", lambda: [0, 1])
    samples = itertools.chain([CpuSample(0, 0, 0.0, 0.0),
                               CpuSample(200, 200, 1.0, 1.0),  # our 1 core + a neighbour on the other: 1 busy
                               CpuSample(300, 400, 2.0, 2.0)],  # the neighbour left
                              itertools.repeat(CpuSample(300, 400, 2.0, 2.0)))
    monkeypatch.setattr(CpuSample, "now", classmethod(lambda cls: next(samples)))
    before = torch.get_num_threads()
    try:
        governor = ThreadGovernor(None)
        assert governor.threads == 2
        assert governor.recheck() == 1 and torch.get_num_threads() == 1
        assert governor.recheck() == 2 and torch.get_num_threads() == 2
        fixed = ThreadGovernor(3)
        assert fixed.recheck() == 3  # --threads is never second-guessed
    finally:
        torch.set_num_threads(before)


def test_the_demo_clip_pretraining_follows_the_load_and_says_why_it_is_slow(monkeypatch, caplog) -> None:
    """The README's first command once took 90 minutes beside other work with nothing saying why: pretraining
    chose its threads once. Now it re-checks while it runs and its log line names the load."""
    import logging

    import ceprompt.demo.pretrain as pretrain

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "choose_threads", lambda: (2, "test"))
    monkeypatch.setattr(threads, "affinity_cpus", lambda: [0, 1])
    monkeypatch.setattr(pretrain, "RECHECK_SECONDS", 0.0)
    monkeypatch.setattr(pretrain, "REPORT_SECONDS", 0.0)
    ticks = itertools.count()  # every sample 100 ticks later, 50 of them busy, none of them ours: 1 core taken

    def sample(cls):
        t = next(ticks)
        return CpuSample(50 * t, 100 * t, 0.0, float(t))

    monkeypatch.setattr(CpuSample, "now", classmethod(sample))
    seen: list[int] = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: seen.append(torch.get_num_threads())
                        or real_step(self, *a, **k))
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="ceprompt"):
            pretrain.pretrain_clip(pretrain.PretrainSettings(arch="tiny-vit", pairs=16, steps=4, batch_size=4),
                                   progress=False)
    finally:
        torch.set_num_threads(before)
    assert seen[0] == 2 and seen[-1] == 1  # chosen at the start, re-chosen while it ran
    lines = [r.getMessage() for r in caplog.records if "pretraining the demo CLIP: step" in r.getMessage()]
    assert lines and "min left" in lines[-1] and "1.0 of 2 cores busy" in lines[-1]


def test_a_recognizer_follows_the_load_in_the_thread_that_computes(monkeypatch) -> None:
    """One face at a time on a busy machine ran 2.5-3.8x slower per face on two threads than on one
    (README, Speed): a recognizer re-chooses its threads before each batch, in the calling thread (a server's
    worker thread keeps its own count); a count the user gave is kept."""
    import threading

    from test_recognizer import crops, recognizer

    import ceprompt.api as api

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "choose_threads", lambda: (2, "test"))
    monkeypatch.setattr(threads, "affinity_cpus", lambda: [0, 1])
    monkeypatch.setattr(api, "RECHECK_SECONDS", 0.0)
    busy = {"share": 0.0, "ticks": 0, "t": 0}  # share: of the 100 ticks between two samples, those others used

    def sample(cls):
        busy["t"] += 1
        busy["ticks"] += int(busy["share"] * 100)
        return CpuSample(busy["ticks"], 100 * busy["t"], 0.0, float(busy["t"]))

    monkeypatch.setattr(CpuSample, "now", classmethod(sample))
    before = torch.get_num_threads()
    try:
        adaptive, fixed = recognizer("eva", threads=None), recognizer("eva", threads=2)
        seen: list[int] = []
        for rec in (adaptive, fixed):
            rec.model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))

        def in_a_worker_thread() -> None:
            worker = threading.Thread(target=lambda: adaptive.predict_batch(crops(1), detect="none"))
            worker.start()
            worker.join()

        in_a_worker_thread()
        busy["share"] = 0.5  # a neighbour keeps one of the two cores busy
        in_a_worker_thread()
        adaptive.predict_batch(crops(1), detect="none")
        busy["share"] = 0.0  # and leaves
        in_a_worker_thread()
        assert seen == [2, 1, 1, 2]
        busy["share"] = 0.5
        fixed.predict_batch(crops(1), detect="none")
        assert seen[-1] == 2  # the count the user gave stays
    finally:
        torch.set_num_threads(before)
    with pytest.raises(Exception, match="threads=0"):
        recognizer("eva", threads=0)
    with pytest.raises(Exception, match=r"expected an integer in \[1, 1024\]"):  # not torch's overflow traceback
        recognizer("eva", threads=10**30)


def test_threads_option_is_recorded_in_the_run(tmp_path: Path, capsys) -> None:
    data = write_three_file_dataset(tmp_path / "raf", "rafdb", n_train=2, n_test=1)
    sets = ["backbone.arch=tiny-vit", f"data.root={data}", "data.workers=0", "optim.epochs=2", "optim.batch_size=7",
            "optim.warmup_epochs=0", "run.device=cpu", "head.top_k=4"]
    args = ["train", "--config", "rafdb_stage1", *[a for s in sets for a in ("--set", s)], "--threads", "1",
            "--output-dir", str(tmp_path / "runs"), "--name", "t", "--no-progress"]
    before = torch.get_num_threads()
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(before)
    run = tmp_path / "runs" / "t"
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["threads"] == 1
    with open(run / "summary.csv", newline="") as fh:
        assert [r["threads"] for r in csv.DictReader(fh)] == ["1", "1"]
    with pytest.raises(SystemExit):
        main(["train", "--config", "rafdb_stage1", "--threads", "0"])
    assert "--threads" in capsys.readouterr().err


def test_doctor_lists_extras_cores_threads_and_the_huggingface_round_trip() -> None:
    out = subprocess.run([sys.executable, "-m", "ceprompt", "doctor"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "optional extras:" in text and "face" in text and "facenet-pytorch 2.5.3" in text
    assert "usable" in text and "by default now" in text
    assert "huggingface  detected as huggingface" in text and "all checks passed" in text
