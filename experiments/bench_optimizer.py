r"""Optimizer benchmark: the paged optimizer's placements against a plain AdamW step, side by side.

    python -m experiments.bench_optimizer --json=outputs/bench_optimizer.json   # 7B-shaped LoRA, r=64
    python -m experiments.bench_optimizer --smoke                              # tiny shapes, seconds on a CPU

The parameters are LoRA adapters on q, k, v, o, gate, up and down of every layer, stacked over the
layers as qlora_jax.models.llama stores them (float32, as PEFT keeps adapters). One optimizer step
(clipping, AdamW, parameter update; gradients given, no model forward/backward) is compiled with
``qlora_jax.optim.jit_train_step`` and timed, for each variant:

* ``adamw``: the plain (unpaged) AdamW, the baseline of the 32-bit rows;
* ``paged_adamw:auto``: the paged optimizer's default; on a GPU with enough free memory it keeps
  the state on the device (issue target: at most 1.01x the baseline);
* ``paged_adamw:layers`` / ``:groups`` / ``:whole``: the state in pinned host memory, streamed one
  layer at a time, in groups sized to the free memory, or whole (target for streaming: 1.05x);
* ``adamw_8bit``, ``paged_adamw_8bit:auto``, ``paged_adamw_8bit:layers``: the same for 8-bit AdamW
  (baseline ``adamw_8bit``).

Each variant runs in its own process (unless ``--noisolate``) so that the device's peak-memory
counter starts from zero. Reported per variant: the placement "auto" chose and why, the bytes the
step moves each way (the planner's accounting, ``qlora_jax.memory.plan_optimizer_state``), where
the state lives (bytes per memory kind, from the arrays), the device peak
(``memory_stats()["peak_bytes_in_use"]``; CPU backends have none, and say so), the number of
asynchronous ``copy-start``/``copy-done`` pairs in the compiled program (XLA's host-offload pass
on GPU; none on CPU, where the copies are no-ops), the median step time and its ratio to the
baseline, and, for streamed variants, the transfer rate the extra time implies.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

from absl import app, flags, logging

from . import cli

FLAGS = flags.FLAGS
flags.DEFINE_bool("smoke", False, "Tiny shapes (4 layers, hidden 256, r 16) and 2 timed steps: a CPU check in seconds.")
flags.DEFINE_integer("layers", 32, "Decoder layers.")
flags.DEFINE_integer("hidden", 4096, "Hidden size (q, k, v, o are hidden x hidden).")
flags.DEFINE_integer("intermediate", 11008, "MLP intermediate size.")
flags.DEFINE_integer("rank", 64, "LoRA rank.")
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_list("variants", ["adamw", "paged_adamw:auto", "paged_adamw:layers", "paged_adamw:groups",
                               "paged_adamw:whole", "adamw_8bit", "paged_adamw_8bit:auto", "paged_adamw_8bit:layers"],
                  "OPTIMIZER[:PLACEMENT] to compare (qlora_jax.optim.OPTIMIZER_NAMES, PLACEMENTS); each paged one is "
                  "compared with the unpaged optimizer of its bit width.")
flags.DEFINE_bool("isolate", True, "Run each variant in a fresh process (clean peak-memory counter).")
flags.DEFINE_string("json", None, "Also write the records as JSON to this path.")
flags.DEFINE_alias("json_out", "json")
flags.DEFINE_string("only", None, "Internal: run this one variant and print its record as JSON.")

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sizes() -> dict[str, int]:
    if FLAGS.smoke:
        return {"layers": 4, "hidden": 256, "intermediate": 512, "rank": 16, "steps": 2}
    return {"layers": FLAGS.layers, "hidden": FLAGS.hidden, "intermediate": FLAGS.intermediate,
            "rank": FLAGS.rank, "steps": FLAGS.steps}


def lora_shapes(layers: int, hidden: int, intermediate: int, rank: int) -> dict[str, tuple[int, ...]]:
    """``"group/module/lora_A"`` -> stacked shape ``[L, r, in]`` / ``[L, out, r]`` (PEFT orientation)."""
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
            "down_proj": (hidden, intermediate)}
    shapes = {}
    for module, (out_features, in_features) in dims.items():
        group = "self_attn" if module in MODULES[:4] else "mlp"
        shapes[f"{group}/{module}/lora_A"] = (layers, rank, in_features)
        shapes[f"{group}/{module}/lora_B"] = (layers, out_features, rank)
    return shapes


def computed_state_bytes(shapes: dict[str, tuple[int, ...]], eight_bit: bool) -> int:
    """AdamW moment bytes from the shapes (step counters aside): float32 m and v, or 8-bit codes +
    float32 absmax per 256 values of each layer's tensor (tensors under 4096 values stay float32)."""
    total = 0
    for shape in shapes.values():
        per_layer = math.prod(shape[1:])
        if eight_bit and per_layer >= 4096:
            total += shape[0] * 2 * (per_layer + 4 * -(-per_layer // 256))
        else:
            total += shape[0] * 2 * 4 * per_layer
    return total


def parse_variant(variant: str) -> tuple[str, str | None]:
    name, _, placement = variant.partition(":")
    return name, (placement or None)


def baseline_of(variant: str) -> str:
    name, _ = parse_variant(variant)
    return "adamw_8bit" if name.endswith("8bit") else "adamw"


def run_one(variant: str) -> dict:
    import jax
    import optax

    from qlora_jax import optim
    from qlora_jax.optim import offload

    name, placement = parse_variant(variant)
    s = sizes()
    shapes = lora_shapes(s["layers"], s["hidden"], s["intermediate"], s["rank"])
    device = jax.devices()[0]
    make = jax.jit(functools.partial(_random_tree, shapes))
    params = make(jax.random.key(0))
    grads = make(jax.random.key(1))
    kwargs = {"placement": placement} if placement else {}
    optimizer = optim.make_optimizer(name, learning_rate=2e-4, max_grad_norm=0.3, **kwargs)
    free_before = offload.measure_free_device_bytes([device])
    state = optimizer.init(params)
    state_bytes = optim.bytes_by_memory_kind(state)

    decision, traffic = _replayed_decision(name, placement, params, free_before)

    def step(p, st, g):
        updates, st = optimizer.update(g, st, p)
        return optax.apply_updates(p, updates), st

    train_step = optim.jit_train_step(step, state, donate_argnums=(0, 1))
    compiled = train_step.lower(params, state, grads).compile()
    hlo = compiled.as_text()
    analysis = compiled.memory_analysis()
    params, state, times = _timed_steps(train_step, params, state, grads, s["steps"])
    stats = device.memory_stats()
    peak = stats.get("peak_bytes_in_use") if stats else None
    return {
        "variant": variant,
        "optimizer": name,
        "baseline": baseline_of(variant),
        "backend": f"{device.platform} ({device.device_kind})",
        "jax_version": jax.__version__,
        "params": sum(math.prod(v) for v in shapes.values()),
        "placement_requested": placement or ("auto" if name.startswith("paged_") else None),
        "placement": None if decision is None else {"where": decision.where,
                                                    "layers_per_chunk": decision.layers_per_chunk,
                                                    "whole": decision.whole, "reason": decision.reason},
        "bytes_to_device_per_step": None if traffic is None else traffic.to_device_bytes_per_step,
        "bytes_to_host_per_step": None if traffic is None else traffic.to_host_bytes_per_step,
        "free_device_bytes_at_init": free_before,
        "state_bytes_by_memory_kind": state_bytes,
        "state_memory_kinds_after_steps": sorted(set(jax.tree.leaves(optim.tree_memory_kinds(state)))),
        "computed_state_bytes": computed_state_bytes(shapes, name.endswith("8bit")),
        "peak_device_bytes": peak,
        "memory_stats_available": stats is not None,
        "xla_argument_bytes": getattr(analysis, "argument_size_in_bytes", None),
        "xla_temp_bytes": getattr(analysis, "temp_size_in_bytes", None),
        "xla_host_argument_bytes": getattr(analysis, "host_argument_size_in_bytes", None),
        "hlo_copy_start": hlo.count(" copy-start("),
        "hlo_copy_done": hlo.count(" copy-done("),
        "step_seconds_median": sorted(times)[len(times) // 2],
        "isolated": bool(FLAGS.only),
    }


def _random_tree(shapes: dict[str, tuple[int, ...]], key: Any) -> dict:
    """LoRA-shaped parameters ``{"layers": {group: {module: {leaf: N(0, 0.01²)}}}}`` from ``key``."""
    import jax

    out: dict = {"layers": {}}
    for i, (path, shape) in enumerate(shapes.items()):
        group, module, leaf = path.split("/")
        out["layers"].setdefault(group, {}).setdefault(module, {})[leaf] = (
            0.01 * jax.random.normal(jax.random.fold_in(key, i), shape))
    return out


def _replayed_decision(name: str, placement: str | None, params: Any, free_before: int | None) -> tuple[Any, Any]:
    """``(Placement, StatePlan)`` of a paged optimizer's init, replayed with the free memory it saw
    (the log line says the same); ``(None, None)`` for the others."""
    from qlora_jax import optim
    from qlora_jax.optim import offload

    if not name.startswith("paged_"):
        return None, None
    core = optim.adamw_8bit(2e-4) if name.endswith("8bit") else optim.adamw(2e-4)
    layout = optim.state_layout(core, params, optim.layer_stacked, optim.streaming.DEFAULT_MAX_GROUP_SIZE)
    decision = optim.choose_placement(layout, params, placement or "auto", free_device_bytes=free_before)
    return decision, offload.state_plan(layout, params, decision)


def _timed_steps(train_step: Any, params: Any, state: Any, grads: Any, steps: int) -> tuple[Any, Any, list[float]]:
    """Runs 2 warm-up steps and ``steps`` timed ones; returns the final params, state and the times (s)."""
    import jax

    times = []
    for i in range(2 + steps):
        tick = time.perf_counter()
        params, state = train_step(params, state, grads)
        jax.block_until_ready((params, state))
        if i >= 2:
            times.append(time.perf_counter() - tick)
    return params, state, times


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def add_ratios(records: list[dict]) -> None:
    """Time and peak ratios against each record's baseline, and the transfer rate streaming implies."""
    by_variant = {r["variant"]: r for r in records}
    for r in records:
        base = by_variant.get(r["baseline"])
        r["time_ratio"] = None if base is None else r["step_seconds_median"] / base["step_seconds_median"]
        r["peak_ratio"] = (None if base is None or not r["peak_device_bytes"] or not base["peak_device_bytes"]
                           else r["peak_device_bytes"] / base["peak_device_bytes"])
        extra = None if base is None else r["step_seconds_median"] - base["step_seconds_median"]
        moved = (r["bytes_to_device_per_step"] or 0) + (r["bytes_to_host_per_step"] or 0)
        # Only where copies are real transfers (on CPU every memory kind is the same RAM).
        real = not r["backend"].startswith("cpu")
        r["implied_transfer_bytes_per_second"] = moved / extra if real and moved and extra and extra > 0 else None


def report(records: list[dict]) -> str:
    first = records[0]
    lines = [f"backend: {first['backend']}, jax {first['jax_version']}; {first['params']:,} LoRA parameters", ""]
    header = (f"{'variant':<24} {'placement':<26} {'state on device':>16} {'state on host':>14} "
              f"{'to dev/step':>12} {'to host/step':>12} {'copies':>7} {'peak device':>12} {'step ms':>9} "
              f"{'vs base':>8}")
    lines += [header, "-" * len(header)]
    for r in records:
        by_kind = r["state_bytes_by_memory_kind"]
        placement = r["placement"]
        where = "-" if placement is None else (
            "device" if placement["where"] == "device" else
            "host, whole" if placement["whole"] else f"host, {placement['layers_per_chunk']} layer(s)/chunk")
        ratio = "base" if r["time_ratio"] is None or r["variant"] == r["baseline"] else f"{r['time_ratio']:.3f}x"
        lines.append(
            f"{r['variant']:<24} {where:<26} {_fmt_bytes(by_kind.get('device', 0)):>16} "
            f"{_fmt_bytes(by_kind.get('pinned_host', 0)):>14} {_fmt_bytes(r['bytes_to_device_per_step']):>12} "
            f"{_fmt_bytes(r['bytes_to_host_per_step']):>12} {r['hlo_copy_start']:>7} "
            f"{_fmt_bytes(r['peak_device_bytes']):>12} {1e3 * r['step_seconds_median']:>9.2f} {ratio:>8}")
    lines.append("")
    for r in records:
        if r["placement"] is not None:
            lines.append(f"{r['variant']}: {r['placement']['reason']}")
        if r["implied_transfer_bytes_per_second"]:
            lines.append(f"{r['variant']}: the extra time over {r['baseline']} is "
                         f"{r['implied_transfer_bytes_per_second'] / 1e9:.1f} GB/s of the bytes it moves")
    lines.append("")
    lines.append("targets (issue 15): paged 'auto' with enough device memory <= 1.01x its baseline; streamed <= 1.05x.")
    if not first["memory_stats_available"]:
        lines.append(f"peak device memory: not available, the {first['backend']} backend reports no memory stats "
                     "(device.memory_stats() is None); run on a GPU for measured peaks.")
    elif not all(r["isolated"] for r in records):
        lines.append("warning: --noisolate: the variants shared one process, so each peak includes the previous "
                     "ones'; compare peaks only from an isolated run.")
    if first["backend"].startswith("cpu"):
        lines.append("note: on CPU 'device' and 'pinned_host' are the same RAM and the copies are no-ops (no "
                     "copy-start in the program), so step times here measure the streaming loop's overhead only, "
                     "not PCIe transfers; 'auto' keeps the state on the device.")
    lines.append("'to dev/step', 'to host/step': bytes the compiled step copies each way (the planner's accounting); "
                 "'copies': copy-start ops in the compiled program.")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.only:
        print("RECORD " + json.dumps(run_one(FLAGS.only)), flush=True)
        return
    from qlora_jax.optim import OPTIMIZER_NAMES, PLACEMENTS

    for variant in FLAGS.variants:
        name, placement = parse_variant(variant)
        bad_placement = placement and (placement not in PLACEMENTS or not name.startswith("paged_"))
        if name not in OPTIMIZER_NAMES or bad_placement:
            raise app.UsageError(f"unknown variant {variant!r}: OPTIMIZER[:PLACEMENT] with an optimizer among "
                                 f"{OPTIMIZER_NAMES} and, for paged ones, a placement among {PLACEMENTS}")
    records = []
    for variant in FLAGS.variants:
        if FLAGS.isolate:
            args = [sys.executable, "-m", "experiments.bench_optimizer", f"--only={variant}"]
            args += ["--smoke"] if FLAGS.smoke else [
                f"--layers={FLAGS.layers}", f"--hidden={FLAGS.hidden}", f"--intermediate={FLAGS.intermediate}",
                f"--rank={FLAGS.rank}", f"--steps={FLAGS.steps}"]
            proc = subprocess.run(args, capture_output=True, text=True, env=os.environ.copy())
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RECORD ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                                   f"{proc.stderr[-4000:]}")
            records.append(json.loads(lines[-1][len("RECORD "):]))
        else:
            records.append(run_one(variant))
        logging.info("%s: done", variant)
    add_ratios(records)
    print(report(records))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"sizes": sizes(), "records": records}, f, indent=2)


if __name__ == "__main__":
    cli.run(main, __name__)
