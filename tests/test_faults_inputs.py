"""Fault injection on everything read (issue 13, classes 1, 6, 7, 9 and the loader part of 10).

Every case starts from a small checkpoint written here (safetensors folders, sharded or not,
bitsandbytes 4-bit, PEFT adapters, GGUF, tokenizer files), checks that the good file loads, and
corrupts one thing: each corruption must give an early :class:`CheckpointError` (or the named
error of its layer) that names the file and what is wrong, never a silently wrong model.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_quantized_base
from safetensors.numpy import load_file, save_file

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.gguf_io import GGUFCheckpoint
from qlora_jax.checkpoints.load import load_base_params, open_checkpoint, read_config
from qlora_jax.data import clean_examples, make_example, train_eval_split
from qlora_jax.lora import LoraConfig
from qlora_jax.merge import LossyMergeError, export_merged
from qlora_jax.model import load_pretrained
from qlora_jax.models import layout, llama
from qlora_jax.models.config import LlamaConfig, UnsupportedArchitectureError
from qlora_jax.models.rope import inverse_frequencies
from qlora_jax.models.spec import ModelSpec
from qlora_jax.peft_io import load_peft_adapter, peft_key, save_peft_adapter
from qlora_jax.quant import QuantConfig, bnb_format, quantize
from qlora_jax.quant.codebooks import DYNAMIC_MAP_SIGNED, NF4_CODE
from qlora_jax.tokenizer import CHAT_TEMPLATES, ChatTemplateError, Tokenizer

pytestmark = pytest.mark.faults  # the fault campaign, selectable with -m faults

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=64,
              intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
              tie_word_embeddings=False, hidden_act="silu")


def random_tensors(rng: np.random.Generator, cfg: dict, layers: range | None = None) -> dict[str, np.ndarray]:
    """float32 transformers tensors of a LLaMA model with ``cfg`` (layers ``layers``, default all)."""
    config = LlamaConfig.from_hf_dict(cfg)
    d = config.hidden_size
    out = {"model.embed_tokens.weight": rng.normal(size=(config.vocab_size, d)).astype(np.float32),
           "model.norm.weight": (1 + 0.1 * rng.normal(size=d)).astype(np.float32)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (rng.normal(size=(config.vocab_size, d)) / 8).astype(np.float32)
    for layer in layers if layers is not None else range(config.num_hidden_layers):
        for norm in layout.LAYER_NORMS:
            out[layout.hf_key(layer, norm)] = (1 + 0.1 * rng.normal(size=d)).astype(np.float32)
        for name, shape in config.linear_shapes().items():
            out[layout.hf_key(layer, name)] = (rng.normal(size=shape) / math.sqrt(shape[1])).astype(np.float32)
            if config.linear_has_bias(name):
                out[layout.hf_key(layer, name, "bias")] = (0.1 * rng.normal(size=shape[0])).astype(np.float32)
    return out


def write_folder(path: pathlib.Path, cfg: dict, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def load(path, quant="float32", **options):
    source, cfg = open_checkpoint(path)
    return load_base_params(source, read_config(cfg), QuantConfig(quant=quant, dtype="float32", **options))


@pytest.fixture(scope="module")
def good(tmp_path_factory, module_rng) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """A valid float32 folder and its tensors."""
    tensors = random_tensors(module_rng, CONFIG)
    return write_folder(tmp_path_factory.mktemp("good"), CONFIG, tensors), tensors


def variant(tmp_path, good, *, drop=(), add=None, cfg=None) -> pathlib.Path:
    """The good folder with tensors dropped/added/replaced and config fields changed."""
    tensors = {k: v for k, v in good[1].items() if k not in drop}
    tensors.update(add or {})
    return write_folder(tmp_path / "ckpt", {**CONFIG, **(cfg or {})}, tensors)


def with_value(good, key, index, value) -> dict[str, np.ndarray]:
    array = good[1][key].copy()
    array[index] = value
    return {key: array}


# ------------------------------------------------------------------------ class 1: what is read is checked


def test_good_folder_loads_every_tensor_as_stored(good):
    base, _ = load(good[0])
    np.testing.assert_array_equal(np.asarray(base["embed_tokens"]), good[1]["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(base["layers"]["mlp"]["down_proj"]["weight"][1]),
                                  good[1]["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("key, index, value", [
    ("model.embed_tokens.weight", (3, 5), np.nan),
    ("lm_head.weight", (0, 0), np.inf),
    ("model.norm.weight", 7, -np.inf),
    ("model.layers.1.input_layernorm.weight", 0, np.nan),
    ("model.layers.0.post_attention_layernorm.weight", 63, np.nan),
    ("model.layers.1.self_attn.o_proj.weight", (2, 3), np.nan),
])
def test_non_finite_value_in_any_tensor_is_named(tmp_path, good, key, index, value):
    bad = variant(tmp_path, good, add=with_value(good, key, index, value))
    where = re.escape(f"{bad / 'model.safetensors'}: tensor '{key}' holds 1 NaN or Inf")
    with pytest.raises(CheckpointError, match=where):
        load(bad)


def test_non_finite_bias_is_named(tmp_path, rng):
    cfg = {**CONFIG, "attention_bias": True}
    tensors = random_tensors(rng, cfg)
    tensors["model.layers.0.self_attn.k_proj.bias"][4] = np.nan
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.bias' holds 1 NaN"):
        load(write_folder(tmp_path / "bias", cfg, tensors))


def test_extra_layers_are_refused_by_name(tmp_path, good, rng):
    extra = random_tensors(rng, {**CONFIG, "num_hidden_layers": 4}, layers=range(2, 4))
    bad = variant(tmp_path, good, add=extra)
    with pytest.raises(CheckpointError, match=r"holds 18 tensor\(s\) that a model with this config does not use: "
                                              r"'model\.layers\.2\..*layer\(s\) 2-3 are beyond num_hidden_layers=2"):
        load(bad)


def test_missing_tensor_is_named_before_anything_is_read(tmp_path, good):
    bad = variant(tmp_path, good, drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(CheckpointError, match=r"is missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load(bad)


def test_fewer_layers_than_config_lists_the_missing(tmp_path, good):
    bad = variant(tmp_path, good, cfg={"num_hidden_layers": 3})
    with pytest.raises(CheckpointError, match=r"is missing 9 tensors: 'model\.layers\.2\.input_layernorm\.weight'"):
        load(bad)


@pytest.mark.parametrize("key", ["model.foo.weight", "model.layers.0.mlp.up_proj.weight.SCB", "lm_head.bias"])
def test_stray_tensor_is_refused(tmp_path, good, key):
    bad = variant(tmp_path, good, add={key: np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match=rf"does not use: '{key}'"):
        load(bad)


def test_tied_head_stored_anyway_must_equal_the_embeddings(tmp_path, good):
    same = variant(tmp_path / "same", good, add={"lm_head.weight": good[1]["model.embed_tokens.weight"]},
                   cfg={"tie_word_embeddings": True})
    base, _ = load(same)
    assert "lm_head" not in base  # consumed (checked), the head is the embeddings
    other = variant(tmp_path / "other", good, cfg={"tie_word_embeddings": True})
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=true, but 'lm_head\.weight' differs"):
        load(other)


def test_rotary_buffers_are_checked_against_the_config(tmp_path, good):
    freqs = inverse_frequencies(16, 10000.0, None)
    buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": freqs for i in range(2)}
    load(variant(tmp_path / "ok", good, add=buffers))  # the documented derived buffer: read, compared, accepted
    half = {k: v.astype(np.float16) for k, v in buffers.items()}
    load(variant(tmp_path / "f16", good, add=half))  # saved in the model's 16-bit dtype
    wrong = {k: inverse_frequencies(16, 500000.0, None) for k in buffers}
    with pytest.raises(CheckpointError, match=r"rotary_emb\.inv_freq' \(rotary inverse frequencies.*disagrees with "
                                              r"config\.json"):
        load(variant(tmp_path / "wrong", good, add=wrong))


@pytest.mark.parametrize("dtype, hint", [(np.int8, "8-bit"), (np.uint8, "quant_state.bitsandbytes__nf4"),
                                         (np.int32, "")])
def test_integer_weight_is_refused_with_what_it_probably_is(tmp_path, good, dtype, hint):
    key = "model.layers.0.mlp.gate_proj.weight"
    bad = variant(tmp_path, good, add={key: np.ones((128, 64), dtype)})
    with pytest.raises(CheckpointError, match=rf"'{key}' is {np.dtype(dtype).name}\[128, 64\]; expected "
                                              rf"floating-point.*{hint}"):
        load(bad)


@pytest.mark.parametrize("key, shape", [("model.norm.weight", (1, 64)),
                                        ("model.layers.1.mlp.up_proj.weight", (64, 128)),
                                        ("model.embed_tokens.weight", (65, 64))])
def test_wrong_shape_or_rank_is_named_before_reading(tmp_path, good, key, shape):
    bad = variant(tmp_path, good, add={key: np.zeros(shape, np.float32)})
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape {list(shape)}".replace("[", r"\[")):
        load(bad)


def test_bfloat16_and_float16_tensors_are_accepted(tmp_path, good):
    import ml_dtypes

    key = "model.layers.0.self_attn.q_proj.weight"
    halves = {key: good[1][key].astype(ml_dtypes.bfloat16), "model.norm.weight": good[1]["model.norm.weight"]
              .astype(np.float16)}
    base, _ = load(variant(tmp_path, good, add=halves))
    np.testing.assert_array_equal(np.asarray(base["layers"]["self_attn"]["q_proj"]["weight"][0]),
                                  halves[key].astype(np.float32))


# ---- sharded folders


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


def test_sharded_folder_loads_with_or_without_index(tmp_path, good):
    for index in (True, False):
        base, _ = load(shard(tmp_path / str(index), good[1], CONFIG, index=index))
        np.testing.assert_array_equal(np.asarray(base["norm"]), good[1]["model.norm.weight"])


def test_index_naming_a_missing_shard_fails_at_open(tmp_path, good):
    bad = shard(tmp_path / "s", good[1], CONFIG)
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard\(s\) \['model-00002-of-00002\.safetensors'\] that are "
                                              "missing"):
        open_checkpoint(bad)


def test_truncated_shard_fails_at_open(tmp_path, good):
    bad = shard(tmp_path / "s", good[1], CONFIG)
    file = bad / "model-00002-of-00002.safetensors"
    file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*truncated or corrupt"):
        open_checkpoint(bad)


def test_tensor_in_two_shards_is_refused(tmp_path, good):
    bad = shard(tmp_path / "s", good[1], CONFIG, index=False)
    save_file({"model.norm.weight": good[1]["model.norm.weight"]}, str(bad / "model-extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is stored twice"):
        open_checkpoint(bad)


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


# ---- bitsandbytes 4-bit pre-quantized folders


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


def test_bnb_missing_nested_tensors_in_every_layer_is_an_error(tmp_path, bnb_tensors):
    stripped = {k: v for k, v in bnb_tensors.items() if ".nested_" not in k}
    with pytest.raises(CheckpointError, match=r"says the scales are double-quantized \(nested_offset=.*lost its "
                                              r"nested \(double-quant\) tensors"):
        load(write_folder(tmp_path / "bnb", CONFIG, stripped), quant="nf4")


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


def test_bnb_nan_absmax_without_double_quant(tmp_path, good):
    key = "model.layers.0.mlp.up_proj.weight"
    t = dict(good[1])
    del t[key]
    t.update(bnb_format.to_bnb_state_dict(jax.device_get(quantize(good[1][key], "nf4", double_quant=False)), key))
    t[f"{key}.absmax"] = t[f"{key}.absmax"].copy()
    t[f"{key}.absmax"][5] = np.inf
    with pytest.raises(CheckpointError, match=r"up_proj\.weight\.absmax' holds 1 NaN or Inf"):
        load(write_folder(tmp_path / "bnb", CONFIG, t), quant="nf4")


# ---- PEFT adapters


def random_adapter(rng, r=4, targets=("q_proj", "v_proj", "down_proj"), layers=2, size=0.05):
    config = LlamaConfig.from_hf_dict({**CONFIG, "num_hidden_layers": layers})
    shapes = config.linear_shapes()
    lora = {"layers": {}}
    for name in targets:
        out_f, in_f = shapes[name]
        lora["layers"].setdefault(layout.module_group(name), {})[name] = {
            "lora_A": jnp.asarray(rng.normal(size=(layers, r, in_f)) / math.sqrt(in_f), jnp.float32),
            "lora_B": jnp.asarray(size * rng.normal(size=(layers, out_f, r)), jnp.float32)}
    return config, lora, LoraConfig(r=r, alpha=2.0 * r, target_modules=tuple(targets))


def test_adapter_round_trip_then_corruptions(tmp_path, rng):
    config, lora, lora_config = random_adapter(rng)
    path = save_peft_adapter(tmp_path / "ok", lora, lora_config, config)
    loaded, loaded_config = load_peft_adapter(path, config)
    np.testing.assert_array_equal(np.asarray(loaded["layers"]["mlp"]["down_proj"]["lora_B"]),
                                  np.asarray(lora["layers"]["mlp"]["down_proj"]["lora_B"]))
    assert loaded_config.target_modules == ("q_proj", "v_proj", "down_proj")
    tensors = load_file(path / "adapter_model.safetensors")
    adapter_cfg = json.loads((path / "adapter_config.json").read_text())

    def corrupt(name, tensors=tensors, cfg=adapter_cfg):
        bad = tmp_path / name
        bad.mkdir()
        save_file(tensors, str(bad / "adapter_model.safetensors"))
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        return bad

    key = peft_key(1, "v_proj", "lora_B")
    nan = dict(tensors, **{key: np.where(np.arange(tensors[key].size).reshape(tensors[key].shape) == 3, np.nan,
                                         tensors[key]).astype(np.float32)})
    with pytest.raises(CheckpointError, match=rf"'{key}' holds 1 NaN or Inf"):
        load_peft_adapter(corrupt("nan", nan), config)
    _, extra_layers, _ = random_adapter(rng, layers=3)
    deep = save_peft_adapter(tmp_path / "deep", extra_layers, lora_config,
                             LlamaConfig.from_hf_dict({**CONFIG, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"6 tensor\(s\) that a model with this config does not use.*layer\(s\) "
                                              r"2 are beyond num_hidden_layers=2"):
        load_peft_adapter(deep, config)
    other = dict(tensors, **{peft_key(0, "up_proj", "lora_A"): np.zeros((4, 64), np.float32)})
    with pytest.raises(CheckpointError, match=r"does not use: 'base_model\.model\.model\.layers\.0\.mlp\.up_proj"):
        load_peft_adapter(corrupt("other_module", other), config)
    head = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)})
    with pytest.raises(CheckpointError, match=r"does not use: 'base_model\.model\.lm_head\.lora_A\.weight'"):
        load_peft_adapter(corrupt("head", head), config)
    partial = {k: v for k, v in tensors.items() if k != peft_key(0, "q_proj", "lora_A")}
    with pytest.raises(CheckpointError, match=r"is missing tensor 'base_model\.model\.model\.layers\.0\.self_attn\."
                                              r"q_proj\.lora_A\.weight'"):
        load_peft_adapter(corrupt("partial", partial), config)
    with pytest.raises(CheckpointError, match=r"lora_A\.weight' has shape \[4, 64\] but adapter_config\.json "
                                              r"\(r=8\) with the model's config implies \[8, 64\]"):
        load_peft_adapter(corrupt("rank", cfg=dict(adapter_cfg, r=8)), config)
    ints = dict(tensors, **{key: tensors[key].astype(np.int32)})
    with pytest.raises(CheckpointError, match=rf"'{key}' is int32"):
        load_peft_adapter(corrupt("int", ints), config)
    fewer = dict(adapter_cfg, target_modules=["q_proj", "v_proj"])
    with pytest.raises(CheckpointError, match=r"does not use: .*down_proj"):
        load_peft_adapter(corrupt("targets", cfg=fewer), config)


# ---- GGUF


GGUF_METADATA = {"llama.block_count": 2, "llama.context_length": 128, "llama.embedding_length": 64,
                 "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                 "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 64,
                 "llama.rope.dimension_count": 16}


# llama.cpp's tensor names (convert_hf_to_gguf.py), written here independently of the reader's table.
LLAMA_CPP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
                   "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                   "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
                   "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_file(path: pathlib.Path, tensors: dict[str, np.ndarray], *, extra=None, **metadata) -> pathlib.Path:
    """A llama GGUF file of transformers ``tensors`` (float32), as llama.cpp's converter names and orders them."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {**GGUF_METADATA, **{k.replace("__", "."): v for k, v in metadata.items()}}.items():
        {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}[type(value)](key, value)
    for key, value in tensors.items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn\.|mlp\.)?(\w+)\.(weight|bias)", key)
        if match:
            layer, name, suffix = match.groups()
            heads = {"q_proj": 4, "k_proj": 2}.get(name)
            if heads:  # llama.cpp's interleaved rotary row order
                value = value.reshape(heads, 2, value.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(value.shape)
            name = f"blk.{layer}.{LLAMA_CPP_NAMES[name]}.{suffix}"
        else:
            base, suffix = key.rsplit(".", 1)
            name = f"{LLAMA_CPP_NAMES[base]}.{suffix}"
        writer.add_tensor(name, np.ascontiguousarray(value))
    for name, value in (extra or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_loads_like_the_folder_then_faults(tmp_path, good):
    path = gguf_file(tmp_path / "ok.gguf", good[1])
    base, _ = load(path)
    np.testing.assert_array_equal(np.asarray(base["layers"]["self_attn"]["k_proj"]["weight"][1]),
                                  good[1]["model.layers.1.self_attn.k_proj.weight"])

    size = path.stat().st_size
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: size - 1000])
    with pytest.raises(CheckpointError, match=rf"GGUF file {re.escape(str(truncated))} is truncated: its tensor table "
                                              rf"needs \d+ bytes but the file has {size - 1000}"):
        GGUFCheckpoint(truncated)  # at open, before any tensor is read
    header = tmp_path / "header.gguf"
    header.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"GGUF file .*(is truncated|\(300 bytes\).*truncated or corrupt)"):
        GGUFCheckpoint(header)

    nan = dict(good[1], **with_value(good, "model.layers.0.mlp.up_proj.weight", (1, 1), np.nan))
    with pytest.raises(CheckpointError, match=r"nan\.gguf: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' holds 1 "
                                              "NaN or Inf"):
        load(gguf_file(tmp_path / "nan.gguf", nan))
    with pytest.raises(CheckpointError, match=r"holds tensor 'rope_freqs\.weight', which a LLaMA model has no use for"):
        open_checkpoint(gguf_file(tmp_path / "rope.gguf", good[1], extra={"rope_freqs.weight": np.ones(8, np.float32)}))
    with pytest.raises(CheckpointError, match=r"is missing 9 tensors: 'model\.layers\.2\."):
        load(gguf_file(tmp_path / "blocks.gguf", good[1], llama__block_count=3))
    with pytest.raises(CheckpointError, match=r"metadata 'llama\.attention\.head_count' is '4'; expected an integer"):
        open_checkpoint(gguf_file(tmp_path / "meta.gguf", good[1], llama__attention__head_count="4"))
    with pytest.raises(CheckpointError, match=r"'llama\.rope\.scaling\.type' is 'yarn'; qlora-jax reads GGUF rotary "
                                              r"scaling 'none' or 'linear'"):
        open_checkpoint(gguf_file(tmp_path / "yarn.gguf", good[1], llama__rope__scaling__type="yarn"))
    _, cfg = open_checkpoint(gguf_file(tmp_path / "linear.gguf", good[1], llama__rope__scaling__type="linear",
                                       llama__rope__scaling__factor=4.0))
    assert read_config(cfg).rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}  # not silently dropped


# ------------------------------------------------------------------------ class 6: errors that help


@pytest.mark.parametrize("edit, match", [
    (lambda c: "{not json", r"config\.json is not valid JSON"),
    (lambda c: [c], r"config\.json: expected a JSON object of model settings, got list"),
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, r"missing field 'hidden_size' \(expected a "
                                                                    r"positive"),
    (lambda c: {**c, "hidden_size": "64"}, r"field 'hidden_size' is '64' \(str\); expected a positive integer"),
    (lambda c: {**c, "num_hidden_layers": 0}, r"field 'num_hidden_layers' is 0 .*positive integer"),
    (lambda c: {**c, "rms_norm_eps": float("nan")}, r"field 'rms_norm_eps' is nan .*positive finite number"),
    (lambda c: {**c, "tie_word_embeddings": "yes"}, r"field 'tie_word_embeddings' is 'yes' .*true or false"),
    (lambda c: {**c, "num_key_value_heads": 3}, r"'num_attention_heads' \(4\) must be a multiple of "
                                                r"'num_key_value_heads' \(3\)"),
    (lambda c: {**c, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type 'yarn'; the decoder "
                                                                            r"implements default, linear, llama3"),
    (lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"'rope_scaling\.low_freq_factor' is "
                                                                              r"None"),
    (lambda c: {**c, "rope_scaling": [1, 2]}, r"field 'rope_scaling' is \[1, 2\] \(list\); expected a JSON object"),
    (lambda c: {**c, "quantization_config": {"quant_method": "gptq", "bits": 4}}, r"describes 'gptq'"),
    (lambda c: {**c, "eos_token_id": "</s>"}, r"field 'eos_token_id' is '</s>'.*token id"),
])
def test_bad_config_json_names_the_file_and_field(tmp_path, good, edit, match):
    bad = variant(tmp_path, good)
    value = edit(dict(CONFIG))
    (bad / "config.json").write_text(value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(CheckpointError, match=match) as error:
        load(bad)
    assert str(bad / "config.json") in str(error.value)


def test_unsupported_architecture_names_the_file(tmp_path, good):
    bad = variant(tmp_path, good, cfg={"model_type": "gpt2"})
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        load(bad)


@pytest.mark.parametrize("edit, match", [
    (lambda c: "{", r"adapter_config\.json is not valid JSON"),
    (lambda c: {k: v for k, v in c.items() if k != "r"}, r"field 'r' is None; expected a positive integer"),
    (lambda c: {**c, "r": "4"}, r"field 'r' is '4'; expected a positive integer"),
    (lambda c: {**c, "lora_alpha": float("inf")}, r"field 'lora_alpha' is inf; expected a finite number"),
    (lambda c: {**c, "target_modules": 5}, r"field 'target_modules' is 5"),
    (lambda c: {**c, "peft_type": "IA3"}, r"field 'peft_type' is 'IA3'; expected 'LORA'"),
    (lambda c: {**c, "use_dora": True}, r"field 'use_dora' is True; qlora-jax implements plain LoRA only"),
    (lambda c: {**c, "modules_to_save": ["lm_head"]}, r"field 'modules_to_save' is \['lm_head'\]"),
    (lambda c: {**c, "rank_pattern": {"q_proj": 8}}, r"field 'rank_pattern'"),
    (lambda c: {**c, "bias": "all"}, r"field 'bias' is 'all'"),
    (lambda c: {**c, "target_modules": r"model\.layers\.0\..*"}, r"selects some layers only"),
])
def test_bad_adapter_config_names_the_file_and_field(tmp_path, rng, edit, match):
    config, lora, lora_config = random_adapter(rng)
    path = save_peft_adapter(tmp_path / "a", lora, lora_config, config)
    value = edit(json.loads((path / "adapter_config.json").read_text()))
    (path / "adapter_config.json").write_text(value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(CheckpointError, match=match) as error:
        load_peft_adapter(path, config)
    assert "adapter_config.json" in str(error.value)


def tiny_tokenizer_folder(path: pathlib.Path, **config) -> pathlib.Path:
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "probe", "question", "answer", "4711", "1147",
             "hi", "hello"]
    tokenizer = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in words[1:3]])
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                            "chat_template": CHAT_TEMPLATES["chatml"], **config}))
    return path


@pytest.mark.parametrize("config, match", [
    ({"eos_token": "</s>"}, r"tokenizer_config\.json: field 'eos_token' names '</s>', which is not in the tokenizer's"),
    ({"pad_token": 3}, r"tokenizer_config\.json: field 'pad_token' is 3; expected a token string"),
    ({"add_bos_token": "yes"}, r"tokenizer_config\.json: field 'add_bos_token' is 'yes'; expected true or false"),
    ({"chat_template": 7}, r"tokenizer_config\.json: field 'chat_template' is 7; expected a Jinja string"),
    ({"chat_template": [{"name": "default"}]}, r"field 'chat_template' must be a string or a non-empty list"),
])
def test_bad_tokenizer_config_names_the_file_and_field(tmp_path, config, match):
    with pytest.raises(CheckpointError, match=match):
        Tokenizer.from_folder(tiny_tokenizer_folder(tmp_path, **config))


def test_unreadable_tokenizer_files_are_named(tmp_path):
    path = tiny_tokenizer_folder(tmp_path)
    (path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_folder(path)
    path = tiny_tokenizer_folder(tmp_path / "b")
    (path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a valid Hugging Face tokenizers file"):
        Tokenizer.from_folder(path)


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{{ m['content'] }", r"chat template .*\(passed as template= / --chat_template\): the "
                                                  r"chat template is not valid Jinja \(line 1"),
    ("{{ undefined_function() }}", r"fails to render a plain user/assistant exchange: UndefinedError"),
    ("{{ messages[0]['content'] + 1 }}", r"fails to render a plain user/assistant exchange: TypeError"),
    ("chatm1", r"'chatm1' \(passed as .*does not write the messages' contents.*built-in name \(chatml, llama2"),
])
def test_bogus_chat_template_is_blamed_on_the_template(tmp_path, template, match):
    from qlora_jax.data import tokenize_examples

    tokenizer = Tokenizer.from_folder(tiny_tokenizer_folder(tmp_path))
    example = make_example([("user", "hi"), ("assistant", "hello")], "data.jsonl:1")
    with pytest.raises(ChatTemplateError, match=match) as error:
        tokenize_examples([example], tokenizer, template=template)
    assert "data.jsonl" not in str(error.value)  # not blamed on the conversation
    with pytest.raises(ChatTemplateError, match=match):
        tokenizer.apply_chat_template(example.messages, template=template)


def test_bogus_template_in_tokenizer_config_names_that_file(tmp_path):
    tokenizer = Tokenizer.from_folder(tiny_tokenizer_folder(tmp_path, chat_template="{% if %}"))
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json: chat_template: the chat template is not "
                                                "valid Jinja"):
        tokenizer.resolve_template()


# ------------------------------------------------------------------------ class 7: data hygiene


def conversation(i: int, answer: str | None = None):
    return make_example([("user", f"question {i}"), ("assistant", f"answer {i}" if answer is None else answer)],
                        f"rows.jsonl:{i}")


def test_duplicates_and_empty_responses_are_dropped_and_counted(caplog):
    rows = [conversation(0), conversation(1), conversation(0), conversation(2, ""), conversation(3, " \n "),
            make_example([("user", "a"), ("assistant", ""), ("user", "b"), ("assistant", "c")], "x"),
            conversation(1), conversation(4)]
    with caplog.at_level(logging.WARNING, logger="qlora_jax.data.split"):
        kept, report = clean_examples(rows)
    assert [e.origin for e in kept] == ["rows.jsonl:0", "rows.jsonl:1", "x", "rows.jsonl:4"]  # first copies, in order
    assert (report.total, report.kept, report.duplicates, report.empty_responses, report.partly_empty) == (8, 4, 2, 2,
                                                                                                          1)
    assert "dropped 2 exact duplicates and 2 with only empty responses" in caplog.text


def test_no_duplicate_straddles_the_split(rng):
    distinct = [conversation(i) for i in range(60)]
    rows = [distinct[int(i)] for i in rng.integers(0, 60, size=400)]  # heavy repetition, as in chatterbot-corpus
    seed = int(rng.integers(1 << 30))
    train, held_out, cleaning = train_eval_split(rows, 10, seed)
    key = lambda e: tuple((m["role"], m["content"]) for m in e.messages)  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in held_out}
    assert len(held_out) == 10 and len(train) + len(held_out) == cleaning.kept == len({key(e) for e in rows})
    assert cleaning.duplicates == 400 - cleaning.kept
    again = train_eval_split(rows, 10, seed)  # deterministic
    assert [e.origin for e in again.eval] == [e.origin for e in held_out]


def test_embedded_chatterbot_corpus_is_mostly_duplicates():
    from qlora_jax.data import load_examples

    _, _, cleaning = train_eval_split(load_examples("chatterbot"), 96, 0)
    # Measured on the corpus as packaged: tech_support.yml repeats ten exchanges about a hundred times each.
    assert cleaning.total == 2025 and cleaning.kept == 898 and cleaning.empty_responses == 0


# ------------------------------------------------------------------------ class 9: what a merged export keeps

MERGE_CONFIG = LlamaConfig.from_hf_dict({**CONFIG, "tie_word_embeddings": True})  # as random_quantized_base


def decode_bnb(tensors: dict[str, np.ndarray], key: str) -> np.ndarray:
    """float64 values of a bitsandbytes NF4 + double-quant weight, decoded with numpy from its bytes."""
    meta = json.loads(bytes(tensors[f"{key}.quant_state.bitsandbytes__nf4"]))
    numel = int(np.prod(meta["shape"]))
    packed = tensors[key].reshape(-1)
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:numel]
    blocks = -(-numel // meta["blocksize"])
    nested = np.repeat(tensors[f"{key}.nested_absmax"].astype(np.float64), meta["nested_blocksize"])[:blocks]
    absmax = DYNAMIC_MAP_SIGNED.astype(np.float64)[tensors[f"{key}.absmax"]] * nested + meta["nested_offset"]
    values = NF4_CODE.astype(np.float64)[codes] * np.repeat(absmax, meta["blocksize"])[:numel]
    return values.reshape(meta["shape"])


def decode_ours(qt) -> np.ndarray:
    return decode_bnb(bnb_format.to_bnb_state_dict(jax.device_get(qt), "w"), "w")


def reference_kept(base, lora, lora_config, merged_dir, plain_dir):
    """Per-layer (kept_fraction, kept_norm_ratio, error_ratio) from the written bytes, in float64."""
    merged, plain = load_file(merged_dir / "model.safetensors"), load_file(plain_dir / "model.safetensors")
    rows, sums = [], np.zeros(4)
    for layer in range(MERGE_CONFIG.num_hidden_layers):
        for name, params in layout.linear_entries(base).items():
            pair = lora["layers"][layout.module_group(name)][name]
            w = decode_ours(jax.tree.map(lambda x: x[layer], params["weight"]))  # noqa: B023
            delta = lora_config.scaling * (np.asarray(pair["lora_B"][layer], np.float64)
                                           @ np.asarray(pair["lora_A"][layer], np.float64))
            key = layout.hf_key(layer, name)
            effect = decode_bnb(merged, key) - decode_bnb(plain, key)
            error = decode_bnb(merged, key) - (w + delta)
            s = np.array([np.vdot(delta, delta), np.vdot(effect, delta), np.vdot(effect, effect),
                          np.vdot(error, error)])
            sums += s
            rows.append((s[1] / s[0], math.sqrt(s[2] / s[0]), math.sqrt(s[3] / s[0])))
    overall = (sums[1] / sums[0], math.sqrt(sums[2] / sums[0]), math.sqrt(sums[3] / sums[0]))
    return rows, overall


@pytest.fixture(scope="module")
def merge_base(module_rng):
    return random_quantized_base(MERGE_CONFIG, module_rng)


@pytest.mark.parametrize("size, lost", [(1e-4, True), (0.3, False)])
def test_merged_4bit_export_reports_what_survives(tmp_path, rng, merge_base, caplog, size, lost):
    _, lora, lora_config = random_adapter(rng, targets=layout.LINEAR_LAYERS, size=size)
    zero = jax.tree.map(jnp.zeros_like, lora)  # R(W): the base alone, through the same export
    plain = export_merged(tmp_path / "plain", MERGE_CONFIG, merge_base, zero, lora_config, quantize_to="nf4")
    assert plain.kept_fraction is None and not plain.lossy and plain.layers == ()
    if lost:
        with pytest.raises(LossyMergeError, match=r"(?s)apply .*% of the adapter's update.*quantize_to=None .*"
                                                  r"save_peft_adapter.*allow_lossy=True"):
            export_merged(tmp_path / "refused", MERGE_CONFIG, merge_base, lora, lora_config, quantize_to="nf4")
        assert not (tmp_path / "refused").exists()  # refused before writing anything
    with caplog.at_level(logging.WARNING, logger="qlora_jax.merge"):
        report = export_merged(tmp_path / "merged", MERGE_CONFIG, merge_base, lora, lora_config, quantize_to="nf4",
                               allow_lossy=True)
    assert report.lossy is lost and ("loses most of the finetune" in caplog.text) is lost
    rows, overall = reference_kept(merge_base, lora, lora_config, tmp_path / "merged", tmp_path / "plain")
    got = [(s.kept_fraction, s.kept_norm_ratio, s.error_ratio) for s in report.layers]
    np.testing.assert_allclose(got, rows, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose((report.kept_fraction, report.kept_norm_ratio, report.error_ratio), overall,
                               rtol=1e-3, atol=1e-3)
    if lost:
        assert overall[0] < 0.1 and overall[2] > 1  # nearly nothing kept, the error is larger than the update
    else:
        assert overall[0] > 0.9 and overall[2] < 0.5


def test_merged_export_measures_held_out_losses(tmp_path, rng, merge_base):
    _, lora, lora_config = random_adapter(rng, targets=layout.LINEAR_LAYERS, size=0.3)
    unmerged, plain = (ModelSpec(MERGE_CONFIG, c, compute_dtype="float32") for c in (lora_config, None))
    logits = jax.jit(lambda spec, base, lora, ids: llama.forward(spec, base, lora, ids)[0], static_argnums=0)
    # Held-out text the adapted model likes: its own greedy continuation of random prompts.
    ids = rng.integers(0, 64, size=(2, 16)).astype(np.int32)
    for t in range(4, 16):
        ids[:, t] = np.argmax(np.asarray(logits(unmerged, merge_base, lora, jnp.asarray(ids)))[:, t - 1], -1)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "loss_mask": np.repeat((np.arange(16) >= 5)[None], 2, 0).astype(np.int32)}
    # allow_lossy: whether this draw's NF4 merge keeps the improvement is checked below, not assumed.
    report = export_merged(tmp_path / "m", MERGE_CONFIG, merge_base, lora, lora_config, quantize_to="nf4",
                           eval_batches=[batch], allow_lossy=True)

    def reference_loss(spec, base, lora):
        z = np.asarray(logits(spec, base, lora, jnp.asarray(ids)), np.float64)[:, :-1]
        logz = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        nll = logz - np.take_along_axis(z, ids[:, 1:, None], -1)[..., 0]
        weights = batch["loss_mask"][:, 1:]
        return float((nll * weights).sum() / weights.sum())

    source, cfg = open_checkpoint(tmp_path / "m")  # the exported folder as it loads
    reloaded, _ = load_base_params(source, read_config(cfg), QuantConfig(quant="nf4", dtype="bfloat16"))
    expected = (reference_loss(plain, merge_base, None), reference_loss(unmerged, merge_base, lora),
                reference_loss(plain, reloaded, None))
    np.testing.assert_allclose((report.base_loss, report.unmerged_loss, report.merged_loss), expected, rtol=1e-5)
    assert report.unmerged_loss < report.base_loss
    kept = (expected[0] - expected[2]) / (expected[0] - expected[1])
    assert report.loss_improvement_kept == pytest.approx(kept, rel=1e-3)
    assert report.lossy == (kept < 0.5)  # export_merged's default min_kept_fraction
    assert "held-out loss: base" in report.summary()


def test_merged_export_refuses_non_finite_weights(tmp_path, rng, merge_base):
    _, lora, lora_config = random_adapter(rng, targets=layout.LINEAR_LAYERS)
    lora["layers"]["self_attn"]["k_proj"]["lora_B"] = lora["layers"]["self_attn"]["k_proj"]["lora_B"].at[1, 0, 0].set(
        jnp.nan)
    with pytest.raises(ValueError, match=r"merged weight 'model\.layers\.1\.self_attn\.k_proj\.weight' holds NaN"):
        export_merged(tmp_path / "nan", MERGE_CONFIG, merge_base, lora, lora_config, quantize_to="nf4",
                      allow_lossy=True)
    assert not (tmp_path / "nan").exists()


# ------------------------------------------------------------------------ class 10: bnb-CPU bytes from the loader


def test_load_pretrained_bnb_backend_cpu_reproduces_bitsandbytes_cpu(tmp_path, oracle, rng):
    """SmolLM2-sized 576 x 576 layers (5184 scales each), quantized by bitsandbytes' CPU backend."""
    cfg = {**CONFIG, "vocab_size": 8, "hidden_size": 576, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}
    tensors = random_tensors(rng, cfg)
    names = ("q_proj", "o_proj")
    for name in names:  # heavy-tailed rows, like trained weights
        tensors[layout.hf_key(0, name)] *= np.exp(rng.normal(0, 0.5, (576, 1))).astype(np.float32)
    model, _ = load_pretrained(write_folder(tmp_path / "m", cfg, tensors),
                               QuantConfig("nf4", dtype="float32", bnb_backend="cpu"), lora=None)
    out = oracle.run("bnb_quant.py", {f"{n}/w": tensors[layout.hf_key(0, n)] for n in names}, {"cases": [
        {"name": n, "op": "quantize_4bit", "blocksize": 64, "double_quant": True, "quant_type": "nf4"} for n in names]})
    cuda_differs = 0
    for name in names:
        qt = jax.tree.map(lambda x: x[0], model.base_params["layers"]["self_attn"][name]["weight"])
        np.testing.assert_array_equal(np.asarray(qt.codes).reshape(-1), out[f"{name}/packed"].reshape(-1))
        np.testing.assert_array_equal(np.asarray(qt.scales).reshape(-1), out[f"{name}/absmax"], err_msg=name)
        np.testing.assert_allclose(np.asarray(qt.nested_scales), out[f"{name}/nested_absmax"], rtol=1e-6)
        assert abs(int(np.asarray(qt.offset).view(np.int32)) - int(out[f"{name}/offset"].view(np.int32))) <= 2
        cuda = quantize(tensors[layout.hf_key(0, name)], "nf4", bnb_backend="cuda")  # the loader's default
        ours_cuda, theirs_cpu = np.asarray(cuda.scales).reshape(-1).astype(int), out[f"{name}/absmax"].astype(int)
        cuda_differs += int((ours_cuda != theirs_cpu).sum())
        # Where the two backends disagree, it is a rounding tie broken the other way: one code apart.
        assert np.abs(ours_cuda - theirs_cpu).max() <= 1, name
    # bitsandbytes' CUDA kernels round a few scale codes the other way (14 of 5184 on SmolLM2's first
    # q_proj), which is why the loader's bnb_backend matters.
    assert cuda_differs > 0
    with pytest.raises(ValueError, match="unsupported bnb_backend 'tpu'"):
        QuantConfig(bnb_backend="tpu")


def test_load_pretrained_quant_is_a_config_or_a_mode_name(good):
    # "fp4" is shorthand for QuantConfig("fp4") with every other setting at its default: the same
    # bytes; anything else fails before a tensor is read, naming what it accepts.
    folder, _ = good
    by_name, _ = load_pretrained(folder, "fp4", lora=None)
    by_config, _ = load_pretrained(folder, QuantConfig("fp4", double_quant=True, blocksize=64, dtype="bfloat16",
                                                       bnb_backend="cuda"), lora=None)
    assert jax.tree.structure(by_name.base_params) == jax.tree.structure(by_config.base_params)
    for a, b in zip(jax.tree.leaves(by_name.base_params), jax.tree.leaves(by_config.base_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"unsupported quant 'nf5': expected one of \('nf4', 'fp4', 'int8'"):
        load_pretrained(folder, "nf5")
    with pytest.raises(TypeError, match="quant must be a QuantConfig or one of"):
        load_pretrained(folder, 4)
