r"""Optimizer benchmark: device memory and step time of AdamW with and without offload, 32- and 8-bit.

    python -m experiments.bench_optimizer                     # 7B-shaped LoRA, r=64 (~160M params)
    python -m experiments.bench_optimizer --smoke             # tiny shapes, seconds on a CPU

The parameters are LoRA adapters on q, k, v, o, gate, up and down of every layer, stacked over the
layers as qlora_jax.models.llama stores them (float32, as PEFT keeps adapters). One optimizer step
(clipping, AdamW, parameter update; gradients given) is compiled with
``qlora_jax.optim.jit_train_step`` and timed. Each optimizer runs in its own process (unless
``--noisolate``) so that the device's peak-memory counter starts from zero for each.

Reported per optimizer: where the state lives (bytes per memory kind, from the arrays), the
device's measured peak (``device.memory_stats()["peak_bytes_in_use"]``; CPU backends report no
memory stats, and say so), XLA's compile-time memory analysis, and the median step time; then
ratios against ``adamw``. The model's forward/backward is not part of the step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool("smoke", False, "Tiny shapes (2 layers, hidden 256, r 16) and 2 timed steps: a fast CPU check.")
flags.DEFINE_integer("layers", 32, "Decoder layers.")
flags.DEFINE_integer("hidden", 4096, "Hidden size (q, k, v, o are hidden x hidden).")
flags.DEFINE_integer("intermediate", 11008, "MLP intermediate size.")
flags.DEFINE_integer("rank", 64, "LoRA rank.")
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_list("optimizers", ["adamw", "paged_adamw", "adamw_8bit", "paged_adamw_8bit"],
                  "Optimizers to compare (qlora_jax.optim.OPTIMIZER_NAMES); the first is the baseline.")
flags.DEFINE_bool("isolate", True, "Run each optimizer in a fresh process (clean peak-memory counter).")
flags.DEFINE_string("json_out", None, "Also write the records as JSON here.")
flags.DEFINE_string("only", None, "Internal: run this one optimizer and print its record as JSON.")

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sizes() -> dict[str, int]:
    if FLAGS.smoke:
        return {"layers": 2, "hidden": 256, "intermediate": 512, "rank": 16, "steps": 2}
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


def run_one(name: str) -> dict:
    import jax
    import optax

    from qlora_jax import optim

    s = sizes()
    shapes = lora_shapes(s["layers"], s["hidden"], s["intermediate"], s["rank"])
    device = jax.devices()[0]

    def tree(fill):
        out: dict = {"layers": {}}
        for i, (path, shape) in enumerate(shapes.items()):
            group, module, leaf = path.split("/")
            out["layers"].setdefault(group, {}).setdefault(module, {})[leaf] = fill(i, shape)
        return out

    make = jax.jit(lambda key: tree(lambda i, shape: 0.01 * jax.random.normal(jax.random.fold_in(key, i), shape)))
    params = make(jax.random.key(0))
    grads = make(jax.random.key(1))
    optimizer = optim.make_optimizer(name, learning_rate=2e-4, max_grad_norm=0.3)
    state = optimizer.init(params)
    state_bytes = optim.bytes_by_memory_kind(state)

    def step(p, st, g):
        updates, st = optimizer.update(g, st, p)
        return optax.apply_updates(p, updates), st

    train_step = optim.jit_train_step(step, state, donate_argnums=(0, 1))
    compiled = train_step.lower(params, state, grads).compile()
    analysis = compiled.memory_analysis()
    times = []
    for i in range(2 + s["steps"]):
        tick = time.perf_counter()
        params, state = train_step(params, state, grads)
        jax.block_until_ready((params, state))
        if i >= 2:
            times.append(time.perf_counter() - tick)
    stats = device.memory_stats()
    peak = stats.get("peak_bytes_in_use") if stats else None
    kinds = set(jax.tree.leaves(optim.tree_memory_kinds(state)))
    return {
        "optimizer": name,
        "backend": f"{device.platform} ({device.device_kind})",
        "params": sum(math.prod(v) for v in shapes.values()),
        "state_bytes_by_memory_kind": state_bytes,
        "state_memory_kinds_after_steps": sorted(kinds),
        "computed_state_bytes": computed_state_bytes(shapes, name.endswith("8bit")),
        "peak_device_bytes": peak,
        "memory_stats_available": stats is not None,
        "xla_argument_bytes": getattr(analysis, "argument_size_in_bytes", None),
        "xla_temp_bytes": getattr(analysis, "temp_size_in_bytes", None),
        "xla_host_argument_bytes": getattr(analysis, "host_argument_size_in_bytes", None),
        "step_seconds_median": sorted(times)[len(times) // 2],
        "isolated": bool(FLAGS.only),
    }


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def _ratio(a, b) -> str:
    return "n/a" if a is None or b in (None, 0) else f"{a / b:.2f}x"


def report(records: list[dict]) -> str:
    base = records[0]
    lines = [f"backend: {base['backend']}; {base['params']:,} LoRA parameters; baseline {base['optimizer']}", ""]
    header = (f"{'optimizer':<18} {'state on device':>16} {'state on host':>15} {'computed m, v':>15} "
              f"{'peak device':>13} {'peak ratio':>10} {'step ms':>9} {'time ratio':>10}")
    lines += [header, "-" * len(header)]
    for r in records:
        by_kind = r["state_bytes_by_memory_kind"]
        lines.append(
            f"{r['optimizer']:<18} {_fmt_bytes(by_kind.get('device', 0)):>16} "
            f"{_fmt_bytes(by_kind.get('pinned_host', 0)):>15} {_fmt_bytes(r['computed_state_bytes']):>15} "
            f"{_fmt_bytes(r['peak_device_bytes']):>13} {_ratio(r['peak_device_bytes'], base['peak_device_bytes']):>10} "
            f"{1e3 * r['step_seconds_median']:>9.2f} "
            f"{_ratio(r['step_seconds_median'], base['step_seconds_median']):>10}"
        )
    lines.append("")
    if not base["memory_stats_available"]:
        lines.append(f"peak device memory: not available, the {base['backend']} backend reports no memory stats "
                     "(device.memory_stats() is None); run on a GPU for measured peaks.")
    elif not all(r["isolated"] for r in records):
        lines.append("warning: --noisolate: the optimizers shared one process, so each peak includes the previous "
                     "ones'; compare peaks only from an isolated run.")
    if base["backend"].startswith("cpu"):
        lines.append("note: on CPU 'device' and 'pinned_host' are the same RAM and the copies are no-ops, so step "
                     "times here measure the streaming overhead only, not PCIe transfers.")
    lines.append("'state on device/host': bytes of the optimizer state by memory kind after init (measured from "
                 "the arrays); 'computed m, v': Adam moments from the shapes (float32, or 8-bit codes + absmax per "
                 "256 values).")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.only:
        print("RECORD " + json.dumps(run_one(FLAGS.only)), flush=True)
        return
    from qlora_jax.optim import OPTIMIZER_NAMES

    unknown = [n for n in FLAGS.optimizers if n not in OPTIMIZER_NAMES]
    if unknown:
        raise app.UsageError(f"unknown optimizers {unknown}; choose among {OPTIMIZER_NAMES}")
    records = []
    for name in FLAGS.optimizers:
        if FLAGS.isolate:
            args = [sys.executable, "-m", "experiments.bench_optimizer", f"--only={name}"]
            args += ["--smoke"] if FLAGS.smoke else [
                f"--layers={FLAGS.layers}", f"--hidden={FLAGS.hidden}", f"--intermediate={FLAGS.intermediate}",
                f"--rank={FLAGS.rank}", f"--steps={FLAGS.steps}"]
            proc = subprocess.run(args, capture_output=True, text=True, env=os.environ.copy())
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RECORD ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            records.append(json.loads(lines[-1][len("RECORD "):]))
        else:
            records.append(run_one(name))
        print(f"{name}: done", flush=True)
    print(report(records))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"sizes": sizes(), "records": records}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
