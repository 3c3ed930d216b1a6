"""The optimizers a QLoRA recipe names, built from the pieces of this package.

================================  =========================================================
name                              optimizer
================================  =========================================================
``adamw``, ``adamw_32bit``        AdamW, float32 moments on the device
``paged_adamw``,                  the same as a paged optimizer (bitsandbytes' PagedAdamW32bit,
``paged_adamw_32bit``             qlora.py's default): state on the device when it fits, else
                                  in ``pinned_host`` memory, streamed per layer or group
``adamw_8bit``                    8-bit AdamW (bitsandbytes' AdamW8bit), per-layer blocks
``paged_adamw_8bit``              8-bit AdamW as a paged optimizer
================================  =========================================================

Every one is ``chain(clip_by_global_norm(max_grad_norm), X)`` where ``X`` is the AdamW chain,
wrapped in :func:`~qlora_jax.optim.offload_state` for the paged ones (clipping stays outside: it
needs the norm over all parameters; ``placement`` is its policy, ``"auto"`` by default). The 8-bit
ones always see one layer at a time (:func:`~qlora_jax.optim.per_layer`), so paged and unpaged
8-bit give the same numbers. The state is optax's own tree in every case, e.g. for
``paged_adamw``: ``(EmptyState(), (ScaleByAdamState(count, mu, nu), ...))``.
"""

from __future__ import annotations

import optax

from qlora_jax.optim import quantized_moments as qm
from qlora_jax.optim import streaming
from qlora_jax.optim.adamw import adamw, adamw_8bit
from qlora_jax.optim.masks import MaskLike, decay_mask
from qlora_jax.optim.offload import FreeBytes, Placement, measure_free_device_bytes, offload_state
from qlora_jax.optim.schedules import warmup_constant_schedule
from qlora_jax.quant.blockwise import BnbBackend

__all__ = ["OPTIMIZER_NAMES", "make_optimizer"]

OPTIMIZER_NAMES = ("adamw", "adamw_32bit", "paged_adamw", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit")


def make_optimizer(
    name: str,
    learning_rate: optax.ScalarOrSchedule,
    *,
    warmup_steps: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 0.3,
    weight_decay_mask: MaskLike = decay_mask,
    stacked: streaming.Stacked = streaming.layer_stacked,
    bnb_backend: BnbBackend = "cuda",
    min_8bit_size: int = qm.MIN_8BIT_SIZE,
    placement: str | Placement = "auto",
    free_device_bytes: FreeBytes = measure_free_device_bytes,
    reserve_device_bytes: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The optimizer ``name`` (see the module docstring) with QLoRA's defaults.

    ``learning_rate``: a float (then ``warmup_steps`` of linear warmup from 0, then constant) or an
    optax schedule (then ``warmup_steps`` must be 0: put the warmup in the schedule).
    ``max_grad_norm``: clip by global norm (paper: 0.3); None or 0 disables. ``weight_decay``
    applies to the leaves ``weight_decay_mask`` selects (default: not biases or norms).
    ``stacked``: which leaves carry a leading layer axis (default: those under a "layers" key).
    ``bnb_backend``, ``min_8bit_size``: 8-bit only, see :func:`~qlora_jax.optim.scale_by_adam_8bit`.
    ``placement``, ``free_device_bytes``, ``reserve_device_bytes``: paged only, see
    :func:`~qlora_jax.optim.offload_state` (``reserve_device_bytes``: e.g.
    ``qlora_jax.memory.plan_memory(...).step_transient_bytes``).

    Args:
      name: one of ``OPTIMIZER_NAMES``: ``"adamw"``/``"adamw_32bit"`` (float32 moments),
        ``"adamw_8bit"`` (blockwise 8-bit moments), and their ``"paged_"`` variants (state offloaded
        to pinned host memory when it does not fit on the device).
      learning_rate: a non-negative float or an optax schedule.
      warmup_steps: steps of linear warmup for a float ``learning_rate`` (0 with a schedule).
      b1: exponential decay rate of the first moment.
      b2: exponential decay rate of the second moment.
      eps: added to the square root of the second moment.
      weight_decay: decoupled weight decay (non-negative).
      max_grad_norm: global-norm clipping threshold; ``None`` or 0 disables clipping.
      weight_decay_mask: which leaves decay (see :func:`~qlora_jax.optim.as_mask_fn`).
      stacked: ``(path, leaf) -> bool``, which leaves carry a leading layer axis.
      bnb_backend: 8-bit only: ``"cuda"`` or ``"cpu"`` rounding.
      min_8bit_size: 8-bit only: leaves with fewer values keep float32 moments.
      placement: paged only: ``"auto"``, a placement name, or a :class:`~qlora_jax.optim.Placement`.
      free_device_bytes: paged only: free device memory in bytes, or a callable measuring it.
      reserve_device_bytes: paged only: bytes to leave free for the step's transients, or ``None``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``: clipping (when enabled) chained with the AdamW
      core; updates in the parameters' dtypes.

    Raises:
      ValueError: an unknown ``name``, ``warmup_steps`` with a schedule, a negative
        ``max_grad_norm``, ``placement`` on a non-paged optimizer, or a bad setting of the core.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023 (paged optimizers, the defaults).
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021.
      Loshchilov and Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    if callable(learning_rate):
        if warmup_steps:
            raise ValueError("warmup_steps only applies to a float learning_rate; put the warmup in your schedule")
        schedule = learning_rate
    else:
        schedule = warmup_constant_schedule(float(learning_rate), warmup_steps)
    if max_grad_norm is not None and max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be positive (or None/0 to disable), got {max_grad_norm}")

    common = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask)
    if name.endswith("8bit"):
        core = adamw_8bit(schedule, **common, bnb_backend=bnb_backend, min_8bit_size=min_8bit_size)
    else:
        core = adamw(schedule, **common)
    if name.startswith("paged_"):
        core = offload_state(core, placement=placement, elementwise=not name.endswith("8bit"), stacked=stacked,
                             free_device_bytes=free_device_bytes, reserve_device_bytes=reserve_device_bytes)
    elif placement != "auto":
        raise ValueError(f"placement applies to the paged optimizers only, not {name!r}")
    elif name.endswith("8bit"):
        core = streaming.per_layer(core, stacked=stacked)

    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    return optax.with_extra_args_support(optax.chain(*parts, core))
