"""Oracle: bitsandbytes' optimizers on its CPU backend, run in the separate Python 3.11 environment.

Usage: python bnb_optim.py IN.npz CONFIG.json OUT.npz

CONFIG holds {"cases": [...]}; each case is
  {"name", "optimizer": "AdamW8bit" | "AdamW", "lr", "betas": [b1, b2], "eps", "weight_decay",
   "num_params", "steps"}
and reads from IN.npz the initial parameters "<name>/p/<i>" (float32) and the gradient of every
step "<name>/g/<t>/<i>" (float32). The gradients are given, not computed, so that both sides see
identical inputs at every step. Results in OUT.npz:
  "<name>/p/<t>/<i>": parameter i after step t (t = 1..steps);
  "<name>/state1/<i>", "<name>/state2/<i>": the final first/second moment (uint8 codes for 8-bit
  tensors, float32 otherwise); "<name>/absmax1/<i>", "<name>/absmax2/<i>" for 8-bit tensors.

A case with "optimizer": "AdamW8bit_from_state" instead takes one step of AdamW8bit from a given
8-bit state, so that the two sides are compared one step at a time from the same state: it reads
"<name>/p/<i>", "<name>/g/<i>", "<name>/state1/<i>", "<name>/state2/<i>" (uint8 codes),
"<name>/absmax1/<i>", "<name>/absmax2/<i>" and case["step"] (the step about to be taken, from 1),
and writes the parameter, codes and absmax after that step under the same keys with "new/" first.
"""

import json
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
import bitsandbytes as bnb  # noqa: E402


def main(in_path, config_path, out_path):
    arrays = dict(np.load(in_path))
    config = json.load(open(config_path))
    out = {}
    torch.manual_seed(0)
    for case in config["cases"]:
        name = case["name"]
        if case["optimizer"] == "AdamW8bit_from_state":
            out.update(_one_step_from_state(arrays, case))
            continue
        params = [
            torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(arrays[f"{name}/p/{i}"], np.float32)).clone())
            for i in range(case["num_params"])
        ]
        cls = getattr(bnb.optim, case["optimizer"])
        opt = cls(params, lr=case["lr"], betas=tuple(case["betas"]), eps=case["eps"],
                  weight_decay=case["weight_decay"])
        for t in range(1, case["steps"] + 1):
            for i, p in enumerate(params):
                p.grad = torch.from_numpy(np.ascontiguousarray(arrays[f"{name}/g/{t}/{i}"], np.float32)).clone()
            opt.step()
            for i, p in enumerate(params):
                out[f"{name}/p/{t}/{i}"] = p.detach().numpy().copy()
        for i, p in enumerate(params):
            state = opt.state[p]
            for key in ("state1", "state2", "absmax1", "absmax2"):
                if key in state:
                    out[f"{name}/{key}/{i}"] = state[key].detach().numpy().copy()
    np.savez(out_path, **out)


def _one_step_from_state(arrays, case):
    name = case["name"]
    tensor = lambda key, dtype: torch.from_numpy(np.ascontiguousarray(arrays[f"{name}/{key}"], dtype)).clone()  # noqa: E731
    out = {}
    for i in range(case["num_params"]):
        param = torch.nn.Parameter(tensor(f"p/{i}", np.float32))
        opt = bnb.optim.AdamW8bit([param], lr=case["lr"], betas=tuple(case["betas"]), eps=case["eps"],
                                  weight_decay=case["weight_decay"])
        opt.fill_qmap()
        # The optimizer's own state, as init_state lays it out, holding the given values.
        opt.state[param] = {
            "step": case["step"] - 1,
            "state1": tensor(f"state1/{i}", np.uint8), "state2": tensor(f"state2/{i}", np.uint8),
            "absmax1": tensor(f"absmax1/{i}", np.float32), "absmax2": tensor(f"absmax2/{i}", np.float32),
            "qmap1": opt.name2qmap["dynamic"], "qmap2": opt.name2qmap["udynamic"],
        }
        param.grad = tensor(f"g/{i}", np.float32)
        opt.step()
        state = opt.state[param]
        out[f"{name}/new/p/{i}"] = param.detach().numpy().copy()
        for key in ("state1", "state2", "absmax1", "absmax2"):
            out[f"{name}/new/{key}/{i}"] = state[key].detach().numpy().copy()
    return out


if __name__ == "__main__":
    main(*sys.argv[1:4])
