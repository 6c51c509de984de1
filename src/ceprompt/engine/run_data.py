"""The images a training run uses: the dataset read and checked once (rank 0), then the classes, the validation
split and the shots the config's protocol asks for."""

from __future__ import annotations

import dataclasses

from ..core.errors import ConfigError, DataError
from ..core.runtime import Runtime
from ..data.datasets import Splits, load_splits, validation_split
from ..data.protocols import base_split, few_shot
from ..experiment.config import Config


def load_data(cfg: Config, rt: Runtime) -> Splits:
    """Rank 0 checks every image; the others read the index once it has passed."""
    d = cfg.data
    error, splits = None, None
    if rt.is_main:
        try:
            splits = load_splits(d.dataset, d.root or "", d.image_dir, d.classes, d.verify_images,
                                 d.skip_bad_images, workers=max(d.workers, 4),
                                 allow_outside_root=d.allow_outside_root)
        except DataError as exc:
            error = str(exc)
    shared = rt.gather((error, splits))[0]
    if shared[0]:
        raise DataError(shared[0])
    splits = shared[1]
    if d.base_classes:  # base-to-novel: the other classes are never seen in training
        splits = base_split(splits, d.base_classes, d.class_aliases)
    # The validation split comes from all of a class's training images, before the shots are drawn: with
    # data.shots=1 a class still has images to hold out, and the shots are never validation images.
    train, val = validation_split(splits.train, d.val_fraction, cfg.run.seed)
    if d.val_fraction and not val:
        raise ConfigError(f"data.val_fraction={d.val_fraction}: no class of {splits.name} has two training images, "
                          "so nothing can be held out to validate on; set data.val_fraction=0 (the epoch is then "
                          "chosen on the test split)")
    if d.shots:
        train = few_shot(train, splits.class_names, d.shots, cfg.run.seed,
                         after="after data.val_fraction's share was held out" if val else "")
    return dataclasses.replace(splits, train=train, val=val)
