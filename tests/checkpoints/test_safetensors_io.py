"""Sharded safetensors folders (``checkpoints/safetensors_io.py``): with or without an index, and
an index or shards that are missing, truncated, duplicated or disagree, refused when the folder
is opened. Part of the fault campaign (``pytest -m faults``).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from helpers import CONFIG, load
from safetensors.numpy import save_file

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.load import open_checkpoint


def shard(path: pathlib.Path, tensors: dict, cfg: dict, parts: int = 2, *, index: bool = True) -> pathlib.Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    keys = list(tensors)
    weight_map = {}
    for i in range(parts):
        name = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::parts]}
        save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    if index:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.mark.faults
def test_sharded_folder_loads_with_or_without_index(tmp_path, good):
    for index in (True, False):
        base, _ = load(shard(tmp_path / str(index), good[1], CONFIG, index=index))
        np.testing.assert_array_equal(np.asarray(base["norm"]), good[1]["model.norm.weight"])


@pytest.mark.faults
def test_index_naming_a_missing_shard_fails_at_open(tmp_path, good):
    bad = shard(tmp_path / "s", good[1], CONFIG)
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard\(s\) \['model-00002-of-00002\.safetensors'\] that are "
                                              "missing"):
        open_checkpoint(bad)


@pytest.mark.faults
def test_truncated_shard_fails_at_open(tmp_path, good):
    bad = shard(tmp_path / "s", good[1], CONFIG)
    file = bad / "model-00002-of-00002.safetensors"
    file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*truncated or corrupt"):
        open_checkpoint(bad)


@pytest.mark.faults
def test_tensor_in_two_shards_is_refused(tmp_path, good):
    bad = shard(tmp_path / "s", good[1], CONFIG, index=False)
    save_file({"model.norm.weight": good[1]["model.norm.weight"]}, str(bad / "model-extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is stored twice"):
        open_checkpoint(bad)


@pytest.mark.faults
def test_index_and_shards_that_disagree_are_refused(tmp_path, good):
    bad = shard(tmp_path / "a", good[1], CONFIG)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    moved = next(k for k, v in index["weight_map"].items() if v.startswith("model-00001"))
    index["weight_map"][moved] = "model-00002-of-00002.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="assigns .* which does not hold them"):
        open_checkpoint(bad)
    index["weight_map"].pop(moved)
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="which model.safetensors.index.json does not list"):
        open_checkpoint(bad)
    text = '{"weight_map": {"a": "model-00001-of-00002.safetensors", "a": "model-00002-of-00002.safetensors"}}'
    (bad / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"names \['a'\] more than once"):
        open_checkpoint(bad)
    both = shard(tmp_path / "b", good[1], CONFIG)
    save_file(good[1], str(both / "model.safetensors"))
    with pytest.raises(CheckpointError, match="holds both model.safetensors and model.safetensors.index.json"):
        open_checkpoint(both)
