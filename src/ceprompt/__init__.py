"""CEPrompt: cross-modal emotion-aware prompting of CLIP for facial expression recognition."""

from __future__ import annotations

__version__ = "0.3.0"


def load(checkpoint, device: str = "auto", precision: str = "auto", **kwargs):  # type: ignore[no-untyped-def]
    """A recognizer for a trained checkpoint (file or run directory); see :mod:`ceprompt.api`."""
    from .api import load as _load

    return _load(checkpoint, device=device, precision=precision, **kwargs)


def train(config=None, resume=None, overwrite: bool = False, sets=(), **overrides):  # type: ignore[no-untyped-def]
    """Train either stage, as ``ceprompt train`` does; see :func:`ceprompt.api.train`."""
    from .api import train as _train

    return _train(config, resume=resume, overwrite=overwrite, sets=sets, **overrides)
