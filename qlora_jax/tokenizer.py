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

__all__ = ["Tokenizer", "CHAT_TEMPLATES", "ChatTemplateError", "compile_chat_template", "render_chat_template",
           "check_chat_template"]


class ChatTemplateError(ValueError):
    """A chat template that does not parse or render, or that cannot be split into source and target text."""


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


# A plain exchange every chat template must render, with contents it must reproduce.
_PROBE = ({"role": "user", "content": "probe question 4711"}, {"role": "assistant", "content": "probe answer 1147"})


@functools.lru_cache(maxsize=32)
def check_chat_template(template: str, origin: str, bos_token: str = "", eos_token: str = "") -> None:
    """Checks a chat template before it meets any data; raises :class:`ChatTemplateError` naming ``origin``.

    The template must parse as Jinja and render a plain user/assistant exchange (with and without
    the generation prompt) to text that contains both messages. So a template that fails on every
    conversation is reported as the template's problem, here, and not blamed on the first row.
    """
    import jinja2

    try:
        compiled = compile_chat_template(template)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"{origin}: the chat template is not valid Jinja (line {err.lineno}: "
                                f"{err.message})") from err
    variables = {"bos_token": bos_token, "eos_token": eos_token}
    try:
        full = compiled.render(messages=list(_PROBE), add_generation_prompt=False, **variables)
        prompt = compiled.render(messages=list(_PROBE[:1]), add_generation_prompt=True, **variables)
    except Exception as err:  # a template's runtime failure can be any exception (TypeError, UndefinedError, ...)
        raise ChatTemplateError(f"{origin}: the chat template fails to render a plain user/assistant exchange: "
                                f"{type(err).__name__}: {err}") from err
    missing = [m["content"] for m in _PROBE if m["content"] not in full]
    if missing or _PROBE[0]["content"] not in prompt:
        known = ", ".join(CHAT_TEMPLATES)
        raise ChatTemplateError(
            f"{origin}: the chat template does not write the messages' contents (a user/assistant exchange renders "
            f"as {full[:80]!r}); expected a Jinja template over `messages`, or a built-in name ({known})")


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
        chat_template_origin: str = "the tokenizer's chat_template",
    ):
        self.hf = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.chat_template_origin = chat_template_origin

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_folder(cls, path: str | pathlib.Path) -> Tokenizer:
        """Reads ``tokenizer.json`` and, if present, ``tokenizer_config.json`` / ``special_tokens_map.json``.

        Errors name the file and the field: a file that is not valid JSON or not a ``tokenizers``
        file, a special token of the wrong type or absent from the vocabulary, a chat template
        that is not a string (or list of named templates).
        """
        from qlora_jax.checkpoints.errors import CheckpointError

        path = pathlib.Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).exists():
                try:
                    content = json.loads((path / name).read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise CheckpointError(f"{path / name} is not valid JSON: {err}") from err
                if not isinstance(content, dict):
                    raise CheckpointError(f"{path / name}: expected a JSON object, got {type(content).__name__}")
                config.update(content)
                origins.update({key: str(path / name) for key in content})
        template_file = path / "chat_template.jinja"
        if "chat_template" not in config and template_file.exists():
            config["chat_template"] = template_file.read_text()
            origins["chat_template"] = str(template_file)
        try:
            tokenizer = HFTokenizer.from_file(str(file))
        except Exception as err:  # the Rust library raises a plain Exception
            raise CheckpointError(f"{file} is not a valid Hugging Face tokenizers file: {err}") from err
        return cls.from_config(tokenizer, config, origins=origins)

    @classmethod
    def from_config(cls, tokenizer: HFTokenizer, config: dict[str, Any],
                    origins: dict[str, str] | None = None) -> Tokenizer:
        """A tokenizer from transformers-style ``tokenizer_config.json`` fields.

        ``origins``: the file each field came from, for error messages (default "tokenizer config").
        """
        from qlora_jax.checkpoints.errors import CheckpointError

        origins = origins or {}

        def where(field):
            return f"{origins.get(field, 'tokenizer config')}: field {field!r}"

        def token(field):
            value = config.get(field)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                return None
            if not isinstance(value, str):
                raise CheckpointError(f"{where(field)} is {config[field]!r:.60}; expected a token string or "
                                      "{'content': token}")
            if tokenizer.token_to_id(value) is None:
                raise CheckpointError(f"{where(field)} names {value!r}, which is not in the tokenizer's vocabulary")
            return value

        template = config.get("chat_template")
        if isinstance(template, list):  # transformers' list of named templates
            if not template or not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
                raise CheckpointError(f"{where('chat_template')} must be a string or a non-empty list of "
                                      "{'name', 'template'} objects")
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{where('chat_template')} is {template!r:.40}; expected a Jinja string")
        add_bos = config.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise CheckpointError(f"{where('add_bos_token')} is {add_bos!r}; expected true or false")
        token("unk_token")
        return cls(
            tokenizer,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
            pad_token=token("pad_token"),
            add_bos_token=add_bos,
            chat_template=template,
            chat_template_origin=origins.get("chat_template", "tokenizer config") + ": chat_template",
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
        """A built-in template by name, a Jinja string, or (default) the model's own template, checked.

        Raises :class:`ChatTemplateError` naming where the template came from when it does not
        parse or render (see :func:`check_chat_template`).
        """
        if template is None:
            if self.chat_template is None:
                raise ChatTemplateError("this tokenizer has no chat template; pass one of " + ", ".join(CHAT_TEMPLATES))
            source, origin = self.chat_template, self.chat_template_origin
        elif template in CHAT_TEMPLATES:
            source, origin = CHAT_TEMPLATES[template], f"built-in chat template {template!r}"
        else:
            shown = f"{template[:40]!r}{'...' if len(template) > 40 else ''}"
            source, origin = template, f"chat template {shown} (passed as template= / --chat_template)"
        check_chat_template(source, origin, self.bos_token or "", self.eos_token or "")
        return source

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
