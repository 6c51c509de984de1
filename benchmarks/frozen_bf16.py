"""Training steps under bf16 with the frozen vision blocks' weights kept in bf16 (as inference keeps them) against
fp32 weights converted by autocast at every forward pass, taking turns in one process. The trainer keeps fp32
weights: on the reference CPU this measured no gain at batch 16 (README, Performance); run it on your hardware.

    python benchmarks/frozen_bf16.py [--archs tiny-vit ViT-B-16] [--batch 16] [--rounds 3]
                                     # writes benchmarks/results/frozen_bf16.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from open_clip.transformer import ResidualAttentionBlock  # noqa: E402

from ceprompt.model.towers import store_block_matrices  # noqa: E402

from bench_common import autocast, batch_for, cpu_description, interleaved, stage1_model, stage2_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "frozen_bf16.json"


def store_frozen_blocks(model: torch.nn.Module, text: torch.nn.Module, dtype: torch.dtype) -> int:
    """:func:`store_block_matrices` for every vision transformer block of ``model`` that training does not change
    (stage 2's whole vision tower, stage 1's blocks below ``fix_layer`` and its teacher): training under autocast to
    ``dtype`` then skips converting their weights at every forward pass, as inference does. The text tower
    (``text``) keeps fp32 weights: the stages compute class text features in fp32. Returns the blocks stored."""
    text_blocks = {id(m) for m in text.modules()}
    blocks = [m for m in model.modules() if isinstance(m, ResidualAttentionBlock) and id(m) not in text_blocks
              and not any(p.requires_grad for p in m.parameters())]
    store_block_matrices(blocks, dtype)
    return len(blocks)


def stepper(stage: str, arch: str, n: int, stored: bool):
    torch.manual_seed(0)
    if stage == "stage-1":
        model = stage1_model(arch, "cpu").train()
        opt = torch.optim.AdamW(model.param_groups(1e-5, 5e-4, 0.65), lr=1e-5, fused=True)
    else:
        model = stage2_model(arch, "cpu").train()
        opt = torch.optim.SGD(model.param_groups(2e-3, 5e-4, 1.0), lr=2e-3, momentum=0.9)
    model.start_training(n)
    blocks = store_frozen_blocks(model, model.clip.transformer, torch.bfloat16) if stored else 0
    batch = batch_for(arch, n, "cpu")

    def step() -> None:
        with autocast("cpu", "bf16"):
            out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    step()  # fills the teacher cache, warms up
    return step, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["tiny-vit", "ViT-B-16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cpu, flags = cpu_description()
    results: dict = {"cpu": cpu, "cpu_flags": flags, "threads": torch.get_num_threads(), "batch": args.batch,
                     "cases": {}}
    for arch in args.archs:
        for stage in ("stage-1", "stage-2"):
            plain, _ = stepper(stage, arch, args.batch, False)
            stored, blocks = stepper(stage, arch, args.batch, True)
            rates = interleaved({"fp32 weights": (plain, args.batch), "frozen bf16": (stored, args.batch)},
                                args.rounds, "cpu")
            row = {**{k: round(v, 2) for k, v in rates.items()}, "frozen blocks": blocks,
                   "gain": round(rates["frozen bf16"] / rates["fp32 weights"], 3)}
            results["cases"][f"{arch} {stage}"] = row
            print(f"{arch:10s} {stage}: {row}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
