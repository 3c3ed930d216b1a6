"""The parameter layout of every family: layer names, Hugging Face keys, the ``base`` pytree, LoRA targets.

Everything that knows how a checkpoint is named lives here, so that the loader, the PEFT
adapter I/O, the merged export and the decoder agree by construction:

* :func:`tensor_table`: every tensor of a model, derived from its family's declaration
  (:mod:`qlora_jax.models.family`) and ``config.json``: the one table the loaders, the Orbax
  format checks, the synthetic base and the merged export read;
* :func:`linear_layers` / :func:`layer_norms`: a config's linear layers (``lm_head`` excluded,
  as PEFT's ``"all-linear"``) and RMSNorms; :data:`LINEAR_LAYERS` / :data:`LAYER_NORMS` are
  LLaMA's, each linear layer in its Hugging Face submodule (:func:`module_group`);
* :func:`hf_module` / :func:`hf_key`: ``model.layers.{i}.self_attn.q_proj`` (the module names
  PEFT matches ``target_modules`` against) and the tensor keys under them;
* :func:`assemble_base`: the one place the layer-stacked ``base`` pytree of
  :mod:`qlora_jax.models.llama` is put together;
* :func:`lora_targets`: which linear layers a :class:`~qlora_jax.lora.LoraConfig` selects in a
  model, with PEFT's semantics for ``"all-linear"``, name lists and regular expressions.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Any

from qlora_jax.lora import LoraConfig
from qlora_jax.models.config import LlamaConfig

__all__ = [
    "TensorSpec",
    "tensor_table",
    "linear_layers",
    "layer_norms",
    "LINEAR_LAYERS",
    "ATTENTION_LAYERS",
    "LAYER_NORMS",
    "module_group",
    "hf_module",
    "hf_key",
    "hf_global_key",
    "assemble_base",
    "linear_entries",
    "adapter_targets",
    "peft_module_names",
    "adapter_modules",
    "peft_target_name",
    "lora_targets",
    "matches_target_modules",
]

ATTENTION_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LAYERS = ("gate_proj", "up_proj", "down_proj")
# Every linear layer of a LLaMA decoder layer, in the order the decoder applies them.
LINEAR_LAYERS = ATTENTION_LAYERS + MLP_LAYERS
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
# Every family's linear layers and norms (Phi-3's fused ones; Gemma's sandwich and q/k norms), in
# one fixed order: the order adapters are listed in, whatever the family.
_ALL_ATTENTION = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
_ALL_MLP = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
ALL_LINEAR_LAYERS = _ALL_ATTENTION + _ALL_MLP
_ALL_NORMS = ("input_layernorm", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
              "pre_feedforward_layernorm", "post_feedforward_layernorm")


def linear_layers(config: LlamaConfig) -> tuple[str, ...]:
    """The linear layers of one decoder layer of ``config``'s family, in the order they are applied.

    Args:
      config: the model config.

    Returns:
      Their names (``"q_proj"``, ...).
    """
    return config.family.linear_layers


def layer_norms(config: LlamaConfig) -> tuple[str, ...]:
    """The RMSNorms of one decoder layer of ``config``'s family.

    Args:
      config: the model config.

    Returns:
      Their module paths (``"input_layernorm"``, ``"self_attn.q_norm"``, ...).
    """
    return config.family.layer_norms


def module_group(name: str) -> str:
    """The Hugging Face submodule a linear layer lives in.

    Args:
      name: a linear layer's name.

    Returns:
      "self_attn" or "mlp".

    Raises:
      ValueError: not a linear layer's name.
    """
    if name in _ALL_ATTENTION:
        return "self_attn"
    if name in _ALL_MLP:
        return "mlp"
    raise ValueError(f"{name!r} is not a linear layer of a decoder layer; expected one of {ALL_LINEAR_LAYERS}")


def hf_module(layer: int, name: str, *, prefix: str = "model.") -> str:
    """Hugging Face module name of a layer's linear layer or norm.

    Args:
      layer: the decoder layer's index.
      name: the linear layer's name, a norm's path, or a dotted module path
        (``self_attn.q_norm``, ``block_sparse_moe.gate``).
      prefix: before ``layers.``.

    Returns:
      e.g. ``model.layers.3.mlp.up_proj``.
    """
    path = name if name in _ALL_NORMS or "." in name else f"{module_group(name)}.{name}"
    return f"{prefix}layers.{layer}.{path}"


def hf_global_key(name: str, *, prefix: str = "model.") -> str:
    """Transformers' key of a tensor outside the decoder layers (the layers' keys are :func:`hf_key`).

    Args:
      name: "embed_tokens", "norm" or "lm_head".
      prefix: before the name (``lm_head`` takes none).

    Returns:
      e.g. ``model.embed_tokens.weight``, ``lm_head.weight``.

    Raises:
      ValueError: another name.
    """
    if name == "lm_head":
        return "lm_head.weight"
    if name not in ("embed_tokens", "norm"):
        raise ValueError(f"{name!r} is not a global tensor of a model; expected embed_tokens, norm or lm_head")
    return f"{prefix}{name}.weight"


def base_path(name: str) -> tuple[str, ...]:
    """Where a layer's norm or linear layer sits under ``base["layers"]``: ``("self_attn", "q_norm")``."""
    if name in _ALL_NORMS:
        return tuple(name.split("."))
    return (module_group(name), name)


def get_layer_entry(layers: Mapping[str, Any], name: str) -> Any:
    """``base["layers"]``'s leaf (norm) or dict (linear layer) of ``name``."""
    node: Any = layers
    for part in base_path(name):
        node = node[part]
    return node


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model: where it sits in the ``base`` pytree and in a Hugging Face checkpoint.

    Attributes:
      path: keys into the base pytree (``("layers", "self_attn", "q_proj", "weight")``).
      shape: one tensor's shape (one layer's, for ``layered`` tensors).
      layered: stacked over a leading layer axis ``[L, ...]`` in the base.
      linear: a linear weight (quantized).
      module: the Hugging Face module: a layer's module name such as ``self_attn.q_proj``, or
        ``embed_tokens``/``norm``/``lm_head``.
      tensor: the module's tensor ("weight"/"bias").
      experts: for an MoE layer's expert matrices, how many experts are stacked on an axis after
        the layer axis (``shape`` is then one expert's, and each expert is quantized on its own, as
        bitsandbytes quantizes one ``Linear4bit`` per expert); 0 otherwise.
      expert_module: expert ``{e}``'s module on disk (``block_sparse_moe.experts.{e}.w1``).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    layered: bool
    linear: bool
    module: str
    tensor: str = "weight"
    experts: int = 0
    expert_module: str = ""

    @property
    def stack(self) -> tuple[int, ...]:
        """The leading dimensions of one layer's tensor before :attr:`shape`: ``(experts,)`` or ``()``."""
        return (self.experts,) if self.experts else ()

    def expert_keys(self, layer: int, *, prefix: str = "model.") -> list[str]:
        """Checkpoint keys of every expert's tensor: ``model.layers.{layer}.mlp.experts.{e}.up_proj.weight``."""
        if not self.experts:
            raise ValueError(f"{self.slot} is not stacked over experts")
        return [f"{prefix}layers.{layer}.{self.expert_module.format(e=e)}.{self.tensor}" for e in range(self.experts)]

    @property
    def slot(self) -> str:
        """``"/"``-joined :attr:`path`: the name the Orbax manifest and the loaders use."""
        return "/".join(self.path)

    def hf_key(self, layer: int | None = None, *, prefix: str = "model.") -> str:
        """Checkpoint key: ``model.layers.{layer}.self_attn.q_proj.weight``, ``lm_head.weight``, ..."""
        if self.layered:
            return hf_key(layer, self.module, self.tensor, prefix=prefix)
        if self.module == "lm_head":
            return "lm_head.weight"
        return f"{prefix}{self.module}.{self.tensor}"


def tensor_table(config: LlamaConfig) -> list[TensorSpec]:
    """Every tensor of a ``base`` for ``config``, in checkpoint read order.

    Args:
      config: the model config.

    Returns:
      :class:`TensorSpec` list: embeddings, final norm, the untied head, then one layer's norms,
      linear weights and biases.
    """
    d, vocab = config.hidden_size, config.vocab_size
    table = [TensorSpec(("embed_tokens",), (vocab, d), False, False, "embed_tokens"),
             TensorSpec(("norm",), (d,), False, False, "norm")]
    if not config.tie_word_embeddings:
        table.append(TensorSpec(("lm_head",), (vocab, d), False, False, "lm_head"))
    for name, shape in config.layer_norm_shapes().items():
        table.append(TensorSpec(("layers", *base_path(name)), shape, True, False, name))
    family = config.family
    if config.is_moe:  # the router: [E, D], never quantized
        table.append(TensorSpec(("layers", "mlp", "gate", "weight"), (config.num_experts, d), True, False,
                                f"{family.moe_module}.gate"))
    for name, shape in config.linear_shapes().items():
        if config.expert_stack(name):
            theirs = family.expert_names[family.mlp_layers.index(name)]
            table.append(TensorSpec(("layers", *base_path(name), "weight"), shape, True, True, name,
                                    experts=config.num_experts,
                                    expert_module=f"{family.moe_module}.experts.{{e}}.{theirs}"))
            continue
        table.append(TensorSpec(("layers", *base_path(name), "weight"), shape, True, True, name))
        if config.linear_has_bias(name):
            table.append(TensorSpec(("layers", *base_path(name), "bias"), (shape[0],), True, False, name, "bias"))
    return table


def base_from_table(config: LlamaConfig, values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``base`` pytree from ``{TensorSpec.slot: value}`` (layer-stacked for layered tensors);
    exactly the slots of :func:`tensor_table` are needed."""
    table = tensor_table(config)
    wanted = [spec.slot for spec in table]
    missing, extra = [s for s in wanted if s not in values], sorted(set(values) - set(wanted))
    if missing or extra:
        raise ValueError(f"a {config.model_type} base needs exactly {wanted}; missing {missing}, extra {extra}")
    base: dict[str, Any] = {}
    for spec in table:
        node = base
        for part in spec.path[:-1]:
            node = node.setdefault(part, {})
        node[spec.path[-1]] = values[spec.slot]
    return base


def hf_key(layer: int, name: str, tensor: str = "weight", *, prefix: str = "model.") -> str:
    """Checkpoint key of a tensor of a layer's module.

    Args:
      layer: the decoder layer's index.
      name: the linear layer's name or the norm's path.
      tensor: the tensor, may be dotted (PEFT's ``lora_A.weight``).
      prefix: before ``layers.``; ``"base_model.model.model."`` for PEFT adapter files.

    Returns:
      e.g. ``model.layers.3.mlp.up_proj.weight``.
    """
    return f"{hf_module(layer, name, prefix=prefix)}.{tensor}"


def assemble_base(
    *,
    embed_tokens: Any,
    norm: Any,
    layer_norms: Mapping[str, Any],
    linears: Mapping[str, Mapping[str, Any]],
    lm_head: Any = None,
    config: LlamaConfig | None = None,
) -> dict[str, Any]:
    """The ``base`` pytree of :mod:`qlora_jax.models.llama` from its layer-stacked parts.

    Args:
      embed_tokens: ``[V, D]``.
      norm: the final norm ``[D]``.
      layer_norms: ``{"input_layernorm": [L, D], "self_attn.q_norm": [L, head_dim], ...}``, every
        norm of :func:`layer_norms`.
      linears: ``{name: {"weight": W, "bias"?: [L, out]}}`` for every name of :func:`linear_layers`
        (``W`` ``[L, out, in]``, quantized or not).
      lm_head: ``[V, D]`` for untied heads, else None.
      config: the model's (None: a LLaMA layout).

    Returns:
      The base pytree.

    Raises:
      ValueError: norms or linear layers other than the family's.
    """
    # (the parameter ``layer_norms`` hides the module's function of that name)
    norms = LAYER_NORMS if config is None else config.family.layer_norms
    linear_names = LINEAR_LAYERS if config is None else config.family.linear_layers
    missing = [n for n in norms if n not in layer_norms] + [n for n in linear_names if n not in linears]
    extra = sorted(set(layer_norms) - set(norms)) + sorted(set(linears) - set(linear_names))
    if missing or extra:
        raise ValueError(f"a {'llama' if config is None else config.model_type} base needs exactly "
                         f"{norms + linear_names}; missing {missing}, extra {extra}")
    layers: dict[str, Any] = {}
    for name in norms:
        node = layers
        *parents, leaf = base_path(name)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = layer_norms[name]
    for name in linear_names:
        layers.setdefault(module_group(name), {})[name] = dict(linears[name])
    base: dict[str, Any] = {"embed_tokens": embed_tokens, "norm": norm, "layers": layers}
    if lm_head is not None:
        base["lm_head"] = lm_head
    return base


def linear_entries(base: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Every linear layer of a ``base`` pytree, in decoder order.

    Args:
      base: the base pytree.

    Returns:
      ``{name: {"weight", "bias"?}}``.
    """
    layers = base["layers"]
    return {name: layers[module_group(name)][name] for name in ALL_LINEAR_LAYERS
            if name in layers.get(module_group(name), {})}


def adapter_targets(lora: Mapping[str, Any]) -> tuple[str, ...]:
    """The linear layers an adapter pytree holds adapters for, in decoder order.

    Args:
        lora: an adapter pytree, ``{"layers": {group: {name: {"lora_A", "lora_B"}}}}``.

    Returns:
        The names of the adapted linear layers, in :data:`ALL_LINEAR_LAYERS` order.
    """
    held = {name for group in lora["layers"].values() for name in group}
    return tuple(name for name in ALL_LINEAR_LAYERS if name in held)


def adapter_modules(config: LlamaConfig, layer: int, name: str, *, prefix: str = "model.") -> list[str]:
    """The Hugging Face modules of one layer's linear layer ``name``.

    Args:
      config: the model config.
      layer: the decoder layer's index.
      name: our linear layer's name (``q_proj``, ``gate_proj``...).
      prefix: before ``layers.``.

    Returns:
      One module name, or one per expert for an MoE layer's expert matrices
      (``model.layers.0.block_sparse_moe.experts.{e}.w1``: transformers 4's module names, under
      which PEFT saves per-expert adapters and which PEFT 0.21 converts to transformers 5's fused
      experts when it loads them).
    """
    if not config.expert_stack(name):
        return [hf_module(layer, name, prefix=prefix)]
    family = config.family
    theirs = family.expert_names[family.mlp_layers.index(name)]
    return [f"{prefix}layers.{layer}.{family.moe_module}.experts.{e}.{theirs}" for e in range(config.num_experts)]


def peft_target_name(config: LlamaConfig, name: str) -> str:
    """The short module name PEFT's ``target_modules`` uses for one of our linear layers.

    Args:
      config: the model config.
      name: our linear layer's name.

    Returns:
      Mixtral's expert names ``w1``/``w3``/``w2`` for its experts' ``gate_proj``/``up_proj``/
      ``down_proj``; otherwise ``name``.
    """
    if config.expert_stack(name):
        return config.family.expert_names[config.family.mlp_layers.index(name)]
    return name


def _peft_modules(config: LlamaConfig) -> dict[str, tuple[int, str] | None]:
    """PEFT's module names in the family's ``*ForCausalLM`` (transformers 4 names for MoE experts) ->
    ``(layer, our linear layer)``, or None for a module qlora-jax does not adapt (``lm_head``, an
    MoE router)."""
    modules: dict[str, tuple[int, str] | None] = {}
    for i in range(config.num_hidden_layers):
        for name in linear_layers(config):
            modules.update({m: (i, name) for m in adapter_modules(config, i, name)})
        if config.is_moe:
            modules[hf_module(i, f"{config.family.moe_module}.gate")] = None
    modules["lm_head"] = None
    return modules


def peft_module_names(config: LlamaConfig) -> list[str]:
    """The module names PEFT matches ``target_modules`` against in the family's ``*ForCausalLM``.

    Args:
      config: the model config.

    Returns:
      Every decoder layer's linear layers (``model.layers.3.self_attn.q_proj``, ...; each expert's,
      and the router, of MoE layers), then ``lm_head``.
    """
    return list(_peft_modules(config))


def matches_target_modules(target_modules: str | tuple[str, ...], module: str) -> bool:
    """PEFT's rule (``check_target_module_exists``) for whether ``target_modules`` selects a module.

    Args:
      target_modules: a string, a regex matched in full against the module name; or a tuple, which
        matches a module whose name is, or ends with ``.`` + , one of its entries.
      module: a module name (:func:`peft_module_names`).

    Returns:
      Whether it is selected.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def lora_targets(lora_config: LoraConfig, config: LlamaConfig) -> tuple[str, ...]:
    """The linear layers that ``lora_config`` adapts.

    ``"all-linear"`` is every linear layer but the output head. Lists and regular expressions
    follow PEFT (see :func:`matches_target_modules`). The scanned decoder puts the same adapters in
    every layer.

    Args:
      lora_config: the adapters' hyperparameters (its ``target_modules``).
      config: the model config.

    Returns:
      Names of :func:`linear_layers`, in decoder order.

    Raises:
      ValueError: a selection that differs between layers, takes ``lm_head`` or takes nothing,
        naming what it matched; or ``modules_to_save`` (the router) on a model without MoE layers.

    References:
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021.
    """
    if lora_config.modules_to_save and not config.is_moe:
        raise ValueError(f"LoRA modules_to_save={list(lora_config.modules_to_save)} trains the MoE router, but this "
                         f"model (model_type {config.model_type!r}) has no mixture-of-experts layers")
    targets = lora_config.target_modules
    linear_names = linear_layers(config)
    if targets == "all-linear":
        # (An MoE layer's experts, not its router: PEFT's all-linear also adapts the router.)
        return linear_names
    modules = _peft_modules(config)

    def matches(target, module):
        # Our own names select their layer too (Mixtral's "gate_proj" is its experts' w1).
        if not isinstance(target, str) and modules[module] is not None and modules[module][1] in target:
            return True
        return matches_target_modules(target, module)

    if not isinstance(targets, str):
        unknown = [t for t in targets if not any(matches((t,), m) for m in modules)]
        if unknown:
            suggestions = {t: difflib.get_close_matches(t, linear_names, n=2) for t in unknown}
            raise ValueError(f"LoRA target_modules {unknown} match no module of this model (nearest: "
                             f"{suggestions}); LoRA applies to {linear_names}, 'all-linear', or a regex")
    matched = [m for m in modules if matches(targets, m)]
    if "lm_head" in matched:
        raise ValueError(f"LoRA target_modules={targets!r} selects lm_head; qlora-jax adapts the decoder's linear "
                         f"layers {linear_names} only (PEFT's 'all-linear' excludes the head too)")
    routers = [m for m in matched if modules[m] is None]
    if routers:
        raise ValueError(f"LoRA target_modules={targets!r} selects the MoE router {routers[0]!r}; qlora-jax adapts "
                         f"{linear_names} and trains the routers in full with modules_to_save=['gate'] "
                         "(--train_router)")
    per_layer: dict[str, set[str]] = {}
    for module in matched:
        per_layer.setdefault(modules[module][1], set()).add(module)
    if not per_layer:
        nearest = difflib.get_close_matches(str(targets), list(modules), n=3)
        raise ValueError(f"LoRA target_modules={targets!r} matches no module of this model; module names look "
                         f"like {nearest or list(modules)[:3]}")
    partial = {}
    for name, chosen in per_layer.items():
        every = {m for m, v in modules.items() if v is not None and v[1] == name}
        if chosen != every:
            partial[name] = sorted(chosen)[:4]
    if partial:
        raise ValueError(f"LoRA target_modules={targets!r} selects some layers only, or some experts ({partial}); "
                         "qlora-jax's scanned decoder adapts the same modules in every layer and expert")
    return tuple(name for name in linear_names if name in per_layer)
