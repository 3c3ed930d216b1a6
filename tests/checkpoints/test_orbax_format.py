"""The quantized-model Orbax checkpoint: byte-exact round trips, a reader without qlora_jax, NNX
restores (one device and 8, sharded), the run's base cache with no quantizer call, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from safetensors.numpy import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from qlora_jax.checkpoints import base_cache, orbax_format
from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.orbax_format import (
    is_quantized_checkpoint,
    load_quantized,
    restore_model,
    save_quantized,
)
from qlora_jax.distributed import make_mesh
from qlora_jax.lora import LoraConfig
from qlora_jax.model import CausalLM, abstract_model, init_lora_params, load_pretrained, load_pretrained_cached
from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.spec import ModelSpec
from qlora_jax.peft_io import save_peft_adapter
from qlora_jax.quant import QuantConfig, QuantizedTensor, codebooks, dequantize
from qlora_jax.quant.tensor import codes_shape, nested_scales_shape, scales_shape
from qlora_jax.synthetic import random_base
from qlora_jax.tokenizer import CHAT_TEMPLATES, Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]
READER = REPO / "docs" / "examples" / "dequantize_with_numpy.py"


def tiny_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, eos_token_id=2)
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_tokenizer() -> Tokenizer:
    """A word-level tokenizer with ChatML's special tokens and template (cheap to build)."""
    words = "hello there what is the capital of france ? user assistant".split()
    hf = HFTokenizer(WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<unk>"))
    hf.pre_tokenizer = Whitespace()
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(hf, eos_token="<|im_end|>", chat_template=CHAT_TEMPLATES["chatml"])


def random_quantized(rng: np.random.Generator, layers: int, shape: tuple[int, int], quant: str, double_quant: bool,
                     blocksize: int) -> QuantizedTensor:
    """A layer-stacked QuantizedTensor of random bytes (any bytes are a valid stored tensor): codes
    over their whole range, positive float32 scales; made on the host, so nothing compiles."""
    def ints(shape, dtype):
        info = np.iinfo(dtype)
        return jnp.asarray(rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype))

    def positive(shape):
        return jnp.asarray(rng.uniform(0.01, 0.05, shape).astype(np.float32))

    lead = (layers,)
    codes = ints(lead + codes_shape(shape, quant), np.int8 if quant == "int8" else np.uint8)
    scales = lead + scales_shape(shape, blocksize)
    if not double_quant:
        return QuantizedTensor(codes, positive(scales), None, None, shape, "bfloat16", quant, blocksize)
    nested = lead + nested_scales_shape(-(-shape[0] * shape[1] // blocksize), 256)
    return QuantizedTensor(codes, ints(scales, np.uint8), positive(nested), positive(lead), shape, "bfloat16", quant,
                           blocksize)


def random_stored_base(rng, config, quant="nf4", double_quant=True, blocksize=64) -> dict:
    """A ``base`` pytree for ``config``: random linear weights stored as asked (or bf16), bf16 rest."""
    layers, d = config.num_hidden_layers, config.hidden_size

    def dense(shape):
        return jnp.asarray(rng.normal(0, 0.02, shape), jnp.bfloat16)

    linears = {}
    for name, shape in config.linear_shapes().items():
        if quant == "bf16":
            weight = dense((layers, *shape))
        else:
            weight = random_quantized(rng, layers, shape, quant, double_quant, blocksize)
        linears[name] = {"weight": weight}
        if config.linear_has_bias(name):
            linears[name]["bias"] = dense((layers, shape[0]))
    return layout.assemble_base(embed_tokens=dense((config.vocab_size, d)), norm=dense((d,)), linears=linears,
                                lm_head=None if config.tie_word_embeddings else dense((config.vocab_size, d)),
                                layer_norms={n: dense((layers, d)) for n in layout.LAYER_NORMS})


def tiny_model(rng, config, quant="nf4", double_quant=True, blocksize=64, lora=True) -> CausalLM:
    """A CausalLM with a random base stored as asked and random (non-zero) float32 adapters."""
    spec = ModelSpec(config, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
                     if lora else None, compute_dtype="float32")
    adapters = None
    if lora:
        shapes, layers = config.linear_shapes(), config.num_hidden_layers
        adapters = {"layers": {}}
        for name in spec.lora_targets:
            out_features, in_features = shapes[name]
            adapters["layers"].setdefault(layout.module_group(name), {})[name] = {
                "lora_A": jnp.asarray(rng.normal(size=(layers, 4, in_features)), jnp.float32),
                "lora_B": jnp.asarray(rng.normal(size=(layers, out_features, 4)), jnp.float32)}
    return CausalLM(spec, random_stored_base(rng, config, quant, double_quant, blocksize), adapters)


def leaves_with_paths(tree) -> dict[str, tuple]:
    """Every array of a pytree (QuantizedTensors opened up) as (dtype, shape, bytes), by path."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): (np.dtype(x.dtype), x.shape, np.asarray(x).tobytes()) for p, x in flat}


def assert_identical(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)  # includes every QuantizedTensor's metadata
    left, right = leaves_with_paths(a), leaves_with_paths(b)
    assert left.keys() == right.keys()
    for path in left:
        assert left[path] == right[path], path


ROUND_TRIPS = {
    "nf4_dq_tied_adapters": dict(quant="nf4", double_quant=True, config=dict(tie_word_embeddings=True), lora=True),
    "fp4_untied": dict(quant="fp4", double_quant=False, config=dict(tie_word_embeddings=False), lora=False),
    "int8_untied_adapters_qwen2_bias": dict(quant="int8", double_quant=False, lora=True,
                                            config=dict(tie_word_embeddings=False, model_type="qwen2",
                                                        attention_bias=True)),
    "bf16_tied": dict(quant="bf16", double_quant=False, config=dict(tie_word_embeddings=True), lora=False),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_is_byte_identical(case, rng, tmp_path):
    settings = ROUND_TRIPS[case]
    config = tiny_config(**settings["config"])
    model = tiny_model(rng, config, settings["quant"], settings["double_quant"], lora=settings["lora"])
    path = save_quantized(tmp_path / "ckpt", model, source="test")
    assert is_quantized_checkpoint(path)
    loaded = load_quantized(path)
    assert loaded.config == config
    assert_identical(loaded.base, model.base_params)
    if settings["lora"]:
        assert_identical(loaded.lora, model.lora_params)
        assert loaded.lora_config.r == 4 and loaded.lora_config.alpha == 8
        assert layout.lora_targets(loaded.lora_config, config) == model.spec.lora_targets
    else:
        assert loaded.lora is None and loaded.lora_config is None
    assert loaded.load_stats.requantized == 0
    quantized = settings["quant"] != "bf16"
    assert loaded.load_stats.prequantized == (7 * config.num_hidden_layers if quantized else 0)


def test_tokenizer_and_load_pretrained_dispatch(rng, tmp_path):
    config = tiny_config()
    model = tiny_model(rng, config)
    tokenizer = tiny_tokenizer()
    path = save_quantized(tmp_path / "ckpt", model, tokenizer=tokenizer)
    again, tokenizer_again = load_pretrained(path, compute_dtype="float32")
    assert_identical(again.base_params, model.base_params)
    assert_identical(again.lora_params, model.lora_params)  # the saved adapters, not fresh ones
    text = tokenizer.apply_chat_template([{"role": "user", "content": "what is the capital of france ?"}],
                                         add_generation_prompt=True)
    assert tokenizer_again.encode(text) == tokenizer.encode(text) and len(set(tokenizer.encode(text))) > 5
    assert (tokenizer_again.chat_template, tokenizer_again.eos_token, tokenizer_again.pad_token) == \
        (tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token)
    fresh, _ = load_pretrained(path, lora=None, compute_dtype="float32")
    assert fresh.lora_params is None
    with pytest.raises(CheckpointError, match=r"quant='nf4' \(asked: 'fp4'\).*never re-quantized"):
        load_pretrained(path, quant="fp4")
    with pytest.raises(CheckpointError, match=r"blocksize=64 \(asked: 128\)"):
        load_pretrained(path, QuantConfig(blocksize=128))


def mixed_base(rng, config) -> dict:
    """One base whose linear layers use every storage the format has: NF4/FP4/Int8, with and without
    double quantization, per-row scales (block 64) and flat scales (block 128 > the row of 64)."""
    kinds = {"q_proj": ("nf4", True, 64), "k_proj": ("fp4", False, 64), "v_proj": ("int8", True, 64),
             "o_proj": ("fp4", True, 128), "gate_proj": ("nf4", False, 128), "up_proj": ("int8", False, 64),
             "down_proj": ("nf4", True, 64)}
    linears = {}
    for name, (quant, dq, blocksize) in kinds.items():
        linears[name] = layout.linear_entries(random_stored_base(rng, config, quant, dq, blocksize))[name]
    base = random_stored_base(rng, config)
    norms = {n: base["layers"][n] for n in layout.LAYER_NORMS}
    return layout.assemble_base(embed_tokens=base["embed_tokens"], norm=base["norm"], linears=linears,
                                lm_head=base.get("lm_head"), layer_norms=norms)


READER_RUN = textwrap.dedent("""
    import runpy, sys
    sys.argv = [sys.argv[1], sys.argv[2], sys.argv[3]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    loaded = sorted(m for m in sys.modules if m == "qlora_jax" or m.startswith("qlora_jax."))
    assert not loaded, loaded
    print("no qlora_jax module was imported")
""")


def reference_float64(qt: QuantizedTensor) -> np.ndarray:
    """float64 dequantization of one layer's tensor from the codebooks (an independent reference)."""
    n = int(np.prod(qt.shape))
    blocks = -(-n // qt.blocksize)
    scales = np.asarray(qt.scales, np.float64).reshape(-1) if not qt.double_quant else None
    if qt.double_quant:
        dynamic = codebooks.DYNAMIC_MAP_SIGNED.astype(np.float64)[np.asarray(qt.scales).reshape(-1)]
        nested = np.repeat(np.asarray(qt.nested_scales, np.float64), qt.nested_blocksize)[:blocks]
        scales = dynamic * nested + float(qt.offset)
    if qt.quant_type == "int8":
        values = np.asarray(qt.codes, np.float64).reshape(-1) / 127.0
    else:
        packed = np.asarray(qt.codes).reshape(-1)
        codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:n]
        values = codebooks.codebook(qt.quant_type).astype(np.float64)[codes]
    return (values * np.repeat(scales, qt.blocksize)[:n]).reshape(qt.shape)


def test_plain_orbax_and_numpy_rebuild_the_weights_without_qlora_jax(rng, tmp_path):
    config = tiny_config()
    base = mixed_base(rng, config)
    path = save_quantized(tmp_path / "ckpt", base, config=config)
    out = tmp_path / "dequantized.npz"
    proc = subprocess.run([sys.executable, "-c", READER_RUN, str(READER), str(path), str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": "", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "no qlora_jax module was imported" in proc.stdout
    with np.load(out) as rebuilt:
        rebuilt = {k: rebuilt[k] for k in rebuilt.files}
    assert len(rebuilt) == 7 * config.num_hidden_layers
    ours = jax.jit(lambda qt: dequantize(qt, jnp.float32))  # one compilation per storage kind
    for name, entry in layout.linear_entries(base).items():
        w = entry["weight"]
        for layer in range(config.num_hidden_layers):
            qt = jax.tree.map(lambda x, i=layer: x[i], w)
            theirs = rebuilt[f"layers/{layout.module_group(name)}/{name}/weight/{layer}"]
            assert theirs.dtype == np.float32 and theirs.shape == w.shape
            np.testing.assert_array_equal(theirs, np.asarray(ours(qt)), err_msg=name)
            reference = reference_float64(qt)
            np.testing.assert_allclose(theirs, reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max(), err_msg=name)


def test_nnx_eval_shape_then_plain_orbax_restore(rng, tmp_path):
    """Flax's documented route, with nothing from qlora_jax but the model class: eval_shape, split,
    restore each variable's value from the item of its name, merge."""
    config = tiny_config()
    model = tiny_model(rng, config)
    path = save_quantized(tmp_path / "ckpt", model)
    spec = model.spec
    abstract = nnx.eval_shape(lambda: CausalLM(spec, random_base(config, jax.random.key(0)),
                                               init_lora_params(jax.random.key(1), spec)))
    graphdef, state = nnx.split(abstract)
    device = SingleDeviceSharding(jax.devices()[0])
    targets = {name: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                  state[name].get_value()) for name in ("base", "lora")}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(path, ocp.args.Composite(
            **{name: ocp.args.StandardRestore(target) for name, target in targets.items()}))
    for name in ("base", "lora"):
        state[name].set_value(restored[name])
    again = nnx.merge(graphdef, state)
    assert_identical(again.base_params, model.base_params)
    assert_identical(again.lora_params, model.lora_params)
    # The library's helper is the same route, with its checks.
    assert_identical(restore_model(path, abstract_model(spec)).base_params, model.base_params)


def test_sharded_restore_reads_each_shard_into_the_target_sharding(rng, tmp_path):
    config = tiny_config(intermediate_size=2048)  # up_proj: 256 rows of 1 scale a shard, one nested block
    model = tiny_model(rng, config)
    # Weights quantized from float32 (as GGUF's): the target's original dtype (bf16) yields to the checkpoint's.
    is_quantized = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
    base = jax.tree.map(lambda x: dataclasses.replace(x, dtype="float32") if is_quantized(x) else x,
                        model.base_params, is_leaf=is_quantized)
    model = CausalLM(model.spec, base, model.lora_params)
    path = save_quantized(tmp_path / "ckpt", model)
    mesh = make_mesh("fsdp=8")
    abstract = abstract_model(model.spec, QuantConfig(), mesh=mesh)
    targets = {name: jax.tree.leaves(getattr(abstract, name).get_value()) for name in ("base", "lora")}
    restored = restore_model(path, abstract)
    for name, saved in (("base", model.base_params), ("lora", model.lora_params)):
        got = jax.tree.leaves(getattr(restored, name).get_value())
        for target, array, original in zip(targets[name], got, jax.tree.leaves(saved), strict=True):
            assert isinstance(target.sharding, NamedSharding)
            assert array.sharding == target.sharding
            original = np.asarray(original)
            for shard in array.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), original[shard.index])
    codes = restored.base_params["layers"]["mlp"]["up_proj"]["weight"].codes
    assert len({shard.index for shard in codes.addressable_shards}) == 8  # row-split, not replicated
    nested = restored.base_params["layers"]["mlp"]["up_proj"]["weight"].nested_scales
    assert len({shard.index for shard in nested.addressable_shards}) == 8
    assert jax.tree.structure(restored.base_params) == jax.tree.structure(model.base_params)  # dtype "float32"
    sharded = load_quantized(path, mesh=mesh)  # the same shardings without the NNX model
    assert sharded.base["layers"]["mlp"]["up_proj"]["weight"].codes.sharding == codes.sharding


# --------------------------------------------------------------------------- the run's base cache


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, module_rng) -> pathlib.Path:
    """A small random Llama as a Hugging Face folder (float32 safetensors) with the embedded tokenizer."""
    path = tmp_path_factory.mktemp("tiny_hf")
    config = tiny_config()
    (path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    d = config.hidden_size
    tensors = {"model.embed_tokens.weight": module_rng.normal(0, 0.5, (config.vocab_size, d)),
               "model.norm.weight": np.ones(d)}
    for layer in range(config.num_hidden_layers):
        for name, shape in config.linear_shapes().items():
            tensors[layout.hf_key(layer, name)] = module_rng.normal(0, shape[1] ** -0.5, shape)
        for norm in layout.LAYER_NORMS:
            tensors[layout.hf_key(layer, norm)] = np.ones(d)
    tensors["lm_head.weight"] = module_rng.normal(0, 0.5, (config.vocab_size, d))
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(path / "model.safetensors"))
    tiny_tokenizer().save(path)
    return path


def test_resume_reads_the_saved_base_without_quantizing(hf_folder, tmp_path, quantizer_calls):
    kwargs = dict(quant="nf4", lora=LoraConfig(r=4), compute_dtype="float32", seed=3)
    first, tokenizer, cached = load_pretrained_cached(tmp_path / "run", hf_folder, **kwargs)
    assert not cached and quantizer_calls["count"] > 0  # the first run quantizes (so the spy sees the quantizer)
    assert is_quantized_checkpoint(tmp_path / "run" / "base")

    quantizer_calls["forbidden"] = True
    again, tokenizer_again, cached = load_pretrained_cached(tmp_path / "run", hf_folder, **kwargs)
    assert cached
    assert_identical(again.base_params, first.base_params)
    assert_identical(again.lora_params, first.lora_params)  # fresh adapters from the same seed
    assert again.load_stats.requantized == 0
    assert tokenizer_again.encode("hello there") == tokenizer.encode("hello there") == [1, 2]

    # experiments.generate --adapter=<run dir>: the PEFT adapter over the run's saved base.
    save_peft_adapter(tmp_path / "run" / "adapter", first.lora_params, kwargs["lora"], first.config)
    adapter, saved_base = base_cache.find_run_adapter(tmp_path / "run")
    assert (adapter, saved_base) == (tmp_path / "run" / "adapter", tmp_path / "run" / "base")
    assert base_cache.find_run_adapter(adapter) == (adapter, saved_base)
    chat_model, _ = load_pretrained(saved_base, lora=None, adapter=adapter, compute_dtype="float32")
    assert_identical(chat_model.base_params, first.base_params)
    assert_identical(chat_model.lora_params, first.lora_params)

    with pytest.raises(CheckpointError, match=r"stored as .*quant='nf4' \(asked: 'fp4'\)"):
        load_pretrained_cached(tmp_path / "run", hf_folder, **{**kwargs, "quant": "fp4"})
    with pytest.raises(CheckpointError, match="saved from .*not from"):
        load_pretrained_cached(tmp_path / "run", "embedded", **kwargs)


def test_cached_base_of_another_model_config_is_refused(hf_folder, tmp_path, quantizer_calls):
    load_pretrained_cached(tmp_path / "run", hf_folder, lora=None)
    changed = json.loads((hf_folder / "config.json").read_text())
    source = tmp_path / "source"
    shutil.copytree(hf_folder, source)
    cache = base_cache.QuantizedBaseCache(tmp_path / "run")
    manifest = json.loads((cache.path / "manifest" / "metadata").read_text())
    manifest["source"] = str(source)  # the same source name, now with another config
    (cache.path / "manifest" / "metadata").write_text(json.dumps(manifest))
    (source / "config.json").write_text(json.dumps({**changed, "rms_norm_eps": 1e-3}))
    quantizer_calls["forbidden"] = True
    with pytest.raises(CheckpointError, match=r"another model config.*rms_norm_eps: saved 1e-06, expected 0.001"):
        load_pretrained_cached(tmp_path / "run", source, lora=None)
    with pytest.raises(CheckpointError, match=r"another model config.*num_hidden_layers: saved 2, expected 3"):
        load_quantized(cache.path, expected_config=tiny_config(num_hidden_layers=3))
    (cache.path / "manifest").rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="exists but is not a quantized checkpoint"):
        load_pretrained_cached(tmp_path / "run", source, lora=None)


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, module_rng) -> pathlib.Path:
    return save_quantized(tmp_path_factory.mktemp("pristine") / "ckpt", tiny_model(module_rng, tiny_config()),
                          tokenizer=tiny_tokenizer())


@pytest.fixture
def saved(pristine, tmp_path) -> pathlib.Path:
    """A copy of a good checkpoint, for a test to damage."""
    return pathlib.Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def edit_json_item(path: pathlib.Path, item: str, edit) -> None:
    file = path / item / "metadata"
    value = json.loads(file.read_text())
    edit(value)
    file.write_text(json.dumps(value))


Q = "layers/self_attn/q_proj/weight"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=2), r"manifest.format_version is 2; .* reads format version 1"),
    (lambda m: m.update(format="something-else"), r"manifest.format is 'something-else'"),
    (lambda m: m["tensors"][Q].update(blocksize=128),
     rf"array base/{Q}/scales is uint8\[2, 64, 1\] but its metadata implies uint8\[2, 32\]"),
    (lambda m: m["tensors"][Q].update(double_quant=False),
     rf"holds array\(s\) the manifest does not describe: \['base/{Q}/nested_scales', 'base/{Q}/offset'\]"),
    (lambda m: m["tensors"][Q].update(quant_type="int8"), rf"array base/{Q}/codes is uint8\[2, 64, 32\] but its "
                                                          r"metadata implies int8\[2, 64, 64\]"),
    (lambda m: m["tensors"]["embed_tokens"].update(dtype="float32"), r"base/embed_tokens is bfloat16\[96, 64\] but "
                                                                     r"its metadata implies float32"),
    (lambda m: m["tensors"][Q].update(blocksize=48), rf"manifest.tensors\['{Q}'\]: unsupported blocksize 48"),
    (lambda m: m["tensors"][Q].pop("nested_blocksize"), rf"manifest.tensors\['{Q}'\] is missing the field "
                                                        r"'nested_blocksize'"),
    (lambda m: m["tensors"].pop("norm"), r"manifest.tensors does not fit the model config .*missing tensors \['norm"),
    (lambda m: m["tensors"][Q].update(shape=[64, 128]), rf"tensor '{Q}' is \[2\] x \[64, 128\] but the model config "
                                                        r"implies \[2\] x \[64, 64\]"),
], ids=["version", "format", "blocksize", "double_quant", "quant_type", "dense_dtype", "bad_blocksize",
        "missing_field", "missing_tensor", "shape"])
def test_manifest_that_disagrees_is_refused(saved, edit, message):
    edit_json_item(saved, "manifest", edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(saved)


def test_config_that_disagrees_with_the_arrays_is_refused(saved):
    edit_json_item(saved, "config", lambda c: c.update(intermediate_size=256))
    with pytest.raises(CheckpointError, match=r"tensor 'layers/mlp/down_proj/weight' is \[2\] x \[64, 128\] but the "
                                              r"model config implies \[2\] x \[64, 256\]"):
        load_quantized(saved)
    edit_json_item(saved, "config", lambda c: c.update(hidden_layers=2))
    with pytest.raises(CheckpointError, match=r"item 'config' has unknown field\(s\) \['hidden_layers'\]"):
        load_quantized(saved)


@pytest.mark.parametrize("item", ["base", "tokenizer", "config", "lora", "manifest"])
def test_missing_item_is_named(saved, item):
    shutil.rmtree(saved / item)
    with pytest.raises(CheckpointError, match=f"missing the item '{item}'"):
        load_quantized(saved)


def test_restore_target_that_disagrees_is_refused(saved):
    spec = ModelSpec(tiny_config(), LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
                     compute_dtype="float32")
    with pytest.raises(CheckpointError, match=r"tensor base/layers/\S+ is stored otherwise .*quant_type: 'nf4' vs 'fp"):
        restore_model(saved, abstract_model(spec, QuantConfig(quant="fp4")))
    other = ModelSpec(tiny_config(num_hidden_layers=3), None, compute_dtype="float32")
    with pytest.raises(CheckpointError, match="another model config: num_hidden_layers: saved 2, expected 3"):
        restore_model(saved, abstract_model(other))


def test_interrupted_save_leaves_no_checkpoint(rng, tmp_path, monkeypatch):
    """Orbax writes into a temporary directory and renames it last: stop the save at the rename,
    where a killed process would leave everything written but uncommitted."""
    from orbax.checkpoint._src.path import atomicity

    async def killed(self):
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(tmp_path / "ckpt", tiny_model(rng, tiny_config()))
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.glob("ckpt.orbax-checkpoint-tmp*"))  # what the interrupted save left, uncommitted
    assert not is_quantized_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"no quantized checkpoint at .*ckpt \(ckpt.orbax-checkpoint-tmp\S* is "
                                              r"an unfinished save"):
        load_quantized(tmp_path / "ckpt")


def test_save_refuses_non_finite_values_and_existing_paths(rng, tmp_path):
    config = tiny_config()
    model = tiny_model(rng, config, lora=False)
    base = dict(model.base_params, embed_tokens=model.base_params["embed_tokens"].at[3, 5].set(jnp.nan))
    with pytest.raises(CheckpointError, match="refusing to save base/embed_tokens: NaN or Inf"):
        save_quantized(tmp_path / "bad", base, config=config)
    assert not (tmp_path / "bad").exists()
    save_quantized(tmp_path / "ckpt", model)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_quantized(tmp_path / "ckpt", model)
    with pytest.raises(CheckpointError, match=r"missing tensors \[\], unexpected tensors \['lm_head'\]"):
        save_quantized(tmp_path / "tied", model.base_params, config=tiny_config(tie_word_embeddings=True))


def test_orbax_format_constants_are_documented():
    doc = (REPO / "docs" / "checkpoint-format.md").read_text()
    assert f"format_version`: {orbax_format.FORMAT_VERSION}" in doc and orbax_format.FORMAT in doc
