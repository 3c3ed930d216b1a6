"""Helpers shared by test modules (import them from here, never from another test module)."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from qlora_jax.checkpoints.load import LayerStacker, load_base_params, open_checkpoint, read_config
from qlora_jax.lora import LoraConfig
from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig
from qlora_jax.quant import QuantConfig, quantize


def random_quantized_base(config: LlamaConfig, rng: np.random.Generator) -> dict:
    """A ``base`` pytree with random NF4+DQ linear weights (std 1/sqrt(in)) and bf16 embeddings (std 0.5)."""
    d = config.hidden_size
    stacker = LayerStacker(config.num_hidden_layers)
    for layer in range(config.num_hidden_layers):
        for norm in layout.LAYER_NORMS:
            stacker.put(norm, layer, jnp.ones(d, jnp.bfloat16))
        for name, shape in config.linear_shapes().items():
            stacker.put(name, layer, quantize((rng.normal(size=shape) * shape[1] ** -0.5).astype(np.float32)))
    return layout.assemble_base(
        embed_tokens=jnp.asarray(rng.normal(size=(config.vocab_size, d)) * 0.5, jnp.bfloat16),
        norm=jnp.ones(d, jnp.bfloat16),
        layer_norms={n: stacker.buffers[n] for n in layout.LAYER_NORMS},
        linears={n: {"weight": stacker.buffers[n]} for n in layout.LINEAR_LAYERS},
    )


# ---- small LLaMA checkpoints on disk, for the tests of what reads them (checkpoints/, model.py,
# peft_io.py, merge.py); conftest.py's module-scoped fixture ``good`` is a valid folder of CONFIG.

# A 2-layer, 64-wide config.json: grouped-query attention, an untied head.
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
    """``path`` as a transformers folder: ``cfg`` as config.json, ``tensors`` as model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def load(path, quant="float32", **options):
    """``load_base_params`` of the checkpoint at ``path``: ``(base, LoadStats)``, quantized as ``quant``,
    float32 values; ``options``: more :class:`QuantConfig` fields."""
    source, cfg = open_checkpoint(path)
    return load_base_params(source, read_config(cfg), QuantConfig(quant=quant, dtype="float32", **options))


def variant(tmp_path, good, *, drop=(), add=None, cfg=None) -> pathlib.Path:
    """The good folder with tensors dropped/added/replaced and config fields changed."""
    tensors = {k: v for k, v in good[1].items() if k not in drop}
    tensors.update(add or {})
    return write_folder(tmp_path / "ckpt", {**CONFIG, **(cfg or {})}, tensors)


def with_value(good, key, index, value) -> dict[str, np.ndarray]:
    """``{key: a copy of good's tensor key with [index] = value}`` (``good``: the fixture's pair)."""
    array = good[1][key].copy()
    array[index] = value
    return {key: array}


def random_adapter(rng, r=4, targets=("q_proj", "v_proj", "down_proj"), layers=2, size=0.05):
    """Random LoRA adapters for CONFIG with ``layers`` layers: ``(config, lora, lora_config)``, lora_A
    of std 1/sqrt(in), lora_B of std ``size``, alpha 2r."""
    config = LlamaConfig.from_hf_dict({**CONFIG, "num_hidden_layers": layers})
    shapes = config.linear_shapes()
    lora = {"layers": {}}
    for name in targets:
        out_f, in_f = shapes[name]
        lora["layers"].setdefault(layout.module_group(name), {})[name] = {
            "lora_A": jnp.asarray(rng.normal(size=(layers, r, in_f)) / math.sqrt(in_f), jnp.float32),
            "lora_B": jnp.asarray(size * rng.normal(size=(layers, out_f, r)), jnp.float32)}
    return config, lora, LoraConfig(r=r, alpha=2.0 * r, target_modules=tuple(targets))


def write_tiny_llama(path: pathlib.Path, rng: np.random.Generator, *, hidden: int = 64, intermediate: int = 128,
                     layers: int = 2) -> pathlib.Path:
    """A random Llama folder (config.json, float32 model.safetensors, the embedded model's tokenizer)
    small enough to train in seconds: embeddings std 0.5, linear weights std 1/sqrt(in), tied head."""
    from qlora_jax.model import load_tokenizer

    tokenizer = load_tokenizer("embedded")
    vocab, d, f, kv = tokenizer.vocab_size, hidden, intermediate, hidden // 2
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": d,
              "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": True, "eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.bos_id}
    (path / "config.json").write_text(json.dumps(config))
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    tensors = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, d)), "model.norm.weight": np.ones(d)}
    for i in range(layers):
        for name, shape in shapes.items():
            tensors[f"model.layers.{i}.{name}.weight"] = rng.normal(0, shape[1] ** -0.5, shape)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(d)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(d)
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(path / "model.safetensors"))
    tokenizer.save(path)
    return path


def small_finetune_config(model: pathlib.Path, out: pathlib.Path, **overrides):
    """A :class:`~qlora_jax.finetune.FinetuneConfig` that trains ``model`` (e.g. the ``tiny_model``
    fixture) in seconds: 96 chatterbot conversations, 64-token sequences (one padding bucket, so one
    compilation of each step), batch 4, r=8, float32; no multiple-choice evaluation."""
    from qlora_jax.finetune import FinetuneConfig

    settings = dict(model=str(model), output_dir=str(out), max_train_samples=96, eval_dataset_size=16,
                    per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=20, eval_steps=10,
                    save_steps=10, learning_rate=3e-3, lora_r=8, lora_alpha=16, source_max_len=32,
                    target_max_len=32, num_sample_prompts=2, sample_max_new_tokens=8, data_workers=1,
                    compute_dtype="float32", chat_template="chatml", mc_eval_file="none")
    settings.update(overrides)
    return FinetuneConfig(**settings)


def train_losses(out: pathlib.Path) -> dict[int, float]:
    """``{step: training loss}`` from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def restore_targets(model_path: pathlib.Path, out: pathlib.Path, **overrides):
    """The trainable pytree and optimizer state of :func:`small_finetune_config` (with
    ``overrides``), built as the recipe builds them: the targets to restore a run's checkpoints into."""
    from qlora_jax.recipe import steps

    cfg = small_finetune_config(model_path, out, **overrides)
    model, _ = steps.setup_model(cfg)
    optimizer, _ = steps.setup_optimizer(cfg)
    trainable, _ = steps.split_trainable(model)
    return trainable, optimizer.init(trainable)


def assert_same_latest_checkpoint(run_a: pathlib.Path, run_b: pathlib.Path, targets, step: int) -> None:
    """Both runs' latest checkpoint is ``step``, and it holds the same adapters and optimizer state,
    bit for bit. ``targets``: what :func:`restore_targets` returns for the runs' settings."""
    from qlora_jax.training_state import TrainCheckpointer

    states = []
    for run_dir in (run_a, run_b):
        checkpointer = TrainCheckpointer(run_dir / "checkpoints")
        states.append(checkpointer.restore(*targets, step=checkpointer.all_steps()[-1]))
        checkpointer.close()
    assert states[0].step == states[1].step == step
    for got, want in zip(jax.tree.leaves((states[0].trainable, states[0].opt_state)),
                         jax.tree.leaves((states[1].trainable, states[1].opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# A process that takes the run lock of argv[2] (loading run_lock.py alone: fast) and holds it.
_HOLD_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
run_lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(run_lock)
with run_lock.RunLock(sys.argv[2]):
    print("locked", flush=True)
    time.sleep(600)
"""


def hold_run_lock(directory: pathlib.Path):
    """A subprocess holding ``directory``'s run lock (``RunLock``), returned once it holds it;
    the caller kills it."""
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(repo / "qlora_jax/recipe/run_lock.py"),
                               str(directory)], stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline().strip()
    if line != "locked":
        holder.kill()
        raise RuntimeError(f"the lock holder did not take the lock of {directory} (said {line!r})")
    return holder


REPO = pathlib.Path(__file__).resolve().parents[1]


def first_party_file(module: str) -> str | None:
    """The repository file (relative path) of a first-party module name, or None (third-party)."""
    parts = module.split(".")
    if parts[0] == "qlora_jax" and len(parts) > 1 and parts[1] in ("kernels", "experiments"):
        parts = parts[1:]  # the top-level folders that ship inside the package
    elif parts[0] not in ("qlora_jax", "kernels", "experiments", "helpers", "kernel_refs"):
        return None
    if parts[0] in ("helpers", "kernel_refs"):
        parts = ["tests", *parts]
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return str(candidate.relative_to(REPO))
    return None


@dataclasses.dataclass(frozen=True)
class FirstPartyImport:
    """One first-party name an import statement loads: the dotted name (``a.b`` and ``a.b.c`` for
    ``from a.b import c``), the file that defines it, the statement's line, and whether it sits
    under ``if TYPE_CHECKING:`` (annotations only: never run)."""

    name: str
    file: str
    line: int
    type_checking: bool


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def first_party_imports(path: str, text: str | None = None) -> list[FirstPartyImport]:
    """Every first-party module the module at ``path`` (relative to the repository) imports, at
    module level or inside functions: ``from a.b import c`` loads ``a.b`` and ``a.b.c``, the file
    of a name being that of its deepest first-party prefix (``a.b``'s when ``c`` is not a module).
    ``text``: the module's source, if not the file's."""
    tree = ast.parse((REPO / path).read_text() if text is None else text)
    package = ".".join(pathlib.Path(path).with_suffix("").parts[:-1])
    found: list[FirstPartyImport] = []

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_checking)
            return
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(filter(None, [*base, module]))
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for name in names:
            for end in range(name.count(".") + 1, 0, -1):  # the deepest first-party prefix
                file = first_party_file(".".join(name.split(".")[:end]))
                if file is not None:
                    found.append(FirstPartyImport(name, file, node.lineno, type_checking))
                    break
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking)

    visit(tree, False)
    return found
