"""Oracle: transformers' own GGUF reader (the .venv-oracle environment, with the gguf package).

Usage: python hf_gguf.py IN.npz CONFIG.json OUT.npz

CONFIG: {"dir", "gguf_file"}. OUT: every tensor of the model transformers builds from the GGUF file
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, float32), by its state_dict name; llama.cpp's
rotary row permutation is undone by transformers' code, not ours.
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
    np.savez(out_path, **{k: v.detach().float().numpy() for k, v in model.state_dict().items()})


if __name__ == "__main__":
    main(*sys.argv[1:4])
