"""LoRA adapters in PEFT's format: ``adapter_model.safetensors`` plus ``adapter_config.json``.

Keys follow PEFT's saved names for a causal LM, with the adapter name stripped:
``base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``). Our adapter pytree stacks layers on a leading axis; these
functions split and stack them.

An MoE layer's expert adapters (``[L, E, r, in]`` in our pytree) are one adapter per expert module
under transformers 4's names (``...block_sparse_moe.experts.{e}.w1.lora_A.weight`` for Mixtral,
``...mlp.experts.{e}.gate_proj.lora_A.weight`` for Qwen3-MoE), with ``target_modules`` naming
them (``w1``...): the format PEFT wrote for these models, and which PEFT 0.21 converts to
transformers 5's fused expert parameters when it loads it. (PEFT's own transformers 5 format,
``target_parameters`` with fused ranks, is refused by the ``rank_pattern`` check.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.safetensors_io import SafetensorsFolder
from qlora_jax.checkpoints.validate import CheckedSource
from qlora_jax.lora import LoraConfig
from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.layout import adapter_targets  # public here too (save_peft_adapter's module list)

__all__ = ["save_peft_adapter", "load_peft_adapter", "peft_key", "router_key", "adapter_targets"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model.model."


def peft_key(layer: int, name: str, matrix: str) -> str:
    """PEFT's saved key of one adapter matrix.

    Args:
      layer: the decoder layer's index.
      name: the linear layer's name (``"q_proj"``, ...).
      matrix: ``"lora_A"`` or ``"lora_B"``.

    Returns:
      e.g. ``"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"``.
    """
    return layout.hf_key(layer, name, f"{matrix}.weight", prefix=_PREFIX)


def save_peft_adapter(
    path: str | pathlib.Path,
    lora: dict[str, Any],
    lora_config: LoraConfig,
    config: LlamaConfig,
    *,
    base_model_name_or_path: str | None = None,
) -> pathlib.Path:
    """Writes ``lora`` (our stacked adapter pytree) as a PEFT adapter folder.

    Args:
      path: the folder to write (``adapter_config.json`` and ``adapter_model.safetensors``).
      lora: the adapters, ``{"layers": {group: {name: {"lora_A": [L, r, in], "lora_B": [L, out, r]}}}}``;
        the adapter's modules are those it holds.
      lora_config: the hyperparameters written (r, alpha, dropout, rsLoRA).
      config: the model config (layer count, module names).
      base_model_name_or_path: recorded in ``adapter_config.json`` (None: left empty).

    Returns:
      The folder, as a :class:`pathlib.Path`.

    References:
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021.
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
                modules = layout.adapter_modules(config, layer, name, prefix=_PREFIX)
                if config.expert_stack(name):  # one adapter per expert module
                    for e, module in enumerate(modules):
                        tensors[f"{module}.{matrix}.weight"] = np.ascontiguousarray(stacked[layer, e])
                else:
                    tensors[peft_key(layer, name, matrix)] = np.ascontiguousarray(stacked[layer])
    tensors.update(_router_tensors(lora, lora_config, config))
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_names = [layout.peft_target_name(config, name) for name in targets]
    (path / ADAPTER_CONFIG).write_text(json.dumps(lora_config.to_peft_config(peft_names, base_model_name_or_path),
                                                  indent=2))
    return path


# adapter_config.json fields (PEFT 0.21) that change what a LoRA adapter computes; qlora-jax
# implements none of them, so each must be off (null, false or empty). Initialisation-only
# settings (init_lora_weights, loftq/eva/corda configs, ...) do not matter once trained.
_MUST_BE_OFF = ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "exclude_modules",
                "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "trainable_token_indices",
                "layer_replication", "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora",
                "monteclora_config", "arrow_config", "kasa_config")
_OFF = (None, False, "", [], {})


def _read_adapter_config(file: pathlib.Path, config: LlamaConfig) -> LoraConfig:
    """The :class:`LoraConfig` of a PEFT ``adapter_config.json``, every field checked and named on error."""
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: field 'peft_type' is {cfg.get('peft_type')!r}; expected 'LORA'")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CheckpointError(f"{file}: field 'r' is {r!r}; expected a positive integer (the LoRA rank)")
    for field in ("lora_alpha", "lora_dropout"):
        value = cfg.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise CheckpointError(f"{file}: field {field!r} is {value!r}; expected a finite number")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise CheckpointError(f"{file}: field 'use_rslora' is {cfg['use_rslora']!r}; expected true or false")
    targets = cfg.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or (
            isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        raise CheckpointError(f"{file}: field 'target_modules' is {targets!r:.80}; expected a module name list or "
                              "a regular expression string")
    for field in _MUST_BE_OFF:
        if field == "modules_to_save" and _router_modules_to_save(file, cfg.get(field)):
            continue  # the MoE router, read with the adapters (_read_routers)
        if cfg.get(field) not in _OFF:
            raise CheckpointError(f"{file}: field {field!r} is {cfg[field]!r:.80}; qlora-jax implements plain LoRA "
                                  "only, so it must be null, false or empty")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{file}: field 'bias' is {cfg['bias']!r}; qlora-jax adapters train no biases "
                              "(expected 'none')")
    try:
        # PEFT's LoraConfig defaults lora_alpha to 8 when the field is absent.
        lora_config = LoraConfig.from_peft_config({"lora_alpha": 8, **cfg})
        layout.lora_targets(lora_config, config)
    except ValueError as err:
        raise CheckpointError(f"{file}: {err}") from err
    return lora_config


def load_peft_adapter(
    path: str | pathlib.Path, config: LlamaConfig, *, dtype: str | None = None
) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT LoRA adapter folder into our stacked pytree and its :class:`LoraConfig`.

    ``adapter_config.json`` is checked field by field; its ``target_modules`` decide which modules
    have adapters, and the weights file must hold exactly their matrices for every layer of
    ``config``, read through a :class:`~qlora_jax.checkpoints.validate.CheckedSource`.

    Args:
      path: a PEFT adapter folder.
      config: the model config the adapter must fit.
      dtype: the adapters' dtype (None: as stored).

    Returns:
      ``(lora, lora_config)``: ``{"layers": {group: {name: {"lora_A": [L, r, in], "lora_B":
      [L, out, r]}}}}`` and the hyperparameters.

    Raises:
      CheckpointError: settings that change what the adapter computes (DoRA, biases, per-module
        ranks), missing or extra tensors (another layer count, another module, an adapter on
        ``lm_head``) listed by name, or a matrix of the wrong shape (rank ``r``), a non-float dtype
        or non-finite values.
    """
    path = pathlib.Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.exists():
        raise CheckpointError(f"{path} has no {ADAPTER_CONFIG}")
    lora_config = _read_adapter_config(config_file, config)
    weights = path / ADAPTER_WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{path} has no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    source = CheckedSource(SafetensorsFolder.from_file(weights), weights,
                           shapes_from=f"{ADAPTER_CONFIG} (r={lora_config.r}) with the model's config")
    targets = layout.lora_targets(lora_config, config)
    lora_config = dataclasses.replace(lora_config, target_modules=targets, dtype=dtype)
    shapes = config.linear_shapes()
    expected: dict[tuple[str, str], tuple[int, int]] = {}
    for name in targets:
        out_features, in_features = shapes[name]
        expected[name, "lora_A"] = (lora_config.r, in_features)
        expected[name, "lora_B"] = (out_features, lora_config.r)

    def keys(layer: int, name: str, matrix: str) -> list[str]:
        # One key, or one per expert (stacked on an axis after the layer's).
        return [f"{m}.{matrix}.weight" for m in layout.adapter_modules(config, layer, name, prefix=_PREFIX)]

    source.expect([k for (name, matrix) in expected for layer in range(config.num_hidden_layers)
                   for k in keys(layer, name, matrix)] + _router_keys(lora_config, config),
                  num_layers=config.num_hidden_layers)
    layers: dict[str, dict[str, Any]] = {}
    for (name, matrix), shape in expected.items():
        per_layer = []
        for layer in range(config.num_hidden_layers):
            values = [source.read(k, shape) for k in keys(layer, name, matrix)]
            per_layer.append(np.stack(values) if config.expert_stack(name) else values[0])
        stacked = jnp.asarray(np.stack(per_layer))
        layers.setdefault(layout.module_group(name), {}).setdefault(name, {})[matrix] = (
            stacked if dtype is None else stacked.astype(dtype))
    _read_routers(source, layers, lora_config, config, dtype)
    source.check_all_consumed()
    return {"layers": layers}, lora_config


# ------------------------------------------------------------------------------------------ trained MoE routers
# PEFT's modules_to_save=["gate"] trains a full copy of each MoE router; PEFT 0.21 (transformers 5
# module names, Mixtral's included) saves it as base_model.model.model.layers.{i}.mlp.gate.weight
# ([num_experts, hidden], the adapter name stripped) and lists "gate" in modules_to_save.


def router_key(layer: int) -> str:
    """PEFT's saved key of layer ``layer``'s trained router (``modules_to_save=["gate"]``).

    Args:
      layer: the decoder layer's index.

    Returns:
      ``"base_model.model.model.layers.{layer}.mlp.gate.weight"``.
    """
    return f"{_PREFIX}layers.{layer}.mlp.gate.weight"


def _router_modules_to_save(file: pathlib.Path, value: Any) -> bool:
    """Whether ``adapter_config.json``'s ``modules_to_save`` is a list naming only the MoE router ``gate``
    (then the routers are read with the adapters); False for an empty value, an error for anything else."""
    if value in _OFF:
        return False
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value) or set(value) != {"gate"}:
        raise CheckpointError(f"{file}: field 'modules_to_save' is {value!r:.80}; qlora-jax trains in full only the "
                              "MoE router, so it must be null, empty or ['gate']")
    return True


def _router_keys(lora_config: LoraConfig, config: LlamaConfig) -> list[str]:
    """The routers' keys an adapter of ``lora_config`` holds (none unless it trains the router)."""
    return [router_key(layer) for layer in range(config.num_hidden_layers)] if lora_config.train_router else []


def _router_tensors(lora: dict[str, Any], lora_config: LoraConfig, config: LlamaConfig) -> dict[str, np.ndarray]:
    """The trained routers of ``lora`` under PEFT's keys; checks they are there exactly when
    ``lora_config.modules_to_save`` says so."""
    router = lora["layers"].get("mlp", {}).get("gate")
    if (router is not None) != lora_config.train_router:
        raise ValueError(f"the adapters {'hold' if router is not None else 'hold no'} MoE routers but "
                         f"modules_to_save={list(lora_config.modules_to_save)}")
    if router is None:
        return {}
    stacked = np.asarray(jax.device_get(router["weight"]))
    expected = (config.num_hidden_layers, config.num_experts, config.hidden_size)
    if stacked.shape != expected:
        raise ValueError(f"trained router mlp.gate.weight has shape {list(stacked.shape)}; expected "
                         f"[layers, num_experts, hidden] = {list(expected)}")
    return {router_key(layer): np.ascontiguousarray(stacked[layer]) for layer in range(config.num_hidden_layers)}


def _read_routers(source: CheckedSource, layers: dict[str, Any], lora_config: LoraConfig, config: LlamaConfig,
                  dtype: str | None) -> None:
    """Reads the trained routers (``modules_to_save=["gate"]``) into ``layers["mlp"]["gate"]["weight"]``
    ``[L, E, hidden]`` (``dtype``, or as stored); nothing when the adapter trains none."""
    if not lora_config.train_router:
        return
    shape = (config.num_experts, config.hidden_size)
    stacked = jnp.asarray(np.stack([source.read(router_key(layer), shape)
                                    for layer in range(config.num_hidden_layers)]))
    layers.setdefault("mlp", {})["gate"] = {"weight": stacked if dtype is None else stacked.astype(dtype)}
