"""Optimizers for QLoRA: AdamW (32- and 8-bit) and host-offloaded ("paged") optimizer state.

Small optax pieces, one idea per module:

* :mod:`~qlora_jax.optim.adamw`: ``adamw``, ``adamw_8bit`` (no clipping; clip before them).
* :mod:`~qlora_jax.optim.adam8bit`: ``scale_by_adam_8bit``, Adam with blockwise 8-bit moments.
* :mod:`~qlora_jax.optim.quantized_moments`: the 8-bit moment encoding (bitsandbytes' layout).
* :mod:`~qlora_jax.optim.masks`: which leaves weight decay applies to.
* :mod:`~qlora_jax.optim.schedules`: Hugging Face's schedules (constant, linear, cosine; warmup).
* :mod:`~qlora_jax.optim.streaming`: run a transform a layer (or leaf group) at a time, state in optax's layout.
* :mod:`~qlora_jax.optim.offload`: ``offload_state``, the paged optimizer: state on the device when it fits,
  streamed through ``pinned_host`` memory when not (``placement="auto"``).
* :mod:`~qlora_jax.optim.memory_kinds`: memory kinds per backend.
* :mod:`~qlora_jax.optim.shardings`: the state's shardings follow the parameters'.
* :mod:`~qlora_jax.optim.jit`: ``jit_train_step`` / ``check_donation`` (jax 0.11's donation abort).
* :mod:`~qlora_jax.optim.factory`: ``make_optimizer("paged_adamw_8bit", ...)`` for recipes.

Typical use::

    optimizer = make_optimizer("paged_adamw_32bit", learning_rate=2e-4, warmup_steps=30)
    opt_state = optimizer.init(lora_params)            # placement "auto": logged, device or pinned_host
    train_step = jit_train_step(make_train_step(spec, optimizer), opt_state, donate_argnums=(0, 1))
"""

from qlora_jax.optim.adam8bit import ScaleByAdam8bitState, scale_by_adam_8bit
from qlora_jax.optim.adamw import adamw, adamw_8bit, scale_by_adam_float32, updates_in_params_dtype
from qlora_jax.optim.factory import OPTIMIZER_NAMES, make_optimizer
from qlora_jax.optim.jit import DonationError, TrainStep, check_donation, jit_train_step
from qlora_jax.optim.masks import as_mask_fn, decay_mask, decays
from qlora_jax.optim.memory_kinds import (
    bytes_by_memory_kind,
    memory_kinds,
    refresh_host_avals,
    supports_memory_kind,
    tree_memory_kinds,
)
from qlora_jax.optim.offload import PLACEMENTS, Placement, choose_placement, measure_free_device_bytes, offload_state
from qlora_jax.optim.schedules import SCHEDULE_TYPES, lr_schedule, warmup_constant_schedule
from qlora_jax.optim.shardings import state_shardings, tree_shardings
from qlora_jax.optim.streaming import StateLayout, layer_stacked, no_layers, per_layer, state_layout

__all__ = [
    "OPTIMIZER_NAMES",
    "PLACEMENTS",
    "SCHEDULE_TYPES",
    "DonationError",
    "Placement",
    "ScaleByAdam8bitState",
    "StateLayout",
    "TrainStep",
    "adamw",
    "adamw_8bit",
    "as_mask_fn",
    "bytes_by_memory_kind",
    "check_donation",
    "choose_placement",
    "decay_mask",
    "decays",
    "jit_train_step",
    "layer_stacked",
    "lr_schedule",
    "make_optimizer",
    "measure_free_device_bytes",
    "memory_kinds",
    "no_layers",
    "offload_state",
    "per_layer",
    "refresh_host_avals",
    "scale_by_adam_8bit",
    "scale_by_adam_float32",
    "state_layout",
    "state_shardings",
    "supports_memory_kind",
    "tree_memory_kinds",
    "tree_shardings",
    "updates_in_params_dtype",
    "warmup_constant_schedule",
]
