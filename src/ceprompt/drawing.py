"""Pictures of results: faces boxed and labelled, and explanation heat maps (``from ceprompt.verbs.drawing import
annotate, explanation_image``, as documented). The code lives in :mod:`ceprompt.verbs.drawing`."""

from .verbs.drawing import annotate, explanation_image, save_png

__all__ = ["annotate", "explanation_image", "save_png"]
