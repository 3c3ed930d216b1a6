"""Oracle: transformers' own GGUF reader (the .venv-oracle environment, with the gguf package).

Usage: python hf_gguf.py IN.npz CONFIG.json OUT.npz

CONFIG: {"dir", "gguf_file"}. OUT: every tensor of the model transformers builds from the GGUF file
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, float32), by its state_dict name; llama.cpp's
rotary row permutation is undone by transformers' code, not ours. With "input_ids" (and
"attention_mask") in IN.npz, also "logits": the model's float32 logits on them.
"""

import json
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)


def main(_in_path, config_path, out_path):
    config = json.load(open(config_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(config["dir"], gguf_file=config["gguf_file"],
                                                              dtype=torch.float32)
    out = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    arrays = dict(np.load(_in_path))
    if "input_ids" in arrays:
        ids = torch.from_numpy(arrays["input_ids"].astype(np.int64))
        mask = torch.from_numpy(arrays["attention_mask"].astype(np.int64)) if "attention_mask" in arrays else None
        with torch.no_grad():
            out["logits"] = model.eval()(input_ids=ids, attention_mask=mask).logits.float().numpy()
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
