"""The multiple-choice harness on models: against a float64 numpy reference, a model forced to one
letter (every base type the library loads), tokenization rules, sharded evaluation, compilations."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from qlora_jax.distributed import make_mesh, param_shardings, shard_tree
from qlora_jax.eval import (
    MultipleChoiceEvaluator,
    MultipleChoiceItem,
    MultipleChoiceTask,
    Question,
    build_items,
    evaluate,
    load_task,
    tokenize_item,
)
from qlora_jax.eval.scoring import group_logprobs
from qlora_jax.lora import LoraConfig
from qlora_jax.model import init_lora_params, load_pretrained
from qlora_jax.models import layout, llama
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.spec import ModelSpec
from qlora_jax.quant import QuantConfig
from qlora_jax.tokenizer import CHAT_TEMPLATES, Tokenizer

WORDS = ("red", "green", "blue", "cat", "dog", "tree", "river", "stone", "cloud", "light", "seven", "paper")


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE (GPT-2's family, like SmolLM2's) trained here on a few lines: ~370 tokens, " A"
    one token, ChatML special tokens and template; small enough to keep the models' heads tiny."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(WORDS)] * 20 + ["Question: Answer: A B C D A. B. C. D. user assistant system The following "
                                       "are multiple choice questions (with answers) about"] * 20
    hf.train_from_iterator(corpus, trainer)
    return Tokenizer(hf, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATES["chatml"])


@pytest.fixture(scope="module")
def random_model(tokenizer, module_rng):
    """A tiny random LLaMA (float32 base, untied head) with non-zero adapters, float32 compute.

    Quantized bases are the forced-letter test's; this one keeps the float64 comparison tight.
    """
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
    layers, d = config.num_hidden_layers, config.hidden_size
    normal = lambda shape, std: jnp.asarray(module_rng.normal(0, std, shape), jnp.float32)  # noqa: E731
    base = layout.assemble_base(
        embed_tokens=normal((config.vocab_size, d), 0.5), norm=jnp.ones(d), lm_head=normal((config.vocab_size, d), 0.3),
        layer_norms={n: jnp.ones((layers, d)) for n in layout.LAYER_NORMS},
        linears={n: {"weight": normal((layers, *shape), shape[1] ** -0.5)}
                 for n, shape in config.linear_shapes().items()})
    spec = ModelSpec(config, LoraConfig(r=4), compute_dtype="float32")
    lora = init_lora_params(jax.random.key(int(module_rng.integers(1 << 30))), spec)
    lora = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(module_rng.normal(size=x.shape), x.dtype), lora)
    return spec, base, lora


def sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


def mixed_task(rng) -> MultipleChoiceTask:
    """Letter items (one token per choice), cloze items (several, ragged), a qlora.py row, chat items."""
    def question(subject, num_choices=4, words=2):
        return Question(sentence(rng, 5) + "?", tuple(sentence(rng, int(rng.integers(1, words + 3)))
                                                       for _ in range(num_choices)),
                        int(rng.integers(num_choices)), subject, origin=f"gen:{subject}")
    dev = [question("s1"), question("s2")]
    letters = build_items([question("s1"), question("s2"), question("s1")], shots=1, dev=dev)
    cloze = build_items([question("s2", 3, words=4), question("s1", 4, words=6), question("s2", 2, words=1)],
                        shots=1, style="cloze", dev=dev)
    qlora = [MultipleChoiceItem(letters[0].context, ("A", "B", "C", "D"), 1, "s1", delimiter="",
                                separate_encoding=True, origin="qlora-row")]
    chat = [MultipleChoiceItem(sentence(rng, 4) + "?", tuple(sentence(rng, k) for k in (1, 3, 6)), 2, "chat",
                               delimiter="", chat=True, origin=f"chat{i}") for i in range(2)]
    return MultipleChoiceTask("mixed", tuple(letters + cloze + qlora + chat))


def reference_logliks(spec, base, lora, tokenized, length=128, rows=4):
    """Each choice's whole sequence through the plain forward pass (right-padded, no mask: causality alone
    keeps the padding out; no cache), its log-softmax taken in float64."""
    sequences = [np.concatenate([context, continuation]) for item in tokenized
                 for context, continuation in zip(item.contexts, item.continuations, strict=True)]
    forward = jax.jit(llama.forward, static_argnums=0)
    logliks = []
    for first in range(0, len(sequences), rows):
        chunk = sequences[first:first + rows]
        ids = np.zeros((rows, length), np.int32)
        for r, sequence in enumerate(chunk):
            ids[r, : len(sequence)] = sequence
        logits, _ = forward(spec, base, lora, jnp.asarray(ids))
        for r, sequence in enumerate(chunk):
            logliks.append(np.asarray(logits[r, : len(sequence)], np.float64))
    out, position = [], 0
    for item in tokenized:
        row = []
        for context, continuation in zip(item.contexts, item.continuations, strict=True):
            logits = logliks[position]
            position += 1
            shifted = logits - logits.max(-1, keepdims=True)
            logp = shifted - np.log(np.sum(np.exp(shifted), -1, keepdims=True))
            row.append(sum(logp[len(context) - 1 + j, token] for j, token in enumerate(continuation)))
        out.append(row)
    return out


def test_scores_match_float64_reference(random_model, tokenizer, rng):
    spec, base, lora = random_model
    task = mixed_task(rng)
    evaluator = MultipleChoiceEvaluator(spec, tokenizer, task, batch_size=3, prefix="")
    scores = evaluator.scores(base, lora)
    tokenized = [tokenize_item(item, tokenizer)[0] for item in task.items]
    assert {len(set(t.target_counts)) for t in tokenized[:3]} == {1}  # letters: one token each
    reference = reference_logliks(spec, base, lora, tokenized)
    for i, (item, ref) in enumerate(zip(task.items, reference, strict=True)):
        np.testing.assert_allclose(scores.loglik[i, : len(item.choices)], ref, rtol=1e-4, atol=1e-3,
                                   err_msg=item.origin)
        assert np.all(np.isneginf(scores.loglik[i, len(item.choices):]))

    # Metrics from the reference, computed here in float64.
    correct, correct_norm, losses = [], [], []
    for item, ref, tok in zip(task.items, reference, tokenized, strict=True):
        ref = np.asarray(ref)
        lengths = np.asarray([len(c) for c in item.choices], np.float64)
        correct.append(float(np.argmax(ref) == item.answer))
        correct_norm.append(float(np.argmax(ref / lengths) == item.answer))
        losses.append(-ref[item.answer] / tok.target_counts[item.answer])
    metrics = evaluator(base, lora)
    assert metrics["acc"] == pytest.approx(np.mean(correct))
    assert metrics["acc_norm"] == pytest.approx(np.mean(correct_norm))
    assert metrics["answer_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    subjects = sorted({item.subject for item in task.items})
    by_subject = {s: np.mean([c for c, it in zip(correct, task.items, strict=True) if it.subject == s])
                  for s in subjects}
    assert [metrics[f"acc/{s}"] for s in subjects] == pytest.approx(list(by_subject.values()))
    assert metrics["subject_mean_acc"] == pytest.approx(np.mean(list(by_subject.values())))
    json.dumps(metrics, allow_nan=False)


def test_letter_and_chat_tokenization_rules(tokenizer):
    letter = MultipleChoiceItem("Q?\nA. x\nB. y\nAnswer:", ("A", "B"), 0)
    tokens, _ = tokenize_item(letter, tokenizer)
    assert [c.tolist() for c in tokens.continuations] == [tokenizer.encode(" A"), tokenizer.encode(" B")]
    assert tokens.contexts[0].tolist() == tokenizer.encode(letter.context)
    # qlora.py: "A" encoded on its own (no space), after the prompt encoded on its own.
    qlora = MultipleChoiceItem(letter.context, ("A", "B"), 0, delimiter="", separate_encoding=True)
    tokens, _ = tokenize_item(qlora, tokenizer)
    assert [c.tolist() for c in tokens.continuations] == [tokenizer.encode("A"), tokenizer.encode("B")]
    # A context's trailing space moves into the continuation, as lm-eval does.
    spaced = MultipleChoiceItem("Q?\nAnswer: ", ("A", "B"), 0, delimiter="")
    tokens, _ = tokenize_item(spaced, tokenizer)
    assert tokens.continuations[0].tolist() == tokenizer.encode(" A")
    # Chat: the prompt is the template's generation prompt; the reply's targets end with end-of-turn.
    chat = MultipleChoiceItem("Hello there", ("Hi!", "Go away"), 0, delimiter="", chat=True)
    tokens, _ = tokenize_item(chat, tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    assert tokens.contexts[0].tolist() == tokens.contexts[1].tolist() == tokenizer.encode(prompt)
    assert tokens.continuations[1].tolist() == tokenizer.encode("Go away<|im_end|>")
    # Too long: the context loses its start; a choice that cannot fit is an error.
    long = MultipleChoiceItem(" ".join(["word"] * 50) + "\nAnswer:", ("A", "B"), 0)
    tokens, truncated = tokenize_item(long, tokenizer, max_length=10)
    assert truncated and len(tokens.contexts[0]) == 9 and tokens.contexts[0].tolist() == \
        tokenizer.encode(long.context)[-9:]
    with pytest.raises(ValueError, match="leaves no room for the context"):
        tokenize_item(MultipleChoiceItem("Q", ("a b c d e f", "g"), 0), tokenizer, max_length=3)


@pytest.fixture(scope="module")
def forced_folder(tmp_path_factory, tokenizer, module_rng):
    """A tiny Llama whose head makes one letter ("X" and " X", a token each) win after any context."""
    path = tmp_path_factory.mktemp("forced_llama")
    vocab, d, f, layers = tokenizer.vocab_size, 64, 128, 2
    letter = "ABCD"[int(module_rng.integers(4))]
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": d,
              "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(config))
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (32, d), "self_attn.v_proj": (32, d),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    embed = module_rng.normal(0, 0.5, (vocab, d))
    embed[:, 0] = 30.0  # a large constant feature: after the final norm, dimension 0 is ~ +8 at every position
    head = module_rng.normal(0, 0.02, (vocab, d))
    tokens = tokenizer.encode(letter) + tokenizer.encode(" " + letter)
    assert len(tokens) == 2
    for token in tokens:
        head[token] = 0.0
        head[token, 0] = 10.0
    tensors = {"model.embed_tokens.weight": embed, "model.norm.weight": np.ones(d), "lm_head.weight": head}
    for i in range(layers):
        for name, shape in shapes.items():
            tensors[f"model.layers.{i}.{name}.weight"] = module_rng.normal(0, 0.02, shape)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(d)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(d)
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(path / "model.safetensors"))
    tokenizer.save(path)
    return path, "ABCD".index(letter)


@pytest.mark.parametrize("quant, double_quant", [("nf4", True), ("nf4", False), ("fp4", False), ("int8", False),
                                                 ("bf16", False)])
def test_model_forced_to_one_letter_is_scored_as_known(forced_folder, tmp_path, rng, quant, double_quant):
    path, forced = forced_folder
    answers = [forced, (forced + 1) % 4, forced, (forced + 2) % 4, (forced + 3) % 4]
    rows = [{"subject": "s", "input": f"{sentence(rng, 6)}?\nA. a\nB. b\nC. c\nD. d\nAnswer:", "output": "ABCD"[a]}
            for a in answers]
    qlora_file = tmp_path / "five_shot_mmlu_val.json"
    qlora_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": sentence(rng, 4), "choices": ["w", "x", "y", "z"],
                                             "answer": a, "subject": f"s{i % 2}"}) + "\n"
                                 for i, a in enumerate(answers)))
    model, tokenizer = load_pretrained(path, QuantConfig(quant, double_quant=double_quant), lora=LoraConfig(r=4),
                                       compute_dtype="float32")
    # Adapters that do something (fresh ones are zero), small next to the forced feature.
    lora = jax.tree.map(lambda x: x + 0.01 * jnp.asarray(rng.normal(size=x.shape), x.dtype), model.lora_params)
    for task in (load_task(qlora_file), load_task(questions, shots=1)):
        evaluator = MultipleChoiceEvaluator(model.spec, tokenizer, task, batch_size=4)
        scores = evaluator.scores(model.base_params, lora)
        assert scores.predictions().tolist() == [forced] * 5
        metrics = evaluator(model.base_params, lora)
        assert metrics["mc_acc"] == pytest.approx(0.4) and metrics["mc_acc_norm"] == pytest.approx(0.4)
        losses = scores.answer_losses()
        # "X" and " X" share the forced letter's probability: its full-vocabulary loss is ln 2.
        np.testing.assert_allclose(losses[[0, 2]], np.log(2.0), atol=1e-4)
        assert np.all(losses[[1, 3, 4]] > 20), losses
    assert evaluate(model, tokenizer, task, batch_size=4).predictions().tolist() == [forced] * 5


def test_sharded_evaluation_equals_unsharded(random_model, tokenizer, rng):
    spec, base, lora = random_model
    items = mixed_task(rng).items
    task = MultipleChoiceTask("small", items[:2] + items[3:5] + items[-1:])  # letters, cloze and chat
    mesh = make_mesh("data=2,fsdp=4")
    assert mesh.size == 8
    single = MultipleChoiceEvaluator(spec, tokenizer, task, batch_size=8).scores(base, lora)
    evaluator = MultipleChoiceEvaluator(spec, tokenizer, task, batch_size=8, mesh=mesh)
    placed = [shard_tree(tree, param_shardings(tree, mesh)) for tree in (base, lora)]
    sharded = evaluator.scores(*placed)
    np.testing.assert_allclose(sharded.loglik, single.loglik, rtol=1e-5, atol=1e-4)
    assert sharded.metrics() == pytest.approx(single.metrics())
    with pytest.raises(ValueError, match="does not split over the mesh's data-parallel axes"):
        MultipleChoiceEvaluator(spec, tokenizer, task, batch_size=6, mesh=mesh)


def test_compiles_once_per_shape_and_not_again(random_model, tokenizer, rng):
    spec, base, lora = random_model
    spec = dataclasses.replace(spec, loss_chunk=spec.loss_chunk + 1)  # a spec no other test compiled for
    task = mixed_task(rng)
    evaluator = MultipleChoiceEvaluator(spec, tokenizer, task, batch_size=2)
    shapes = {(b.context_ids.shape, b.continuation_ids.shape) for b in evaluator.batches}
    assert len(shapes) < len(evaluator.batches)  # the buckets make batches share shapes
    before = group_logprobs._cache_size()
    evaluator.scores(base, lora)
    compiled = group_logprobs._cache_size() - before
    assert compiled == len(shapes)
    evaluator.scores(base, lora)
    assert group_logprobs._cache_size() - before == compiled
