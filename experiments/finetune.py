r"""QLoRA finetuning: `python -m experiments.finetune [--flags]` in a clone, `qlora-jax-finetune` once installed.

With no flags: SmolLM2-135M-Instruct (embedded, 4-bit NF4 + double quantization) gets LoRA
adapters (r=64, alpha=16) on every linear layer and trains on chatterbot-corpus question/answer
pairs for a few minutes on a CPU, with a held-out split, checkpoints and a PEFT adapter at the end.

Settings may come from a file (`--flagfile=run.flags`). Every flag but the launcher's own
(--progress and the multi-host ones) is a field of qlora_jax.recipe.config.FinetuneConfig,
declared there once with its help text and checks; names follow artidoro/qlora's qlora.py, and
where our default differs the help says qlora.py's value.
A bad value stops the run before any work, naming the flag. The first step of each batch shape
compiles (minutes for a large model): the log says so, and the progress bar's estimate means
nothing until then.

    python -m experiments.finetune --max_steps=300 --output_dir=outputs/run1
    python -m experiments.finetune --max_steps=300 --output_dir=outputs/run1 --resume  # continue it, after a crash too
    python -m experiments.finetune --model=/models/llama-2-7b-hf --dataset=data/alpaca.json \
        --per_device_train_batch_size=1 --gradient_accumulation_steps=16 --max_steps=1875

Several processes (hosts): the same command on each, with --coordinator_address (process 0's
host:port), --num_processes, its own --process_id and a --mesh over all their devices; the
output_dir must be one directory every process sees (README, "Several hosts").
"""

from __future__ import annotations

import dataclasses

from absl import app, flags, logging

from qlora_jax.recipe.config import FinetuneConfig
from qlora_jax.recipe.flags import define_flags, from_flags
from qlora_jax.recipe.settings import ConfigError, non_negative, positive, setting, validate

from . import cli

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class LauncherSettings:
    """The launcher's own flags: how this process runs, not what the finetune computes."""

    progress: bool = setting(True, "Show a progress bar (process 0).")
    coordinator_address: str | None = setting(None, "Multi-host: host:port where process 0 serves the coordinator "
                                              "(jax.distributed); the same on every process.")
    num_processes: int | None = setting(None, "Multi-host: number of processes (the same on every process).",
                                        check=positive)
    process_id: int | None = setting(None, "Multi-host: this process's index, 0 to num_processes - 1.",
                                     check=non_negative)
    init_timeout_seconds: int = setting(300, "Multi-host: how long a process waits for all the others to start "
                                        "before it stops with an error.", check=positive)
    heartbeat_timeout_seconds: int = setting(100, "Multi-host: a process silent this long counts as dead, and "
                                             "the others stop (JAX's coordination service).", check=positive)
    shutdown_timeout_seconds: int = setting(300, "Multi-host: how long a finished (or failed) process waits for "
                                            "the others at the end before all stop with an error.", check=positive)

    def __post_init__(self):
        validate(self)


define_flags(FinetuneConfig)
define_flags(LauncherSettings)


def print_summary(result) -> None:
    """The human summary of a finished run, on stdout."""
    print("\n== held-out questions, before and after finetuning ==")
    for sample in result.samples:
        print(f"\nQ: {sample['question']}\n   reference: {sample['reference']}\n   before:    {sample['before']}"
              f"\n   after:     {sample.get('after', '')}")
    print("\n== summary ==")
    if result.final_eval_loss is None:
        print("held-out loss: not measured")
    elif result.first_eval_loss is not None:
        print(f"held-out loss: {result.first_eval_loss:.3f} -> {result.final_eval_loss:.3f} nats")
    else:
        print(f"held-out loss at the end: {result.final_eval_loss:.3f} nats")
    print(f"steps: {result.final_step}   training throughput: {result.train_tokens_per_second:.0f} tokens/s   "
          f"wall time: {result.wall_seconds:.0f} s   peak host memory: {result.peak_host_memory_bytes / 2**30:.2f} GiB")
    print(f"outputs: {result.output_dir}/ (adapter/, checkpoints/, metrics.jsonl, loss_curve.png, samples.json)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        launcher, cfg = from_flags(LauncherSettings), from_flags(FinetuneConfig)
    except ConfigError as err:
        raise SystemExit(f"finetune: --{err} (see --help)") from None
    from qlora_jax import finetune
    from qlora_jax.data import DatasetError
    from qlora_jax.distributed import DistributedSetupError, PrimaryProcessError, initialize_distributed, is_primary
    from qlora_jax.recipe.io_errors import OutputDirError
    from qlora_jax.recipe.run_lock import RunLockedError

    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}
    logging.info("finetune settings other than the defaults: %s", changed or "none")
    try:
        initialize_distributed(launcher.coordinator_address, launcher.num_processes, launcher.process_id,
                               init_timeout_seconds=launcher.init_timeout_seconds,
                               heartbeat_timeout_seconds=launcher.heartbeat_timeout_seconds,
                               shutdown_timeout_seconds=launcher.shutdown_timeout_seconds)
        result = finetune.run(cfg, progress=launcher.progress)
    except ConfigError as err:  # found once the files were read (resume, adapters, model, devices)
        raise SystemExit(f"finetune: --{err}") from None
    except (DistributedSetupError, PrimaryProcessError, RunLockedError, FileExistsError, DatasetError,
            FloatingPointError, OutputDirError) as err:
        # Known failures: one line, no traceback (the debug log, --verbosity=1, has what led there).
        raise SystemExit(f"finetune: {err}") from None
    if is_primary():
        print_summary(result)


def entry_point() -> None:
    """The ``qlora-jax-finetune`` console script."""
    cli.run(main, __name__)


if __name__ == "__main__":
    entry_point()
