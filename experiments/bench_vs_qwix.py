"""qlora-jax against qwix on the same unmodified third-party model: bytes, error, step time, peak memory.

The model is google-tunix's NNX Llama3 (random weights, seeded), converted on its seven projections
per layer (the head excluded) at the same rank and alpha, NF4 with blocks (qwix: tiles) of 64:

* ours: ``apply_qlora(model, QLoRARule([...]), *inputs)``: packed NF4 + double quantization;
* qwix: ``qwix.apply_lora_to_model(model, LoraProvider(weight_qtype="nf4", tile_size=64), *inputs)``.

It prints, from one run, ours/qwix ratios of: the frozen bytes of the converted weights as stored
(embeddings and norms excluded; qwix keeps one uint4 per element, which takes a byte on this
backend, and the column "if uint4 were packed" counts half a byte instead), the relative error of
the logits against the float model, the training-step time (one AdamW step of the adapters under
``nnx.jit``; the two sides' steps interleaved A B, B A, ... so that the machine's drifting speed
cancels; median, min and max of the per-round ratios), and the peak host memory of a process that
converts and trains (each side in a child process of its own, its high-water mark reset once the
float model is built, since that and JAX's start-up are common to both). ``--smoke`` runs tiny shapes (a
check of the harness, not a measurement).

    python -m experiments.bench_vs_qwix [--layers=4 --width=512 --rounds=8]
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 4, "Decoder layers.", lower_bound=1)
flags.DEFINE_integer("width", 512, "Model width (heads of 64).", lower_bound=64)
flags.DEFINE_integer("vocab", 4096, "Vocabulary size.", lower_bound=16)
flags.DEFINE_integer("batch", 4, "Batch size.", lower_bound=1)
flags.DEFINE_integer("seq", 128, "Sequence length.", lower_bound=2)
flags.DEFINE_integer("rank", 16, "LoRA rank.", lower_bound=1)
flags.DEFINE_float("alpha", 32.0, "LoRA alpha.")
flags.DEFINE_integer("rounds", 8, "Interleaved timing rounds (each one step per side).", lower_bound=1)
flags.DEFINE_bool("smoke", False, "Tiny shapes, 2 rounds: a check of the harness, not a measurement.")
flags.DEFINE_enum("side", None, ["ours", "qwix"], "Internal: run one side alone and print its peak RSS (child).")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tunix_llama3():
    if "tunix" not in sys.modules:
        spec = importlib.util.find_spec("tunix")
        if spec is None:
            raise SystemExit("google-tunix is not installed: pip install --no-deps -r requirements/thirdparty.txt")
        package = types.ModuleType("tunix")  # its __init__ imports trainers and hub clients; the model needs none
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["tunix"] = package
    from tunix.models.llama3 import model as llama3

    return llama3


def _settings() -> dict:
    if FLAGS.smoke:
        return dict(layers=1, width=128, vocab=256, batch=2, seq=16, rank=4, alpha=8.0, rounds=2)
    return dict(layers=FLAGS.layers, width=FLAGS.width, vocab=FLAGS.vocab, batch=FLAGS.batch, seq=FLAGS.seq,
                rank=FLAGS.rank, alpha=FLAGS.alpha, rounds=FLAGS.rounds)


def _setup(s: dict):
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    llama3 = _tunix_llama3()
    heads = s["width"] // 64
    cfg = llama3.ModelConfig(num_layers=s["layers"], vocab_size=s["vocab"], embed_dim=s["width"],
                             hidden_dim=2 * s["width"], num_heads=heads, head_dim=64, num_kv_heads=max(1, heads // 2),
                             rope_theta=10000, norm_eps=1e-5, weight_tying=False)
    model = llama3.Llama3(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var.ndim >= 2:
            var.set_value(jnp.asarray(rng.normal(0, 0.02, var.shape), var.dtype))
    tokens = jnp.asarray(rng.integers(0, s["vocab"], (s["batch"], s["seq"])), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(s["seq"]), tokens.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((s["seq"], s["seq"]), bool)), (s["batch"], s["seq"], s["seq"]))
    return model, (tokens, positions, None, mask)


def _convert(side: str, model, inputs, s: dict):
    from flax import nnx

    if side == "ours":
        from qlora_jax.lora import LoraConfig
        from qlora_jax.nn import QLoRARule, apply_qlora

        apply_qlora(model, QLoRARule(PROJECTIONS, lora=LoraConfig(r=s["rank"], alpha=s["alpha"])), *inputs,
                    rngs=nnx.Rngs(1))
        return model
    import qwix

    provider = qwix.LoraProvider(module_path=f".*({'|'.join(PROJECTIONS)}).*", rank=s["rank"], alpha=s["alpha"],
                                 weight_qtype="nf4", tile_size=64)
    return qwix.apply_lora_to_model(model, provider, *inputs, rngs=nnx.Rngs(1))


def _frozen_bytes(side: str, model) -> tuple[int, float]:
    """Bytes of the converted weights as stored, and as if 4-bit elements took half a byte."""
    import jax
    import numpy as np
    from flax import nnx

    from qlora_jax.nn.traced import QLoRAWeight

    if side == "ours":
        leaves = jax.tree.leaves(nnx.state(model, QLoRAWeight))
        stored = sum(int(x.nbytes) for x in leaves)
        return stored, float(stored)
    stored = packed = 0.0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "array" in path:  # qwix's QArray of a converted weight: qvalue (uint4) and scale
            value = np.asarray(var.get_raw_value())
            stored += value.nbytes
            packed += value.size * 0.5 if value.dtype.itemsize == 1 and "qvalue" in path else value.nbytes
    return int(stored), packed


def _train_step(model):
    import optax
    from flax import nnx

    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(m, opt, tokens, positions, mask):
        def loss_fn(mm):
            logits, _ = mm(tokens, positions, None, mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        opt.update(m, grads)
        return loss

    return lambda inputs: step(model, optimizer, inputs[0], inputs[1], inputs[3])


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _one_side(side: str) -> None:
    s = _settings()
    model, inputs = _setup(s)
    model(*inputs)[0].block_until_ready()
    # The float model and JAX's start-up are the same on both sides: count the peak from here on
    # (writing 5 to clear_refs resets the process's high-water mark of resident memory).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _peak_rss_mib()
    model = _convert(side, model, inputs, s)
    step = _train_step(model)
    for _ in range(2):
        step(inputs).block_until_ready()
    print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "start_rss_mib": start,
                      "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _child_peak(side: str) -> float:
    args = [sys.executable, "-m", "experiments.bench_vs_qwix", f"--side={side}"] + (["--smoke"] if FLAGS.smoke else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True, cwd=os.getcwd()).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv) -> None:
    del argv
    if FLAGS.side:
        _one_side(FLAGS.side)
        return
    import jax.numpy as jnp
    from flax import nnx

    s = _settings()
    print(f"settings: {s}; load average before: {_load()}")
    original, inputs = _setup(s)
    float_logits, _ = original(*inputs)
    sides = {name: _convert(name, nnx.clone(original), inputs, s) for name in ("ours", "qwix")}
    rows = {}
    for name, model in sides.items():
        logits, _ = model(*inputs)
        error = float(jnp.linalg.norm(logits - float_logits) / jnp.linalg.norm(float_logits))
        stored, packed = _frozen_bytes(name, model)
        rows[name] = dict(stored=stored, packed=packed, error=error)
    steps = {name: _train_step(model) for name, model in sides.items()}
    for step in steps.values():  # compile, then one warm step each
        step(inputs).block_until_ready()
        step(inputs).block_until_ready()
    ratios, times = [], {"ours": [], "qwix": []}
    for r in range(s["rounds"]):
        order = ("ours", "qwix") if r % 2 == 0 else ("qwix", "ours")
        took = {}
        for name in order:
            start = time.perf_counter()
            steps[name](inputs).block_until_ready()
            took[name] = time.perf_counter() - start
            times[name].append(took[name])
        ratios.append(took["ours"] / took["qwix"])
    peaks = {name: _child_peak(name) for name in ("ours", "qwix")}
    print(f"load average after: {_load()}")
    print()
    print("| | qlora-jax | qwix | ours / qwix |")
    print("|---|---|---|---|")
    o, q = rows["ours"], rows["qwix"]
    print(f"| frozen bytes of the converted weights (as stored) | {o['stored']:,} | {q['stored']:,} | "
          f"{o['stored'] / q['stored']:.3f} |")
    print(f"| ... if qwix's uint4 were packed two per byte | {o['packed']:,.0f} | {q['packed']:,.0f} | "
          f"{o['packed'] / q['packed']:.3f} |")
    print(f"| logits error vs the float model (relative, Frobenius) | {o['error']:.4f} | {q['error']:.4f} | "
          f"{o['error'] / q['error']:.3f} |")
    print(f"| training step (median s, n={s['rounds']}) | {statistics.median(times['ours']):.4f} | "
          f"{statistics.median(times['qwix']):.4f} | {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f}) |")
    print(f"| peak host memory (MiB, converting and training, after the float model is built) | {peaks['ours']:.0f} | "
          f"{peaks['qwix']:.0f} | {peaks['ours'] / peaks['qwix']:.3f} |")


def entry_point() -> None:
    app.run(main)


if __name__ == "__main__":
    entry_point()
