"""Loading a transformers folder (``checkpoints/load.py``): every tensor as stored, 16-bit tensors,
a tied head stored anyway, bitsandbytes 4-bit folders kept without re-quantization, and their faults.

The folders are written here (the ``good`` fixture of conftest.py and variants of it); each
corrupted one must give an early :class:`CheckpointError` naming the file and what is wrong. Part
of the fault campaign (``pytest -m faults``).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import CONFIG, load, variant, write_folder

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.models import layout
from qlora_jax.models.config import UnsupportedArchitectureError
from qlora_jax.quant import bnb_format, quantize


@pytest.mark.faults
def test_good_folder_loads_every_tensor_as_stored(good):
    base, _ = load(good[0])
    np.testing.assert_array_equal(np.asarray(base["embed_tokens"]), good[1]["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(base["layers"]["mlp"]["down_proj"]["weight"][1]),
                                  good[1]["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.faults
def test_tied_head_stored_anyway_must_equal_the_embeddings(tmp_path, good):
    same = variant(tmp_path / "same", good, add={"lm_head.weight": good[1]["model.embed_tokens.weight"]},
                   cfg={"tie_word_embeddings": True})
    base, _ = load(same)
    assert "lm_head" not in base  # consumed (checked), the head is the embeddings
    other = variant(tmp_path / "other", good, cfg={"tie_word_embeddings": True})
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=true, but 'lm_head\.weight' differs"):
        load(other)


@pytest.mark.faults
def test_bfloat16_and_float16_tensors_are_accepted(tmp_path, good):
    import ml_dtypes

    key = "model.layers.0.self_attn.q_proj.weight"
    halves = {key: good[1][key].astype(ml_dtypes.bfloat16), "model.norm.weight": good[1]["model.norm.weight"]
              .astype(np.float16)}
    base, _ = load(variant(tmp_path, good, add=halves))
    np.testing.assert_array_equal(np.asarray(base["layers"]["self_attn"]["q_proj"]["weight"][0]),
                                  halves[key].astype(np.float32))


@pytest.fixture(scope="module")
def bnb_tensors(good) -> dict[str, np.ndarray]:
    """The good model in bitsandbytes' serialized NF4 + double-quant format (linear weights only)."""
    out = {k: v for k, v in good[1].items() if not any(k.endswith(f"{n}.weight") for n in layout.LINEAR_LAYERS)}
    for layer in range(2):
        for name in layout.LINEAR_LAYERS:
            key = layout.hf_key(layer, name)
            out.update(bnb_format.to_bnb_state_dict(jax.device_get(quantize(good[1][key], "nf4")), key))
    return out


def edit_state(tensors: dict, key: str, **changes) -> dict:
    state_key = f"{key}.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(tensors[state_key]))
    meta.update(changes)
    for field in [f for f, v in changes.items() if v is None]:
        del meta[field]
    return {state_key: np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()}


BNB_KEY = "model.layers.1.self_attn.v_proj.weight"


@pytest.mark.faults
def test_bnb_folder_loads_without_requantization(tmp_path, good, bnb_tensors):
    import ml_dtypes

    # bitsandbytes' quant_storage option stores the packed bytes under another dtype: bytes, not values
    # (as bfloat16 some byte pairs read as NaN, which must not be taken for corrupt weights).
    packed = bnb_tensors[BNB_KEY].reshape(-1).copy()
    packed[:2] = (0xC0, 0x7F)  # codes that read as a bfloat16 NaN (0x7FC0)
    as_bf16 = dict(bnb_tensors, **{BNB_KEY: packed.view(ml_dtypes.bfloat16).reshape(-1, 1)})
    assert np.isnan(as_bf16[BNB_KEY].astype(np.float32)).any()
    base, stats = load(write_folder(tmp_path / "bnb", CONFIG, as_bf16), quant="nf4")
    assert stats.prequantized == 14 and stats.requantized == 0
    stored = base["layers"]["self_attn"]["v_proj"]["weight"]
    np.testing.assert_array_equal(np.asarray(stored.codes[1]).reshape(-1), packed)


@pytest.mark.faults
def test_bnb_missing_nested_tensors_in_every_layer_is_an_error(tmp_path, bnb_tensors):
    stripped = {k: v for k, v in bnb_tensors.items() if ".nested_" not in k}
    with pytest.raises(CheckpointError, match=r"says the scales are double-quantized \(nested_offset=.*lost its "
                                              r"nested \(double-quant\) tensors"):
        load(write_folder(tmp_path / "bnb", CONFIG, stripped), quant="nf4")


@pytest.mark.faults
@pytest.mark.parametrize("case, match", [
    ("nested_without_state", r"says the scales are not double-quantized \(no nested_offset\)"),
    ("nan_offset", r"quant state field 'nested_offset' is nan; expected a finite number"),
    ("nan_nested_absmax", r"nested_absmax' holds 1 NaN or Inf"),
    ("negative_nested_absmax", r"nested_absmax' holds 1 value\(s\) that are not finite and >= 0"),
    ("float16_absmax", r"absmax is float16; bitsandbytes stores uint8"),
    ("no_quant_state", r"needs exactly one '.*quant_state\.bitsandbytes__<nf4\|fp4>' tensor .* found none beside"),
    ("no_blocksize", r"the quant state has no field 'blocksize'"),
    ("shape_string", r"quant state field 'shape' is '64'"),
    ("short_codes", r"holds 1000 bytes but a nf4 tensor of shape \[32, 64\] needs 1024"),
    ("custom_code_table", r"quant_map is not bitsandbytes' nf4 code table"),
    ("fp4_asked", r"is stored as bitsandbytes nf4, but quant='fp4' was asked"),
])
def test_bnb_corruptions_are_named(tmp_path, bnb_tensors, case, match):
    t = dict(bnb_tensors)
    quant = "nf4"
    if case == "nested_without_state":
        t.update(edit_state(t, BNB_KEY, nested_offset=None, nested_blocksize=None, nested_dtype=None))
    elif case == "nan_offset":
        t.update(edit_state(t, BNB_KEY, nested_offset=float("nan")))
    elif case in ("nan_nested_absmax", "negative_nested_absmax"):
        t[f"{BNB_KEY}.nested_absmax"] = t[f"{BNB_KEY}.nested_absmax"].copy()
        t[f"{BNB_KEY}.nested_absmax"][0] = np.nan if case.startswith("nan") else -1.0
    elif case == "float16_absmax":
        t[f"{BNB_KEY}.absmax"] = t[f"{BNB_KEY}.absmax"].astype(np.float16)
    elif case == "no_quant_state":
        del t[f"{BNB_KEY}.quant_state.bitsandbytes__nf4"]
    elif case == "no_blocksize":
        t.update(edit_state(t, BNB_KEY, blocksize=None))
    elif case == "shape_string":
        t.update(edit_state(t, BNB_KEY, shape="64"))
    elif case == "short_codes":
        t[BNB_KEY] = t[BNB_KEY][:1000]
    elif case == "custom_code_table":
        t[f"{BNB_KEY}.quant_map"] = t[f"{BNB_KEY}.quant_map"] * 1.01
    elif case == "fp4_asked":
        quant = "fp4"
    with pytest.raises(CheckpointError, match=match) as error:
        load(write_folder(tmp_path / "bnb", CONFIG, t), quant=quant)
    assert "model.safetensors" in str(error.value)


@pytest.mark.faults
def test_bnb_nan_absmax_without_double_quant(tmp_path, good):
    key = "model.layers.0.mlp.up_proj.weight"
    t = dict(good[1])
    del t[key]
    t.update(bnb_format.to_bnb_state_dict(jax.device_get(quantize(good[1][key], "nf4", double_quant=False)), key))
    t[f"{key}.absmax"] = t[f"{key}.absmax"].copy()
    t[f"{key}.absmax"][5] = np.inf
    with pytest.raises(CheckpointError, match=r"up_proj\.weight\.absmax' holds 1 NaN or Inf"):
        load(write_folder(tmp_path / "bnb", CONFIG, t), quant="nf4")


@pytest.mark.faults
def test_unsupported_architecture_names_the_file(tmp_path, good):
    bad = variant(tmp_path, good, cfg={"model_type": "gpt2"})
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        load(bad)
