"""The stage contract: what EVA (stage 1) and CAT (stage 2) both are, declared once.

A stage is a module around a CLIP that scores images against class text with the shared head. Everything above
``model/`` (the trainer, the checkpoint builder, the exporter, the recognizer) talks to a stage through this
contract and the registry (:mod:`.stages`), never by asking which stage it holds:

* ``build(clip, settings, head, classes, options)``: the stage from its settings section (its dataclass, the
  config's ``eva``/``cat`` section) and a CLIP;
* ``text_features(words)``: class text embeddings for any class words, a pure function of the model (nothing is
  written to it), and ``class_text_features()`` for the trained classes;
* ``forward(images, text_features=None)``: head scores; ``forward(TrainBatch)``: the training loss;
* ``param_groups(lr, weight_decay, layer_decay)``: what the optimiser updates and at which rates;
* ``trainable_state_dict()`` / ``own_state_dict()``: what a checkpoint holds / what a self-contained export adds
  beside the CLIP; ``extra_state()`` / ``load_extra_state()``: per-process state that resume restores;
* ``start_training(n_samples)``, ``set_grad_checkpointing()``, ``set_block_pass()``;
* ``prompts()`` and ``describe()``: what checkpoints and model cards say about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from open_clip.model import CLIP
from torch import nn

from .head import HeadConfig, ScoreOutput
from .towers import BlockPass, block_forward


@dataclass(frozen=True)
class ClassWords:
    """A stage's trained classes: the names users see and the words its prompts put in their place."""

    names: tuple[str, ...]
    words: tuple[str, ...]

    @classmethod
    def of(cls, names: Sequence[str], words: Sequence[str] | None = None) -> "ClassWords":
        from ..core.errors import ConfigError

        words = list(words) if words is not None else list(names)
        if len(words) != len(names):
            raise ConfigError(f"data.prompt_names has {len(words)} words for {len(names)} classes")
        return cls(tuple(names), tuple(words))


@dataclass(frozen=True)
class BuildOptions:
    """How a stage is run, beside what it is (its settings): the same for every stage, each using what applies."""

    training: bool = False  # build what training needs (stage 1: the distillation teacher)
    grad_checkpointing: bool = False  # recompute the trainable blocks' activations in backward
    teacher_cache: bool = True  # stage 1: remember the frozen teacher's embedding of every repeatable view


@dataclass(frozen=True)
class TrainBatch:
    """What a training step sees: images, labels, and which sample each image is (``index``) and whether it is that
    sample flipped (``flip`` 1 or 0) when a flip was the only random change, else -1."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor | None = None
    flip: torch.Tensor | None = None


class Stage(nn.Module):
    """Base of EVA and CAT; see the module docstring for the contract."""

    name: ClassVar[str]  # the config's `stage` value and registry key
    number: ClassVar[int]  # 1 or 2
    title: ClassVar[str]  # how model cards name it
    settings_type: ClassVar[type]  # the dataclass of its config section (named `name`)
    builds_on: ClassVar[str | None] = None  # the stage whose checkpoint this one starts from (backbone.init)

    def __init__(self, clip: CLIP, settings: Any, head: HeadConfig, classes: ClassWords,
                 options: BuildOptions = BuildOptions()) -> None:
        super().__init__()
        self.clip, self.settings, self.head, self.classes = clip, settings, head, classes
        self.grad_checkpointing = options.grad_checkpointing
        self.block_pass: BlockPass = block_forward

    @classmethod
    def build(cls, clip: CLIP, settings: Any, head: HeadConfig, classes: ClassWords,
              options: BuildOptions = BuildOptions()) -> "Stage":
        """The stage on ``clip`` (its weights are the stage's from then on: it freezes what it does not train)."""
        head.check_patches(clip.visual.positional_embedding.shape[0] - 1)
        return cls(clip, settings, head, classes, options)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes.names)

    @property
    def prompt_names(self) -> list[str]:
        return list(self.classes.words)

    # -- scoring ------------------------------------------------------------------------------------------------

    def text_features(self, words: Sequence[str]) -> torch.Tensor:
        """Class text embeddings (C, D) for ``words``, as the head takes them in the current mode."""
        raise NotImplementedError

    def class_text_features(self) -> torch.Tensor:
        """:meth:`text_features` of the trained classes."""
        return self.text_features(self.classes.words)

    def score(self, images: torch.Tensor, text_features: torch.Tensor) -> ScoreOutput:
        raise NotImplementedError

    def training_loss(self, batch: TrainBatch) -> ScoreOutput:
        raise NotImplementedError

    def forward(self, inputs: torch.Tensor | TrainBatch, labels: torch.Tensor | None = None,
                text_features: torch.Tensor | None = None) -> ScoreOutput:
        """Head scores of ``images`` against ``text_features`` (default: the trained classes'); with a
        :class:`TrainBatch` (or labels) also the training loss, computed here so DistributedDataParallel sees it."""
        if isinstance(inputs, TrainBatch):
            return self.training_loss(inputs)
        if labels is not None:
            return self.training_loss(TrainBatch(inputs, labels))
        return self.score(inputs, self.class_text_features() if text_features is None else text_features)

    # -- training -----------------------------------------------------------------------------------------------

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
        raise NotImplementedError

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights that are not the CLIP's, named as in :meth:`trainable_state_dict` (a self-contained export
        holds the whole CLIP and these)."""
        return {}

    def extra_state(self) -> dict[str, torch.Tensor]:
        """This process's state beside the weights that a resumed run needs to continue exactly."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def start_training(self, n_samples: int) -> None:
        """Called once before training on ``n_samples`` images (``TrainBatch.index`` < ``n_samples``)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_block_pass(self, block_pass: BlockPass) -> None:
        """Run the transformer blocks through ``block_pass`` (the compiled form with ``run.compile``)."""
        self.block_pass = block_pass

    # -- description --------------------------------------------------------------------------------------------

    def prompts(self) -> list[str] | None:
        """The class prompts as text, where they are fixed text."""
        return None

    @classmethod
    def describe(cls, settings: Any) -> str:
        """One line for model cards: what this stage trained, with its settings."""
        raise NotImplementedError
