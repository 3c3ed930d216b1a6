"""LoRA adapters in PEFT's format: ``adapter_model.safetensors`` plus ``adapter_config.json``.

Keys follow PEFT's saved names for a causal LM, with the adapter name stripped:
``base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``). Our adapter pytree stacks layers on a leading axis; these
functions split and stack them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.safetensors_io import SafetensorsFolder
from qlora_jax.lora import LoraConfig
from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig

__all__ = ["save_peft_adapter", "load_peft_adapter", "peft_key", "adapter_targets"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model.model."


def peft_key(layer: int, name: str, matrix: str) -> str:
    """PEFT's saved key of one adapter matrix ("lora_A" or "lora_B")."""
    return layout.hf_key(layer, name, f"{matrix}.weight", prefix=_PREFIX)


def adapter_targets(lora: dict[str, Any]) -> tuple[str, ...]:
    """The linear layers an adapter pytree holds adapters for, in decoder order."""
    held = {name for group in lora["layers"].values() for name in group}
    return tuple(name for name in layout.LINEAR_LAYERS if name in held)


def save_peft_adapter(
    path: str | pathlib.Path,
    lora: dict[str, Any],
    lora_config: LoraConfig,
    config: LlamaConfig,
    *,
    base_model_name_or_path: str | None = None,
) -> pathlib.Path:
    """Writes ``lora`` (our stacked adapter pytree) as a PEFT adapter folder; returns the folder.

    The adapter's modules are those ``lora`` holds; its hyperparameters (r, alpha, dropout,
    rsLoRA) come from ``lora_config``.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    targets = adapter_targets(lora)
    for name in targets:
        pair = lora["layers"][layout.module_group(name)][name]
        for matrix in ("lora_A", "lora_B"):
            stacked = np.asarray(jax.device_get(pair[matrix]))
            for layer in range(config.num_hidden_layers):
                tensors[peft_key(layer, name, matrix)] = np.ascontiguousarray(stacked[layer])
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(lora_config.to_peft_config(targets, base_model_name_or_path),
                                                  indent=2))
    return path


_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A|lora_B)(?:\.[\w-]+)?\.weight$")


def load_peft_adapter(
    path: str | pathlib.Path, config: LlamaConfig, *, dtype: str | None = None
) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT LoRA adapter folder into our stacked pytree and its :class:`LoraConfig`.

    ``dtype``: the adapters' dtype (None: as stored). The returned config's ``target_modules``
    are the modules the file holds adapters for. Raises :class:`CheckpointError` naming the key
    for missing matrices, unexpected keys (e.g. an adapter on a module we do not implement) and
    shapes that disagree with the model.
    """
    path = pathlib.Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.exists():
        raise CheckpointError(f"{path} has no {ADAPTER_CONFIG}")
    lora_config = LoraConfig.from_peft_config(json.loads(config_file.read_text()))
    if not (path / ADAPTER_WEIGHTS).exists():
        raise CheckpointError(f"{path} has no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    source = SafetensorsFolder.from_file(path / ADAPTER_WEIGHTS)
    found: dict[tuple[int, str, str], str] = {}
    for key in source.keys():
        match = _KEY.match(key)
        if match is None or match.group(3) not in layout.LINEAR_LAYERS:
            raise CheckpointError(f"unexpected tensor {key!r} in {path / ADAPTER_WEIGHTS}")
        found[(int(match.group(1)), match.group(3), match.group(4))] = key
    targets = tuple(sorted({name for _, name, _ in found}, key=layout.LINEAR_LAYERS.index))
    lora_config = dataclasses.replace(lora_config, target_modules=targets, dtype=dtype)
    shapes = config.linear_shapes()
    layers: dict[str, dict[str, Any]] = {}
    for name in targets:
        out_features, in_features = shapes[name]
        expected = {"lora_A": (lora_config.r, in_features), "lora_B": (out_features, lora_config.r)}
        pair = {}
        for matrix, shape in expected.items():
            per_layer = []
            for layer in range(config.num_hidden_layers):
                key = found.get((layer, name, matrix))
                if key is None:
                    raise CheckpointError(f"{path / ADAPTER_WEIGHTS} is missing {peft_key(layer, name, matrix)!r}")
                value = source.get(key)
                if value.shape != shape:
                    raise CheckpointError(f"adapter tensor {key!r} has shape {list(value.shape)}, expected {list(shape)}")
                per_layer.append(value)
            stacked = jnp.asarray(np.stack(per_layer))
            pair[matrix] = stacked if dtype is None else stacked.astype(dtype)
        layers.setdefault(layout.module_group(name), {})[name] = pair
    return {"layers": layers}, lora_config
