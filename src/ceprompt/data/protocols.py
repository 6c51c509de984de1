"""The protocols a CLIP-based model allows because its classes are words: training on some classes only
(base-to-novel, as in CoOp and MaPLe), few-shot training, and evaluation on another label set (cross-dataset).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from ..core.errors import ConfigError, brief
from .class_names import canonical, check_class_list, parse_aliases
from .datasets import Sample, Splits


def base_split(splits: Splits, base_classes: Sequence[str], aliases: Sequence[str] | None = None) -> Splits:
    """``splits`` with only ``base_classes`` (named as the dataset names them, or by alias), relabelled in the
    dataset's order: what a base-to-novel run trains and selects on."""
    extra = parse_aliases(aliases)
    wanted = check_class_list(base_classes, "data.base_classes", extra)
    index = {canonical(name, extra): i for i, name in enumerate(splits.class_names)}
    missing = [name for name in wanted if canonical(name, extra) not in index]
    if missing:
        raise ConfigError(f"data.base_classes: {brief(missing)} not in {splits.name}'s classes {splits.class_names}")
    keep = sorted(index[canonical(name, extra)] for name in wanted)
    if len(keep) == len(splits.class_names):
        raise ConfigError("data.base_classes names every class of the dataset; leave it unset, or name a subset")
    new_label = {old: new for new, old in enumerate(keep)}

    def subset(samples: list[Sample]) -> list[Sample]:
        return [dataclasses.replace(s, label=new_label[s.label]) for s in samples if s.label in new_label]

    return dataclasses.replace(splits, class_names=[splits.class_names[i] for i in keep], train=subset(splits.train),
                               test=subset(splits.test))


def few_shot(samples: Sequence[Sample], class_names: Sequence[str], shots: int, seed: int,
             after: str = "") -> list[Sample]:
    """``shots`` training images of every class, drawn with ``seed`` (the same draw for the same data and seed).
    ``after`` says what was taken from ``samples`` before (for the error)."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    short = [f"{class_names[label]} ({len(by_class.get(label, []))})" for label in range(len(class_names))
             if len(by_class.get(label, [])) < shots]
    if short:
        raise ConfigError(f"data.shots={shots}, but these classes have fewer training images"
                          f"{' ' + after if after else ''}: {', '.join(short)}")
    rng = random.Random(seed)
    chosen = {id(s) for label in sorted(by_class) for s in rng.sample(by_class[label], shots)}
    return [s for s in samples if id(s) in chosen]


def relabel_for(samples: Sequence[Sample], dataset_classes: Sequence[str], targets: Sequence[str],
                aliases: Sequence[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Samples labelled by ``targets`` (matched to the dataset's classes by name or alias); images of dataset
    classes that no target names are left out. Returns them and the dataset classes left out."""
    extra = parse_aliases(aliases)
    target_index = {canonical(name, extra): j for j, name in enumerate(targets)}
    mapping = {i: target_index.get(canonical(name, extra)) for i, name in enumerate(dataset_classes)}
    left_out = [name for i, name in enumerate(dataset_classes) if mapping[i] is None]
    kept = [dataclasses.replace(s, label=mapping[s.label]) for s in samples if mapping[s.label] is not None]
    return kept, left_out
