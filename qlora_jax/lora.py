"""LoRA adapters: configuration, PEFT-compatible initialisation, and the adapter pytree.

An adapter on a linear layer ``y = x @ W.T`` adds ``scaling * dropout(x) @ A.T @ B.T`` with
``A: [r, in]`` and ``B: [out, r]`` (PEFT's ``lora_A.weight`` / ``lora_B.weight`` orientation) and
``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA). As in PEFT, ``A`` starts
Kaiming-uniform and ``B`` at zero, so a fresh adapter changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["LoraConfig", "ALL_LINEAR", "init_lora_pair", "module_group"]

# Every linear layer of a LLaMA decoder layer (lm_head excluded, as PEFT's "all-linear").
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_group(name: str) -> str:
    """The Hugging Face submodule a linear layer lives in: "self_attn" or "mlp"."""
    return "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyperparameters (qlora.py's defaults: r=64, alpha=16).

    ``target_modules``: "all-linear" or names among :data:`ALL_LINEAR`. ``dtype``: storage dtype of
    A and B; float32 by default, as PEFT keeps adapters of a bf16 base in float32; the matmuls run
    in the model's compute dtype either way.
    """

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    use_rslora: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            object.__setattr__(self, "target_modules", tuple(m.strip() for m in self.target_modules.split(",") if m))
        if not isinstance(self.target_modules, str):
            unknown = [m for m in self.target_modules if m not in ALL_LINEAR]
            if unknown:
                raise ValueError(f"unknown LoRA target modules {unknown}; choose among {ALL_LINEAR} or 'all-linear'")
            if not self.target_modules:
                raise ValueError("LoRA needs at least one target module")

    @property
    def targets(self) -> tuple[str, ...]:
        """The targeted linear layers, in :data:`ALL_LINEAR` order."""
        if self.target_modules == "all-linear":
            return ALL_LINEAR
        return tuple(m for m in ALL_LINEAR if m in self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_peft_config(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` for these adapters."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(self.targets),
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "use_dora": False,
        }

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any]) -> "LoraConfig":
        """Reads PEFT's ``adapter_config.json``; refuses adapter features we do not implement."""
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type={cfg.get('peft_type')!r}")
        for key, unsupported in (("use_dora", True), ("fan_in_fan_out", True)):
            if cfg.get(key) == unsupported:
                raise ValueError(f"PEFT adapter uses {key}={unsupported}, which qlora-jax does not support")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ValueError("PEFT adapter uses rank_pattern/alpha_pattern, which qlora-jax does not support")
        targets = cfg.get("target_modules") or "all-linear"
        if isinstance(targets, str):
            targets = "all-linear" if targets in ("all-linear", "all_linear") else tuple(targets.split(","))
        return cls(
            r=int(cfg["r"]),
            alpha=float(cfg.get("lora_alpha", cfg["r"])),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            use_rslora=bool(cfg.get("use_rslora", False)),
        )


def init_lora_pair(key: jax.Array, shape: tuple[int, int], r: int, dtype: Any, leading: Sequence[int] = ()):
    """PEFT's initialisation of one adapter for a linear layer of ``shape`` ``[out, in]``.

    Returns ``{"lora_A": [*leading, r, in], "lora_B": [*leading, out, r]}``. A is
    ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(in), 1/sqrt(in)); B is zero.
    """
    out_features, in_features = shape
    bound = 1.0 / math.sqrt(in_features)
    a = jax.random.uniform(key, (*leading, r, in_features), jnp.float32, -bound, bound).astype(dtype)
    b = jnp.zeros((*leading, out_features, r), dtype)
    return {"lora_A": a, "lora_B": b}
