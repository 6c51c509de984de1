"""The stage contract (model/stage.py), checked for every stage in the registry: what the trainer, the builder, the
exporter and the recognizer rely on without asking which stage they hold."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from ceprompt.experiment.config import Config
from ceprompt.model.clip import build_clip
from ceprompt.model.head import HeadConfig
from ceprompt.model.stage import BuildOptions, ClassWords, Stage, TrainBatch
from ceprompt.model.stages import STAGES, stage_class

CLASSES = ClassWords.of(["happy", "sad", "fear"])


def build(name: str, training: bool = True, seed: int = 0) -> Stage:
    cls = stage_class(name)
    settings = cls.settings_type()
    settings.fill_compat(authors=False)
    clip = build_clip("tiny-vit-12", seed=seed)  # 12 blocks per tower: every default setting fits
    return cls.build(clip, settings, HeadConfig(top_k=4), CLASSES, BuildOptions(training=training))


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=sorted(STAGES))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_registry_names_settings_sections_and_chain(name: str) -> None:
    cls = STAGES[name]
    assert cls.name == name and issubclass(cls, Stage)
    assert typing.get_type_hints(Config)[name] is cls.settings_type  # the config's section named as the stage
    assert cls.builds_on is None or STAGES[cls.builds_on].number < cls.number
    assert cls.title and cls.describe(dataclasses.replace(cls.settings_type()))


def test_text_features_are_pure_and_trained_classes_untouched(name: str) -> None:
    model = build(name).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        trained = model.class_text_features().clone()
        other = model.text_features(["calm", "bored"])
        again = model.text_features(["calm", "bored"])
        assert torch.equal(model.text_features(list(CLASSES.words)), trained)
    assert other.shape == (2, trained.shape[1]) and torch.equal(other, again)
    assert model.classes == CLASSES and torch.equal(model.class_text_features(), trained)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_scores_use_the_given_text_features(name: str) -> None:
    model = build(name).eval()
    x = images()
    with torch.no_grad():
        own = model(x)
        text = model.text_features(["calm", "bored"])
        other = model(x, text_features=text)
    assert own.logits.shape == (3, 3) and other.logits.shape == (3, 2)
    assert torch.equal(other.global_emb, own.global_emb)


def test_training_step_reaches_exactly_the_trainable_parameters(name: str) -> None:
    model = build(name).train()
    out = model(TrainBatch(images(), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([0, 1, -1])))
    out.loss.backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert with_grad == trainable and trainable
    grouped = [id(p) for group in model.param_groups(1e-3, 5e-4, 0.65) for p in group["params"]]
    assert sorted(grouped) == sorted(trainable)  # every trainable tensor once, nothing frozen
    weights = model.trainable_state_dict()
    assert sum(v.numel() for v in weights.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert set(model.own_state_dict()) <= set(weights)


def test_saved_weights_and_extra_state_restore_the_same_model(name: str) -> None:
    from ceprompt.model.trainable import load_trainable

    model = build(name).train()
    model.start_training(4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(TrainBatch(images(), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]))) \
        .loss.backward()
    opt.step()
    fresh = build(name)
    fresh.start_training(4)
    load_trainable(fresh, model.trainable_state_dict(), "test")
    fresh.load_extra_state(model.extra_state())
    state, restored = model.extra_state(), fresh.extra_state()
    assert {k: v.tolist() for k, v in restored.items()} == {k: v.tolist() for k, v in state.items()}
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(images()).logits, fresh(images()).logits)


def test_gradient_checkpointing_and_block_pass_change_no_number(name: str) -> None:
    from ceprompt.model.towers import block_forward

    plain = build(name).train()
    batch = TrainBatch(images(), torch.tensor([0, 1, 2]))
    want = plain(batch).loss
    plain.set_grad_checkpointing(True)
    calls = []
    plain.set_block_pass(lambda block, x, mask: calls.append(1) or block_forward(block, x, mask))
    got = plain(batch).loss
    assert torch.allclose(got, want, rtol=1e-6) and calls
