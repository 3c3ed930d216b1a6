"""Hugging Face model folders: ``config.json`` plus single or sharded ``*.safetensors``.

Tensors are read one at a time (``safetensors`` memory-maps the files), so a loader that
quantizes as it goes never holds the whole model in 16-bit precision.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from qlora_jax.checkpoints.errors import CheckpointError

__all__ = ["SafetensorsFolder"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFolder:
    """Read access to the tensors of a Hugging Face folder, by checkpoint key.

    ``get(key)`` returns a host numpy array (bfloat16 through ml_dtypes). A missing file, a key
    that the index names but the file lacks, or a truncated file raise :class:`CheckpointError`
    naming the file and the key.
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._handles: dict[pathlib.Path, Any] = {}
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a folder (expected config.json and *.safetensors)")
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
            self._files = {key: self.path / name for key, name in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors file in {self.path}")
            self._files = {}
            for file in files:
                for key in self._open(file).keys():
                    self._files[key] = file

    @classmethod
    def from_file(cls, file: str | pathlib.Path) -> "SafetensorsFolder":
        """Read access to the tensors of one ``.safetensors`` file."""
        file = pathlib.Path(file)
        self = cls.__new__(cls)
        self.path = file.parent
        self._handles = {}
        self._files = {key: file for key in self._open(file).keys()}
        return self

    def _open(self, file: pathlib.Path):
        if file not in self._handles:
            if not file.exists():
                raise CheckpointError(f"checkpoint file {file} is missing")
            try:
                self._handles[file] = safe_open(str(file), framework="numpy")
            except SafetensorError as err:
                raise CheckpointError(f"cannot read {file}: {err} (truncated or corrupt file?)") from err
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def _handle_for(self, key: str):
        if key not in self._files:
            raise CheckpointError(f"checkpoint {self.path} is missing tensor {key!r}")
        return self._open(self._files[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle_for(key).get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        handle = self._handle_for(key)
        try:
            return handle.get_tensor(key)
        except SafetensorError as err:
            raise CheckpointError(f"cannot read tensor {key!r} from {self._files[key]}: {err}") from err

    def items(self, keys: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        for key in keys:
            yield key, self.get(key)

    def metadata(self) -> dict[str, str]:
        first = next(iter(self._files.values()))
        return self._open(first).metadata() or {}
