"""The finetuning recipe end to end: loss falls, bf16 adapters, exact resume, sharding, adapter_init, CLI.

Divergence, validation, the run lock, resume checks and kills are in test_faults_training.py.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_latest_checkpoint, restore_targets, train_losses
from helpers import small_finetune_config as small_config

from qlora_jax.finetune import run
from qlora_jax.training_state import TrainCheckpointer

REPO = pathlib.Path(__file__).resolve().parents[2]


RECIPE_LOG = "qlora_jax.recipe.steps"


@pytest.mark.slow
def test_tiny_run_learns_and_writes_outputs(tiny_model, tmp_path):
    from qlora_jax.eval import MultipleChoiceEvaluator, load_task
    from qlora_jax.model import load_pretrained

    out = tmp_path / "run"
    cfg = small_config(tiny_model, out, max_steps=30, mc_eval_file="chatterbot", mc_eval_steps=20)
    result = run(cfg, progress=False)
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 31))
    assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5
    assert result.final_eval_loss < result.first_eval_loss - 0.3
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "loss_curve.png",
                 "samples.json", "summary.json", "metrics.jsonl", "completed"):
        assert (out / name).exists(), name
    assert not (out / ".lock").exists()
    assert TrainCheckpointer(out / "checkpoints").latest_step() == 30
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 2 and all({"question", "reference", "before", "after"} <= set(s) for s in samples)
    # The answers after training come from the trained adapters: they differ from those before.
    assert [s["after"] for s in samples] != [s["before"] for s in samples]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == 30 and summary["final_eval_loss"] == pytest.approx(result.final_eval_loss)
    # The multiple-choice evaluation ran at step 0, every mc_eval_steps and at the end, on the model
    # being trained: the last row is what the harness gives for the exported adapter.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    mc = {r["step"]: r for r in rows if r["kind"] == "mc_eval"}
    assert sorted(mc) == [0, 20, 30]
    model, tokenizer = load_pretrained(cfg.model, quant=cfg.quant, adapter=out / "adapter", compute_dtype="float32")
    task = load_task("chatterbot", eval_dataset_size=cfg.eval_dataset_size, seed=cfg.seed)
    direct = MultipleChoiceEvaluator(model.spec, tokenizer, task, template=cfg.chat_template,
                                     max_length=model.config.max_position_embeddings)(model.base_params,
                                                                                      model.lora_params)
    assert mc[30]["mc_count"] == direct["mc_count"] > 0
    assert mc[30]["mc_acc"] == pytest.approx(direct["mc_acc"])
    assert mc[30]["mc_answer_loss"] == pytest.approx(direct["mc_answer_loss"], rel=1e-4)


@pytest.mark.slow
def test_bfloat16_adapters_learn_and_export_as_bfloat16(tiny_model, tmp_path):
    """--lora_dtype=bfloat16 (qlora.py with --bf16): the adapters train, are saved as bfloat16, reload."""
    from safetensors import safe_open

    from qlora_jax.models.config import LlamaConfig
    from qlora_jax.peft_io import load_peft_adapter

    out = tmp_path / "run"
    result = run(small_config(tiny_model, out, max_steps=20, eval_steps=20, save_steps=20, num_sample_prompts=0,
                              lora_dtype="bfloat16"), progress=False)
    losses = train_losses(out)
    assert np.mean([losses[s] for s in range(16, 21)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.3
    assert result.final_eval_loss < result.first_eval_loss - 0.2
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "np") as f:
        keys = list(f.keys())
        assert keys and {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    config = LlamaConfig.from_hf_dict(json.loads((tiny_model / "config.json").read_text()))
    lora, lora_config = load_peft_adapter(out / "adapter", config)
    assert lora_config.r == 8
    assert all(float(np.abs(np.asarray(x, np.float32)).max()) > 0 for x in jax.tree.leaves(lora))


@pytest.mark.slow
def test_resume_continues_exactly(tiny_model, tmp_path, caplog, quantizer_calls):
    """The losses, adapters and optimizer state after a resume equal those of the uninterrupted run,
    bit for bit (dropout on, so the RNG counts), and the resumed run reads the base its first part
    saved instead of quantizing again."""
    common = dict(warmup_ratio=0.0, lora_dropout=0.1, save_steps=3, eval_steps=100, num_sample_prompts=0)
    whole = tmp_path / "whole"
    run(small_config(tiny_model, whole, max_steps=7, **common), progress=False)
    split = tmp_path / "split"
    run(small_config(tiny_model, split, max_steps=3, **common), progress=False)
    assert quantizer_calls["count"] > 0 and (split / "base").is_dir()
    quantizer_calls["forbidden"] = True
    with caplog.at_level(logging.INFO, logger=RECIPE_LOG):
        run(small_config(tiny_model, split, max_steps=7, resume=True, **common), progress=False)
    assert "resumed from step 3" in caplog.text
    expected, got = train_losses(whole), train_losses(split)
    assert sorted(got) == list(range(1, 8))
    assert {step: got[step] for step in range(4, 8)} == {step: expected[step] for step in range(4, 8)}
    # Bit for bit: the final adapters, and the last checkpoint's adapters and optimizer state.
    from safetensors.numpy import load_file

    got_adapter, want_adapter = (load_file(run_dir / "adapter" / "adapter_model.safetensors")
                                 for run_dir in (split, whole))
    assert got_adapter.keys() == want_adapter.keys()
    for key in want_adapter:
        np.testing.assert_array_equal(got_adapter[key], want_adapter[key], err_msg=key)
    targets = restore_targets(tiny_model, split, **common)
    assert_same_latest_checkpoint(split, whole, targets, step=7)


@pytest.mark.slow
def test_sharded_run_matches_single_device(tiny_model, tmp_path, caplog):
    """The recipe on a data=2,fsdp=4 mesh (8 host devices) sees the same batches and losses."""
    common = dict(max_steps=3, eval_steps=3, save_steps=3, warmup_ratio=0.0, num_sample_prompts=0)
    run(small_config(tiny_model, tmp_path / "one", per_device_train_batch_size=8, **common), progress=False)
    with caplog.at_level(logging.INFO, logger=RECIPE_LOG):
        run(small_config(tiny_model, tmp_path / "eight", per_device_train_batch_size=1, per_device_eval_batch_size=1,
                         mesh="data=2,fsdp=4", **common), progress=False)
    assert "global batch 8" in caplog.text
    single, sharded = train_losses(tmp_path / "one"), train_losses(tmp_path / "eight")
    for step in (1, 2, 3):
        np.testing.assert_allclose(sharded[step], single[step], rtol=1e-4, err_msg=f"step {step}")


@pytest.mark.slow
def test_adapter_init_from_previous_run(tiny_model, tmp_path, caplog):
    first = tmp_path / "first"
    run(small_config(tiny_model, first, max_steps=10, num_sample_prompts=0), progress=False)
    fresh = run(small_config(tiny_model, tmp_path / "fresh", max_steps=1, eval_steps=1, num_sample_prompts=0),
                progress=False)
    for source in (first / "adapter", first / "checkpoints"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=RECIPE_LOG):
            result = run(small_config(tiny_model, tmp_path / f"from_{source.name}", max_steps=1, eval_steps=1,
                                      num_sample_prompts=0, adapter_init=str(source)), progress=False)
        assert "adapters initialised" in caplog.text
        # Starting from trained adapters, the held-out loss before any step is the trained one.
        assert result.first_eval_loss < fresh.first_eval_loss - 0.3


@pytest.mark.slow
def test_fresh_run_refuses_to_overwrite_checkpoints(tiny_model, tmp_path):
    out = tmp_path / "once"
    run(small_config(tiny_model, out, max_steps=2, save_steps=1, num_sample_prompts=0), progress=False)
    with pytest.raises(FileExistsError, match="already holds checkpoints.*resume"):
        run(small_config(tiny_model, out, max_steps=2, num_sample_prompts=0), progress=False)
    assert TrainCheckpointer(out / "checkpoints").latest_step() == 2
    assert not (out / ".lock").exists()


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp, jax
    from qlora_jax.training_state import TrainCheckpointer
    ckpt = TrainCheckpointer(sys.argv[1])
    small = {"a": jnp.arange(10.0)}
    ckpt.save(1, small, {"m": jnp.ones(3)}, data_state={"index": 1}, rng_key=jax.random.key(0), flags={})
    ckpt.wait()
    big = {"a": jnp.ones((64, 1024, 1024))}  # 256 MB: still being written when the process dies
    ckpt.save(2, big, {"m": jnp.ones(3)}, data_state={"index": 2}, rng_key=jax.random.key(0), flags={})
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_save_leaves_previous_checkpoint_restorable(tmp_path):
    directory = tmp_path / "ckpts"
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(directory)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    checkpointer = TrainCheckpointer(directory)
    assert checkpointer.latest_step() == 1
    state = checkpointer.restore({"a": jnp.zeros(10)}, {"m": jnp.zeros(3)})
    np.testing.assert_array_equal(np.asarray(state.trainable["a"]), np.arange(10.0))
    assert state.data_state == {"index": 1}
    # The next save of step 2 works over whatever the killed one left behind.
    checkpointer.save(2, {"a": jnp.arange(10.0) + 1}, {"m": jnp.ones(3)}, data_state={"index": 2},
                      rng_key=jax.random.key(0), flags={})
    checkpointer.close()
    assert TrainCheckpointer(directory).latest_step() == 2


def test_bad_dataset_row_names_file_and_row(tiny_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "Hi"}\n{"instruction": "Say bye"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl(:| line | row )2\b.*output"):
        run(small_config(tiny_model, tmp_path / "bad", dataset=str(data)), progress=False)


@pytest.mark.slow
def test_default_cli_run_with_few_steps(tmp_path):
    """`python -m experiments.finetune` on the embedded model, shortened by flags: outputs exist, loss falls.

    The real default model, data and optimizer through the real CLI; only the cadence is cut down
    (4 steps, 2 evaluations of 16 conversations, one held-out answer of 8 tokens, 128-token
    sequences) with a learning rate high enough to move the loss in 4 steps. The default
    multiple-choice evaluation is off here (a third of this run's time on 2 cores); the recipe's
    chatterbot reply retrieval is test_tiny_run_learns_and_writes_outputs's.
    """
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.finetune", "--max_steps=4", "--eval_steps=4", "--save_steps=4",
         "--eval_dataset_size=16", "--num_sample_prompts=1", "--sample_max_new_tokens=8", "--source_max_len=64",
         "--target_max_len=64", "--max_train_samples=256", "--learning_rate=1e-3", "--warmup_ratio=0",
         "--mc_eval_file=none",
         f"--output_dir={out}", "--progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=2400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out loss:" in proc.stdout and "before:" in proc.stdout and "after:" in proc.stdout
    assert "compiling the training step" in proc.stderr  # absl logging at the default (INFO) verbosity
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e["eval_loss"] for e in evals if e["kind"] == "eval"]
    # A pretrained model's response loss on held-out chatterbot (3.4-4.2 nats, by split), far
    # below a model that knows nothing (ln 49152 = 10.8 nats).
    assert len(evals) == 2 and 2.5 < evals[0] < 5.0, evals
    assert evals[-1] < evals[0] - 0.3, evals
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "loss_curve.png").exists()


@pytest.mark.slow
def test_readme_library_snippet_runs_as_written():
    """The README's first Python block, executed as it stands (embedded model, NF4 + DQ)."""
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 2 and all(line.strip() for line in lines[:2]), proc.stdout
