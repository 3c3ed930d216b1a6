"""``ModelSpec``: the one static description of a LLaMA-family model as it runs.

The architecture (:class:`~qlora_jax.models.config.LlamaConfig`), the adapters'
hyperparameters, whether the base itself is trained, the compute dtype, per-layer
rematerialisation and the kernel backend of the quantized matmuls: everything that shapes the
compiled computation and is not an array. It is frozen and hashable, so it is a static argument
of ``jax.jit``; :class:`~qlora_jax.model.CausalLM`, the decoder
(:func:`qlora_jax.models.llama.forward`), the training step and generation all take it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qlora_jax.kernels import BACKENDS
from qlora_jax.lora import LoraConfig
from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig

__all__ = ["ModelSpec"]

COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What runs: architecture, adapters, dtypes, remat and kernels (hashable; a static jit argument).

    Attributes:
      config: the architecture (:class:`~qlora_jax.models.config.LlamaConfig`).
      lora_config: adapter hyperparameters; None for a model without adapters (or for full
        finetuning, where the base is what trains).
      full_finetune: the base itself trains (then ``lora_config`` must be None).
      compute_dtype: dtype of activations and matmul inputs, one of ``COMPUTE_DTYPES``.
      remat: recompute each layer's activations in the backward pass.
      kernel_backend: how quantized matmuls run (:data:`qlora_jax.kernels.BACKENDS`; "auto" picks per
        op, platform and size).
      loss_chunk: tokens per chunk of the output projection + cross-entropy in training (positive).
      expert_mesh: for mixture-of-experts models, a mesh whose ``expert`` axis splits the experts
        (expert parallelism, :func:`qlora_jax.models.moe.moe_block`); None computes every expert on
        each device.

    Raises:
      ValueError: an unknown ``compute_dtype`` or ``kernel_backend``, adapters with
        ``full_finetune``, a non-positive ``loss_chunk``, or a ``target_modules`` that selects no layer.
    """

    config: LlamaConfig
    lora_config: LoraConfig | None = None
    full_finetune: bool = False
    compute_dtype: str = "bfloat16"
    remat: bool = False
    kernel_backend: str = "auto"
    loss_chunk: int = 256
    expert_mesh: jax.sharding.Mesh | None = None

    def __post_init__(self):
        dtype = jnp.dtype(self.compute_dtype).name
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        object.__setattr__(self, "compute_dtype", dtype)
        if self.kernel_backend not in BACKENDS:
            raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {self.kernel_backend!r}")
        if self.full_finetune and self.lora_config is not None:
            raise ValueError("full finetuning trains the base itself: pass lora_config=None")
        if self.loss_chunk <= 0:
            raise ValueError(f"loss_chunk must be positive, got {self.loss_chunk}")
        if self.expert_mesh is not None:
            self._check_expert_mesh()
        if self.lora_config is not None:
            self.lora_targets  # noqa: B018 -- resolve now, so a bad target_modules fails here, not mid-trace

    def _check_expert_mesh(self) -> None:
        """An expert mesh needs an MoE model whose experts split over its ``expert`` axis."""
        mesh, config = self.expert_mesh, self.config
        if "expert" not in mesh.axis_names:
            raise ValueError(f"expert_mesh has no 'expert' axis (axes: {mesh.axis_names})")
        if not config.is_moe:
            raise ValueError("an 'expert' mesh axis needs a mixture-of-experts model (Mixtral, Qwen3-MoE); "
                             f"this model has model_type {config.model_type!r}")
        if config.num_experts % mesh.shape["expert"]:
            raise ValueError(f"num_experts = {config.num_experts} is not divisible by the 'expert' mesh axis "
                             f"({mesh.shape['expert']} devices)")

    @functools.cached_property
    def lora_targets(self) -> tuple[str, ...]:
        """The adapted linear layers (names of :data:`~qlora_jax.models.layout.LINEAR_LAYERS`)."""
        if self.lora_config is None:
            return ()
        return layout.lora_targets(self.lora_config, self.config)

    @property
    def train_router(self) -> bool:
        """Whether the MoE routers are trainable (``lora_config.modules_to_save`` names ``"gate"``): the
        trainable pytree then holds them as ``{"layers": {"mlp": {"gate": {"weight": [L, E, hidden]}}}}``
        and the forward reads them instead of the frozen base's."""
        return self.lora_config is not None and self.lora_config.train_router

    @property
    def adapter_dtype(self) -> str:
        """Storage dtype of fresh adapters: the LoRA config's, else the compute dtype."""
        if self.lora_config is not None and self.lora_config.dtype is not None:
            return self.lora_config.dtype
        return self.compute_dtype
