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

__all__ = ["to_bnb_state_dict", "from_bnb_state_dict", "bnb_quant_state_keys", "is_bnb_4bit_key"]

_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def bnb_quant_state_keys(name: str, quant_type: str, double_quant: bool) -> list[str]:
    """The state-dict keys bitsandbytes writes for a 4-bit weight stored under ``name``."""
    keys = [name, f"{name}.absmax", f"{name}.quant_map"]
    if double_quant:
        keys += [f"{name}.nested_absmax", f"{name}.nested_quant_map"]
    keys.append(f"{name}.quant_state.bitsandbytes__{quant_type}")
    return keys


def is_bnb_4bit_key(key: str) -> bool:
    """Whether ``key`` is one of the auxiliary quant-state keys (not the packed weight itself)."""
    return any(key.endswith("." + s) for s in _SUFFIXES) or ".quant_state.bitsandbytes__" in key


def to_bnb_state_dict(qt: QuantizedTensor, name: str) -> dict[str, np.ndarray]:
    """bitsandbytes' serialized tensors for ``qt`` stored under ``name`` (numpy arrays).

    Loading the result with ``bitsandbytes.functional.QuantState.from_dict`` gives back exactly
    our values. Int8 tensors have no bitsandbytes 4-bit form and raise QuantizationError.
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


def from_bnb_state_dict(tensors: Mapping[str, Any], name: str) -> QuantizedTensor:
    """The QuantizedTensor stored by bitsandbytes under ``name`` in ``tensors`` (no re-quantization).

    ``tensors`` maps keys to arrays (numpy or anything ``np.asarray`` accepts). Raises
    QuantizationError naming the key when a tensor is missing, has the wrong size, or uses a code
    table other than bitsandbytes' NF4/FP4 and signed dynamic map.
    """
    state_keys = [k for k in tensors if k.startswith(f"{name}.quant_state.bitsandbytes__")]
    if len(state_keys) != 1:
        raise QuantizationError(
            f"bitsandbytes 4-bit weight {name!r} needs exactly one '{name}.quant_state.bitsandbytes__<type>' "
            f"tensor, found {state_keys or 'none'}"
        )
    try:
        meta = json.loads(bytes(_get(tensors, state_keys[0]).astype(np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuantizationError(f"{state_keys[0]!r} does not hold bitsandbytes' JSON quant state: {err}") from err
    quant_type = meta.get("quant_type")
    if quant_type not in ("nf4", "fp4"):
        raise QuantizationError(f"{state_keys[0]!r}: unsupported quant_type {quant_type!r}")
    shape = tuple(int(d) for d in meta["shape"])
    blocksize = int(meta["blocksize"])
    dtype = str(meta.get("dtype", "float32"))
    double_quant = f"{name}.nested_absmax" in tensors
    numel = int(np.prod(shape))

    quant_map = _get(tensors, f"{name}.quant_map").astype(np.float32).reshape(-1)
    if quant_map.shape != (16,) or not np.array_equal(quant_map, codebooks.codebook(quant_type)):
        raise QuantizationError(
            f"{name}.quant_map is not bitsandbytes' {quant_type} code table; custom code tables are not supported"
        )
    packed = _get(tensors, name)
    if packed.dtype != np.uint8:
        # bitsandbytes' quant_storage option stores the same bytes under another dtype.
        packed = np.ascontiguousarray(packed).view(np.uint8)
    if packed.size != (numel + 1) // 2:
        raise QuantizationError(
            f"{name} holds {packed.size} bytes but a {quant_type} tensor of shape {list(shape)} needs "
            f"{(numel + 1) // 2}"
        )
    absmax = _get(tensors, f"{name}.absmax").reshape(-1)
    num_blocks = -(-numel // blocksize)
    if absmax.size != num_blocks:
        raise QuantizationError(f"{name}.absmax has {absmax.size} entries, expected {num_blocks} blocks")
    nested, offset, nested_blocksize = None, None, 256
    if double_quant:
        nested_map = _get(tensors, f"{name}.nested_quant_map").astype(np.float32).reshape(-1)
        if not np.array_equal(nested_map, codebooks.DYNAMIC_MAP_SIGNED):
            raise QuantizationError(f"{name}.nested_quant_map is not bitsandbytes' signed dynamic map")
        nested_blocksize = int(meta["nested_blocksize"])
        nested = _get(tensors, f"{name}.nested_absmax").astype(np.float32).reshape(-1)
        offset = np.float32(meta["nested_offset"])
        absmax = absmax.astype(np.uint8)
    else:
        absmax = absmax.astype(np.float32)
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
