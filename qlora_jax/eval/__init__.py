"""Multiple-choice evaluation like the QLoRA paper's: log-likelihood scoring, jit-compiled and batched.

::

    from qlora_jax.eval import MultipleChoiceEvaluator, load_task

    task = load_task("five_shot_mmlu_val.json")        # qlora.py's file; or HF MMLU columns, or "chatterbot"
    evaluator = MultipleChoiceEvaluator(model.spec, tokenizer, task, batch_size=16)
    metrics = evaluator(model.base_params, model.lora_params)
    # {"mc_acc", "mc_acc_stderr", "mc_acc_norm", "mc_acc_norm_stderr", "mc_answer_loss",
    #  "mc_subject_mean_acc", "mc_acc/<subject>", ...}

One idea per module: :mod:`.items` (the normal forms), :mod:`.formats` (reading files),
:mod:`.prompts` (MMLU's zero/k-shot format), :mod:`.chatterbot` (the offline task on held-out
chatterbot conversations), :mod:`.scoring` (tokens, batches, the compiled log-likelihoods),
:mod:`.metrics` (accuracy both ways, standard errors, per subject), :mod:`.evaluator`,
:mod:`.tasks` (what a ``mc_eval_file`` setting names) and :mod:`.plot`.
"""

from qlora_jax.eval.chatterbot import HeldOutTooSmallError, chatterbot_task, conversation_topic
from qlora_jax.eval.evaluator import MultipleChoiceEvaluator, evaluate
from qlora_jax.eval.formats import FORMATS, detect_format, load_qlora_items, load_questions, read_table
from qlora_jax.eval.items import MultipleChoiceItem, MultipleChoiceTask, Question
from qlora_jax.eval.metrics import MultipleChoiceScores, stderr_of_mean
from qlora_jax.eval.plot import plot_accuracy
from qlora_jax.eval.prompts import (
    LETTERS,
    STYLES,
    build_items,
    cloze_block,
    letter_block,
    mmlu_header,
    render_question,
    select_shots,
)
from qlora_jax.eval.scoring import TokenizedItem, tokenize_item
from qlora_jax.eval.tasks import BUILTIN_TASKS, load_task

__all__ = [
    "BUILTIN_TASKS", "FORMATS", "HeldOutTooSmallError", "LETTERS", "STYLES", "MultipleChoiceEvaluator",
    "MultipleChoiceItem",
    "MultipleChoiceScores", "MultipleChoiceTask", "Question", "TokenizedItem", "build_items", "chatterbot_task",
    "cloze_block", "conversation_topic", "detect_format", "evaluate", "letter_block", "load_qlora_items",
    "load_questions", "load_task", "mmlu_header", "plot_accuracy", "read_table", "render_question", "select_shots",
    "stderr_of_mean", "tokenize_item",
]
