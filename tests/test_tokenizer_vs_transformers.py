"""The tokenizer rebuilt from GGUF and the chat templates, against transformers on the same inputs.

The reference is transformers (.venv-oracle): ``AutoTokenizer.from_pretrained(folder, gguf_file=...)``
rebuilds the embedded SmolLM2's tokenizer from the same GGUF metadata by its own code, and its
``apply_chat_template`` renders the model's own template and our built-in ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from qlora_jax import assets
from qlora_jax.model import load_tokenizer
from qlora_jax.tokenizer import CHAT_TEMPLATES

TEXTS = [
    "Hello world, how are you?",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "Ünïcödé — 東京 🚀 naïve café",
    "numbers 1234567 and 3.14159, code: def f(x): return x**2",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": " Four. "},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def reference(oracle):
    path = assets.embedded_model_path()
    cases = []
    for template in (None, CHAT_TEMPLATES["chatml"], CHAT_TEMPLATES["llama3"], CHAT_TEMPLATES["llama2"]):
        for messages in (CONVERSATION, CONVERSATION[1:2]):
            for add_generation_prompt in (False, True):
                cases.append({"messages": messages, "chat_template": template,
                              "add_generation_prompt": add_generation_prompt})
    config = {"dir": str(path.parent), "gguf_file": path.name, "cases": cases, "texts": TEXTS}
    return cases, oracle.run("hf_tokenizer.py", {}, config)


def test_gguf_rebuilt_tokenizer_encodes_as_transformers(reference):
    _, out = reference
    tokenizer = load_tokenizer("embedded")
    for j, text in enumerate(TEXTS):
        np.testing.assert_array_equal(np.asarray(tokenizer.encode(text, add_bos=False)), out[f"text_ids_{j}"],
                                      err_msg=repr(text))
        assert tokenizer.decode(out[f"text_ids_{j}"].tolist(), skip_special_tokens=False) == text


def test_chat_templates_render_and_tokenize_as_transformers(reference):
    cases, out = reference
    tokenizer = load_tokenizer("embedded")
    names = {None: None, **{source: name for name, source in CHAT_TEMPLATES.items()}}
    for i, case in enumerate(cases):
        rendered = tokenizer.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"],
                                                 template=names[case["chat_template"]])
        assert rendered == str(out[f"rendered_{i}"]), (names[case["chat_template"]], case["add_generation_prompt"])
        np.testing.assert_array_equal(np.asarray(tokenizer.encode(rendered, add_bos=False)), out[f"ids_{i}"])
