"""The data-type comparison of the QLoRA paper, on synthetic and real weights and on perplexity.

Used by ``python -m experiments.datatypes``; every function returns plain data so the numbers
can also be checked in tests.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import QuantConfig, dequantize, quantize
from qlora_jax.quant.report import storage_report

__all__ = [
    "DATA_TYPES",
    "ErrorRow",
    "error_table",
    "format_error_table",
    "nf4_vs_fp4_verdict",
    "plot_error_histograms",
    "model_linear_weights",
    "perplexity_table",
    "format_perplexity_table",
    "slug",
]

# label -> (quant_type, double_quant)
DATA_TYPES = {
    "NF4": ("nf4", False),
    "NF4+DQ": ("nf4", True),
    "FP4": ("fp4", False),
    "FP4+DQ": ("fp4", True),
    "Int8": ("int8", False),
}


@dataclasses.dataclass(frozen=True)
class ErrorRow:
    label: str
    mse: float
    relative_mse: float  # MSE / mean square of the weights
    bits_per_param: float


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]


def _errors(w: np.ndarray, quant_type: str, double_quant: bool, blocksize: int):
    qt = quantize(w, quant_type, blocksize=blocksize, double_quant=double_quant)
    err = np.asarray(dequantize(qt, jnp.float32)) - np.asarray(w, np.float32)
    return err, storage_report(qt)


def error_table(tensors: Mapping[str, np.ndarray], blocksize: int = 64) -> list[ErrorRow]:
    """MSE and bits/param of each data type over all ``tensors`` (element-weighted)."""
    rows = []
    total_sq = sum(float(np.sum(np.square(w, dtype=np.float64))) for w in tensors.values())
    numel = sum(w.size for w in tensors.values())
    for label, (quant_type, double_quant) in DATA_TYPES.items():
        sq, report = 0.0, None
        for w in tensors.values():
            err, rep = _errors(w, quant_type, double_quant, blocksize)
            sq += float(np.sum(np.square(err, dtype=np.float64)))
            report = rep if report is None else report + rep
        rows.append(ErrorRow(label, sq / numel, sq / total_sq, report.bits_per_param))
    return rows


def format_error_table(rows: list[ErrorRow]) -> str:
    lines = [f"{'data type':<10} {'MSE':>12} {'MSE / E[w^2]':>13} {'bits/param':>11}"]
    for r in rows:
        lines.append(f"{r.label:<10} {r.mse:>12.4e} {r.relative_mse:>13.5f} {r.bits_per_param:>11.3f}")
    return "\n".join(lines)


def nf4_vs_fp4_verdict(rows: list[ErrorRow]) -> str:
    by = {r.label: r for r in rows}
    nf4, fp4 = by["NF4"].mse, by["FP4"].mse
    verdict = "yes" if nf4 < fp4 else "NO"
    return f"NF4 error below FP4's (the paper's finding): {verdict} (NF4/FP4 MSE ratio {nf4 / fp4:.3f})"


def plot_error_histograms(tensors: Mapping[str, np.ndarray], blocksize: int, path: pathlib.Path, title: str) -> None:
    """Histogram of quantization errors per data type (log counts), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sample = {k: v for k, v in list(tensors.items())[:8]}
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, (quant_type, double_quant) in DATA_TYPES.items():
        errs = np.concatenate([_errors(w, quant_type, double_quant, blocksize)[0].reshape(-1) for w in sample.values()])
        scale = np.sqrt(np.mean(np.concatenate([np.square(w.reshape(-1)) for w in sample.values()])))
        ax.hist(errs / scale, bins=201, histtype="step", log=True, label=label)
    ax.set_xlabel("quantization error / RMS(weight)")
    ax.set_ylabel("count")
    ax.set_title(f"{title}, block {blocksize}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_linear_weights(model: str, max_tensors: int = 0) -> tuple[str, dict[str, np.ndarray]]:
    """The linear-layer weights (float32) of a checkpoint ("embedded" for SmolLM2-135M)."""
    from qlora_jax import assets
    from qlora_jax.checkpoints.load import open_checkpoint, read_config
    from qlora_jax.models import layout

    path = assets.embedded_model_path() if model == "embedded" else pathlib.Path(model)
    source, cfg = open_checkpoint(path)
    config = read_config(cfg)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name in layout.linear_layers(config):
            key = layout.hf_key(layer, name)
            tensors[key] = np.asarray(source.get(key), np.float32)
            if max_tensors and len(tensors) >= max_tensors:
                return path.name, tensors
    return path.name, tensors


def _heldout_conversations(tokenizer, count: int, max_tokens: int) -> list[list[int]]:
    """The last ``count`` multi-turn chitchat conversations, chat-formatted and tokenized."""
    from qlora_jax import assets

    data = json.loads(assets.chitchat_dataset_file().read_text())
    out = []
    for key in sorted(data)[::-1]:
        turns = data[key]["messages"]
        if len(turns) < 2:
            continue
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(m["text"] for m in turn)}
            for i, turn in enumerate(turns)
        ]
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages))[:max_tokens]
        out.append(ids)
        if len(out) == count:
            break
    return out


def perplexity_table(model: str, conversations: int = 64, max_tokens: int = 256, batch: int = 8) -> dict[str, float]:
    """Held-out perplexity (chitchat, all tokens) of ``model`` with each data type as its base."""
    from qlora_jax.model import load_pretrained
    from qlora_jax.models.spec import ModelSpec
    from qlora_jax.train import loss_and_count

    results: dict[str, float] = {}
    for label, (quant, double_quant) in {"bf16": ("bf16", False), **DATA_TYPES}.items():
        lm, tokenizer = load_pretrained(model, QuantConfig(quant, double_quant=double_quant), lora=None)
        sequences = _heldout_conversations(tokenizer, conversations, max_tokens)
        spec = ModelSpec(lm.config, None, compute_dtype="bfloat16")
        step = jax.jit(lambda frozen, b, spec=spec: loss_and_count(spec, None, frozen, b, None))
        total, count = 0.0, 0.0
        for start in range(0, len(sequences), batch):
            chunk = sequences[start:start + batch]
            ids = np.full((len(chunk), max_tokens), tokenizer.pad_id, np.int32)
            mask = np.zeros_like(ids)
            for i, seq in enumerate(chunk):
                ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
            b = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(mask)}
            loss_sum, n = step(lm.base_params, b)
            total, count = total + float(loss_sum), count + float(n)
        results[label] = float(np.exp(total / count))
    return results


def format_perplexity_table(table: dict[str, float]) -> str:
    lines = [f"{'base':<10} {'perplexity':>11}"]
    lines += [f"{label:<10} {ppl:>11.3f}" for label, ppl in table.items()]
    return "\n".join(lines)
