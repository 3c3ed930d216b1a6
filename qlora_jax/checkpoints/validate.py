"""One validation pass over everything read from a checkpoint: its tensors and its ``config.json``.

:class:`CheckedSource` wraps a tensor source (a safetensors folder, a GGUF file, a PEFT adapter
file) and is the only way the loaders read tensors. Every read is checked before its data is used:

* **shape**: the shape in the file's header (before any data is read) is the one ``config.json``
  implies;
* **dtype**: values that should be numbers (weights, embeddings, norms, biases, adapters) are
  floating point; an integer tensor there is refused, with what it probably is;
* **finite**: no NaN or Inf in any floating-point tensor, whatever its role (quantization scales,
  nested scales and code tables included);

and every read is recorded. :meth:`CheckedSource.expect` compares the file's tensor names with
those the model consumes *before* anything is read (missing tensors and tensors the model has no
use for, such as layers beyond ``num_hidden_layers``, listed by name), and
:meth:`CheckedSource.check_all_consumed` makes sure after loading that every tensor in the file
was read: nothing in a checkpoint is silently ignored.

The only tensors a checkpoint may hold that are not part of the model are listed in
:data:`DERIVED_TENSORS`. They are not ignored either: each is read and compared with the value
the config implies, so a checkpoint whose extra buffer disagrees with its config is refused.

:func:`validate_hf_config` checks the fields of a transformers ``config.json`` (types, ranges,
rotary scaling, quantization method) and names the file, the field and what was expected.
"""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.models.config import LlamaConfig

__all__ = ["TensorSource", "CheckedSource", "DERIVED_TENSORS", "FLOAT_DTYPES", "validate_hf_config", "name_list"]

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class TensorSource(Protocol):
    """Read access to a checkpoint's tensors by key (what the loaders need of a file format)."""

    def keys(self) -> list[str]: ...
    def __contains__(self, key: str) -> bool: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> np.ndarray: ...


def _rotary_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    from qlora_jax.models.rope import inverse_frequencies

    return inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling_dict)


# Tensors a checkpoint may hold besides the model's parameters: pattern -> (why, the value the
# config implies). Each is read and compared with that value, never skipped unseen.
DERIVED_TENSORS: dict[str, tuple[str, Callable[[LlamaConfig], np.ndarray]]] = {
    r"(?:.+\.)?rotary_emb\.inv_freq": (
        "rotary inverse frequencies: a buffer that transformers before 4.31 saved with Llama weights "
        "(persistent=True) and that the decoder recomputes from rope_theta and rope_scaling",
        _rotary_inverse_frequencies,
    ),
}

# What an integer tensor found where numbers are expected most likely is.
_DTYPE_HINTS = {
    "uint8": "packed 4-bit codes without their bitsandbytes quant state? the tensor "
             "'{key}.quant_state.bitsandbytes__nf4' (or __fp4) that says how to decode them is missing",
    "int8": "bitsandbytes 8-bit (LLM.int8) checkpoints are not supported; load the 16-bit original",
}


def name_list(names: Iterable[str], limit: int = 8) -> str:
    """Names for an error message, the first ``limit`` of them.

    Args:
      names: the names.
      limit: how many to show.

    Returns:
      ``'a', 'b', ... (and N more)``.
    """
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _layer_hint(keys: Iterable[str], num_layers: int | None) -> str:
    if num_layers is None:
        return ""
    beyond = sorted({int(m.group(1)) for k in keys if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", k))
                     and int(m.group(1)) >= num_layers})
    if not beyond:
        return ""
    span = str(beyond[0]) if len(beyond) == 1 else f"{beyond[0]}-{beyond[-1]}"
    return f"; layer(s) {span} are beyond num_hidden_layers={num_layers}"


class CheckedSource:
    """A :class:`TensorSource` whose every read is validated and recorded (see the module docstring).

    Args:
      source: the tensors read.
      origin: names the checkpoint in error messages; a source with a ``file_of(key)`` method (a
        sharded folder) has the file holding each tensor named instead.
      shapes_from: names what the expected shapes come from.
    """

    def __init__(self, source: TensorSource, origin: str | pathlib.Path, *, shapes_from: str = "config.json"):
        self.source = source
        self.origin = str(origin)
        self.shapes_from = shapes_from
        self._consumed: set[str] = set()

    def keys(self) -> list[str]:
        return self.source.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.source

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.source.shape(key))

    def where(self, key: str) -> str:
        """The file holding ``key``, for messages."""
        file_of = getattr(self.source, "file_of", None)
        return str(file_of(key)) if file_of is not None and key in self.source else self.origin

    @property
    def consumed(self) -> frozenset[str]:
        """The keys read so far."""
        return frozenset(self._consumed)

    def read(self, key: str, shape: tuple[int, ...] | None = None, *, kind: str = "values") -> np.ndarray:
        """The tensor ``key``, validated: shape (checked from the header, before reading), dtype, finite.

        ``kind``: "values" (numbers: floating point and finite), "state" (quantization state:
        any dtype, floating-point ones finite) or "bytes" (packed codes, whatever dtype they are
        stored under: not interpreted here).
        """
        if kind not in ("values", "state", "bytes"):
            raise ValueError(f"kind must be 'values', 'state' or 'bytes', got {kind!r}")
        if key not in self.source:
            raise CheckpointError(f"{self.origin} is missing tensor {key!r}")
        if shape is not None:
            stored = self.shape(key)
            if stored != tuple(shape):
                raise CheckpointError(f"{self.where(key)}: tensor {key!r} has shape {list(stored)} but "
                                      f"{self.shapes_from} implies {list(shape)}")
        value = np.asarray(self.source.get(key))
        dtype = value.dtype.name
        if dtype in FLOAT_DTYPES and kind != "bytes":
            _check_finite(value, f"{self.where(key)}: tensor {key!r}")
        elif kind == "values" and dtype not in FLOAT_DTYPES:
            hint = _DTYPE_HINTS.get(dtype, "").format(key=key)
            raise CheckpointError(f"{self.where(key)}: tensor {key!r} is {dtype}{list(value.shape)}; expected "
                                  f"floating-point values ({', '.join(FLOAT_DTYPES[:3])})"
                                  + (f" ({hint})" if hint else ""))
        self._consumed.add(key)
        return value

    def expect(self, keys: Iterable[str], *, num_layers: int | None = None) -> None:
        """Before reading: the file holds every key in ``keys`` and nothing else (but :data:`DERIVED_TENSORS`).

        Raises :class:`CheckpointError` listing the missing or unexpected tensors by name.
        """
        wanted = list(dict.fromkeys(keys))
        expected = set(wanted)
        missing = [k for k in wanted if k not in self.source]
        if missing:
            noun = "tensor" if len(missing) == 1 else f"{len(missing)} tensors:"
            raise CheckpointError(f"{self.origin} is missing {noun} {name_list(missing)}")
        extra = [k for k in self.source.keys() if k not in expected and _derived(k) is None]
        if extra:
            raise CheckpointError(
                f"{self.origin} holds {len(extra)} tensor(s) that a model with this config does not use: "
                f"{name_list(extra)}{_layer_hint(extra, num_layers)}. Nothing in a checkpoint is ignored: "
                "fix config.json or remove those tensors")

    def check_derived(self, config: LlamaConfig) -> None:
        """Reads every :data:`DERIVED_TENSORS` tensor in the file and compares it with what ``config`` implies."""
        for key in self.source.keys():
            entry = _derived(key)
            if entry is None:
                continue
            why, expected_fn = entry
            stored = self.read(key)
            expected = np.asarray(expected_fn(config))
            # The buffer may have been saved in the model's 16-bit dtype: allow its rounding.
            info = np.finfo(stored.dtype)
            close = stored.shape == expected.shape and np.allclose(
                stored.astype(np.float64), expected, rtol=4 * float(info.eps), atol=float(info.smallest_normal))
            if not close:
                raise CheckpointError(
                    f"{self.where(key)}: tensor {key!r} ({why}) disagrees with config.json: it holds "
                    f"{np.asarray(stored, np.float64).ravel()[:4].tolist()}... of shape {list(stored.shape)}, the "
                    f"config implies {expected.ravel()[:4].tolist()}... of shape {list(expected.shape)} "
                    "(rope_theta, rope_scaling or head_dim wrong?)")

    def check_all_consumed(self) -> None:
        """After loading: every tensor in the file was read; raises listing those that were not."""
        unread = [k for k in self.source.keys() if k not in self._consumed]
        if unread:
            raise CheckpointError(f"{self.origin}: {len(unread)} tensor(s) in the file were never used: "
                                  f"{name_list(unread)}")


def _derived(key: str) -> tuple[str, Callable[[LlamaConfig], np.ndarray]] | None:
    for pattern, entry in DERIVED_TENSORS.items():
        if re.fullmatch(pattern, key):
            return entry
    return None


def _check_finite(value: np.ndarray, what: str) -> None:
    finite = np.isfinite(value)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise CheckpointError(f"{what} holds {len(bad)} NaN or Inf value(s) (the first at index {first}); "
                              "a checkpoint must hold finite values")


# ------------------------------------------------------------------------------------------ config.json


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _nonnegative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _token_ids(value: Any) -> bool:
    return _nonnegative_int(value) or (isinstance(value, list) and bool(value) and all(map(_nonnegative_int, value)))


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive int": (_positive_int, "a positive integer"),
    "token id": (_nonnegative_int, "a token id (an integer >= 0)"),
    "token ids": (_token_ids, "a token id or a non-empty list of token ids"),
    "positive number": (_positive_number, "a positive finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, Mapping), "a JSON object"),
    "layer types": (lambda v: isinstance(v, list) and all(t in ("full_attention", "sliding_attention") for t in v),
                    'a list of "full_attention" / "sliding_attention"'),
}

# field -> (kind, required). Optional fields may also be null.
CONFIG_FIELDS: dict[str, tuple[str, bool]] = {
    "model_type": ("string", True),
    "vocab_size": ("positive int", True),
    "hidden_size": ("positive int", True),
    "intermediate_size": ("positive int", True),
    "num_hidden_layers": ("positive int", True),
    "num_attention_heads": ("positive int", True),
    "num_key_value_heads": ("positive int", False),
    "head_dim": ("positive int", False),
    "max_position_embeddings": ("positive int", False),
    "sliding_window": ("positive int", False),
    "rms_norm_eps": ("positive number", False),
    "rope_theta": ("positive number", False),
    "tie_word_embeddings": ("bool", False),
    "attention_bias": ("bool", False),
    "mlp_bias": ("bool", False),
    "use_sliding_window": ("bool", False),
    "hidden_act": ("string", False),
    "rope_scaling": ("object", False),
    "rope_parameters": ("object", False),
    "quantization_config": ("object", False),
    "attn_logit_softcapping": ("positive number", False),
    "final_logit_softcapping": ("positive number", False),
    "query_pre_attn_scalar": ("positive number", False),
    "rope_local_base_freq": ("positive number", False),
    "layer_types": ("layer types", False),
    "bos_token_id": ("token id", False),
    "pad_token_id": ("token id", False),
    "eos_token_id": ("token ids", False),
}

# Rotary scaling types the decoder implements, and the fields each needs.
ROPE_SCALING_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _describe(value: Any) -> str:
    return f"{value!r:.60} ({type(value).__name__})"


def validate_hf_config(cfg: Any, origin: str | pathlib.Path) -> dict[str, Any]:
    """Checks a transformers ``config.json`` dict before it is used.

    Every field the decoder reads (:data:`CONFIG_FIELDS`) has the right type and range, the head
    counts divide, rotary scaling is one the decoder implements (:data:`ROPE_SCALING_FIELDS`) with
    its fields, and a ``quantization_config`` is bitsandbytes 4-bit. (Whether the architecture is
    supported is :class:`~qlora_jax.models.config.LlamaConfig`'s check.)

    Args:
      cfg: the parsed ``config.json``.
      origin: names it in error messages.

    Returns:
      ``cfg``, unchanged.

    Raises:
      CheckpointError: naming ``origin``, the field and what was expected.
    """
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{origin}: expected a JSON object of model settings, got {type(cfg).__name__}")
    for field, (kind, required) in CONFIG_FIELDS.items():
        check, expected = _KINDS[kind]
        if field not in cfg or cfg[field] is None:
            if required:
                raise CheckpointError(f"{origin}: missing field {field!r} (expected {expected})")
            continue
        if not check(cfg[field]):
            raise CheckpointError(f"{origin}: field {field!r} is {_describe(cfg[field])}; expected {expected}")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise CheckpointError(f"{origin}: field 'num_attention_heads' ({heads}) must be a multiple of "
                              f"'num_key_value_heads' ({kv_heads})")
    if not cfg.get("head_dim") and cfg["hidden_size"] % heads:
        raise CheckpointError(f"{origin}: field 'hidden_size' ({cfg['hidden_size']}) is not a multiple of "
                              f"'num_attention_heads' ({heads}) and no 'head_dim' is given")
    _validate_rope(cfg, origin)
    _validate_quantization(cfg.get("quantization_config"), origin)
    return dict(cfg)


def _validate_rope(cfg: Mapping[str, Any], origin: str | pathlib.Path, field: str | None = None) -> None:
    parameters = cfg.get("rope_parameters") or {}
    if field is None and {"full_attention", "sliding_attention"} & set(parameters):
        # transformers 5's per-layer-type RoPE (Gemma 3): each checked on its own.
        for layer_type, sub in parameters.items():
            if not isinstance(sub, Mapping):
                raise CheckpointError(f"{origin}: field 'rope_parameters.{layer_type}' is {_describe(sub)}; "
                                      "expected a JSON object")
            _validate_rope({"rope_parameters": sub}, origin, f"rope_parameters.{layer_type}")
        return
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    field = field or key
    scaling = {k: v for k, v in (cfg.get(key) or {}).items() if k not in ("rope_theta", "partial_rotary_factor")}
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and not _positive_number(theta):
        raise CheckpointError(f"{origin}: field '{field}.rope_theta' is {_describe(theta)}; expected a "
                              "positive finite number")
    if not scaling:
        return
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_SCALING_FIELDS:
        raise CheckpointError(f"{origin}: field {field!r} has rope_type {rope_type!r}; the decoder implements "
                              f"{', '.join(ROPE_SCALING_FIELDS)}")
    for name in ROPE_SCALING_FIELDS[rope_type]:
        if not _positive_number(scaling.get(name)):
            raise CheckpointError(f"{origin}: field '{field}.{name}' is {_describe(scaling.get(name))}; "
                                  f"rope_type {rope_type!r} needs a positive finite number")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise CheckpointError(f"{origin}: field {field!r} needs high_freq_factor > low_freq_factor, got "
                              f"{scaling['high_freq_factor']} and {scaling['low_freq_factor']}")


def _validate_quantization(quantization: Mapping[str, Any] | None, origin: str | pathlib.Path) -> None:
    if quantization is None:
        return
    method = quantization.get("quant_method")
    if method != "bitsandbytes" or quantization.get("load_in_8bit") or not quantization.get("load_in_4bit", True):
        raise CheckpointError(
            f"{origin}: field 'quantization_config' describes {method!r} "
            f"{'8-bit' if quantization.get('load_in_8bit') else ''} weights; qlora-jax reads bitsandbytes 4-bit "
            "checkpoints (load_in_4bit) and unquantized ones")
