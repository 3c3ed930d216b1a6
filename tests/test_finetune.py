"""The finetuning recipe end to end: loss falls, exact resume, killed saves, non-finite loss, CLI."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from qlora_jax.checkpointing import TrainCheckpointer
from qlora_jax.finetune import FinetuneConfig, run
from qlora_jax.model import load_tokenizer
from qlora_jax.train import NonFiniteLossError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    """A small random Llama with the embedded model's tokenizer (so the chat data fits it)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = load_tokenizer("embedded")
    vocab, d, f, layers = tokenizer.vocab_size, 64, 128, 2
    rng = np.random.default_rng(0)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": d,
              "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": True, "eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.bos_id}
    (path / "config.json").write_text(json.dumps(config))
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (32, d), "self_attn.v_proj": (32, d),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    tensors = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, d)), "model.norm.weight": np.ones(d)}
    for i in range(layers):
        for name, shape in shapes.items():
            tensors[f"model.layers.{i}.{name}.weight"] = rng.normal(0, shape[1] ** -0.5, shape)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(d)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(d)
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(path / "model.safetensors"))
    tokenizer.save(path)
    return path


def small_config(model: pathlib.Path, out: pathlib.Path, **overrides) -> FinetuneConfig:
    settings = dict(model=str(model), output_dir=str(out), max_train_samples=96, eval_dataset_size=16,
                    per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=20, eval_steps=10,
                    save_steps=10, learning_rate=3e-3, lora_r=8, lora_alpha=16, source_max_len=96,
                    target_max_len=64, num_sample_prompts=2, sample_max_new_tokens=8, data_workers=1,
                    compute_dtype="float32", chat_template="chatml")
    settings.update(overrides)
    return FinetuneConfig(**settings)


def train_losses(out: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_tiny_run_learns_and_writes_outputs(tiny_model, tmp_path):
    out = tmp_path / "run"
    result = run(small_config(tiny_model, out, max_steps=30), progress=False, log=lambda _: None)
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 31))
    assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5
    assert result.final_eval_loss < result.first_eval_loss - 0.3
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "loss_curve.png",
                 "samples.json", "summary.json", "metrics.jsonl", "completed"):
        assert (out / name).exists(), name
    assert TrainCheckpointer(out / "checkpoints").latest_step() == 30
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 2 and all({"question", "reference", "before", "after"} <= set(s) for s in samples)


def test_bfloat16_adapters_learn_and_export_as_bfloat16(tiny_model, tmp_path):
    """--lora_dtype=bfloat16 (qlora.py with --bf16): the adapters train, are saved as bfloat16, reload."""
    from safetensors import safe_open

    from qlora_jax.peft_io import load_peft_adapter

    out = tmp_path / "run"
    result = run(small_config(tiny_model, out, max_steps=20, eval_steps=20, save_steps=20, num_sample_prompts=0,
                              lora_dtype="bfloat16"), progress=False, log=lambda _: None)
    losses = train_losses(out)
    assert np.mean([losses[s] for s in range(16, 21)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.3
    assert result.final_eval_loss < result.first_eval_loss - 0.2
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "np") as f:
        keys = list(f.keys())
        assert keys and {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    from qlora_jax.models.config import LlamaConfig

    config = LlamaConfig.from_hf_dict(json.loads((tiny_model / "config.json").read_text()))
    lora, lora_config = load_peft_adapter(out / "adapter", config)
    assert lora_config.r == 8
    assert all(float(np.abs(np.asarray(x, np.float32)).max()) > 0 for x in jax.tree.leaves(lora))


def test_resume_continues_exactly(tiny_model, tmp_path):
    """The losses after a resume equal those of the uninterrupted run (dropout on, so the RNG counts)."""
    common = dict(warmup_ratio=0.0, lora_dropout=0.1, save_steps=3, eval_steps=100, num_sample_prompts=0)
    whole = tmp_path / "whole"
    run(small_config(tiny_model, whole, max_steps=7, **common), progress=False, log=lambda _: None)
    split = tmp_path / "split"
    run(small_config(tiny_model, split, max_steps=3, **common), progress=False, log=lambda _: None)
    logs = []
    run(small_config(tiny_model, split, max_steps=7, resume=True, **common), progress=False, log=logs.append)
    assert any("resumed from step 3" in line for line in logs)
    expected, got = train_losses(whole), train_losses(split)
    for step in range(4, 8):
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-6, err_msg=f"step {step}")


def test_sharded_run_matches_single_device(tiny_model, tmp_path):
    """The recipe on a data=2,fsdp=4 mesh (8 host devices) sees the same batches and losses."""
    common = dict(max_steps=3, eval_steps=3, save_steps=3, warmup_ratio=0.0, num_sample_prompts=0)
    run(small_config(tiny_model, tmp_path / "one", per_device_train_batch_size=8, **common), progress=False,
        log=lambda _: None)
    logs = []
    run(small_config(tiny_model, tmp_path / "eight", per_device_train_batch_size=1, per_device_eval_batch_size=1,
                     mesh="data=2,fsdp=4", **common), progress=False, log=logs.append)
    assert any("global batch 8" in line for line in logs)
    single, sharded = train_losses(tmp_path / "one"), train_losses(tmp_path / "eight")
    for step in (1, 2, 3):
        np.testing.assert_allclose(sharded[step], single[step], rtol=1e-4, err_msg=f"step {step}")


def test_adapter_init_from_previous_run(tiny_model, tmp_path):
    first = tmp_path / "first"
    run(small_config(tiny_model, first, max_steps=10), progress=False, log=lambda _: None)
    fresh = run(small_config(tiny_model, tmp_path / "fresh", max_steps=1, eval_steps=1), progress=False,
                log=lambda _: None)
    for source in (first / "adapter", first / "checkpoints"):
        logs = []
        result = run(small_config(tiny_model, tmp_path / f"from_{source.name}", max_steps=1, eval_steps=1,
                                  adapter_init=str(source)), progress=False, log=logs.append)
        assert any("adapters initialised" in line for line in logs)
        # Starting from trained adapters, the held-out loss before any step is the trained one.
        assert result.first_eval_loss < fresh.first_eval_loss - 0.3


def test_fresh_run_refuses_to_overwrite_checkpoints(tiny_model, tmp_path):
    out = tmp_path / "once"
    run(small_config(tiny_model, out, max_steps=2, save_steps=1, num_sample_prompts=0), progress=False,
        log=lambda _: None)
    with pytest.raises(FileExistsError, match="already holds checkpoints.*resume"):
        run(small_config(tiny_model, out, max_steps=2, num_sample_prompts=0), progress=False, log=lambda _: None)
    assert TrainCheckpointer(out / "checkpoints").latest_step() == 2


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "diverge"
    cfg = small_config(tiny_model, out, max_steps=10, save_steps=1, learning_rate=1e25, max_grad_norm=1e30,
                       warmup_ratio=0.0, num_sample_prompts=0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step (\d+).*last good checkpoint is step"):
        run(cfg, progress=False, log=lambda _: None)
    checkpointer = TrainCheckpointer(out / "checkpoints")
    last = checkpointer.latest_step()
    assert last is not None and last >= 1
    losses = train_losses(out)
    assert all(np.isfinite(losses[s]) for s in range(1, last + 1))
    state = checkpointer.restore(*_restore_targets(tiny_model, out))
    assert state.step == last
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.trainable))


def _restore_targets(model_path, out):
    """Abstract trainable/opt state of the small config, built the way the recipe builds them."""
    from qlora_jax.finetune import _lr_schedule
    from qlora_jax.lora import LoraConfig
    from qlora_jax.model import load_pretrained
    from qlora_jax.optim import make_optimizer

    cfg = small_config(model_path, out)
    model, _ = load_pretrained(cfg.model, lora=LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dtype=cfg.lora_dtype),
                               compute_dtype=cfg.compute_dtype)
    trainable = model.lora_params
    optimizer = make_optimizer(cfg.optim, learning_rate=_lr_schedule(cfg), b2=cfg.adam_beta2,
                               max_grad_norm=cfg.max_grad_norm)
    return trainable, optimizer.init(trainable)


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp, jax
    from qlora_jax.checkpointing import TrainCheckpointer
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
        run(small_config(tiny_model, tmp_path / "bad", dataset=str(data)), progress=False, log=lambda _: None)


def test_default_cli_run_with_few_steps(tmp_path):
    """`python -m experiments.finetune` on the embedded model, shortened: outputs exist, loss falls."""
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.finetune", "--max_steps=12", "--eval_steps=6", "--save_steps=6",
         "--eval_dataset_size=32", "--num_sample_prompts=2", f"--output_dir={out}", "--progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out loss:" in proc.stdout and "before:" in proc.stdout and "after:" in proc.stdout
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e["eval_loss"] for e in evals if e["kind"] == "eval"]
    assert 3.5 < evals[0] < 5.0, evals  # the base model's response loss on chatterbot, ~4.2 nats
    assert evals[-1] < evals[0] - 0.3, evals
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "loss_curve.png").exists()
