"""The tokenizer (``tokenizer.py``): rebuilt from GGUF, and the chat templates, against transformers
on the same inputs; bad tokenizer files and chat templates refused by name.

The reference is transformers (.venv-oracle): ``AutoTokenizer.from_pretrained(folder, gguf_file=...)``
rebuilds the embedded SmolLM2's tokenizer from the same GGUF metadata by its own code, and its
``apply_chat_template`` renders the model's own template and our built-in ones.

Faults (``pytest -m faults``): a tiny word-level tokenizer folder with one bad field of
tokenizer_config.json, an unreadable file, or a template that is not valid Jinja, does not render,
or does not write the messages: each error names the file or the template, never the conversation.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from qlora_jax import assets
from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.data import make_example
from qlora_jax.model import load_tokenizer
from qlora_jax.tokenizer import CHAT_TEMPLATES, ChatTemplateError, Tokenizer

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


# ---------------------------------------------------------------- faults


def tiny_tokenizer_folder(path: pathlib.Path, **config) -> pathlib.Path:
    """A word-level tokenizer folder (tokenizer.json, tokenizer_config.json with the chatml template);
    ``config``: tokenizer_config.json fields to set."""
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "probe", "question", "answer", "4711", "1147",
             "hi", "hello"]
    tokenizer = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in words[1:3]])
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                            "chat_template": CHAT_TEMPLATES["chatml"], **config}))
    return path


@pytest.mark.faults
@pytest.mark.parametrize("config, match", [
    ({"eos_token": "</s>"}, r"tokenizer_config\.json: field 'eos_token' names '</s>', which is not in the tokenizer's"),
    ({"pad_token": 3}, r"tokenizer_config\.json: field 'pad_token' is 3; expected a token string"),
    ({"add_bos_token": "yes"}, r"tokenizer_config\.json: field 'add_bos_token' is 'yes'; expected true or false"),
    ({"chat_template": 7}, r"tokenizer_config\.json: field 'chat_template' is 7; expected a Jinja string"),
    ({"chat_template": [{"name": "default"}]}, r"field 'chat_template' must be a string or a non-empty list"),
])
def test_bad_tokenizer_config_names_the_file_and_field(tmp_path, config, match):
    with pytest.raises(CheckpointError, match=match):
        Tokenizer.from_folder(tiny_tokenizer_folder(tmp_path, **config))


@pytest.mark.faults
def test_unreadable_tokenizer_files_are_named(tmp_path):
    path = tiny_tokenizer_folder(tmp_path)
    (path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_folder(path)
    path = tiny_tokenizer_folder(tmp_path / "b")
    (path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a valid Hugging Face tokenizers file"):
        Tokenizer.from_folder(path)


@pytest.mark.faults
@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{{ m['content'] }", r"chat template .*\(passed as template= / --chat_template\): the "
                                                  r"chat template is not valid Jinja \(line 1"),
    ("{{ undefined_function() }}", r"fails to render a plain user/assistant exchange: UndefinedError"),
    ("{{ messages[0]['content'] + 1 }}", r"fails to render a plain user/assistant exchange: TypeError"),
    ("chatm1", r"'chatm1' \(passed as .*does not write the messages' contents.*built-in name \(chatml, llama2"),
])
def test_bogus_chat_template_is_blamed_on_the_template(tmp_path, template, match):
    from qlora_jax.data import tokenize_examples

    tokenizer = Tokenizer.from_folder(tiny_tokenizer_folder(tmp_path))
    example = make_example([("user", "hi"), ("assistant", "hello")], "data.jsonl:1")
    with pytest.raises(ChatTemplateError, match=match) as error:
        tokenize_examples([example], tokenizer, template=template)
    assert "data.jsonl" not in str(error.value)  # not blamed on the conversation
    with pytest.raises(ChatTemplateError, match=match):
        tokenizer.apply_chat_template(example.messages, template=template)


@pytest.mark.faults
def test_bogus_template_in_tokenizer_config_names_that_file(tmp_path):
    tokenizer = Tokenizer.from_folder(tiny_tokenizer_folder(tmp_path, chat_template="{% if %}"))
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json: chat_template: the chat template is not "
                                                "valid Jinja"):
        tokenizer.resolve_template()
