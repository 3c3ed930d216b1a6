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


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise CheckpointError(f"names {repeated} more than once")
    return dict(pairs)


class SafetensorsFolder:
    """Read access to the tensors of a Hugging Face folder, by checkpoint key.

    ``get(key)`` returns a host numpy array (bfloat16 through ml_dtypes). Everything that can be
    checked without reading tensor data is checked when the folder is opened, so that a bad
    folder fails in milliseconds, not after minutes of loading: every shard's header (a
    truncated or corrupt file), that the index names only shards that exist, inside the folder,
    and that each shard holds the tensors the index assigns to it and no others; that no tensor
    is stored twice (in two shards, or twice in the index); and that a folder holds either one
    ``model.safetensors`` or an index, not both (transformers would read the single file).

    Args:
      path: the folder.

    Raises:
      CheckpointError: naming the file and the key, for any of the above.
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._handles: dict[pathlib.Path, Any] = {}
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a folder (expected config.json and *.safetensors)")
        index = self.path / INDEX_FILE
        if index.exists():
            if (self.path / SINGLE_FILE).exists():
                raise CheckpointError(f"{self.path} holds both {SINGLE_FILE} and {INDEX_FILE}; transformers reads "
                                      f"{SINGLE_FILE} and ignores the index: remove the one that is stale")
            self._files = self._read_index(index)
            by_file: dict[pathlib.Path, set[str]] = {}
            for key, file in self._files.items():
                by_file.setdefault(file, set()).add(key)
            for file, keys in by_file.items():
                stored = set(self._open(file).keys())
                if keys - stored:
                    raise CheckpointError(f"{index} assigns {sorted(keys - stored)[:8]} to {file.name}, which does "
                                          "not hold them")
                if stored - keys:
                    raise CheckpointError(f"{file} holds {sorted(stored - keys)[:8]}, which {index.name} does not "
                                          "list (a stale or foreign shard?)")
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors file in {self.path}")
            self._files = {}
            for file in files:
                for key in self._open(file).keys():
                    if key in self._files:
                        raise CheckpointError(f"tensor {key!r} is stored twice, in {self._files[key].name} and "
                                              f"{file.name} (in {self.path})")
                    self._files[key] = file

    def _read_index(self, index: pathlib.Path) -> dict[str, pathlib.Path]:
        try:
            content = json.loads(index.read_text(), object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{index} is not valid JSON: {err}") from err
        except CheckpointError as err:
            raise CheckpointError(f"{index} {err}") from None
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: field 'weight_map' must be an object mapping tensor names to shard "
                                  f"file names, got {weight_map!r:.80}")
        files = {}
        for key, name in weight_map.items():
            file = self.path / name
            if pathlib.Path(name).name != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index}: tensor {key!r} is mapped to {name!r}; expected the name of a "
                                      ".safetensors file in the folder")
            files[key] = file
        absent = sorted({f.name for f in files.values() if not f.exists()})
        if absent:
            raise CheckpointError(f"{index} names shard(s) {absent} that are missing from {self.path}")
        return files

    @classmethod
    def from_file(cls, file: str | pathlib.Path) -> SafetensorsFolder:
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

    def file_of(self, key: str) -> pathlib.Path:
        """The file that holds tensor ``key``."""
        if key not in self._files:
            raise CheckpointError(f"checkpoint {self.path} is missing tensor {key!r}")
        return self._files[key]

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
