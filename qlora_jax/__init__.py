"""qlora-jax: QLoRA (4-bit NormalFloat base, double quantization, LoRA adapters) in JAX.

``qlora_jax.load_pretrained(path, quant="nf4")`` (or ``quant=QuantConfig(...)``) gives a model
and its tokenizer; every stage (``quant``, ``kernels``, ``models``, ``optim``, ``data``, ``train``,
``training_state``, ``distributed``, ``recipe``) is importable on its own. The names below are
imported on first use, so that ``import qlora_jax.quant`` (numpy and jax only) does not pull in flax,
safetensors or tokenizers.
"""

from __future__ import annotations

import importlib
import pathlib
from typing import Any

__version__ = "0.1.0"

# From a source tree (a clone on PYTHONPATH, Bazel's runfiles), the top-level kernels/ and
# experiments/ folders are this package's `kernels` and `experiments` subpackages, as an installed
# wheel has them (pyproject.toml's package-dir): the repository root joins the package's path.
_SOURCE_ROOT = pathlib.Path(__file__).resolve().parent.parent
if (_SOURCE_ROOT / "kernels" / "ops.py").is_file() and not (pathlib.Path(__file__).parent / "kernels").exists():
    __path__.append(str(_SOURCE_ROOT))

# Public name -> the module that defines it.
_LAZY = {
    "CausalLM": "qlora_jax.model",
    "load_pretrained": "qlora_jax.model",
    "load_quantized": "qlora_jax.checkpoints.orbax_format",
    "save_quantized": "qlora_jax.checkpoints.orbax_format",
    "ModelSpec": "qlora_jax.models.spec",
    "LoraConfig": "qlora_jax.lora",
    "QuantConfig": "qlora_jax.quant",
    "QuantizationError": "qlora_jax.quant",
    "QuantizedTensor": "qlora_jax.quant",
    "dequantize": "qlora_jax.quant",
    "quantize": "qlora_jax.quant",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qlora_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
