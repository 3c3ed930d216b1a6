"""Memory planner: the peak device memory of a QLoRA training step, broken down, before launching.

The model is structural: every component is computed from the shapes, dtypes and options the
training step actually uses (:mod:`qlora_jax.train`, :mod:`qlora_jax.models.llama`):

* frozen base: quantized linear weights (codes + constants, :mod:`qlora_jax.quant.report`), and
  the 16-bit embeddings, norms and output head;
* adapters, their gradients (in the adapters' dtype, plus a float32 accumulator when accumulating)
  and the optimizer's update;
* optimizer state, on the device or in pinned host memory when offloaded (32-bit Adam: two float32
  moments; 8-bit: two uint8 moments and a float32 absmax per 256 values, bitsandbytes' layout),
  plus the transient device copies an offloaded state needs while it is updated
  (:func:`plan_optimizer_state`: three chunks of layers when streamed, the whole state when not);
* activations: with per-layer rematerialisation, each layer's input is kept and one layer's
  internals are live at a time (twice: forward values and their cotangents); without it, every
  layer's internals are kept. Attention scores are ``[B, heads, T, T]`` float32;
* the chunked output projection and cross-entropy (``loss_chunk`` tokens at a time);
* the dequantized weights of one layer (the XLA path keeps them for that layer's backward).

Mixture-of-experts models (Mixtral, Qwen3-MoE): every expert's matrices are stored (4-bit, one
quantized tensor per expert) and adapted (one adapter per expert), the 16-bit router counts with
the embeddings; each token's activations are those of its ``k`` experts (the rows sorted by expert),
and the grouped expert matmul dequantizes one expert at a time and keeps none for the backward.
With ``train_router`` (PEFT's ``modules_to_save=["gate"]``), a trainable copy of every router
``[L, E, hidden]`` joins the adapters (their dtype, gradients and optimizer state); the frozen
router stays in the base, as PEFT keeps the original module.

``workspace_fraction`` adds a margin for allocator fragmentation and library workspaces.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.layout import linear_layers
from qlora_jax.quant.report import storage_report_for

__all__ = ["KNOWN_MODELS", "MemoryPlan", "OptimizerStatePlan", "plan_memory", "plan_optimizer_state", "model_config",
           "GPUS", "format_plan"]

GiB = 2**30

_LLAMA1 = dict(vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=2048, model_type="llama")
KNOWN_MODELS: dict[str, LlamaConfig] = {
    "llama-7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, head_dim=128, **_LLAMA1),
    "llama-13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                             num_key_value_heads=40, head_dim=128, **_LLAMA1),
    "llama-33b": LlamaConfig(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                             num_key_value_heads=52, head_dim=128, **_LLAMA1),
    "llama-65b": LlamaConfig(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                             num_key_value_heads=64, head_dim=128, **_LLAMA1),
    "llama2-70b": LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                              max_position_embeddings=4096),
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                             rope_theta=500000.0, max_position_embeddings=8192),
    "llama3-70b": LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                              rope_theta=500000.0, max_position_embeddings=8192),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                                rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    # From the published config.json files (google/gemma-2-9b, Qwen/Qwen3-8B, microsoft/Phi-3-mini-4k-instruct).
    "gemma-2-9b": LlamaConfig(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=256, rms_norm_eps=1e-6,
                              max_position_embeddings=8192, tie_word_embeddings=True, model_type="gemma2",
                              hidden_act="gelu_pytorch_tanh", sliding_window=4096, query_pre_attn_scalar=256,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                              layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                                for i in range(42))),
    "qwen3-8b": LlamaConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                            rope_theta=1000000.0, max_position_embeddings=40960, model_type="qwen3"),
    "phi-3-mini": LlamaConfig(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, head_dim=96, rms_norm_eps=1e-5,
                              max_position_embeddings=4096, sliding_window=2047, model_type="phi3"),
    # Mixtures of experts, from the published config.json files (mistralai/Mixtral-8x7B-v0.1,
    # Qwen/Qwen3-30B-A3B): 46.7 B and 30.5 B parameters.
    "mixtral-8x7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                                rope_theta=1000000.0, max_position_embeddings=32768, model_type="mixtral",
                                num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02),
    "qwen3-30b-a3b": LlamaConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
                                 rope_theta=1000000.0, max_position_embeddings=40960, model_type="qwen3_moe",
                                 num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                 router_aux_loss_coef=0.001, moe_intermediate_size=768),
}

GPUS = {"24GB": 24 * GiB, "40GB": 40 * GiB, "48GB": 48 * GiB, "80GB": 80 * GiB, "H100": 80 * GiB,
        "H200": 141 * GiB, "A100-40GB": 40 * GiB, "A100-80GB": 80 * GiB, "RTX4090": 24 * GiB, "A6000": 48 * GiB}

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def model_config(name_or_path: str) -> LlamaConfig:
    """A known model name (see :data:`KNOWN_MODELS`) or a ``config.json`` path/folder."""
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path]
    path = pathlib.Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"unknown model {name_or_path!r}: use one of {sorted(KNOWN_MODELS)} or a config.json path")
    return LlamaConfig.from_hf_dict(json.loads(path.read_text()))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per component; ``device_peak_bytes`` is the sum of the device components."""

    base_linear_codes: int
    base_quant_constants: int
    embeddings_norms_head: int
    adapters: int
    adapter_gradients: int
    optimizer_device: int
    optimizer_host: int
    activations_saved: int
    activations_layer: int
    loss_chunk: int
    dequantized_layer: int
    workspace: int

    @property
    def device_components(self) -> dict[str, int]:
        return {
            "base weights (quantized codes)": self.base_linear_codes,
            "quantization constants": self.base_quant_constants,
            "embeddings, norms, output head": self.embeddings_norms_head,
            "adapters": self.adapters,
            "adapter gradients": self.adapter_gradients,
            "optimizer state on device": self.optimizer_device,
            "activations kept across layers": self.activations_saved,
            "activations of one layer (fwd + bwd)": self.activations_layer,
            "output projection + loss chunk": self.loss_chunk,
            "dequantized weights of one layer": self.dequantized_layer,
            "workspace margin": self.workspace,
        }

    @property
    def device_peak_bytes(self) -> int:
        return sum(self.device_components.values())

    def fits(self, gpu_bytes: int) -> bool:
        return self.device_peak_bytes <= gpu_bytes

    @property
    def step_transient_bytes(self) -> int:
        """Device bytes the step allocates beyond the base, the adapters and the optimizer state.

        What a paged optimizer deciding at ``init`` (when the base and adapters are already on the
        device) must leave free: pass it as ``reserve_device_bytes`` to
        :func:`qlora_jax.optim.make_optimizer` / :func:`~qlora_jax.optim.offload_state`.
        """
        return (self.adapter_gradients + self.activations_saved + self.activations_layer + self.loss_chunk
                + self.dequantized_layer + self.workspace)


@dataclasses.dataclass(frozen=True)
class OptimizerStatePlan:
    """Where an optimizer's state lives and what it moves each step (bytes, per device)."""

    device_bytes: int  # on the device between steps
    device_transient_bytes: int  # on the device only while the update runs (copies of offloaded state)
    host_bytes: int  # in pinned host memory between steps
    to_device_bytes_per_step: int
    to_host_bytes_per_step: int


def plan_optimizer_state(
    state_bytes: int,
    *,
    on_host: bool,
    layer_state_bytes: int = 0,
    num_layers: int = 0,
    layers_per_chunk: int | None = 1,
    max_group_bytes: int = 0,
    global_bytes: int = 0,
) -> OptimizerStatePlan:
    """Bytes of an optimizer state kept on the device, or in host memory and streamed (see below).

    ``state_bytes``: the whole state; ``layer_state_bytes``: its part stacked over ``num_layers``
    layers; ``max_group_bytes``: the largest group of the other leaves; ``global_bytes``: the
    global leaves (step counters). On the device the update works in place (donated state).
    Offloaded (:func:`qlora_jax.optim.offload_state`), the layers move ``layers_per_chunk`` at a
    time (None: all at once) through a double-buffered loop that holds three chunks on the device
    (the one being updated, the next one arriving, the new state leaving) and re-reads the last
    chunk once; the groups move one at a time (old and new state on the device).
    """
    if not on_host:
        return OptimizerStatePlan(state_bytes, 0, 0, 0, 0)
    transient, to_device = global_bytes, state_bytes
    if layer_state_bytes:
        if num_layers < 1:
            raise ValueError("layer_state_bytes needs num_layers >= 1")
        per_chunk = layers_per_chunk or num_layers
        chunks = num_layers // per_chunk
        chunk_bytes = layer_state_bytes // chunks
        transient += 3 * chunk_bytes if chunks > 1 else 2 * chunk_bytes
        to_device += chunk_bytes if chunks > 1 else 0
    transient = max(transient, 2 * max_group_bytes + global_bytes)
    return OptimizerStatePlan(0, transient, state_bytes, to_device, state_bytes)


def _adapter_params(config: LlamaConfig, r: int, targets: tuple[str, ...], train_router: bool = False) -> int:
    """Trainable values: the LoRA pairs of ``targets`` (one per expert), plus the routers' copies."""
    shapes = config.linear_shapes()
    routers = config.num_hidden_layers * config.num_experts * config.hidden_size if train_router else 0
    return config.num_hidden_layers * sum(math.prod(config.expert_stack(n)) * r * (shapes[n][0] + shapes[n][1])
                                          for n in targets) + routers


def _base_bytes(config: LlamaConfig, quant: str, blocksize: int, double_quant: bool, base_bytes: int,
                base_dtype: str) -> tuple[int, int, int]:
    """The frozen base: ``(linear codes, their quantization constants, embeddings + norms + head)`` in bytes."""
    d, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    codes = constants = 0
    for name, shape in config.linear_shapes().items():
        report = storage_report_for(shape, quant if quant in ("nf4", "fp4", "int8") else base_dtype, blocksize,
                                    double_quant)
        copies = layers * math.prod(config.expert_stack(name))  # each expert quantized on its own
        codes += copies * report.codes_bytes
        constants += copies * (report.total_bytes - report.codes_bytes)
    norms = layers * sum(shape[0] for shape in config.layer_norm_shapes().values()) + d
    norms += layers * config.num_experts * d if config.is_moe else 0  # the 16-bit routers
    embed = v * d * base_bytes * (1 if config.tie_word_embeddings else 2) + norms * base_bytes
    return codes, constants, embed


def _adapter_bytes(config: LlamaConfig, lora_r: int, lora_targets: tuple[str, ...], lora_bytes: int, optim: str,
                   gradient_accumulation_steps: int, streamed_offload: bool,
                   train_router: bool) -> tuple[int, int, int, int]:
    """Adapters, gradients and optimizer state: ``(adapters, gradients, optimizer on device, optimizer on host)``."""
    params = _adapter_params(config, lora_r, lora_targets, train_router)
    adapters = params * lora_bytes
    # Gradients and the update, both in the adapters' dtype (qlora_jax.optim.updates_in_params_dtype),
    # and a float32 accumulator when accumulating.
    accumulator = params * 4 if gradient_accumulation_steps > 1 else 0
    grads = 2 * params * lora_bytes + accumulator
    if optim.endswith("8bit"):
        state = params * 2 + 2 * 4 * -(-params // 256)
    else:
        state = params * 8
    offloaded = optim.startswith("paged")
    state_plan = plan_optimizer_state(state, on_host=offloaded, layer_state_bytes=state,
                                      num_layers=config.num_hidden_layers,
                                      layers_per_chunk=1 if streamed_offload else None)
    return adapters, grads, state_plan.device_bytes + state_plan.device_transient_bytes, state_plan.host_bytes


def _activation_bytes(config: LlamaConfig, seq_len: int, batch: int, lora_r: int, lora_targets: tuple[str, ...],
                      act: int, remat: bool, loss_chunk: int) -> tuple[int, int, int]:
    """Activations: ``(saved across layers, one layer's peak in the backward, the loss chunk)`` in bytes."""
    d, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    h, q, kv = config.num_attention_heads, config.q_size, config.kv_size
    n = batch * seq_len
    # An MoE token passes through k experts: k rows of expert activations (and expert adapters).
    k = config.num_experts_per_tok if config.is_moe else 1
    r_total = lora_r * sum(k if config.expert_stack(n) else 1 for n in lora_targets)
    f = config.expert_intermediate_size
    moe_rows = (2 * k * d * act + 2 * config.num_experts * 4) if config.is_moe else 0  # sorted rows, outputs, router
    per_token = (
        4 * d * act            # norm inputs/outputs and residual stream values
        + 2 * d * 4            # RMSNorm float32 intermediates
        + (q + 2 * kv) * act   # q, k, v
        + (q + kv) * act       # rotated q, k
        + q * act              # attention output
        + 3 * k * f * act      # gate, up, silu(gate) * up (of each of the token's k experts)
        + r_total * act        # LoRA down-projections
        + moe_rows
    )
    attention = batch * h * seq_len * seq_len * (4 + act)  # scores (float32) and probabilities
    one_layer = n * per_token + attention
    if remat:
        saved = layers * n * d * act
        # The recomputed forward values and the cotangents of about half of them: the backward
        # pass frees each recomputed value once its cotangent is taken (XLA's buffer assignment
        # of the step, tests/test_memory.py, since no transposed copies of them are made).
        layer_peak = 3 * one_layer // 2
    else:
        saved = layers * one_layer
        layer_peak = one_layer
    chunk = min(loss_chunk, n)
    loss = chunk * v * 4 * 3 + n * d * 4  # logits, softmax, their cotangent; hidden-state cotangent
    return saved, layer_peak, loss


def plan_memory(
    config: LlamaConfig,
    *,
    seq_len: int,
    batch: int,
    lora_r: int = 64,
    lora_targets: tuple[str, ...] | None = None,
    quant: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    optim: str = "paged_adamw_32bit",
    remat: bool = True,
    compute_dtype: str = "bfloat16",
    base_dtype: str = "bfloat16",
    lora_dtype: str = "float32",
    gradient_accumulation_steps: int = 1,
    loss_chunk: int = 256,
    streamed_offload: bool = True,
    fused_dequant: bool = False,
    workspace_fraction: float = 0.05,
    train_router: bool = False,
) -> MemoryPlan:
    """Predicted device memory of one QLoRA training step (see the module docstring).

    ``quant``: "nf4"/"fp4"/"int8" or "bf16"/"float32" (unquantized base). ``optim``: the
    :func:`qlora_jax.optim.make_optimizer` name; "paged_*" offloads the state to host memory.
    ``fused_dequant``: the matmul kernel keeps no dequantized weight for the backward.
    ``lora_targets``: the adapted linear layers (None: every linear layer of the family).
    ``train_router``: a mixture of experts also trains its routers in full (FinetuneConfig's
    ``train_router``); their copies count as adapters.

    Raises:
      ValueError: ``train_router`` for a model without experts.
    """
    if train_router and not config.is_moe:
        raise ValueError(f"train_router: model_type {config.model_type!r} has no MoE routers to train "
                         "(only mixtures of experts such as Mixtral and Qwen3-MoE do)")
    if lora_targets is None:
        lora_targets = linear_layers(config)
    act = _DTYPE_BYTES[compute_dtype]
    codes, constants, embed = _base_bytes(config, quant, blocksize, double_quant, _DTYPE_BYTES[base_dtype],
                                          base_dtype)
    adapters, grads, optimizer_device, optimizer_host = _adapter_bytes(
        config, lora_r, lora_targets, _DTYPE_BYTES[lora_dtype], optim, gradient_accumulation_steps, streamed_offload,
        train_router)
    saved, layer_peak, loss = _activation_bytes(config, seq_len, batch, lora_r, lora_targets, act, remat, loss_chunk)
    # (The grouped expert matmul dequantizes one expert at a time and keeps none: count one expert.)
    weights_one_layer = sum(o * i for o, i in config.linear_shapes().values()) * act
    dequantized = 0 if (fused_dequant or quant not in ("nf4", "fp4", "int8")) else weights_one_layer

    subtotal = (codes + constants + embed + adapters + grads + optimizer_device + saved + layer_peak + loss
                + dequantized)
    return MemoryPlan(
        base_linear_codes=codes,
        base_quant_constants=constants,
        embeddings_norms_head=embed,
        adapters=adapters,
        adapter_gradients=grads,
        optimizer_device=optimizer_device,
        optimizer_host=optimizer_host,
        activations_saved=saved,
        activations_layer=layer_peak,
        loss_chunk=loss,
        dequantized_layer=dequantized,
        workspace=int(workspace_fraction * subtotal),
    )


def format_plan(plan: MemoryPlan, gpu_bytes: int | None = None, gpu_name: str | None = None) -> str:
    """A human-readable breakdown, largest first, and whether it fits."""
    lines = []
    for label, value in sorted(plan.device_components.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {label:<40} {value / GiB:9.2f} GiB")
    lines.append(f"  {'device peak':<40} {plan.device_peak_bytes / GiB:9.2f} GiB")
    lines.append(f"  {'optimizer state in pinned host memory':<40} {plan.optimizer_host / GiB:9.2f} GiB")
    if gpu_bytes:
        verdict = "fits" if plan.fits(gpu_bytes) else "does NOT fit"
        lines.append(f"  -> {verdict} on {gpu_name or ''} ({gpu_bytes / GiB:.0f} GiB), "
                     f"{(gpu_bytes - plan.device_peak_bytes) / GiB:+.2f} GiB to spare")
    return "\n".join(lines)
