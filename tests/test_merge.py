"""The merged export (``merge.py``): what of the adapter survives a 4-bit merge, measured from the
written bytes in float64; the held-out losses; lossy merges and non-finite weights refused.
Part of the fault campaign (``pytest -m faults``); the reload in transformers is
``models/test_models.py``.
"""

from __future__ import annotations

import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CONFIG, random_adapter, random_quantized_base
from safetensors.numpy import load_file

from qlora_jax.checkpoints.load import load_base_params, open_checkpoint, read_config
from qlora_jax.merge import LossyMergeError, export_merged
from qlora_jax.models import layout, llama
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.spec import ModelSpec
from qlora_jax.quant import QuantConfig, bnb_format
from qlora_jax.quant.codebooks import DYNAMIC_MAP_SIGNED, NF4_CODE

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


@pytest.mark.faults
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


@pytest.mark.faults
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


@pytest.mark.faults
def test_merged_export_refuses_non_finite_weights(tmp_path, rng, merge_base):
    _, lora, lora_config = random_adapter(rng, targets=layout.LINEAR_LAYERS)
    lora["layers"]["self_attn"]["k_proj"]["lora_B"] = lora["layers"]["self_attn"]["k_proj"]["lora_B"].at[1, 0, 0].set(
        jnp.nan)
    with pytest.raises(ValueError, match=r"merged weight 'model\.layers\.1\.self_attn\.k_proj\.weight' holds NaN"):
        export_merged(tmp_path / "nan", MERGE_CONFIG, merge_base, lora, lora_config, quantize_to="nf4",
                      allow_lossy=True)
    assert not (tmp_path / "nan").exists()
