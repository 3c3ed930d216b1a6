"""The training-data pipeline: sources -> split -> tokens with a loss mask -> padded batches.

::

    examples = load_examples("chatterbot")                      # or "chitchat", "/path/data.jsonl"
    train, held_out, cleaning = train_eval_split(examples, eval_dataset_size=0.1, seed=42)  # deduplicated first
    train_tokens = tokenize_examples(train, tokenizer, source_max_len=1024, target_max_len=256)
    buckets = bucket_lengths(1024 + 256)
    batches = BatchIterator(train_tokens, batch_size=4, pad_id=tokenizer.pad_id, buckets=buckets,
                            seed=42, group_by_length=True, state=saved_state_or_None)
    step_batch = batches.next_batches(gradient_accumulation_steps)   # int32 [accum, B, T] each
    saved_state = batches.state                                      # store with the checkpoint

One idea per module: :mod:`.example` (the normal form), :mod:`.files`, :mod:`.formats`,
:mod:`.oasst`, :mod:`.corpora` and :mod:`.sources` (reading), :mod:`.split` (deduplication and split),
:mod:`.tokenization` (rendering and masking), :mod:`.batching` (padding), :mod:`.ordering`
(shuffling and length grouping) and :mod:`.iterator` (the resumable stream).
"""

from qlora_jax.data.batching import Batch, bucket_lengths, collate, padded_length, stack_batches
from qlora_jax.data.corpora import load_chatterbot, load_chitchat
from qlora_jax.data.example import ROLES, DatasetError, Example, make_example
from qlora_jax.data.formats import FORMATS, detect_format
from qlora_jax.data.iterator import BatchIterator, eval_batches
from qlora_jax.data.oasst import OASST_POLICIES
from qlora_jax.data.ordering import epoch_batches, length_grouped_order
from qlora_jax.data.sources import BUILTIN_DATASETS, load_examples, load_file
from qlora_jax.data.split import DataCleaning, DataSplit, clean_examples, eval_count, split_indices, train_eval_split
from qlora_jax.data.tokenization import (
                                         ChatRenderer,
                                         ChatTemplateError,
                                         TokenizedExample,
                                         chat_segments,
                                         tokenize_example,
                                         tokenize_examples,
)

__all__ = [
    "Batch", "BatchIterator", "BUILTIN_DATASETS", "ChatRenderer", "ChatTemplateError", "DataCleaning", "DataSplit",
    "DatasetError", "Example", "clean_examples",
    "FORMATS", "OASST_POLICIES", "ROLES", "TokenizedExample", "bucket_lengths", "chat_segments", "collate",
    "detect_format", "epoch_batches", "eval_batches", "eval_count", "length_grouped_order", "load_chatterbot",
    "load_chitchat", "load_examples", "load_file", "make_example", "padded_length", "split_indices",
    "stack_batches", "tokenize_example", "tokenize_examples", "train_eval_split",
]
