"""CEPrompt: cross-modal emotion-aware prompting of CLIP for facial expression recognition."""

from __future__ import annotations

__version__ = "0.1.0"
