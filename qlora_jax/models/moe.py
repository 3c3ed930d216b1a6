"""Mixture-of-experts feed-forward block with 4-bit experts (Mixtral, Qwen3-MoE), as pure functions.

The decoder (:mod:`qlora_jax.models.llama`) calls :func:`moe_block` in place of the dense MLP
for the families whose declaration has ``moe`` set (Mixtral, Qwen3-MoE); there the base pytree
holds ``mlp.gate.weight`` and ``mlp.{gate,up,down}_proj.weight`` stacked over layers, then experts.
Parameters of one block (a dict)::

    {"gate": [E, H] router weight (float32/bfloat16/float16, never quantized),
     "experts": {"gate_proj": [E, I, H], "up_proj": [E, I, H], "down_proj": [E, H, I]}}

Each expert tensor is a plain array or a *stacked* :class:`~qlora_jax.quant.QuantizedTensor`
(:func:`quantize_experts`): every expert matrix quantized on its own, exactly as bitsandbytes
quantizes one ``Linear4bit`` per expert (the same bytes, the same double-quant offset per
expert), the arrays stacked over a leading expert axis. Its static metadata (``shape``...) is that
of ONE expert matrix; ``qt.codes`` is ``[E, *codes_shape]``, ``qt.offset`` ``[E]`` and so on.
Mixtral's on-disk names ``w1``/``w3``/``w2`` are ``gate_proj``/``up_proj``/``down_proj``.

Routing is transformers 5's (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``):
``logits = x @ gate.T`` in the activation dtype; a float32 softmax over all experts; top-k; then

* ``"mixtral"``: the top-k weights are renormalised to sum to one and stay float32;
* ``"qwen3_moe"``: renormalised only if ``norm_topk_prob``, then cast to the logits' dtype.

Dropless: every token reaches its k experts whatever the load. The experts run as a grouped
matmul (:func:`grouped_matmul`): the T*k (token, expert) rows are sorted by expert and each expert
multiplies its own contiguous rows, tile by tile, with only that expert's matrix dequantized; no
layer ever has all its experts dequantized at once (on a CUDA GPU, ``"auto"`` may run the fused
kernel of :func:`qlora_jax.kernels.grouped_quantized_matmul` instead, which dequantizes tile by
tile inside the matmul; the expert-parallel path keeps XLA). The frozen 4-bit base has a custom VJP (the
discipline of :func:`qlora_jax.kernels.quantized_matmul`): the backward keeps the packed weights
only, the input gradient is computed against the re-dequantized expert, and the weights get a
zero cotangent. Per-expert LoRA adapters (``lora_A [E, r, in]``, ``lora_B [E, out, r]``) run as
``jax.lax.ragged_dot`` on the same sorted rows.

Each expert's contribution ``act(x W_gate.T) * (x W_up.T) @ W_down.T`` is multiplied by its routing
weight, cast to the activation dtype and added to the token's output in increasing expert order,
as ``MixtralExperts.forward``'s ``index_add_`` does.

:func:`load_balancing_loss` is transformers' ``load_balancing_loss_func``; the train step adds
``router_aux_loss_coef`` times it to the loss (:func:`aux_loss_term`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.kernels import GroupedBackend, grouped_matmul_triton, grouped_quantized_matmul
from qlora_jax.lora import init_lora_pair
from qlora_jax.quant import QuantizedTensor, quantize

__all__ = [
    "EXPERT_MATRICES",
    "MoeConfig",
    "MoeError",
    "MoeOutput",
    "aux_loss_term",
    "expert_shardings",
    "expert_slice",
    "grouped_matmul",
    "init_expert_lora",
    "load_balancing_loss",
    "moe_block",
    "quantize_experts",
    "route",
    "stack_hf_experts",
    "validate_moe_params",
]

EXPERT_MATRICES = ("gate_proj", "up_proj", "down_proj")
Routing = Literal["mixtral", "qwen3_moe"]
ROUTINGS = ("mixtral", "qwen3_moe")


class MoeError(ValueError):
    """MoE parameters or configuration that disagree with each other (the message names the tensor)."""


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """The routing hyperparameters of one MoE block.

    Attributes:
      num_experts: E (Mixtral's ``num_local_experts``, Qwen3-MoE's ``num_experts``).
      top_k: ``num_experts_per_tok``.
      routing: ``"mixtral"`` or ``"qwen3_moe"`` (see the module docstring).
      norm_topk_prob: Qwen3-MoE's switch (Mixtral always renormalises, so it must stay True there).
      router_aux_loss_coef: the weight of the load-balancing loss.
      hidden_act: ``"silu"`` (both families).

    Raises:
      MoeError: an unknown routing or activation, a non-positive expert count, a top-k outside
        ``[1, num_experts]``, or Mixtral without renormalisation.

    References:
      Jiang et al., "Mixtral of Experts", 2024. https://arxiv.org/abs/2401.04088
    """

    num_experts: int
    top_k: int
    routing: Routing = "mixtral"
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.routing not in ROUTINGS:
            raise MoeError(f"MoeConfig.routing={self.routing!r}; expected one of {ROUTINGS}")
        if self.num_experts <= 0:
            raise MoeError(f"MoeConfig.num_experts must be positive, got {self.num_experts}")
        if not 0 < self.top_k <= self.num_experts:
            raise MoeError(f"MoeConfig.top_k (num_experts_per_tok) = {self.top_k} must be in "
                           f"[1, num_experts={self.num_experts}]")
        if self.routing == "mixtral" and not self.norm_topk_prob:
            raise MoeError("MoeConfig.norm_topk_prob=False with routing='mixtral': Mixtral always renormalises "
                           "the top-k weights (use routing='qwen3_moe')")
        if self.hidden_act != "silu":
            raise MoeError(f"MoeConfig.hidden_act={self.hidden_act!r}; only 'silu' is implemented")

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> MoeConfig:
        """From a Hugging Face ``config.json`` dict of a Mixtral or Qwen3-MoE model.

        Raises MoeError naming the field for another ``model_type`` or a missing field.
        """
        model_type = config.get("model_type")
        try:
            if model_type == "mixtral":
                return cls(num_experts=int(config["num_local_experts"]), top_k=int(config["num_experts_per_tok"]),
                           routing="mixtral", router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
                           hidden_act=config.get("hidden_act", "silu"))
            if model_type == "qwen3_moe":
                return cls(num_experts=int(config["num_experts"]), top_k=int(config["num_experts_per_tok"]),
                           routing="qwen3_moe", norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                           router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
                           hidden_act=config.get("hidden_act", "silu"))
        except KeyError as err:
            raise MoeError(f"config.json of a {model_type} model has no {err.args[0]!r}") from None
        raise MoeError(f"config.json model_type={model_type!r} is not an MoE family (mixtral, qwen3_moe)")


class MoeOutput(NamedTuple):
    """What :func:`moe_block` returns.

    Attributes:
      hidden: the block's output, ``x.shape``, ``x.dtype``.
      router_logits: ``[T, E]`` in ``x.dtype`` (T = tokens, flattened), the input of
        :func:`load_balancing_loss`.
      expert_index: int32 ``[T, k]`` (descending routing probability).
      expert_weight: ``[T, k]`` routing weights (float32 for Mixtral, ``x.dtype`` for Qwen3-MoE).
    """

    hidden: jax.Array
    router_logits: jax.Array
    expert_index: jax.Array
    expert_weight: jax.Array


# ------------------------------------------------------------------------------------------ quantization


def quantize_experts(w: Any, quant_type: str = "nf4", *, blocksize: int = 64, double_quant: bool = True,
                     bnb_backend: str = "cuda", offset: Any = None) -> QuantizedTensor:
    """Quantizes each expert matrix of ``w: [E, out, in]`` on its own and stacks the results.

    Each ``w[e]`` gets exactly the bytes of ``qlora_jax.quant.quantize(w[e], ...)``, i.e. of
    bitsandbytes' ``quantize_4bit`` on that expert's ``Linear4bit`` weight (its own absmax blocks,
    its own double-quant offset and nested scales).

    Args:
      w: float32/bfloat16/float16 ``[E, out, in]``.
      quant_type: "nf4" or "fp4", as :func:`qlora_jax.quant.quantize`.
      blocksize: weights per absmax block, likewise.
      double_quant: quantize the absmax scales too, likewise.
      bnb_backend: whose rounding to reproduce ("cuda" or "cpu"), likewise.
      offset: optional float32 ``[E]``: each expert's double-quant offset (the mean of its absmax),
        to reproduce given bitsandbytes tensors byte for byte (bitsandbytes' ``torch.mean`` sums
        in a device-dependent order; ours is within an ulp or two of it).

    Returns:
      A stacked QuantizedTensor: metadata of one ``[out, in]`` expert, arrays with a leading
      ``E`` axis (codes uint8 ``[E, out, in // 2]``, scales ``[E, ...]``, nested_scales float32
      ``[E, n]``, offset float32 ``[E]``).
    """
    if not hasattr(w, "shape") or len(w.shape) != 3:
        raise MoeError(f"expert weights must be [num_experts, out, in], got shape "
                       f"{list(getattr(w, 'shape', ()))}")
    if offset is not None and np.shape(offset) != (w.shape[0],):
        raise MoeError(f"offset has shape {list(np.shape(offset))}; expected one per expert, [{w.shape[0]}]")
    per_expert = [quantize(w[e], quant_type, blocksize=blocksize, double_quant=double_quant,
                           bnb_backend=bnb_backend, offset=None if offset is None else offset[e])
                  for e in range(w.shape[0])]
    return jax.tree.map(lambda *arrays: jnp.stack(arrays), *per_expert)


def expert_slice(qt: QuantizedTensor, e: Any) -> QuantizedTensor:
    """One expert of a stacked QuantizedTensor (:func:`quantize_experts`).

    Args:
      qt: the stacked tensor (arrays with a leading expert axis).
      e: the expert: an int or a traced int32 scalar.

    Returns:
      Expert ``e``'s ``[out, in]`` QuantizedTensor.
    """
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, e, 0, keepdims=False), qt)


def _num_experts_of(w: Any) -> int:
    return int(w.codes.shape[0]) if isinstance(w, QuantizedTensor) else int(w.shape[0])


def _matrix_shape(w: Any) -> tuple[int, int]:
    return tuple(w.shape) if isinstance(w, QuantizedTensor) else tuple(w.shape[1:])


# ------------------------------------------------------------------------------------------ Hugging Face names

# Per-expert tensor names on disk (what save_pretrained writes): block path, and our matrix -> theirs.
_HF_PER_EXPERT = {
    "mixtral": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
    "qwen3_moe": ("mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}),
}


def stack_hf_experts(tensors: Mapping[str, Any], layer_prefix: str, config: MoeConfig) -> dict[str, Any]:
    """One layer's router and experts from Hugging Face tensor names, stacked over the expert axis.

    Reads either layout:

    * per-expert (the files ``save_pretrained`` writes): Mixtral's
      ``{layer_prefix}.block_sparse_moe.gate.weight`` and ``...experts.{e}.w1|w3|w2.weight``;
      Qwen3-MoE's ``{layer_prefix}.mlp.gate.weight`` and ``...mlp.experts.{e}.gate_proj|up_proj|down_proj.weight``;
    * transformers 5's fused parameters: ``{layer_prefix}.mlp.gate.weight``,
      ``...mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows first, then up) and
      ``...mlp.experts.down_proj`` ``[E, H, I]``.

    Args:
      tensors: name -> array (numpy or jax), e.g. a safetensors file read with ``safetensors.numpy``.
      layer_prefix: e.g. ``"model.layers.3"``.
      config: the block's MoeConfig (``routing`` picks the family's names).

    Returns:
      ``{"gate": [E, H], "experts": {"gate_proj": [E, I, H], "up_proj": [E, I, H], "down_proj": [E, H, I]}}``
      as numpy arrays in the stored dtype, validated (:func:`validate_moe_params`).

    Raises:
      MoeError naming the missing tensor, or the tensor whose count or shape disagrees with ``config``.
    """
    block, names = _HF_PER_EXPERT[config.routing]
    fused = f"{layer_prefix}.mlp.experts.gate_up_proj"
    if fused in tensors:
        gate_name = f"{layer_prefix}.mlp.gate.weight"
        gate_up = np.asarray(tensors[fused])
        down_name = f"{layer_prefix}.mlp.experts.down_proj"
        if down_name not in tensors:
            raise MoeError(f"MoE tensor {down_name!r} is missing (the fused layout has {fused!r})")
        if gate_up.ndim != 3 or gate_up.shape[1] % 2:
            raise MoeError(f"MoE tensor {fused!r} has shape {list(gate_up.shape)}; expected [num_experts, 2 * "
                           "intermediate, hidden]")
        inter = gate_up.shape[1] // 2
        experts = {"gate_proj": gate_up[:, :inter], "up_proj": gate_up[:, inter:],
                   "down_proj": np.asarray(tensors[down_name])}
    else:
        gate_name = f"{layer_prefix}.{block}.gate.weight"
        experts = {}
        for ours, theirs in names.items():
            stack = []
            for e in range(config.num_experts):
                key = f"{layer_prefix}.{block}.experts.{e}.{theirs}.weight"
                if key not in tensors:
                    raise MoeError(f"MoE expert tensor {key!r} is missing (num_experts = {config.num_experts})")
                stack.append(np.asarray(tensors[key]))
            extra = f"{layer_prefix}.{block}.experts.{config.num_experts}.{theirs}.weight"
            if extra in tensors:
                raise MoeError(f"MoE expert tensor {extra!r} exists but num_experts = {config.num_experts}")
            shapes = {tuple(a.shape) for a in stack}
            if len(shapes) != 1:
                raise MoeError(f"MoE expert tensors {layer_prefix}.{block}.experts.*.{theirs}.weight have different "
                               f"shapes {sorted(shapes)}")
            experts[ours] = np.stack(stack)
    if gate_name not in tensors:
        raise MoeError(f"MoE router tensor {gate_name!r} is missing")
    params = {"gate": np.asarray(tensors[gate_name]), "experts": experts}
    validate_moe_params(params, config)
    return params


# ------------------------------------------------------------------------------------------ validation


def validate_moe_params(params: dict[str, Any], config: MoeConfig, hidden_size: int | None = None) -> tuple[int, int]:
    """Checks the router and expert tensors against each other and ``config``.

    Args:
      params: ``{"gate": [E, H], "experts": {"gate_proj", "up_proj", "down_proj"}}`` (see the module).
      config: the block's MoeConfig.
      hidden_size: H if known (the activations' last dimension).

    Returns:
      ``(H, I)``: hidden and expert intermediate sizes.

    Raises:
      MoeError naming the tensor (``gate``, ``experts.up_proj``...) and what was expected.
    """
    if "gate" not in params:
        raise MoeError("MoE parameters have no router tensor 'gate' ([num_experts, hidden])")
    gate = params["gate"]
    if isinstance(gate, QuantizedTensor):
        raise MoeError("MoE router 'gate' is quantized; the router must stay 16/32-bit")
    if len(gate.shape) != 2:
        raise MoeError(f"MoE router 'gate' has shape {list(gate.shape)}; expected [num_experts, hidden] = "
                       f"[{config.num_experts}, H]")
    if gate.shape[0] != config.num_experts:
        raise MoeError(f"MoE router 'gate' has {gate.shape[0]} rows (experts) but num_experts = "
                       f"{config.num_experts}")
    h = int(gate.shape[1])
    if hidden_size is not None and h != hidden_size:
        raise MoeError(f"MoE router 'gate' is [{gate.shape[0]}, {h}] but the hidden size is {hidden_size}")
    experts = params.get("experts")
    if not isinstance(experts, dict):
        raise MoeError("MoE parameters have no 'experts' dict (gate_proj, up_proj, down_proj)")
    for name in EXPERT_MATRICES:
        if name not in experts:
            raise MoeError(f"MoE expert tensor 'experts.{name}' is missing")
    i = _matrix_shape(experts["gate_proj"])[0]
    expected = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    for name in EXPERT_MATRICES:
        w = experts[name]
        if not isinstance(w, QuantizedTensor) and len(w.shape) != 3:
            raise MoeError(f"MoE expert tensor 'experts.{name}' has shape {list(w.shape)}; expected "
                           f"[num_experts, out, in] = [{config.num_experts}, {expected[name][0]}, {expected[name][1]}]")
        if isinstance(w, QuantizedTensor) and w.codes.ndim < 2:
            raise MoeError(f"MoE expert tensor 'experts.{name}' is a QuantizedTensor without an expert axis; "
                           "quantize it with quantize_experts")
        if _num_experts_of(w) != config.num_experts:
            raise MoeError(f"MoE expert tensor 'experts.{name}' holds {_num_experts_of(w)} experts but "
                           f"num_experts = {config.num_experts}")
        if _matrix_shape(w) != expected[name]:
            raise MoeError(f"MoE expert tensor 'experts.{name}' has per-expert shape {list(_matrix_shape(w))}; "
                           f"expected {list(expected[name])} (hidden {h} from 'gate', intermediate {i} from "
                           "'experts.gate_proj')")
    return h, i


def _validate_lora(lora: dict[str, Any], params: dict[str, Any], config: MoeConfig) -> None:
    for name, pair in lora.items():
        if name not in EXPERT_MATRICES:
            raise MoeError(f"expert LoRA on {name!r}: expected one of {EXPERT_MATRICES}")
        out, inp = _matrix_shape(params["experts"][name])
        a, b = pair["lora_A"], pair["lora_B"]
        r = a.shape[-2] if a.ndim == 3 else -1
        if tuple(a.shape) != (config.num_experts, r, inp) or tuple(b.shape) != (config.num_experts, out, r):
            raise MoeError(f"expert LoRA experts.{name}: lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                           f"expected [{config.num_experts}, r, {inp}] and [{config.num_experts}, {out}, r]")


# ------------------------------------------------------------------------------------------ routing


def route(x2d: jax.Array, gate: jax.Array, config: MoeConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """transformers' top-k router.

    Args:
      x2d: ``[T, H]`` activations.
      gate: the router's weight ``[E, H]``.
      config: the block's MoeConfig.

    Returns:
      ``(router_logits [T, E] in x2d.dtype, expert_weight [T, k], expert_index int32 [T, k])``;
      ``expert_weight`` is float32 for Mixtral and ``x2d.dtype`` for Qwen3-MoE, as transformers.
    """
    logits = jax.lax.dot_general(x2d, gate.astype(x2d.dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32).astype(x2d.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_value, top_index = jax.lax.top_k(probs, config.top_k)
    if config.norm_topk_prob:
        top_value = top_value / jnp.sum(top_value, axis=-1, keepdims=True)
    if config.routing == "qwen3_moe":
        top_value = top_value.astype(logits.dtype)
    return logits, top_value, top_index.astype(jnp.int32)


def load_balancing_loss(router_logits: Sequence[jax.Array], num_experts: int, top_k: int,
                        attention_mask: jax.Array | None = None) -> jax.Array:
    """transformers' ``load_balancing_loss_func`` (Switch Transformer eqs. 4-6), without the coefficient.

    ``E * sum_e f_e * P_e`` where, over all layers and (unmasked) tokens, ``f_e`` is the number of
    top-k assignments to expert e divided by the number of token rows, and ``P_e`` the mean
    routing probability of e. The softmax runs in the logits' dtype (float32 inside).

    Args:
      router_logits: one ``[T, E]`` array per MoE layer (``MoeOutput.router_logits``), T = B*S.
      num_experts: E.
      top_k: k, the experts per token.
      attention_mask: optional ``[B, S]`` (1 = token, 0 = padding); padding rows are excluded.

    Returns:
      A float32 scalar.

    Raises:
      MoeError: no layers, logits not ``[T, E]``, or a mask of another token count.

    References:
      Fedus, Zoph and Shazeer, "Switch Transformers", 2021. https://arxiv.org/abs/2101.03961
    """
    if not router_logits:
        raise MoeError("load_balancing_loss needs the router logits of at least one layer")
    counts = jnp.zeros((num_experts,), jnp.float32)
    prob_sum = jnp.zeros((num_experts,), jnp.float32)
    rows = jnp.float32(0.0)
    mask = None if attention_mask is None else attention_mask.reshape(-1).astype(jnp.float32)
    for layer, logits in enumerate(router_logits):
        if logits.ndim != 2 or logits.shape[-1] != num_experts:
            raise MoeError(f"router_logits[{layer}] has shape {list(logits.shape)}; expected [tokens, "
                           f"num_experts={num_experts}]")
        if mask is not None and mask.shape[0] != logits.shape[0]:
            raise MoeError(f"attention_mask has {mask.shape[0]} tokens but router_logits[{layer}] has "
                           f"{logits.shape[0]}")
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
        _, selected = jax.lax.top_k(probs, top_k)
        onehot = jax.nn.one_hot(selected, num_experts, dtype=jnp.float32)  # [T, k, E]
        probs = probs.astype(jnp.float32)
        if mask is None:
            counts = counts + jnp.sum(onehot, axis=(0, 1))
            prob_sum = prob_sum + jnp.sum(probs, axis=0)
            rows = rows + logits.shape[0]
        else:
            counts = counts + jnp.einsum("tke,t->e", onehot, mask)
            prob_sum = prob_sum + jnp.sum(probs * mask[:, None], axis=0)
            rows = rows + jnp.sum(mask)
    return jnp.sum((counts / rows) * (prob_sum / rows)) * num_experts


def aux_loss_term(router_logits: Sequence[jax.Array], config: MoeConfig,
                  attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The load-balancing term the train step adds to the loss, as ``MixtralForCausalLM.forward``
    with ``output_router_logits=True``.

    Args:
      router_logits: one ``[T, E]`` array per MoE layer.
      config: the block's MoeConfig (``router_aux_loss_coef``, E, k).
      attention_mask: optional ``[B, S]``; padding rows are excluded.

    Returns:
      ``(router_aux_loss_coef * aux_loss, aux_loss)``, float32 scalars: what the step adds, and
      what it reports.
    """
    aux = load_balancing_loss(router_logits, config.num_experts, config.top_k, attention_mask)
    return jnp.float32(config.router_aux_loss_coef) * aux, aux


# ------------------------------------------------------------------------------------------ grouped matmul


# The XLA path (and the kernels' reference) and its default row tile live with the kernel.
_default_tile = grouped_matmul_triton.default_tile_rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _grouped_quantized(x, group_sizes, offsets, qt, tile, vary, backend="auto", interpret=False):
    return grouped_quantized_matmul(x, group_sizes, offsets, qt, transpose=False, backend=backend,
                                    interpret=interpret, tile_rows=tile, vary=vary)


def _grouped_quantized_fwd(x, group_sizes, offsets, qt, tile, vary, backend, interpret):
    # Only the packed experts (and the row ranges) are kept for the backward pass.
    y = grouped_quantized_matmul(x, group_sizes, offsets, qt, transpose=False, backend=backend,
                                 interpret=interpret, tile_rows=tile, vary=vary)
    return y, (group_sizes, offsets, qt)


def _grouped_quantized_bwd(tile, vary, backend, interpret, residuals, dy):
    group_sizes, offsets, qt = residuals
    dx = grouped_quantized_matmul(dy, group_sizes, offsets, qt, transpose=True, backend=backend,
                                  interpret=interpret, tile_rows=tile, vary=vary)
    # zeros_like keeps a shard's varying type inside shard_map.
    zero = jax.tree.map(lambda a: jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.floating)
                        else np.zeros(a.shape, jax.dtypes.float0), qt)
    return (dx, np.zeros(group_sizes.shape, jax.dtypes.float0), np.zeros(offsets.shape, jax.dtypes.float0), zero)


_grouped_quantized.defvjp(_grouped_quantized_fwd, _grouped_quantized_bwd)


def grouped_matmul(x: jax.Array, group_sizes: jax.Array, w: Any, *, tile_rows: int | None = None,
                   backend: GroupedBackend = "auto", interpret: bool = False) -> jax.Array:
    """``y = x_g @ W_g.T`` for every group g of consecutive rows of ``x`` (the grouped expert matmul).

    Args:
      x: ``[N, in]`` rows sorted by expert (the first ``group_sizes[0]`` rows belong to expert 0...).
      group_sizes: int32 ``[E]`` summing to N (rows past the sum come out as zeros).
      w: ``[E, out, in]``: a stacked QuantizedTensor (:func:`quantize_experts`) or an array.
      tile_rows: rows per matmul tile of the XLA path (static); default: the next power of two of
        N/E in [8, 256].
      backend: for a quantized ``w``, :func:`qlora_jax.kernels.grouped_quantized_matmul`'s
        backend, in both directions: ``"auto"`` (XLA on CPU), ``"pallas_triton"`` or ``"xla"``.
      interpret: run that kernel through the Pallas interpreter (tests on CPU).

    Returns:
      ``[N, out]`` in ``x.dtype`` (float32 accumulation).

    A quantized ``w`` is dequantized one expert at a time (XLA) or tile by tile inside the kernel,
    only for experts with rows; its custom VJP gives ``x`` the gradient ``dy_g @ W_g`` (computed
    again from the packed weights) and the frozen weights a zero cotangent. An array ``w`` goes
    through ``jax.lax.ragged_dot`` (ordinary autodiff, also w.r.t. ``w``).
    """
    group_sizes = group_sizes.astype(jnp.int32)
    if not isinstance(w, QuantizedTensor):
        return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2).astype(x.dtype), group_sizes,
                                  preferred_element_type=jnp.float32).astype(x.dtype)
    tile = tile_rows or _default_tile(x.shape[0], _num_experts_of(w))
    return _grouped_quantized(x, group_sizes, jnp.cumsum(group_sizes) - group_sizes, w, tile, None, backend,
                              interpret)


def _ragged(x: jax.Array, sizes: jax.Array, offsets: jax.Array, w: jax.Array, local: bool) -> jax.Array:
    """``jax.lax.ragged_dot`` of rows sorted by expert with ``w: [G, out, in]``, float32 accumulation.

    ``local``: ``w`` holds only the experts whose rows start at ``offsets[0]`` (an expert-parallel
    shard); the rows before and after them multiply a zero matrix.
    """
    rhs = jnp.swapaxes(w, 1, 2).astype(x.dtype)
    if local:
        before = offsets[0]
        sizes = jnp.concatenate([before[None], sizes, (x.shape[0] - before - jnp.sum(sizes))[None]])
        rhs = jnp.pad(rhs, ((1, 1), (0, 0), (0, 0)))
    return jax.lax.ragged_dot(x, rhs, sizes, preferred_element_type=jnp.float32)


def _expert_linear(x, sizes, offsets, w, pair, scaling, tile_rows, local, dropout=None):
    if isinstance(w, QuantizedTensor):
        tile = tile_rows or _default_tile(x.shape[0], _num_experts_of(w))
        y = _grouped_quantized(x, sizes, offsets, w, tile, local or None)
    else:
        y = _ragged(x, sizes, offsets, w, bool(local)).astype(x.dtype)
    if pair is not None:
        xa = x
        if dropout is not None:  # PEFT's lora_dropout on the adapter's input, per (token, expert) row
            rate, key = dropout
            keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
            xa = jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
        h = _ragged(xa, sizes, offsets, pair["lora_A"], bool(local)).astype(x.dtype)
        y = y + (_ragged(h, sizes, offsets, pair["lora_B"], bool(local)) * scaling).astype(x.dtype)
    return y


def _experts_ffn(xs, group_sizes, experts, lora, scaling, tile_rows, first, local, dropout=None):
    """``act(x W_gate.T) * (x W_up.T) @ W_down.T`` for the rows of the experts ``first...`` held here.

    ``local``: False on one device, else the expert mesh axis (inside ``shard_map``). ``dropout``:
    ``(rate, key)`` or None; the key splits in three (gate, up, down), whatever ``first`` is."""
    n_local = _num_experts_of(experts["gate_proj"])
    # The tile follows the global expert count, so a shard multiplies the same row tiles as one device.
    tile_rows = tile_rows or _default_tile(xs.shape[0], group_sizes.shape[0])
    offsets = jnp.cumsum(group_sizes) - group_sizes
    sizes = jax.lax.dynamic_slice_in_dim(group_sizes, first, n_local)
    offsets = jax.lax.dynamic_slice_in_dim(offsets, first, n_local)
    drops = [None] * 3 if dropout is None else [(dropout[0], k) for k in jax.random.split(dropout[1], 3)]
    g = _expert_linear(xs, sizes, offsets, experts["gate_proj"], lora.get("gate_proj"), scaling, tile_rows, local,
                       drops[0])
    u = _expert_linear(xs, sizes, offsets, experts["up_proj"], lora.get("up_proj"), scaling, tile_rows, local,
                       drops[1])
    a = (jax.nn.silu(g) * u).astype(xs.dtype)
    return _expert_linear(a, sizes, offsets, experts["down_proj"], lora.get("down_proj"), scaling, tile_rows, local,
                          drops[2])


# ------------------------------------------------------------------------------------------ the block


def _expert_parallel_ffn(xs: jax.Array, group_sizes: jax.Array, experts: dict[str, Any], lora: dict[str, Any],
                         config: MoeConfig, *, lora_scaling: float, tile_rows: int | None,
                         mesh: jax.sharding.Mesh, expert_axis: str,
                         dropout: tuple[float, jax.Array] | None = None) -> jax.Array:
    """:func:`_experts_ffn` with the experts split over ``mesh``'s ``expert_axis``: each device
    computes the rows of its own experts and one ``psum`` assembles them (``[T*k, H]``).

    ``dropout``: ``(rate, key)`` of the LoRA dropout, or None. The key enters replicated, so every
    device draws the very mask one device draws over the whole ``[T*k, in]`` row array (same key
    splits, same shape) and uses the rows of its own experts: the result is the single-device one."""
    if expert_axis not in mesh.axis_names:
        raise MoeError(f"mesh has no {expert_axis!r} axis (axes: {mesh.axis_names})")
    devices = mesh.shape[expert_axis]
    if config.num_experts % devices:
        raise MoeError(f"num_experts = {config.num_experts} is not divisible by the {expert_axis!r} mesh "
                       f"axis ({devices} devices)")
    spec = jax.sharding.PartitionSpec(expert_axis)

    def local_ffn(xs, group_sizes, experts, lora, key):
        first = jax.lax.axis_index(expert_axis) * (config.num_experts // devices)
        # The replicated rows meet this device's experts: explicitly varying (its transpose, a
        # psum, sums the input gradient's partial rows over the devices).
        xs = jax.lax.pcast(xs, (expert_axis,), to="varying")
        local_dropout = None if key is None else (dropout[0], key)
        ys = _experts_ffn(xs, group_sizes, experts, lora, lora_scaling, tile_rows, first, expert_axis, local_dropout)
        return jax.lax.psum(ys, expert_axis)

    replicated = jax.sharding.PartitionSpec()
    key = None if dropout is None else dropout[1]
    return jax.shard_map(local_ffn, mesh=mesh, in_specs=(replicated, replicated, spec, spec, replicated),
                         out_specs=replicated)(xs, group_sizes, experts, lora, key)


def moe_block(
    params: dict[str, Any],
    x: jax.Array,
    config: MoeConfig,
    *,
    lora: dict[str, dict[str, jax.Array]] | None = None,
    lora_scaling: float = 1.0,
    tile_rows: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    expert_axis: str = "expert",
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> MoeOutput:
    """The sparse MoE feed-forward block (``MixtralSparseMoeBlock`` / ``Qwen3MoeSparseMoeBlock``).

    Args:
      params: ``{"gate": [E, H], "experts": {...}}`` (module docstring); experts quantized or not.
      x: ``[..., H]`` activations (float32/bfloat16/float16); the compute dtype.
      config: routing hyperparameters.
      lora: optional per-expert adapters ``{"gate_proj"|"up_proj"|"down_proj": {"lora_A": [E, r, in],
        "lora_B": [E, out, r]}}`` (any subset; :func:`init_expert_lora`).
      lora_scaling: ``alpha / r`` (or rsLoRA's).
      tile_rows: the grouped matmul's tile (see :func:`grouped_matmul`).
      mesh: expert parallelism: with a mesh, the experts (and their adapters) are expected split
        over its ``expert_axis`` by their expert axis (:func:`expert_shardings`); each device
        computes the rows of its own experts (``shard_map``; tokens and router replicated over
        that axis) and one ``psum`` over the axis assembles them. Every row is computed by one
        device only (the others add exact zeros), so the result equals the single-device one.
      expert_axis: the mesh axis of the experts.
      dropout_rate: LoRA dropout on the expert adapters' inputs (only with ``dropout_key`` and ``lora``),
        one mask per (token, expert) row; with a ``mesh`` too, every device draws the whole mask from the
        replicated key and keeps its own experts' rows, so the masks are the single-device ones.
      dropout_key: PRNG key for that dropout; None disables it.

    Returns:
      A :class:`MoeOutput`; ``hidden`` has ``x``'s shape and dtype.
    """
    h_size = x.shape[-1]
    validate_moe_params(params, config, hidden_size=h_size)
    if lora:
        _validate_lora(lora, params, config)
    lora = lora or {}
    lead = x.shape[:-1]
    t = math.prod(lead)
    x2d = x.reshape(t, h_size)
    logits, weight, index = route(x2d, params["gate"], config)
    k = config.top_k
    # Sort the T*k (token, expert) rows by expert; a stable sort keeps tokens in order per expert.
    flat = index.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=config.num_experts).astype(jnp.int32)
    xs = x2d[order // k]
    experts = params["experts"]
    dropout = (dropout_rate, dropout_key) if dropout_key is not None and dropout_rate > 0 and lora else None
    if mesh is None:
        ys = _experts_ffn(xs, group_sizes, experts, lora, lora_scaling, tile_rows, 0, False, dropout)
    else:
        ys = _expert_parallel_ffn(xs, group_sizes, experts, lora, config, lora_scaling=lora_scaling,
                                  tile_rows=tile_rows, mesh=mesh, expert_axis=expert_axis, dropout=dropout)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, h_size)
    # Weighted, cast to x.dtype, and added in increasing expert order (index_add_ per expert).
    contrib = (y * weight[..., None]).astype(x.dtype)
    by_expert = jnp.argsort(index, axis=-1)
    contrib = jnp.take_along_axis(contrib, by_expert[..., None], axis=1)
    out = jnp.zeros((t, h_size), x.dtype)
    for j in range(k):
        out = out + contrib[:, j]
    return MoeOutput(out.reshape(x.shape), logits, index, weight)


def expert_shardings(tree: Any, mesh: jax.sharding.Mesh, axis: str = "expert") -> Any:
    """NamedShardings for expert parallelism: every expert tensor split over ``axis`` by its expert axis.

    Args:
      tree: MoE block parameters (:func:`moe_block`'s ``params``: the router ``gate`` is replicated)
        or expert LoRA adapters (:func:`init_expert_lora`); quantized experts shard every array
        (codes, scales, nested scales, offsets) along their leading expert axis.
      mesh: a mesh with an ``axis`` axis whose size divides the number of experts.
      axis: the mesh axis name.

    Returns:
      A pytree of ``jax.sharding.NamedSharding`` shaped like ``tree`` (for ``jax.device_put``).
    """
    if axis not in mesh.axis_names:
        raise MoeError(f"mesh has no {axis!r} axis (axes: {mesh.axis_names})")
    size = mesh.shape[axis]

    def sharding(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if keys and keys[0] == "gate":
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        if leaf.ndim == 0 or leaf.shape[0] % size:
            raise MoeError(f"expert tensor {'.'.join(str(k) for k in keys)} of shape {list(leaf.shape)}: its "
                           f"expert axis is not divisible by the {axis!r} mesh axis ({size})")
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def init_expert_lora(key: jax.Array, params: dict[str, Any], r: int, targets: Sequence[str] = EXPERT_MATRICES,
                     dtype: Any = jnp.float32) -> dict[str, dict[str, jax.Array]]:
    """PEFT's initialisation (A Kaiming-uniform, B zero) of per-expert adapters.

    Args:
      key: PRNG key.
      params: the block's parameters (its ``experts``' shapes are read).
      r: the rank.
      targets: which expert matrices get adapters.
      dtype: storage dtype of A and B.

    Returns:
      ``{name: {"lora_A": [E, r, in], "lora_B": [E, out, r]}}``.
    """
    out = {}
    for name, sub in zip(targets, jax.random.split(key, len(targets)), strict=True):
        if name not in EXPERT_MATRICES:
            raise MoeError(f"expert LoRA target {name!r}: expected one of {EXPERT_MATRICES}")
        w = params["experts"][name]
        out[name] = init_lora_pair(sub, _matrix_shape(w), r, dtype, leading=(_num_experts_of(w),))
    return out
