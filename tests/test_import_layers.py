"""The shape of the code, kept current: the layers of CONTRIBUTING.md ("Layers") and short functions.

Every module of ``qlora_jax/``, ``kernels/`` and ``experiments/`` is parsed with ``ast``: its
imports (module-level and inside functions) may reach only its own unit and units of lower layers,
and no function body may run over :data:`MAX_FUNCTION_LINES`. Known exceptions are listed, each
with why; an entry that no longer occurs fails the test too, so that the lists only shrink.
"""

from __future__ import annotations

import ast
import re
import warnings

import pytest
from helpers import REPO, first_party_file, first_party_imports

# The layers, lowest first: a module imports only modules of its own unit and of units in lower
# layers (a unit is a package folder or one module; the longest path that a file starts with names
# its unit). CONTRIBUTING.md's table "Layers" shows the same rows, checked below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("qlora_jax/quant/", "qlora_jax/lora.py", "qlora_jax/assets.py", "qlora_jax/hardware.py",
     "qlora_jax/checkpoints/errors.py"),
    ("kernels/", "qlora_jax/tokenizer.py"),
    ("qlora_jax/linear.py", "qlora_jax/data/"),
    ("qlora_jax/models/",),
    ("qlora_jax/nn/", "qlora_jax/memory.py", "qlora_jax/synthetic.py", "qlora_jax/generate.py",
     "qlora_jax/train.py", "qlora_jax/training_state.py"),
    ("qlora_jax/optim/",),
    ("qlora_jax/distributed/",),
    ("qlora_jax/checkpoints/",),
    ("qlora_jax/peft_io.py", "qlora_jax/merge.py"),
    ("qlora_jax/model.py",),
    ("qlora_jax/eval/",),
    ("qlora_jax/recipe/",),
    ("qlora_jax/finetune.py", "qlora_jax/__init__.py"),
    ("experiments/",),
)

# Imports against the layers, as (importing file, imported file): each a debt with its reason.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
    # None: checkpoints/ no longer imports model.py or peft_io.py (issue 22). Add an entry only
    # with its reason, as a debt to pay.
}

# Files that other branches of issue 27 are changing as this list is written (kernels/ one file
# per operation; the loaders and the Orbax format without model.py; the memory planner). An
# exception listed for one of them that no longer occurs only warns, so that this test passes
# before and after those branches merge: delete the entry (and the file from here) then.
CHANGING_ELSEWHERE: tuple[str, ...] = ()

SOURCE_ROOTS = ("qlora_jax", "kernels", "experiments")


def _sources() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for root in SOURCE_ROOTS for p in (REPO / root).rglob("*.py"))


def _unit(file: str) -> str | None:
    """The unit (a ``LAYERS`` entry) a repository file belongs to: the longest that it starts with."""
    matches = [unit for layer in LAYERS for unit in layer if file == unit or (unit.endswith("/") and
                                                                                file.startswith(unit))]
    return max(matches, key=len, default=None)


LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _lazy_root_names() -> dict[str, str]:
    """``qlora_jax``'s lazily imported public names -> their modules (``qlora_jax._LAZY``)."""
    tree = ast.parse((REPO / "qlora_jax/__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("qlora_jax/__init__.py has no _LAZY table")


def _runtime_imports() -> list[tuple[str, str, int]]:
    """``(importing file, imported file, line)`` for every first-party import that runs: the ones
    under ``if TYPE_CHECKING:`` are annotations only (no dependency when the code runs, no circle)."""
    lazy = _lazy_root_names()
    found = []
    for source in _sources():
        for imported in first_party_imports(source):
            file = imported.file
            if imported.type_checking or file == source:
                continue
            if file == "qlora_jax/__init__.py":
                # `from qlora_jax import x` runs the root package, which imports nothing itself
                # (its public names load on first use): only x counts.
                name = imported.name.split(".")
                if len(name) == 1 or name[1] not in lazy:
                    continue
                file = first_party_file(lazy[name[1]])
            found.append((source, file, imported.line))
    return found


@pytest.fixture(scope="module")
def imports() -> list[tuple[str, str, int]]:
    return _runtime_imports()


def _check_stale(stale: list[str]) -> None:
    changing = [entry for entry in stale if entry.startswith(CHANGING_ELSEWHERE)]
    for entry in changing:
        warnings.warn(f"no longer occurs (fixed on another branch?): remove it from the list: {entry}",
                      stacklevel=2)
    fixed = sorted(set(stale) - set(changing))
    assert not fixed, "listed as known but no longer the case; remove from the list:\n" + "\n".join(fixed)


def test_every_module_is_in_a_layer():
    orphans = [source for source in _sources() if _unit(source) is None]
    assert not orphans, (f"in no unit of LAYERS ({__file__}): {orphans}; add their package to a layer there and "
                         "in CONTRIBUTING.md's table")
    units = [unit for layer in LAYERS for unit in layer]
    assert len(units) == len(set(units)), "a unit is listed twice in LAYERS"
    missing = [unit for unit in units if not (REPO / unit).exists()]
    assert not missing, f"LAYERS names what does not exist: {missing}"


def test_imports_go_down_the_layers(imports):
    problems, seen = [], set()
    for source, target, line in imports:
        here, there = _unit(source), _unit(target)
        if here == there or LAYER_OF[there] < LAYER_OF[here]:
            continue
        seen.add((source, target))
        if (source, target) not in KNOWN_VIOLATIONS:
            problems.append(f"{source}:{line} imports {target}: layer {LAYER_OF[there] + 1} ({there}) is not below "
                            f"layer {LAYER_OF[here] + 1} ({here})")
    assert not problems, "imports against the layers (CONTRIBUTING.md, \"Layers\"):\n" + "\n".join(problems)
    _check_stale([f"{s} -> {t}" for s, t in KNOWN_VIOLATIONS if (s, t) not in seen])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return out


def test_no_import_circle_between_units(imports):
    # The known violations close circles (checkpoints/ <-> model.py); every other edge goes down.
    edges: dict[str, set[str]] = {}
    for source, target, _ in imports:
        if _unit(source) != _unit(target) and (source, target) not in KNOWN_VIOLATIONS:
            edges.setdefault(_unit(source), set()).add(_unit(target))
    circles = _cycles(edges)
    assert not circles, f"units that import each other, directly or through others: {circles}"


def _contributing_layers() -> list[tuple[int, tuple[str, ...]]]:
    """The rows ``| <n> | `unit` `unit` ... | ...`` of CONTRIBUTING.md's "Layers" table."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    section = text.split("\n## Layers\n", 1)
    assert len(section) == 2, "CONTRIBUTING.md has no '## Layers' section"
    rows = []
    for line in section[1].split("\n## ", 1)[0].splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            rows.append((int(match.group(1)), tuple(re.findall(r"`([^`]+)`", match.group(2)))))
    return rows


def test_contributing_shows_these_layers():
    expected = [(i + 1, layer) for i, layer in enumerate(LAYERS)][::-1]  # the table reads top down
    assert _contributing_layers() == expected


# ------------------------------------------------------------------ function length

# Lines of a function: from its ``def`` to its last line, docstring excluded (documentation is
# never what makes a function hard to follow), nested functions included (they are its steps).
MAX_FUNCTION_LINES = 60

# Longer functions, "file::qualified name" -> why each is still long. To be split by the steps
# each already has (issue 27, item 3); an entry no longer over the limit fails the test (only
# warns in CHANGING_ELSEWHERE).
LONG_FUNCTIONS: dict[str, str] = {}


def _kernel_body(file: str, qualname: str, lengths: dict[str, int]) -> bool:
    """A Pallas/Triton kernel, or the function that defines one (a nested ``*kernel*``) and
    launches it: a long straight-line program by nature, kept as it is."""
    if not file.startswith("kernels/"):
        return False
    nested = [name for name in lengths if name.startswith(qualname + ".")]
    return any("kernel" in name.rsplit(".", 1)[-1] for name in [qualname, *nested])


def _function_lengths(text: str) -> dict[str, int]:
    """Qualified name -> lines of every function (methods and nested functions too) in ``text``."""
    tree = ast.parse(text)
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                lines = child.end_lineno - child.lineno + 1
                first = child.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                        isinstance(first.value.value, str):
                    lines -= first.end_lineno - first.lineno + 1
                lengths[name] = lines
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return lengths


def test_no_function_over_the_limit():
    long = {f"{file}::{name}": lines for file in _sources()
            for lengths in [_function_lengths((REPO / file).read_text())]
            for name, lines in lengths.items()
            if lines > MAX_FUNCTION_LINES and not _kernel_body(file, name, lengths)}
    new = [f"{key}: {lines} lines" for key, lines in sorted(long.items()) if key not in LONG_FUNCTIONS]
    assert not new, (f"functions over {MAX_FUNCTION_LINES} lines (docstring excluded): split them by their steps\n"
                     + "\n".join(new))
    _check_stale([f"{key} (now {'gone' if key.split('::')[0] not in _sources() else 'short enough'})"
                  for key in LONG_FUNCTIONS if key not in long])


def test_the_checks_see_what_they_should():
    # Function-level imports count, `if TYPE_CHECKING:` ones are marked; lengths leave the
    # docstring out and keep nested functions in; a module of a package can be its own unit.
    text = ("from __future__ import annotations\n"
            "from typing import TYPE_CHECKING\n"
            "from qlora_jax.models import layout\n"
            "if TYPE_CHECKING:\n"
            "    from qlora_jax.model import CausalLM\n"
            "def f():\n"
            '    """doc\n'
            "\n"
            '    more"""\n'
            "    from qlora_jax.optim import offload\n"
            "    def g():\n"
            "        return 1\n"
            "    return g\n")
    found = {(i.file, i.line, i.type_checking) for i in first_party_imports("qlora_jax/fake.py", text)}
    assert {("qlora_jax/models/layout.py", 3, False), ("qlora_jax/model.py", 5, True),
            ("qlora_jax/optim/offload.py", 10, False)} <= found
    assert _function_lengths(text) == {"f": 5, "f.g": 2}
    assert _unit("qlora_jax/checkpoints/errors.py") == "qlora_jax/checkpoints/errors.py"
    assert _unit("qlora_jax/checkpoints/load.py") == "qlora_jax/checkpoints/"
