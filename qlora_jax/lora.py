"""LoRA adapters: configuration, PEFT-compatible initialisation, and the adapter pytree.

An adapter on a linear layer ``y = x @ W.T`` adds ``scaling * dropout(x) @ A.T @ B.T`` with
``A: [r, in]`` and ``B: [out, r]`` (PEFT's ``lora_A.weight`` / ``lora_B.weight`` orientation) and
``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA). As in PEFT, ``A`` starts
Kaiming-uniform and ``B`` at zero, so a fresh adapter changes nothing.

Nothing here knows a model's layer names: which layers ``target_modules`` selects is the model's
business (:func:`qlora_jax.models.layout.lora_targets` for the LLaMA family).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["LoraConfig", "ADAPTER_DTYPES", "MODULES_TO_SAVE", "init_lora_pair"]

ADAPTER_DTYPES = ("float32", "bfloat16", "float16")
# A target_modules string made of names and commas only is a list of names ("q_proj,v_proj");
# any other string is a regular expression (PEFT's meaning of a string).
_NAME_LIST = re.compile(r"[\w\s,]+")
# The modules PEFT's ``modules_to_save`` may name here: the MoE router only (``mlp.gate``, trained
# in full, 16-bit, beside the adapters).
MODULES_TO_SAVE = ("gate",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyperparameters (qlora.py's defaults: r=64, alpha=16).

    ``target_modules``: ``"all-linear"`` (every linear layer but the output head), names of linear
    layers (a tuple, or one comma-separated string such as ``"q_proj,v_proj"``), or a regular
    expression matched in full against module names such as ``model.layers.3.self_attn.q_proj``
    (PEFT's meaning of a string ``target_modules``). ``dtype``: storage dtype of A and B; None
    follows the model's compute dtype (bfloat16 adapters on a bfloat16 model, as the QLoRA paper
    trains), "float32" keeps PEFT's float32 adapters. The matmuls run in the compute dtype either
    way, and AdamW keeps float32 moments for 16-bit adapters.

    Attributes:
      r: rank of the adapters (positive).
      alpha: LoRA alpha; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA),
        see :attr:`scaling`.
      dropout: dropout probability on the adapter's input, in ``[0, 1)``.
      target_modules: which linear layers get adapters (see above); a name list string is stored
        as a tuple of names.
      use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA) instead of ``alpha / r``.
      dtype: storage dtype of A and B, one of ``ADAPTER_DTYPES`` or ``None`` (the compute dtype).
      modules_to_save: modules trained in full beside the adapters (PEFT's ``modules_to_save``):
        ``("gate",)`` trains the MoE routers (``mlp.gate``, ``[num_experts, hidden]`` per layer,
        stored in ``dtype``'s dtype as the adapters are, initialised from the base's routers);
        ``()`` trains adapters only. The router is the only module allowed (a mixture-of-experts
        model is needed, :func:`qlora_jax.models.layout.lora_targets` checks it).

    Raises:
      ValueError: a non-positive ``r``, ``dropout`` outside ``[0, 1)``, an unknown ``dtype``, an
        invalid regular expression, no target module, or a ``modules_to_save`` naming anything but
        the router ``gate``.

    References:
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021.
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
      Kalajdzievski, `A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA
      <https://arxiv.org/abs/2312.03732>`_, 2023 (rsLoRA).
    """

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    use_rslora: bool = False
    dtype: str | None = None
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.dtype is not None and self.dtype not in ADAPTER_DTYPES:
            raise ValueError(f"LoRA dtype must be one of {ADAPTER_DTYPES} or None (the compute dtype), "
                             f"got {self.dtype!r}")
        targets = self.target_modules
        if isinstance(targets, str) and targets != "all-linear":
            if _NAME_LIST.fullmatch(targets):
                targets = tuple(m.strip() for m in targets.split(",") if m.strip())
            else:
                try:
                    re.compile(targets)
                except re.error as err:
                    raise ValueError(f"LoRA target_modules {targets!r} is not a valid regular expression: "
                                     f"{err}") from None
        elif not isinstance(targets, str):
            targets = tuple(targets)
        if not targets:
            raise ValueError("LoRA needs at least one target module")
        object.__setattr__(self, "target_modules", targets)
        saved = self.modules_to_save
        saved = (saved,) if isinstance(saved, str) else tuple(saved or ())
        others = [m for m in saved if m not in MODULES_TO_SAVE]
        if others:
            raise ValueError(f"LoRA modules_to_save={list(saved)}: qlora-jax trains in full only the MoE router "
                             f"{list(MODULES_TO_SAVE)} (PEFT's modules_to_save=['gate']), not {others}")
        object.__setattr__(self, "modules_to_save", tuple(dict.fromkeys(saved)))

    @property
    def train_router(self) -> bool:
        """Whether the MoE routers train in full (``"gate"`` in :attr:`modules_to_save`)."""
        return "gate" in self.modules_to_save

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_peft_config(self, targets: Sequence[str], base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` for these adapters on the modules ``targets`` (short names)."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(targets),
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": list(self.modules_to_save) or None,
            "use_dora": False,
        }

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any]) -> LoraConfig:
        """Reads PEFT's ``adapter_config.json``; refuses adapter features we do not implement."""
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type={cfg.get('peft_type')!r}")
        for key, unsupported in (("use_dora", True), ("fan_in_fan_out", True)):
            if cfg.get(key) == unsupported:
                raise ValueError(f"PEFT adapter uses {key}={unsupported}, which qlora-jax does not support")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ValueError("PEFT adapter uses rank_pattern/alpha_pattern, which qlora-jax does not support")
        targets = cfg.get("target_modules") or "all-linear"
        if targets == "all_linear":
            targets = "all-linear"
        return cls(
            r=int(cfg["r"]),
            alpha=float(cfg.get("lora_alpha", cfg["r"])),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            use_rslora=bool(cfg.get("use_rslora", False)),
            modules_to_save=tuple(cfg.get("modules_to_save") or ()),
        )


def init_lora_pair(key: jax.Array, shape: tuple[int, int], r: int, dtype: Any, leading: Sequence[int] = ()):
    """PEFT's initialisation of one adapter for a linear layer of ``shape`` ``[out, in]``.

    Returns ``{"lora_A": [*leading, r, in], "lora_B": [*leading, out, r]}``. A is
    ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(in), 1/sqrt(in)); B is zero.

    Args:
      key: PRNG key for A.
      shape: ``(out_features, in_features)`` of the layer's weight.
      r: the adapter's rank.
      dtype: storage dtype of A and B (A is drawn in float32, then cast).
      leading: leading dimensions, e.g. ``(num_layers,)`` for scanned layers.

    Returns:
      ``{"lora_A": [*leading, r, in], "lora_B": [*leading, out, r]}`` in ``dtype``.

    References:
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021.
    """
    out_features, in_features = shape
    bound = 1.0 / math.sqrt(in_features)
    a = jax.random.uniform(key, (*leading, r, in_features), jnp.float32, -bound, bound).astype(dtype)
    b = jnp.zeros((*leading, out_features, r), dtype)
    return {"lora_A": a, "lora_B": b}
