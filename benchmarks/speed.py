"""Throughput and memory of ceprompt's hot paths, as ratios: against the bare open_clip image tower, bf16
against fp32, photos against face crops, the trainer against its own step, and against the naive loop of the
reference code.

    python benchmarks/speed.py [--archs tiny-vit ViT-B-16] [--batch 16] [--steps 2] [--device cpu]
                               [--busy] [--compile] [--no-trainer] [--no-memory] [--out FILE]
    python benchmarks/speed.py --gpu    # on a CUDA machine: the GPU table, under 8 minutes on one GPU
    python benchmarks/speed.py --gpu --smoke [--out FILE]   # the same cases, tiny shapes, on the CPU
    python benchmarks/speed.py --one-face [--busy]   # a face alone against a face in a batch, the API, a photo

Models have random weights of the named shape (nothing is downloaded). For each model:

* the bare tower: open_clip's ``encode_image``, fp32 and bf16 autocast, at the batch size and at 1;
* training steps of both stages (stage 1 with the teacher cache warm and cold) and the naive stage-1 loop
  (teacher as a separate CLIP, text recomputed every step, fp32);
* evaluation of both stages against the naive loop (text recomputed every batch);
* ``Recognizer.predict_batch`` on face crops, at the batch size and one crop at a time, and the web API on one
  crop per request (batch 1), both against the bare tower at the same precision and batch;
* a real server (uvicorn on a local port) with 1 and with 8 clients uploading at once: requests per second and
  the faces per forward pass (the batching window at work);
* a 12 MP phone photo with one face: the whole ``predict`` against its decode plus the model on one crop,
  and against MTCNN on the full image (ceprompt 0.2's detection);
* the trainer (``ceprompt train`` in a subprocess, generated faces, two epochs; epoch 2's img/s) in fp32 and
  bf16, against the bf16 gain of the bare step; with ``--gpu`` under torchrun, one process per GPU (NCCL),
  12 steps an epoch;
* ``rec.predict_video`` on a generated 640x360 clip with one moving face (frames per second);
* with ``--compile``, the training steps with ``run.compile`` on and off (a fresh process each; one for all of
  them with ``--smoke``);
* the peak memory of a stage-1 step with and without activation checkpointing.

``--busy`` keeps one core busy with another process for the whole run (a shared machine). Prints every
number, a table of ratios, and writes JSON with the machine's CPU flags to ``benchmarks/results/``, after every
case (a run cut short keeps what it measured). A case whose optional package is missing (facenet-pytorch, PyAV,
scikit-image, FastAPI) is skipped with a note; a case that fails is recorded as failed; neither ends the run.
On a GPU the ratios include the share of the device's dense bf16 peak that a step reaches (FLOPs counted by
torch for one forward pass; a training step taken as three).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ceprompt.core.runtime import auto_precision
from ceprompt.model.clip import build_clip, get_arch, tokenize
from ceprompt.model.head import emotion_scores
from ceprompt.model.prompts import DEFAULT_TEMPLATE, class_prompts
from ceprompt.model.stage import TrainBatch
from ceprompt.model.towers import run_blocks, vision_embed, vision_project

from bench_common import (
    BUSY_NEIGHBOUR,
    CLASSES,
    PRECISIONS,
    ROOT,
    autocast,
    batch_for,
    cpu_description,
    head_for,
    interleaved,
    peak_memory_gib,
    peak_memory_reset,
    stage1_model,
    stage2_model,
    throughput,
)


def bare_tower(arch: str, n: int, steps: int, device: str) -> dict[str, float]:
    """open_clip's own ``encode_image`` (weights trainable, as open_clip builds them); at batch 1, three images
    one after the other per call."""
    clip = build_clip(arch, seed=0).to(device).eval()
    cases = {}
    for batch, repeat in ((n, 1), (1, 3)):
        images = batch_for(arch, batch, device).images
        for precision in PRECISIONS:
            def run(precision: str = precision, images: torch.Tensor = images, repeat: int = repeat) -> None:
                with torch.no_grad(), autocast(device, precision):
                    for _ in range(repeat):
                        clip.encode_image(images)
            cases[precision if batch == n else f"{precision} batch 1"] = (run, batch * repeat)
    return interleaved(cases, steps + 1, device)


def train_steps(stage: str, arch: str, n: int, steps: int, device: str, precisions: tuple[str, ...] = PRECISIONS,
                teacher_cache: bool = True, compiled: bool = False) -> dict[str, float]:
    """img/s of an optimiser step per precision (taking turns), set up as the trainer sets it up; on a GPU also
    ``"<precision> peak GiB"``, the step's peak memory."""
    if stage == "stage-1":
        model = stage1_model(arch, device, teacher_cache=teacher_cache).train()
        opt = torch.optim.AdamW(model.param_groups(1e-5, 5e-4, 0.65), lr=1e-5, fused=True)
    else:
        model = stage2_model(arch, device).train()
        opt = torch.optim.SGD(model.param_groups(2e-3, 5e-4, 1.0), lr=2e-3, momentum=0.9)
    model.start_training(n)
    if compiled:
        from ceprompt.engine.train import compile_blocks
        compile_blocks(model)
    batch = batch_for(arch, n, device)

    def step(precision: str) -> None:
        with autocast(device, precision):
            out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    out: dict[str, float] = {}
    for precision in precisions:  # compiles, fills the teacher cache, measures the peak
        step(precision)
        peak_memory_reset(device)
        step(precision)
        peak = peak_memory_gib(device)
        if peak is not None:
            out[f"{precision} peak GiB"] = peak
    rates = interleaved({p: (lambda p=p: step(p), n) for p in precisions}, steps, device)
    return {**rates, **out}


def naive_stage1_step(arch: str, n: int, steps: int, device: str) -> float:
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
    batch = batch_for(arch, n, device)
    images, labels = batch.images, batch.labels
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
    return throughput(step, n, steps, device)


def naive_text_features(model: torch.nn.Module) -> torch.Tensor:
    """The class text embeddings as the reference computes them: the full 77-token text tower."""
    clip = model.clip
    if model.prompts() is not None:  # fixed prompts (stage 1)
        tokens = tokenize(model.prompts(), clip.positional_embedding.shape[0]).to(clip.token_embedding.weight.device)
        return F.normalize(clip.encode_text(tokens), dim=-1)
    pl = model.prompt_learner
    x = pl.text_embeddings(pl.token_embeds) + clip.positional_embedding
    x = clip.ln_final(run_blocks(clip.transformer.resblocks, x, attn_mask=clip.attn_mask, hook=pl.text_hook))
    eot = x[torch.arange(x.shape[0]), pl.token_ids.argmax(dim=-1)]
    return F.normalize(eot @ clip.text_projection, dim=-1)


def evaluations(model: torch.nn.Module, arch: str, n: int, passes: int, device: str) -> dict[str, float]:
    """A pass over 4 batches in fp32, bf16 and the naive fp32 loop, taking turns. ceprompt encodes the class
    text once per pass (stage 1: once per run, cached); the naive loop encodes it in full for every batch."""
    model = model.eval()
    images = batch_for(arch, n, device).images

    def one_pass(precision: str, naive: bool) -> None:
        with torch.no_grad(), autocast(device, precision):
            text = None if naive else model.class_text_features()
            for _ in range(4):
                model(images, text_features=naive_text_features(model) if naive else text)
    cases = {p: (lambda p=p: one_pass(p, False), 4 * n) for p in PRECISIONS}
    cases["naive fp32"] = (lambda: one_pass("fp32", True), 4 * n)
    return interleaved(cases, passes, device)


def resident_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process. Unlike ``ru_maxrss``, the peak belongs to
    this program alone: ``ru_maxrss`` of a child started from a large parent starts at the parent's."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def memory_case(arch: str, n: int, checkpointing: bool) -> dict[str, float]:
    """Run in a child process: one stage-1 step; the process's peak and its resident set before."""
    model = stage1_model(arch, "cpu", grad_checkpointing=checkpointing)
    opt = torch.optim.AdamW(model.param_groups(1e-5, 5e-4, 0.65), lr=1e-5, fused=True)  # as the trainer
    batch = batch_for(arch, n, "cpu")
    model.train()
    before = resident_mib("VmRSS")
    out = model(TrainBatch(batch.images, batch.labels))
    out.loss.backward()
    opt.step()
    peak = resident_mib("VmHWM")
    return {"rss_before_step_mib": round(before), "peak_rss_mib": round(peak), "step_mib": round(peak - before)}


def child(*args: str) -> dict:
    """Run one case of this script in a fresh process (its own memory peak, its own compile caches)."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(arch: str, n: int) -> dict[str, dict]:
    out = {name: child("--memory-case", arch, str(n), str(int(ckpt)))
           for name, ckpt in (("plain", False), ("activation checkpointing", True))}
    plain, ckpt = out["plain"], out["activation checkpointing"]
    out["peak reduction"] = round(1 - ckpt["peak_rss_mib"] / plain["peak_rss_mib"], 3)
    return out


def machine(device: str, busy: bool) -> dict:
    model, flags = cpu_description()
    chosen, why = auto_precision(torch.device(device))
    info = {"cpu": model, "cpu_flags": flags, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "precision_auto": f"{chosen} ({why})", "busy_neighbour": busy}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# Dense bf16 tensor-core peaks (FLOP/s) of GPUs this preset may meet, for the share of the peak a step reaches.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12}


def forward_flops(arch: str) -> float:
    """FLOPs of the vision tower's forward pass on one image (counted by torch, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_clip(arch).eval()
    size = get_arch(arch).image_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


class Report:
    """The results file, written again after every case: a run cut short keeps what it measured."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path, self.data = path, {**header, "results": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def arch(self, arch: str) -> dict:
        return self.data["results"].setdefault(arch, {})

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=float) + "\n")
        os.replace(tmp, self.path)


def run_arch(arch: str, n: int, steps: int, device: str, args: argparse.Namespace, report: Report) -> dict:
    import speed_verbs as verbs

    r = report.arch(arch)

    def case(name: str, measure) -> None:
        """One case: measured, printed and written at once; a missing optional package skips it with a note and
        any other failure is recorded, never the end of the run."""
        if args.one_face and name not in ONE_FACE_CASES:
            return
        start = time.perf_counter()
        try:
            value = measure()
        except ImportError as exc:
            value = {"skipped": f"{exc.name or exc} is not installed"}
        except Exception as exc:  # noqa: BLE001 - a benchmark reports a failed case and goes on
            value = {"failed": (str(exc).splitlines() or [type(exc).__name__])[0][:200]}
        r[name] = value
        report.data.setdefault("seconds per case", {})[f"{arch}: {name}"] = round(time.perf_counter() - start, 1)
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in value.items()} if isinstance(value,
                                                                                                      dict) else value
        text = json.dumps(shown, default=str) if isinstance(value, dict) else f"{value:.3f}"
        print(f"  {name:44s} {text}", flush=True)
        report.write()

    print(f"{arch} (batch {n}, {steps} timed steps, {device}, {torch.get_num_threads()} threads)", flush=True)
    case("bare tower img/s", lambda: bare_tower(arch, n, steps, device))
    for stage in ("stage-1", "stage-2"):
        case(f"{stage} step img/s", lambda stage=stage: train_steps(stage, arch, n, steps, device))
    case("stage-1 step img/s, teacher cache cold", lambda: train_steps("stage-1", arch, n, steps, device, ("fp32",),
                                                                        teacher_cache=False))
    case("naive stage-1 step img/s", lambda: {"fp32": naive_stage1_step(arch, n, steps, device)})
    for stage, build in (("stage-1", lambda: stage1_model(arch, device, kd_weight=0.0)),
                         ("stage-2", lambda: stage2_model(arch, device))):
        if args.one_face and stage == "stage-1":
            continue
        model = build()
        case(f"{stage} eval img/s", lambda model=model: evaluations(model, arch, n, steps, device))
        case(f"{stage} predict img/s", lambda model=model: verbs.predict_crops(model, arch, n, device, steps))
        if stage == "stage-2":
            case("stage-2 serve img/s (batch 1)", lambda: verbs.serve_requests(model, arch, device, steps))
            case("web API, concurrent clients", lambda: verbs.serve_concurrent(model, arch, device,
                                                                               per_client=2 if args.smoke else 4))
            case("12 MP photo, one face", lambda: verbs.phone_photo(model, arch, device))
            case("512 px photos, MTCNN img/s", lambda: verbs.small_photos(model, arch, device))
            case("video frames/s (640x360, one face)", lambda: verbs.video_frames(model, arch, device,
                                                                               6 if args.smoke else 24))
    slow_cases = ("bf16",) if args.gpu else PRECISIONS  # the GPU table must fit in 8 minutes
    if args.trainer and not args.one_face:
        case("trainer epoch-2 img/s", lambda: verbs.trainer_epochs(
            arch, n if args.gpu else min(n, 14), device, slow_cases, processes=args.processes,
            steps_per_epoch=12 if args.gpu else 2))
    if args.compile:
        def compiled_steps() -> dict:
            specs = {f"{stage} {p} {'compiled' if c else 'eager'}": [stage, p, int(c)]
                     for stage in ("stage-1", "stage-2") for p in slow_cases for c in (False, True)}
            if args.smoke:  # no memory peaks to keep apart: one process for all, three interpreters fewer
                return child("--step-cases", arch, str(n), str(steps), device, json.dumps(specs))
            return {name: child("--step-cases", arch, str(n), str(steps), device, json.dumps({name: spec}))[name]
                    for name, spec in specs.items()}
        case("step img/s (peak GiB), run.compile", compiled_steps)
    if args.memory and device == "cpu":
        case("stage-1 step memory, batch 32", lambda: measure_memory(arch, 32))
    if device.startswith("cuda"):
        case("forward GFLOPs per image", lambda: forward_flops(arch) / 1e9)
    r["ratios"] = ratios(r, report.data["machine"])
    report.write()
    return r


def ratios(r: dict, machine_info: dict) -> dict[str, float]:
    """The figures the README quotes, each a ratio of two measurements of this run (those whose cases were
    measured; a skipped or failed case leaves its ratios out)."""
    out: dict[str, float] = {}
    for name, compute in RATIOS:
        try:
            out.update(compute(r))
        except (KeyError, TypeError, ZeroDivisionError):
            pass
    peak = next((v for k, v in BF16_PEAK.items() if k in machine_info.get("gpu", "")), None)
    flops = r.get("forward GFLOPs per image")
    if peak and isinstance(flops, float):
        for stage in ("stage-1", "stage-2"):  # a training step: about 3 forward passes' FLOPs (forward, backward)
            step = r.get(f"{stage} step img/s", {})
            if isinstance(step.get("bf16"), float):
                out[f"{stage} step share of the bf16 peak"] = step["bf16"] * 3 * flops * 1e9 / peak
            ev = r.get(f"{stage} eval img/s", {})
            if isinstance(ev.get("bf16"), float):
                out[f"{stage} eval share of the bf16 peak"] = ev["bf16"] * flops * 1e9 / peak
    return {k: round(v, 3) for k, v in out.items()}


def _stage_ratios(r: dict) -> dict[str, float]:
    bare = r["bare tower img/s"]
    out: dict[str, float] = {"bare tower bf16/fp32": bare["bf16"] / bare["fp32"]}
    for stage in ("stage-1", "stage-2"):
        step, ev, pr = r[f"{stage} step img/s"], r[f"{stage} eval img/s"], r[f"{stage} predict img/s"]
        out[f"{stage} step bf16/fp32"] = step["bf16"] / step["fp32"]
        out[f"{stage} eval bf16/fp32"] = ev["bf16"] / ev["fp32"]
        for p in PRECISIONS:
            out[f"{stage} eval / bare tower ({p})"] = ev[p] / bare[p]
            out[f"{stage} predict / bare tower ({p})"] = pr[p] / bare[p]
        out[f"{stage} eval ours/naive (fp32)"] = ev["fp32"] / ev["naive fp32"]
    out["stage-1 step ours/naive (fp32)"] = r["stage-1 step img/s"]["fp32"] / r["naive stage-1 step img/s"]["fp32"]
    out["stage-1 step ours bf16 / naive fp32"] = r["stage-1 step img/s"]["bf16"] / r["naive stage-1 step img/s"]["fp32"]
    return out


def _serve_ratios(r: dict) -> dict[str, float]:
    bare, serve = r["bare tower img/s"], r["stage-2 serve img/s (batch 1)"]
    return {f"serve / bare tower at batch 1 ({p})": serve[p] / bare[f"{p} batch 1"] for p in PRECISIONS}


def _one_face_ratios(r: dict) -> dict[str, float]:
    """A face alone against a face in a batch (time per face, so higher is worse), and the web API's gain from
    concurrent clients sharing forward passes."""
    out: dict[str, float] = {}
    for name, key in (("bare tower", "bare tower img/s"), ("recognizer", "stage-2 predict img/s")):
        if key in r:
            for p in PRECISIONS:
                out[f"{name} time per face, batch 1 / batched ({p})"] = r[key][p] / r[key][f"{p} batch 1"]
    api = r.get("web API, concurrent clients", {})
    if "req/s, 1 client(s)" in api:
        out["web API req/s, 8 clients / 1"] = api["req/s, 8 client(s)"] / api["req/s, 1 client(s)"]
    return out


def _photo_ratios(r: dict) -> dict[str, float]:
    photo = r["12 MP photo, one face"]
    return {"12 MP photo / (decode + one face)": photo["predict s"] / (photo["decode s"] + photo["one face s"]),
            "12 MP photo detection, 0.2 / now": photo["full-image MTCNN s"] / photo["detect s"]}


def _trainer_ratios(r: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    trainer = r.get("trainer epoch-2 img/s", {})
    compiled = r.get("step img/s (peak GiB), run.compile", {})
    for stage in ("stage-1", "stage-2"):
        if f"{stage} fp32" in trainer:
            gain = trainer[f"{stage} bf16"] / trainer[f"{stage} fp32"]
            out[f"{stage} trainer bf16/fp32"] = gain
            out[f"{stage} trainer gain / step gain"] = gain / out[f"{stage} step bf16/fp32"]
        if f"{stage} bf16" in trainer:
            out[f"{stage} trainer / step (bf16)"] = trainer[f"{stage} bf16"] / r[f"{stage} step img/s"]["bf16"]
        for p in PRECISIONS:
            if f"{stage} {p} compiled" in compiled:
                out[f"{stage} step compiled/eager ({p})"] = (compiled[f"{stage} {p} compiled"]["images_per_second"]
                                                             / compiled[f"{stage} {p} eager"]["images_per_second"])
    return out


ONE_FACE_CASES = ("bare tower img/s", "stage-2 predict img/s", "stage-2 serve img/s (batch 1)",
                  "web API, concurrent clients", "12 MP photo, one face")
RATIOS = (("stages", _stage_ratios), ("serve", _serve_ratios), ("one face", _one_face_ratios), ("photo", _photo_ratios),
          ("trainer", _trainer_ratios))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-case":
        arch, n, ckpt = sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4]))
        print(json.dumps(memory_case(arch, n, ckpt)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--step-cases":  # {name: [stage, precision, compiled]}, in order
        arch, n, steps, device, specs = sys.argv[2:7]
        out = {}
        for name, (stage, precision, compiled) in json.loads(specs).items():
            result = train_steps(stage, arch, int(n), int(steps), device, (precision,), compiled=bool(compiled))
            out[name] = {"images_per_second": result[precision], "peak_gib": result.get(f"{precision} peak GiB")}
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["tiny-vit", "ViT-B-16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default: as every verb chooses them, from the cores other work leaves free)")
    parser.add_argument("--compile", action="store_true", help="also time the steps with run.compile")
    parser.add_argument("--no-trainer", dest="trainer", action="store_false", help="skip the trainer runs")
    parser.add_argument("--processes", type=int, default=0,
                        help="run the trainer under torchrun with this many processes (0: one plain process)")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU preset: --device cuda --archs ViT-B-16 --batch 128 --compile, the trainer under "
                             "torchrun with one process per GPU (NCCL)")
    parser.add_argument("--smoke", action="store_true",
                        help="with --gpu: every case of the preset with tiny shapes on the CPU (2 gloo processes), to "
                             "prove the preset before a GPU runs it")
    parser.add_argument("--one-face", action="store_true",
                        help="only the one-face-at-a-time cases: the bare tower and the recognizer at batch 1 and at "
                             "--batch, the web API with 1 and 8 clients, the 12 MP photo's split")
    parser.add_argument("--out", help="default: benchmarks/results/speed.json (speed-gpu.json with --gpu, "
                                      "speed-smoke.json with --smoke, speed-one-face.json with --one-face; "
                                      "-busy before .json with --busy)")
    args = parser.parse_args()
    if args.gpu:
        args.archs, args.batch, args.compile, args.trainer = ["ViT-B-16"], 128, True, True
        args.device = "cuda"
        args.processes = max(1, torch.cuda.device_count())
    if args.smoke:
        args.gpu = True
        args.device, args.archs, args.batch, args.steps, args.processes = "cpu", ["tiny-vit"], 4, 1, 2
        args.memory = False  # a CPU-only case, not one of the GPU preset
    suffix = "-smoke" if args.smoke else "-gpu" if args.gpu else ""
    suffix = ("-one-face" if args.one_face else "") + suffix + ("-busy" if args.busy else "")
    out_path = Path(args.out or ROOT / "benchmarks" / "results" / f"speed{suffix}.json")
    torch.manual_seed(0)
    neighbour = subprocess.Popen(BUSY_NEIGHBOUR) if args.busy else None
    try:
        if neighbour:
            time.sleep(1.0)
        from ceprompt.engine.threads import set_threads
        set_threads(args.threads or None)  # as every verb does: the cores other work leaves free
        report = Report(out_path, {"machine": machine(args.device, args.busy), "batch": args.batch,
                                   "steps": args.steps, "preset": suffix.lstrip("-") or "cpu"})
        for arch in args.archs:
            run_arch(arch, args.batch, args.steps, args.device, args, report)
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    report = report.data
    print("\nratios (higher is better, except time per face; bare tower = open_clip's encode_image at the same "
          "precision and batch)")
    for arch, r in report["results"].items():
        print(f"{arch}:")
        for name, value in r["ratios"].items():
            print(f"  {name:44s} {value:6.2f}")
    print(f"written to {out_path}")


if __name__ == "__main__":
    main()
