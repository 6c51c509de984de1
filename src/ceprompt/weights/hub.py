"""Models by name: CLIP weights through open_clip's pretrained registry and the Hugging Face cache, and
trained ceprompt models on the Hugging Face Hub.

* ``--clip`` (``backbone.path``) takes a file or folder as before, or a name: ``ViT-B-16`` (OpenAI's
  weights, as in the paper), ``ViT-B-16:openai``, ``ViT-L-14:openai`` and any other open_clip
  ``MODEL:TAG`` with a Hub copy, or ``hf-hub:ORG/NAME`` (an open_clip or a transformers CLIP repo).
* ``ceprompt.load("hf-hub:ORG/NAME[@REV]")`` loads a model written by ``ceprompt export hub``.

Files come from the Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME``), downloaded first when online;
``HF_HUB_OFFLINE=1`` is respected. Only safetensors and JSON are read from a Hub repo, except
``open_clip_pytorch_model.bin`` where a repo has nothing else, which is read with ``weights_only=True``.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..core.errors import CheckpointError
from ..core.schema import expect, read_json

log = logging.getLogger(__name__)
HF_PREFIX = "hf-hub:"
DEFAULT_TAG = "openai"  # a bare architecture name means OpenAI's weights, the paper's backbone
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TRANSFORMERS_FILES = ("config.json", "model.safetensors")
# Licenses we can state for a backbone in a model card (OpenAI's CLIP weights are MIT-licensed).
KNOWN_LICENSES = {"openai": "MIT (OpenAI CLIP)"}


@dataclass(frozen=True)
class ResolvedClip:
    path: Path  # a local file or folder in the Hugging Face cache
    name: str  # the name as the user gave it, normalised (ViT-B-16 -> ViT-B-16:openai)
    quick_gelu: bool | None  # what the registry or repo config says; None when it does not say


def is_name(value: str) -> bool:
    """A pretrained name rather than a path: ``hf-hub:...`` or an open_clip ``MODEL[:TAG]`` it knows."""
    if value.startswith(HF_PREFIX):
        return True
    return _registry(value) is not None


def _registry(value: str) -> tuple[str, str, dict[str, Any]] | None:
    from open_clip.pretrained import get_pretrained_cfg

    if "/" in value or "\\" in value or value.count(":") > 1:
        return None
    model, _, tag = value.partition(":")
    tag = tag or DEFAULT_TAG
    cfg = get_pretrained_cfg(model, tag)
    return (model, tag, cfg) if cfg else None


def hub_command(verb: str) -> str:
    """The installed huggingface_hub's command line for ``verb`` (upload, download): ``hf`` since 0.34 (1.0 and
    later have no ``huggingface-cli``), ``huggingface-cli`` before."""
    import importlib.metadata as md

    try:
        major, minor = (int("".join(c for c in part if c.isdigit()) or 0)
                        for part in md.version("huggingface_hub").split(".")[:2])
    except (md.PackageNotFoundError, ValueError):
        return f"hf {verb}"
    return f"hf {verb}" if (major, minor) >= (0, 34) else f"huggingface-cli {verb}"


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers at all. Without a network huggingface_hub retries for most of a minute, with a
    warning per attempt; ceprompt asks once, quickly, and otherwise reads the cache only, saying so once.
    ``HF_HUB_OFFLINE=1`` means no; behind a proxy the answer is left to huggingface_hub."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:  # in a thread: a stuck name lookup cannot be given a timeout otherwise
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            answered.append(False)
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    if not (answered and answered[0]):
        log.warning("the Hugging Face Hub (%s) cannot be reached: using the local cache (%s) only",
                    host, constants.HF_HUB_CACHE)
        return False
    return True


def _offline_hint(repo: str, files: tuple[str, ...], revision: str | None = None) -> str:
    from huggingface_hub import constants

    at = f" --revision {revision}" if revision else ""
    return (f"needs {' or '.join(files)} from the Hugging Face repo {repo}, which is not in the cache "
            f"({constants.HF_HUB_CACHE}); when online run `{hub_command('download')} {repo} {files[0]}{at}` "
            "(or any ceprompt command once), or put the files there")


def _download(repo: str, filename: str, revision: str | None = None) -> Path | None:
    """The cached file (downloaded first when online), or None when the repo does not have it / it is not
    cached while offline. Other errors (a corrupt cache) propagate as one line."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision,
                                    local_files_only=not hub_reachable()))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{HF_PREFIX}{repo}: no such repository on the Hugging Face Hub (or it is private)") \
            from None
    except Exception as exc:  # network errors and the like: huggingface_hub's own types vary by version
        log.debug("hf_hub_download %s %s: %s", repo, filename, exc)
        return None


def resolve_clip(value: str) -> ResolvedClip:
    """The local file (or folder) for a CLIP name, from the cache or downloaded."""
    if value.startswith(HF_PREFIX):
        repo, revision = _split_repo(value)
        for filename in OPEN_CLIP_FILES:
            path = _download(repo, filename, revision)
            if path is not None:
                return ResolvedClip(path, value, _open_clip_quick_gelu(repo, revision))
        config = _download(repo, TRANSFORMERS_FILES[0], revision)
        weights = _download(repo, TRANSFORMERS_FILES[1], revision) if config else None
        if config and weights:
            return ResolvedClip(weights.parent, value, None)  # a transformers CLIP folder
        raise CheckpointError(f"{value}: {_offline_hint(repo, OPEN_CLIP_FILES, revision)}")
    found = _registry(value)
    if found is None:
        raise CheckpointError(f"{value}: no such file, and not a pretrained CLIP name (for example ViT-B-16, "
                              "ViT-B-16:openai, ViT-L-14:openai or hf-hub:ORG/NAME)")
    model, tag, cfg = found
    hub = cfg.get("hf_hub", "")
    if not hub:
        raise CheckpointError(f"{value}: open_clip knows these weights only by URL ({cfg.get('url')}); download the "
                              "file yourself and pass its path")
    repo, filename = posixpath.split(hub)  # "org/name/" (default files) or "org/name/file.bin"
    files = (filename,) if filename else OPEN_CLIP_FILES
    for name in files:
        path = _download(repo, name)
        if path is not None:
            return ResolvedClip(path, f"{model}:{tag}", bool(cfg.get("quick_gelu", False)))
    raise CheckpointError(f"{value}: {_offline_hint(repo, files)}")


def _open_clip_quick_gelu(repo: str, revision: str | None) -> bool | None:
    config = _download(repo, "open_clip_config.json", revision)
    if config is None:
        return None
    try:
        model_cfg = expect(read_json(config.read_bytes(), str(config)), "model_cfg", str(config), dict, optional=True,
                           default={})
        return expect(model_cfg, "quick_gelu", f"{config} (model_cfg)", bool, optional=True, default=False)
    except (OSError, ValueError):
        return None


def _split_repo(value: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME[@REV]`` -> (``ORG/NAME``, REV)."""
    repo = value[len(HF_PREFIX):]
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"{value}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


def download_model(value: str) -> Path:
    """The local folder of a model exported by ``ceprompt export hub`` and published on the Hub."""
    from huggingface_hub import snapshot_download

    repo, revision = _split_repo(value)
    try:
        folder = Path(snapshot_download(repo_id=repo, revision=revision, local_files_only=not hub_reachable(),
                                        allow_patterns=["config.json", "model.safetensors", "README.md"]))
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{value}: cannot get the model ({reason}); "
                              f"{_offline_hint(repo, ('config.json', 'model.safetensors'), revision)}") from None
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise CheckpointError(f"{value}: the repo has no model.safetensors and config.json written by "
                              "`ceprompt export hub`")
    return folder


def backbone_license(record: dict[str, Any]) -> str:
    name = str(record.get("name") or "")
    tag = name.rpartition(":")[2] if ":" in name else ""
    return KNOWN_LICENSES.get(tag, "not recorded: state the license of the CLIP weights you used")
