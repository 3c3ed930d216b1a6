"""The checkpoint modules sit below the model: they read and write pytrees and import nothing of it.

``qlora_jax/checkpoints/*`` must not import :mod:`qlora_jax.model`, :mod:`qlora_jax.peft_io` or the
layers built on them (the recipe, training, generation), not even inside a function or under
``TYPE_CHECKING``: the model imports the checkpoint modules, so any such import is a circle
(issue 22). The imports are read from the source with ``ast`` (every ``import`` statement, at any
depth), not from ``sys.modules``, so a lazy import that a test run never reaches still counts.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "qlora_jax"
# The layers above the checkpoint modules: the model and what is built on it.
HIGHER = ("qlora_jax.model", "qlora_jax.peft_io", "qlora_jax.merge", "qlora_jax.recipe", "qlora_jax.train",
          "qlora_jax.generate", "qlora_jax.finetune", "qlora_jax.eval", "qlora_jax.checkpointing")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every first-party module ``name``'s source imports, at any depth (functions, TYPE_CHECKING)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    first_party = set()
    for module in found:
        while module and module not in MODULES:  # `from a.b import name`: the module a.b
            module = module.rpartition(".")[0]
        if module.startswith("qlora_jax") and module not in ("qlora_jax", name):
            first_party.add(module)
    return first_party


def _reachable(name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        for module in _imports(todo.pop()) - seen:
            seen.add(module)
            todo.append(module)
    return seen


def _is_higher(module: str) -> bool:
    return any(module == h or module.startswith(h + ".") for h in HIGHER)


CHECKPOINT_MODULES = sorted(m for m in MODULES if m.startswith("qlora_jax.checkpoints."))


def test_the_parser_sees_function_level_imports():
    # model.py imports the synthetic base inside abstract_model: the test must see such imports.
    assert "qlora_jax.synthetic" in _imports("qlora_jax.model")
    assert "qlora_jax.checkpoints.base_cache" in _imports("qlora_jax.model")


@pytest.mark.parametrize("module", CHECKPOINT_MODULES)
def test_checkpoint_modules_import_no_higher_layer(module):
    direct = sorted(m for m in _imports(module) if _is_higher(m))
    assert not direct, f"{module} imports {direct}: checkpoints/ reads and writes pytrees, below the model"
    reachable = _reachable(module)
    through = sorted(m for m in reachable if _is_higher(m))
    assert not through, f"{module} reaches {through} through its imports"
    assert module not in reachable, f"{module} is in an import circle"
