"""Where a training step's time goes, by category: our compiled step (XLA:CPU) and torch's.

Used by ``python -m experiments.bench_cpu_vs_torch --profile``; each side's worker profiles one
step and sorts its time into :data:`CATEGORIES`.

Ours (:func:`categorize_xla_trace`): ``jax.profiler`` records one event per executed XLA thunk
(the compiled HLO instruction it runs, ``args.hlo_op``) on the CPU client's worker threads. Each
instruction's category comes from the compiled HLO text: a fusion that contains a dot is a matmul
of the ``jax.named_scope`` its dot was traced in (``base_matmul``, ``lora``, ``attention``,
``head_and_loss``, ``optimizer``: the scopes qlora_jax's code opens); a fusion made only of data
movement (copy, transpose, convert, broadcast, slice, ...) is "copies, converts, layout"; any
other fusion takes the most common scope among its computing instructions (none: "norms +
elementwise", which holds the activations, residual adds and rotary embeddings). An instruction
traced inside a rematerialised region (``rematted_computation`` in its ``op_name``: the
per-layer gradient checkpointing recomputing the forward pass in the backward pass) is
"recomputation" whatever it computes. The wall time of the step is shared out instant by instant:
while ``n`` thunks run at once on the worker threads each gets ``1/n`` of that instant, and an
instant with none running (dispatch, waits) is "idle, control flow". The categories therefore sum
to the step's wall time.

Torch's side lives in ``bench_cpu_torch_worker.py`` (``torch.profiler``, the same categories).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["CATEGORIES", "HloInstruction", "parse_hlo", "instruction_category", "categorize_xla_trace",
           "format_profile"]

CATEGORIES = (
    "dequantize",
    "base matmul",
    "LoRA matmul",
    "attention",
    "head + cross-entropy",
    "norms + elementwise",
    "recomputation",
    "optimizer",
    "copies, converts, layout",
    "idle, control flow",
)

# jax.named_scope names opened in qlora_jax (kernels/matmul_triton.py, linear.py, models/llama.py,
# train.py) and the category each stands for.
SCOPE_CATEGORIES = {
    "dequantize": "dequantize",
    "base_matmul": "base matmul",
    "lora": "LoRA matmul",
    "attention": "attention",
    "head_and_loss": "head + cross-entropy",
    "norm": "norms + elementwise",
    "optimizer": "optimizer",
}
_DATA_MOVEMENT = frozenset({
    "parameter", "constant", "copy", "transpose", "convert", "bitcast", "bitcast-convert", "broadcast",
    "reshape", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "tuple",
    "get-tuple-element", "iota", "copy-start", "copy-done",
})
_CONTROL_FLOW = frozenset({"while", "conditional", "call"})
_MATMUL = frozenset({"dot", "convolution"})


@dataclasses.dataclass(frozen=True)
class HloInstruction:
    """One instruction of compiled HLO text: its opcode, ``op_name`` metadata and called computation."""

    name: str
    opcode: str
    op_name: str
    calls: str | None


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+) = ")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+) .*\{\s*$")


def _opcode_after_type(rest: str) -> str:
    """The opcode of ``rest`` (the text after ``%name = ``): skip the result type, tuples included."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                rest = rest[i + 1:]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else rest
    return rest.strip().split("(", 1)[0]


def parse_hlo(text: str) -> dict[str, list[HloInstruction]]:
    """The instructions of each computation in compiled HLO text (``Compiled.as_text()``).

    Args:
      text: HLO module text.
    Returns:
      ``{computation name: [HloInstruction, ...]}`` in text order.
    """
    computations: dict[str, list[HloInstruction]] = {}
    current: list[HloInstruction] | None = None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head and not _INSTRUCTION.match(line):
            current = computations.setdefault(head.group("name"), [])
            continue
        match = _INSTRUCTION.match(line)
        if match is None or current is None:
            continue
        rest = line[match.end():]
        op_name = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%([^\s,}]+)", rest)
        current.append(HloInstruction(match.group("name"), _opcode_after_type(rest),
                                      op_name.group(1) if op_name else "", calls.group(1) if calls else None))
    return computations


# Scopes whose whole content is one category, whatever scopes it opens inside (the head's
# base_matmul is the head's).
_ENCLOSING_SCOPES = ("head_and_loss", "optimizer")


def _scope_names(op_name: str) -> list[str]:
    """The scope names of an ``op_name`` path, outermost first, with transformation wrappers
    removed (``transpose(jvp(head_and_loss))`` is ``head_and_loss``)."""
    return [re.sub(r"^(?:[\w-]+\()+|\)+$", "", part) for part in op_name.split("/")]


def _scope_category(op_name: str) -> str | None:
    names = _scope_names(op_name)
    for scope in _ENCLOSING_SCOPES:
        if scope in names:
            return SCOPE_CATEGORIES[scope]
    for name in reversed(names):
        if name in SCOPE_CATEGORIES:
            return SCOPE_CATEGORIES[name]
    return None


def _recomputed(op_name: str) -> bool:
    return "rematted_computation" in _scope_names(op_name)


def _classify(instruction: HloInstruction, computations: Mapping[str, list[HloInstruction]]) -> tuple[str, bool]:
    """``(what it computes, whether it is a recomputation)`` for one top-level instruction."""
    if instruction.opcode in _CONTROL_FLOW:
        return "idle, control flow", False
    body = computations.get(instruction.calls or "", []) if instruction.opcode == "fusion" else [instruction]
    computing = [i for i in body if i.opcode not in _DATA_MOVEMENT]
    if not computing:
        return "copies, converts, layout", False
    matmuls = [i for i in computing if i.opcode in _MATMUL]
    if matmuls:
        key = matmuls[0]
    else:
        votes = collections.Counter(_scope_category(i.op_name) or "norms + elementwise" for i in computing)
        top = votes.most_common(1)[0][0]
        key = next(i for i in computing if (_scope_category(i.op_name) or "norms + elementwise") == top)
    # A dot outside every scope (none in qlora_jax's step) counts with the base matmuls.
    category = _scope_category(key.op_name) or ("base matmul" if matmuls else "norms + elementwise")
    return category, _recomputed(key.op_name)


def instruction_category(instruction: HloInstruction, computations: Mapping[str, list[HloInstruction]]) -> str:
    """The category (one of :data:`CATEGORIES`) of one executed top-level instruction.

    Args:
      instruction: an instruction that runs as a thunk (a fusion, a dot, a copy, a loop, ...).
      computations: :func:`parse_hlo` of the same module (a fusion's body is looked up there).
    Returns:
      The category name; "recomputation" for anything traced in a rematerialised region.
    """
    category, recomputed = _classify(instruction, computations)
    return "recomputation" if recomputed else category


def _leaf_segments(events: Sequence[Mapping[str, Any]]) -> list[tuple[float, float, str]]:
    """``(start, end, hlo_op)`` pieces of each thread's events with their nested events cut out."""
    segments: list[tuple[float, float, str]] = []
    by_thread: dict[Any, list[Mapping[str, Any]]] = collections.defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for thread_events in by_thread.values():
        stack: list[list[Any]] = []  # [end, op, cursor]: open events, each emitted up to its cursor

        def close(stack=stack):
            end, op, cursor = stack.pop()
            segments.append((cursor, end, op))
            if stack:
                stack[-1][2] = max(stack[-1][2], end)

        for e in sorted(thread_events, key=lambda e: (e["ts"], -e["dur"])):
            start = e["ts"]
            while stack and stack[-1][0] <= start:
                close()
            if stack:
                segments.append((stack[-1][2], start, stack[-1][1]))
                stack[-1][2] = start
            stack.append([start + e["dur"], e["args"]["hlo_op"], start])
        while stack:
            close()
    return [s for s in segments if s[1] > s[0]]


def categorize_xla_trace(trace_events: Iterable[Mapping[str, Any]], hlo_text: str,
                         module_name: str | None = None) -> dict[str, Any]:
    """One profiled step's wall time by category, from a Chrome trace and the compiled HLO.

    Args:
      trace_events: the ``traceEvents`` of ``jax.profiler``'s ``*.trace.json.gz`` for one step.
      hlo_text: ``Compiled.as_text()`` of the step that ran.
      module_name: keep only thunks of this HLO module (``args.hlo_module``); None: all.
    Returns:
      ``{"seconds": {category: s}, "recomputed_seconds": {category: s}, "wall_seconds": s,
      "unknown_ops": [...]}``: the step's wall time (first thunk start to last thunk end) shared
      out as the module docstring says; ``recomputed_seconds`` splits "recomputation" by what is
      recomputed;
      ``unknown_ops`` lists thunk names not found in ``hlo_text`` (counted as "idle, control
      flow").
    """
    computations = parse_hlo(hlo_text)
    by_name = {i.name: i for body in computations.values() for i in body}
    thunks = [e for e in trace_events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
              and (module_name is None or e["args"].get("hlo_module") == module_name)]
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    recomputed = dict.fromkeys(CATEGORIES, 0.0)
    if not thunks:
        return {"seconds": seconds, "recomputed_seconds": recomputed, "wall_seconds": 0.0, "unknown_ops": []}
    unknown = set()
    category_of: dict[str, tuple[str, bool]] = {}
    for op in {e["args"]["hlo_op"] for e in thunks}:
        if op in by_name:
            category_of[op] = _classify(by_name[op], computations)
        else:
            unknown.add(op)
            category_of[op] = ("idle, control flow", False)
    segments = _leaf_segments(thunks)
    points = sorted({t for s in segments for t in s[:2]})
    # Sweep: at each elementary interval the running segments share it equally.
    starts = collections.defaultdict(list)
    ends = collections.defaultdict(list)
    for start, end, op in segments:
        starts[start].append(op)
        ends[end].append(op)
    active: collections.Counter[str] = collections.Counter()
    for left, right in zip(points, points[1:], strict=False):
        for op in ends.get(left, ()):
            active[op] -= 1
        for op in starts.get(left, ()):
            active[op] += 1
        running = [(op, n) for op, n in active.items() if n > 0]
        dt = (right - left) * 1e-6
        total = sum(n for _, n in running)
        if not total:
            seconds["idle, control flow"] += dt
            continue
        for op, n in running:
            category, again = category_of[op]
            seconds["recomputation" if again else category] += dt * n / total
            if again:
                recomputed[category] += dt * n / total
    return {"seconds": seconds, "recomputed_seconds": recomputed, "wall_seconds": (points[-1] - points[0]) * 1e-6,
            "unknown_ops": sorted(unknown)}


def format_profile(columns: Mapping[str, Mapping[str, float]]) -> str:
    """A text table: one row per category, per column its seconds and share of the column's total.

    Args:
      columns: ``{column title: {category: seconds}}``.
    Returns:
      The table, one line per category and a total line.
    """
    titles = list(columns)
    lines = [f"  {'category':<26}" + "".join(f"{t:>28}" for t in titles)]
    totals = {t: sum(columns[t].values()) or 1.0 for t in titles}
    for category in CATEGORIES:
        values = {t: columns[t].get(category, 0.0) for t in titles}
        cells = "".join(f"{values[t]:10.3f} s {100 * values[t] / totals[t]:6.1f}%".rjust(28) for t in titles)
        lines.append(f"  {category:<26}{cells}")
    lines.append(f"  {'total':<26}" + "".join(f"{sum(columns[t].values()):10.3f} s".rjust(28) for t in titles))
    return "\n".join(lines)
