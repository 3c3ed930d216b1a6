"""Lossless conversion between QuantizedTensor and bitsandbytes' serialized 4-bit format.

bitsandbytes (and transformers' ``save_pretrained`` of a 4-bit model) stores a quantized weight
``W`` under its key ``<name>`` as:

* ``<name>``: uint8 ``[(numel + 1) // 2, 1]``, two codes per byte, element 2j in the high nibble;
* ``<name>.absmax``: float32 ``[num_blocks]``, or uint8 codes with double quantization;
* ``<name>.quant_map``: float32 ``[16]``, the 4-bit code table;
* ``<name>.nested_absmax``, ``<name>.nested_quant_map``: float32, with double quantization;
* ``<name>.quant_state.bitsandbytes__<nf4|fp4>``: uint8 bytes of a JSON object with
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, with double quantization,
  ``nested_blocksize``, ``nested_dtype``, ``nested_offset``.

Our byte layout is bitsandbytes', so the conversion only reshapes: nothing is re-quantized.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from qlora_jax.quant import codebooks
from qlora_jax.quant.tensor import QuantizationError, QuantizedTensor, codes_shape, scales_shape

__all__ = ["to_bnb_state_dict", "from_bnb_state_dict", "bnb_quant_state_keys", "is_bnb_4bit_key", "auxiliary_keys"]

_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def bnb_quant_state_keys(name: str, quant_type: str, double_quant: bool) -> list[str]:
    """The state-dict keys bitsandbytes writes for a 4-bit weight stored under ``name``.

    Args:
      name: the weight's key, e.g. ``"model.layers.0.mlp.up_proj.weight"``.
      quant_type: ``"nf4"`` or ``"fp4"``.
      double_quant: whether the scales are double-quantized (adds the nested keys).

    Returns:
      The keys, the packed weight's first and the quant-state JSON's last.
    """
    keys = [name, f"{name}.absmax", f"{name}.quant_map"]
    if double_quant:
        keys += [f"{name}.nested_absmax", f"{name}.nested_quant_map"]
    keys.append(f"{name}.quant_state.bitsandbytes__{quant_type}")
    return keys


def is_bnb_4bit_key(key: str) -> bool:
    """Whether ``key`` is one of the auxiliary quant-state keys (not the packed weight itself).

    Args:
      key: a state-dict key.

    Returns:
      ``bool``.
    """
    return any(key.endswith("." + s) for s in _SUFFIXES) or ".quant_state.bitsandbytes__" in key


def to_bnb_state_dict(qt: QuantizedTensor, name: str) -> dict[str, np.ndarray]:
    """bitsandbytes' serialized tensors for ``qt`` stored under ``name`` (numpy arrays).

    Loading the result with ``bitsandbytes.functional.QuantState.from_dict`` gives back exactly
    our values. Int8 tensors have no bitsandbytes 4-bit form and raise QuantizationError.

    Args:
      qt: an NF4 or FP4 QuantizedTensor.
      name: the weight's key.

    Returns:
      ``{key: numpy array}``: uint8 codes ``[ceil(numel / 2), 1]`` under ``name``, the scales
      (float32, or uint8 with double quantization) ``[num_blocks]``, the float32 code tables, and
      the quant state as a uint8 array of its JSON bytes.

    Raises:
      QuantizationError: an int8 tensor, or one whose arrays disagree with its metadata.
    """
    if qt.quant_type not in ("nf4", "fp4"):
        raise QuantizationError(f"bitsandbytes' 4-bit format holds nf4 or fp4, not {qt.quant_type}")
    qt.validate()
    out = {
        name: np.asarray(qt.codes).reshape(-1, 1),
        f"{name}.absmax": np.asarray(qt.scales).reshape(-1),
        f"{name}.quant_map": codebooks.codebook(qt.quant_type).copy(),
    }
    meta: dict[str, Any] = {
        "quant_type": qt.quant_type,
        "blocksize": qt.blocksize,
        "dtype": qt.dtype,
        "shape": list(qt.shape),
    }
    if qt.double_quant:
        out[f"{name}.nested_absmax"] = np.asarray(qt.nested_scales).reshape(-1)
        out[f"{name}.nested_quant_map"] = codebooks.DYNAMIC_MAP_SIGNED.copy()
        meta.update(
            nested_blocksize=qt.nested_blocksize,
            nested_dtype="float32",
            nested_offset=float(np.asarray(qt.offset)),
        )
    out[f"{name}.quant_state.bitsandbytes__{qt.quant_type}"] = np.frombuffer(
        json.dumps(meta).encode("utf-8"), dtype=np.uint8
    ).copy()
    return out


def _get(tensors: Mapping[str, Any], key: str) -> np.ndarray:
    if key not in tensors:
        raise QuantizationError(f"bitsandbytes 4-bit weight is missing tensor {key!r}")
    return np.asarray(tensors[key])


def _meta_field(meta: Mapping[str, Any], field: str, state_key: str, kind: type, *, positive: bool = False) -> Any:
    """``meta[field]`` of a quant state JSON, checked: present and of ``kind`` (int, float or list)."""
    if field not in meta:
        raise QuantizationError(f"{state_key!r}: the quant state has no field {field!r}")
    value = meta[field]
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool) and (not positive or value > 0)
    if not ok:
        expected = {float: "a finite number", list: "a list", int: "a positive integer" if positive else "an integer"}
        raise QuantizationError(f"{state_key!r}: quant state field {field!r} is {value!r}; expected {expected[kind]}")
    return value


def _check_scales(array: np.ndarray, key: str) -> None:
    # absmax values are absolute maxima of blocks: finite and >= 0 (NaN fails both tests).
    bad = ~(np.isfinite(array) & (array >= 0))
    if bad.any():
        first = array.reshape(-1)[np.argmax(bad.reshape(-1))]
        raise QuantizationError(f"{key!r} holds {int(bad.sum())} value(s) that are not finite and >= 0 (the first "
                                f"is {first!r}); absmax scales are block maxima")


def auxiliary_keys(name: str) -> tuple[str, ...]:
    """Every key bitsandbytes may write besides the packed weight ``name`` (both quant types).

    Args:
      name: the weight's key.

    Returns:
      A tuple of keys.
    """
    return tuple(f"{name}.{suffix}" for suffix in _SUFFIXES) + tuple(
        f"{name}.quant_state.bitsandbytes__{quant_type}" for quant_type in ("nf4", "fp4"))


def from_bnb_state_dict(tensors: Mapping[str, Any], name: str) -> QuantizedTensor:
    """The QuantizedTensor stored by bitsandbytes under ``name`` in ``tensors`` (no re-quantization).

    ``tensors`` maps keys to arrays (numpy or anything ``np.asarray`` accepts). The quant state
    JSON decides whether the scales are double-quantized (bitsandbytes writes ``nested_offset``
    and ``nested_blocksize`` there then), and the nested tensors must agree with it: both present
    when it says nested, both absent otherwise. Raises QuantizationError naming the key when a
    tensor or quant-state field is missing, has the wrong size or dtype, holds scales that are not
    finite and >= 0, or uses a code table other than bitsandbytes' NF4/FP4 and signed dynamic map.

    Args:
      tensors: the state dict (keys to arrays), e.g. a safetensors file's contents.
      name: the packed weight's key.

    Returns:
      The :class:`~qlora_jax.quant.QuantizedTensor` (numpy-backed arrays as stored).

    Raises:
      QuantizationError: a missing, malformed or inconsistent tensor or quant-state field.
    """
    state_key, meta = _quant_state(tensors, name)
    quant_type, shape, blocksize = _state_header(meta, state_key)
    dtype = str(meta.get("dtype", "float32"))
    double_quant = _double_quantized(tensors, name, meta, state_key)
    packed = _packed_codes(tensors, name, quant_type, shape)
    absmax, nested, offset, nested_blocksize = _scales(tensors, name, meta, state_key, int(np.prod(shape)),
                                                       blocksize, double_quant)
    qt = QuantizedTensor(
        codes=packed.reshape(codes_shape(shape, quant_type)),
        scales=absmax.reshape(scales_shape(shape, blocksize)),
        nested_scales=nested,
        offset=None if offset is None else np.asarray(offset, np.float32),
        shape=shape,
        dtype=dtype,
        quant_type=quant_type,
        blocksize=blocksize,
        nested_blocksize=nested_blocksize,
    )
    return qt.validate()


def _quant_state(tensors: Mapping[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """The key of ``name``'s quant state and its JSON object."""
    state_keys = [k for k in tensors if k.startswith(f"{name}.quant_state.bitsandbytes__")]
    if len(state_keys) != 1:
        present = [k for k in auxiliary_keys(name) if k in tensors]
        raise QuantizationError(
            f"bitsandbytes 4-bit weight {name!r} needs exactly one '{name}.quant_state.bitsandbytes__<nf4|fp4>' "
            f"tensor (the JSON that says how to decode it), found {state_keys or 'none'}"
            + (f" beside {present}" if present and not state_keys else ""))
    state_key = state_keys[0]
    try:
        meta = json.loads(bytes(_get(tensors, state_key).astype(np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuantizationError(f"{state_key!r} does not hold bitsandbytes' JSON quant state: {err}") from err
    if not isinstance(meta, dict):
        raise QuantizationError(f"{state_key!r} holds JSON {type(meta).__name__}, not bitsandbytes' quant state object")
    return state_key, meta


def _state_header(meta: dict[str, Any], state_key: str) -> tuple[str, tuple[int, ...], int]:
    """``(quant_type, shape, blocksize)`` of a quant state, checked."""
    quant_type = meta.get("quant_type")
    if quant_type not in ("nf4", "fp4") or not state_key.endswith(f"__{quant_type}"):
        raise QuantizationError(f"{state_key!r}: quant_type {quant_type!r} is not the key's nf4 or fp4")
    shape_field = _meta_field(meta, "shape", state_key, list)
    if not shape_field or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape_field):
        raise QuantizationError(f"{state_key!r}: quant state field 'shape' is {shape_field!r}; expected positive "
                                "integers")
    return quant_type, tuple(shape_field), _meta_field(meta, "blocksize", state_key, int, positive=True)


def _double_quantized(tensors: Mapping[str, Any], name: str, meta: dict[str, Any], state_key: str) -> bool:
    """Whether the scales are double-quantized: the quant state says so, and the nested tensors agree."""
    nested_in_state = "nested_offset" in meta or "nested_blocksize" in meta
    nested_keys = [f"{name}.nested_absmax", f"{name}.nested_quant_map"]
    nested_present = [k for k in nested_keys if k in tensors]
    if nested_in_state and len(nested_present) < 2:
        missing = [k for k in nested_keys if k not in tensors]
        raise QuantizationError(f"{state_key!r} says the scales are double-quantized (nested_offset="
                                f"{meta.get('nested_offset')!r}) but {missing} is missing: the checkpoint lost its "
                                "nested (double-quant) tensors")
    if nested_present and not nested_in_state:
        raise QuantizationError(f"{state_key!r} says the scales are not double-quantized (no nested_offset), but "
                                f"{nested_present} is present")
    return nested_in_state


def _packed_codes(tensors: Mapping[str, Any], name: str, quant_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """The packed 4-bit codes (uint8), after checking the code table is bitsandbytes' own."""
    quant_map = _get(tensors, f"{name}.quant_map").astype(np.float32).reshape(-1)
    if quant_map.shape != (16,) or not np.array_equal(quant_map, codebooks.codebook(quant_type)):
        raise QuantizationError(
            f"{name}.quant_map is not bitsandbytes' {quant_type} code table; custom code tables are not supported"
        )
    packed = _get(tensors, name)
    if packed.dtype != np.uint8:
        # bitsandbytes' quant_storage option stores the same bytes under another dtype.
        packed = np.ascontiguousarray(packed).view(np.uint8)
    numel = int(np.prod(shape))
    if packed.size != (numel + 1) // 2:
        raise QuantizationError(
            f"{name} holds {packed.size} bytes but a {quant_type} tensor of shape {list(shape)} needs "
            f"{(numel + 1) // 2}"
        )
    return packed


def _scales(tensors: Mapping[str, Any], name: str, meta: dict[str, Any], state_key: str, numel: int, blocksize: int,
            double_quant: bool) -> tuple[np.ndarray, np.ndarray | None, np.float32 | None, int]:
    """``(absmax, nested_absmax, nested_offset, nested_blocksize)``, checked (the nested ones None,
    and the block size 256, without double quantization)."""
    absmax = _get(tensors, f"{name}.absmax").reshape(-1)
    num_blocks = -(-numel // blocksize)
    if absmax.size != num_blocks:
        raise QuantizationError(f"{name}.absmax has {absmax.size} entries, expected {num_blocks} blocks")
    expected_absmax = np.uint8 if double_quant else np.float32
    if absmax.dtype != expected_absmax:
        raise QuantizationError(
            f"{name}.absmax is {absmax.dtype.name}; bitsandbytes stores {np.dtype(expected_absmax).name} absmax "
            f"{'codes with double quantization' if double_quant else 'without double quantization'} (the quant "
            "state and the tensors disagree)")
    if not double_quant:
        _check_scales(absmax, f"{name}.absmax")
        return absmax, None, None, 256
    nested_map = _get(tensors, f"{name}.nested_quant_map").astype(np.float32).reshape(-1)
    if not np.array_equal(nested_map, codebooks.DYNAMIC_MAP_SIGNED):
        raise QuantizationError(f"{name}.nested_quant_map is not bitsandbytes' signed dynamic map")
    nested_blocksize = _meta_field(meta, "nested_blocksize", state_key, int, positive=True)
    offset = np.float32(_meta_field(meta, "nested_offset", state_key, float))
    nested = _get(tensors, f"{name}.nested_absmax")
    if nested.dtype != np.float32:
        raise QuantizationError(f"{name}.nested_absmax is {nested.dtype.name}; bitsandbytes stores float32")
    nested = nested.reshape(-1)
    _check_scales(nested, f"{name}.nested_absmax")
    return absmax, nested, offset, nested_blocksize
