"""Fixtures the model-family test modules share.

Each module that uses them declares ``SEQ`` (tokens per row) and ``BASE`` (the transformers
config fields all its models share, ``vocab_size`` among them), and may declare ``LOWEST_ID``
(the smallest token id drawn; 0 when absent): the families' tests keep ids 0-2 for the
pad/eos/bos tokens their configs name.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request) -> pathlib.Path:
    """A folder of the module's own for its exported models and oracle outputs."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def inputs(module_rng, request) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, attention_mask)``, int32 ``[2, SEQ]``: seeded ids, the second row right-padded by 5."""
    seq, vocab = request.module.SEQ, request.module.BASE["vocab_size"]
    ids = module_rng.integers(getattr(request.module, "LOWEST_ID", 0), vocab, size=(2, seq)).astype(np.int32)
    mask = np.ones((2, seq), np.int32)
    mask[1, seq - 5:] = 0  # right padding on the second row
    return ids, mask
