r"""Reads a qlora-jax quantized checkpoint with plain Orbax and numpy: qlora-jax is not imported.

    python docs/examples/dequantize_with_numpy.py CHECKPOINT_DIR OUT.npz

writes every quantized linear weight of the checkpoint, dequantized to float32, layer by layer,
under the key ``<tensor path>/<layer>`` (e.g. ``layers/self_attn/q_proj/weight/0``), as
docs/checkpoint-format.md specifies: the codes, scales, nested scales and offset from the ``base``
item, their meaning from the ``manifest`` item (which also holds the code tables).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import orbax.checkpoint as ocp

JSON_ITEMS = ("manifest", "config", "lora_config", "tokenizer")
TREE_ITEMS = ("base", "lora")


def checkpointer() -> ocp.Checkpointer:
    handlers = {name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS}
    handlers.update({name: ocp.PyTreeCheckpointHandler() for name in TREE_ITEMS})
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers))


def read(path: str) -> tuple[dict, dict]:
    """``(manifest, base)``: the manifest JSON and the base as nested dicts of numpy arrays."""
    with checkpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata["base"].tree

        def as_numpy(node):
            if isinstance(node, dict):
                return {key: as_numpy(value) for key, value in node.items()}
            return ocp.RestoreArgs(restore_type=np.ndarray)

        restored = ckptr.restore(path, ocp.args.Composite(
            manifest=ocp.args.JsonRestore(), base=ocp.args.PyTreeRestore(restore_args=as_numpy(tree))))
    return restored["manifest"], restored["base"]


def unpack_4bit(packed: np.ndarray) -> np.ndarray:
    """uint8 bytes -> 4-bit codes, twice as many: element 2j is the high nibble, 2j+1 the low one."""
    return np.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1)


def blocks(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """``flat`` zero-padded to whole blocks, as ``[num_blocks, blocksize]``."""
    padded = np.zeros(math.ceil(flat.size / blocksize) * blocksize, flat.dtype)
    padded[: flat.size] = flat
    return padded.reshape(-1, blocksize)


def dequantize(entry: dict, arrays: dict, manifest: dict) -> np.ndarray:
    """One layer's tensor in float32: ``codebook[code] * absmax`` per block (``code * absmax / 127`` for int8)."""
    shape, blocksize = tuple(entry["shape"]), entry["blocksize"]
    numel = math.prod(shape)
    num_blocks = math.ceil(numel / blocksize)
    if entry["double_quant"]:
        # absmax = dynamic_map[code] * nested_absmax + offset, the product rounded to float32 first.
        dynamic = np.asarray(manifest["codebooks"]["dynamic_signed"], np.float32)
        centered = blocks(dynamic[arrays["scales"].reshape(-1)], entry["nested_blocksize"])
        product = (centered * arrays["nested_scales"][:, None]).reshape(-1)[:num_blocks]
        absmax = product + arrays["offset"]
    else:
        absmax = arrays["scales"].reshape(-1).astype(np.float32)
    if entry["quant_type"] == "int8":
        codes = blocks(arrays["codes"].reshape(-1).astype(np.float32), blocksize)
        values = codes * absmax[:, None] * np.float32(manifest["int8_scale"])
    else:
        table = np.asarray(manifest["codebooks"][entry["quant_type"]], np.float32)
        codes = unpack_4bit(arrays["codes"].reshape(-1))[:numel]
        values = blocks(table[codes], blocksize) * absmax[:, None]
    return values.reshape(-1)[:numel].reshape(shape)


def dequantize_all(path: str) -> dict[str, np.ndarray]:
    """``{"<tensor path>/<layer>": float32 array}`` for every quantized tensor of the checkpoint."""
    manifest, base = read(path)
    out = {}
    for tensor, entry in manifest["tensors"].items():
        if entry["kind"] != "quantized":
            continue
        node = base
        for key in tensor.split("/"):
            node = node[key]
        for index in np.ndindex(*entry["leading_dims"]):
            arrays = {name: array[index] for name, array in node.items()}
            out["/".join([tensor, *map(str, index)])] = dequantize(entry, arrays, manifest)
    return out


if __name__ == "__main__":
    checkpoint, output = sys.argv[1:3]
    np.savez(output, **dequantize_all(checkpoint))
