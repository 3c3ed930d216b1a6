"""Fault injection for the finetune recipe (issue 13's classes 2-5), on a tiny model.

* class 3, meaningless settings: each rejected before any work, naming the setting (= the flag);
* class 2, dead training: the divergence monitor's rules, the loop on scripted steps (which
  checkpoints survive, what the message names), and real runs at learning_rate=1e6 and 1e25;
* class 4, state that disagrees with itself: resume with changed settings, resume of a finished
  run, adapter_init of another rank;
* class 5, concurrency: the run lock (held, stale and taken over, another host, released on errors);
* kill -9 at seeded random points during training and during saves, resumed (a plain resume: the
  lock is taken over) until done: no checkpoint lost or corrupt, and the result equals an
  uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_latest_checkpoint, hold_run_lock, restore_targets, small_finetune_config, train_losses

from qlora_jax.finetune import FinetuneConfig, run
from qlora_jax.recipe import steps
from qlora_jax.recipe.divergence import DivergenceMonitor
from qlora_jax.recipe.run_lock import LOCK_FILE, RunLock, RunLockedError, StaleRunLockError
from qlora_jax.recipe.settings import ConfigError
from qlora_jax.recipe.steps import TrainingCollapsedError
from qlora_jax.train import NonFiniteLossError
from qlora_jax.training_state import TrainCheckpointer

pytestmark = pytest.mark.faults  # the fault campaign, selectable with -m faults

REPO = pathlib.Path(__file__).resolve().parents[2]
RECIPE_LOG = "qlora_jax.recipe.steps"


# ============================================================================ class 3: settings
BAD_SETTINGS = [
    ("max_steps", 0), ("max_steps", -5), ("max_steps", 2.5), ("max_steps", True),
    ("learning_rate", 0.0), ("learning_rate", -2e-4), ("learning_rate", math.nan), ("learning_rate", math.inf),
    ("warmup_ratio", -0.1), ("warmup_ratio", 1.5), ("adam_beta1", 1.0), ("adam_beta1", -0.1), ("adam_beta2", 1.0),
    ("save_total_limit", 0), ("save_steps", 0), ("eval_steps", 0), ("logging_steps", 0),
    ("per_device_train_batch_size", 0), ("per_device_eval_batch_size", -1), ("gradient_accumulation_steps", 0),
    ("lora_r", 0), ("lora_alpha", 0.0), ("lora_dropout", 1.0), ("lora_modules", "q_proj("), ("lora_dtype", "int8"),
    ("bits", 5), ("quant_type", "nf3"), ("blocksize", 48), ("bnb_backend", "gpu"), ("compute_dtype", "int8"),
    ("source_max_len", 0), ("target_max_len", -1), ("eval_dataset_size", 0), ("eval_dataset_size", 1.5),
    ("eval_dataset_size", -3), ("max_train_samples", 0), ("max_eval_samples", 0), ("max_grad_norm", -1.0),
    ("weight_decay", -0.1), ("seed", -1), ("num_sample_prompts", -1), ("sample_max_new_tokens", 0),
    ("data_workers", -2), ("optim", "sgd"), ("lr_scheduler_type", "step"), ("dataset_format", "csv"),
    ("dataset", "no_such_dataset"), ("dataset", "/nonexistent/data.jsonl"), ("model", "/nonexistent/model"),
    ("adapter_init", "/nonexistent/adapter"), ("mesh", "rows=2"), ("mesh", "data=x"), ("mesh", "fsdp=0"),
    ("output_dir", " "), ("peft_expert_format", "stacked"),
]


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS, ids=[f"{n}={v!r}" for n, v in BAD_SETTINGS])
def test_bad_setting_is_rejected_naming_it(name, value):
    with pytest.raises(ConfigError) as err:
        FinetuneConfig(**{name: value})
    assert str(err.value).startswith(f"{name}="), str(err.value)


@pytest.mark.parametrize(("settings", "named"), [
    (dict(full_finetune=True, bits=4), "full_finetune"),
    (dict(full_finetune=True, bits=16, adapter_init=str(REPO)), "adapter_init"),
    (dict(bits=16, quant_type="fp4"), "quant_type"),
    (dict(dataset="chatterbot", dataset_format="alpaca"), "dataset_format"),
    (dict(peft_expert_format="fused", lora_dropout=0.05), "peft_expert_format"),
    # rsLoRA r=3, alpha=3: no float alpha gives the same scaling exactly at rank 6.
    (dict(peft_expert_format="fused", use_rslora=True, lora_r=3, lora_alpha=3.0), "peft_expert_format"),
    (dict(peft_expert_format="fused", full_finetune=True, bits=16), "peft_expert_format"),
])
def test_meaningless_combinations_are_rejected(settings, named):
    with pytest.raises(ConfigError, match=f"^{named}"):
        FinetuneConfig(**settings)


def test_good_settings_are_kept_and_normalised():
    cfg = FinetuneConfig(learning_rate=1, eval_dataset_size=0.25, max_train_samples=None, mesh="data=2,fsdp=-1")
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.eval_dataset_size == 0.25 and cfg.quant == "nf4"
    assert FinetuneConfig(bits=16).quant == "bf16" and FinetuneConfig(eval_dataset_size=96).eval_dataset_size == 96
    assert set(FinetuneConfig.resume_may_change()) >= {"max_steps", "eval_steps", "save_steps", "logging_steps"}


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.finetune", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_rejects_bad_flags_before_any_work_and_help_exits_0(tmp_path):
    out = tmp_path / "never"
    flagfile = tmp_path / "run.flags"
    flagfile.write_text(f"--output_dir={out}\n--learning_rate=nan\n")
    bad = _cli(f"--flagfile={flagfile}")
    assert bad.returncode == 1 and "--learning_rate=nan" in bad.stderr, bad.stderr[-2000:]
    assert not out.exists()  # nothing was created, let alone loaded
    assert _cli("--helpfull").returncode == 0
    shown = _cli("--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    # Flags generated from FinetuneConfig, with their help, including those that had none before.
    for flag in ("data_workers", "sample_max_new_tokens", "bnb_backend", "force_unlock", "progress"):
        assert re.search(rf"^  --(\[no\])?{flag}: \S", shown.stdout, re.MULTILINE), flag


def test_settings_the_model_decides_fail_before_loading_weights(tiny_model, tmp_path, caplog):
    cases = [(dict(lora_modules="qkv_proj"), "lora_modules"), (dict(source_max_len=2048), "source_max_len"),
             (dict(mesh="data=3"), "mesh"), (dict(per_device_train_batch_size=200), "per_device_train_batch_size"),
             (dict(peft_expert_format="fused"), "peft_expert_format")]  # the tiny Llama has no experts
    for overrides, named in cases:
        with caplog.at_level(logging.INFO, logger=RECIPE_LOG), pytest.raises(ConfigError, match=f"^{named}"):
            run(small_finetune_config(tiny_model, tmp_path / named, **overrides), progress=False)
        assert not (tmp_path / named / LOCK_FILE).exists()  # the lock is released on errors
    # Only the batch size needs the data, so only it got past loading the weights.
    assert caplog.text.count("loaded in") == 1


# ============================================================================ class 2: divergence
def test_monitor_rules():
    v = 1000
    uniform = math.log(v)
    monitor = DivergenceMonitor(v, patience=3)
    assert monitor.update(1, loss=6.0, grad_norm=2.0, tokens=10).healthy and monitor.last_good_state == 0
    # A live model at loss ln(V) has a large gradient: healthy.
    assert monitor.update(2, loss=uniform, grad_norm=0.5, tokens=10).healthy
    # Uniform output with a flat gradient: suspect, then diverged after `patience` steps in a row.
    first = monitor.update(3, loss=uniform + 1e-5, grad_norm=1e-9, tokens=10)
    assert first.status == "suspect" and "uniform" in first.reason
    assert monitor.update(4, loss=uniform, grad_norm=0.0, tokens=0).status == "suspect"  # no targets: no news
    assert monitor.update(5, loss=uniform, grad_norm=0.0, tokens=10).status == "suspect"
    verdict = monitor.update(6, loss=uniform, grad_norm=0.0, tokens=10)
    assert verdict.diverged and verdict.since_step == 3 and monitor.last_good_state == 1
    # A healthy step in between resets the streak.
    monitor = DivergenceMonitor(v, patience=2)
    assert monitor.update(1, loss=3.0, grad_norm=0.0, tokens=5).status == "suspect"
    assert monitor.update(2, loss=3.0, grad_norm=1.0, tokens=5).healthy
    assert monitor.update(3, loss=3.0, grad_norm=0.0, tokens=5).status == "suspect"
    assert "zero gradient" in monitor.update(4, loss=3.0, grad_norm=0.0, tokens=5).reason
    # Non-finite loss or gradient: at once.
    for loss, grad in ((math.nan, 1.0), (2.0, math.inf)):
        fresh = DivergenceMonitor(v, start_step=10)
        assert fresh.update(11, loss=loss, grad_norm=grad, tokens=5).diverged and fresh.last_good_state == 9
    assert DivergenceMonitor(v).check_eval(4, math.nan).diverged


class ScriptedBatches:
    """Stands in for BatchIterator: empty batches and a position."""

    epoch = 0

    def __init__(self):
        self.index = 0

    def next_batches(self, count):
        self.index += 1
        return {"input_ids": np.zeros((count, 2, 4), np.int32), "attention_mask": np.ones((count, 2, 4), np.int32)}

    @property
    def state(self):
        return {"index": self.index}


def scripted_loop(tmp_path, script, *, max_steps=8, save_total_limit=2, eval_steps=100, eval_loss=lambda w: 2.0,
                  vocab=100):
    """train_loop over a step whose loss, gradient norm and new weight ``script(step)`` gives, with a
    real checkpointer saving every step."""

    def train_step(trainable, opt_state, frozen, batch, key):
        step = int(opt_state["count"]) + 1
        loss, grad_norm, weight = script(step)
        return ({"w": jnp.full((3,), weight, jnp.float32)}, {"count": jnp.asarray(step, jnp.int32)},
                {"loss": loss, "grad_norm": grad_norm, "tokens": 8.0})

    cfg = FinetuneConfig(max_steps=max_steps, save_steps=1, eval_steps=eval_steps, save_total_limit=save_total_limit,
                         output_dir=str(tmp_path))
    state = steps.TrainState(0, {"w": jnp.zeros(3)}, {"count": jnp.asarray(0, jnp.int32)}, jax.random.key(0), None)
    checkpointer = TrainCheckpointer(tmp_path / "checkpoints", max_to_keep=save_total_limit)
    try:
        with steps.MetricsLog(tmp_path / "metrics.jsonl") as metrics:
            return steps.train_loop(cfg, state, train_step=train_step, frozen=None, batches=ScriptedBatches(),
                                    evaluate_fn=lambda p: eval_loss(float(p["w"][0])), schedule=lambda s: 1e-3,
                                    checkpointer=checkpointer, metrics=metrics, monitor=DivergenceMonitor(vocab),
                                    put_batch=lambda b: b, progress=False)
    finally:
        checkpointer.close()


def saved_weights(tmp_path):
    """{step: weight} of every checkpoint left, each restored (so none is corrupt)."""
    checkpointer = TrainCheckpointer(tmp_path / "checkpoints")
    out = {}
    for step in checkpointer.all_steps():
        state = checkpointer.restore({"w": jnp.zeros(3)}, {"count": jnp.asarray(0, jnp.int32)}, step=step)
        out[step] = float(state.trainable["w"][0])
        assert checkpointer.read_meta(step)["health"]["loss"] is not None  # saved while healthy
    checkpointer.close()
    return out


def test_loop_keeps_the_confirmed_checkpoints(tmp_path):
    result = scripted_loop(tmp_path, lambda s: (3.0, 1.0, float(s)), max_steps=6)
    assert result.state.step == 6 and result.eval_loss == 2.0
    assert saved_weights(tmp_path) == {5: 5.0, 6: 6.0}


def test_loop_nonfinite_loss_keeps_the_last_good_checkpoint_even_with_limit_1(tmp_path):
    script = lambda s: (math.nan if s == 6 else 3.0, 1.0, float(s))  # noqa: E731
    with pytest.raises(NonFiniteLossError, match=r"diverged at step 6: non-finite.*last good checkpoint is step 4"):
        scripted_loop(tmp_path, script, save_total_limit=1)
    # State 5 produced the NaN: its checkpoint is gone; state 4 (proven by step 5) stays, alone.
    assert saved_weights(tmp_path) == {4: 4.0}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(rows[-1]["loss"]) and rows[-1]["step"] == 6


def test_loop_collapse_is_never_saved(tmp_path):
    uniform = math.log(100)
    script = lambda s: (uniform, 0.0, float(s)) if s >= 4 else (3.0, 1.0, float(s))  # noqa: E731
    with pytest.raises(TrainingCollapsedError, match=r"diverged at step 6: collapse to the uniform output.*"
                                                     r"last good checkpoint is step 2"):
        scripted_loop(tmp_path, script)
    # Steps 4 and 5 were suspect and not saved; state 3 led to the collapse and was removed.
    assert saved_weights(tmp_path) == {1: 1.0, 2: 2.0}


def test_loop_refuses_to_save_a_nonfinite_state(tmp_path):
    """Finite metrics but NaN parameters after the update (what learning_rate=nan did)."""
    script = lambda s: (3.0, 1.0, math.nan if s >= 3 else float(s))  # noqa: E731
    with pytest.raises(NonFiniteLossError, match=r"step 3: the state after the update is non-finite.*"
                                                 r"last good checkpoint is step 2"):
        scripted_loop(tmp_path, script)
    assert saved_weights(tmp_path) == {1: 1.0, 2: 2.0}


def test_loop_nonfinite_held_out_loss_stops(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"held-out loss.*last good checkpoint is step 3"):
        scripted_loop(tmp_path, lambda s: (3.0, 1.0, float(s)), eval_steps=4,
                      eval_loss=lambda w: math.nan if w >= 4 else 2.0)
    assert saved_weights(tmp_path) == {2: 2.0, 3: 3.0}


def test_nonfinite_state_is_never_exported(tmp_path):
    cfg = FinetuneConfig(output_dir=str(tmp_path))
    dead = steps.LoopResult(steps.TrainState(3, {"layers": {"a": jnp.array([1.0, jnp.nan])}}, None, None, None),
                            1.0, 0.0)
    with pytest.raises(NonFiniteLossError, match="non-finite: nothing exported"):
        steps.write_outputs(cfg, None, dead, tokenizer=None, data=None, samples_before=[], started=0.0)
    assert not any(tmp_path.iterdir())
    assert steps.tree_all_finite({"a": jnp.ones(3), "n": jnp.arange(3)}) and not steps.tree_all_finite(
        {"a": jnp.array([0.0, jnp.inf])})


@pytest.mark.slow
def test_learning_rate_1e6_stops_with_the_collapse_message(tiny_model, tmp_path):
    out = tmp_path / "collapse"
    cfg = small_finetune_config(tiny_model, out, learning_rate=1e6, warmup_ratio=0.0, max_steps=10, save_steps=1,
                                eval_steps=100, num_sample_prompts=0)
    with pytest.raises(TrainingCollapsedError, match=r"collapse to the uniform output.*no good checkpoint"):
        run(cfg, progress=False)
    # The first update killed the model, so its only checkpoint (state 1) was removed; nothing exported.
    assert TrainCheckpointer(out / "checkpoints").all_steps() == []
    assert not (out / "adapter").exists() and not (out / "completed").exists()
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and abs(losses[4] - math.log(49152)) < 1e-3


@pytest.mark.slow
def test_learning_rate_1e25_stops_at_nan_and_names_a_finite_checkpoint(tiny_model, tmp_path):
    """Warmup from 0 makes the first update a no-op, so state 1 is good; the next one overflows."""
    out = tmp_path / "nan"
    cfg = small_finetune_config(tiny_model, out, learning_rate=1e25, max_grad_norm=1e30, warmup_ratio=0.5,
                                max_steps=6, save_steps=1, eval_steps=100, num_sample_prompts=0)
    died = (NonFiniteLossError, TrainingCollapsedError)
    with pytest.raises(died, match=r"last good checkpoint is step (\d+)") as err:
        run(cfg, progress=False)
    good = int(err.value.args[0].split("last good checkpoint is step ")[1].split()[0])
    checkpointer = TrainCheckpointer(out / "checkpoints")
    assert checkpointer.latest_step() == good >= 1
    trainable, opt_state = restore_targets(tiny_model, out)
    state = checkpointer.restore(trainable, opt_state)
    assert steps.tree_all_finite((state.trainable, state.opt_state))


# ============================================================================ class 4: resume, adapter_init
@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory) -> pathlib.Path:
    """A completed 3-step run (r=8, checkpoints every step, held-out answers) to copy and resume."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(small_finetune_config(tiny_model, out, max_steps=3, save_steps=1, eval_steps=3, num_sample_prompts=1,
                              sample_max_new_tokens=4), progress=False)
    return out


def copy_of(run_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(run_dir, tmp_path / "copy"))


def test_resume_with_changed_settings_is_refused_listing_them(finished_run, tiny_model, tmp_path, caplog):
    out = copy_of(finished_run, tmp_path)
    changed = small_finetune_config(tiny_model, out, max_steps=3, save_steps=1, eval_steps=3, num_sample_prompts=1,
                                    sample_max_new_tokens=4, resume=True, lora_r=16, learning_rate=1e-3, seed=7)
    with caplog.at_level(logging.INFO, logger=RECIPE_LOG), pytest.raises(ConfigError) as err:
        run(changed, progress=False)
    message = str(err.value)
    for expected in ("lora_r: 8 -> 16", "learning_rate: 0.003 -> 0.001", "seed: 0 -> 7", "Only "):
        assert expected in message, message
    assert "max_steps" in message.split("Only ")[1]  # the allowed ones are named
    assert "loaded in" not in caplog.text  # refused from the checkpoint's files alone


def test_resume_of_a_finished_run_has_nothing_to_do(finished_run, tiny_model, tmp_path):
    out = copy_of(finished_run, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # Output cadence may change on resume; nothing else does.
    cfg = small_finetune_config(tiny_model, out, max_steps=3, save_steps=2, eval_steps=1, logging_steps=3,
                                num_sample_prompts=1, sample_max_new_tokens=4, resume=True)
    result = run(cfg, progress=False)
    assert result.final_step == 3 and result.final_eval_loss == json.loads((out / "summary.json").read_text())[
        "final_eval_loss"]
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing rewritten
    # Through the launcher: exit 0 with the saved summary, no TypeError.
    flags = [f"--{k}={v}" for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if v is not None]
    proc = _cli(*flags, "--progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to do" in proc.stderr and "steps: 3" in proc.stdout


def test_resume_below_the_checkpoint_and_beyond_it(finished_run, tiny_model, tmp_path):
    out = copy_of(finished_run, tmp_path)
    common = dict(save_steps=1, eval_steps=3, num_sample_prompts=1, sample_max_new_tokens=4, resume=True)
    with pytest.raises(ConfigError, match=r"^max_steps=2: .*already at step 3"):
        run(small_finetune_config(tiny_model, out, max_steps=2, **common), progress=False)
    result = run(small_finetune_config(tiny_model, out, max_steps=4, **common), progress=False)
    assert result.final_step == 4 and sorted(train_losses(out)) == [1, 2, 3, 4]
    assert (out / "completed").read_text() == "step 4\n"
    assert json.loads((out / "samples.json").read_text())[0]["before"] == json.loads(
        (finished_run / "samples.json").read_text())[0]["before"]


def test_fresh_run_over_checkpoints_is_refused(finished_run, tiny_model, tmp_path):
    out = copy_of(finished_run, tmp_path)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        run(small_finetune_config(tiny_model, out, max_steps=3), progress=False)


@pytest.mark.parametrize("source", ["adapter", "checkpoints", "checkpoints/2"])
def test_adapter_init_of_another_rank_or_alpha_is_refused(finished_run, tiny_model, tmp_path, source):
    for overrides, expected in ((dict(lora_r=16), "lora_r: adapters 8, run 16"),
                                (dict(lora_alpha=32.0), "lora_alpha: adapters 16.0, run 32.0")):
        cfg = small_finetune_config(tiny_model, tmp_path / "new", adapter_init=str(finished_run / source), **overrides)
        with pytest.raises(ConfigError, match=r"^adapter_init=") as err:
            run(cfg, progress=False)
        assert expected in str(err.value) and "--lora_r=8" in str(err.value)
        assert not (tmp_path / "new" / "adapter").exists()


# ============================================================================ class 5: the run lock
def test_a_second_run_on_one_output_dir_is_refused(tiny_model, tmp_path, caplog):
    out = tmp_path / "shared"
    holder = hold_run_lock(out)
    try:
        owner = json.loads((out / LOCK_FILE).read_text())
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=f"in use by another run: pid {holder.pid}"):
            run(small_finetune_config(tiny_model, out), progress=False)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else touched
        with pytest.raises(RunLockedError, match="in use"):
            RunLock(out, force=True).acquire()  # force never takes a live run's lock
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        # The dead holder's lock is stale (this host, no such pid): taken over, saying so.
        with caplog.at_level(logging.WARNING, logger="qlora_jax.recipe.run_lock"), RunLock(out) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert f"taking over the stale lock {out / LOCK_FILE}" in caplog.text
        assert f"pid {holder.pid} is no longer running" in caplog.text
        assert not (out / LOCK_FILE).exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_lock_of_another_host_and_release(tmp_path):
    out = tmp_path / "nfs"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00"}))
    with pytest.raises(RunLockedError, match="cannot be checked from this host") as err:
        RunLock(out).acquire()
    assert not isinstance(err.value, StaleRunLockError)
    lock = RunLock(out, force=True)
    lock.acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock(out).acquire()  # held by this very process: alive
    lock.release()
    assert not (out / LOCK_FILE).exists()
    with pytest.raises(ValueError), RunLock(out):
        raise ValueError("released on errors too")
    assert not (out / LOCK_FILE).exists()


# ============================================================================ kill -9, then resume
DRIVER = textwrap.dedent("""
    import json, os, pathlib, signal, sys
    settings, kill_in_save, evidence = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from qlora_jax.finetune import FinetuneConfig, run
    if kill_in_save:
        # The kill lands inside the save of step `kill_in_save`, provably: when Orbax is about to
        # commit that step (every array and the metadata written to its temporary directory, the
        # atomic rename not yet done), this process records what is on disk and kills itself.
        from orbax.checkpoint._src.path import atomicity
        original = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self):
            final = pathlib.Path(self.get_final())
            if final.name == str(kill_in_save):
                tmp = pathlib.Path(self.get())
                pathlib.Path(evidence).write_text(json.dumps({
                    "tmp": str(tmp), "tmp_exists": tmp.is_dir(), "final_exists": final.exists(),
                    "tmp_files": sum(1 for p in tmp.rglob("*") if p.is_file())}))
                os.kill(os.getpid(), signal.SIGKILL)
            return await original(self)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    run(FinetuneConfig(**settings), progress=False)
""")


def start_driver(settings: dict, cache: pathlib.Path, kill_in_save: int = 0,
                 evidence: pathlib.Path | None = None) -> subprocess.Popen:
    """The recipe in a subprocess. The processes share a persistent XLA compilation cache: they
    compile the same programs, and on 2 cores compiling is most of their time (executables from
    the cache are the compiled ones, so the results do not change). ``kill_in_save``: the step
    whose save is killed before Orbax commits it, what was on disk then written to ``evidence``."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(settings), str(kill_in_save), str(evidence)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_when_step_logged(proc: subprocess.Popen, metrics: pathlib.Path, step: int, delay: float) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if any(r.get("kind") == "train" and r["step"] >= step for r in steps.MetricsLog.read(metrics)):
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=120)


def checkpoints_restorable(out: pathlib.Path, targets) -> list[int]:
    """Every checkpoint's steps, each restored in full and finite (a corrupt one raises)."""
    checkpointer = TrainCheckpointer(out / "checkpoints")
    found = checkpointer.all_steps()
    for step in found:
        state = checkpointer.restore(*targets, step=step)
        assert state.step == step and steps.tree_all_finite((state.trainable, state.opt_state)), step
    checkpointer.close()
    return found


@pytest.mark.slow
def test_kill_9_during_training_and_saves_then_resume_equals_an_uninterrupted_run(tiny_model, tmp_path, rng):
    common = dict(model=str(tiny_model), max_train_samples=96, eval_dataset_size=16, per_device_train_batch_size=4,
                  per_device_eval_batch_size=8, max_steps=10, eval_steps=100, save_steps=2, save_total_limit=2,
                  learning_rate=3e-3, lora_r=8, lora_alpha=16, lora_dropout=0.1, warmup_ratio=0.0,
                  source_max_len=32, target_max_len=32, num_sample_prompts=0, data_workers=1,
                  compute_dtype="float32", chat_template="chatml")
    cache = tmp_path / "xla_cache"
    reference = tmp_path / "reference"
    proc = start_driver({**common, "output_dir": str(reference)}, cache)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()[-3000:]

    out = tmp_path / "killed"
    settings = {**common, "output_dir": str(out)}
    targets = restore_targets(tiny_model, out)
    # Seeded kill points: during training at a step of [3, 4], inside the save of step 6 (before
    # Orbax commits it), during training at a step of [7, 8]; each resume continues from what the
    # kill left.
    plan = [("train", int(rng.integers(3, 5)), float(rng.uniform(0, 0.3))),
            ("save", 6, 0.0),
            ("train", int(rng.integers(7, 9)), float(rng.uniform(0, 0.3)))]
    latest = 0
    evidence = tmp_path / "mid_save.json"
    for i, (where, step, delay) in enumerate(plan):
        # A plain --resume: the killed run's lock is stale (this host, pid gone) and taken over.
        resume = dict(resume=True) if i else {}
        if where == "save":
            proc = start_driver({**settings, **resume}, cache, kill_in_save=step, evidence=evidence)
            proc.wait(timeout=900)
            # The kill landed mid-save: step 6's temporary directory held its files, uncommitted.
            assert evidence.exists(), "the save of step 6 never reached its commit: the kill was not mid-save"
            seen = json.loads(evidence.read_text())
            assert seen["tmp_exists"] and seen["tmp_files"] > 0 and not seen["final_exists"], seen
        else:
            proc = start_driver({**settings, **resume}, cache)
            kill_when_step_logged(proc, out / "metrics.jsonl", step, delay)
        assert proc.returncode == -signal.SIGKILL, (where, step, proc.stderr.read()[-3000:])
        found = checkpoints_restorable(out, targets)
        assert found and found[-1] >= latest, (where, step, found, latest)  # nothing lost
        assert where != "save" or step not in found, found  # the uncommitted save is not a checkpoint
        latest = found[-1]
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind by the kill
    proc = start_driver({**settings, "resume": True}, cache)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()[-3000:]

    assert train_losses(out) == train_losses(reference)  # every step, bit for bit
    from safetensors.numpy import load_file

    got, want = load_file(out / "adapter" / "adapter_model.safetensors"), load_file(
        reference / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert checkpoints_restorable(out, targets) == checkpoints_restorable(reference, targets) == [8, 10]
    # The final checkpoints hold the same adapters and optimizer state, bit for bit.
    assert_same_latest_checkpoint(out, reference, targets, step=10)
