"""Fold LoRA adapters into the base weights and export a Hugging Face model folder, saying what survives.

Merging dequantizes each base weight ``W`` to float32, adds the adapter's update
``ΔW = scaling * B @ A`` and rounds the sum to the export's format ``R``: a cast to the export
dtype, or with ``quantize_to="nf4"`` a re-quantization written in bitsandbytes' 4-bit format
(what transformers' ``save_pretrained`` writes for a 4-bit model). The folder (``config.json``,
``model.safetensors`` shards, tokenizer files) loads in ``AutoModelForCausalLM.from_pretrained``.

**What survives.** A QLoRA base already sits on the NF4 grid, so rounding ``W + ΔW`` back to it
undoes every update smaller than half a quantization step: on SmolLM2 with a trained adapter, a
4-bit merge kept 0.1% of the finetune's loss improvement (PEFT's ``merge_and_unload`` on
bitsandbytes does the same; peft#2321, transformers#31293). A re-quantization error that looks
small against ``W`` can be the size of ``ΔW`` itself. So every export measures, per linear layer
and overall, against ``ΔW``:

* ``kept_fraction`` = <R(W+ΔW) − R(W), ΔW> / ||ΔW||²: the part of the adapter's update that the
  exported weights still apply (1: all of it, 0: none);
* ``kept_norm_ratio`` = ||R(W+ΔW) − R(W)|| / ||ΔW||: the size of the change they apply (rounding
  noise counts here, so it can exceed 1 while nothing useful survives);
* ``error_ratio`` = ||R(W+ΔW) − (W+ΔW)|| / ||ΔW||: the rounding error relative to the update;

and, when held-out batches are given, the loss of the merged model against the unmerged one
and the base: ``loss_improvement_kept`` = (base − merged) / (base − unmerged). A merge that
loses most of the adapter (see :func:`export_merged`) is refused unless ``allow_lossy=True``,
pointing to the 16-bit merge or the unmerged adapter.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from qlora_jax.checkpoints.load import LayerStacker, hf_global_key
from qlora_jax.checkpoints.validate import FLOAT_DTYPES
from qlora_jax.lora import LoraConfig
from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig
from qlora_jax.quant import QuantizedTensor, bnb_format, dequantize, quantize

__all__ = ["merge_lora_weight", "export_merged", "MergeReport", "LayerMergeStats", "LossyMergeError"]

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 2 * 2**30


class LossyMergeError(ValueError):
    """A merged export would lose most of the adapter's effect (the message holds the report)."""


@dataclasses.dataclass(frozen=True)
class LayerMergeStats:
    """How much of one linear layer's adapter update survives the export (see the module docstring).

    Attributes:
      layer: the decoder layer's index.
      module: the linear layer's name (``"q_proj"``, ...); for an MoE expert matrix, its module in
        the layer as the export names it (``"block_sparse_moe.experts.3.w1"``,
        ``"mlp.experts.3.gate_proj"``).
      delta_norm: ||ΔW||, Frobenius, in the weights' units.
      kept_fraction: <R(W+ΔW) − R(W), ΔW> / ||ΔW||², dimensionless.
      kept_norm_ratio: ||R(W+ΔW) − R(W)|| / ||ΔW||, dimensionless.
      error_ratio: ||R(W+ΔW) − (W+ΔW)|| / ||ΔW||, dimensionless.
      expert: the expert's index for an MoE expert matrix, else None.
    """

    layer: int
    module: str
    delta_norm: float
    kept_fraction: float
    kept_norm_ratio: float
    error_ratio: float
    expert: int | None = None


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """Where the export went and what of the adapter survives it.

    Attributes:
      path: the folder written.
      num_tensors: tensors written.
      total_bytes: bytes of the tensors written.
      requantization_relative_rmse: ||R(W+ΔW) − (W+ΔW)|| / ||W+ΔW|| over all linear layers, for a
        quantized export (small though the adapter may be lost: compare ``error_ratio``); else None.
      layers: per linear layer whose adapter update is not zero.
      kept_fraction: :class:`LayerMergeStats`' figure over all of ``layers`` (sums of squares and
        inner products); None without an adapter (or with a zero one).
      kept_norm_ratio: likewise.
      error_ratio: likewise.
      base_loss: mean held-out loss (nats per target token) of the base alone, when batches were given.
      unmerged_loss: the same of base + adapter.
      merged_loss: the same of the exported weights.
      loss_improvement_kept: (base − merged) / (base − unmerged).
      lossy: whether most of the adapter was lost (the criterion of :func:`export_merged`).
    """

    path: pathlib.Path
    num_tensors: int
    total_bytes: int
    requantization_relative_rmse: float | None = None
    layers: tuple[LayerMergeStats, ...] = ()
    kept_fraction: float | None = None
    kept_norm_ratio: float | None = None
    error_ratio: float | None = None
    base_loss: float | None = None
    unmerged_loss: float | None = None
    merged_loss: float | None = None
    loss_improvement_kept: float | None = None
    lossy: bool = False

    def summary(self) -> str:
        """A few lines for a log: the overall figures and the layers that keep least."""
        if self.kept_fraction is None:
            return f"merged export at {self.path}: no adapter to merge"
        worst = sorted(self.layers, key=lambda s: s.kept_fraction)[:3]
        lines = [f"merged export at {self.path}: the exported weights apply {self.kept_fraction:.1%} of the "
                 f"adapter's update (norm ratio {self.kept_norm_ratio:.3f}, rounding error {self.error_ratio:.3f} "
                 f"x ||ΔW||) over {len(self.layers)} adapted layers; least kept: "
                 + ", ".join(f"layer {s.layer} {s.module} {s.kept_fraction:.1%}" for s in worst)]
        if self.merged_loss is not None:
            lines.append(f"held-out loss: base {self.base_loss:.4f}, unmerged {self.unmerged_loss:.4f}, merged "
                         f"{self.merged_loss:.4f}"
                         + ("" if self.loss_improvement_kept is None
                            else f" ({self.loss_improvement_kept:.1%} of the adapter's improvement kept)"))
        return "\n".join(lines)


def merge_lora_weight(weight: Any, pair: dict[str, jax.Array] | None, scaling: float) -> jax.Array:
    """One layer's weight with its adapter folded in: float32 ``W + scaling * B @ A``.

    Args:
      weight: the weight ``[out, in]``, a QuantizedTensor or an array (any float dtype).
      pair: ``{"lora_A": [r, in], "lora_B": [out, r]}``, or None (no adapter).
      scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

    Returns:
      float32 ``[out, in]``.

    References:
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021 (merging, section 4.1).
    """
    w = _dense(weight)
    if pair is None:
        return w
    return w + _delta(pair, scaling)


def _dense(weight: Any) -> jax.Array:
    return dequantize(weight, jnp.float32) if isinstance(weight, QuantizedTensor) else jnp.asarray(weight, jnp.float32)


def _delta(pair: Mapping[str, jax.Array], scaling: float) -> jax.Array:
    return scaling * (jnp.asarray(pair["lora_B"], jnp.float32) @ jnp.asarray(pair["lora_A"], jnp.float32))


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


def _round_to_export(w: jax.Array, quantize_to: str | None, dtype: str) -> tuple[Any, jax.Array]:
    """The stored form of a float32 weight (cast, or re-quantized) and what it reads back as (float32)."""
    if quantize_to is None:
        stored = w.astype(dtype)
        return stored, stored.astype(jnp.float32)
    qt = quantize(w, quantize_to, double_quant=True)
    return qt, dequantize(qt, jnp.float32)


class _MergeSums(NamedTuple):
    """float64 sums over one layer's merged weight, or over all of them (see the module docstring):
    E = R(W+ΔW) − R(W) and err = R(W+ΔW) − (W+ΔW), with R the export's rounding."""

    finite: float  # 1 when every merged value is finite (per layer; a count over layers)
    delta_sq: float  # ||ΔW||²
    effect_sq: float  # ||E||²
    effect_dot_delta: float  # <E, ΔW>
    error_sq: float  # ||err||²
    merged_sq: float  # ||W+ΔW||²

    def plus(self, other: _MergeSums) -> _MergeSums:
        """The field-wise sum (``+`` of a tuple would concatenate)."""
        return _MergeSums(*(a + b for a, b in zip(self, other, strict=True)))

    def ratios(self) -> tuple[float, float, float]:
        """``(kept_fraction, kept_norm_ratio, error_ratio)`` of these sums."""
        d = max(self.delta_sq, 1e-300)
        return self.effect_dot_delta / d, float(np.sqrt(self.effect_sq / d)), float(np.sqrt(self.error_sq / d))


_NO_SUMS = _MergeSums(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@functools.partial(jax.jit, static_argnames=("quantize_to", "dtype"))
def _merge_layer(weight: Any, pair: Any, scaling: jax.Array, *, quantize_to: str | None, dtype: str):
    """One layer's exported weight and float32 sums, in :class:`_MergeSums`' order (one array, one
    transfer); one compiled function per weight shape, rather than a compilation per operation and shape.
    """
    w = _dense(weight)
    delta = jnp.zeros_like(w) if pair is None else _delta(pair, scaling)
    merged = w + delta
    stored, rounded = _round_to_export(merged, quantize_to, dtype)
    error = rounded - merged
    effect = jnp.zeros_like(w) if pair is None else rounded - _round_to_export(w, quantize_to, dtype)[1]
    sums = jnp.stack([jnp.isfinite(merged).all().astype(jnp.float32), jnp.vdot(delta, delta),
                      jnp.vdot(effect, effect), jnp.vdot(effect, delta), jnp.vdot(error, error),
                      jnp.vdot(merged, merged)])
    return stored, sums


@functools.partial(jax.jit, static_argnums=0)
def _loss_sum(spec: Any, trainable: Any, frozen: Any, batch: dict[str, jax.Array]):
    from qlora_jax.train import loss_and_count

    return loss_and_count(spec, trainable, frozen, batch, None)


def _mean_loss(spec: Any, trainable: Any, frozen: Any, batches: Sequence[Mapping[str, np.ndarray]]) -> float:
    total = count = 0.0
    for batch in batches:
        loss_sum, tokens = _loss_sum(spec, trainable, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
        total, count = total + float(loss_sum), count + float(tokens)
    if count == 0:
        raise ValueError("the held-out batches given to export_merged hold no target tokens")
    return total / count


@dataclasses.dataclass
class _Merged:
    """What the merge step produced: the tensors to write (transformers' names), the sums over all
    linear layers, each adapted layer's figures, and the merged linear weights stacked per layer
    (for measuring the merged model; only when held-out batches were given)."""

    tensors: dict[str, np.ndarray]
    totals: _MergeSums = _NO_SUMS
    layer_stats: list[LayerMergeStats] = dataclasses.field(default_factory=list)
    stack: LayerStacker | None = None


def _merge(config: LlamaConfig, base: dict[str, Any], lora: dict[str, Any] | None, scaling: jax.Array, *,
           quantize_to: str | None, np_dtype: Any, stack: bool) -> _Merged:
    """Merges every linear layer (each expert of an MoE layer on its own) and gathers every tensor of
    the export, refusing non-finite ones."""
    out = _Merged({hf_global_key("embed_tokens"): _host(base["embed_tokens"], np_dtype)},
                  stack=LayerStacker(config.num_hidden_layers) if stack else None)
    layers, linears = base["layers"], layout.linear_entries(base)
    lora_layers = (lora or {}).get("layers", {})
    experts = {spec.module: spec for spec in layout.tensor_table(config) if spec.experts}
    for layer in range(config.num_hidden_layers):
        for norm in layout.layer_norms(config):
            out.tensors[layout.hf_key(layer, norm)] = _host(layout.get_layer_entry(layers, norm)[layer], np_dtype)
        if config.is_moe:  # the router: 16-bit, never adapted; the trained one (modules_to_save) if there is one
            out.tensors[layout.hf_key(layer, _router_module(config))] = _host(_router(layers, lora_layers)[layer],
                                                                              np_dtype)
        for name, params in linears.items():
            pair = lora_layers.get(layout.module_group(name), {}).get(name)
            if name in experts:
                _merge_experts(out, layer, experts[name], params, pair, scaling, quantize_to=quantize_to,
                               np_dtype=np_dtype)
            else:
                _merge_one(out, layer, name, params, pair, scaling, quantize_to=quantize_to, np_dtype=np_dtype)
    out.tensors[hf_global_key("norm")] = _host(base["norm"], np_dtype)
    if not config.tie_word_embeddings:
        out.tensors[hf_global_key("lm_head")] = _host(base["lm_head"], np_dtype)
    for key, value in out.tensors.items():
        if value.dtype.name in FLOAT_DTYPES and not np.isfinite(value).all():
            raise ValueError(f"tensor {key!r} of the merged export holds NaN or Inf; refusing to export it")
    return out


def _router(layers: Mapping[str, Any], lora_layers: Mapping[str, Any]) -> Any:
    """The routers ``[L, E, hidden]``: the adapters' trained ones (``modules_to_save``), else the base's."""
    return lora_layers.get("mlp", {}).get("gate", layers["mlp"]["gate"])["weight"]


def _router_module(config: LlamaConfig) -> str:
    """An MoE layer's router module in the layer (``block_sparse_moe.gate``, ``mlp.gate``)."""
    return f"{config.family.moe_module}.gate"


def _merge_tensor(out: _Merged, key: str, weight: Any, pair: Any, scaling: jax.Array, *, quantize_to: str | None,
                  np_dtype: Any, stats: tuple[int, str, int | None]) -> Any:
    """Merges one weight matrix ``[out, in]`` into ``out.tensors[key]`` (bitsandbytes' tensors for a
    4-bit export), adds its sums to the totals and its :class:`LayerMergeStats` (``stats``: layer,
    module, expert) when its update is not zero; returns the stored form (for the held-out model)."""
    stored, sums = _merge_layer(weight, pair, scaling, quantize_to=quantize_to, dtype=np_dtype.name)
    sums = _MergeSums(*np.asarray(jax.device_get(sums), np.float64).tolist())
    if not sums.finite:
        raise ValueError(f"the merged weight {key!r} holds NaN or Inf (from the adapter or the base); "
                         "refusing to export it")
    out.totals = out.totals.plus(sums)
    if sums.delta_sq > 0:  # an adapter with a non-zero update (a fresh adapter, B = 0, has nothing to lose)
        layer, module, expert = stats
        out.layer_stats.append(LayerMergeStats(layer, module, float(np.sqrt(sums.delta_sq)), *sums.ratios(),
                                               expert=expert))
    stored = jax.device_get(stored)
    if quantize_to is None:
        out.tensors[key] = np.asarray(stored)
    else:
        out.tensors.update(bnb_format.to_bnb_state_dict(stored, key))
    return stored


def _merge_one(out: _Merged, layer: int, name: str, params: dict[str, Any], pair: Any, scaling: jax.Array, *,
               quantize_to: str | None, np_dtype: Any) -> None:
    """Merges linear layer ``name`` of decoder layer ``layer`` into ``out``."""
    stored = _merge_tensor(out, layout.hf_key(layer, name), _layer_slice(params["weight"], layer),
                           None if pair is None else _layer_slice(pair, layer), scaling, quantize_to=quantize_to,
                           np_dtype=np_dtype, stats=(layer, name, None))
    if out.stack is not None:
        out.stack.put(name, layer, stored)
    if "bias" in params:
        out.tensors[layout.hf_key(layer, name, "bias")] = _host(params["bias"][layer], np_dtype)


def _merge_experts(out: _Merged, layer: int, spec: layout.TensorSpec, params: dict[str, Any], pair: Any,
                   scaling: jax.Array, *, quantize_to: str | None, np_dtype: Any) -> None:
    """Merges every expert of MoE matrix ``spec`` (``[L, E, out, in]``, adapters ``[L, E, r, in]`` /
    ``[L, E, out, r]``) of decoder layer ``layer`` into ``out``, one expert at a time, under the
    per-expert names transformers reads (``...experts.{e}.w1.weight``): only one expert is ever
    dequantized in float32, as one dense weight is."""
    keys = spec.expert_keys(layer)
    stored = []
    for e, key in enumerate(keys):
        weight = jax.tree.map(lambda x, e=e: x[layer, e], params["weight"])
        expert_pair = None if pair is None else jax.tree.map(lambda x, e=e: x[layer, e], pair)
        stored.append(_merge_tensor(out, key, weight, expert_pair, scaling, quantize_to=quantize_to,
                                    np_dtype=np_dtype, stats=(layer, spec.expert_module.format(e=e), e)))
    if out.stack is not None:  # the stored (16-bit or 4-bit) experts of this layer, for the held-out model
        out.stack.put(spec.module, layer, jax.tree.map(lambda *xs: jnp.stack(xs), *stored))


def _held_out_losses(config: LlamaConfig, base: dict[str, Any], lora: dict[str, Any] | None,
                     lora_config: LoraConfig | None, merged: _Merged, eval_batches: Sequence[Mapping[str, np.ndarray]],
                     *, compute_dtype: str, np_dtype: Any) -> dict[str, float]:
    """Mean held-out loss of the base, the base with its adapter, and the merged weights."""
    from qlora_jax.models.spec import ModelSpec

    tensors, linears = merged.tensors, layout.linear_entries(base)
    merged_base = layout.assemble_base(
        embed_tokens=jnp.asarray(tensors[hf_global_key("embed_tokens")]),
        norm=jnp.asarray(tensors[hf_global_key("norm")]),
        lm_head=None if config.tie_word_embeddings else jnp.asarray(tensors[hf_global_key("lm_head")]),
        layer_norms={n: jnp.asarray(layout.get_layer_entry(base["layers"], n)).astype(np_dtype)
                     for n in layout.layer_norms(config)},
        linears={name: {"weight": merged.stack.buffers[name],
                        **({"bias": jnp.asarray(p["bias"]).astype(np_dtype)} if "bias" in p else {})}
                 for name, p in linears.items()}, config=config)
    if config.is_moe:
        merged_base["layers"]["mlp"]["gate"] = {"weight": jnp.asarray(_router(base["layers"], (lora or {}).get(
            "layers", {}))).astype(np_dtype)}
    plain = ModelSpec(config, None, compute_dtype=compute_dtype)
    losses = {"base_loss": _mean_loss(plain, None, base, eval_batches),
              "merged_loss": _mean_loss(plain, None, merged_base, eval_batches)}
    losses["unmerged_loss"] = (_mean_loss(ModelSpec(config, lora_config, compute_dtype=compute_dtype), lora, base,
                                          eval_batches) if lora is not None else losses["base_loss"])
    return losses


def _report(path: pathlib.Path, merged: _Merged, losses: dict[str, float], *, quantize_to: str | None,
            min_kept_fraction: float) -> MergeReport:
    """The :class:`MergeReport`, with the verdict of :func:`export_merged` on whether it is lossy."""
    kept = kept_norm = error_ratio = improvement_kept = None
    lossy = False
    if merged.layer_stats:
        kept, kept_norm, error_ratio = merged.totals.ratios()
        lossy = kept < min_kept_fraction or error_ratio > 1.0
        if losses and losses["unmerged_loss"] < losses["base_loss"]:
            improvement_kept = ((losses["base_loss"] - losses["merged_loss"])
                                / (losses["base_loss"] - losses["unmerged_loss"]))
            lossy = improvement_kept < min_kept_fraction
    totals = merged.totals
    return MergeReport(
        path=path, num_tensors=len(merged.tensors), total_bytes=sum(v.nbytes for v in merged.tensors.values()),
        requantization_relative_rmse=(None if quantize_to is None
                                      else float(np.sqrt(totals.error_sq / max(totals.merged_sq, 1e-30)))),
        layers=tuple(merged.layer_stats), kept_fraction=kept, kept_norm_ratio=kept_norm, error_ratio=error_ratio,
        loss_improvement_kept=improvement_kept, lossy=lossy, **losses)


def _refuse_or_log(report: MergeReport, *, quantize_to: str | None, dtype: str, allow_lossy: bool) -> None:
    """Raises :class:`LossyMergeError` for a lossy export unless ``allow_lossy`` (then warns); logs the summary."""
    if report.lossy:
        alternative = ("export with quantize_to=None (a 16-bit merge)" if quantize_to is not None
                       else "export with dtype='float32'")
        message = (f"{report.summary()}\nThis {quantize_to or dtype} merge loses most of the finetune: the adapter's "
                   f"update is small against the {quantize_to or dtype} rounding step. Instead {alternative}, or ship "
                   "the adapter unmerged (qlora_jax.peft_io.save_peft_adapter; PEFT loads it on the 4-bit base)")
        if not allow_lossy:
            raise LossyMergeError(message + "; pass allow_lossy=True to write this export anyway")
        log.warning("%s (written anyway: allow_lossy=True)", message)
    elif report.layers:
        log.info("%s", report.summary())


def _write_folder(path: pathlib.Path, tensors: dict[str, np.ndarray], config: LlamaConfig, *, dtype: str,
                  quantize_to: str | None, tokenizer: Any) -> None:
    """The transformers folder: safetensors shards, ``config.json`` (with bitsandbytes' quantization
    config for a 4-bit export) and the tokenizer's files."""
    path.mkdir(parents=True, exist_ok=True)
    _write_shards(path, tensors)
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
            # (the MoE routers are written 16-bit, as the loaders keep them)
            "llm_int8_skip_modules": ["lm_head"] + ([_router_module(config)] if config.is_moe else []),
        }
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer is not None:
        tokenizer.save(path)


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
    eval_batches: Sequence[Mapping[str, np.ndarray]] | None = None,
    compute_dtype: str = "float32",
    min_kept_fraction: float = 0.5,
    allow_lossy: bool = False,
) -> MergeReport:
    """Writes a transformers-loadable folder with the adapters folded into the weights; reports what survives.

    The export is **lossy** when the held-out loss keeps less than ``min_kept_fraction`` of the
    adapter's improvement (if batches were given and the adapter improves the loss), otherwise
    when the weights apply less than ``min_kept_fraction`` of its update or their rounding error
    exceeds the update itself (``error_ratio > 1``).

    Mixture-of-experts models (Mixtral, Qwen3-MoE) are merged expert by expert (each expert's
    ``scaling * B_e @ A_e`` into its own dequantized matrix, one expert in float32 at a time) and
    written under transformers 4's per-expert names (``block_sparse_moe.experts.{e}.w1``,
    ``mlp.experts.{e}.gate_proj``; transformers 5 fuses them when it loads the folder); the router
    is written as it is (16-bit, not adapted) and each expert matrix has its own row in the report.
    A 4-bit MoE export holds per-expert bitsandbytes tensors (transformers 4's per-expert
    ``Linear4bit`` format, which :func:`~qlora_jax.model.load_pretrained` reads as stored);
    transformers 5 refuses it (it fuses the experts and leaves them unquantized), so a warning is
    logged: export 16-bit for transformers 5.

    Args:
      path: the folder to write (``config.json``, safetensors, tokenizer files).
      config: the model config.
      base: the base pytree (quantized or not).
      lora: the adapters, or None (the base is exported as is).
      lora_config: their hyperparameters (the scaling), or None.
      dtype: dtype of the written 16/32-bit tensors (and the compute dtype recorded for a quantized
        export).
      quantize_to: None (16/32-bit export), or "nf4"/"fp4" for bitsandbytes 4-bit weights with
        double quantization.
      tokenizer: a :class:`qlora_jax.tokenizer.Tokenizer` whose files are written alongside.
      eval_batches: held-out batches (``{"input_ids", "attention_mask", "loss_mask"}``, int32
        ``[B, T]``, e.g. :func:`qlora_jax.data.eval_batches`) on which the base, unmerged and merged
        losses are measured.
      compute_dtype: dtype those losses are computed in.
      min_kept_fraction: the lossy threshold, in ``[0, 1]``.
      allow_lossy: write a lossy export with a warning instead of refusing it.

    Returns:
      A :class:`MergeReport`.

    Raises:
      LossyMergeError: a lossy export without ``allow_lossy``, before anything is written.
      ValueError: non-finite merged weights (always refused), or held-out batches without a target
        token.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
    """
    path = pathlib.Path(path)
    if config.is_moe and quantize_to is not None:
        log.warning("a %s merge of a %s model writes per-expert bitsandbytes tensors (the format of transformers 4's "
                    "per-expert Linear4bit layers): qlora-jax reads them as stored, transformers 5 does not load 4-bit "
                    "experts (export 16-bit for it)", quantize_to,
                    config.model_type)
    np_dtype = jnp.dtype(dtype)
    scaling = jnp.float32(lora_config.scaling if lora_config is not None else 1.0)
    merged = _merge(config, base, lora, scaling, quantize_to=quantize_to, np_dtype=np_dtype,
                    stack=eval_batches is not None)
    losses = ({} if eval_batches is None else
              _held_out_losses(config, base, lora, lora_config, merged, eval_batches, compute_dtype=compute_dtype,
                               np_dtype=np_dtype))
    report = _report(path, merged, losses, quantize_to=quantize_to, min_kept_fraction=min_kept_fraction)
    _refuse_or_log(report, quantize_to=quantize_to, dtype=dtype, allow_lossy=allow_lossy)
    _write_folder(path, merged.tensors, config, dtype=dtype, quantize_to=quantize_to, tokenizer=tokenizer)
    return report
