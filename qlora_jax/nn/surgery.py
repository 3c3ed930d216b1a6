"""Model surgery by rule: make an existing NNX model QLoRA in place with :func:`apply_qlora`.

A :class:`QLoRARule` selects layers by module path (``"layers.3.attn.q_proj"``: attribute names
and list indices joined by dots, as ``nnx.iter_modules`` spells them) with PEFT's
``target_modules`` semantics, and carries its own LoRA hyperparameters, quantization and kernel
backend, like qwix's ``LoraRule``:

* ``"all-linear"``: every ``nnx.Linear`` and ``nnx.Einsum`` (an output head included: this
  function cannot tell which layer is the head; exclude it with ``exclude``);
* a sequence of names (or one comma-separated string): a layer whose path is, or ends with
  ``.`` + , one of them;
* any other string: a regular expression matched in full against the path.

Rules are tried in order and the first that matches a layer converts it. Everything is checked
before anything changes: a rule that matches nothing (the error lists the nearest paths), one
that only matches layers an earlier rule took, one that matches a module that is not an
``nnx.Linear``/``nnx.Einsum`` (subclasses included: they may compute something else), a layer
converted already, and, with ``on_ragged_blocks="error"``, a layer whose input size is not a
whole number of quantization blocks. Layers are then quantized one at a time (each finished
before the next starts), so memory grows by about one layer's temporaries on top of the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from qlora_jax.checkpoints.load import QuantConfig
from qlora_jax.kernels import BACKENDS
from qlora_jax.lora import LoraConfig
from qlora_jax.models.layout import _matches as _peft_matches
from qlora_jax.nn.layers import EinsumLayout, QLoRAEinsum, QLoRALinear, _QLoRABase, leading_shape, weight_shape

__all__ = [
    "QLoRARule",
    "QLoRAReport",
    "Candidate",
    "ConvertedLayer",
    "QLoRAConversionError",
    "apply_qlora",
    "as_rules",
    "match_rules",
    "nearest_paths",
    "ragged_blocks_reason",
    "set_kernel_backend",
    "tree_nbytes",
]

logger = logging.getLogger(__name__)

_CONVERTIBLE = (nnx.Linear, nnx.Einsum)


class QLoRAConversionError(ValueError):
    """A rule or a model that :func:`apply_qlora` (or the Linen converter) cannot convert; names the rule and path."""


def _normalise_targets(targets: str | Sequence[str], field: str) -> str | tuple[str, ...]:
    if isinstance(targets, str) and targets == "all-linear":
        return targets
    try:
        # LoraConfig owns the parsing of PEFT-style targets (name lists vs regular expressions).
        return LoraConfig(target_modules=targets if isinstance(targets, str) else tuple(targets)).target_modules
    except ValueError as err:
        raise ValueError(f"QLoRARule.{field}: {err}") from None


@dataclasses.dataclass(frozen=True)
class QLoRARule:
    """Which layers to convert and how (see the module docstring for path matching).

    ``module_path``: ``"all-linear"``, a name list or a regex; None takes ``lora.target_modules``
    (so a PEFT-style ``LoraConfig`` is a rule by itself); giving both is an error unless the
    LoraConfig's is the default ``"all-linear"``. ``lora``: adapter hyperparameters, or None to
    quantize the layer frozen, without adapter. ``quant``: the frozen weight's storage
    (:class:`~qlora_jax.checkpoints.load.QuantConfig`; "nf4"/"fp4"/"int8" with double quant and
    block size, or a 16-bit mode). ``kernel_backend``: the quantized matmul's backend for these
    layers (None: :func:`apply_qlora`'s). ``dtype``: the layers' computation dtype (None: the
    replaced layer's own ``dtype``). ``exclude``: paths this rule leaves alone (same syntax as
    ``module_path``). ``on_ragged_blocks``: what to do with a layer whose input size is not a
    multiple of the block size: "fallback" quantizes it in bitsandbytes' flat layout (exact and
    interchangeable, but the fused GPU kernels then dequantize with XLA instead, and its codes
    cannot shard by rows), "error" refuses it.
    """

    module_path: str | tuple[str, ...] | None = None
    lora: LoraConfig | None = LoraConfig()
    quant: QuantConfig = QuantConfig()
    kernel_backend: str | None = None
    dtype: str | None = None
    exclude: str | tuple[str, ...] | None = None
    on_ragged_blocks: Literal["fallback", "error"] = "fallback"

    def __post_init__(self):
        path = self.module_path
        lora_targets = None if self.lora is None else self.lora.target_modules
        if path is None:
            path = "all-linear" if lora_targets is None else lora_targets
        elif lora_targets not in (None, "all-linear"):
            raise ValueError(f"QLoRARule got module_path={path!r} and lora.target_modules={lora_targets!r}: give the "
                             "layers once (module_path, or the LoraConfig's target_modules)")
        object.__setattr__(self, "module_path", _normalise_targets(path, "module_path"))
        if self.exclude is not None:
            object.__setattr__(self, "exclude", _normalise_targets(self.exclude, "exclude"))
        if not isinstance(self.quant, QuantConfig):
            raise TypeError(f"QLoRARule.quant must be a QuantConfig, got {type(self.quant).__name__}")
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise TypeError(f"QLoRARule.lora must be a LoraConfig or None, got {type(self.lora).__name__}")
        if self.kernel_backend is not None and self.kernel_backend not in BACKENDS:
            raise ValueError(f"QLoRARule.kernel_backend must be one of {BACKENDS} or None, got {self.kernel_backend!r}")
        if self.on_ragged_blocks not in ("fallback", "error"):
            raise ValueError(f"QLoRARule.on_ragged_blocks must be 'fallback' or 'error', got {self.on_ragged_blocks!r}")

    def selects(self, path: str, is_linear: bool) -> bool:
        """Whether this rule's ``module_path`` (and not its ``exclude``) matches the module at ``path``.

        ``is_linear``: the module is a linear layer (what ``"all-linear"`` selects).
        """
        if self.exclude is not None and _path_matches(self.exclude, path, is_linear):
            return False
        return _path_matches(self.module_path, path, is_linear)


def _path_matches(targets: str | tuple[str, ...], path: str, is_linear: bool) -> bool:
    if targets == "all-linear":
        return is_linear
    return _peft_matches(targets, path)


def as_rules(rules: QLoRARule | LoraConfig | Sequence[QLoRARule | LoraConfig]) -> tuple[QLoRARule, ...]:
    """Rules from a rule, a PEFT-style LoraConfig (its ``target_modules`` select the layers), or a sequence of them."""
    if isinstance(rules, (QLoRARule, LoraConfig)):
        rules = [rules]
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, LoraConfig):
            rule = QLoRARule(lora=rule)
        if not isinstance(rule, QLoRARule):
            raise TypeError(f"rule {i} is a {type(rule).__name__}; expected a QLoRARule or a LoraConfig")
        out.append(rule)
    if not out:
        raise ValueError("apply_qlora needs at least one rule")
    return tuple(out)


def ragged_blocks_reason(in_features: int, quant: QuantConfig) -> str | None:
    """Why ``in_features`` is not a whole number of ``quant``'s blocks (fused kernels then fall back), or None."""
    if not quant.quantized:
        return None
    if in_features % quant.blocksize or in_features % 2:
        return f"in_features={in_features} is not a multiple of blocksize={quant.blocksize}"
    return None


@dataclasses.dataclass(frozen=True)
class ConvertedLayer:
    """One layer :func:`apply_qlora` replaced. ``shape``: ``(out, in)`` of each packed matrix, ``stacked``:
    the axes in front of it (nnx.vmap layers, einsum batch axes); bytes of the layer's arrays."""

    path: str
    kind: str
    rule: int
    shape: tuple[int, int]
    stacked: tuple[int, ...]
    storage: str
    rank: int | None
    ragged: str | None
    bytes_before: int
    bytes_after: int


@dataclasses.dataclass(frozen=True)
class QLoRAReport:
    """What :func:`apply_qlora` did: the layers replaced (in model order), the trainable (LoRA)
    parameter count after it, and the bytes of the model's whole state before and after."""

    layers: tuple[ConvertedLayer, ...]
    trainable_params: int
    bytes_before: int
    bytes_after: int

    @property
    def ragged_layers(self) -> tuple[str, ...]:
        """Paths of the layers quantized in the flat (ragged-block) layout, which the fused kernels cannot take."""
        return tuple(layer.path for layer in self.layers if layer.ragged)

    def summary(self) -> str:
        """A human-readable summary (one line, then one line per layer)."""
        mib = 1 / 2**20
        lines = [f"QLoRA: {len(self.layers)} layers replaced, {self.trainable_params:,} trainable parameters; model "
                 f"state {self.bytes_before * mib:.2f} MiB -> {self.bytes_after * mib:.2f} MiB"]
        for layer in self.layers:
            stacked = f"{list(layer.stacked)} x " if layer.stacked else ""
            lora = f"r={layer.rank}" if layer.rank else "no adapter"
            ragged = f" [{layer.ragged}: XLA dequantize]" if layer.ragged else ""
            lines.append(f"  {layer.path}: {layer.kind} {stacked}{list(layer.shape)} {layer.storage}, {lora}, rule "
                         f"{layer.rule}, {layer.bytes_before * mib:.3f} -> {layer.bytes_after * mib:.3f} MiB{ragged}")
        return "\n".join(lines)


@dataclasses.dataclass
class _Module:
    module: Any
    paths: list[str]
    homes: list[tuple[Any, Any]]  # (container, key) holding a reference


def _children(node: Any) -> list[tuple[Any, Any]]:
    if isinstance(node, nnx.List):
        return list(enumerate(node))
    if isinstance(node, nnx.Dict):
        return list(node.items())
    if isinstance(node, nnx.Module):
        return [(k, v) for k, v in vars(node).items() if not k.startswith(("_pytree__", "_object__"))]
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    if isinstance(node, dict):
        return list(node.items())
    return []


def _module_table(root: nnx.Module) -> list[_Module]:
    """Every submodule of ``root`` once, in attribute order, with all its paths and the containers holding it."""
    table: dict[int, _Module] = {}
    expanded: set[int] = set()

    def visit(node, prefix):
        for key, child in _children(node):
            path = prefix + (key,)
            if isinstance(child, nnx.Module):
                entry = table.setdefault(id(child), _Module(child, [], []))
                entry.paths.append(".".join(str(k) for k in path))
                entry.homes.append((node, key))
            if isinstance(child, (nnx.Module, list, tuple, dict)) and id(child) not in expanded:
                expanded.add(id(child))
                visit(child, path)

    expanded.add(id(root))
    visit(root, ())
    return list(table.values())


def tree_nbytes(tree: Any) -> int:
    """Bytes of the arrays of a pytree (PRNG keys included: an nnx.Dropout's stream is state too)."""
    return int(sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


def _state_bytes(node: Any) -> int:
    return tree_nbytes(nnx.state(node))


def _describe(module: Any) -> str:
    return type(module).__name__


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A module rules may select: its paths, whether it is a linear layer (``"all-linear"``), and its kind."""

    key: Any
    paths: tuple[str, ...]
    is_linear: bool
    kind: str


def nearest_paths(rule: QLoRARule, candidates: Sequence[Candidate], n: int = 5) -> str:
    """The ``n`` linear-layer paths nearest to the rule's pattern(s) (all paths if none is linear), for errors."""
    pool = [c for c in candidates if c.is_linear] or list(candidates)
    kinds = {p: c.kind for c in pool for p in c.paths}
    patterns = [rule.module_path] if isinstance(rule.module_path, str) else list(rule.module_path)
    near: list[str] = []
    for pattern in patterns:
        near += [p for p in difflib.get_close_matches(pattern, list(kinds), n=n, cutoff=0.0) if p not in near]
    return ", ".join(f"{p} ({kinds[p]})" for p in near[:n]) or "(nothing to select)"


def match_rules(rules: Sequence[QLoRARule], candidates: Sequence[Candidate], owner: str) -> dict[Any, int]:
    """``{candidate key: index of the first rule selecting it}``; a rule that selects nothing, or only what
    earlier rules took, is a QLoRAConversionError naming it (and the nearest paths). ``owner``: for messages."""
    claims: dict[Any, int] = {}
    for i, rule in enumerate(rules):
        hits = [c for c in candidates if any(rule.selects(p, c.is_linear) for p in c.paths)]
        if not hits:
            raise QLoRAConversionError(f"QLoRA rule {i} (module_path={rule.module_path!r}) matches no module of "
                                       f"{owner}; the nearest paths are: {nearest_paths(rule, candidates)}")
        fresh = [c for c in hits if c.key not in claims]
        if not fresh:
            taken = sorted({claims[c.key] for c in hits})
            raise QLoRAConversionError(f"QLoRA rule {i} (module_path={rule.module_path!r}) only matches layers that "
                                       f"rule(s) {taken} before it convert: {hits[0].paths[0]}, ...; it has no effect")
        for c in fresh:
            claims[c.key] = i
    return claims


def _plan(model: nnx.Module, rules: tuple[QLoRARule, ...]) -> list[tuple[_Module, int]]:
    """(module, rule index) for every layer to convert; raises QLoRAConversionError before anything changes."""
    table = _module_table(model)
    candidates = [Candidate(id(m.module), tuple(m.paths), isinstance(m.module, _CONVERTIBLE + (_QLoRABase,)),
                            _describe(m.module)) for m in table]
    claims = match_rules(rules, candidates, f"this {type(model).__name__}")
    plan = []
    for m in table:
        if id(m.module) not in claims:
            continue
        i, rule, module, path = claims[id(m.module)], rules[claims[id(m.module)]], m.module, m.paths[0]
        where = f"QLoRA rule {i} (module_path={rule.module_path!r}) matches {path!r}"
        if isinstance(module, _QLoRABase):
            raise QLoRAConversionError(f"{where}, which is a {_describe(module)} already: the model was converted "
                                       "before (apply_qlora runs once per layer)")
        if type(module) not in _CONVERTIBLE:
            kind = "a subclass that may compute otherwise" if isinstance(module, _CONVERTIBLE) else "not a linear layer"
            raise QLoRAConversionError(f"{where}, a {_describe(module)} ({kind}); QLoRA replaces nnx.Linear and "
                                       "nnx.Einsum layers only: narrow the rule's module_path")
        _check_convertible(module, where)
        if isinstance(module, nnx.Linear):
            in_features = module.in_features
        else:
            in_features = _einsum_layout(module, where).in_features
        ragged = ragged_blocks_reason(in_features, rule.quant)
        if ragged and rule.on_ragged_blocks == "error":
            raise QLoRAConversionError(f"{where}: {ragged}, so its blocks would straddle rows (on_ragged_blocks="
                                       f"'error'); pick a blocksize dividing {in_features}, or on_ragged_blocks="
                                       "'fallback' for bitsandbytes' flat layout")
        for container, _ in m.homes:
            if isinstance(container, tuple):
                raise QLoRAConversionError(f"{where}, which sits in a tuple and cannot be replaced in place; hold it "
                                           "in an attribute, a list or nnx.List")
        plan.append((m, i))
    return plan


def _einsum_layout(module: nnx.Einsum, where: str) -> EinsumLayout:
    if module.einsum_str is None:
        raise QLoRAConversionError(f"{where}: an nnx.Einsum whose einsum_str is passed at call time; QLoRA packs the "
                                   "kernel by its equation, so set einsum_str on the layer")
    try:
        return EinsumLayout.parse(module.einsum_str, tuple(module.kernel_shape))
    except ValueError as err:
        raise QLoRAConversionError(f"{where}: {err}") from None


def _check_convertible(module: Any, where: str) -> None:
    """Refuses layers whose behaviour a QLoRA layer would silently drop."""
    custom = []
    if isinstance(module, nnx.Linear) and module.dot_general is not jax.lax.dot_general:
        custom.append("dot_general")
    if isinstance(module, nnx.Einsum) and module.einsum_op is not jnp.einsum:
        custom.append("einsum_op")
    if module.promote_dtype is not nnx_dtypes.promote_dtype:
        custom.append("promote_dtype")
    if custom:
        raise QLoRAConversionError(f"{where}, whose custom {', '.join(custom)} the QLoRA layer would drop (it "
                                   "computes through qlora_jax.kernels.quantized_matmul)")
    for name in ("kernel", "bias"):
        variable = getattr(module, name, None)
        if variable is not None and variable.get_metadata().get("sharding_names"):
            logger.warning("%s: the %s's sharding annotation is not carried to the packed weight and adapters",
                           where, name)


def _convert(module: Any, rule: QLoRARule, rngs: nnx.Rngs | None, kernel_backend: str) -> _QLoRABase:
    kwargs = dict(lora=rule.lora, quant=rule.quant, dtype=rule.dtype, kernel_backend=rule.kernel_backend or
                  kernel_backend, rngs=rngs)
    if isinstance(module, nnx.Linear):
        return QLoRALinear.from_linear(module, **kwargs)
    return QLoRAEinsum.from_einsum(module, **kwargs)


def _storage(rule: QLoRARule) -> str:
    quant = rule.quant
    if not quant.quantized:
        return f"frozen {quant.dtype}"
    return f"{quant.quant}{'+DQ' if quant.double_quant else ''}/{quant.blocksize}"


def apply_qlora(
    model: nnx.Module,
    rules: QLoRARule | LoraConfig | Sequence[QLoRARule | LoraConfig],
    *,
    rngs: nnx.Rngs | None = None,
    kernel_backend: str = "auto",
) -> QLoRAReport:
    """Replaces the ``nnx.Linear``/``nnx.Einsum`` layers of ``model`` that ``rules`` select, in place,
    by :class:`~qlora_jax.nn.QLoRALinear`/:class:`~qlora_jax.nn.QLoRAEinsum` (same paths, so the
    model's own ``__call__`` runs them unchanged).

    ``rules``: :class:`QLoRARule`\\ s (first match wins), or a PEFT-style ``LoraConfig``.
    ``rngs``: initialises the adapters (``rngs.params()``, one draw per layer in model order) and
    LoRA dropout (``rngs.dropout``); needed when a rule has adapters. ``kernel_backend``: the
    default backend of the quantized matmuls (a rule's own overrides it; see also
    :func:`set_kernel_backend`). Layers shared between several paths (tied weights) are
    converted once and every reference is replaced. Returns a :class:`QLoRAReport`; raises
    :class:`QLoRAConversionError` (before changing anything) for what the module docstring lists.
    Train the result with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.
    """
    rules = as_rules(rules)
    if kernel_backend not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {kernel_backend!r}")
    if rngs is None and any(rule.lora is not None for rule in rules):
        raise ValueError("apply_qlora needs rngs=nnx.Rngs(...) to initialise the LoRA adapters")
    plan = _plan(model, rules)
    bytes_before = _state_bytes(model)
    layers = []
    for entry, i in plan:
        rule, old = rules[i], entry.module
        before = _state_bytes(old)
        new = _convert(old, rule, rngs, kernel_backend)
        # One layer at a time: finish this quantization before the next one allocates its temporaries.
        jax.block_until_ready(jax.tree.leaves(nnx.state(new)))
        for container, key in entry.homes:
            if isinstance(container, (nnx.List, nnx.Dict, list, dict)):
                container[key] = new
            else:
                setattr(container, key, new)
        weight = new.weight.get_value()
        layers.append(ConvertedLayer(
            path=entry.paths[0], kind="Linear" if isinstance(new, QLoRALinear) else "Einsum", rule=i,
            shape=weight_shape(weight), stacked=leading_shape(weight), storage=_storage(rule),
            rank=None if rule.lora is None else rule.lora.r, ragged=ragged_blocks_reason(new.in_features, rule.quant),
            bytes_before=before, bytes_after=_state_bytes(new)))
        del old, new
    if any(r.module_path == "all-linear" for r in rules):
        left = [p for m in _module_table(model) for p in m.paths
                if isinstance(m.module, (nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose))]
        if left:
            logger.warning("'all-linear' converts nnx.Linear and nnx.Einsum only; left as they are: %s", left)
    trainable = int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))
    report = QLoRAReport(tuple(layers), trainable, bytes_before, _state_bytes(model))
    for path in report.ragged_layers:
        logger.warning("%s: input size is not a whole number of quantization blocks; quantized in bitsandbytes' flat "
                       "layout, the fused GPU kernels fall back to XLA for it", path)
    logger.info("%s", report.summary())
    return report


def set_kernel_backend(model: nnx.Module, backend: str, module_path: str | Sequence[str] = "all-linear") -> int:
    """Sets the quantized-matmul backend of the QLoRA layers of ``model`` that ``module_path`` selects
    (rule syntax; default all of them). Returns how many layers changed; selecting none is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    targets = _normalise_targets(module_path, "module_path")
    count = 0
    for m in _module_table(model):
        if isinstance(m.module, _QLoRABase) and any(_path_matches(targets, p, True) for p in m.paths):
            m.module.kernel_backend = backend
            count += 1
    if not count:
        raise QLoRAConversionError(f"set_kernel_backend: module_path={module_path!r} selects no QLoRA layer")
    return count
