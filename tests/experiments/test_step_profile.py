"""experiments.step_profile and the torch worker's categorizer: the sorting of a step's time.

The wall-time sweep is checked on hand-made overlapping events whose shares are worked out by
hand; the scope parsing on the op names JAX really writes (``transpose(jvp(lora))`` and the
like) in a compiled gradient; the torch categorizer on a hand-made event tree.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import step_profile as sp

HLO = """HloModule jit_step, is_scheduled=true

%fused_lora (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/while/body/transpose(jvp())/checkpoint/lora/dot_general"}
}

%fused_norm (p0.1: f32[4,4]) -> f32[4,4] {
  %p0.1 = f32[4,4]{1,0} parameter(0)
  ROOT %multiply.1 = f32[4,4]{1,0} multiply(%p0.1, %p0.1), metadata={op_name="jit(step)/transpose(jvp())/checkpoint/rematted_computation/norm/mul"}
}

%fused_head (p0.2: f32[4,4]) -> (f32[4,4], f32[4]) {
  %p0.2 = f32[4,4]{1,0} parameter(0)
  %exponential.1 = f32[4,4]{1,0} exponential(%p0.2), metadata={op_name="jit(step)/jvp(head_and_loss)/while/body/base_matmul/exp"}
  %constant.1 = f32[] constant(0)
  %reduce.1 = f32[4]{0} reduce(%exponential.1, %constant.1), dimensions={1}, to_apply=%add, metadata={op_name="jit(step)/jvp(head_and_loss)/reduce_sum"}
  ROOT %tuple.1 = (f32[4,4]{1,0}, f32[4]{0}) tuple(%exponential.1, %reduce.1)
}

ENTRY %main (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %lora_fusion = f32[4,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_lora, metadata={op_name="jit(step)/lora/dot_general"}
  %copy.7 = f32[4,4]{0,1} copy(%lora_fusion), metadata={op_name="jit(step)/lora/transpose"}
  %norm_fusion = f32[4,4]{1,0} fusion(%copy.7), kind=kLoop, calls=%fused_norm
  %head_fusion = (f32[4,4]{1,0}, f32[4]{0}) fusion(%norm_fusion), kind=kLoop, calls=%fused_head
  ROOT %while.3 = f32[4,4]{1,0} while(%a), condition=%cond, body=%body
}
"""  # noqa: E501 - HLO text as XLA prints it


def _event(tid: int, ts: float, dur: float, op: str, module: str = "jit_step") -> dict:
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": op,
            "args": {"hlo_op": op, "hlo_module": module}}


def test_parse_hlo_reads_opcodes_calls_and_op_names():
    computations = sp.parse_hlo(HLO)
    assert set(computations) == {"fused_lora", "fused_norm", "fused_head", "main"}
    entry = {i.name: i for i in computations["main"]}
    assert [(i.opcode, i.calls) for i in computations["main"]] == [
        ("parameter", None), ("parameter", None), ("fusion", "fused_lora"), ("copy", None),
        ("fusion", "fused_norm"), ("fusion", "fused_head"), ("while", None)]
    assert entry["copy.7"].op_name == "jit(step)/lora/transpose"
    # A tuple-typed result: the opcode after the parenthesised type.
    assert [i.opcode for i in computations["fused_head"]] == ["parameter", "exponential", "constant", "reduce",
                                                              "tuple"]


def test_instruction_categories():
    computations = sp.parse_hlo(HLO)
    entry = {i.name: i for i in computations["main"]}
    got = {name: sp.instruction_category(entry[name], computations)
           for name in ("lora_fusion", "copy.7", "norm_fusion", "head_fusion", "while.3")}
    assert got == {
        "lora_fusion": "LoRA matmul",  # the dot's scope, through the transformation wrappers
        "copy.7": "copies, converts, layout",  # data movement only, whatever its scope
        "norm_fusion": "recomputation",  # traced in a rematerialised region
        "head_fusion": "head + cross-entropy",  # the enclosing scope wins over base_matmul inside it
        "while.3": "idle, control flow",
    }


def test_wall_time_is_shared_between_concurrent_thunks():
    # Thread 1: lora_fusion [0, 10) with copy.7 nested in [2, 4), then head_fusion [20, 22).
    # Thread 2: norm_fusion [5, 15). Another module's thunk is ignored.
    events = [_event(1, 0, 10, "lora_fusion"), _event(1, 2, 2, "copy.7"), _event(2, 5, 10, "norm_fusion"),
              _event(1, 20, 2, "head_fusion"), _event(2, 30, 50, "lora_fusion", module="jit_other"),
              {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 99, "name": "python", "args": {}}]
    result = sp.categorize_xla_trace(events, HLO, "jit_step")
    us = 1e-6
    # [0,2) lora alone; [2,4) copy alone; [4,5) lora alone; [5,10) lora and norm share;
    # [10,15) norm alone; [15,20) nothing runs; [20,22) head alone.
    expected = dict.fromkeys(sp.CATEGORIES, 0.0)
    expected.update({"LoRA matmul": (2 + 1 + 2.5) * us, "copies, converts, layout": 2 * us,
                     "recomputation": (2.5 + 5) * us, "idle, control flow": 5 * us,
                     "head + cross-entropy": 2 * us})
    assert result["seconds"] == pytest.approx(expected, abs=1e-15)
    assert result["wall_seconds"] == pytest.approx(22 * us)
    assert sum(result["seconds"].values()) == pytest.approx(result["wall_seconds"])
    recomputed = dict.fromkeys(sp.CATEGORIES, 0.0)
    recomputed["norms + elementwise"] = 7.5 * us
    assert result["recomputed_seconds"] == pytest.approx(recomputed, abs=1e-15)
    assert result["unknown_ops"] == []


def test_scopes_of_a_compiled_gradient():
    """JAX's own op names (jvp/transpose wrappers, checkpoint) map to the scopes opened around them."""

    def loss(a, w, x):
        with jax.named_scope("dequantize"):
            w = w * 2.0 + 1.0
        with jax.named_scope("base_matmul"):
            y = x @ w
        with jax.named_scope("lora"):
            y = y + (x @ a) @ a.T

        def head(y):
            with jax.named_scope("head_and_loss"), jax.named_scope("base_matmul"):
                return jnp.sum(jnp.tanh(y @ w.T))

        return jax.checkpoint(head)(y)

    rng = np.random.default_rng(0)
    a, w, x = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((64, 8), (64, 64), (32, 64)))
    text = jax.jit(jax.grad(loss)).lower(a, w, x).compile().as_text()
    computations = sp.parse_hlo(text)
    dots = [i for body in computations.values() for i in body if i.opcode == "dot"]
    assert dots and all(i.op_name for i in dots)
    categories = {sp._classify(i, computations) for i in dots}
    # The LoRA products and their gradients, the base product's input gradient, and the head's
    # forward, recomputation and gradient.
    assert ("LoRA matmul", False) in categories
    assert ("base matmul", False) in categories
    assert {c for c, _ in categories} <= {"LoRA matmul", "base matmul", "head + cross-entropy"}
    assert "head + cross-entropy" in {c for c, _ in categories}
    entry = next(body for body in computations.values() if any(i.opcode == "parameter" for i in body)
                 and any(i.opcode == "fusion" for i in body))
    for instruction in entry:
        assert sp.instruction_category(instruction, computations) in sp.CATEGORIES


@dataclasses.dataclass
class _TorchEvent:
    name: str
    self_cpu_time_total: float  # microseconds, as torch.profiler's FunctionEvent
    input_shapes: list = dataclasses.field(default_factory=list)
    cpu_parent: _TorchEvent | None = None


def _torch_worker():
    folder = str(pathlib.Path(sp.__file__).parent)
    sys.path.insert(0, folder)  # the worker imports step_profile as a sibling module
    try:
        return importlib.import_module("bench_cpu_torch_worker")
    finally:
        sys.path.remove(folder)


def test_torch_categories_follow_ancestors_shapes_and_labels():
    worker = _torch_worker()
    forward = _TorchEvent("forward", 100)
    backward = _TorchEvent("backward", 50)
    recompute = _TorchEvent("recompute", 10, cpu_parent=backward)
    optimizer = _TorchEvent("optimizer", 5)
    dequant = _TorchEvent("bitsandbytes::dequantize_4bit", 3000, cpu_parent=forward)
    sdpa = _TorchEvent("aten::_scaled_dot_product_flash_attention_for_cpu", 200, cpu_parent=forward)
    events = [
        forward, backward, recompute, optimizer, dequant, sdpa,
        _TorchEvent("aten::copy_", 1000, [[2048, 576]], cpu_parent=dequant),  # under the dequantize op
        _TorchEvent("aten::mm", 2000, [[2048, 576], [576, 64]], cpu_parent=forward),  # rank 64: LoRA
        _TorchEvent("aten::mm", 7000, [[2048, 576], [576, 1536]], cpu_parent=forward),  # base
        _TorchEvent("aten::mm", 4000, [[256, 576], [576, 49152]], cpu_parent=forward),  # vocabulary: head
        _TorchEvent("aten::bmm", 4000, [[24, 256, 64], [24, 64, 256]], cpu_parent=sdpa),  # inside attention
        _TorchEvent("aten::mul", 600, [[2048, 576]], cpu_parent=forward),
        _TorchEvent("aten::transpose", 300, [[2048, 576]], cpu_parent=forward),
        _TorchEvent("aten::mm", 5000, [[2048, 576], [576, 1536]], cpu_parent=recompute),
        _TorchEvent("aten::mul", 400, [[2048, 576]], cpu_parent=recompute),
        _TorchEvent("aten::add_", 1000, [[64, 576]], cpu_parent=optimizer),
        _TorchEvent("autograd::engine::evaluate_function: MmBackward0", 90, cpu_parent=backward),
    ]
    wall = 0.05
    result = worker.categorize_torch_events(events, wall, lora_r=64, vocab=49152)
    ms = 1e-3
    expected = dict.fromkeys(sp.CATEGORIES, 0.0)
    expected.update({
        "dequantize": 4 * ms, "LoRA matmul": 2 * ms, "base matmul": 7 * ms, "head + cross-entropy": 4 * ms,
        "attention": 4.2 * ms, "norms + elementwise": 0.6 * ms, "copies, converts, layout": 0.3 * ms,
        "recomputation": 5.41 * ms, "optimizer": 1.005 * ms,
    })
    # The wrappers' own time (forward, backward, autograd) and the wall time outside every event.
    expected["idle, control flow"] = wall - sum(expected.values())
    assert result["seconds"] == pytest.approx(expected, abs=1e-12)
    recomputed = dict.fromkeys(sp.CATEGORIES, 0.0)
    recomputed.update({"base matmul": 5 * ms, "norms + elementwise": 0.4 * ms, "idle, control flow": 0.01 * ms})
    assert result["recomputed_seconds"] == pytest.approx(recomputed, abs=1e-12)
    assert sum(result["seconds"].values()) == pytest.approx(wall)
