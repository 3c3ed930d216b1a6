"""Checkpoint -> frozen base pytree, quantizing tensor by tensor.

Reads a Hugging Face folder (single or sharded safetensors, including bitsandbytes 4-bit
checkpoints saved by transformers) or a GGUF file, checks every tensor against ``config.json``,
and builds the ``base`` pytree of :mod:`qlora_jax.models.llama`. Each linear weight is read,
quantized and written into its layer-stacked buffer before the next is read, so host memory
peaks near one 16-bit tensor plus the quantized model. Pre-quantized bitsandbytes weights are
taken as they are (no re-quantization).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import resource
import time
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.gguf_io import GGUFCheckpoint
from qlora_jax.checkpoints.safetensors_io import SafetensorsFolder
from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig
from qlora_jax.quant import QuantizedTensor, bnb_format, dequantize, quantize

__all__ = ["QuantConfig", "LoadStats", "TensorSource", "open_checkpoint", "load_base_params", "read_config"]

QUANT_MODES = ("nf4", "fp4", "int8", "bf16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How the frozen linear weights are stored.

    ``quant``: "nf4", "fp4", "int8" (blockwise quantized) or "bf16"/"float16"/"float32"
    (unquantized, for the paper's 16-bit baselines and full finetuning). Embeddings, norms and
    ``lm_head`` stay in ``dtype``, as bitsandbytes leaves them.
    """

    quant: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    dtype: str = "bfloat16"
    bnb_backend: str = "cuda"

    def __post_init__(self):
        if self.quant not in QUANT_MODES:
            raise ValueError(f"unsupported quant {self.quant!r}: expected one of {QUANT_MODES}")

    @property
    def quantized(self) -> bool:
        return self.quant in ("nf4", "fp4", "int8")


@dataclasses.dataclass(frozen=True)
class LoadStats:
    """What loading cost. Bytes; ``peak_tracked_bytes`` counts the arrays the loader held at once."""

    seconds: float
    base_bytes: int
    largest_tensor_bytes: int
    peak_tracked_bytes: int
    rss_increase_bytes: int
    prequantized: int
    requantized: int

    def summary(self) -> str:
        mb = 1 / 2**20
        return (
            f"loaded in {self.seconds:.1f} s: frozen base {self.base_bytes * mb:.1f} MiB; host peak while loading "
            f"{self.peak_tracked_bytes * mb:.1f} MiB tracked (largest 16/32-bit tensor "
            f"{self.largest_tensor_bytes * mb:.1f} MiB), process RSS +{self.rss_increase_bytes * mb:.1f} MiB; "
            f"{self.prequantized} pre-quantized weights kept, {self.requantized} quantized here"
        )


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def __contains__(self, key: str) -> bool: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> np.ndarray: ...


def open_checkpoint(path: str | pathlib.Path) -> tuple[TensorSource, dict[str, Any]]:
    """The tensor source and the transformers config dict of a folder or a ``.gguf`` file."""
    import json

    path = pathlib.Path(path)
    if path.is_file() and path.suffix == ".gguf":
        source = GGUFCheckpoint(path)
        return source, source.config_dict()
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
    return SafetensorsFolder(path), cfg


def read_config(cfg: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig.from_hf_dict(cfg)


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(buffer, value, index):
    return jax.lax.dynamic_update_index_in_dim(buffer, value.astype(buffer.dtype), index, axis=0)


class _Stacker:
    """Layer-stacked device buffers filled one layer at a time (donated, so updated in place)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.buffers: dict[str, Any] = {}

    def put(self, name: str, layer: int, value: Any) -> None:
        if name not in self.buffers:
            self.buffers[name] = jax.tree.map(
                lambda x: jnp.zeros((self.num_layers, *x.shape), x.dtype), value
            )
        stacked = self.buffers[name]
        if jax.tree.structure(stacked) != jax.tree.structure(value):
            raise CheckpointError(
                f"layer {layer}: {name} is stored differently from layer 0 ({value!r} vs {stacked!r}); "
                "mixed quantization formats across layers are not supported"
            )
        self.buffers[name] = jax.tree.map(lambda buf, x: _set_layer(buf, jnp.asarray(x), layer), stacked, value)


def _expect_shape(source: TensorSource, key: str, expected: tuple[int, ...]) -> None:
    shape = source.shape(key)
    if tuple(shape) != tuple(expected):
        raise CheckpointError(
            f"tensor {key!r} has shape {list(shape)} but config.json implies {list(expected)}"
        )


def _prequantized_type(source: TensorSource, key: str) -> str | None:
    for quant_type in ("nf4", "fp4"):
        if f"{key}.quant_state.bitsandbytes__{quant_type}" in source:
            return quant_type
    return None


def _read_prequantized(source: TensorSource, key: str, expected: tuple[int, ...]) -> QuantizedTensor:
    keys = [k for k in source.keys() if k == key or k.startswith(key + ".")]
    try:
        qt = bnb_format.from_bnb_state_dict({k: source.get(k) for k in keys}, key)
    except ValueError as err:
        raise CheckpointError(f"bitsandbytes weight {key!r}: {err}") from err
    if tuple(qt.shape) != tuple(expected):
        raise CheckpointError(f"tensor {key!r} has shape {list(qt.shape)} but config.json implies {list(expected)}")
    return qt


def load_base_params(
    source: TensorSource,
    config: LlamaConfig,
    quant: QuantConfig = QuantConfig(),
    *,
    prefix: str = "model.",
) -> tuple[dict[str, Any], LoadStats]:
    """The frozen ``base`` pytree (see :mod:`qlora_jax.models.llama`) and what loading it cost."""
    started, rss_before = time.perf_counter(), _rss_bytes()
    dtype = jnp.dtype(quant.dtype)
    held = {"quantized": 0, "largest": 0, "peak": 0}
    counts = {"prequantized": 0, "requantized": 0}

    def read_dense(key: str, expected: tuple[int, ...]) -> np.ndarray:
        _expect_shape(source, key, expected)
        value = source.get(key)
        held["largest"] = max(held["largest"], value.nbytes)
        held["peak"] = max(held["peak"], held["quantized"] + value.nbytes)
        return value

    def to_dtype(value: np.ndarray) -> jax.Array:
        return jnp.asarray(value).astype(dtype)

    def read_linear(key: str, expected: tuple[int, ...]) -> Any:
        stored_type = _prequantized_type(source, key)
        if stored_type is not None:
            qt = _read_prequantized(source, key, expected)
            counts["prequantized"] += 1
            if not quant.quantized:
                return dequantize(qt, dtype)
            held["quantized"] += sum(x.nbytes for x in jax.tree.leaves(qt))
            return jax.tree.map(jnp.asarray, qt)
        value = read_dense(key, expected)
        if not np.all(np.isfinite(np.asarray(value, np.float32))):
            raise CheckpointError(f"tensor {key!r} holds NaN or Inf values")
        if not quant.quantized:
            return to_dtype(value)
        qt = quantize(value, quant.quant, blocksize=quant.blocksize, double_quant=quant.double_quant,
                      bnb_backend=quant.bnb_backend, check_finite=False)
        counts["requantized"] += 1
        held["quantized"] += sum(x.nbytes for x in jax.tree.leaves(qt))
        return qt

    d = config.hidden_size
    base: dict[str, Any] = {
        "embed_tokens": to_dtype(read_dense(f"{prefix}embed_tokens.weight", (config.vocab_size, d))),
        "norm": to_dtype(read_dense(f"{prefix}norm.weight", (d,))),
    }
    if not config.tie_word_embeddings:
        key = "lm_head.weight"
        if key not in source:
            raise CheckpointError(f"checkpoint is missing tensor {key!r} (config.json says tie_word_embeddings=false)")
        base["lm_head"] = to_dtype(read_dense(key, (config.vocab_size, d)))

    stacker = _Stacker(config.num_hidden_layers)
    shapes = config.linear_shapes()
    for layer in range(config.num_hidden_layers):
        for norm in layout.LAYER_NORMS:
            stacker.put(norm, layer, to_dtype(read_dense(layout.hf_key(layer, norm, prefix=prefix), (d,))))
        for name in layout.LINEAR_LAYERS:
            stacker.put(f"{name}.weight", layer, read_linear(layout.hf_key(layer, name, prefix=prefix), shapes[name]))
            if config.linear_has_bias(name):
                bias = read_dense(layout.hf_key(layer, name, "bias", prefix=prefix), (shapes[name][0],))
                stacker.put(f"{name}.bias", layer, to_dtype(bias))

    linears = {}
    for name in layout.LINEAR_LAYERS:
        linears[name] = {"weight": stacker.buffers[f"{name}.weight"]}
        if config.linear_has_bias(name):
            linears[name]["bias"] = stacker.buffers[f"{name}.bias"]
    base = layout.assemble_base(embed_tokens=base["embed_tokens"], norm=base["norm"], lm_head=base.get("lm_head"),
                                layer_norms={n: stacker.buffers[n] for n in layout.LAYER_NORMS}, linears=linears)

    base_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
    stats = LoadStats(
        seconds=time.perf_counter() - started,
        base_bytes=base_bytes,
        largest_tensor_bytes=held["largest"],
        peak_tracked_bytes=max(held["peak"], base_bytes),
        rss_increase_bytes=max(0, _rss_bytes() - rss_before),
        prequantized=counts["prequantized"],
        requantized=counts["requantized"],
    )
    return base, stats
