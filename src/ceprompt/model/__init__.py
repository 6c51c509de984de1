"""CEPrompt itself: the CLIP description and tower passes, the scoring head, prompts, the stage contract
(``stage.py``) with its two stages, EVA (stage 1) and CAT (stage 2), each beside its settings section, and the
registry of stages (``stages.py``). Imports nothing but ``core`` from the package."""

import importlib.abc
import sys


class _HideTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError("hidden while open_clip starts", name=name)
        return None


def _import_open_clip() -> None:
    """open_clip imports Hugging Face transformers at start-up when it is installed, for parts ceprompt does not
    use (CoCa's text generation, Hugging Face text towers): 3-6 s of every command's start here. Import open_clip
    with transformers hidden (both then work as usual), unless either is already imported."""
    if "open_clip" in sys.modules or "transformers" in sys.modules:
        return
    finder = _HideTransformers()
    sys.meta_path.insert(0, finder)
    try:
        import open_clip  # noqa: F401
    finally:
        sys.meta_path.remove(finder)


_import_open_clip()
