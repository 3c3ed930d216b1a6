"""Fold LoRA adapters into the base weights and export a Hugging Face model folder.

Merging dequantizes each base weight to float32, adds ``scaling * B @ A`` and casts to the
export dtype. The merged folder (``config.json``, ``model.safetensors`` shards, tokenizer files)
loads in transformers' ``AutoModelForCausalLM.from_pretrained``. With ``quantize="nf4"`` the
merged weights are re-quantized and written in bitsandbytes' 4-bit format (what transformers'
``save_pretrained`` writes for a 4-bit model), and the re-quantization error is reported: a merge
into 4-bit weights is not lossless, and the report says by how much.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from qlora_jax.lora import LoraConfig
from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig
from qlora_jax.quant import QuantizedTensor, bnb_format, dequantize, quantize

__all__ = ["merge_lora_weight", "export_merged", "MergeReport"]

MAX_SHARD_BYTES = 2 * 2**30


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """Where the export went, and (for a quantized export) the re-quantization error."""

    path: pathlib.Path
    num_tensors: int
    total_bytes: int
    # Relative RMS error of the re-quantized merged weights, over all linear layers (None if 16-bit).
    requantization_relative_rmse: float | None = None


def merge_lora_weight(weight: Any, pair: dict[str, jax.Array] | None, scaling: float) -> jax.Array:
    """float32 ``W + scaling * B @ A`` for one layer's weight ``[out, in]`` (quantized or not)."""
    w = dequantize(weight, jnp.float32) if isinstance(weight, QuantizedTensor) else jnp.asarray(weight, jnp.float32)
    if pair is None:
        return w
    a = jnp.asarray(pair["lora_A"], jnp.float32)
    b = jnp.asarray(pair["lora_B"], jnp.float32)
    return w + scaling * (b @ a)


def _layer_slice(tree: Any, layer: int) -> Any:
    return jax.tree.map(lambda x: x[layer], tree)


def _write_shards(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> int:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        if size and size + value.nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.nbytes for v in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return sum(v.nbytes for v in tensors.values())


def _host(x: jax.Array, dtype: Any) -> np.ndarray:
    return np.asarray(jax.device_get(jnp.asarray(x).astype(dtype)))


def export_merged(
    path: str | pathlib.Path,
    config: LlamaConfig,
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    lora_config: LoraConfig | None,
    *,
    dtype: str = "bfloat16",
    quantize_to: str | None = None,
    tokenizer: Any = None,
) -> MergeReport:
    """Writes a transformers-loadable folder with the adapters folded into the weights.

    ``dtype``: dtype of the written 16/32-bit tensors (and the compute dtype recorded for a
    quantized export). ``quantize_to``: None (16-bit export), or "nf4"/"fp4" for bitsandbytes
    4-bit weights with double quantization. ``tokenizer``: a :class:`qlora_jax.tokenizer.Tokenizer`
    whose files are written alongside.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = jnp.dtype(dtype)
    scaling = lora_config.scaling if lora_config is not None else 1.0
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": _host(base["embed_tokens"], np_dtype)}
    squared_error, squared_norm = 0.0, 0.0
    layers = base["layers"]
    linears = layout.linear_entries(base)
    lora_layers = (lora or {}).get("layers", {})
    for layer in range(config.num_hidden_layers):
        for norm in layout.LAYER_NORMS:
            tensors[layout.hf_key(layer, norm)] = _host(layers[norm][layer], np_dtype)
        for name, params in linears.items():
            pair = lora_layers.get(layout.module_group(name), {}).get(name)
            merged = merge_lora_weight(_layer_slice(params["weight"], layer), None if pair is None else
                                       _layer_slice(pair, layer), scaling)
            key = layout.hf_key(layer, name)
            if quantize_to is None:
                tensors[key] = _host(merged, np_dtype)
            else:
                qt = quantize(merged, quantize_to, double_quant=True)
                error = dequantize(qt, jnp.float32) - merged
                squared_error += float(jnp.sum(error * error))
                squared_norm += float(jnp.sum(merged * merged))
                tensors.update(bnb_format.to_bnb_state_dict(jax.device_get(qt), key))
            if "bias" in params:
                tensors[layout.hf_key(layer, name, "bias")] = _host(params["bias"][layer], np_dtype)
    tensors["model.norm.weight"] = _host(base["norm"], np_dtype)
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = _host(base["lm_head"], np_dtype)
    total = _write_shards(path, tensors)

    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = dtype
    if quantize_to is not None:
        hf_config["quantization_config"] = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": quantize_to,
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"],
        }
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer is not None:
        tokenizer.save(path)
    rel = None if quantize_to is None else float(np.sqrt(squared_error / max(squared_norm, 1e-30)))
    return MergeReport(path, len(tensors), total, rel)
