"""Throughput and memory of ceprompt's hot paths, and of the same steps done the naive way.

    python benchmarks/speed.py [--archs ViT-B-16 tiny-vit] [--batch 16] [--steps 2] [--device cpu]
                               [--out benchmarks/results/speed.json] [--no-memory]

Models have random weights of the named shape (nothing is downloaded). Measured, for each model:

* the ViT forward (plain open_clip ``encode_image``) in fp32 and under bf16 autocast;
* a stage-1 training step: ceprompt (lower blocks shared by student and teacher, class text
  embeddings cached, teacher embeddings cached per flip view) against the naive loop the reference
  code runs (the teacher runs its own full forward, the class text embeddings are recomputed every
  step, fp32 only);
* a stage-2 training step;
* evaluation of both stages: ceprompt (text embeddings once per pass) against the naive loop
  (recomputed every batch, fp32);
* prediction on face crops and, with MTCNN face detection, on 512 px photographs;
* peak memory of a stage-1 step at batch 32 with and without activation checkpointing (each in
  its own process, the process's peak resident set).

Prints every number and the ratios, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ceprompt.cat import CATModel
from ceprompt.clip_backbone import build_clip, get_arch, tokenize
from ceprompt.eva import EVAModel
from ceprompt.head import HeadConfig, emotion_scores
from ceprompt.prompts import DEFAULT_TEMPLATE, class_prompts
from ceprompt.towers import run_blocks, vision_embed, vision_project

CLASSES = ["surprise", "fear", "disgust", "happy", "sad", "anger", "neutral"]
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def autocast(device: str, precision: str):
    dtype = DTYPES[precision]
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


def throughput(fn: Callable[[], None], images_per_call: int, calls: int, warmup: int = 1) -> float:
    """Images per second of the median call (this machine's speed drifts; the median resists it)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(calls, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return images_per_call / statistics.median(times)


def head_for(arch: str) -> HeadConfig:
    spec = get_arch(arch)
    return HeadConfig(top_k=min(16, spec.num_patches))


def batch_for(arch: str, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size = get_arch(arch).image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g).to(device)
    views = torch.arange(n, device=device) * 2  # each image its own repeatable view
    return images, labels, views


def forward_speed(arch: str, n: int, steps: int, device: str) -> dict[str, float]:
    clip = build_clip(arch, seed=0).to(device).eval()
    images, _, _ = batch_for(arch, n, device)
    out = {}
    for precision in ("fp32", "bf16"):
        def run() -> None:
            with torch.no_grad(), autocast(device, precision):
                clip.encode_image(images)
        out[precision] = throughput(run, n, steps)
    return out


def stage1_ours(arch: str, n: int, steps: int, device: str, precision: str, teacher_cache: bool) -> float:
    model = EVAModel(build_clip(arch, seed=0), CLASSES, head=head_for(arch)).to(device).train()
    images, labels, views = batch_for(arch, n, device)
    if teacher_cache:
        model.enable_teacher_cache(2 * n)
    opt = torch.optim.AdamW(model.param_groups(1e-5, 5e-4, 0.65), lr=1e-5, fused=True)  # as the trainer

    def step() -> None:
        with autocast(device, precision):
            out = model(images, labels, views=views if teacher_cache else None)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return throughput(step, n, steps)


def stage1_naive(arch: str, n: int, steps: int, device: str) -> float:
    """The reference's loop: everything recomputed, teacher as a separate full CLIP, fp32."""
    student = build_clip(arch, seed=0).to(device).train()
    teacher = build_clip(arch, seed=0).to(device).eval()
    for p in [*student.parameters(), *teacher.parameters()]:
        p.requires_grad_(False)
    visual = student.visual
    trainable = [p for b in visual.transformer.resblocks[2:] for p in b.parameters()]
    trainable += [*visual.ln_post.parameters(), visual.proj]
    for p in trainable:
        p.requires_grad_(True)
    tokens = tokenize(class_prompts(DEFAULT_TEMPLATE, CLASSES), student.positional_embedding.shape[0]).to(device)
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    images, labels, _ = batch_for(arch, n, device)
    head = head_for(arch)

    def step() -> None:
        text = F.normalize(student.encode_text(tokens), dim=-1)  # every step
        x = visual.ln_pre(vision_embed(visual, images))
        out = vision_project(visual, run_blocks(visual.transformer.resblocks, x))
        logits = emotion_scores(out[:, 0], out[:, 1:], text, head)
        with torch.no_grad():
            target = F.normalize(teacher.encode_image(images), dim=-1)  # its own full forward
        loss = F.cross_entropy(logits, labels) + F.l1_loss(F.normalize(out[:, 0], dim=-1), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return throughput(step, n, steps)


def stage2_model(arch: str, device: str) -> CATModel:
    depth = min(9, get_arch(arch).vision_layers, get_arch(arch).text_layers)
    return CATModel(build_clip(arch, seed=0), CLASSES, head=head_for(arch), prompt_depth=depth).to(device)


def stage2_train(arch: str, n: int, steps: int, device: str, precision: str) -> float:
    model = stage2_model(arch, device).train()
    images, labels, _ = batch_for(arch, n, device)
    opt = torch.optim.SGD(model.prompt_learner.parameters(), lr=2e-3, momentum=0.9)

    def step() -> None:
        with autocast(device, precision):
            out = model(images, labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return throughput(step, n, steps)


def naive_text_features(model: torch.nn.Module) -> torch.Tensor:
    """The class text embeddings as the reference computes them: the full 77-token text tower."""
    clip = model.clip
    if isinstance(model, EVAModel):
        tokens = tokenize(model.prompts, clip.positional_embedding.shape[0]).to(clip.token_embedding.weight.device)
        return F.normalize(clip.encode_text(tokens), dim=-1)
    pl = model.prompt_learner
    x = pl.text_embeddings() + clip.positional_embedding
    x = clip.ln_final(run_blocks(clip.transformer.resblocks, x, attn_mask=clip.attn_mask, hook=pl.text_hook))
    eot = x[torch.arange(x.shape[0]), pl.token_ids.argmax(dim=-1)]
    return F.normalize(eot @ clip.text_projection, dim=-1)


def evaluation(model: torch.nn.Module, arch: str, n: int, passes: int, device: str, precision: str,
               naive: bool) -> float:
    """A pass over 4 batches, timed ``passes`` times. ceprompt encodes the class text once per pass
    (stage 1: once per run, cached); the naive loop encodes it in full for every batch."""
    model = model.eval()
    images, _, _ = batch_for(arch, n, device)

    def one_pass() -> None:
        with torch.no_grad(), autocast(device, precision):
            text = None if naive else model.class_text_features()
            for _ in range(4):
                model(images, text_features=naive_text_features(model) if naive else text)
    return throughput(one_pass, n * 4, passes, warmup=0)


def prediction(arch: str, n: int, device: str, photos: list) -> dict[str, float]:
    from ceprompt.api import Recognizer
    from ceprompt.data.transforms import preprocess_for
    from ceprompt.engine.build import LoadedModel

    model = EVAModel(build_clip(arch, seed=0), CLASSES, head=head_for(arch), kd_weight=0.0)
    pre = preprocess_for(get_arch(arch).image_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    rec = Recognizer(LoadedModel(model, {}, Path("random"), pre, CLASSES), device=device, precision="auto")
    size = get_arch(arch).image_size
    crops = [p.resize((size, size)) for p in (photos * n)[:n]]
    out = {"crops, --detect none": throughput(lambda: rec.predict_batch(crops, detect="none", batch_size=n), n, 1)}
    try:
        out["512 px photos, MTCNN"] = throughput(lambda: rec.predict_batch(photos, detect="mtcnn"), len(photos), 1)
    except Exception as exc:  # facenet-pytorch not installed
        out["512 px photos, MTCNN"] = f"skipped ({str(exc).splitlines()[0][:80]})"
    return out


def resident_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process. Unlike ``ru_maxrss``, the peak belongs to
    this program alone: ``ru_maxrss`` of a child started from a large parent starts at the parent's."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def memory_case(arch: str, n: int, checkpointing: bool) -> dict[str, float]:
    """Run in a child process: one stage-1 step; the process's peak and its resident set before."""
    model = EVAModel(build_clip(arch, seed=0), CLASSES, head=head_for(arch), grad_checkpointing=checkpointing)
    opt = torch.optim.AdamW(model.param_groups(1e-5, 5e-4, 0.65), lr=1e-5, fused=True)  # as the trainer
    images, labels, _ = batch_for(arch, n, "cpu")
    model.train()
    before = resident_mib("VmRSS")
    out = model(images, labels)
    out.loss.backward()
    opt.step()
    peak = resident_mib("VmHWM")
    return {"rss_before_step_mib": round(before), "peak_rss_mib": round(peak), "step_mib": round(peak - before)}


def measure_memory(arch: str, n: int) -> dict[str, dict]:
    out = {}
    for checkpointing in (False, True):
        cmd = [sys.executable, __file__, "--memory-case", arch, str(n), str(int(checkpointing))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out["activation checkpointing" if checkpointing else "plain"] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, ckpt = out["plain"], out["activation checkpointing"]
    out["peak reduction"] = round(1 - ckpt["peak_rss_mib"] / plain["peak_rss_mib"], 3)
    out["step memory reduction"] = round(1 - ckpt["step_mib"] / plain["step_mib"], 3)
    return out


def photos() -> list:
    from PIL import Image

    try:
        from skimage import data
        return [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea()).resize((512, 512))]
    except ImportError:
        return [Image.new("RGB", (512, 512), (120, 100, 90))]


def run_arch(arch: str, n: int, steps: int, device: str, memory: bool) -> dict:
    r: dict = {}

    def show(name: str, value) -> None:
        r[name] = value
        text = json.dumps(value) if isinstance(value, dict) else f"{value:.2f}"
        print(f"  {name:46s} {text}", flush=True)

    print(f"{arch} (batch {n}, {steps} timed steps, {device}, {torch.get_num_threads()} threads)", flush=True)
    fwd = forward_speed(arch, n, steps, device)
    show("ViT forward img/s (fp32, bf16)", fwd)
    show("ViT forward bf16/fp32", fwd["bf16"] / fwd["fp32"])
    s1 = {"ours fp32": stage1_ours(arch, n, steps, device, "fp32", True),
          "ours fp32, no teacher cache": stage1_ours(arch, n, steps, device, "fp32", False),
          "ours bf16": stage1_ours(arch, n, steps, device, "bf16", True),
          "naive fp32": stage1_naive(arch, n, steps, device)}
    show("stage-1 training img/s", s1)
    show("stage-1 ours/naive at fp32", s1["ours fp32"] / s1["naive fp32"])
    show("stage-1 ours/naive at fp32, no teacher cache", s1["ours fp32, no teacher cache"] / s1["naive fp32"])
    show("stage-1 ours bf16 / naive fp32", s1["ours bf16"] / s1["naive fp32"])
    s2 = {p: stage2_train(arch, n, steps, device, p) for p in ("fp32", "bf16")}
    show("stage-2 training img/s", s2)
    for stage, build in (("stage-1", lambda: EVAModel(build_clip(arch, seed=0), CLASSES, head=head_for(arch),
                                                       kd_weight=0.0).to(device)),
                         ("stage-2", lambda: stage2_model(arch, device))):
        model = build()
        ev = {"ours fp32": evaluation(model, arch, n, steps, device, "fp32", naive=False),
              "ours bf16": evaluation(model, arch, n, steps, device, "bf16", naive=False),
              "naive fp32": evaluation(model, arch, n, steps, device, "fp32", naive=True)}
        show(f"{stage} evaluation img/s", ev)
        show(f"{stage} evaluation ours bf16 / naive", ev["ours bf16"] / ev["naive fp32"])
        show(f"{stage} evaluation ours / naive at fp32", ev["ours fp32"] / ev["naive fp32"])
    show("predict img/s (precision auto)", prediction(arch, n, device, photos()))
    if memory and device == "cpu":
        show("stage-1 step memory, batch 32", measure_memory(arch, 32))
    return r


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-case":
        arch, n, ckpt = sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4]))
        print(json.dumps(memory_case(arch, n, ckpt)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["tiny-vit", "ViT-B-16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
              "batch": args.batch, "steps": args.steps, "results": {}}
    for arch in args.archs:
        report["results"][arch] = run_arch(arch, args.batch, args.steps, args.device, not args.no_memory)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
