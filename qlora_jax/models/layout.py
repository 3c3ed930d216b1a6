"""The LLaMA-family parameter layout: layer names, Hugging Face keys, the ``base`` pytree, LoRA targets.

Everything that knows how a LLaMA checkpoint is named lives here, so that the loader, the PEFT
adapter I/O, the merged export and the decoder agree by construction:

* :data:`LINEAR_LAYERS`: the linear layers of one decoder layer (``lm_head`` excluded, as PEFT's
  ``"all-linear"``), each in its Hugging Face submodule (:func:`module_group`);
* :func:`hf_module` / :func:`hf_key`: ``model.layers.{i}.self_attn.q_proj`` (the module names
  PEFT matches ``target_modules`` against) and the tensor keys under them;
* :func:`assemble_base`: the one place the layer-stacked ``base`` pytree of
  :mod:`qlora_jax.models.llama` is put together;
* :func:`lora_targets`: which linear layers a :class:`~qlora_jax.lora.LoraConfig` selects in a
  model, with PEFT's semantics for ``"all-linear"``, name lists and regular expressions.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from qlora_jax.lora import LoraConfig
from qlora_jax.models.config import LlamaConfig

__all__ = [
    "LINEAR_LAYERS",
    "ATTENTION_LAYERS",
    "LAYER_NORMS",
    "module_group",
    "hf_module",
    "hf_key",
    "assemble_base",
    "linear_entries",
    "peft_module_names",
    "lora_targets",
]

ATTENTION_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LAYERS = ("gate_proj", "up_proj", "down_proj")
# Every linear layer of a LLaMA decoder layer, in the order the decoder applies them.
LINEAR_LAYERS = ATTENTION_LAYERS + MLP_LAYERS
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def module_group(name: str) -> str:
    """The Hugging Face submodule a linear layer lives in: "self_attn" or "mlp"."""
    if name in ATTENTION_LAYERS:
        return "self_attn"
    if name in MLP_LAYERS:
        return "mlp"
    raise ValueError(f"{name!r} is not a linear layer of a LLaMA decoder layer; expected one of {LINEAR_LAYERS}")


def hf_module(layer: int, name: str, *, prefix: str = "model.") -> str:
    """Hugging Face module name of a layer's linear layer or norm, e.g. ``model.layers.3.mlp.up_proj``."""
    path = name if name in LAYER_NORMS else f"{module_group(name)}.{name}"
    return f"{prefix}layers.{layer}.{path}"


def hf_key(layer: int, name: str, tensor: str = "weight", *, prefix: str = "model.") -> str:
    """Checkpoint key of a tensor of a layer's module, e.g. ``model.layers.3.mlp.up_proj.weight``.

    ``tensor`` may be dotted (PEFT's ``lora_A.weight``); ``prefix`` is ``"base_model.model.model."``
    for PEFT adapter files.
    """
    return f"{hf_module(layer, name, prefix=prefix)}.{tensor}"


def assemble_base(
    *,
    embed_tokens: Any,
    norm: Any,
    layer_norms: Mapping[str, Any],
    linears: Mapping[str, Mapping[str, Any]],
    lm_head: Any = None,
) -> dict[str, Any]:
    """The ``base`` pytree of :mod:`qlora_jax.models.llama` from its layer-stacked parts.

    ``layer_norms``: ``{"input_layernorm": [L, D], "post_attention_layernorm": [L, D]}``;
    ``linears``: ``{name: {"weight": W, "bias"?: [L, out]}}`` for every name of
    :data:`LINEAR_LAYERS`; ``lm_head``: ``[V, D]`` for untied heads, else None.
    """
    missing = [n for n in LAYER_NORMS if n not in layer_norms] + [n for n in LINEAR_LAYERS if n not in linears]
    extra = sorted(set(layer_norms) - set(LAYER_NORMS)) + sorted(set(linears) - set(LINEAR_LAYERS))
    if missing or extra:
        raise ValueError(f"a LLaMA base needs exactly {LAYER_NORMS + LINEAR_LAYERS}; missing {missing}, extra {extra}")
    layers: dict[str, Any] = {name: layer_norms[name] for name in LAYER_NORMS}
    layers.update(self_attn={}, mlp={})
    for name in LINEAR_LAYERS:
        layers[module_group(name)][name] = dict(linears[name])
    base: dict[str, Any] = {"embed_tokens": embed_tokens, "norm": norm, "layers": layers}
    if lm_head is not None:
        base["lm_head"] = lm_head
    return base


def linear_entries(base: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``{name: {"weight", "bias"?}}`` of every linear layer of a ``base`` pytree, in decoder order."""
    layers = base["layers"]
    return {name: layers[module_group(name)][name] for name in LINEAR_LAYERS}


def peft_module_names(config: LlamaConfig) -> list[str]:
    """The module names PEFT matches ``target_modules`` against in a ``LlamaForCausalLM``:
    every decoder layer's linear layers, then ``lm_head``."""
    names = [hf_module(i, name) for i in range(config.num_hidden_layers) for name in LINEAR_LAYERS]
    return names + ["lm_head"]


def _matches(target_modules: str | tuple[str, ...], module: str) -> bool:
    """PEFT's rule (``check_target_module_exists``): a string is a regex matched in full against the
    module name; a list matches a module whose name is, or ends with ``.`` + , one of its entries."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def lora_targets(lora_config: LoraConfig, config: LlamaConfig) -> tuple[str, ...]:
    """The linear layers (names of :data:`LINEAR_LAYERS`, decoder order) that ``lora_config`` adapts.

    ``"all-linear"`` is every linear layer but the output head. Lists and regular expressions
    follow PEFT (see :func:`_matches`). The scanned decoder puts the same adapters in every layer,
    so a selection that differs between layers, one that takes ``lm_head`` or one that takes
    nothing is an error naming what it matched.
    """
    targets = lora_config.target_modules
    if targets == "all-linear":
        return LINEAR_LAYERS
    if not isinstance(targets, str):
        unknown = [t for t in targets if not any(_matches((t,), m) for m in peft_module_names(config))]
        if unknown:
            suggestions = {t: difflib.get_close_matches(t, LINEAR_LAYERS, n=2) for t in unknown}
            raise ValueError(f"LoRA target_modules {unknown} match no module of this model (nearest: "
                             f"{suggestions}); LoRA applies to {LINEAR_LAYERS}, 'all-linear', or a regex")
    matched = [m for m in peft_module_names(config) if _matches(targets, m)]
    if "lm_head" in matched:
        raise ValueError(f"LoRA target_modules={targets!r} selects lm_head; qlora-jax adapts the decoder's linear "
                         f"layers {LINEAR_LAYERS} only (PEFT's 'all-linear' excludes the head too)")
    per_layer: dict[str, set[int]] = {}
    for module in matched:
        _, _, layer, _, name = module.split(".")
        per_layer.setdefault(name, set()).add(int(layer))
    if not per_layer:
        nearest = difflib.get_close_matches(str(targets), peft_module_names(config), n=3)
        raise ValueError(f"LoRA target_modules={targets!r} matches no module of this model; module names look "
                         f"like {nearest or peft_module_names(config)[:3]}")
    every_layer = set(range(config.num_hidden_layers))
    partial = {name: sorted(layers) for name, layers in per_layer.items() if layers != every_layer}
    if partial:
        raise ValueError(f"LoRA target_modules={targets!r} selects some layers only ({partial}); qlora-jax's "
                         "scanned decoder adapts the same modules in every layer")
    return tuple(name for name in LINEAR_LAYERS if name in per_layer)
