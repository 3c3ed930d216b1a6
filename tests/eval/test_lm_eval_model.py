"""The lm-evaluation-harness model ``qlora_jax`` against lm-eval's own ``hf`` model (transformers + PEFT).

Four local tasks, one per output type (multiple choice, loglikelihood, loglikelihood_rolling with
texts longer than the context, generate_until with a stop sequence), over JSONL datasets the tests
write from the seeded generator; a tiny random Llama (float32 weights) with a random PEFT adapter
that PEFT itself wrote. The reference is lm-eval's ``hf`` model on the same folder and adapter, run
in the oracle environment (tests/oracles/lm_eval_hf.py). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytest.importorskip("lm_eval", reason="the lm-eval extra: pip install -r requirements/lm-eval.txt")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = ("tiny_mc", "tiny_lambada", "tiny_wikitext", "tiny_qa")
# One max_length for both backends: the wikitext texts are longer, so rolling windows are used.
MAX_LENGTH = 48
WORDS = ("the cat sat on a mat while dogs ran far away from red blue green houses near old trees and "
         "small birds sang loud songs every morning before people woke up").split()


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def write_tasks(folder: pathlib.Path, rng: np.random.Generator, *, docs: int = 12) -> pathlib.Path:
    """Task YAMLs and their JSONL datasets (random sentences from ``rng``) under ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = [{"question": _sentence(rng, int(rng.integers(3, 8))),
           "choices": [_sentence(rng, int(rng.integers(1, 4))) for _ in range(4)],
           "answer": int(rng.integers(0, 4))} for _ in range(docs)]
    lambada = [{"text": _sentence(rng, int(rng.integers(4, 12))), "target": str(rng.choice(WORDS))}
               for _ in range(docs)]
    wikitext = [{"page": _sentence(rng, int(rng.integers(110, 160)))} for _ in range(4)]
    qa = [{"q": _sentence(rng, int(rng.integers(3, 7))), "a": str(rng.choice(WORDS))} for _ in range(docs)]
    for name, rows in (("mc", mc), ("lambada", lambada), ("wikitext", wikitext), ("qa", qa)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def dataset(name: str) -> str:
        return (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
                "test_split: test\n")

    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + dataset("mc") + "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "tiny_lambada.yaml").write_text(
        "task: tiny_lambada\n" + dataset("lambada") + "output_type: loglikelihood\n"
        "doc_to_text: \"{{text}}\"\ndoc_to_target: \"{{' ' + target}}\"\n"
        "metric_list:\n  - metric: perplexity\n    higher_is_better: false\n  - metric: acc\n")
    (folder / "tiny_wikitext.yaml").write_text(
        "task: tiny_wikitext\n" + dataset("wikitext") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{page}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (folder / "tiny_qa.yaml").write_text(
        "task: tiny_qa\n" + dataset("qa") + "output_type: generate_until\n"
        "doc_to_text: \"Q: {{q}}\\nA:\"\ndoc_to_target: \"{{' ' + a}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\", \" and\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, module_rng, oracle):
    """A tiny float32 Llama, a random PEFT adapter for it (PEFT's own files) and the four tasks."""
    from helpers import write_tiny_llama

    root = tmp_path_factory.mktemp("lm_eval")
    model = root / "llama"
    model.mkdir()
    write_tiny_llama(model, module_rng)
    adapter = root / "adapter"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    oracle.run("hf_models.py", {"peft/input_ids": np.array([[1, 2, 3]], np.int64)}, {"cases": [
        dict(name="peft", op="peft_random", dir=str(model), r=4, alpha=8, targets=targets,
             seed=int(module_rng.integers(1 << 30)), save_dir=str(adapter))]})
    tasks = write_tasks(root / "tasks", module_rng)
    return {"model": model, "adapter": adapter, "tasks": tasks}


def hf_reference(oracle, workdir, tasks=TASKS, chat: dict | None = None, **model_args) -> dict:
    """lm-eval's ``hf`` model on ``tasks`` (metrics and samples, see tests/oracles/lm_eval_hf.py);
    ``chat``: simple_evaluate's apply_chat_template / system_instruction."""
    args = dict(pretrained=str(workdir["model"]), peft=str(workdir["adapter"]), dtype="float32",
                max_length=MAX_LENGTH, **model_args)
    out = oracle.run("lm_eval_hf.py", {}, {"model_args": args, "tasks": list(tasks),
                                           "include_path": str(workdir["tasks"]), "batch_size": 4, **(chat or {})})
    return json.loads(str(out["result"]))


def ours(workdir, tasks=TASKS, *, batch_size: int = 16, chat: dict | None = None, gen_kwargs: str | None = None,
         **model_args) -> dict:
    """Our ``qlora_jax`` model through lm-eval's evaluator, in the same shape as :func:`hf_reference`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from qlora_jax.eval.lm_eval_model import QLoraJaxLM

    args = dict(pretrained=str(workdir["model"]), adapter=str(workdir["adapter"]), quant="float32",
                dtype="float32", compute_dtype="float32", max_length=MAX_LENGTH, batch_size=batch_size)
    args.update(model_args)
    lm = QLoraJaxLM(**args)
    # Only the tests' own tasks: indexing lm-eval's built-in task YAMLs costs ~13 s of CPU per call.
    task_manager = TaskManager(include_path=str(workdir["tasks"]), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=task_manager, log_samples=True, random_seed=0, numpy_random_seed=0,
        torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0, gen_kwargs=gen_kwargs, **(chat or {}))
    samples = {t: sorted(s, key=lambda s: s["doc_id"]) for t, s in results["samples"].items()}
    return {"metrics": results["results"], "samples": samples}


def loglikelihoods(result: dict, task: str) -> np.ndarray:
    """Every request's log-likelihood of ``task``, in (doc, request) order."""
    values = []
    for sample in result["samples"][task]:
        for resp in sample["resps"]:
            value = resp[0]
            values.append(value[0] if isinstance(value, (list, tuple)) else value)
    return np.asarray(values, np.float64)


def greedy_flags(result: dict, task: str) -> list[bool]:
    return [bool(resp[0][1]) for s in result["samples"][task] for resp in s["resps"]]


@pytest.fixture(scope="module")
def reference(oracle, workdir):
    return hf_reference(oracle, workdir)


@pytest.fixture(scope="module")
def ours_batched(workdir):
    return ours(workdir, batch_size=16)


# Float32 tolerance: both sides compute the same float32 network in different operation orders.
# Each logit is a D-term dot product of O(1) values: its rounding is ~sqrt(D) * eps32 * |logit|,
# times the L layers the error passes through; log-softmax adds ~eps32 * log(V). With D=64, L=2,
# |logit| <= ~10 that is ~1e-5 per token; a request sums up to MAX_LENGTH tokens.
PER_TOKEN = 2e-5


def test_requests_are_identical(reference, ours_batched):
    """Both backends receive the same requests (lm-eval's tokenization-free arguments)."""
    for task in TASKS:
        assert ([s["arguments"] for s in reference["samples"][task]]
                == [[list(a) for a in s["arguments"]] for s in ours_batched["samples"][task]]), task


@pytest.mark.parametrize("task", ["tiny_mc", "tiny_lambada"])
def test_loglikelihood_matches_hf(reference, ours_batched, task):
    expected, got = loglikelihoods(reference, task), loglikelihoods(ours_batched, task)
    assert got.shape == expected.shape and got.size > 0
    np.testing.assert_allclose(got, expected, rtol=0, atol=PER_TOKEN * MAX_LENGTH)
    assert greedy_flags(ours_batched, task) == greedy_flags(reference, task)


def test_multiple_choice_metrics_identical(reference, ours_batched):
    for metric in ("acc,none", "acc_norm,none"):
        assert ours_batched["metrics"]["tiny_mc"][metric] == reference["metrics"]["tiny_mc"][metric], metric


def test_lambada_metrics(reference, ours_batched):
    got, expected = ours_batched["metrics"]["tiny_lambada"], reference["metrics"]["tiny_lambada"]
    assert got["acc,none"] == expected["acc,none"]
    # perplexity = exp(-mean log-likelihood): relative error = the absolute error of the mean.
    np.testing.assert_allclose(got["perplexity,none"], expected["perplexity,none"], rtol=PER_TOKEN * MAX_LENGTH)


def test_rolling_uses_windows_and_matches_hf(reference, ours_batched, workdir):
    from qlora_jax.model import load_tokenizer

    tokenizer = load_tokenizer(workdir["model"])
    pages = [json.loads(line)["page"] for line in (workdir["tasks"] / "wikitext.jsonl").read_text().splitlines()]
    assert max(len(tokenizer.encode(p)) for p in pages) > 2 * MAX_LENGTH  # several windows per text
    expected, got = loglikelihoods(reference, "tiny_wikitext"), loglikelihoods(ours_batched, "tiny_wikitext")
    tokens = np.array([len(tokenizer.encode(p)) for p in pages])
    assert got.shape == expected.shape == tokens.shape
    assert np.all(np.abs(got - expected) <= PER_TOKEN * tokens), (got, expected)
    g, e = ours_batched["metrics"]["tiny_wikitext"], reference["metrics"]["tiny_wikitext"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        np.testing.assert_allclose(g[metric], e[metric], rtol=PER_TOKEN * 4)


def test_greedy_generations_identical(reference, ours_batched):
    got = [s["resps"][0][0] for s in ours_batched["samples"]["tiny_qa"]]
    expected = [s["resps"][0][0] for s in reference["samples"]["tiny_qa"]]
    assert got == expected
    assert any(text for text in got)  # something was generated before a stop
    assert not any("\n" in text or " and" in text for text in got)  # cut at the stop sequences
    assert ours_batched["metrics"]["tiny_qa"]["exact_match,none"] == \
        reference["metrics"]["tiny_qa"]["exact_match,none"]


def test_batch_size_does_not_change_numbers(workdir, ours_batched):
    """Batch 1 against 16: other batch compositions and padded lengths (buckets), same results.

    Greedy flags, metrics and generations are identical. A log-likelihood is a sum of float32
    per-token values whose reductions (attention over the padded length) XLA associates by shape,
    so each token may differ in its last bit: the totals agree to eps32 relative, not bitwise.
    """
    single = ours(workdir, batch_size=1)
    eps32 = float(np.finfo(np.float32).eps)
    for task in ("tiny_mc", "tiny_lambada", "tiny_wikitext"):
        np.testing.assert_allclose(loglikelihoods(single, task), loglikelihoods(ours_batched, task),
                                   rtol=4 * eps32, atol=0)
    for task in ("tiny_mc", "tiny_lambada"):
        assert greedy_flags(single, task) == greedy_flags(ours_batched, task)
    assert [s["resps"] for s in single["samples"]["tiny_qa"]] == \
        [s["resps"] for s in ours_batched["samples"]["tiny_qa"]]
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_mc", "acc_norm,none"), ("tiny_lambada", "acc,none"),
                         ("tiny_qa", "exact_match,none")):
        assert single["metrics"][task][metric] == ours_batched["metrics"][task][metric]


def test_sampled_generation(workdir, ours_batched):
    """do_sample: a nucleus smaller than any token's probability keeps only the top token, so the
    sample is the greedy generation; at temperature 1 the seed model_arg decides the draw."""
    narrow = ours(workdir, ("tiny_qa",), gen_kwargs="do_sample=True,temperature=1.0,top_p=1e-9")
    greedy = [s["resps"][0][0] for s in ours_batched["samples"]["tiny_qa"]]
    assert [s["resps"][0][0] for s in narrow["samples"]["tiny_qa"]] == greedy
    draws = [[s["resps"][0][0] for s in ours(workdir, ("tiny_qa",), gen_kwargs="do_sample=True,temperature=1.0",
                                             seed=seed)["samples"]["tiny_qa"]] for seed in (0, 0, 1)]
    assert draws[0] == draws[1] and draws[0] != draws[2] and draws[0] != greedy


def test_chat_template_and_system_instruction_match_hf(oracle, workdir):
    """--apply_chat_template with --system_instruction: the model's own template renders the same
    prompts as transformers' tokenizer, and the scores and generations follow."""
    chat = {"apply_chat_template": True, "system_instruction": "Answer in one word."}
    expected = hf_reference(oracle, workdir, ("tiny_mc", "tiny_qa"), chat=chat)
    got = ours(workdir, ("tiny_mc", "tiny_qa"), chat=chat)
    for task in ("tiny_mc", "tiny_qa"):
        prompts = [[list(a) for a in s["arguments"]] for s in got["samples"][task]]
        assert prompts == [s["arguments"] for s in expected["samples"][task]], task
        assert "<|im_start|>system\nAnswer in one word.<|im_end|>" in str(prompts[0][0][0])
    np.testing.assert_allclose(loglikelihoods(got, "tiny_mc"), loglikelihoods(expected, "tiny_mc"), rtol=0,
                               atol=PER_TOKEN * MAX_LENGTH)
    assert got["metrics"]["tiny_mc"]["acc,none"] == expected["metrics"]["tiny_mc"]["acc,none"]
    assert [s["resps"][0][0] for s in got["samples"]["tiny_qa"]] == \
        [s["resps"][0][0] for s in expected["samples"]["tiny_qa"]]


# ---------------------------------------------------------------- the command (experiments/lm_eval.py)
def _model_args(workdir) -> str:
    return (f"pretrained={workdir['model']},adapter={workdir['adapter']},quant=float32,dtype=float32,"
            f"compute_dtype=float32,max_length={MAX_LENGTH}")


def test_command_prints_the_table_with_hf_numbers(workdir, reference, tmp_path, capsys):
    """``python -m experiments.lm_eval`` passes its arguments to lm-eval's command line: its table
    and its results file hold the numbers lm-eval's hf model gives on the same weights."""
    from experiments.lm_eval import main

    main(["--model_args", _model_args(workdir), "--tasks", "tiny_mc", "--include_path", str(workdir["tasks"]),
          "--output_path", str(tmp_path), "--log_samples", "--batch_size", "4"])
    table = capsys.readouterr().out
    expected = reference["metrics"]["tiny_mc"]
    rows = [line for line in table.splitlines() if line.startswith("|") and ("acc" in line)]
    assert any("tiny_mc" in r and f"{expected['acc,none']:.4f}" in r for r in rows), table
    assert any("acc_norm" in r and f"{expected['acc_norm,none']:.4f}" in r for r in rows), table
    (results,) = tmp_path.rglob("results_*.json")
    saved = json.loads(results.read_text())["results"]["tiny_mc"]
    assert saved["acc,none"] == expected["acc,none"] and saved["acc_norm,none"] == expected["acc_norm,none"]
    assert list(tmp_path.rglob("samples_tiny_mc_*.jsonl"))  # --log_samples reached lm-eval


def test_model_args_batch_size_wins_over_the_command_lines(workdir, reference, capsys):
    """lm-eval's command line passes its own --batch_size (default 1) with every run: a batch_size
    in --model_args must not collide with it ("multiple values") but be the one used."""
    from experiments.lm_eval import main
    from qlora_jax.eval.lm_eval_model import QLoraJaxLM

    built = []
    original = QLoraJaxLM._attach

    def spy(self, *args, **kwargs):
        built.append(self.batch_size_per_call)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(QLoraJaxLM, "_attach", spy)
        main(["--model_args", _model_args(workdir) + ",batch_size=3", "--tasks", "tiny_mc", "--include_path",
              str(workdir["tasks"])])
    assert built == [3]
    table = capsys.readouterr().out
    expected = reference["metrics"]["tiny_mc"]
    assert any("tiny_mc" in r and f"{expected['acc,none']:.4f}" in r for r in table.splitlines()), table


def test_unknown_task_is_a_clear_error(workdir):
    from experiments.lm_eval import UnknownTaskError, main

    with pytest.raises(UnknownTaskError, match="no_such_task.*include_path"):
        main(["--model_args", _model_args(workdir), "--tasks", "no_such_task", "--include_path",
              str(workdir["tasks"])])


def test_dataset_that_is_not_local_is_a_clear_error(workdir, tmp_path):
    from experiments.lm_eval import NotLocalError, main

    (tmp_path / "remote.yaml").write_text(
        "task: remote_task\ndataset_path: someorg/a_dataset_not_on_this_machine\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n")
    with pytest.raises(NotLocalError, match="a_dataset_not_on_this_machine.*not local|not local.*a_dataset_not_on"):
        main(["--model_args", _model_args(workdir), "--tasks", "remote_task", "--include_path", str(tmp_path)])


def test_unknown_model_arg_is_a_clear_error(workdir):
    from qlora_jax.eval.lm_eval_model import ModelArgsError, QLoraJaxLM

    with pytest.raises(ModelArgsError, match="load_in_4bit.*not an argument of the qlora_jax model.*quant"):
        QLoraJaxLM(pretrained=str(workdir["model"]), load_in_4bit=True)
    with pytest.raises(ModelArgsError, match="quant='nf5'"):
        QLoraJaxLM(pretrained=str(workdir["model"]), quant="nf5")


def test_adapter_for_another_model_is_a_clear_error(workdir, tmp_path, rng):
    from helpers import write_tiny_llama

    from qlora_jax.checkpoints.errors import CheckpointError
    from qlora_jax.eval.lm_eval_model import QLoraJaxLM

    other = write_tiny_llama(tmp_path, rng, hidden=32, intermediate=64)
    with pytest.raises(CheckpointError, match=r"lora_[AB]\.weight' has shape \[.*\] but .* implies \[.*32"):
        QLoraJaxLM(pretrained=str(other), adapter=str(workdir["adapter"]), quant="float32")


# ---------------------------------------------------------------- evaluation during training (--mc_eval_file)
@pytest.mark.slow
def test_finetune_logs_an_lm_eval_task_beside_the_held_out_loss(tiny_model, tmp_path, rng):
    """``mc_eval_file=<task YAML>``: the recipe logs the task's lm-eval metrics at step 0 and at
    the end; they equal what ``--model qlora_jax`` gives for the base alone and for the run's adapter."""
    from helpers import small_finetune_config

    from qlora_jax.eval.lm_eval_model import QLoraJaxLM
    from qlora_jax.finetune import run

    tasks = write_tasks(tmp_path / "tasks", rng)
    out = tmp_path / "run"
    run(small_finetune_config(tiny_model, out, mc_eval_file=str(tasks / "tiny_mc.yaml"), max_steps=10,
                              eval_steps=10, save_steps=10), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    mc = sorted((r for r in rows if r["kind"] == "mc_eval"), key=lambda r: r["step"])
    assert [r["step"] for r in mc] == [0, 10] and all(r["mc_task"] == "tiny_mc" for r in mc)
    assert any(r["kind"] == "eval" and r["step"] == 10 for r in rows)  # beside the held-out loss

    def evaluate(**model_args):
        import lm_eval
        from lm_eval.tasks import TaskManager

        lm = QLoraJaxLM(pretrained=str(tiny_model), compute_dtype="float32", **model_args)
        task_manager = TaskManager(include_path=str(tasks), include_defaults=False)
        result = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=task_manager, bootstrap_iters=0,
                                         random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                         fewshot_random_seed=0)
        return result["results"]["tiny_mc"]

    before, after = evaluate(), evaluate(adapter=str(out))
    for row, expected in ((mc[0], before), (mc[1], after)):
        assert row["mc_acc"] == expected["acc,none"] and row["mc_acc_norm"] == expected["acc_norm,none"]
        assert row["mc_count"] == 12


@pytest.mark.slow
def test_bitsandbytes_4bit_checkpoint_matches_hf(oracle, workdir, tmp_path):
    """The same bitsandbytes NF4+DQ checkpoint (quantized and saved by transformers on the CPU) with
    the PEFT adapter: lm-eval's hf model (bitsandbytes' exact CPU dequantization, float32 compute)
    against ours reading the stored bytes (quant=nf4)."""
    import shutil

    saved = tmp_path / "bnb4"
    oracle.run("hf_models.py", {"q/input_ids": np.array([[1, 2, 3]], np.int64)}, {"cases": [
        dict(name="q", op="bnb4", dir=str(workdir["model"]), quant_type="nf4", double_quant=True,
             save_dir=str(saved))]})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(workdir["model"] / name, saved / name)
    quantized = {**workdir, "model": saved}
    tasks = ("tiny_mc", "tiny_lambada")
    expected = hf_reference(oracle, quantized, tasks)
    got = ours(quantized, tasks, quant="nf4")
    for task in tasks:
        np.testing.assert_allclose(loglikelihoods(got, task), loglikelihoods(expected, task), rtol=0,
                                   atol=PER_TOKEN * MAX_LENGTH)
        assert greedy_flags(got, task) == greedy_flags(expected, task)
    assert got["metrics"]["tiny_mc"]["acc,none"] == expected["metrics"]["tiny_mc"]["acc,none"]
    assert got["metrics"]["tiny_mc"]["acc_norm,none"] == expected["metrics"]["tiny_mc"]["acc_norm,none"]


def test_written_chatterbot_task_is_the_finetunes_held_out_task(tmp_path):
    """``experiments.lm_eval_task`` writes the held-out reply-retrieval task: lm-eval's own task
    loader, reading the YAML and its JSONL, sees exactly the questions, replies and answers of
    :func:`qlora_jax.eval.chatterbot_task` for the finetune's default split."""
    import subprocess
    import sys

    from lm_eval.tasks import TaskManager

    from qlora_jax.eval import chatterbot_task
    from qlora_jax.recipe.config import FinetuneConfig

    out = subprocess.run([sys.executable, "-m", "experiments.lm_eval_task", f"--task_dir={tmp_path}",
                          "--task_name=held_out_replies"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    defaults = FinetuneConfig()
    expected = chatterbot_task(eval_dataset_size=defaults.eval_dataset_size, seed=defaults.seed,
                               max_eval_samples=defaults.max_eval_samples).items
    task_manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = task_manager.load("held_out_replies")["tasks"]["held_out_replies"]
    docs = list(task.test_docs())
    assert len(docs) == len(expected) > 0
    for doc, item in zip(docs, expected, strict=True):
        assert task.doc_to_text(doc) == item.context
        assert tuple(task.doc_to_choice(doc)) == item.choices
        assert task.doc_to_target(doc) == item.answer
    assert task.config.output_type == "multiple_choice" and task.config.target_delimiter == ""
