"""A small CLIP for the demo, pretrained contrastively on generated faces and appearance captions.

The captions describe brows, eyes, mouth, skin and background but never name an emotion, so the
text tower learns real appearance words while "a photo of a happy facial expression" stays
unfamiliar: zero-shot recognition is weak and both CEPrompt stages have something to learn.
The model is cached (safetensors + JSON sidecar) in the user's cache folder, keyed by every
setting that shapes it, and reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.io_utils import cache_dir
from ..experiment.config import IMAGENET_MEAN, IMAGENET_STD
from ..model.clip import build_clip, get_arch, tokenize
from ..model.towers import text_encode_embeddings
from ..weights.clip_files import save_clip_safetensors
from .faces import generate

log = logging.getLogger(__name__)
GENERATOR_VERSION = 2  # bump when the face generator's output changes, to invalidate cached models


@dataclass(frozen=True)
class PretrainSettings:
    arch: str = "demo-vit"
    pairs: int = 3000  # generated (image, caption) pairs
    steps: int = 1200  # optimiser steps (about 3 minutes on 2 idle CPU cores)
    batch_size: int = 64  # 32 takes more steps per second but learns less per second
    lr: float = 1e-3  # 2e-3 collapses this small ViT from scratch
    weight_decay: float = 0.05
    # The 49k-word embedding is most of the parameters but the captions use ~100 words: frozen
    # random word vectors make each step ~25% cheaper and the text blocks still learn the words.
    freeze_token_embedding: bool = True
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "generator": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def images_to_tensor(images: list, size: int) -> torch.Tensor:
    """PIL images -> normalised (N, 3, size, size), with the statistics the demo configs use."""
    arr = np.stack([np.asarray(img.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
                    for img in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def multi_positive_infonce(logits: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every pair in the batch showing the same facial features is a positive.

    Generated captions repeat; plain InfoNCE would count an identical description of another image
    as a negative and learns nothing in the time a demo has (measured: loss stuck at ln(batch)).
    """
    same = (groups[:, None] == groups[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    image_to_text = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_to_image = -(target * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return 0.5 * (image_to_text + text_to_image)


RECHECK_SECONDS = 10.0  # how often the thread count follows the machine's load
REPORT_SECONDS = 60.0  # how often the log says how far pretraining is and what slows it


class _Pace:
    """Pretraining's thread count kept fitting the machine, and a log line a minute saying how far it is, how long
    is left and, on a busy machine, why it takes longer than on an idle one."""

    def __init__(self, steps: int, threads: int | None) -> None:
        from ..engine.threads import ThreadGovernor

        self.steps, self.governor = steps, ThreadGovernor(threads or None)
        self.start = self.checked = self.reported = time.monotonic()

    def step_done(self, step: int) -> None:
        now = time.monotonic()
        if now - self.checked >= RECHECK_SECONDS:
            self.governor.recheck()
            self.checked = now
        if now - self.reported >= REPORT_SECONDS or step == 20:
            self.reported = now
            rate = step / max(now - self.start, 1e-9)
            why = self.governor.why_slow()
            log.info("pretraining the demo CLIP: step %d/%d, %.1f steps/s, about %.0f min left%s", step,
                     self.steps, rate, (self.steps - step) / rate / 60, f" ({why})" if why else "")


def pretrain_clip(settings: PretrainSettings, progress: bool = True, workers: int = 1, threads: int | None = None
                  ) -> tuple[torch.nn.Module, dict]:
    """Contrastive training from random weights; returns the model and what it took. ``threads``: a fixed count
    (else chosen, and re-chosen as other work comes and goes)."""
    spec = get_arch(settings.arch)
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    faces = generate(settings.pairs, seed=10_000 + settings.seed, size=spec.image_size, workers=workers)
    images = images_to_tensor([f.image for f in faces], spec.image_size)
    tokens = tokenize([f.caption for f in faces], spec.context_length)
    feature_sets = {key: i for i, key in enumerate(sorted({f.attributes for f in faces}))}
    groups = torch.tensor([feature_sets[f.attributes] for f in faces])
    gen_seconds = time.perf_counter() - start
    model = build_clip(spec, seed=settings.seed).train()
    model.token_embedding.weight.requires_grad_(not settings.freeze_token_embedding)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, foreach=True)
    warmup = max(1, settings.steps // 20)
    g = torch.Generator().manual_seed(settings.seed)
    losses = []
    bar = tqdm(total=settings.steps, disable=not progress, desc="pretraining demo CLIP", unit="step", leave=False)
    pace = _Pace(settings.steps, threads)
    for step in range(settings.steps):
        lr = settings.lr * (step / warmup if step < warmup else
                            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(settings.steps - warmup, 1))))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(faces), (settings.batch_size,), generator=g)
        x = images[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        img = F.normalize(model.encode_image(x), dim=-1)
        batch_tokens = tokens[idx]
        txt = F.normalize(text_encode_embeddings(model, model.token_embedding(batch_tokens), batch_tokens), dim=-1)
        loss = multi_positive_infonce(model.logit_scale.exp().clamp(max=100) * img @ txt.t(), groups[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log.debug("pretraining step %d: loss %.3f", step + 1, np.mean(losses[-50:]))
        bar.update(1)
        bar.set_postfix_str(f"loss {np.mean(losses[-20:]):.3f}")
        pace.step_done(step + 1)
    bar.close()
    stats = {"pairs": len(faces), "steps": settings.steps, "first_loss": float(np.mean(losses[:20])),
             "final_loss": float(np.mean(losses[-20:])), "generate_seconds": round(gen_seconds, 1),
             "seconds": round(time.perf_counter() - start, 1)}
    return model.eval(), stats


def _cache_path(settings: PretrainSettings) -> Path:
    return cache_dir() / "demo" / f"clip-{settings.arch}-{settings.key()}.safetensors"


def cached_clip(settings: PretrainSettings) -> Path | None:
    path = _cache_path(settings)
    return path if path.is_file() and path.with_suffix(".json").is_file() else None


def demo_clip_path(settings: PretrainSettings, progress: bool = True, workers: int = 1,
                   threads: int | None = None) -> Path:
    """The cached demo CLIP for these settings, pretrained (and cached) first if missing."""
    path = _cache_path(settings)
    if cached_clip(settings):
        log.info("using cached demo CLIP %s", path)
        return path
    log.info("pretraining the demo CLIP (%d generated pairs, %d steps); cached at %s", settings.pairs,
             settings.steps, path)
    model, stats = pretrain_clip(settings, progress, workers, threads)
    save_clip_safetensors(model, get_arch(settings.arch), path,
                          source={"demo_pretraining": asdict(settings), "stats": stats})
    log.info("demo CLIP pretrained in %.0f s (final contrastive loss %.3f)", stats["seconds"], stats["final_loss"])
    return path
