"""The quantized-model checkpoint: one Orbax checkpoint holding a packed base and what rebuilds it.

:func:`save_quantized` writes, and :func:`load_quantized` reads, a directory that is a single
Orbax checkpoint (``CompositeCheckpointHandler``) with these items (docs/checkpoint-format.md is
the specification; :data:`FORMAT_VERSION` is its version):

* ``manifest`` (JSON): the format name and version, every tensor of the base with its
  :class:`~qlora_jax.quant.QuantizedTensor` metadata (quant type, original shape and dtype, block
  sizes, double quantization, layer axis), the code tables, and where the base came from;
* ``config`` (JSON): the :class:`~qlora_jax.models.config.LlamaConfig` fields;
* ``base`` (PyTree): the frozen base as nested dicts, a quantized weight as
  ``{codes, scales[, nested_scales, offset]}``, byte for byte the arrays of the model;
* ``lora_config`` (JSON, PEFT's ``adapter_config.json``) and ``lora`` (PyTree, the adapters),
  when the model has them; ``tokenizer`` (JSON: the tokenizer files' text), when given one.

Loading reads the packed arrays as they are: no source checkpoint, no re-quantization. Every
array is checked, before it is read, against the shape and dtype its manifest entry and the model
config imply, so a manifest that disagrees with the arrays, a missing item or a base of another
model is an error naming the item. Orbax writes into a temporary directory and renames it when
complete, so a killed save leaves no checkpoint at ``path`` (never a half one).

:func:`restore_model` is the Flax NNX route: an abstract model (a
:class:`~qlora_jax.model.CausalLM` from :func:`qlora_jax.model.abstract_model`, ``nnx.eval_shape``
of a config alone, with shardings over a mesh), restored in place, each device reading only its
shard.

This module reads and writes pytrees: it imports nothing from :mod:`qlora_jax.model` or
:mod:`qlora_jax.peft_io` (which import it), so there is no import circle; a model is read through
the attributes :class:`SavableModel` names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import resource
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import qlora_jax
from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.load import LoadStats
from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig
from qlora_jax.quant import QuantConfig, QuantizationError, QuantizedTensor, codebooks
from qlora_jax.quant.blockwise import INV_INT8_MAX
from qlora_jax.quant.tensor import NESTED_BLOCKSIZE, codes_shape, nested_scales_shape, scales_shape

if TYPE_CHECKING:
    from flax import nnx
    from jax.sharding import Mesh

    from qlora_jax.lora import LoraConfig
    from qlora_jax.models.spec import ModelSpec
    from qlora_jax.tokenizer import Tokenizer

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "QuantizedCheckpoint",
    "save_quantized",
    "load_quantized",
    "is_quantized_checkpoint",
    "read_manifest",
    "read_saved_config",
    "read_saved_quantization",
    "check_saved_base",
    "quantization_summary",
    "restore_model",
    "SavableModel",
    "with_shardings",
]

log = logging.getLogger(__name__)

FORMAT = "qlora-jax/quantized-model"
FORMAT_VERSION = 1
QUANTIZED_ARRAYS = ("codes", "scales", "nested_scales", "offset")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_JSON_ITEMS = ("manifest", "config", "lora_config", "tokenizer")
_TREE_ITEMS = ("base", "lora")


# ---------------------------------------------------------------------------------------------
# Trees <-> "a/b/c" paths


def _checkpointer() -> ocp.Checkpointer:
    """A synchronous Orbax checkpointer that knows every item's handler (so metadata reads need no save)."""
    handlers = {name: ocp.JsonCheckpointHandler() for name in _JSON_ITEMS}
    handlers.update({name: ocp.StandardCheckpointHandler() for name in _TREE_ITEMS})
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers))


def _flatten(tree: Any) -> dict[str, Any]:
    """``{"layers/self_attn/q_proj/weight": leaf}``; a QuantizedTensor is one leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        *parents, name = path.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = leaf
    return tree


def _flatten_dicts(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Paths of a nested-dict tree as Orbax's metadata returns it (leaves: ArrayMetadata)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten_dicts(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def _as_dicts(tree: Any) -> Any:
    """The on-disk form of a base: each QuantizedTensor as a dict of its (non-None) arrays."""
    return jax.tree.map(
        lambda x: {name: getattr(x, name) for name in QUANTIZED_ARRAYS if getattr(x, name) is not None}
        if isinstance(x, QuantizedTensor) else x,
        tree, is_leaf=lambda x: isinstance(x, QuantizedTensor))


# ---------------------------------------------------------------------------------------------
# What a config implies, and what a manifest entry implies


def _expected_tensors(config: LlamaConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{path: (leading dims, shape of one tensor)}`` of every tensor of a base for ``config``
    (the one tensor table, :func:`qlora_jax.models.layout.tensor_table`)."""
    layers = (config.num_hidden_layers,)
    return {spec.slot: ((*layers, *spec.stack) if spec.layered else (), spec.shape)
            for spec in layout.tensor_table(config)}


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor of the manifest (see docs/checkpoint-format.md, ``manifest.tensors``)."""

    path: str
    kind: str  # "quantized" or "dense"
    leading_dims: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str
    quant_type: str | None = None
    blocksize: int | None = None
    nested_blocksize: int | None = None
    double_quant: bool | None = None

    @classmethod
    def of(cls, path: str, leaf: Any, leading: tuple[int, ...]) -> _Entry:
        """The entry of a base leaf; ``leading``: its layer axes (those of a dense leaf are not
        recorded in the array itself; a QuantizedTensor's are the codes' extra leading axes)."""
        if isinstance(leaf, QuantizedTensor):
            per_layer = len(codes_shape(tuple(leaf.shape), leaf.quant_type))
            leading = tuple(int(d) for d in leaf.codes.shape[: max(0, leaf.codes.ndim - per_layer)])
            return cls(path, "quantized", leading, tuple(leaf.shape), leaf.dtype, leaf.quant_type, leaf.blocksize,
                       leaf.nested_blocksize, leaf.double_quant)
        shape = tuple(int(d) for d in leaf.shape)
        return cls(path, "dense", leading, shape[len(leading):], jnp.dtype(leaf.dtype).name)

    def to_json(self) -> dict[str, Any]:
        out = {"kind": self.kind, "leading_dims": list(self.leading_dims), "shape": list(self.shape),
               "dtype": self.dtype}
        if self.kind == "quantized":
            out.update(quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant,
                       nested_blocksize=self.nested_blocksize)
        return out

    @classmethod
    def from_json(cls, path: str, raw: Any) -> _Entry:
        where = f"manifest.tensors[{path!r}]"
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{where} must be an object, got {raw!r}")

        def field(name: str, kind: type | tuple[type, ...]) -> Any:
            if name not in raw:
                raise CheckpointError(f"{where} is missing the field {name!r}")
            value = raw[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CheckpointError(f"{where}.{name} is {value!r}; expected {getattr(kind, '__name__', kind)}")
            return value

        def dims(name: str) -> tuple[int, ...]:
            value = field(name, list)
            if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value):
                raise CheckpointError(f"{where}.{name} is {value!r}; expected a list of positive integers")
            return tuple(value)

        kind = field("kind", str)
        if kind not in ("quantized", "dense"):
            raise CheckpointError(f"{where}.kind is {kind!r}; expected 'quantized' or 'dense'")
        entry = cls(path, kind, dims("leading_dims"), dims("shape"), field("dtype", str))
        if kind == "dense":
            try:
                jnp.dtype(entry.dtype)
            except TypeError:
                raise CheckpointError(f"{where}.dtype {entry.dtype!r} is not a dtype") from None
            return entry
        entry = dataclasses.replace(entry, quant_type=field("quant_type", str), blocksize=field("blocksize", int),
                                    nested_blocksize=field("nested_blocksize", int),
                                    double_quant=field("double_quant", bool))
        try:  # the metadata of one layer's tensor must itself be valid (supported types and sizes)
            entry.quantized_tensor(per_layer=True).validate()
        except QuantizationError as err:
            raise CheckpointError(f"{where}: {err}") from None
        return entry

    def arrays(self, per_layer: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{array path: (shape, dtype)}`` that this entry implies (docs/checkpoint-format.md)."""
        lead = () if per_layer else self.leading_dims
        if self.kind == "dense":
            return {self.path: (lead + self.shape, self.dtype)}
        arrays = {
            "codes": (codes_shape(self.shape, self.quant_type), "int8" if self.quant_type == "int8" else "uint8"),
            "scales": (scales_shape(self.shape, self.blocksize), "uint8" if self.double_quant else "float32"),
        }
        if self.double_quant:
            num_blocks = -(-int(np.prod(self.shape)) // self.blocksize)
            arrays["nested_scales"] = (nested_scales_shape(num_blocks, self.nested_blocksize), "float32")
            arrays["offset"] = ((), "float32")
        return {f"{self.path}/{name}": (lead + tuple(shape), dtype) for name, (shape, dtype) in arrays.items()}

    def quantized_tensor(self, per_layer: bool = False) -> QuantizedTensor:
        """The abstract QuantizedTensor of this entry (ShapeDtypeStructs; one layer's if ``per_layer``)."""
        arrays = {path.rsplit("/", 1)[1]: jax.ShapeDtypeStruct(shape, dtype)
                  for path, (shape, dtype) in self.arrays(per_layer).items()}
        return QuantizedTensor(arrays["codes"], arrays["scales"], arrays.get("nested_scales"), arrays.get("offset"),
                               self.shape, self.dtype, self.quant_type, self.blocksize,
                               self.nested_blocksize or NESTED_BLOCKSIZE)

    def differences(self, other: _Entry) -> list[str]:
        """``"field: ours vs other's"`` for every metadata field in which two entries differ."""
        return [f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _entries_of(base: Any, config: LlamaConfig) -> dict[str, _Entry]:
    expected = _expected_tensors(config)
    return {path: _Entry.of(path, leaf, expected.get(path, ((),))[0]) for path, leaf in _flatten(base).items()}


def _check_entries_fit_config(entries: Mapping[str, _Entry], config: LlamaConfig, where: str) -> None:
    """Every tensor a base for ``config`` needs, no other, each with the config's shape."""
    expected = _expected_tensors(config)
    missing, extra = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where} does not fit the model config ({config.model_type}, "
                              f"{config.num_hidden_layers} layers, tie_word_embeddings={config.tie_word_embeddings}): "
                              f"missing tensors {missing}, unexpected tensors {extra}")
    for path, entry in entries.items():
        leading, shape = expected[path]
        if (entry.leading_dims, entry.shape) != (leading, shape):
            raise CheckpointError(f"{where}: tensor {path!r} is {list(entry.leading_dims)} x {list(entry.shape)} "
                                  f"but the model config implies {list(leading)} x {list(shape)}")


def _check_arrays(item: str, expected: Mapping[str, tuple[tuple[int, ...], str | None]], found: Mapping[str, Any],
                  what: str) -> None:
    """Each array of ``expected`` is in ``found`` with that shape and dtype (None: any), and nothing else is."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"{what}: item {item!r} is missing the array(s) {[f'{item}/{p}' for p in missing]}")
    if extra:
        raise CheckpointError(f"{what}: item {item!r} holds array(s) the manifest does not describe: "
                              f"{[f'{item}/{p}' for p in extra]}")
    for path, (shape, dtype) in expected.items():
        array = found[path]
        got_shape, got_dtype = tuple(int(d) for d in array.shape), jnp.dtype(array.dtype).name
        want_dtype = got_dtype if dtype is None else jnp.dtype(dtype).name
        if (got_shape, got_dtype) != (tuple(shape), want_dtype):
            raise CheckpointError(f"{what}: array {item}/{path} is {got_dtype}{list(got_shape)} but its metadata "
                                  f"implies {want_dtype}{list(shape)}")


def _expected_arrays(entries: Mapping[str, _Entry]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {path: spec for entry in entries.values() for path, spec in entry.arrays().items()}


def quantization_summary(base: Any) -> dict[str, Any]:
    """How a base is stored, in :class:`~qlora_jax.quant.QuantConfig`'s terms.

    Args:
      base: a base pytree (QuantizedTensor linears or plain arrays).

    Returns:
      ``{"quant": "nf4"|"fp4"|"int8"|"bf16"|"float16"|"float32", "double_quant", "blocksize",
      "dtype"}`` (``dtype``: the embeddings'); a field is None where the linear weights disagree.
    """
    linears = [entry["weight"] for entry in layout.linear_entries(base).values()]

    def common(values):
        values = set(values)
        return values.pop() if len(values) == 1 else None

    quantized = [w for w in linears if isinstance(w, QuantizedTensor)]
    if len(quantized) == len(linears):
        quant = common(w.quant_type for w in linears)
        double_quant, blocksize = common(w.double_quant for w in linears), common(w.blocksize for w in linears)
    elif not quantized:
        quant = common({"bfloat16": "bf16"}.get(jnp.dtype(w.dtype).name, jnp.dtype(w.dtype).name) for w in linears)
        double_quant = blocksize = None
    else:
        quant = double_quant = blocksize = None
    return {"quant": quant, "double_quant": double_quant, "blocksize": blocksize,
            "dtype": jnp.dtype(base["embed_tokens"].dtype).name}


def _quantization_disagreements(stored: Mapping[str, Any], wanted: QuantConfig) -> list[str]:
    asked = {"quant": wanted.quant, "dtype": jnp.dtype(wanted.dtype).name}
    if wanted.quantized:
        asked.update(double_quant=wanted.double_quant, blocksize=wanted.blocksize)
    return [f"{name}={stored.get(name)!r} (asked: {value!r})" for name, value in asked.items()
            if stored.get(name) != value]


def _config_differences(stored: LlamaConfig, wanted: LlamaConfig) -> list[str]:
    return [f"{f.name}: saved {getattr(stored, f.name)!r}, expected {getattr(wanted, f.name)!r}"
            for f in dataclasses.fields(LlamaConfig) if getattr(stored, f.name) != getattr(wanted, f.name)]


def _config_to_json(config: LlamaConfig) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    out["rope_scaling"] = config.rope_scaling_dict
    out["rope_local_scaling"] = None if config.rope_local_scaling is None else dict(config.rope_local_scaling)
    if isinstance(config.eos_token_id, tuple):
        out["eos_token_id"] = list(config.eos_token_id)
    return out


def _config_from_json(raw: Any, path: pathlib.Path) -> LlamaConfig:
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: item 'config' must be an object of LlamaConfig fields")
    names = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise CheckpointError(f"{path}: item 'config' has unknown field(s) {unknown}; LlamaConfig has {sorted(names)}")
    try:
        return LlamaConfig(**raw)
    except TypeError as err:
        raise CheckpointError(f"{path}: item 'config' is incomplete: {err}") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: item 'config': {err}") from None


def _codebooks_json() -> dict[str, list[float]]:
    # float32 values as JSON numbers: Python's repr of a float32 widened to float64 reads back exactly.
    return {
        "nf4": [float(v) for v in codebooks.NF4_CODE],
        "fp4": [float(v) for v in codebooks.FP4_CODE],
        "dynamic_signed": [float(v) for v in codebooks.DYNAMIC_MAP_SIGNED],
    }


# ---------------------------------------------------------------------------------------------
# Saving


@dataclasses.dataclass
class QuantizedCheckpoint:
    """What :func:`load_quantized` read.

    Attributes:
      config: the model config the base was saved for.
      base: the base pytree (packed codes, scales, 16-bit tensors), its arrays on the devices.
      lora: the saved adapters (``{"layers": {group: {name: {"lora_A", "lora_B"}}}}``) or None.
      lora_config: the adapters' hyperparameters, or None without adapters.
      tokenizer: the saved tokenizer, or None if none was saved.
      manifest: the ``manifest`` item (format, version, each QuantizedTensor's metadata, source).
      load_stats: what loading cost (seconds, bytes).
    """

    config: LlamaConfig
    base: dict[str, Any]
    lora: dict[str, Any] | None
    lora_config: LoraConfig | None
    tokenizer: Tokenizer | None
    manifest: dict[str, Any]
    load_stats: LoadStats

    @property
    def quantization(self) -> dict[str, Any]:
        """:func:`quantization_summary` of the saved base."""
        return dict(self.manifest["quantization"])

    @property
    def source(self) -> str | None:
        """Where the base was loaded from when it was saved (a path, "embedded", or None)."""
        return self.manifest.get("source")


@runtime_checkable
class SavableModel(Protocol):
    """What :func:`save_quantized` reads of a model (:class:`~qlora_jax.model.CausalLM` has it).

    A protocol rather than the class, so that this module need not import :mod:`qlora_jax.model`.
    """

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def config(self) -> LlamaConfig: ...

    @property
    def base_params(self) -> dict[str, Any]: ...

    @property
    def lora_params(self) -> dict[str, Any] | None: ...


def _tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qlora_jax_tokenizer_") as tmp:
        tokenizer.save(tmp)
        return {name: (pathlib.Path(tmp) / name).read_text() for name in TOKENIZER_FILES
                if (pathlib.Path(tmp) / name).exists()}


@jax.jit
def _all_finite(arrays: dict[str, jax.Array]) -> dict[str, jax.Array]:
    # One compiled reduction for a whole tree, on the devices that hold it (no host copy).
    return {name: jnp.isfinite(a).all() for name, a in arrays.items()}


def _check_finite(item: str, flat: Mapping[str, Any]) -> None:
    """Refuses NaN/Inf in any floating array (a QuantizedTensor's scales, nested scales, offset)."""
    arrays = {}
    for path, leaf in flat.items():
        named = {f"{path}/{name}": getattr(leaf, name) for name in ("scales", "nested_scales", "offset")} \
            if isinstance(leaf, QuantizedTensor) else {path: leaf}
        arrays.update({name: a for name, a in named.items() if a is not None and jnp.issubdtype(a.dtype, jnp.floating)})
    finite = _all_finite(arrays)
    bad = sorted(name for name, ok in finite.items() if not bool(ok))
    if bad:
        raise CheckpointError(f"refusing to save {', '.join(f'{item}/{name}' for name in bad)}: NaN or Inf values")


def _what_to_save(model_or_params: SavableModel | Mapping[str, Any], config: LlamaConfig | None,
                  lora: Mapping[str, Any] | None, lora_config: LoraConfig | None) \
        -> tuple[dict[str, Any], LlamaConfig, Mapping[str, Any] | None, LoraConfig | None]:
    """``(base, config, lora, lora_config)`` of a model, or of a base pytree and the values given with it."""
    if isinstance(model_or_params, SavableModel):
        model = model_or_params
        if config is not None or lora is not None or lora_config is not None:
            raise ValueError("save_quantized(model): config, lora and lora_config come from the model; pass a base "
                             "pytree to give them separately")
        base, config, lora = model.base_params, model.config, model.lora_params
        lora_config = model.spec.lora_config
    else:
        base = dict(model_or_params)
        if config is None:
            raise ValueError("save_quantized(base_params) needs config= (the model's LlamaConfig)")
    if lora is not None and lora_config is None:
        raise ValueError("adapters without their LoraConfig cannot be reloaded: pass lora_config=")
    return base, config, lora, lora_config


def _manifest(base: Mapping[str, Any], entries: Mapping[str, Any], items: list[str], source: str | None) \
        -> dict[str, Any]:
    """The ``manifest`` item: format, library, source, the items saved, and every tensor's metadata."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library": f"qlora-jax {qlora_jax.__version__}",
        "source": source,
        "items": items,
        "quantization": quantization_summary(base),
        "tensors": {p: e.to_json() for p, e in sorted(entries.items())},
        "codebooks": _codebooks_json(),
        "int8_scale": float(INV_INT8_MAX),
    }


def save_quantized(
    path: str | pathlib.Path,
    model_or_params: SavableModel | Mapping[str, Any],
    *,
    config: LlamaConfig | None = None,
    tokenizer: Tokenizer | None = None,
    lora: Mapping[str, Any] | None = None,
    lora_config: LoraConfig | None = None,
    source: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a model (or a ``base`` pytree) as one Orbax checkpoint at ``path``.

    The arrays are written as they are (packed codes, scales, nested scales, offsets, 16-bit
    embeddings), each QuantizedTensor's metadata into the manifest. Orbax commits the directory
    atomically.

    Args:
      path: the checkpoint directory to write.
      model_or_params: a :class:`~qlora_jax.model.CausalLM` (its base, config, adapters and LoRA
        config), or a ``base`` pytree with ``config`` (and optionally ``lora``/``lora_config``).
      config: the model config; required with a pytree, taken from a model otherwise.
      tokenizer: stored as its files' text (None: none).
      lora: adapters to store beside a ``base`` pytree.
      lora_config: their hyperparameters (required with ``lora``).
      source: recorded as where the base came from (a path or "embedded").
      overwrite: replace an existing ``path`` instead of refusing it.

    Returns:
      ``path``, as a :class:`pathlib.Path`.

    Raises:
      CheckpointError: a base (or adapters) that does not fit ``config`` or holds NaN/Inf.
      ValueError: ``config``/``lora``/``lora_config`` given with a model, no ``config`` with a
        pytree, or ``lora`` without ``lora_config``.
      FileExistsError: an existing ``path`` without ``overwrite``.
    """
    base, config, lora, lora_config = _what_to_save(model_or_params, config, lora, lora_config)
    path = pathlib.Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass overwrite=True to replace it")

    entries = _entries_of(base, config)
    _check_entries_fit_config(entries, config, "save_quantized: the base")
    flat = _flatten(base)
    _check_arrays("base", _expected_arrays(entries), _flatten(_as_dicts(base)), "save_quantized")
    _check_finite("base", flat)
    items = {"manifest": None, "config": ocp.args.JsonSave(_config_to_json(config)),
             "base": ocp.args.StandardSave(_as_dicts(base))}
    if lora_config is not None:
        targets = layout.adapter_targets(lora) if lora is not None else layout.lora_targets(lora_config, config)
        items["lora_config"] = ocp.args.JsonSave(lora_config.to_peft_config(targets, source))
    if lora is not None:
        _check_lora_fits(path, lora, lora_config, config)
        _check_finite("lora", _flatten(lora))
        items["lora"] = ocp.args.StandardSave(dict(lora))
    if tokenizer is not None:
        items["tokenizer"] = ocp.args.JsonSave(_tokenizer_files(tokenizer))
    items["manifest"] = ocp.args.JsonSave(_manifest(base, entries, sorted(items), source))
    started = time.perf_counter()
    with _checkpointer() as checkpointer:
        checkpointer.save(path, ocp.args.Composite(**items), force=overwrite)
    log.info("saved %s (%s) in %.1f s", path, ", ".join(sorted(items)), time.perf_counter() - started)
    return path


# ---------------------------------------------------------------------------------------------
# Loading


def is_quantized_checkpoint(path: str | pathlib.Path) -> bool:
    """Whether ``path`` is a committed checkpoint written by :func:`save_quantized`.

    Args:
      path: any path (a file, a folder, or nothing).

    Returns:
      True for a committed :func:`save_quantized` directory, False otherwise.
    """
    path = pathlib.Path(path)
    return path.is_dir() and (path / "manifest").is_dir() and (path / "_CHECKPOINT_METADATA").exists()


def _open(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path).absolute()
    if not path.exists():
        unfinished = sorted(path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*")) if path.parent.exists() else []
        hint = f" ({unfinished[-1].name} is an unfinished save, e.g. a killed process)" if unfinished else ""
        raise CheckpointError(f"no quantized checkpoint at {path}{hint}")
    if not path.is_dir() or not (path / "_CHECKPOINT_METADATA").exists():
        raise CheckpointError(f"{path} is not an Orbax checkpoint (no _CHECKPOINT_METADATA)")
    if not ocp.utils.is_checkpoint_finalized(path):
        raise CheckpointError(f"{path} is an unfinished Orbax save (not committed); save it again")
    if not (path / "manifest").is_dir():
        raise CheckpointError(f"{path} is missing the item 'manifest': not a checkpoint written by save_quantized")
    return path


def _restore_json(path: pathlib.Path, names: list[str]) -> dict[str, Any]:
    for name in names:
        if not (path / name).is_dir():
            raise CheckpointError(f"{path} is missing the item {name!r}")
    with _checkpointer() as checkpointer:
        restored = checkpointer.restore(path, ocp.args.Composite(**{n: ocp.args.JsonRestore() for n in names}))
    return {name: restored[name] for name in names}


def read_manifest(path: str | pathlib.Path) -> dict[str, Any]:
    """The ``manifest`` item of a quantized checkpoint, its format and version checked.

    Args:
      path: a :func:`save_quantized` directory.

    Returns:
      The manifest as a dict (format, version, tensors' metadata, source).

    Raises:
      CheckpointError: a missing manifest, or another format or version.
    """
    path = _open(path)
    manifest = _restore_json(path, ["manifest"])["manifest"]
    if not isinstance(manifest, Mapping) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, Mapping) else manifest
        raise CheckpointError(f"{path}: manifest.format is {found!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: manifest.format_version is {version!r}; this qlora-jax "
                              f"({qlora_jax.__version__}) reads format version {FORMAT_VERSION} only")
    for name in ("items", "tensors", "quantization"):
        if name not in manifest:
            raise CheckpointError(f"{path}: the manifest is missing the field {name!r}")
    return dict(manifest)


def _listed_items(path: pathlib.Path, manifest: Mapping[str, Any]) -> list[str]:
    """The items the manifest lists, each checked to be there; ``config`` and ``base`` are required."""
    items = manifest["items"]
    known = _JSON_ITEMS + _TREE_ITEMS
    if not isinstance(items, list) or any(name not in known for name in items):
        raise CheckpointError(f"{path}: manifest.items is {items!r}; expected a list of {list(known)}")
    for name in sorted(set(items) | {"config", "base"}):
        if not (path / name).is_dir():
            raise CheckpointError(f"{path} is missing the item {name!r}")
    return list(items)


def _disk_arrays(path: pathlib.Path, item: str) -> dict[str, Any]:
    """``{array path: ArrayMetadata}`` of a PyTree item, from Orbax's metadata (no array is read)."""
    if not (path / item).is_dir():
        raise CheckpointError(f"{path} is missing the item {item!r}")
    with _checkpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata[item]
    return _flatten_dicts(metadata.tree if hasattr(metadata, "tree") else metadata)


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``abstract``'s leaves as ShapeDtypeStructs carrying ``shardings`` (a matching pytree), or
    the first local device when ``shardings`` is None: the restore target of a sharded read.

    Args:
        abstract: a pytree of arrays or ShapeDtypeStructs.
        shardings: a pytree of shardings of the same structure, or None.

    Returns:
        The pytree of ShapeDtypeStructs.
    """
    if shardings is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_default_sharding()), abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _restore_trees(path: pathlib.Path, targets: Mapping[str, Any]) -> dict[str, Any]:
    """The PyTree items ``targets`` names, each restored into its target (arrays or ShapeDtypeStructs
    with shardings; QuantizedTensors come back with the target's metadata)."""
    # On disk a QuantizedTensor is a dict of its arrays; Orbax would see the None arrays of one
    # without double quantization as leaves of its own, so the target takes the on-disk form too.
    with _checkpointer() as checkpointer:
        restored = checkpointer.restore(path, ocp.args.Composite(
            **{name: ocp.args.StandardRestore(_as_dicts(t)) for name, t in targets.items()}))
    return {name: _as_quantized(restored[name], target) for name, target in targets.items()}


def _as_quantized(restored: Any, like: Any) -> Any:
    """Inverse of :func:`_as_dicts`: the dicts of ``restored`` where ``like`` has QuantizedTensors."""
    flat = {}
    for path, leaf in _flatten(like).items():
        node = restored
        for key in path.split("/"):
            node = node[key]
        flat[path] = dataclasses.replace(leaf, **{name: node.get(name) for name in QUANTIZED_ARRAYS}) \
            if isinstance(leaf, QuantizedTensor) else node
    return _unflatten(flat)


def _load_stats(started: float, rss_before: int, base: Any, entries: Mapping[str, _Entry]) -> LoadStats:
    sizes = [x.nbytes for x in jax.tree.leaves(base)]
    quantized = sum(int(np.prod(e.leading_dims)) for e in entries.values() if e.kind == "quantized")
    return LoadStats(seconds=time.perf_counter() - started, base_bytes=sum(sizes), largest_tensor_bytes=max(sizes),
                     peak_tracked_bytes=sum(sizes),
                     rss_increase_bytes=max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before),
                     prequantized=quantized, requantized=0)


def _manifest_entries(path: pathlib.Path, manifest: Mapping[str, Any], config: LlamaConfig) -> dict[str, _Entry]:
    tensors = manifest["tensors"]
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"{path}: manifest.tensors must be an object")
    entries = {p: _Entry.from_json(p, raw) for p, raw in tensors.items()}
    _check_entries_fit_config(entries, config, f"{path}: manifest.tensors")
    return entries


def _check_expectations(path: pathlib.Path, manifest: Mapping[str, Any], saved_config: LlamaConfig, *,
                        config: LlamaConfig | None, quant: QuantConfig | None, source: str | None = None) -> None:
    if source is not None and manifest.get("source") != source:
        raise CheckpointError(f"{path} holds a base saved from {manifest.get('source')!r}, not from {source!r}")
    if config is not None and saved_config != config:
        raise CheckpointError(f"{path} holds a base saved for another model config: "
                              + "; ".join(_config_differences(saved_config, config)))
    if quant is not None:
        disagree = _quantization_disagreements(manifest["quantization"], quant)
        if disagree:
            raise CheckpointError(f"{path} holds a base stored as {manifest['quantization']}, not as asked: "
                                  f"{', '.join(disagree)}; a saved base is never re-quantized (load the source "
                                  "checkpoint to quantize it otherwise)")


def read_saved_config(path: str | pathlib.Path) -> LlamaConfig:
    """The model config a quantized checkpoint was saved for (reads its ``config`` item only).

    Args:
      path: a :func:`save_quantized` directory.

    Returns:
      Its :class:`~qlora_jax.models.config.LlamaConfig`.
    """
    path = _open(path)
    return _config_from_json(_restore_json(path, ["config"])["config"], path)


def read_saved_quantization(path: str | pathlib.Path) -> QuantConfig:
    """How a quantized checkpoint's base is stored; reads the manifest only.

    Args:
      path: a :func:`save_quantized` directory.

    Returns:
      The :class:`~qlora_jax.quant.QuantConfig` that ``load_pretrained`` must be asked for to load it.
    """
    summary = read_manifest(path)["quantization"]
    if summary.get("quant") is None or summary.get("dtype") is None:
        raise CheckpointError(f"{path}: the base's linear weights are stored in mixed ways ({summary}); load it with "
                              "load_quantized, which takes each tensor as stored")
    quantized = summary["quant"] in ("nf4", "fp4", "int8")
    return QuantConfig(quant=summary["quant"], double_quant=bool(summary["double_quant"]) if quantized else True,
                       blocksize=int(summary["blocksize"]) if quantized else 64, dtype=summary["dtype"])


def check_saved_base(
    path: str | pathlib.Path,
    *,
    config: LlamaConfig | None = None,
    quant: QuantConfig | None = None,
    source: str | None = None,
) -> None:
    """Checks that the checkpoint at ``path`` holds the base asked for.

    Reads the manifest and the config only, no array.

    Args:
      path: a :func:`save_quantized` directory.
      config: the model config it must have been saved for (None: not checked).
      quant: how its base must be stored (None: not checked).
      source: where its base must have come from (None: not checked).

    Raises:
      CheckpointError: naming what differs.
    """
    manifest = read_manifest(path)
    _check_expectations(pathlib.Path(path).absolute(), manifest, read_saved_config(path), config=config,
                        quant=quant, source=source)


def load_quantized(
    path: str | pathlib.Path,
    *,
    mesh: Mesh | None = None,
    expected_config: LlamaConfig | None = None,
    expected_quant: QuantConfig | None = None,
) -> QuantizedCheckpoint:
    """Reads a checkpoint written by :func:`save_quantized`: the base byte for byte, never re-quantized.

    Args:
      path: the checkpoint directory.
      mesh: shard the base and adapters over it with :func:`qlora_jax.distributed.param_shardings`
        (each device reads only its shard); None: the first local device.
      expected_config: refuse a base saved for another model config.
      expected_quant: refuse a base stored otherwise (another :class:`~qlora_jax.quant.QuantConfig`).

    Returns:
      A :class:`QuantizedCheckpoint` (config, base, adapters, tokenizer, manifest, load statistics).

    Raises:
      CheckpointError: naming the item, for another format version, a missing item or array,
        metadata that disagrees with the arrays or config, or a config/quantization other than
        expected.
    """
    started, rss_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    manifest = read_manifest(path)
    path = _open(path)
    items = _listed_items(path, manifest)
    json_items = _restore_json(path, ["config"] + [n for n in ("lora_config", "tokenizer") if n in items])
    config = _config_from_json(json_items["config"], path)
    _check_expectations(path, manifest, config, config=expected_config, quant=expected_quant)
    entries = _manifest_entries(path, manifest, config)
    _check_arrays("base", _expected_arrays(entries), _disk_arrays(path, "base"), str(path))
    abstract = _unflatten({p: e.quantized_tensor() if e.kind == "quantized"
                           else jax.ShapeDtypeStruct(e.leading_dims + e.shape, e.dtype) for p, e in entries.items()})
    targets = {"base": abstract}
    lora_config = None
    if "lora_config" in items:
        from qlora_jax.lora import LoraConfig

        try:
            lora_config = LoraConfig.from_peft_config(json_items["lora_config"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: item 'lora_config' is not a valid PEFT LoRA config: {err}") from None
    if "lora" in items:
        if lora_config is None:
            raise CheckpointError(f"{path} has adapters (item 'lora') but no item 'lora_config'")
        targets["lora"] = _unflatten({p: jax.ShapeDtypeStruct(m.shape, m.dtype)
                                      for p, m in _disk_arrays(path, "lora").items()})
        _check_lora_fits(path, targets["lora"], lora_config, config)
    shardings = None
    if mesh is not None:
        from qlora_jax.distributed import param_shardings

        shardings = {name: param_shardings(t, mesh) for name, t in targets.items()}
    restored = _restore_trees(path, {name: with_shardings(t, None if shardings is None else shardings[name])
                                     for name, t in targets.items()})
    tokenizer = _tokenizer_from_files(path, json_items["tokenizer"]) if "tokenizer" in items else None
    stats = _load_stats(started, rss_before, restored["base"], entries)
    log.info("loaded %s: %s", path, stats.summary())
    return QuantizedCheckpoint(config=config, base=restored["base"], lora=restored.get("lora"),
                               lora_config=lora_config, tokenizer=tokenizer, manifest=manifest, load_stats=stats)


def _check_lora_fits(path: pathlib.Path, lora: Any, lora_config: LoraConfig, config: LlamaConfig) -> None:
    """The adapters are the ``[L, r, in]`` / ``[L, out, r]`` pairs of the modules ``lora_config`` targets
    (and the routers ``[L, E, hidden]`` when it trains them)."""
    shapes, layers, r = config.linear_shapes(), config.num_hidden_layers, lora_config.r
    expected: dict[str, tuple[tuple[int, ...], str | None]] = {}
    for name in layout.lora_targets(lora_config, config):
        out_features, in_features = shapes[name]
        prefix = f"layers/{layout.module_group(name)}/{name}"
        lead = (layers, *config.expert_stack(name))  # MoE expert adapters: one per expert
        expected[f"{prefix}/lora_A"] = ((*lead, r, in_features), None)
        expected[f"{prefix}/lora_B"] = ((*lead, out_features, r), None)
    if lora_config.train_router:  # modules_to_save=["gate"]: the trained routers, full matrices
        expected["layers/mlp/gate/weight"] = ((layers, config.num_experts, config.hidden_size), None)
    _check_arrays("lora", expected, _flatten(lora), f"{path} (adapters of lora_config r={r}, "
                                                     f"target_modules={lora_config.target_modules})")


def _tokenizer_from_files(path: pathlib.Path, files: Any) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    from qlora_jax.tokenizer import Tokenizer

    if not isinstance(files, Mapping) or "tokenizer.json" not in files:
        raise CheckpointError(f"{path}: item 'tokenizer' must hold the text of 'tokenizer.json'")
    try:
        hf = HFTokenizer.from_str(files["tokenizer.json"])
        tokenizer_config = json.loads(files.get("tokenizer_config.json") or "{}")
    except Exception as err:  # tokenizers raises its own Exception type
        raise CheckpointError(f"{path}: item 'tokenizer' is unreadable: {err}") from None
    return Tokenizer.from_config(hf, tokenizer_config)


# ---------------------------------------------------------------------------------------------
# Flax NNX: an abstract model restored in place


def restore_model(path: str | pathlib.Path, abstract: nnx.Module) -> nnx.Module:
    """The model saved at ``path``, restored into ``abstract`` (e.g. :func:`qlora_jax.model.abstract_model`).

    Each array lands with the target's sharding (default: the first local device). The original
    dtype of each quantized weight (``QuantizedTensor.dtype``, which no array depends on and no
    config implies) is the checkpoint's.

    Args:
      path: a :func:`save_quantized` directory.
      abstract: an NNX module with a ``config`` and the variables ``base`` (and ``lora``), each
        holding a whole pytree, as :class:`~qlora_jax.model.CausalLM` has them.

    Returns:
      ``abstract`` with the checkpoint's arrays in place.

    Raises:
      CheckpointError: naming the tensor and the field, where an array's shape or dtype or the
        target's QuantizedTensor layout (quant type, shape, block sizes, double quantization)
        differs from the checkpoint's.
    """
    from flax import nnx

    manifest = read_manifest(path)
    path = _open(path)
    config = read_saved_config(path)
    _check_expectations(path, manifest, config, config=abstract.config, quant=None)
    entries = _manifest_entries(path, manifest, config)
    # The model's state is {"base": FrozenWeights, "lora": LoRAParam}, each holding a whole pytree:
    # the variable's value is the restore target of the item of the same name.
    graphdef, state = nnx.split(abstract)
    values = {name: state[name].get_value() for name in state.keys()}
    wanted = _entries_of(values["base"], config)
    for p, entry in entries.items():
        target = wanted[p]
        if entry.kind == "quantized" == target.kind:
            target = dataclasses.replace(target, dtype=entry.dtype)
        differences = entry.differences(target)
        if differences:
            raise CheckpointError(f"{path}: tensor base/{p} is stored otherwise than the restore target has it "
                                  f"(checkpoint vs target): {'; '.join(differences)}")
    _check_arrays("base", _expected_arrays(entries), _disk_arrays(path, "base"), str(path))
    if "lora" in values:
        if "lora" not in manifest["items"]:
            raise CheckpointError(f"{path} has no adapters (item 'lora') but the restore target has some")
        wanted_lora = {p: (tuple(a.shape), jnp.dtype(a.dtype).name) for p, a in _flatten(values["lora"]).items()}
        _check_arrays("lora", wanted_lora, _disk_arrays(path, "lora"), f"{path} (adapters, checkpoint vs target)")
    elif "lora" in manifest["items"]:
        log.info("%s holds adapters; the restore target has none, so they are not read", path)
    values["base"] = _unflatten({p: dataclasses.replace(leaf, dtype=entries[p].dtype)
                                 if isinstance(leaf, QuantizedTensor) else leaf
                                 for p, leaf in _flatten(values["base"]).items()})
    targets = {name: jax.tree.map(lambda a: a if getattr(a, "sharding", None) is not None
                                  else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_default_sharding()), tree)
               for name, tree in values.items()}
    for name, tree in _restore_trees(path, targets).items():
        state[name].set_value(tree)
    return nnx.merge(graphdef, state)
