"""Tokenizers (Hugging Face ``tokenizers``) and chat templates (Jinja, as transformers renders them).

A :class:`Tokenizer` comes from a model folder (``tokenizer.json`` plus ``tokenizer_config.json``)
or from a GGUF file. Chat formatting uses the model's own template when it has one, else one of
the built-in templates: ChatML (SmolLM2, Qwen), Llama 2 and Llama 3.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

__all__ = ["Tokenizer", "CHAT_TEMPLATES", "compile_chat_template", "render_chat_template"]

CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}


def _jinja_environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                   ensure_ascii=ensure_ascii)
    return env


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str):
    """The compiled Jinja template (cached: compiling costs ~60x a render)."""
    return _jinja_environment().from_string(template)


def render_chat_template(template: str, messages: Sequence[dict[str, str]], **variables: Any) -> str:
    """Renders a Jinja chat template the way transformers' ``apply_chat_template`` does."""
    return compile_chat_template(template).render(messages=list(messages), **variables)


class Tokenizer:
    """Text <-> token ids, special tokens, and chat formatting for one model."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
    ):
        self.hf = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_folder(cls, path: str | pathlib.Path) -> "Tokenizer":
        """Reads ``tokenizer.json`` and, if present, ``tokenizer_config.json`` / ``special_tokens_map.json``."""
        path = pathlib.Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).exists():
                config.update(json.loads((path / name).read_text()))
        template_file = path / "chat_template.jinja"
        if "chat_template" not in config and template_file.exists():
            config["chat_template"] = template_file.read_text()
        return cls.from_config(HFTokenizer.from_file(str(file)), config)

    @classmethod
    def from_config(cls, tokenizer: HFTokenizer, config: dict[str, Any]) -> "Tokenizer":
        def token(value):
            return value.get("content") if isinstance(value, dict) else value

        template = config.get("chat_template")
        if isinstance(template, list):  # transformers' list of named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        return cls(
            tokenizer,
            bos_token=token(config.get("bos_token")),
            eos_token=token(config.get("eos_token")),
            pad_token=token(config.get("pad_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
            chat_template=template,
        )

    def save(self, path: str | pathlib.Path) -> None:
        """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (loadable by transformers)."""
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
            "chat_template": self.chat_template,
        }
        (path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None},
                                                               indent=2))

    # ------------------------------------------------------------------ ids
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        pad = self.token_id(self.pad_token)
        return 0 if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised.

        ``add_bos`` defaults to the tokenizer's ``add_bos_token`` setting.
        """
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(int(i) for i in ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def resolve_template(self, template: str | None = None) -> str:
        """A built-in template by name, a Jinja string, or (default) the model's own template."""
        if template is None:
            if self.chat_template is None:
                raise ValueError("this tokenizer has no chat template; pass one of " + ", ".join(CHAT_TEMPLATES))
            return self.chat_template
        return CHAT_TEMPLATES.get(template, template)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, str]],
        *,
        add_generation_prompt: bool = False,
        template: str | None = None,
    ) -> str:
        """The conversation as the model's prompt text. ``messages``: ``[{"role", "content"}, ...]``."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"chat message {i} must be a dict with 'role' and 'content', got {message!r}")
        return render_chat_template(
            self.resolve_template(template),
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
