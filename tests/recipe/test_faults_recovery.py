"""Recovery without friction (issue 28), on a tiny model.

* stale run locks: a dead owner's lock (pid gone, pid reused by another program, machine rebooted)
  is taken over, saying so; a live owner's, or another host's without --force_unlock, is refused;
* defaults degrade, explicit requests fail: the chatterbot evaluation on a held-out split too small
  for it is skipped with one warning at mc_eval_file=auto, and an error at mc_eval_file=chatterbot,
  each naming --mc_eval_file=none and the held-out size that would do;
* a full disk (ENOSPC) in Orbax's writer threads or in our own writes ends the run with one line
  naming the path, the operation, the free space and what to do; no partial checkpoint is counted,
  and the same command with --resume finishes the run;
* kill -9 through the launcher, then the same command with --resume and no other flag (slow).
"""

from __future__ import annotations

import dataclasses
import errno
import getpass
import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import pytest
from helpers import hold_run_lock, restore_targets, small_finetune_config, train_losses

from qlora_jax.eval import HeldOutTooSmallError, chatterbot_task
from qlora_jax.finetune import FinetuneConfig, run
from qlora_jax.recipe import io_errors, settings, steps
from qlora_jax.recipe.io_errors import OutputDirError, output_dir_error
from qlora_jax.recipe.run_lock import LOCK_FILE, RunLock, RunLockedError
from qlora_jax.recipe.settings import ConfigError
from qlora_jax.training_state import TrainCheckpointer

pytestmark = pytest.mark.faults  # the fault campaign, selectable with -m faults

REPO = pathlib.Path(__file__).resolve().parents[2]
LOCK_LOG = "qlora_jax.recipe.run_lock"
LINUX_PROC = pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(),
                                reason="process start times come from /proc (Linux)")


# ============================================================================ stale locks
def _rewrite_lock(directory: pathlib.Path, **changes) -> dict:
    """The lock file of ``directory`` with ``changes`` applied (as a dead or foreign owner would leave it)."""
    owner = {**json.loads((directory / LOCK_FILE).read_text()), **changes}
    (directory / LOCK_FILE).write_text(json.dumps(owner))
    return owner


def test_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    holder = hold_run_lock(out)
    holder.send_signal(signal.SIGKILL)  # as a crashed, OOM-killed or kill -9'd run leaves it
    holder.wait(timeout=30)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger=LOCK_LOG), RunLock(out) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock {out / LOCK_FILE}" in caplog.text
    assert f"pid {holder.pid} is no longer running" in caplog.text
    assert not (out / LOCK_FILE).exists()


@LINUX_PROC
def test_lock_of_a_live_pid_on_this_host_is_refused_even_with_force(tmp_path):
    out = tmp_path / "run"
    holder = hold_run_lock(out)
    try:
        owner = json.loads((out / LOCK_FILE).read_text())
        # The holder recorded its own start time: the same process is alive, so the lock is live.
        assert owner["pid"] == holder.pid and isinstance(owner["pid_start_ticks"], int)
        for force in (False, True):
            with pytest.raises(RunLockedError, match=f"in use by another run: pid {holder.pid} on host "
                                                     f"{re.escape(socket.gethostname())}"):
                RunLock(out, force=force).acquire()
        assert json.loads((out / LOCK_FILE).read_text()) == owner  # untouched
    finally:
        holder.kill()
        holder.wait(timeout=30)


@LINUX_PROC
@pytest.mark.parametrize("reused", ["start time", "boot id"])
def test_lock_of_a_reused_pid_is_taken_over(tmp_path, caplog, reused):
    """The lock's pid runs, but it is not the owner: another start time (the pid was reused) or
    another boot (the machine rebooted since)."""
    out = tmp_path / "run"
    holder = hold_run_lock(out)
    try:
        owner = json.loads((out / LOCK_FILE).read_text())
        if reused == "start time":
            _rewrite_lock(out, pid_start_ticks=owner["pid_start_ticks"] - 1)  # an earlier process had the pid
            expected = (f"pid {holder.pid} now belongs to another program (started at tick "
                        f"{owner['pid_start_ticks']}, the owner at {owner['pid_start_ticks'] - 1})")
        else:
            _rewrite_lock(out, boot_id="00000000-0000-0000-0000-000000000000")
            expected = "the machine has rebooted since"
        with caplog.at_level(logging.WARNING, logger=LOCK_LOG), RunLock(out) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert expected in caplog.text, caplog.text
        assert holder.poll() is None  # the program that has the pid now is left alone
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.parametrize("foreign", ["host name", "machine id"])
def test_lock_of_another_host_is_refused_without_force_unlock(tmp_path, caplog, foreign):
    """A shared folder: the owner's liveness cannot be checked from here. The same host name on
    another machine (another /etc/machine-id) counts as another host."""
    out = tmp_path / "run"
    holder = hold_run_lock(out)
    try:
        changes = dict(host="elsewhere") if foreign == "host name" else dict(machine_id="another-machine")
        owner = _rewrite_lock(out, **changes)  # its pid runs here, and that must not matter
        with pytest.raises(RunLockedError, match="cannot be checked from this host.*--force_unlock"):
            RunLock(out).acquire()
        assert json.loads((out / LOCK_FILE).read_text()) == owner
        with caplog.at_level(logging.WARNING, logger=LOCK_LOG), RunLock(out, force=True) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert "(force_unlock)" in caplog.text
    finally:
        holder.kill()
        holder.wait(timeout=30)


# ============================================================================ defaults degrade
def test_only_auto_settings_may_degrade():
    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    degrading = {name for name, f in fields.items() if f.metadata["off"] is not None}
    assert degrading == {"mc_eval_file"} and fields["mc_eval_file"].metadata["off"] == "none"
    # The other "auto" settings pick a value and cannot fail by themselves: the compute dtype (from
    # the hardware) and the adapters' dtype, or the format of the user's own file (the data itself,
    # nothing to go on without).
    assert {name for name, f in fields.items() if f.default == settings.AUTO} - degrading == {
        "compute_dtype", "lora_dtype", "dataset_format"}
    with pytest.raises(TypeError, match="must be 'auto'"):
        settings.setting("chatterbot", "help", off="none")
    with pytest.raises(TypeError, match="lora_r is not a setting declared with off"):
        settings.unavailable(FinetuneConfig(), "lora_r", "why", "what")


def test_chatterbot_task_says_how_many_held_out_conversations_it_needs():
    with pytest.raises(HeldOutTooSmallError, match=r"only 1 held-out replies of other topics.*\(2 conversations "
                                                   r"held out; at least 4 needed with seed 0\)") as err:
        chatterbot_task(eval_dataset_size=2, seed=0)
    assert err.value.needed == 4
    # Checked independently: 4 is enough, 3 is not.
    assert len(chatterbot_task(eval_dataset_size=4, seed=0).items) == 3
    with pytest.raises(HeldOutTooSmallError):
        chatterbot_task(eval_dataset_size=3, seed=0)


def test_default_evaluation_on_a_small_held_out_split_is_skipped_with_one_warning(tiny_model, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = small_finetune_config(tiny_model, out, mc_eval_file="auto", eval_dataset_size=2, max_steps=2,
                                save_steps=2, eval_steps=2, num_sample_prompts=0)
    with caplog.at_level(logging.WARNING):
        result = run(cfg, progress=False)
    assert result.final_step == 2 and (out / "completed").exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "qlora_jax.recipe.settings"]
    assert len(warnings) == 1, warnings
    for expected in ("mc_eval_file=auto: going on without it", "only 1 held-out replies of other topics",
                     "--eval_dataset_size=4", "--mc_eval_file=none turns it off"):
        assert expected in warnings[0], warnings[0]
    rows = steps.MetricsLog.read(out / "metrics.jsonl")
    assert [r["kind"] for r in rows if r["kind"] != "train"] == ["eval", "eval"]  # no mc_eval rows


def test_explicit_evaluation_on_a_small_held_out_split_fails_naming_the_way_out(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = small_finetune_config(tiny_model, out, mc_eval_file="chatterbot", eval_dataset_size=2, max_eval_samples=2)
    with pytest.raises(ConfigError) as err:
        run(cfg, progress=False)
    message = str(err.value)
    assert message.startswith("mc_eval_file='chatterbot': the chatterbot reply-retrieval task: "), message
    for expected in ("at least 4 needed with seed 0", "--eval_dataset_size=4 --max_eval_samples=4",
                     "or pass --mc_eval_file=none to run without it"):
        assert expected in message, message
    # Refused before any answer was generated or step trained; the lock is released.
    assert not (out / "samples.json").exists() and not (out / LOCK_FILE).exists()
    assert TrainCheckpointer(out / "checkpoints").all_steps() == []


def test_a_held_out_count_larger_than_the_dataset_names_the_flag(tiny_model, tmp_path):
    """A file of 10 conversations under the default held-out count (96): the flag, in one line."""
    data = tmp_path / "ten.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                      {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                            for i in range(10)))
    cfg = small_finetune_config(tiny_model, tmp_path / "run", dataset=str(data), max_train_samples=None,
                                eval_dataset_size=FinetuneConfig.field_default("eval_dataset_size"),
                                per_device_train_batch_size=2)
    with pytest.raises(ConfigError, match=r"^eval_dataset_size=96: eval_dataset_size 96 holds out 96 of 10 examples, "
                                          r"leaving none to train on in .*ten\.jsonl; pass a smaller count or a "
                                          r"fraction such as --eval_dataset_size=0\.1$"):
        run(cfg, progress=False)


# ============================================================================ full disks: one line
def test_output_dir_errors_are_recognised_and_named(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for code, words, advice in ((errno.EACCES, "permission denied (EACCES)", f"Make {out} writable by the user "
                                                                             f"{getpass.getuser()}"),
                                (errno.EROFS, "read-only file system (EROFS)", "on a writable file system"),
                                (errno.ENOSPC, "no space left on device (ENOSPC)", "--resume"),
                                (errno.EDQUOT, "disk quota exceeded (EDQUOT)", "--resume")):
        err = OSError(code, os.strerror(code), str(out / "metrics.jsonl"))
        converted = output_dir_error(err, out)
        assert isinstance(converted, OutputDirError) and converted.errno == code
        message = str(converted)
        assert message.startswith(f"writing metrics.jsonl failed: {words} at {out / 'metrics.jsonl'}; "), message
        assert "free of" in message and advice in message and "\n" not in message
    # TensorStore's text, from an Orbax thread, names the checkpoint being written.
    orbax = ValueError(f'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{out}/checkpoints/'
                       f'7.orbax-checkpoint-tmp/trainable.orbax-checkpoint-tmp/ocdbt.process_0/": Failed to write 12 '
                       "bytes to file 4: No space left on device [os_error_code='28']")
    wrapped = RuntimeError("the save failed")
    wrapped.__cause__ = orbax
    assert str(output_dir_error(wrapped, out)).startswith("saving checkpoint 7 failed: no space left on device")
    # Without a path (safetensors' errors): the output directory.
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(output_dir_error(rust, out)).startswith(f"writing to {out} failed: no space left on device")
    # Not ours: a device out of memory, and a full disk elsewhere.
    assert output_dir_error(ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8 bytes"),
                            out) is None
    assert output_dir_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache")), out) is None


def test_an_output_dir_we_may_not_create_is_one_line(tiny_model, tmp_path, monkeypatch):
    """EACCES as mkdir raises it for a folder under one we may not write (tests may run as root,
    where chmod would not stop us)."""
    out = tmp_path / "read-only parent" / "run"
    out.parent.mkdir()
    original = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    with pytest.raises(OutputDirError) as err:
        run(small_finetune_config(tiny_model, out), progress=False)
    assert str(err.value).startswith(f"creating the output directory failed: permission denied (EACCES) at {out}; ")
    assert str(err.value).endswith(f"Make {out.parent} writable by the user {getpass.getuser()}, or choose "
                                   "another --output_dir.")


def _enospc_in_orbax_writer(monkeypatch, step: int) -> None:
    """Makes Orbax's array writer (run in its writer threads) fail for checkpoint ``step`` as
    TensorStore does on a full disk."""
    from orbax.checkpoint._src.serialization import serialization

    original = serialization.async_serialize_from_host

    async def write(rslices, tspec, **kwargs):
        where = re.search(rf"(/[^'\"]*/checkpoints/{step}\.orbax-checkpoint-tmp/[^'\"]*)", json.dumps(tspec))
        if where is None:
            return await original(rslices, tspec, **kwargs)
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "0" in OCDBT database at local file "{where.group(1)}": '
                         "Failed to write 4096 bytes to file 4: No space left on device [os_error_code='28']")

    monkeypatch.setattr(serialization, "async_serialize_from_host", write)


def test_full_disk_in_an_orbax_save_is_one_line_and_resume_finishes(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = dict(max_steps=6, save_steps=2, eval_steps=6, num_sample_prompts=0)
    _enospc_in_orbax_writer(monkeypatch, step=4)
    with pytest.raises(OutputDirError) as err:
        run(small_finetune_config(tiny_model, out, **common), progress=False)
    message = str(err.value)
    assert "\n" not in message and err.value.errno == errno.ENOSPC
    assert message.startswith(f"saving checkpoint 4 failed: no space left on device (ENOSPC) at {out}/checkpoints/"
                              "4.orbax-checkpoint-tmp/"), message
    assert re.search(r"; \d+\.\d (KiB|MiB|GiB|TiB) free of \d+\.\d (KiB|MiB|GiB|TiB) on that file system\. Free "
                     r"space there, then run the same command with --resume", message), message
    # The partial checkpoint is not counted; the one before it is whole; the lock is released.
    targets = restore_targets(tiny_model, out)
    checkpointer = TrainCheckpointer(out / "checkpoints")
    assert checkpointer.all_steps() == [2]
    assert checkpointer.restore(*targets).step == 2 and not (out / LOCK_FILE).exists()
    checkpointer.close()
    monkeypatch.undo()  # space freed
    result = run(small_finetune_config(tiny_model, out, resume=True, **common), progress=False)
    assert result.final_step == 6 and sorted(train_losses(out)) == [1, 2, 3, 4, 5, 6]
    assert TrainCheckpointer(out / "checkpoints").all_steps() == [4, 6]


def test_full_disk_in_our_own_writes_is_one_line(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = steps.MetricsLog.write

    def write(self, row):
        if row.get("step", 0) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        original(self, row)

    monkeypatch.setattr(steps.MetricsLog, "write", write)
    with pytest.raises(OutputDirError) as err:
        run(small_finetune_config(tiny_model, out, max_steps=4, save_steps=2, eval_steps=4, num_sample_prompts=0),
            progress=False)
    assert str(err.value).startswith(f"writing metrics.jsonl failed: no space left on device (ENOSPC) at "
                                     f"{out / 'metrics.jsonl'}; ")
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert TrainCheckpointer(out / "checkpoints").all_steps() == [2]


def test_io_errors_module_is_the_one_the_launcher_reports():
    """The launcher turns OutputDirError into its one line (experiments/finetune.py)."""
    source = (REPO / "experiments" / "finetune.py").read_text()
    assert "OutputDirError" in source and io_errors.OutputDirError is OutputDirError


# ============================================================================ through the launcher (slow)
FLAGS = ["--max_train_samples=96", "--eval_dataset_size=16", "--per_device_train_batch_size=4",
         "--per_device_eval_batch_size=8", "--eval_steps=100", "--save_steps=2", "--learning_rate=3e-3",
         "--lora_r=8", "--lora_alpha=16", "--source_max_len=32", "--target_max_len=32", "--num_sample_prompts=0",
         "--data_workers=1", "--compute_dtype=float32", "--chat_template=chatml", "--mc_eval_file=none",
         "--progress=false"]

ENOSPC_LAUNCHER = """
import json, re, sys
from orbax.checkpoint._src.serialization import serialization
original = serialization.async_serialize_from_host
async def write(rslices, tspec, **kwargs):
    where = re.search(r"(/[^'\\"]*/checkpoints/4\\.orbax-checkpoint-tmp/[^'\\"]*)", json.dumps(tspec))
    if where is None:
        return await original(rslices, tspec, **kwargs)
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "0" in OCDBT database at local file "{where.group(1)}": '
                     "Failed to write 4096 bytes to file 4: No space left on device [os_error_code='28']")
serialization.async_serialize_from_host = write
from experiments import finetune
finetune.entry_point()
"""


def _launcher(*args: str, script: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "experiments.finetune",
                                                                      *args]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _not_log_lines(stderr: str) -> list[str]:
    """stderr without absl's log records (``I1206 06:34:27.014385 ... file.py:88] message``)."""
    return [line for line in stderr.splitlines() if line.strip() and not re.match(r"^[IWEF]\d{4} ", line)]


@pytest.mark.slow
def test_launcher_full_disk_in_an_orbax_thread_prints_one_line(tiny_model, tmp_path):
    out = tmp_path / "run"
    proc = _launcher(f"--model={tiny_model}", f"--output_dir={out}", "--max_steps=6", *FLAGS, script=ENOSPC_LAUNCHER)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 1, stderr[-3000:]
    lines = _not_log_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("finetune: saving checkpoint 4 failed: no space left on device "
                                                   f"(ENOSPC) at {out}/checkpoints/4.orbax-checkpoint-tmp/"), lines
    # Orbax's threads logged the error with tracebacks: debug output, not shown by default.
    assert "Traceback" not in stderr and "RESOURCE_EXHAUSTED" not in stderr
    assert TrainCheckpointer(out / "checkpoints").all_steps() == [2]


@pytest.mark.slow
def test_launcher_kill_9_then_the_same_command_with_resume(tiny_model, tmp_path):
    out = tmp_path / "run"
    command = [f"--model={tiny_model}", f"--output_dir={out}", "--max_steps=6", *FLAGS]
    proc = _launcher(*command)
    checkpoints = out / "checkpoints"
    while proc.poll() is None and not (checkpoints / "2").is_dir():
        try:
            proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind

    resumed = _launcher(*command, "--resume")
    stdout, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"taking over the stale lock {out / LOCK_FILE}" in stderr
    assert f"pid {proc.pid} is no longer running" in stderr
    assert re.search(r"resumed from step [24] ", stderr), stderr[-3000:]
    assert "steps: 6" in stdout and sorted(train_losses(out)) == [1, 2, 3, 4, 5, 6]
    assert not (out / LOCK_FILE).exists()
