"""Image preprocessing (DESIGN.md section 4), split into a deterministic resize and the rest.

RAF-DB training: bicubic resize, random horizontal flip. AffectNet training: resize, flip,
with p = 0.7 a random affine (+-20 deg, scale 0.8-1.0, translate 0.2), random erasing. Test:
resize only. Normalisation uses the config's mean/std (ImageNet's by default, as the reference),
which are stored with every checkpoint so inference normalises the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torchvision import transforms as T

from ..errors import ConfigError

AUGMENTATIONS = ("rafdb", "affectnet", "none")


@dataclass(frozen=True)
class Preprocess:
    """What inference must repeat exactly; saved in checkpoint sidecars."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]), d.get("interpolation", "bicubic"))

    def resize(self) -> Callable:
        mode = T.InterpolationMode(self.interpolation)
        return T.Resize((self.image_size, self.image_size), interpolation=mode, antialias=True)

    def to_tensor(self) -> Callable:
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])


def train_augment(kind: str, pre: Preprocess) -> Callable:
    """Random steps applied after the resize, ending in a normalised tensor."""
    if kind == "none":
        return pre.to_tensor()
    if kind == "rafdb":
        return T.Compose([T.RandomHorizontalFlip(), pre.to_tensor()])
    if kind == "affectnet":
        return T.Compose([
            T.RandomHorizontalFlip(),
            T.RandomApply([T.RandomAffine(20, translate=(0.2, 0.2), scale=(0.8, 1.0))], p=0.7),
            pre.to_tensor(),
            T.RandomErasing(),
        ])
    raise ConfigError(f"data.augment={kind!r}; expected one of {AUGMENTATIONS}")


def preprocess_for(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Preprocess:
    return Preprocess(image_size, tuple(float(m) for m in mean), tuple(float(s) for s in std))
