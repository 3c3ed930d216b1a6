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

from qlora_jax.kernels import BACKENDS
from qlora_jax.lora import LoraConfig
from qlora_jax.models.layout import matches_target_modules
from qlora_jax.nn.layers import EinsumLayout, QLoRAEinsum, QLoRALinear, _QLoRABase, leading_shape, weight_shape
from qlora_jax.quant import QuantConfig

__all__ = [
    "QLoRARule",
    "QLoRAReport",
    "Candidate",
    "ConvertedLayer",
    "LeftWeight",
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
    (:class:`~qlora_jax.quant.QuantConfig`; "nf4"/"fp4"/"int8" with double quant and
    block size, or a 16-bit mode). ``kernel_backend``: the quantized matmul's backend for these
    layers (None: :func:`apply_qlora`'s). ``dtype``: the layers' computation dtype (None: the
    replaced layer's own ``dtype``). ``exclude``: paths this rule leaves alone (same syntax as
    ``module_path``). ``on_ragged_blocks``: what to do with a layer whose input size is not a
    multiple of the block size: "fallback" quantizes it in bitsandbytes' flat layout (exact and
    interchangeable, but the fused GPU kernels then dequantize with XLA instead, and its codes
    cannot shard by rows), "error" refuses it.

    Attributes:
      module_path: ``"all-linear"``, a tuple of names, or a regular expression; ``None`` takes
        ``lora.target_modules`` (stored normalised: never ``None`` after construction).
      lora: adapter hyperparameters, or ``None`` (frozen, no adapter).
      quant: the frozen weight's storage (a ``QuantConfig``).
      kernel_backend: the quantized matmul's backend, or ``None`` (:func:`apply_qlora`'s).
      dtype: the layers' computation dtype name, or ``None`` (the replaced layer's).
      exclude: paths this rule leaves alone (same syntax as ``module_path``), or ``None``.
      on_ragged_blocks: ``"fallback"`` or ``"error"``.

    Raises:
      ValueError: both ``module_path`` and non-default ``lora.target_modules``, an invalid pattern,
        an unknown ``kernel_backend`` or ``on_ragged_blocks``.
      TypeError: ``quant`` not a QuantConfig, or ``lora`` not a LoraConfig.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
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
    return matches_target_modules(targets, path)


def as_rules(rules: QLoRARule | LoraConfig | Sequence[QLoRARule | LoraConfig]) -> tuple[QLoRARule, ...]:
    """Rules from a rule, a PEFT-style LoraConfig (its ``target_modules`` select the layers), or a sequence of them.

    Args:
      rules: a :class:`QLoRARule`, a ``LoraConfig``, or a sequence of them.

    Returns:
      A tuple of :class:`QLoRARule` (a LoraConfig ``c`` becomes ``QLoRARule(lora=c)``).

    Raises:
      TypeError: an element that is neither.
      ValueError: no rule.
    """
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
    """Why ``in_features`` is not a whole number of ``quant``'s blocks (fused kernels then fall back), or None.

    Args:
      in_features: the layer's input size (columns of its ``[out, in]`` matrix).
      quant: the storage settings; unquantized modes are never ragged.

    Returns:
      A reason (``str``) or ``None``.
    """
    if not quant.quantized:
        return None
    if in_features % quant.blocksize or in_features % 2:
        return f"in_features={in_features} is not a multiple of blocksize={quant.blocksize}"
    return None


@dataclasses.dataclass(frozen=True)
class ConvertedLayer:
    """One layer :func:`apply_qlora` replaced.

    ``shape``: ``(out, in)`` of each packed matrix, ``stacked``: the axes in front of it (nnx.vmap
    layers, einsum batch axes); bytes of the layer's arrays.

    Attributes:
      path: the layer's (or weight's) path in the model.
      kind: ``"Linear"``, ``"Einsum"``, ``"Dense"`` (Linen) or ``"contraction"`` (traced).
      rule: index of the rule that converted it.
      shape: ``(out, in)`` of each packed matrix.
      stacked: the leading axes' sizes.
      storage: e.g. ``"nf4+DQ/64"`` or ``"frozen bfloat16"``.
      rank: the adapters' rank, or ``None`` without adapter.
      ragged: why the blocks are ragged (flat layout), or ``None``.
      bytes_before: bytes of the layer's arrays before conversion.
      bytes_after: bytes after (packed weight, bias, adapters).
      layout: the traced weight's layout description, or ``""``.
    """

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
    layout: str = ""


@dataclasses.dataclass(frozen=True)
class LeftWeight:
    """A contraction weight :func:`apply_qlora` left in 16/32 bits: its path, shape, and why.

    Attributes:
      path: the weight's path in the model.
      shape: its shape.
      reason: ``"excluded by rule i"``, ``"not selected"``, ``"embedding (used by lookup)"``, or the
        non-linear operation that also uses it.
    """

    path: str
    shape: tuple[int, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class QLoRAReport:
    """What :func:`apply_qlora` did.

    The layers (or weights) converted, in model order, the trainable (LoRA) parameter count after
    it, the bytes of the model's whole state before and after, and (with example inputs) every
    contraction weight left unconverted, with the reason.

    Attributes:
      layers: the :class:`ConvertedLayer`\\ s, in model order.
      trainable_params: number of LoRA parameters after conversion.
      bytes_before: bytes of the model's whole state before.
      bytes_after: bytes after.
      left: the :class:`LeftWeight`\\ s (with example inputs only).
    """

    layers: tuple[ConvertedLayer, ...]
    trainable_params: int
    bytes_before: int
    bytes_after: int
    left: tuple[LeftWeight, ...] = ()

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
            layout = f" [{layer.layout}]" if layer.layout else ""
            lines.append(f"  {layer.path}: {layer.kind}{layout} {stacked}{list(layer.shape)} {layer.storage}, {lora}, "
                         f"rule {layer.rule}, {layer.bytes_before * mib:.3f} -> {layer.bytes_after * mib:.3f} "
                         f"MiB{ragged}")
        if self.left:
            lines.append(f"left in 16/32 bits ({len(self.left)} contraction weights):")
            lines += [f"  {w.path}: {list(w.shape)}, {w.reason}" for w in self.left]
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
    """Bytes of the arrays of a pytree (PRNG keys included: an nnx.Dropout's stream is state too).

    Args:
      tree: any pytree; leaves without ``nbytes`` count 0.

    Returns:
      Total bytes (``int``).
    """
    return int(sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


def _state_bytes(node: Any) -> int:
    return tree_nbytes(nnx.state(node))


def _describe(module: Any) -> str:
    return type(module).__name__


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A module rules may select: its paths, whether it is a linear layer (``"all-linear"``), and its kind.

    Attributes:
      key: an identifier of the module (or weight), hashable.
      paths: every dotted path reaching it.
      is_linear: whether ``"all-linear"`` selects it.
      kind: its type, for messages.
    """

    key: Any
    paths: tuple[str, ...]
    is_linear: bool
    kind: str


def nearest_paths(rule: QLoRARule, candidates: Sequence[Candidate], n: int = 5) -> str:
    """The ``n`` linear-layer paths nearest to the rule's pattern(s) (all paths if none is linear), for errors.

    Args:
      rule: the rule whose ``module_path`` is compared.
      candidates: the modules the rule could have selected.
      n: how many paths to name.

    Returns:
      ``"path (kind), ..."``, or ``"(nothing to select)"``.
    """
    pool = [c for c in candidates if c.is_linear] or list(candidates)
    kinds = {p: c.kind for c in pool for p in c.paths}
    patterns = [rule.module_path] if isinstance(rule.module_path, str) else list(rule.module_path)
    near: list[str] = []
    for pattern in patterns:
        near += [p for p in difflib.get_close_matches(pattern, list(kinds), n=n, cutoff=0.0) if p not in near]
    return ", ".join(f"{p} ({kinds[p]})" for p in near[:n]) or "(nothing to select)"


def match_rules(rules: Sequence[QLoRARule], candidates: Sequence[Candidate], owner: str) -> dict[Any, int]:
    """``{candidate key: index of the first rule selecting it}``.

    A rule that selects nothing, or only what earlier rules took, is a QLoRAConversionError naming
    it (and the nearest paths).

    Args:
      rules: the rules, first match wins.
      candidates: the modules (or weights) they may select.
      owner: what holds the candidates, for messages.

    Returns:
      ``{candidate key: rule index}``.

    Raises:
      QLoRAConversionError: a rule without effect.
    """
    claims: dict[Any, int] = {}
    for i, rule in enumerate(rules):
        # A candidate with several paths (a weight and its module) is excluded if any of them is.
        hits = [c for c in candidates if any(rule.selects(p, c.is_linear) for p in c.paths)
                and not (rule.exclude is not None and any(_path_matches(rule.exclude, p, c.is_linear)
                                                          for p in c.paths))]
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
    *example_args: Any,
    rngs: nnx.Rngs | None = None,
    kernel_backend: str = "auto",
    methods: Sequence[str] = ("__call__",),
    **example_kwargs: Any,
) -> QLoRAReport:
    """Makes ``model`` QLoRA in place: the weights ``rules`` select become frozen packed weights with adapters.

    **With example inputs** (``apply_qlora(model, rules, *args, rngs=..., **kwargs)``: what
    ``model.<methods[0]>`` takes), the selection is by what each weight does: the forward pass is
    traced once, and every weight that is the non-activation operand of a contraction
    (``jnp.einsum``, ``jnp.dot``/``matmul``/``@``, ``lax.dot_general``), in whatever module, is a
    candidate (:mod:`qlora_jax.nn.traced`). Rules match parameter paths (``layers.3.attn.q_proj.w``)
    and the paths of the modules holding them (``layers.3.attn.q_proj``); ``"all-linear"`` takes
    every weight used only by contractions (embeddings used by lookup are not: a tied head stays
    16/32-bit). The model's code is not edited: its class is swapped for a subclass whose
    ``methods`` run the contractions of converted weights through
    :func:`qlora_jax.kernels.quantized_matmul` plus the LoRA term. The report lists every
    contraction weight left unconverted, with the reason. Raises QLoRAConversionError (before
    changing anything) for a selected weight that no contraction consumes, one also used by a
    non-linear operation (a lookup included), one consumed in two layouts, a ragged block size
    with ``on_ragged_blocks="error"``, and a weight converted before.

    **Without example inputs**, it replaces the ``nnx.Linear``/``nnx.Einsum`` layers ``rules``
    select by :class:`~qlora_jax.nn.QLoRALinear`/:class:`~qlora_jax.nn.QLoRAEinsum` (same paths,
    so the model's own ``__call__`` runs them unchanged); ``"all-linear"`` then refuses a model
    with other weights of two or more axes (it cannot tell, without a forward pass, whether they
    are projections), naming them.

    ``rules``: :class:`QLoRARule`\\ s (first match wins), or a PEFT-style ``LoraConfig``.
    ``rngs``: initialises the adapters (``rngs.params()``, one draw per layer in model order) and
    LoRA dropout (``rngs.dropout``); needed when a rule has adapters. ``kernel_backend``: the
    default backend of the quantized matmuls (a rule's own overrides it; see also
    :func:`set_kernel_backend`). Layers shared between several paths (tied weights) are
    converted once and every reference is replaced. Returns a :class:`QLoRAReport`; raises
    :class:`QLoRAConversionError` (before changing anything) for what the module docstring lists.
    Train the result with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.

    Args:
      model: the NNX model, converted in place.
      rules: :class:`QLoRARule`\\ s (first match wins), or a PEFT-style ``LoraConfig``.
      *example_args: example positional inputs of ``model.<methods[0]>`` (arrays; traced, not run);
        none selects ``nnx.Linear``/``nnx.Einsum`` layers instead.
      rngs: ``nnx.Rngs`` for the adapters' initialisation and LoRA dropout.
      kernel_backend: default backend of the quantized matmuls (one of ``kernels.BACKENDS``).
      methods: the model's methods that run on the converted weights (with example inputs).
      **example_kwargs: example keyword inputs of ``model.<methods[0]>``.

    Returns:
      A :class:`QLoRAReport`.

    Raises:
      QLoRAConversionError: a rule or weight it cannot convert (before changing anything).
      ValueError: an unknown ``kernel_backend``.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021.
    """
    rules = as_rules(rules)
    if kernel_backend not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {kernel_backend!r}")
    if rngs is None and any(rule.lora is not None for rule in rules):
        raise ValueError("apply_qlora needs rngs=nnx.Rngs(...) to initialise the LoRA adapters")
    if example_args or example_kwargs:
        return _apply_traced(model, rules, example_args, example_kwargs, rngs=rngs, kernel_backend=kernel_backend,
                             methods=tuple(methods))
    if any(r.module_path == "all-linear" for r in rules):
        _refuse_untraced_weights(model)
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
    trainable = int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))
    report = QLoRAReport(tuple(layers), trainable, bytes_before, _state_bytes(model))
    for path in report.ragged_layers:
        logger.warning("%s: input size is not a whole number of quantization blocks; quantized in bitsandbytes' flat "
                       "layout, the fused GPU kernels fall back to XLA for it", path)
    logger.info("%s", report.summary())
    return report


def set_kernel_backend(model: nnx.Module, backend: str, module_path: str | Sequence[str] = "all-linear") -> int:
    """Sets the quantized-matmul backend of the QLoRA layers of ``model`` that ``module_path`` selects.

    ``module_path`` uses the rule syntax; the default selects all of them.

    Args:
      model: the converted NNX model.
      backend: one of ``qlora_jax.kernels.BACKENDS``.
      module_path: ``"all-linear"``, names or a regular expression.

    Returns:
      How many layers changed (``int``).

    Raises:
      ValueError: an unknown ``backend``.
      QLoRAConversionError: ``module_path`` selects no QLoRA layer.
    """
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


def _refuse_untraced_weights(model: nnx.Module) -> None:
    """'all-linear' without a forward pass: weights of 2+ axes outside Linear/Einsum/Embed would be left silently."""
    unknown = []
    for m in _module_table(model):
        if isinstance(m.module, (*_CONVERTIBLE, _QLoRABase, nnx.Embed)):
            continue
        for key, value in vars(m.module).items():
            if isinstance(value, nnx.Param) and not isinstance(value, nnx.LoRAParam) and value.ndim >= 2:
                unknown.append(f"{m.paths[0]}.{key} {list(value.shape)}")
    if unknown:
        raise QLoRAConversionError(
            f"'all-linear' without example inputs converts nnx.Linear/nnx.Einsum layers only, and this model has "
            f"other weights that may be projections: {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}. "
            "Pass example inputs (apply_qlora(model, rules, *args, rngs=...)) so that every contraction weight is "
            "found, or name the layers")


def _dotted(path: tuple) -> str:
    return ".".join(str(k) for k in path)


def _apply_traced(model, rules, args, kwargs, *, rngs, kernel_backend, methods) -> QLoRAReport:
    from qlora_jax.nn import traced

    for i, rule in enumerate(rules):
        if rule.lora is not None and rule.lora.dropout > 0:
            raise NotImplementedError(f"rule {i}: LoRA dropout is not supported when converting by a traced forward "
                                      "pass; use dropout=0")
    if not methods:
        raise ValueError("apply_qlora(methods=...) needs at least one method name")

    def is_candidate(path, var):
        if isinstance(var, traced.QLoRAWeight):
            return True
        return isinstance(var, nnx.Param) and not isinstance(var, nnx.LoRAParam) and var.ndim >= 2

    facts = traced.trace_weight_uses(model, methods[0], args, kwargs, is_candidate)
    _, flat = traced._call_state(model)
    variables = dict(flat)
    converted = {p for p in facts if isinstance(variables[p], traced.QLoRAWeight)}
    candidates = [Candidate(p, (_dotted(p), _dotted(p[:-1])), facts[p].is_linear and p not in converted,
                            "converted" if p in converted else _use_kind(facts[p])) for p in facts]
    claims = match_rules(rules, candidates, f"this {type(model).__name__}")
    owner = f"{type(model).__name__}.{methods[0]}"
    layouts = {}
    for p, i in claims.items():
        layouts[p] = _traced_layout(p, i, rules[i], facts[p], p in converted, owner)
        _holder(model, p, i, rules[i])
    bytes_before = _state_bytes(model)
    layers = []
    for p, i in sorted(claims.items(), key=lambda item: list(facts).index(item[0])):
        layers.append(_convert_weight(model, p, i, rules[i], layouts[p], rngs, kernel_backend))
    left = tuple(traced_left(facts, claims, rules, converted))
    traced.wrap_methods(model, methods)
    trainable = int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))
    report = QLoRAReport(tuple(layers), trainable, bytes_before, _state_bytes(model), left)
    logger.info("%s", report.summary())
    return report


def _use_kind(facts) -> str:
    kinds = sorted({u.op for u in facts.uses})
    return "contraction" if facts.is_linear else ("unused" if not kinds else "+".join(kinds))


def _traced_layout(path, i, rule, facts, converted: bool, owner: str):
    where = f"QLoRA rule {i} (module_path={rule.module_path!r}) matches the weight {_dotted(path)!r}"
    if converted:
        raise QLoRAConversionError(f"{where}, which is converted already (apply_qlora runs once per weight)")
    if not facts.uses:
        raise QLoRAConversionError(f"{where}, which no contraction consumes in {owner} on the example inputs")
    others = sorted({u.op for u in facts.uses if u.kind != "contraction"})
    if others:
        kind = "a lookup (an embedding)" if facts.is_lookup else "a non-linear operation"
        raise QLoRAConversionError(f"{where}, which {kind} also uses ({', '.join(others)}); QLoRA converts weights "
                                   "used only by contractions: narrow the rule")
    found = list(dict.fromkeys(u.layout for u in facts.contractions))
    if len(found) > 1:
        raise QLoRAConversionError(f"{where}, which contractions consume in different layouts: "
                                   f"{'; '.join(x.describe() for x in found)}; one packed layout cannot serve both")
    layout = found[0]
    ragged = ragged_blocks_reason(layout.in_features, rule.quant)
    if ragged and rule.on_ragged_blocks == "error":
        raise QLoRAConversionError(f"{where}: {ragged} (the contracted size of {layout.describe()}), so its blocks "
                                   "would straddle rows (on_ragged_blocks='error'); pick a blocksize dividing "
                                   f"{layout.in_features}, or on_ragged_blocks='fallback'")
    return layout


def _holder(model, path, i, rule):
    node = model
    for key in path[:-1]:
        node = node[key] if isinstance(node, (nnx.List, nnx.Dict, list, dict)) else getattr(node, key)
    if not isinstance(node, nnx.Module) or isinstance(node, (nnx.List, nnx.Dict)):
        raise QLoRAConversionError(f"QLoRA rule {i} (module_path={rule.module_path!r}) matches the weight "
                                   f"{_dotted(path)!r}, which sits in a {type(node).__name__}, not as an attribute "
                                   "of a module; its adapters need a module to live in")
    return node


def _convert_weight(model, path, i, rule, layout, rngs, kernel_backend) -> ConvertedLayer:
    from qlora_jax.nn import traced

    holder, name = _holder(model, path, i, rule), path[-1]
    old = getattr(holder, name)
    weight = old.get_value()
    packed = traced.pack_for_layout(weight, layout, rule.quant)
    jax.block_until_ready(packed)
    lora = rule.lora
    backend = rule.kernel_backend or kernel_backend
    value = traced.PackedWeight(packed, layout, jnp.dtype(weight.dtype), 0.0 if lora is None else lora.scaling, backend,
                                lora is not None)
    names = old.get_metadata().get("out_sharding")
    lead_names = out_name = in_name = None
    metadata = {}
    if names:
        lead_names = tuple(names[a] for a in layout.layers + layout.batch)
        out_name = next((names[a] for a in layout.out if names[a] is not None), None)
        in_name = next((names[a] for a in layout.in_ if names[a] is not None), None)
        metadata["packed_sharding"] = (*lead_names, out_name, in_name)
    new = traced.QLoRAWeight(value, **metadata)
    for container, key in _variable_homes(model, old):
        if isinstance(container, (nnx.List, nnx.Dict, list, dict)):
            container[key] = new
        else:
            setattr(container, key, new)
    after = traced.packed_nbytes(packed)
    if lora is not None:
        from qlora_jax.nn.layers import _adapter_dtype

        pair = traced.new_adapters(rngs.params(), layout, lora.r, _adapter_dtype(lora, rule.dtype, weight.dtype))
        a_name, b_name = traced.adapter_names(name)
        extra_a = extra_b = {}
        if names:
            extra_a = {"out_sharding": (*lead_names, None, in_name), "eager_sharding": False}
            extra_b = {"out_sharding": (*lead_names, out_name, None), "eager_sharding": False}
        setattr(holder, a_name, nnx.LoRAParam(pair["lora_A"], **extra_a))
        setattr(holder, b_name, nnx.LoRAParam(pair["lora_B"], **extra_b))
        after += int(pair["lora_A"].nbytes + pair["lora_B"].nbytes)
    return ConvertedLayer(
        path=_dotted(path), kind="contraction", rule=i, shape=(layout.out_features, layout.in_features),
        stacked=layout.lead_shape, storage=_storage(rule), rank=None if lora is None else lora.r,
        ragged=ragged_blocks_reason(layout.in_features, rule.quant), bytes_before=int(weight.nbytes),
        bytes_after=after, layout=layout.describe())


def _variable_homes(model, variable) -> list[tuple[Any, Any]]:
    homes, seen = [], set()

    def visit(node):
        if id(node) in seen:
            return
        seen.add(id(node))
        for key, child in _children(node):
            if child is variable:
                homes.append((node, key))
            elif isinstance(child, (nnx.Module, list, tuple, dict)):
                visit(child)

    visit(model)
    return homes


def traced_left(facts, claims, rules, converted) -> list[LeftWeight]:
    """Contraction weights not converted, with the reason (for :class:`QLoRAReport.left`)."""
    left = []
    for p, f in facts.items():
        if p in claims or p in converted or not f.contractions:
            continue
        dotted = (_dotted(p), _dotted(p[:-1]))
        if f.is_lookup:
            reason = "embedding (used by lookup)"
        elif not f.is_linear:
            reason = f"also used by {', '.join(sorted({u.op for u in f.uses if u.kind != 'contraction'}))}"
        else:
            excluded = [i for i, r in enumerate(rules) if r.exclude is not None
                        and any(_path_matches(r.exclude, d, True) for d in dotted)]
            reason = f"excluded by rule {excluded[0]}" if excluded else "not selected"
        left.append(LeftWeight(_dotted(p), f.shape, reason))
    return left
