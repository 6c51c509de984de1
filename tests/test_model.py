"""The CEPrompt modules on tiny random CLIPs: head arithmetic, both stages' forward passes and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ceprompt.model.cat import CAT, CatConfig
from ceprompt.model.clip import build_clip, tokenize
from ceprompt.model.eva import EVA, EvaConfig
from ceprompt.model.head import HeadConfig, emotion_scores
from ceprompt.model.stage import BuildOptions, ClassWords, TrainBatch
from ceprompt.model.towers import vision_embed

CLASSES = ["surprise", "fear", "disgust", "happy", "sad", "anger", "neutral"]


def EVAModel(clip, classes, training: bool = True, **settings) -> EVA:  # noqa: N802 - the stage, as tests build it
    """Stage 1 with its teacher (as training builds it) and ``settings`` of its config section."""
    section = EvaConfig(**settings)
    section.fill_compat(authors=False)
    return EVA.build(clip, section, HeadConfig(), ClassWords.of(classes), BuildOptions(training=training))


def CATModel(clip, classes, **settings) -> CAT:  # noqa: N802
    section = CatConfig(**settings)
    section.fill_compat(authors=False)
    return CAT.build(clip, section, HeadConfig(), ClassWords.of(classes))


@pytest.fixture()
def clip():
    return build_clip("tiny-vit", seed=0)


def batch(clip, n: int = 3):
    size = clip.visual.image_size[0]
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, size, size, generator=g), torch.tensor([0, 3, 6][:n])


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_head_against_direct_computation() -> None:
    g = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # 2 images, D = 2
    p = torch.tensor([  # 4 patches each
        [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]],
        [[0.0, -1.0], [0.8, 0.6], [0.0, 1.0], [1.0, 0.0]],
    ])
    t = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])  # 3 classes, deliberately unnormalised
    tn = t / t.norm(dim=1, keepdim=True)
    # by hand: cosine similarities, top-2 patch mean, per-row L2 normalisation, 0.3/0.7 mix
    s_global = torch.stack([torch.tensor([gi @ tc for tc in tn]) for gi in g])
    sims = torch.stack([torch.stack([torch.tensor([pi @ tc for tc in tn]) for pi in img]) for img in p])
    s_local = torch.stack([sims[b].sort(dim=0, descending=True).values[:2].mean(0) for b in range(2)])
    s_global = s_global / s_global.norm(dim=1, keepdim=True)
    s_local = s_local / s_local.norm(dim=1, keepdim=True)
    cfg = HeadConfig(top_k=2, alpha=0.3)
    assert torch.allclose(emotion_scores(g, p, t, cfg), 0.3 * s_local + 0.7 * s_global, atol=1e-6)
    assert torch.allclose(emotion_scores(g, p, t, HeadConfig(top_k=2, mode="global")), s_global, atol=1e-6)
    assert torch.allclose(emotion_scores(g, p, t, HeadConfig(top_k=2, mode="local")), s_local, atol=1e-6)
    # k = 1 is the max over patches; logit_scale multiplies
    s_max = sims.max(dim=1).values
    s_max = s_max / s_max.norm(dim=1, keepdim=True)
    got = emotion_scores(g, p, t, HeadConfig(top_k=1, alpha=1.0, logit_scale=10.0))
    assert torch.allclose(got, 10 * s_max, atol=1e-5)


def test_stage2_without_prompts_equals_open_clip(clip) -> None:
    reference = copy.deepcopy(clip)
    model = CATModel(clip, CLASSES, n_ctx=0, prompt_depth=0).eval()
    assert sum(p.numel() for p in model.prompt_learner.parameters()) == 0
    images, _ = batch(clip)
    prompts = [f"a photo of {c}." for c in CLASSES]
    with torch.no_grad():
        want_text = F.normalize(reference.encode_text(tokenize(prompts)), dim=-1)
        assert rel_err(model.class_text_features(), want_text) < 1e-5
        out = model(images)
        assert rel_err(out.global_emb, reference.encode_image(images)) < 1e-5
        assert out.patches.shape[1] == (clip.visual.grid_size[0] ** 2)


def test_stage1_untrained_equals_open_clip(clip) -> None:
    reference = copy.deepcopy(clip)
    model = EVAModel(clip, CLASSES, fix_layer=2).eval()
    images, _ = batch(clip)
    prompts = [f"a photo of a {c} facial expression, a type of facial expression." for c in CLASSES]
    with torch.no_grad():
        assert rel_err(model.class_text_features(), F.normalize(reference.encode_text(tokenize(prompts)), dim=-1)) < 1e-5
        out = model(images)
        assert rel_err(out.global_emb, reference.encode_image(images)) < 1e-5
        assert rel_err(model._teacher_global(model._lower(images)), reference.encode_image(images)) < 1e-5


def grads_after_backward(model, images, labels) -> dict[str, bool]:
    model.train()
    model(images, labels).loss.backward()
    return {name: p.grad is not None for name, p in model.named_parameters()}


@pytest.mark.parametrize("fix_layer", [0, 2, 4])
def test_stage1_gradients(clip, fix_layer: int) -> None:
    model = EVAModel(clip, CLASSES, fix_layer=fix_layer)
    got = grads_after_backward(model, *batch(clip))
    expected = {
        name for name in got
        if name.startswith(("clip.visual.ln_post.", "clip.visual.proj"))
        or any(name.startswith(f"clip.visual.transformer.resblocks.{i}.") for i in range(fix_layer, 4))
    }
    assert {n for n, has in got.items() if has} == expected
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in expected), name
    assert set(model.trainable_state_dict()) == {n[len("clip."):] for n in expected}


def test_stage1_layer_decay_groups() -> None:
    model = EVAModel(build_clip("tiny-vit-12", seed=0), CLASSES, fix_layer=2)
    groups = model.param_groups(lr=1e-4, weight_decay=5e-4, layer_decay=0.65)
    blocks = model.clip.visual.transformer.resblocks
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"], g["lr"]) for g in groups for p in g["params"]}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            if i < 2:
                assert id(p) not in scale_of
                continue
            scale, wd, lr = scale_of[id(p)]
            assert scale == pytest.approx(0.65 ** (12 - i))
            assert lr == pytest.approx(1e-4 * 0.65 ** (12 - i))
            assert wd == (5e-4 if p.ndim >= 2 else 0.0)
    assert scale_of[id(model.clip.visual.proj)] == (1.0, 5e-4, 1e-4)
    assert scale_of[id(model.clip.visual.ln_post.weight)][:2] == (1.0, 0.0)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable


@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("mode", ["append", "overwrite"])
def test_stage2_gradients(clip, invariant: bool, mode: str) -> None:
    model = CATModel(clip, CLASSES, n_ctx=2, prompt_depth=3, invariant_token=invariant, vision_prompts=mode)
    got = grads_after_backward(model, *batch(clip))
    with_grad = {n for n, has in got.items() if has}
    assert with_grad == {n for n in got if n.startswith("prompt_learner.")}
    assert set(model.trainable_state_dict()) == with_grad
    names = set(model.trainable_state_dict())
    assert ("prompt_learner.invariant" in names) is invariant
    assert ("prompt_learner.shallow_map.weight" in names) is (mode == "append")
    assert len(model.prompt_learner.deep_text) == 2


def capture_block_inputs(blocks) -> tuple[list[torch.Tensor], list]:
    """What each block receives: its first module, ``ln_1``, sees the block's input (blocks run through
    ``towers.block_forward``, not their own ``__call__``)."""
    seen: list[torch.Tensor] = []
    handles = [b.ln_1.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
               for b in blocks]
    return seen, handles


def test_vision_prompts_append(clip) -> None:
    model = CATModel(clip, CLASSES, n_ctx=2, prompt_depth=3, vision_prompts="append").eval()
    pl = model.prompt_learner
    images, _ = batch(clip, 2)
    n = clip.visual.grid_size[0] ** 2
    seen, handles = capture_block_inputs(clip.visual.transformer.resblocks)
    with torch.no_grad():
        out = model(images)
    assert out.patches.shape[1] == n  # no patch lost, prompts not scored
    assert all(x.shape[1] == 1 + n + 2 for x in seen)
    with torch.no_grad():
        shallow = clip.visual.ln_pre(pl.shallow_map(pl.ctx))
        deep = pl.deep_vision_prompts()
    assert torch.allclose(seen[0][0, 1 + n:], shallow, atol=1e-6)
    for j in (1, 2):
        assert torch.allclose(seen[j][1, 1 + n:], deep[j - 1], atol=1e-6)
    assert not torch.allclose(seen[3][0, 1 + n:], deep[1], atol=1e-3)  # block 3 >= depth runs unchanged
    for h in handles:
        h.remove()


def test_vision_prompts_overwrite(clip) -> None:
    model = CATModel(clip, CLASSES, n_ctx=2, prompt_depth=3, vision_prompts="overwrite").eval()
    pl = model.prompt_learner
    images, _ = batch(clip, 2)
    n = clip.visual.grid_size[0] ** 2
    seen, handles = capture_block_inputs(clip.visual.transformer.resblocks)
    with torch.no_grad():
        out = model(images)
        plain = clip.visual.ln_pre(vision_embed(clip.visual, images))
        deep = pl.deep_vision_prompts()
    assert out.patches.shape[1] == n and all(x.shape[1] == 1 + n for x in seen)
    assert torch.allclose(seen[0], plain, atol=1e-6)  # block 0 sees the unmodified sequence
    for j in (1, 2):
        assert torch.allclose(seen[j][1, 1:3], deep[j - 1], atol=1e-6)
    for h in handles:
        h.remove()


def test_text_deep_prompts_fill_context_slots(clip) -> None:
    model = CATModel(clip, CLASSES, n_ctx=2, prompt_depth=3, invariant_token=True)
    pl = model.prompt_learner
    seen, handles = capture_block_inputs(clip.transformer.resblocks)
    with torch.no_grad():
        model.class_text_features()
    assert pl.ctx_slots == slice(2, 4)
    emb = pl.text_embeddings(pl.token_embeds)
    assert torch.equal(emb[:, 1], pl.invariant.expand(len(CLASSES), -1))
    assert torch.equal(emb[:, 2:4], pl.ctx.unsqueeze(0).expand(len(CLASSES), -1, -1))
    for j in (1, 2):
        assert torch.allclose(seen[j][:, 2:4], pl.deep_text[j - 1].unsqueeze(0).expand(len(CLASSES), -1, -1))
    # context initialised from "a photo" of the init phrase; "of" stays a frozen word
    words = clip.token_embedding(tokenize(["a photo of"]))[0, 1:3]
    assert torch.equal(pl.ctx.detach(), words.detach())
    for h in handles:
        h.remove()


def test_teacher_is_untouched_clip_and_stays_frozen(clip) -> None:
    reference = copy.deepcopy(clip)
    model = EVAModel(clip, CLASSES, fix_layer=1)
    images, labels = batch(clip)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    opt.zero_grad()
    model(images, labels).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        want = reference.encode_image(images)
        teacher = model._teacher_global(model._lower(images))
        student = model(images).global_emb
    assert rel_err(teacher, want) < 1e-6
    assert rel_err(student, want) > 1e-3


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_autocast_forward_backward(clip, stage: int) -> None:
    model = EVAModel(clip, CLASSES) if stage == 1 else CATModel(clip, CLASSES, n_ctx=2, prompt_depth=3)
    images, labels = batch(clip)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, labels)
    out.loss.backward()
    assert out.logits.dtype == torch.float32
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_teacher_cache_reuses_embeddings_of_repeated_views(clip) -> None:
    model = EVAModel(clip, CLASSES, fix_layer=2).eval()
    model.start_training(10)
    images, labels = batch(clip)
    # two repeatable views (sample 2 as it is, sample 3 flipped: keys 4 and 7), one that is not (random affine)
    index, flip = torch.tensor([2, 3, 0]), torch.tensor([0, 1, -1])
    calls: list[int] = []
    original = model._teacher_global
    model._teacher_global = lambda x: calls.append(len(x)) or original(x)
    with torch.no_grad():
        first = model(TrainBatch(images, labels, index, flip))
        second = model(TrainBatch(images, labels, index, flip))
        uncached = model(images, labels)
    assert calls == [3, 1, 3]  # the second pass only runs the teacher for the unrepeatable view
    assert model.cache.known.nonzero().flatten().tolist() == [4, 7]
    assert torch.allclose(first.loss, second.loss) and torch.allclose(first.loss, uncached.loss)
    state = model.extra_state()
    fresh = EVAModel(build_clip("tiny-vit", seed=0), CLASSES, fix_layer=2)
    fresh.start_training(10)
    fresh.load_extra_state(state)
    assert torch.equal(fresh.cache.values, model.cache.values)
