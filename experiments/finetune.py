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
    python -m experiments.finetune --output_dir=outputs/run1 --resume          # continue a run
    python -m experiments.finetune --model=/models/llama-2-7b-hf --dataset=data/alpaca.json \
        --per_device_train_batch_size=1 --gradient_accumulation_steps=16 --max_steps=1875
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

    progress: bool = setting(True, "Show a progress bar.")
    coordinator_address: str | None = setting(None, "Multi-host: host:port of process 0 (jax.distributed).")
    num_processes: int | None = setting(None, "Multi-host: number of processes.", check=positive)
    process_id: int | None = setting(None, "Multi-host: this process's index.", check=non_negative)

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
    from qlora_jax.distributed import initialize_distributed
    from qlora_jax.recipe.run_lock import RunLockedError

    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}
    logging.info("finetune settings other than the defaults: %s", changed or "none")
    initialize_distributed(launcher.coordinator_address, launcher.num_processes, launcher.process_id)
    try:
        result = finetune.run(cfg, progress=launcher.progress)
    except ConfigError as err:  # found once the files were read (resume, adapters, model, devices)
        raise SystemExit(f"finetune: --{err}") from None
    except (RunLockedError, FileExistsError, DatasetError, FloatingPointError) as err:
        raise SystemExit(f"finetune: {err}") from None
    print_summary(result)


def entry_point() -> None:
    """The ``qlora-jax-finetune`` console script."""
    cli.run(main, __name__)


if __name__ == "__main__":
    entry_point()
