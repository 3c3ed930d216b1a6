"""The public API's docstrings carry optax-style sections, and the README's library snippets run.

For every function or class exported (``__all__``) by the modules in ``DOCUMENTED``, the docstring
has an ``Args:`` section naming each parameter (``Attributes:`` for the fields of a dataclass or
NamedTuple, which are its constructor's parameters) and, for a function, a ``Returns:`` section.
Modules join ``DOCUMENTED`` as their docstrings are written (issue 27, item 5).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pathlib
import re

import jax
import pytest

DOCUMENTED = [
    "qlora_jax.quant",
    "qlora_jax.linear",
    "qlora_jax.lora",
    "qlora_jax.train",
    "qlora_jax.generate",
    "qlora_jax.kernels.ops",
    "qlora_jax.optim",
    "qlora_jax.nn",
    "qlora_jax.nn.traced",
    "qlora_jax.nn.dataflow",
    "qlora_jax.nn.surgery",
    "qlora_jax.nn.linen",
    "qlora_jax",
    "qlora_jax.model",
    "qlora_jax.models.spec",
    "qlora_jax.checkpoints.orbax_format",
    "qlora_jax.peft_io",
    "qlora_jax.merge",
    "qlora_jax.distributed",
    "qlora_jax.eval",
    "qlora_jax.data",
    *(f"qlora_jax.checkpoints.{m}" for m in ("base_cache", "errors", "gguf_io", "load", "safetensors_io", "validate")),
    "qlora_jax.models.llama",
    "qlora_jax.models.rope",
    "qlora_jax.models.config",
    "qlora_jax.models.family",
    "qlora_jax.models.layout",
    "qlora_jax.models.moe",
    # The modules behind the packages' re-exports, for the names only they export.
    *(f"qlora_jax.optim.{m}" for m in ("adam8bit", "adamw", "factory", "jit", "masks", "memory_kinds", "offload",
                                       "quantized_moments", "schedules", "shardings", "streaming")),
    *(f"qlora_jax.quant.{m}" for m in ("blockwise", "bnb_format", "codebooks", "report", "tensor")),
    *(f"qlora_jax.distributed.{m}" for m in ("mesh", "multiprocess", "sharding")),
    *(f"qlora_jax.eval.{m}" for m in ("chatterbot", "evaluator", "formats", "items", "lm_eval_model", "lm_eval_tasks",
                                      "metrics", "plot", "prompts", "scoring", "tasks")),
    *(f"qlora_jax.data.{m}" for m in ("batching", "corpora", "example", "files", "formats", "iterator", "oasst",
                                      "ordering", "sources", "split", "tokenization")),
]

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _public_objects():
    seen = set()
    for module_name in DOCUMENTED:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue  # constants and type aliases
            key = (obj.__module__, obj.__qualname__)
            if key not in seen:
                seen.add(key)
                yield f"{module_name}.{name}", obj


def _parameters(obj) -> list[str]:
    target = obj
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return []
        # NNX modules' metaclass hides __init__'s signature behind (*args, **kwargs).
        target = obj.__init__ if "__init__" in vars(obj) else obj
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    skip = {"self", "parent", "name"} if _is_linen(obj) else {"self"}
    return [p.name for p in params if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _is_linen(obj) -> bool:
    try:
        import flax.linen as nn
    except ImportError:
        return False
    return inspect.isclass(obj) and issubclass(obj, nn.Module)


def _section(doc: str, title: str) -> str | None:
    match = re.search(rf"^{title}:\n((?:[ \t]+.*\n?|\n)*)", doc, re.MULTILINE)
    return match.group(1) if match else None


def _is_record(obj) -> bool:
    return inspect.isclass(obj) and (dataclasses.is_dataclass(obj) or hasattr(obj, "_fields"))


@pytest.mark.parametrize("name,obj", list(_public_objects()), ids=lambda v: v if isinstance(v, str) else "")
def test_docstring_sections(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name} has no docstring"
    params = _parameters(obj)
    if params:
        section = _section(doc, "Args") or (_section(doc, "Attributes") if _is_record(obj) else None)
        assert section is not None, f"{name}: no Args: section for {params}"
        missing = [p for p in params if not re.search(rf"^\s+\*{{0,2}}{re.escape(p)}\b", section, re.MULTILINE)]
        assert not missing, f"{name}: Args: does not name {missing}"
    if inspect.isfunction(obj):
        returns = inspect.signature(obj).return_annotation
        if returns not in (None, "None", inspect.Signature.empty) or "return " in inspect.getsource(obj):
            assert _section(doc, "Returns") is not None, f"{name}: no Returns: section"


def _readme_snippets(heading: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.DOTALL)


def _substituted(snippet: str, substitutions: dict[str, str]) -> str:
    for old, new in substitutions.items():
        assert old in snippet, f"the README snippet no longer contains {old!r}: update this test"
        snippet = snippet.replace(old, new)
    return snippet


def test_readme_library_snippets_run(tiny_model, tmp_path):
    snippets = _readme_snippets("Using the library")
    assert len(snippets) == 3, "the README's 'Using the library' snippets changed: update this test"
    from qlora_jax.distributed import make_mesh

    # The snippets run as the README shows them, in one namespace (the second goes on from the
    # first's model and tokenizer), with these substitutions only, to stay seconds on a CPU:
    # the tiny random Llama of conftest (2 layers, the embedded model's tokenizer) for "embedded",
    # 4 new tokens for 32, the checkpoint in tmp_path, and a 2-device mesh for the `mesh` the
    # README leaves to the reader. The decoded text of a random model is not checked; that every
    # line runs is.
    checkpoint = str(tmp_path / "smollm2-nf4")
    namespace = {"mesh": make_mesh("fsdp=2", jax.devices()[:2])}
    first = _substituted(snippets[0], {'load_pretrained("embedded"': f"load_pretrained({str(tiny_model)!r}",
                                       "max_new_tokens=32": "max_new_tokens=4"})
    second = _substituted(snippets[1], {'"smollm2-nf4"': repr(checkpoint)})
    for index, code in enumerate((first, second, snippets[2])):
        exec(compile(code, f"README.md:Using the library, snippet {index}", "exec"), namespace)
    assert namespace["saved"].config == namespace["model"].config
    assert namespace["model"].lora_params is not None  # restore_model restored the saved adapters
