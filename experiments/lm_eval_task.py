r"""Write the held-out chatterbot reply-retrieval task as an lm-evaluation-harness task.

    python -m experiments.lm_eval_task --task_dir=outputs/lm_eval_tasks   [the finetune's flags]
    python -m experiments.lm_eval --model_args pretrained=embedded,adapter=outputs/finetune \
        --tasks chatterbot_reply --include_path outputs/lm_eval_tasks --apply_chat_template

It takes every flag of ``experiments.finetune`` (or its ``--flagfile``): the questions are the
conversations that a finetune with those flags holds out (``--dataset``, ``--eval_dataset_size``,
``--seed``, ``--max_eval_samples``), so the model is scored on talk it never trained on
(:func:`qlora_jax.eval.lm_eval_tasks.write_chatterbot_task`).
"""

from __future__ import annotations

from absl import flags

from . import cli

FLAGS = flags.FLAGS


def _define_flags() -> None:
    from qlora_jax.recipe.config import FinetuneConfig
    from qlora_jax.recipe.flags import define_flags

    # The finetune's own flags (one declaration, FinetuneConfig): pass this command the flags of
    # the run (or its --flagfile) and the split is that run's.
    define_flags(FinetuneConfig, module_name=__name__)
    flags.DEFINE_string("task_dir", "outputs/lm_eval_tasks", "Folder to write the task into (lm-eval's "
                        "--include_path).")
    flags.DEFINE_string("task_name", "chatterbot_reply", "The task's name (lm-eval's --tasks).")


_define_flags()


def main(argv: list[str]) -> None:
    del argv
    from qlora_jax.eval.lm_eval_tasks import write_chatterbot_task
    from qlora_jax.recipe.config import FinetuneConfig
    from qlora_jax.recipe.flags import from_flags

    config = from_flags(FinetuneConfig)
    path = write_chatterbot_task(FLAGS.task_dir, name=FLAGS.task_name, dataset=config.dataset,
                                 eval_dataset_size=config.eval_dataset_size, seed=config.seed,
                                 max_eval_samples=config.max_eval_samples)
    print(f"wrote {path} (lm-eval: --tasks {FLAGS.task_name} --include_path {path.parent} --apply_chat_template)")


def entry_point() -> None:
    """The command line of ``python -m experiments.lm_eval_task``."""
    cli.run(main, __name__)


if __name__ == "__main__":
    entry_point()
