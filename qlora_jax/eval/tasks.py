"""``load_task``: what a ``mc_eval_file`` setting names, as a :class:`MultipleChoiceTask`."""

from __future__ import annotations

import pathlib

from qlora_jax.data.example import DatasetError
from qlora_jax.eval.chatterbot import chatterbot_task
from qlora_jax.eval.formats import detect_format, load_qlora_items, load_questions, read_table
from qlora_jax.eval.items import MultipleChoiceTask
from qlora_jax.eval.prompts import STYLES, build_items

__all__ = ["BUILTIN_TASKS", "load_task"]

BUILTIN_TASKS = ("chatterbot",)


def load_task(
    source: str | pathlib.Path,
    *,
    shots: int = 0,
    style: str | None = None,
    dev_file: str | pathlib.Path | None = None,
    eval_dataset_size: int | float = 96,
    seed: int = 0,
    max_eval_samples: int | None = None,
) -> MultipleChoiceTask:
    """The task ``source`` names.

    qlora.py's files are already rendered (``five_shot_*`` holds 5-shot prompts) and the chatterbot
    task is zero-shot chat: for them ``shots`` must be 0 and ``style``/``dev_file`` unset.

    Args:
      source: ``"chatterbot"`` (or ``"chatterbot:<language>"``), the built-in held-out reply
        retrieval task (:mod:`.chatterbot`), or a file (:mod:`.formats`).
      shots: worked examples per prompt of a ``questions`` file.
      style: "letter" (MMLU, the default) or "cloze", for a ``questions`` file.
      dev_file: where the shots come from (None: the file itself, see :mod:`.prompts`).
      eval_dataset_size: the finetune's, so that the chatterbot task is its held-out split.
      seed: the finetune's split seed, likewise.
      max_eval_samples: the finetune's cap on held-out conversations, likewise.

    Returns:
      The :class:`~qlora_jax.eval.items.MultipleChoiceTask`.

    Raises:
      DatasetError: an unknown task or a missing file, or a bad row (naming it).
      ValueError: an unknown ``style``, or shots/style/dev_file for a task that takes none.
    """
    text = str(source)
    if text.partition(":")[0] in BUILTIN_TASKS and not pathlib.Path(text).exists():
        _only_for_questions(text, shots, style, dev_file, "the chatterbot task is zero-shot chat")
        return chatterbot_task(dataset=text, eval_dataset_size=eval_dataset_size, seed=seed,
                               max_eval_samples=max_eval_samples)
    path = pathlib.Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"unknown multiple-choice task {text!r}: expected {' or '.join(BUILTIN_TASKS)} or the "
                           "path of a .json/.jsonl/.parquet file; nothing is downloaded")
    rows = read_table(path)
    if detect_format(rows[0].value, rows[0].location) == "qlora":
        _only_for_questions(text, shots, style, dev_file, "qlora.py's MMLU prompts are already rendered")
        return MultipleChoiceTask(path.stem, tuple(load_qlora_items(path)),
                                  description=f"qlora.py MMLU prompts from {path.name}, letter-argmax")
    style = style or "letter"
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {', '.join(STYLES)}")
    questions = load_questions(path)
    dev = None if dev_file is None else load_questions(dev_file)
    items = build_items(questions, shots=shots, style=style, dev=dev)
    return MultipleChoiceTask(path.stem, tuple(items), description=f"{path.name}, {shots}-shot, {style} prompts")


def _only_for_questions(source: str, shots: int, style: str | None, dev_file, why: str) -> None:
    if shots or style is not None or dev_file is not None:
        raise ValueError(f"{source}: {why}; shots, style and dev_file apply to question files only "
                         f"(got shots={shots}, style={style!r}, dev_file={dev_file!r})")
