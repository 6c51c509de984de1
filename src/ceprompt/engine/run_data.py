"""The images a training run uses: the dataset read and checked once (rank 0), then the classes and shots the
config's protocol asks for."""

from __future__ import annotations

import dataclasses

from ..core.errors import DataError
from ..core.runtime import Runtime
from ..data.datasets import Splits, load_splits
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
    if d.shots:
        splits = dataclasses.replace(splits, train=few_shot(splits.train, splits.class_names, d.shots, cfg.run.seed))
    return splits
