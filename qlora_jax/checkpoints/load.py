"""Checkpoint -> frozen base pytree, quantizing tensor by tensor.

Reads a Hugging Face folder (single or sharded safetensors, including bitsandbytes 4-bit
checkpoints saved by transformers) or a GGUF file and builds the ``base`` pytree of
:mod:`qlora_jax.models.llama`. The plan of what a model with ``config.json`` consumes is matched
with the file's tensors before anything is read, and every tensor goes through one validation
pass (:class:`~qlora_jax.checkpoints.validate.CheckedSource`: shape, dtype, finite, consumed),
so a checkpoint is either loaded whole and as stored, or refused naming what is wrong. Each
linear weight is read, quantized and written into its layer-stacked buffer before the next is
read, so host memory peaks near one 16-bit tensor plus the quantized model. Pre-quantized bitsandbytes weights are
taken as they are (no re-quantization).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import re
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.gguf_io import GGUFCheckpoint
from qlora_jax.checkpoints.safetensors_io import SafetensorsFolder
from qlora_jax.checkpoints.validate import CheckedSource, TensorSource, validate_hf_config
from qlora_jax.models import layout, moe
from qlora_jax.models.config import LlamaConfig, UnsupportedArchitectureError
from qlora_jax.models.layout import hf_global_key
from qlora_jax.quant import QuantConfig, QuantizationError, QuantizedTensor, bnb_format, dequantize, quantize

__all__ = ["LayerStacker", "LoadStats", "TensorSource", "open_checkpoint", "load_base_params", "read_config",
           "hf_global_key"]

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class LoadStats:
    """What loading cost.

    Attributes:
      seconds: wall time of the load.
      base_bytes: bytes of the loaded base.
      largest_tensor_bytes: bytes of the largest tensor read.
      peak_tracked_bytes: bytes of the arrays the loader held at once, at most.
      rss_increase_bytes: growth of the process's resident memory.
      prequantized: linear weights taken as stored in bitsandbytes 4-bit.
      requantized: linear weights quantized while loading.
    """

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


def open_checkpoint(path: str | pathlib.Path) -> tuple[TensorSource, dict[str, Any]]:
    """The tensor source and the transformers config dict of a folder or a ``.gguf`` file.

    The config is checked (:func:`~qlora_jax.checkpoints.validate.validate_hf_config`) and the
    files' headers read, so that a bad folder fails here, before any tensor is read.

    Args:
      path: a Hugging Face folder or a ``.gguf`` file.

    Returns:
      ``(source, cfg)``: a :class:`TensorSource` and the config dict.

    Raises:
      CheckpointError: a missing or malformed folder, file, header or config, naming it.
    """
    path = pathlib.Path(path)
    if path.is_file() and path.suffix == ".gguf":
        source = GGUFCheckpoint(path)
        return source, validate_hf_config(source.config_dict(), f"{path} (config from its GGUF metadata)")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json")
    try:
        cfg = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
    return SafetensorsFolder(path), validate_hf_config(cfg, config_file)


def read_config(cfg: dict[str, Any], origin: str | pathlib.Path = "config.json") -> LlamaConfig:
    """The :class:`LlamaConfig` of a transformers config dict.

    Args:
      cfg: the ``config.json`` dict.
      origin: names it in error messages.

    Returns:
      The :class:`~qlora_jax.models.config.LlamaConfig`.

    Raises:
      CheckpointError: a bad or unsupported field, naming ``origin`` and the field.
    """
    validate_hf_config(cfg, origin)
    try:
        return LlamaConfig.from_hf_dict(cfg)
    except UnsupportedArchitectureError as err:
        raise UnsupportedArchitectureError(f"{origin}: {err}") from err
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{origin}: {err}") from err


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(buffer, value, index):
    return jax.lax.dynamic_update_index_in_dim(buffer, value.astype(buffer.dtype), index, axis=0)


class LayerStacker:
    """Layer-stacked device buffers filled one layer at a time (donated, so updated in place).

    Args:
      num_layers: the leading (layer) dimension of every buffer.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.buffers: dict[str, Any] = {}

    def put(self, name: str, layer: int, value: Any) -> None:
        """Writes ``value`` (an array or a pytree of arrays) as layer ``layer`` of buffer ``name``."""
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


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor the model consumes: its key, the shape config.json implies, and where it goes.

    ``slot``: a :attr:`~qlora_jax.models.layout.TensorSpec.slot` ("embed_tokens",
    "layers/self_attn/q_proj/weight", ...; per-layer ones stacked over ``layer``), or
    "tied_lm_head" (a stored copy of a tied head, checked equal to the embeddings).
    ``linear``: a linear weight, quantized here or taken pre-quantized. ``expert_keys``: an MoE
    layer's expert matrix, one tensor per expert on disk (``key`` is expert 0's), each quantized on
    its own and stacked over an expert axis. ``fused``: transformers 5's fused expert layout, one
    ``[E, out, in]`` tensor: 0/1 for the gate/up half of ``mlp.experts.gate_up_proj``, 2 for the
    whole tensor (``mlp.experts.down_proj``).
    """

    key: str
    shape: tuple[int, ...]
    slot: str
    layer: int | None = None
    linear: bool = False
    expert_keys: tuple[str, ...] = ()
    fused: int | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """Every checkpoint tensor this entry reads."""
        return self.expert_keys or (self.key,)


def _plan(config: LlamaConfig, source: CheckedSource, prefix: str) -> list[_Entry]:
    """Every tensor a model with ``config`` consumes, in the order they are read (from the one
    tensor table, :func:`qlora_jax.models.layout.tensor_table`)."""
    table = layout.tensor_table(config)
    plan = [_Entry(spec.hf_key(prefix=prefix), spec.shape, spec.slot) for spec in table if not spec.layered]
    head = hf_global_key("lm_head")
    if config.tie_word_embeddings and head in source:
        plan.append(_Entry(head, (config.vocab_size, config.hidden_size), "tied_lm_head"))
    for layer in range(config.num_hidden_layers):
        # transformers 5's in-memory MoE names (mlp.gate, mlp.experts.gate_up_proj [E, 2I, D] with the gate
        # rows first, mlp.experts.down_proj [E, D, I]), for files written from them.
        fused_prefix = f"{prefix}layers.{layer}.mlp"
        fused = config.is_moe and f"{fused_prefix}.experts.gate_up_proj" in source
        for spec in table:
            if fused and spec.experts:
                e, (out, inp) = spec.experts, spec.shape
                if spec.module == "down_proj":
                    plan.append(_Entry(f"{fused_prefix}.experts.down_proj", (e, out, inp), spec.slot, layer,
                                       linear=True, fused=2))
                else:
                    plan.append(_Entry(f"{fused_prefix}.experts.gate_up_proj", (e, 2 * out, inp), spec.slot, layer,
                                       linear=True, fused=config.family.mlp_layers.index(spec.module)))
            elif fused and spec.path[-2:] == ("gate", "weight"):
                plan.append(_Entry(f"{fused_prefix}.gate.weight", spec.shape, spec.slot, layer))
            elif spec.experts:
                keys = tuple(spec.expert_keys(layer, prefix=prefix))
                plan.append(_Entry(keys[0], spec.shape, spec.slot, layer, linear=spec.linear, expert_keys=keys))
            elif spec.layered:
                plan.append(_Entry(spec.hf_key(layer, prefix=prefix), spec.shape, spec.slot, layer,
                                   linear=spec.linear))
    return plan


def _check_expert_count(config: LlamaConfig, source: CheckedSource, prefix: str) -> None:
    """An MoE checkpoint holding experts past ``num_experts`` is refused naming the tensor and the
    config field, before the generic unused-tensor error."""
    if not config.is_moe:
        return
    module = config.family.moe_module
    field = "num_local_experts" if config.model_type == "mixtral" else "num_experts"
    pattern = re.compile(rf"{re.escape(prefix)}layers\.(\d+)\.{re.escape(module)}\.experts\.(\d+)\.")
    for key in source.keys():
        match = pattern.match(key)
        if match and int(match.group(2)) >= config.num_experts:
            raise CheckpointError(f"{source.where(key)}: expert tensor {key!r} exists but config.json has {field} = "
                                  f"{config.num_experts}")



class _TensorReader:
    """Reads the plan's tensors one at a time, quantizing linear weights as they arrive, and counts
    what loading holds: the quantized bytes so far, the largest tensor read, the peak of the two
    together, and how many weights were taken pre-quantized or quantized here."""

    def __init__(self, checked: CheckedSource, quant: QuantConfig, stored_aux: dict[str, list[str]]):
        self.checked, self.quant, self.stored_aux = checked, quant, stored_aux
        self.dtype = jnp.dtype(quant.dtype)
        self.quantized_bytes = self.largest_bytes = self.peak_bytes = 0
        self.prequantized = self.requantized = 0
        self.kept_as_stored: set[str] = set()

    def read(self, entry: _Entry) -> Any:
        """One plan entry's value: a fused expert slice, stacked experts, a linear weight or a dense tensor."""
        if entry.fused is not None:
            return self.read_fused(entry)
        if entry.expert_keys:
            return self.read_experts(entry)
        return self.read_linear(entry) if entry.linear else jnp.asarray(self.read_dense(entry)).astype(self.dtype)

    def _hold(self, qt: Any) -> None:
        self.quantized_bytes += sum(x.nbytes for x in jax.tree.leaves(qt))

    def read_dense(self, entry: _Entry) -> np.ndarray:
        value = self.checked.read(entry.key, entry.shape)
        self.largest_bytes = max(self.largest_bytes, value.nbytes)
        self.peak_bytes = max(self.peak_bytes, self.quantized_bytes + value.nbytes)
        return value

    def read_prequantized(self, entry: _Entry) -> QuantizedTensor:
        checked, quant = self.checked, self.quant
        tensors = {entry.key: checked.read(entry.key, kind="bytes")}
        tensors.update({k: checked.read(k, kind="state") for k in self.stored_aux[entry.key]})
        try:
            qt = bnb_format.from_bnb_state_dict(tensors, entry.key)
        except QuantizationError as err:
            raise CheckpointError(f"{checked.where(entry.key)}: bitsandbytes weight {entry.key!r}: {err}") from err
        if tuple(qt.shape) != tuple(entry.shape):
            raise CheckpointError(f"{checked.where(entry.key)}: tensor {entry.key!r} has shape {list(qt.shape)} "
                                  f"(its quant state) but config.json implies {list(entry.shape)}")
        if quant.quantized and qt.quant_type != quant.quant:
            raise CheckpointError(
                f"{checked.where(entry.key)}: {entry.key!r} is stored as bitsandbytes {qt.quant_type}, but quant="
                f"{quant.quant!r} was asked: load it with quant={qt.quant_type!r} (kept as stored), or a 16-bit quant "
                f"to dequantize it; re-quantizing 4-bit weights would compound two rounding errors")
        if (qt.blocksize, qt.double_quant) != (quant.blocksize, quant.double_quant):
            self.kept_as_stored.add(f"blocksize {qt.blocksize}, double_quant={qt.double_quant}")
        return qt

    def read_linear(self, entry: _Entry) -> Any:
        quant = self.quant
        if self.stored_aux[entry.key]:
            qt = self.read_prequantized(entry)
            self.prequantized += 1
            if not quant.quantized:
                return dequantize(qt, self.dtype)
            self._hold(qt)
            return jax.tree.map(jnp.asarray, qt)
        value = self.read_dense(entry)
        if not quant.quantized:
            return jnp.asarray(value).astype(self.dtype)
        qt = quantize(value, quant.quant, blocksize=quant.blocksize, double_quant=quant.double_quant,
                      bnb_backend=quant.bnb_backend, check_finite=False)  # CheckedSource checked it
        self.requantized += 1
        self._hold(qt)
        return qt

    def read_fused(self, entry: _Entry) -> Any:
        quant = self.quant
        value = self.read_dense(entry)  # [E, 2I, D] or [E, D, I], checked against config.json
        if entry.fused in (0, 1):
            half = value.shape[1] // 2
            value = value[:, entry.fused * half:(entry.fused + 1) * half]
        if not quant.quantized:
            return jnp.asarray(value).astype(self.dtype)
        qt = moe.quantize_experts(value, quant.quant, blocksize=quant.blocksize, double_quant=quant.double_quant,
                                  bnb_backend=quant.bnb_backend)
        self.requantized += value.shape[0]
        self._hold(qt)
        return qt

    def read_experts(self, entry: _Entry) -> Any:
        # One expert at a time (as bitsandbytes quantizes one Linear4bit per expert), then stacked.
        experts = [self.read_linear(dataclasses.replace(entry, key=key, expert_keys=())) for key in entry.expert_keys]
        kinds = {type(x).__name__ for x in experts}
        if len(kinds) > 1 or (isinstance(experts[0], QuantizedTensor)
                              and len({jax.tree.structure(x) for x in experts}) > 1):
            raise CheckpointError(f"{self.checked.origin}: the experts {entry.expert_keys[0]!r}... are stored in "
                                  "different formats (some 4-bit, some 16-bit); mixed quantization formats are not "
                                  "supported")
        return jax.tree.map(lambda *xs: jnp.stack(xs), *experts)


def load_base_params(
    source: TensorSource,
    config: LlamaConfig,
    quant: QuantConfig = QuantConfig(),
    *,
    prefix: str = "model.",
) -> tuple[dict[str, Any], LoadStats]:
    """The frozen ``base`` pytree (see :mod:`qlora_jax.models.llama`) and what loading it cost.

    Every tensor is read through a :class:`~qlora_jax.checkpoints.validate.CheckedSource`: the
    file's tensor names are matched with what ``config`` implies before anything is read, and each
    tensor is checked for shape, dtype and finite values as it is read. A linear weight stored in
    bitsandbytes' 4-bit format is taken as it is (its quant state checked against its tensors).

    Args:
      source: the checkpoint's tensors (:func:`open_checkpoint`).
      config: the model config.
      quant: how the linear weights are stored; a bitsandbytes 4-bit weight must be of the asked
        ``quant.quant`` type, or is dequantized when ``quant`` is 16/32-bit.
      prefix: the checkpoint keys' prefix before ``layers.N...`` (``"model."`` for transformers).

    Returns:
      ``(base, stats)``: the base pytree (layers stacked ``[L, ...]``) and its :class:`LoadStats`.

    Raises:
      CheckpointError: missing or unused tensors (listed), a tensor of the wrong shape or dtype or
        with non-finite values, or a 4-bit weight of another type than asked.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
    """
    started, rss_before = time.perf_counter(), _rss_bytes()
    checked = source if isinstance(source, CheckedSource) else CheckedSource(source, getattr(source, "path",
                                                                                             "checkpoint"))
    plan = _plan(config, checked, prefix)
    _check_expert_count(config, checked, prefix)
    # bitsandbytes' tensors beside a linear weight mark it pre-quantized; they are part of the plan.
    stored_aux = {key: [k for k in bnb_format.auxiliary_keys(key) if k in checked]
                  for e in plan if e.linear for key in e.keys}
    checked.expect([k for e in plan for k in e.keys] + [k for keys in stored_aux.values() for k in keys],
                   num_layers=config.num_hidden_layers)
    checked.check_derived(config)

    reader = _TensorReader(checked, quant, stored_aux)
    globals_: dict[str, Any] = {}
    stacker = LayerStacker(config.num_hidden_layers)
    for entry in plan:
        value = reader.read(entry)
        if entry.layer is not None:
            stacker.put(entry.slot, entry.layer, value)
        elif entry.slot == "tied_lm_head":
            if not bool(jnp.array_equal(value, globals_["embed_tokens"])):
                raise CheckpointError(
                    f"{checked.origin}: config.json says tie_word_embeddings=true, but {entry.key!r} differs from "
                    f"{hf_global_key('embed_tokens', prefix=prefix)!r}; set tie_word_embeddings=false if the head "
                    "is its own matrix")
        else:
            globals_[entry.slot] = value
    checked.check_all_consumed()
    if reader.kept_as_stored:
        log.warning("%s: kept %d pre-quantized weights as stored (%s) although blocksize=%d, double_quant=%s was "
                    "asked: bitsandbytes weights are never re-quantized", checked.origin, reader.prequantized,
                    "; ".join(sorted(reader.kept_as_stored)), quant.blocksize, quant.double_quant)

    base = layout.base_from_table(config, {**globals_, **stacker.buffers})

    base_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
    stats = LoadStats(
        seconds=time.perf_counter() - started,
        base_bytes=base_bytes,
        largest_tensor_bytes=reader.largest_bytes,
        peak_tracked_bytes=max(reader.peak_bytes, base_bytes),
        rss_increase_bytes=max(0, _rss_bytes() - rss_before),
        prequantized=reader.prequantized,
        requantized=reader.requantized,
    )
    return base, stats
