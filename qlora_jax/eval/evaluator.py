"""``MultipleChoiceEvaluator``: a task tokenized and batched once, scored for any base and adapters.

::

    task = load_task("mmlu/test.jsonl", shots=5, dev_file="mmlu/dev.jsonl")   # or "chatterbot"
    evaluator = MultipleChoiceEvaluator(model.spec, tokenizer, task, batch_size=16, mesh=mesh)
    metrics = evaluator(model.base_params, model.lora_params)   # {"mc_acc": ..., "mc_acc_norm": ..., ...}

The evaluator holds no weights: ``base`` and ``lora`` are arguments, so one evaluator serves the
model before, during and after training (the spec, which fixes the compiled computation, must
describe them). With a ``mesh`` the batches split their rows over its data-parallel axes; pass
``base``/``lora`` placed for that mesh (``shard_tree(tree, param_shardings(tree, mesh))``).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qlora_jax.distributed import BATCH_AXES, shard_batch
from qlora_jax.eval.items import MultipleChoiceTask
from qlora_jax.eval.metrics import MultipleChoiceScores
from qlora_jax.eval.scoring import GroupBatch, group_logprobs, plan_batches, tokenize_item
from qlora_jax.models.spec import ModelSpec
from qlora_jax.tokenizer import Tokenizer

__all__ = ["MultipleChoiceEvaluator", "evaluate"]

log = logging.getLogger(__name__)


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class MultipleChoiceEvaluator:
    """Scores ``task`` with the model ``spec`` describes; ``evaluator(base, lora)`` -> metrics dict.

    The metrics are ``{prefix}acc``, ``{prefix}acc_stderr``, ``{prefix}acc_norm``,
    ``{prefix}acc_norm_stderr``, ``{prefix}answer_loss`` (nats per answer token),
    ``{prefix}subject_mean_acc`` and ``{prefix}acc/<subject>``.

    Args:
      spec: the model's spec (architecture, adapters, dtypes).
      tokenizer: the model's tokenizer.
      task: the items to score.
      batch_size: rows per compiled call (global; a multiple of the mesh's data-parallel size).
      mesh: shard the batches over it (None: one device).
      max_length: longest row in tokens (longer contexts lose their start).
      template: chat template of chat items (None: the tokenizer's own).
      prefix: of every metric name.

    Raises:
      ValueError: a ``batch_size`` that does not split over the mesh's data-parallel axes, or an
        item that does not fit ``max_length``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        tokenizer: Tokenizer,
        task: MultipleChoiceTask,
        *,
        batch_size: int = 16,
        mesh: Mesh | None = None,
        max_length: int = 2048,
        template: str | None = None,
        prefix: str = "mc_",
    ):
        if mesh is not None:
            ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
            if batch_size % ways:
                raise ValueError(f"batch_size {batch_size} does not split over the mesh's data-parallel axes "
                                 f"({ways} ways): make it a multiple of {ways}")
        self.spec, self.task, self.mesh, self.prefix = spec, task, mesh, prefix
        tokenized, truncated = [], 0
        for item in task.items:
            tokens, cut = tokenize_item(item, tokenizer, max_length=max_length, template=template)
            tokenized.append(tokens)
            truncated += cut
        if truncated:
            log.warning("%s: %d of %d questions had their context's start cut to fit max_length=%d tokens",
                        task.name, truncated, len(task), max_length)
        self.num_tokens = [t.target_counts for t in tokenized]
        self.batches: list[GroupBatch] = plan_batches(tokenized, batch_size=batch_size, pad_id=tokenizer.pad_id,
                                                      max_length=max_length)
        log.info("%s: %d questions in %d batches of %d rows", task.name, len(task), len(self.batches), batch_size)

    def _on_devices(self, batch: GroupBatch) -> dict[str, jax.Array]:
        # The leading axis of 1 and the name "input_ids" (the rows shard_batch counts) are shard_batch's.
        arrays = {"input_ids": batch.context_ids[None], "context_mask": batch.context_mask[None],
                  "continuation_ids": batch.continuation_ids[None],
                  "continuation_counts": batch.continuation_counts[None]}
        if self.mesh is not None:
            return shard_batch(arrays, self.mesh)
        return {k: jnp.asarray(v) for k, v in arrays.items()}

    def scores(self, base: Any, lora: Any = None) -> MultipleChoiceScores:
        """Per-question log-likelihoods of every choice (see :class:`MultipleChoiceScores`)."""
        pending = []
        for batch in self.batches:  # dispatch everything, then wait: batches overlap with host work
            x = self._on_devices(batch)
            out = group_logprobs(self.spec, base, lora, x["input_ids"], x["context_mask"], x["continuation_ids"],
                                 x["continuation_counts"])
            pending.append((batch, out))
        items = self.task.items
        loglik = [np.full(len(item.choices), np.nan) for item in items]
        for batch, out in pending:
            values = _to_host(out).astype(np.float64)
            for row, (i, members) in enumerate(batch.owners):
                loglik[i][list(members)] = values[row, : len(members)]
        for item, values in zip(items, loglik, strict=True):
            if not np.all(np.isfinite(values)):
                raise FloatingPointError(f"{item.origin}: non-finite log-likelihoods {values.tolist()} (the model's "
                                         "logits are not finite)")
        return MultipleChoiceScores.from_rows(loglik, self.num_tokens, [item.choices for item in items],
                                              [item.answer for item in items], [item.subject for item in items])

    def __call__(self, base: Any, lora: Any = None) -> dict[str, float | int | None]:
        """Metrics of ``base`` with adapters ``lora`` (see :mod:`qlora_jax.eval.metrics`), names prefixed."""
        return self.scores(base, lora).metrics(self.prefix)


def evaluate(model: Any, tokenizer: Tokenizer, task: MultipleChoiceTask, **options: Any) -> MultipleChoiceScores:
    """Scores of a :class:`~qlora_jax.model.CausalLM` on ``task``.

    Args:
      model: the model (its spec, base and adapters).
      tokenizer: its tokenizer.
      task: the items to score.
      **options: :class:`MultipleChoiceEvaluator`'s keyword arguments.

    Returns:
      The per-question :class:`~qlora_jax.eval.metrics.MultipleChoiceScores`.

    Raises:
      FloatingPointError: non-finite log-likelihoods.
    """
    evaluator = MultipleChoiceEvaluator(model.spec, tokenizer, task, **options)
    return evaluator.scores(model.base_params, model.lora_params)
