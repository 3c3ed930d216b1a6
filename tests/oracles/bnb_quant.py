"""Oracle: bitsandbytes' CPU backend, run in the separate Python 3.11 environment (.venv-oracle).

Usage: python bnb_quant.py IN.npz CONFIG.json OUT.npz

CONFIG holds {"cases": [...]}; each case names an op and its arguments, and reads its input
arrays from IN.npz under "<case name>/<input>". Results go to OUT.npz under "<case name>/<output>".
Ops:
  quantize_4bit:       w (float32, or uint16 bits of bfloat16/float16 with "dtype")
                       -> packed, absmax, [nested_absmax, offset], dequantized, state/<key>...
  dequantize_state:    state/<key>... (a serialized bitsandbytes state dict) -> dequantized
  quantize_blockwise:  a float32, blocksize -> codes, absmax (the 8-bit dynamic map, native CPU)
  int8_vectorwise:     w float32 [rows, cols] -> codes int8, row_absmax float32 (LLM.int8, threshold 0)
  dynamic_maps:        -> signed, unsigned (create_dynamic_map), nf4, fp4 (get_4bit_type)
"""

import json
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
import bitsandbytes.functional as F  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _weight(arrays, key, dtype):
    a = arrays[key]
    if dtype == "float32":
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(TORCH_DTYPES[dtype])


def main(in_path, config_path, out_path):
    arrays = dict(np.load(in_path))
    config = json.load(open(config_path))
    out = {}
    for case in config["cases"]:
        name, op = case["name"], case["op"]
        if op == "quantize_4bit":
            w = _weight(arrays, f"{name}/w", case.get("dtype", "float32"))
            packed, state = F.quantize_4bit(
                w,
                blocksize=case["blocksize"],
                compress_statistics=case["double_quant"],
                quant_type=case["quant_type"],
            )
            out[f"{name}/packed"] = packed.numpy()
            out[f"{name}/absmax"] = state.absmax.numpy()
            if state.nested:
                out[f"{name}/nested_absmax"] = state.state2.absmax.numpy()
                out[f"{name}/offset"] = np.float32(state.offset.item())
            out[f"{name}/dequantized"] = F.dequantize_4bit(packed, state).float().numpy()
            for key, value in state.as_dict(packed=True).items():
                out[f"{name}/state/{key}"] = value.numpy()
        elif op == "dequantize_state":
            prefix = f"{name}/state/"
            qs = {k[len(prefix):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)}
            packed = qs.pop("weight")
            state = F.QuantState.from_dict(qs, device=torch.device("cpu"))
            out[f"{name}/dequantized"] = F.dequantize_4bit(packed, state).float().numpy()
        elif op == "quantize_blockwise":
            a = torch.from_numpy(np.ascontiguousarray(arrays[f"{name}/a"], dtype=np.float32))
            codes, state = F.quantize_blockwise(a, blocksize=case["blocksize"])
            out[f"{name}/codes"] = codes.numpy()
            out[f"{name}/absmax"] = state.absmax.numpy()
        elif op == "int8_vectorwise":
            w = torch.from_numpy(np.ascontiguousarray(arrays[f"{name}/w"], dtype=np.float32))
            codes, row_absmax, _ = F.int8_vectorwise_quant(w.clone())
            out[f"{name}/codes"] = codes.numpy()
            out[f"{name}/row_absmax"] = row_absmax.numpy()
        elif op == "dynamic_maps":
            out[f"{name}/signed"] = F.create_dynamic_map(signed=True).numpy()
            out[f"{name}/unsigned"] = F.create_dynamic_map(signed=False).numpy()
            out[f"{name}/nf4"] = F.get_4bit_type("nf4", device="cpu").numpy()
            out[f"{name}/fp4"] = F.get_4bit_type("fp4", device="cpu").numpy()
        else:
            raise ValueError(f"unknown op {op!r}")
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
