"""Oracle: transformers' tokenizer and apply_chat_template on CPU (the .venv-oracle environment).

Usage: python hf_tokenizer.py IN.npz CONFIG.json OUT.npz

CONFIG: {"dir": a tokenizer folder, "gguf_file": a GGUF file in it (transformers rebuilds the tokenizer
from its metadata) or None, "cases": [{"messages", "chat_template" (None: the folder's own),
"add_generation_prompt"}], "texts": [str, ...]}. OUT: "rendered_<i>" (the prompt text) and
"ids_<i>" (apply_chat_template(tokenize=True)) per case; "text_ids_<j>" (tokenizer(text) ids, without added
special tokens) per text.
"""

import json
import sys
import warnings

import numpy as np

warnings.filterwarnings("ignore")
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()


def main(_in_path, config_path, out_path):
    config = json.load(open(config_path))
    extra = {"gguf_file": config["gguf_file"]} if config.get("gguf_file") else {}
    tok = transformers.AutoTokenizer.from_pretrained(config["dir"], **extra)
    out = {}
    for i, case in enumerate(config["cases"]):
        kwargs = dict(add_generation_prompt=case["add_generation_prompt"])
        if case["chat_template"] is not None:
            kwargs["chat_template"] = case["chat_template"]
        out[f"rendered_{i}"] = np.array(tok.apply_chat_template(case["messages"], tokenize=False, **kwargs))
        ids = tok.apply_chat_template(case["messages"], tokenize=True, **kwargs)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        out[f"ids_{i}"] = np.asarray(ids, np.int64)
    for j, text in enumerate(config["texts"]):
        out[f"text_ids_{j}"] = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
