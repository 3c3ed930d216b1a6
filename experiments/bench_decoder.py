r"""The built-in scanned LLaMA decoder against the same decoder built from ``qlora_jax.nn`` layers.

    python -m experiments.bench_decoder                         # tiny and small LLaMA shapes, CPU
    python -m experiments.bench_decoder --configs=small --steps=20

Three implementations of one model, holding the same arrays under the same names
(``layers.{i}.self_attn.q_proj.weight`` / ``.lora_A`` / ``.lora_B``, as ``CausalLM`` and PEFT):

* ``scanned``: :func:`qlora_jax.models.llama.forward`, pure functions over layer-stacked pytrees
  under ``jax.lax.scan`` (what ``CausalLM`` and the training recipe run);
* ``nnx_unrolled``: an ``nnx.Module`` decoder whose linear layers are
  :class:`~qlora_jax.nn.QLoRALinear`, one Python loop iteration per layer (what a user model
  converted with ``apply_qlora`` looks like);
* ``nnx_scanned``: the same modules stacked over the layers (``QLoRALinear`` with leading
  axes, as ``apply_qlora`` makes from ``nnx.vmap`` models) under a scan over the layer state.

Each runs one training step's work: the loss (mean next-token cross-entropy over all positions)
and its gradient with respect to the adapters, jitted. Printed per shape: compile time (lowering
+ XLA compilation from empty caches, the fastest of ``--compile_rounds``) and the median step
time of ``--steps`` calls after a warm-up, the implementations called in turn so that a shared
machine's load falls on all alike, with ratios to ``scanned``, and the largest logit difference
between each implementation and ``scanned``.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags, logging

from . import cli

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["tiny", "small"], "Shapes to measure (see SHAPES).")
flags.DEFINE_integer("steps", 10, "Timed steps per implementation (after one warm-up).")
flags.DEFINE_integer("compile_rounds", 3, "Compilations per implementation (from empty caches); the fastest counts.")
flags.DEFINE_integer("batch", 2, "Sequences per step.")
flags.DEFINE_integer("seq_len", 64, "Tokens per sequence.")
flags.DEFINE_integer("lora_r", 8, "LoRA rank on every linear layer.")
flags.DEFINE_string("compute_dtype", "float32", "Activations' dtype (float32: XLA's CPU bf16 matmuls are emulated).")

# (layers, hidden, intermediate, heads, kv heads, vocab)
SHAPES = {
    "tiny": (2, 64, 128, 4, 2, 256),
    "small": (8, 256, 512, 8, 4, 1024),
    "deep": (24, 256, 512, 8, 4, 1024),
    "smollm2-135m": (30, 576, 1536, 9, 3, 49152),
}


def _linear(spec, base, lora, group: str, name: str, index: int | None):
    """QLoRALinear of one layer (``index``) or of the whole stack (``index=None``), holding the arrays."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax.nn import QLoRALinear

    take = (lambda a: a) if index is None else (lambda a: a[index])
    entry = base["layers"][group][name]
    pair = lora["layers"][group][name]
    layer = QLoRALinear(jax.tree.map(take, entry["weight"]),
                        None if "bias" not in entry else take(entry["bias"]),
                        lora=spec.lora_config, dtype=jnp.dtype(spec.compute_dtype),
                        kernel_backend=spec.kernel_backend, rngs=nnx.Rngs(0))
    layer.lora_A.set_value(take(pair["lora_A"]))
    layer.lora_B.set_value(take(pair["lora_B"]))
    return layer


def _decoder_layer_class(spec, base, lora):
    """The NNX decoder layer over ``base``'s and ``lora``'s arrays: ``DecoderLayer(index)``."""
    import jax
    from flax import nnx

    from qlora_jax.models import layout, llama, rope
    from qlora_jax.nn import FrozenWeights

    config = spec.config

    class Attention(nnx.Module):
        def __init__(self, index):
            for name in layout.ATTENTION_LAYERS:
                setattr(self, name, _linear(spec, base, lora, "self_attn", name, index))

    class MLP(nnx.Module):
        def __init__(self, index):
            for name in layout.MLP_LAYERS:
                setattr(self, name, _linear(spec, base, lora, "mlp", name, index))

    class DecoderLayer(nnx.Module):
        def __init__(self, index):
            take = (lambda a: a) if index is None else (lambda a: a[index])
            self.input_layernorm = FrozenWeights(take(base["layers"]["input_layernorm"]))
            self.post_attention_layernorm = FrozenWeights(take(base["layers"]["post_attention_layernorm"]))
            self.self_attn = Attention(index)
            self.mlp = MLP(index)

        def __call__(self, h, cos, sin, mask):
            b, t, _ = h.shape
            attn, mlp = self.self_attn, self.mlp
            x = llama.rms_norm(h, self.input_layernorm[...], config.rms_norm_eps)
            q = attn.q_proj(x).reshape(b, t, config.num_attention_heads, config.head_dim)
            k = attn.k_proj(x).reshape(b, t, config.num_key_value_heads, config.head_dim)
            v = attn.v_proj(x).reshape(b, t, config.num_key_value_heads, config.head_dim)
            # The decoder's own attention, so that only the layer structure differs.
            out = llama.grouped_query_attention(rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin), v,
                                                mask, config.attention_scale, config.attn_logit_softcapping)
            h = h + attn.o_proj(out)
            x = llama.rms_norm(h, self.post_attention_layernorm[...], config.rms_norm_eps)
            return h + mlp.down_proj(jax.nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x))

    return DecoderLayer


def build_nnx(spec, base, lora, *, stacked: bool):
    """The decoder as NNX modules holding ``base``'s and ``lora``'s arrays (same names, no copies)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax.linear import base_matmul
    from qlora_jax.models import llama, rope
    from qlora_jax.nn import FrozenWeights

    config = spec.config
    dtype = jnp.dtype(spec.compute_dtype)
    DecoderLayer = _decoder_layer_class(spec, base, lora)

    class Decoder(nnx.Module):
        def __init__(self):
            self.embed_tokens = FrozenWeights(base["embed_tokens"])
            self.norm = FrozenWeights(base["norm"])
            self.lm_head = FrozenWeights(llama.output_head(config, base))
            if stacked:
                self.layers = DecoderLayer(None)
            else:
                self.layers = nnx.List([DecoderLayer(i) for i in range(config.num_hidden_layers)])

        def __call__(self, ids):
            b, t = ids.shape
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            inv_freq = rope.inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling_dict)
            cos, sin = rope.rotary_cos_sin(positions, inv_freq)
            mask = llama.make_attention_mask(None, b, t, t, jnp.zeros((), jnp.int32), config.sliding_window)
            h = self.embed_tokens[...][ids].astype(dtype)
            if stacked:
                # A functional scan over the stacked layer's state (nnx.scan cannot run on a module merged
                # inside jax.grad in graph mode): each iteration sees one layer's slices.
                layer_def, layer_state = nnx.split(self.layers)

                def body(h, state):
                    return nnx.merge(layer_def, state)(h, cos, sin, mask), None

                h, _ = jax.lax.scan(body, h, layer_state)
            else:
                for layer in self.layers:
                    h = layer(h, cos, sin, mask)
            h = llama.rms_norm(h, self.norm[...], config.rms_norm_eps)
            return base_matmul(h, self.lm_head[...], backend=spec.kernel_backend).astype(jnp.float32)

    return Decoder()


def compile_timed(loss_and_grad, args) -> tuple[object, float]:
    """The jitted function lowered and compiled for ``args``, and the seconds that took."""
    import jax

    started = time.perf_counter()
    compiled = jax.jit(loss_and_grad).lower(*args).compile()
    return compiled, time.perf_counter() - started


def time_interleaved(runs: dict[str, tuple[object, tuple]], steps: int) -> dict[str, float]:
    """Median seconds per call of each compiled function, called in turn (round robin), so that a
    shared machine's varying load falls on every implementation alike."""
    import jax

    for compiled, args in runs.values():
        jax.block_until_ready(compiled(*args))  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, (compiled, args) in runs.items():
            tick = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - tick)
    return {name: statistics.median(t) for name, t in times.items()}


def _model(shape_name: str):
    """``(spec, base, lora, ids)`` of a shape: random base, adapters with a non-zero B, random tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qlora_jax.lora import LoraConfig
    from qlora_jax.model import init_lora_params
    from qlora_jax.models.config import LlamaConfig
    from qlora_jax.models.spec import ModelSpec
    from qlora_jax.synthetic import random_base

    layers, hidden, intermediate, heads, kv_heads, vocab = SHAPES[shape_name]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden // heads, max_position_embeddings=max(FLAGS.seq_len, 64))
    spec = ModelSpec(config, LoraConfig(r=FLAGS.lora_r), compute_dtype=FLAGS.compute_dtype)
    base = random_base(config, jax.random.key(0), dtype=jnp.dtype(FLAGS.compute_dtype), weight_std=hidden ** -0.5)
    lora = init_lora_params(jax.random.key(1), spec)
    # Non-zero B, so that the adapters take part in the forward pass as they do after a step.
    lora = jax.tree_util.tree_map_with_path(
        lambda p, a: a if "lora_A" in jax.tree_util.keystr(p) else
        jax.random.normal(jax.random.key(2), a.shape, a.dtype) * 0.01, lora)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, vocab, (FLAGS.batch, FLAGS.seq_len)), jnp.int32)
    return spec, base, lora, ids


def _jobs(spec, base, lora, ids) -> tuple[dict[str, tuple], dict[str, object]]:
    """Each implementation's loss-and-gradient function with its arguments, and the NNX graphdefs."""
    import jax
    import optax
    from flax import nnx

    from qlora_jax.models import llama

    def cross_entropy(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    def scanned(lora_tree, base_tree, ids):
        return cross_entropy(llama.forward(spec, base_tree, lora_tree, ids)[0])

    jobs = {"scanned": (jax.value_and_grad(scanned), (lora, base, ids))}
    graphdefs = {}
    for name, stacked in (("nnx_unrolled", False), ("nnx_scanned", True)):
        graphdef, adapters, frozen = nnx.split(build_nnx(spec, base, lora, stacked=stacked), nnx.LoRAParam, ...)

        def loss(adapters, frozen, ids, graphdef=graphdef):
            return cross_entropy(nnx.merge(graphdef, adapters, frozen)(ids))

        jobs[name] = (jax.value_and_grad(loss), (adapters, frozen, ids))
        graphdefs[name] = graphdef
    return jobs, graphdefs


def _compile_all(jobs: dict[str, tuple]) -> tuple[dict[str, list[float]], dict[str, tuple]]:
    """Each job compiled ``FLAGS.compile_rounds`` times from empty caches: its seconds and the compiled runs.

    The order rotates each round: a shared machine's load spikes and the process's first compilation
    would otherwise land on whichever implementation comes first.
    """
    import jax

    compile_s: dict[str, list[float]] = {name: [] for name in jobs}
    runs = {}
    names = list(jobs)
    for r in range(FLAGS.compile_rounds):
        jax.clear_caches()
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, args = jobs[name]
            compiled, seconds = compile_timed(fn, args)
            compile_s[name].append(seconds)
            runs[name] = (compiled, args)
    return compile_s, runs


def run_shape(shape_name: str) -> list[dict]:
    """One shape's records: per implementation, compile and step seconds and the logits' distance."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax.models import llama

    spec, base, lora, ids = _model(shape_name)
    jobs, graphdefs = _jobs(spec, base, lora, ids)
    compile_s, runs = _compile_all(jobs)
    reference = jax.jit(lambda lo, b, i: llama.forward(spec, b, lo, i)[0])(lora, base, ids)
    results = []
    for name in jobs:
        record = {"impl": name, "compile_s": min(compile_s[name])}
        if name in graphdefs:
            adapters, frozen, _ = jobs[name][1]
            logits = jax.jit(lambda a, f, i, g=graphdefs[name]: nnx.merge(g, a, f)(i))(adapters, frozen, ids)
            record["max_logit_diff"] = float(jnp.max(jnp.abs(logits - reference)))
        results.append(record)
    step_seconds = time_interleaved(runs, FLAGS.steps)
    for record in results:
        record["step_s"] = step_seconds[record["impl"]]
        record["shape"] = shape_name
    return results


def main(argv: list[str]) -> None:
    del argv
    import jax

    unknown = [c for c in FLAGS.configs if c not in SHAPES]
    if unknown:
        raise app.UsageError(f"--configs: unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    logging.info("backend %s, %d steps, batch %d x %d tokens, r=%d, %s", jax.default_backend(), FLAGS.steps,
                 FLAGS.batch, FLAGS.seq_len, FLAGS.lora_r, FLAGS.compute_dtype)
    rows = [record for shape in FLAGS.configs for record in run_shape(shape)]
    header = f"{'shape':<14}{'implementation':<15}{'compile s':>10}{'step ms':>10}{'compile x':>10}{'step x':>8}" \
             f"{'max |dlogit|':>14}"
    lines = [header, "-" * len(header)]
    for row in rows:
        ref = next(r for r in rows if r["shape"] == row["shape"] and r["impl"] == "scanned")
        diff = f"{row['max_logit_diff']:.1e}" if "max_logit_diff" in row else "-"
        lines.append(f"{row['shape']:<14}{row['impl']:<15}{row['compile_s']:>10.2f}{row['step_s'] * 1e3:>10.1f}"
                     f"{row['compile_s'] / ref['compile_s']:>10.2f}{row['step_s'] / ref['step_s']:>8.2f}{diff:>14}")
    print("\n".join(lines))  # the benchmark's report


if __name__ == "__main__":
    cli.run(main, __name__)
