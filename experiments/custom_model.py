r"""QLoRA for your own Flax NNX model, end to end: convert with one call, train the adapters, save, restore.

    python -m experiments.custom_model                       # a few seconds on a CPU
    python -m experiments.custom_model --optimizer=paged_adamw_32bit --quant=fp4 --lora_r=16

The model is an ordinary NNX decoder written below with ``nnx.Linear`` layers, nothing
QLoRA-specific in it. The recipe:

1. "pretrain" it in float32 on a synthetic language (``next = (3 * token + 1) mod V``), and save
   the pretrained weights with Orbax (standing in for the checkpoint a user starts from);
2. ``apply_qlora``: every linear layer but the output head becomes a QLoRALinear (NF4 + double
   quantization, LoRA r on each), the head stays as it is; the report says what changed;
3. finetune only the adapters on a shifted language (``next = (3 * token + 2) mod V``) with
   ``nnx.Optimizer(model, make_optimizer(...), wrt=nnx.LoRAParam)``;
4. save the adapters (``nnx.LoRAParam`` state, a few KiB) with Orbax, then restore them into a
   fresh model rebuilt from the pretrained checkpoint and converted with the same rules, and
   check that its outputs are the trained model's, bit for bit.
"""

from __future__ import annotations

import json
import pathlib
import shutil

from absl import flags, logging

from . import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "outputs/custom_model", "Where the pretrained weights and the adapters go.")
flags.DEFINE_integer("vocab", 64, "Vocabulary size of the synthetic language.")
flags.DEFINE_integer("hidden", 64, "Model width (a multiple of the block size: the fused kernels' layout).")
flags.DEFINE_integer("layers", 2, "Decoder blocks.")
flags.DEFINE_integer("seq_len", 32, "Tokens per sequence.")
flags.DEFINE_integer("batch", 16, "Sequences per step.")
flags.DEFINE_integer("pretrain_steps", 150, "Full-precision steps on the first language.")
flags.DEFINE_integer("steps", 60, "QLoRA steps on the second language.")
flags.DEFINE_string("optimizer", "adamw", "qlora_jax.optim.make_optimizer name (paged ones offload the state).")
flags.DEFINE_float("learning_rate", 3e-3, "QLoRA learning rate.")
flags.DEFINE_integer("lora_r", 8, "LoRA rank.")
flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha.")
flags.DEFINE_enum("quant", "nf4", ["nf4", "fp4", "int8", "bf16"], "Storage of the frozen linear weights.")
flags.DEFINE_integer("seed", 0, "Seed of the model, the data and the adapters.")
flags.DEFINE_string("json_out", None, "Also write the figures as JSON here.")


def make_model_class():
    """The user's model: a small pre-norm decoder made of plain nnx.Linear layers."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class SelfAttention(nnx.Module):
        def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
            self.heads = heads
            self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
            self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)

        def __call__(self, x):
            b, t, d = x.shape
            q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.heads, d // self.heads), 3, axis=2)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads).astype(x.dtype)
            scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e30)
            return self.out(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, t, d))

    class Block(nnx.Module):
        def __init__(self, d: int, rngs: nnx.Rngs):
            self.norm1 = nnx.RMSNorm(d, rngs=rngs)
            self.attn = SelfAttention(d, 4, rngs)
            self.norm2 = nnx.RMSNorm(d, rngs=rngs)
            self.fc_in = nnx.Linear(d, 4 * d, rngs=rngs)
            self.fc_out = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.fc_out(jax.nn.gelu(self.fc_in(self.norm2(x))))

    class TinyLM(nnx.Module):
        def __init__(self, vocab: int, d: int, layers: int, seq_len: int, rngs: nnx.Rngs):
            self.embed = nnx.Embed(vocab, d, rngs=rngs)
            self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq_len, d)) * 0.02)
            self.blocks = nnx.List([Block(d, rngs) for _ in range(layers)])
            self.head = nnx.Linear(d, vocab, rngs=rngs)

        def __call__(self, ids):
            h = self.embed(ids) + self.pos[...][: ids.shape[1]]
            for block in self.blocks:
                h = block(h)
            return self.head(h)

    return TinyLM


def language_batch(rng, batch: int, seq_len: int, vocab: int, offset: int):
    """Sequences of ``next = (3 * token + offset) mod vocab`` from random first tokens: (inputs, targets)."""
    import numpy as np

    seq = np.empty((batch, seq_len + 1), np.int32)
    seq[:, 0] = rng.integers(0, vocab, batch)
    for i in range(seq_len):
        seq[:, i + 1] = (3 * seq[:, i] + offset) % vocab
    return seq[:, :-1], seq[:, 1:]


def _loss(model, ids, targets):
    """Mean next-token cross-entropy of ``model`` on ``(ids, targets)``."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(model(ids), targets).mean()


def _pretrain(model, rng) -> None:
    """Step 1: every parameter trained in float32 on language A."""
    import optax
    from flax import nnx

    pretrain = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

    @nnx.jit
    def pretrain_step(model, optimizer, ids, targets):
        loss, grads = nnx.value_and_grad(_loss)(model, ids, targets)
        optimizer.update(model, grads)
        return loss

    for _ in range(FLAGS.pretrain_steps):
        pretrain_step(model, pretrain, *language_batch(rng, FLAGS.batch, FLAGS.seq_len, FLAGS.vocab, offset=1))


def _train_adapters(model, rng) -> bool:
    """Step 3: the adapters only, with the project's optimizer chain; whether the frozen weights stayed."""
    import jax
    import numpy as np
    from flax import nnx

    from qlora_jax.optim import make_optimizer

    optimizer = nnx.Optimizer(model, make_optimizer(FLAGS.optimizer, FLAGS.learning_rate),
                              wrt=nnx.LoRAParam)

    @nnx.jit
    def train_step(model, optimizer, ids, targets):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, ids, targets)
        optimizer.update(model, grads)
        return loss

    frozen_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam))))
    for step in range(FLAGS.steps):
        loss = train_step(model, optimizer, *language_batch(rng, FLAGS.batch, FLAGS.seq_len, FLAGS.vocab, offset=2))
        if step % 20 == 0 or step == FLAGS.steps - 1:
            logging.info("step %d: training loss %.3f", step, float(loss))
    frozen_after = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    return all(np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after), strict=True))


def _restore(new_model, rules, checkpointer, workdir: pathlib.Path):
    """Step 4's second half: the pretrained checkpoint, converted, with the saved adapters."""
    from flax import nnx

    from qlora_jax.nn import apply_qlora

    restored = new_model()
    nnx.update(restored, checkpointer.restore((workdir / "pretrained").absolute(),
                                              nnx.state(restored, nnx.Param)))
    apply_qlora(restored, rules, rngs=nnx.Rngs(FLAGS.seed + 99))  # fresh adapters, then the saved ones
    nnx.update(restored, checkpointer.restore((workdir / "adapters").absolute(), nnx.state(restored, nnx.LoRAParam)))
    return restored


def run(workdir: pathlib.Path) -> dict:
    """The recipe of the module docstring; returns its figures (losses, report, restore check)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from qlora_jax.lora import LoraConfig
    from qlora_jax.nn import QLoRARule, apply_qlora
    from qlora_jax.quant import QuantConfig

    TinyLM = make_model_class()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    rng = np.random.default_rng(FLAGS.seed)

    def new_model():
        return TinyLM(FLAGS.vocab, FLAGS.hidden, FLAGS.layers, FLAGS.seq_len, nnx.Rngs(FLAGS.seed))

    evaluate = nnx.jit(_loss)

    # 1. Pretraining in float32 (every parameter), then the pretrained checkpoint.
    model = new_model()
    _pretrain(model, rng)
    held_out_a = language_batch(np.random.default_rng(FLAGS.seed + 1), 64, FLAGS.seq_len, FLAGS.vocab, offset=1)
    held_out_b = language_batch(np.random.default_rng(FLAGS.seed + 2), 64, FLAGS.seq_len, FLAGS.vocab, offset=2)
    figures = {"pretrained_loss_a": float(evaluate(model, *held_out_a))}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((workdir / "pretrained").absolute(), nnx.state(model, nnx.Param))
    checkpointer.wait_until_finished()
    logging.info("pretrained: held-out loss %.3f on language A", figures["pretrained_loss_a"])

    # 2. One call makes it QLoRA: every linear layer except the head, NF4 + DQ, LoRA r on each.
    quant = QuantConfig(quant=FLAGS.quant, dtype="float32")
    rules = [QLoRARule("all-linear", lora=LoraConfig(r=FLAGS.lora_r, alpha=FLAGS.lora_alpha), quant=quant,
                       exclude=("head",))]
    report = apply_qlora(model, rules, rngs=nnx.Rngs(FLAGS.seed + 3))
    logging.info("%s", report.summary())
    figures["qlora_loss_b_before"] = float(evaluate(model, *held_out_b))

    # 3. Train the adapters only, with the project's optimizer chain.
    frozen_unchanged = _train_adapters(model, rng)
    figures["qlora_loss_b_after"] = float(evaluate(model, *held_out_b))
    figures["frozen_unchanged"] = frozen_unchanged

    # 4. Save the adapters, restore them into a fresh model converted from the pretrained checkpoint.
    adapters = nnx.state(model, nnx.LoRAParam)
    checkpointer.save((workdir / "adapters").absolute(), adapters)
    checkpointer.wait_until_finished()
    (workdir / "qlora_rules.json").write_text(json.dumps({"lora_r": FLAGS.lora_r, "lora_alpha": FLAGS.lora_alpha,
                                                          "quant": FLAGS.quant, "exclude": ["head"]}))
    restored = _restore(new_model, rules, checkpointer, workdir)
    ids = held_out_b[0]
    figures["restored_identical"] = bool(np.array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(model, ids)),
                                                        np.asarray(nnx.jit(lambda m, x: m(x))(restored, ids))))
    figures["adapter_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(adapters)))
    figures["layers_replaced"] = len(report.layers)
    figures["trainable_params"] = report.trainable_params
    figures["model_bytes_before"], figures["model_bytes_after"] = report.bytes_before, report.bytes_after
    return figures


def main(argv: list[str]) -> None:
    del argv
    figures = run(pathlib.Path(FLAGS.workdir))
    if FLAGS.json_out:
        pathlib.Path(FLAGS.json_out).write_text(json.dumps(figures, indent=1))
    logging.info("held-out loss on language B: %.3f before -> %.3f after %d QLoRA steps (%s); frozen weights "
                 "unchanged: %s; restored model identical: %s; adapters %d bytes",
                 figures["qlora_loss_b_before"], figures["qlora_loss_b_after"], FLAGS.steps, FLAGS.optimizer,
                 figures["frozen_unchanged"], figures["restored_identical"], figures["adapter_bytes"])
    if not (figures["frozen_unchanged"] and figures["restored_identical"]):
        raise SystemExit("the frozen weights moved or the restored model differs")


if __name__ == "__main__":
    cli.run(main, __name__)
