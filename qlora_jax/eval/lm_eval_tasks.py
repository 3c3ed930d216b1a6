"""Our offline tasks written out as lm-evaluation-harness tasks (a JSONL dataset and its YAML).

lm-eval reads a task from a YAML file under ``--include_path``; with ``dataset_path: json`` its
documents come from local files, so nothing is downloaded. :func:`write_chatterbot_task` writes
the held-out chatterbot reply-retrieval task (:func:`qlora_jax.eval.chatterbot_task`, the split the
finetune recipe holds out) that way, so that the embedded model can be evaluated with lm-eval
before and after a finetune (README, "Evaluating with lm-evaluation-harness").
"""

from __future__ import annotations

import json
import pathlib

from qlora_jax.eval.chatterbot import chatterbot_task

__all__ = ["write_chatterbot_task"]

# A chat task: lm-eval renders doc_to_text as the user's message with the model's chat template
# (--apply_chat_template) and scores each reply right after the assistant's generation prompt,
# so no delimiter goes between them. acc sums the reply's log-likelihood, acc_norm divides it by
# the reply's length in bytes (lm-eval's definitions).
_YAML = """\
# The held-out chatterbot reply-retrieval task (qlora_jax.eval.chatterbot_task), written by
# qlora_jax.eval.lm_eval_tasks.write_chatterbot_task: {count} questions, {choices} replies each.
# A chat task: run it with --apply_chat_template.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_chatterbot_task(
    directory: str | pathlib.Path,
    *,
    name: str = "chatterbot_reply",
    dataset: str = "chatterbot",
    eval_dataset_size: int | float = 96,
    seed: int = 0,
    max_eval_samples: int | None = None,
    num_choices: int = 4,
) -> pathlib.Path:
    """Writes the held-out chatterbot reply-retrieval task as an lm-eval task.

    Args:
        directory: the folder to write into (created if missing); pass it as lm-eval's
            ``--include_path``.
        name: the task's name (``--tasks``), also the stem of both files.
        dataset: ``"chatterbot"`` or ``"chatterbot:<language>"`` (the finetune's ``--dataset``).
        eval_dataset_size: the finetune's own setting
            (:class:`qlora_jax.recipe.config.FinetuneConfig`), so that the questions are exactly
            the conversations its run held out.
        seed: the finetune's split seed, likewise.
        max_eval_samples: the finetune's cap on held-out conversations, likewise.
        num_choices: the true reply plus ``num_choices - 1`` distractors from other topics.

    Returns:
        The path of the task's YAML (``directory/name.yaml``); its documents are in
        ``directory/name.jsonl``, one ``{"question", "choices", "answer", "subject"}`` per line,
        ``answer`` the index of the true reply.
    """
    task = chatterbot_task(dataset=dataset, eval_dataset_size=eval_dataset_size, seed=seed,
                           max_eval_samples=max_eval_samples, num_choices=num_choices)
    directory = pathlib.Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data_file = directory / f"{name}.jsonl"
    with data_file.open("w", encoding="utf-8") as out:
        for item in task.items:
            out.write(json.dumps({"question": item.context, "choices": list(item.choices),
                                  "answer": item.answer, "subject": item.subject}, ensure_ascii=False) + "\n")
    yaml_file = directory / f"{name}.yaml"
    # json.dumps quotes the path as YAML reads it (a double-quoted scalar), whatever it contains.
    yaml_file.write_text(_YAML.format(name=name, data_file=json.dumps(str(data_file)), count=len(task.items),
                                      choices=num_choices), encoding="utf-8")
    return yaml_file
