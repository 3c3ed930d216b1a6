"""QLoRA for Flax Linen: :class:`QLoRADense` in place of ``nn.Dense``, and :func:`convert_params`.

Variables of a ``QLoRADense`` (the layout of :mod:`qlora_jax.nn.layers`, PEFT's and bitsandbytes'):

* collection ``"frozen"``: ``weight`` (a QuantizedTensor of the ``[out, in]`` matrix, or a 16-bit
  array) and ``bias`` ``[out]``;
* collection ``"lora"``: ``lora_A [r, in]`` and ``lora_B [out, r]``.

The adapters have a collection of their own, so training them alone is a gradient over
``variables["lora"]`` with everything else passed through (no mask over ``"params"``, where the
model's other modules keep their parameters). ``QLoRADense`` takes ``nn.Dense``'s automatic name
(``Dense_0``, ``Dense_1``, ...), so swapping one for the other in a compact model keeps the
parameter paths, and :func:`convert_params` turns the ``nn.Dense`` model's variables into the
``QLoRADense`` model's: each selected ``kernel [in, out]`` transposed and packed, fresh adapters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qlora_jax.kernels import BACKENDS
from qlora_jax.lora import LoraConfig, init_lora_pair
from qlora_jax.nn.layers import DEFAULT_LORA, DEFAULT_QUANT, _adapter_dtype, _matrix_forward, pack_weight, weight_shape
from qlora_jax.nn.surgery import (
    Candidate,
    ConvertedLayer,
    QLoRAConversionError,
    QLoRAReport,
    QLoRARule,
    _storage,
    as_rules,
    match_rules,
    ragged_blocks_reason,
    tree_nbytes,
)
from qlora_jax.quant import QuantConfig, QuantizedTensor

__all__ = ["FROZEN", "LORA", "QLoRADense", "apply_converted", "convert_params", "convert_variables", "qlora_module"]

FROZEN = "frozen"
LORA = "lora"


class QLoRADense(nn.Module):
    """``nn.Dense`` with a frozen quantized kernel and a LoRA adapter: ``y = x @ W.T + bias + scaling * lora(x)``.

    Fields as ``nn.Dense`` (``features``, ``use_bias``, ``dtype``: computation dtype, None
    promoting the input's and ``param_dtype``; ``kernel_init``/``bias_init`` make the weights a
    fresh ``init`` quantizes), plus ``lora`` (None: no adapter), ``quant`` (the frozen weight's
    storage), ``kernel_backend`` (the quantized matmul's backend) and ``deterministic`` (LoRA
    dropout off; needs the ``"dropout"`` rng when on). The stored weight must be what ``quant``
    describes: a mismatch (from a tree converted with other settings) is an error naming the module.

    Attributes:
      features: output size.
      use_bias: whether to add a bias ``[features]``.
      dtype: computation dtype, or ``None`` (promote the input's and ``param_dtype``).
      param_dtype: dtype of freshly initialised weights (before quantization) and of the bias.
      kernel_init: initializer of a fresh kernel ``[in, features]`` (then quantized).
      bias_init: initializer of a fresh bias.
      lora: adapter hyperparameters, or ``None`` (no adapter).
      quant: the frozen weight's storage (a ``QuantConfig``).
      kernel_backend: the quantized matmul's backend (one of ``qlora_jax.kernels.BACKENDS``).
      deterministic: LoRA dropout off (overridable per call); ``None`` requires the call's.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    lora: LoraConfig | None = DEFAULT_LORA
    quant: QuantConfig = DEFAULT_QUANT
    kernel_backend: str = "auto"
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """``inputs [..., in]`` -> ``[..., features]`` in the computation dtype."""
        if self.kernel_backend not in BACKENDS:
            raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {self.kernel_backend!r}")
        in_features = inputs.shape[-1]
        shape = (self.features, in_features)

        def fresh_weight():
            kernel = self.kernel_init(self.make_rng("params"), (in_features, self.features), self.param_dtype)
            return pack_weight(kernel.T, self.quant)

        weight = self.variable(FROZEN, "weight", fresh_weight).value
        self._check_weight(weight, shape)
        bias = None
        if self.use_bias:
            bias = self.variable(FROZEN, "bias", lambda: self.bias_init(
                self.make_rng("params"), (self.features,), self.param_dtype).astype(self.quant.dtype)).value
        elif self.has_variable(FROZEN, "bias"):
            raise ValueError(f"{self._where()}: use_bias=False but the variables hold a bias")
        lora_a = lora_b = None
        if self.lora is not None:
            dtype = _adapter_dtype(self.lora, self.dtype, self.param_dtype)
            lora_a = self.variable(LORA, "lora_A", lambda: init_lora_pair(
                self.make_rng("params"), shape, self.lora.r, dtype)["lora_A"]).value
            lora_b = self.variable(LORA, "lora_B", lambda: jnp.zeros((self.features, self.lora.r), dtype)).value
            if lora_a.shape != (self.lora.r, in_features) or lora_b.shape != (self.features, self.lora.r):
                raise ValueError(f"{self._where()}: adapters {list(lora_a.shape)} / {list(lora_b.shape)} do not fit "
                                 f"r={self.lora.r}, in={in_features}, out={self.features}")
        elif self.has_variable(LORA, "lora_A"):
            raise ValueError(f"{self._where()}: lora=None but the variables hold adapters for this layer")

        compute = self.dtype if self.dtype is not None else jnp.promote_types(inputs.dtype, self.param_dtype)
        x = inputs.astype(compute)
        x_lora = x
        if self.lora is not None and self.lora.dropout > 0.0:
            off = nn.merge_param("deterministic", self.deterministic, deterministic)
            x_lora = nn.Dropout(self.lora.dropout, deterministic=off)(x)
        scaling = 0.0 if self.lora is None else self.lora.scaling
        y = _matrix_forward(x, x_lora, weight, lora_a, lora_b, scaling=scaling, backend=self.kernel_backend)
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return y

    def _where(self) -> str:
        return f"QLoRADense at {'/'.join(self.scope.path) or '(root)'}"

    def _check_weight(self, weight: Any, shape: tuple[int, int]) -> None:
        if weight_shape(weight) != shape:
            raise ValueError(f"{self._where()}: the frozen weight is {list(weight_shape(weight))}, the layer needs "
                             f"[out, in] = {list(shape)}")
        quant = self.quant
        if isinstance(weight, QuantizedTensor):
            stored = (weight.quant_type, weight.blocksize, weight.double_quant)
            wanted = (quant.quant, quant.blocksize, quant.double_quant)
            if not quant.quantized or stored != wanted:
                raise ValueError(f"{self._where()}: the frozen weight is {_storage_of(weight)} but the layer's quant "
                                 f"is {_storage_of_config(quant)}; convert with the same QuantConfig")
        elif quant.quantized:
            raise ValueError(f"{self._where()}: the frozen weight is an unquantized {jnp.dtype(weight.dtype).name} "
                             f"array but the layer's quant is {_storage_of_config(quant)}")


# Linen's automatic names come from the class name: take nn.Dense's, so that a compact model
# using QLoRADense where it used nn.Dense keeps its parameter paths (Dense_0, Dense_1, ...).
QLoRADense.__name__ = "Dense"


def _storage_of(qt: QuantizedTensor) -> str:
    return f"{qt.quant_type}{'+DQ' if qt.double_quant else ''}/{qt.blocksize}"


def _storage_of_config(quant: QuantConfig) -> str:
    return _storage(QLoRARule(lora=None, quant=quant))


def convert_params(
    variables: Mapping[str, Any],
    rules: QLoRARule | LoraConfig | Sequence[QLoRARule | LoraConfig],
    *,
    key: jax.Array,
) -> tuple[dict[str, Any], QLoRAReport]:
    """The variables of a QLoRADense model from those of its nn.Dense original (what ``init`` returned).

    Every ``nn.Dense`` parameter group (``{"kernel": [in, out], "bias"?: [out]}``) that ``rules``
    select (module paths are the parameter path joined by dots, ``"Block_0.Dense_1"``; rule
    syntax and errors as :func:`~qlora_jax.nn.apply_qlora`) leaves ``"params"`` and becomes
    ``"frozen"`` ``{"weight": packed [out, in], "bias"}`` plus, with adapters, ``"lora"``
    ``{"lora_A", "lora_B"}`` (PEFT's initialisation from ``key``, in ``lora.dtype``, else the
    rule's ``dtype``, else the kernel's). Other parameters and collections pass through. The
    model must declare the same ``lora``/``quant`` on those ``QLoRADense`` layers (it checks).
    Returns ``(variables, report)``; ``report.trainable_params`` counts the ``"lora"`` collection.

    Args:
      variables: the original model's variables (``{"params": ..., ...}``).
      rules: :class:`~qlora_jax.nn.QLoRARule`\\ s (first match wins), or a PEFT-style ``LoraConfig``.
      key: PRNG key for the adapters' initialisation.

    Returns:
      ``(variables, report)``: the converted variables (collections ``"params"``, ``"frozen"``,
      ``"lora"``, others unchanged) and a :class:`~qlora_jax.nn.QLoRAReport`.

    Raises:
      QLoRAConversionError: as :func:`~qlora_jax.nn.apply_qlora`.
    """
    rules = as_rules(rules)
    for i, rule in enumerate(rules):
        if rule.kernel_backend is not None:
            raise ValueError(f"rule {i} sets kernel_backend, which in Linen is a field of QLoRADense (set it there)")
    if "params" not in variables:
        raise QLoRAConversionError(f"convert_params takes the variables model.init returned ({{'params': ...}}), got "
                                   f"collections {sorted(variables)}")
    params = traverse_util.flatten_dict(dict(variables["params"]))
    dense = _DenseGroups(params, {path[:-1] for path in traverse_util.flatten_dict(dict(variables.get(FROZEN, {})))})
    candidates = [Candidate(m, (name,), dense.is_dense(m) or m in dense.converted_before,
                            "converted" if m in dense.converted_before else "Dense" if dense.is_dense(m) else "group")
                  for m, name in dense.names.items()]
    claims = match_rules(rules, candidates, "these parameters")
    for m, i in claims.items():
        dense.check_claim(m, i, rules[i])
    frozen = traverse_util.flatten_dict(dict(variables.get(FROZEN, {})))
    lora: dict[tuple, Any] = traverse_util.flatten_dict(dict(variables.get(LORA, {})))
    layers = []
    for n, (m, i) in enumerate(sorted(claims.items(), key=lambda item: dense.names[item[0]])):
        layers.append(_convert_dense(m, i, rules[i], dense, params, frozen, lora, jax.random.fold_in(key, n)))
    out, trainable = _converted_variables(variables, params, frozen, lora)
    return out, QLoRAReport(tuple(layers), trainable, tree_nbytes(dict(variables)), tree_nbytes(out))


class _DenseGroups:
    """The ``"params"`` of a Linen model as parameter groups (one per module path) and the modules
    that hold them; the ``nn.Dense`` ones are what :func:`convert_params` converts."""

    def __init__(self, params: dict[tuple, Any], converted_before: set[tuple]):
        self.converted_before = converted_before
        self.groups: dict[tuple, dict[str, Any]] = {}
        for path, leaf in params.items():
            self.groups.setdefault(path[:-1], {})[path[-1]] = leaf
        modules = {prefix for path in list(params) + list(converted_before) for prefix in
                   (path[:n] for n in range(1, len(path) + 1))} - set(params)
        self.names = {m: ".".join(str(k) for k in m) for m in sorted(modules)}

    def is_dense(self, module: tuple) -> bool:
        """Whether ``module`` holds an ``nn.Dense`` group: a 2-D ``kernel`` and maybe a 1-D ``bias``."""
        leaves = self.groups.get(module, {})
        return ("kernel" in leaves and set(leaves) <= {"kernel", "bias"} and np.ndim(leaves["kernel"]) == 2
                and np.ndim(leaves.get("bias", np.zeros(1))) == 1)

    def check_claim(self, m: tuple, i: int, rule: QLoRARule) -> None:
        """Refuses rule ``i`` matching ``m`` unless ``m`` is an unconverted Dense group it can store."""
        where = f"QLoRA rule {i} (module_path={rule.module_path!r}) matches {self.names[m]!r}"
        if m in self.converted_before:
            raise QLoRAConversionError(f"{where}, which is converted already (it has frozen QLoRA weights)")
        if not self.is_dense(m):
            held = sorted(self.groups.get(m, {})) or "submodules"
            raise QLoRAConversionError(f"{where}, which is not an nn.Dense parameter group (it holds {held}); narrow "
                                       "the rule's module_path")
        in_features = int(np.shape(self.groups[m]["kernel"])[0])
        ragged = ragged_blocks_reason(in_features, rule.quant)
        if ragged and rule.on_ragged_blocks == "error":
            raise QLoRAConversionError(f"{where}: {ragged} (on_ragged_blocks='error')")


def _convert_dense(m: tuple, i: int, rule: QLoRARule, dense: _DenseGroups, params: dict, frozen: dict, lora: dict,
                   key: jax.Array) -> ConvertedLayer:
    """Moves Dense group ``m`` from ``params`` into ``frozen`` (packed) and new adapters into ``lora``."""
    group = dense.groups[m]
    kernel = jnp.asarray(group["kernel"])
    weight = pack_weight(kernel.T, rule.quant)
    jax.block_until_ready(weight)
    frozen[(*m, "weight")] = weight
    if "bias" in group:
        frozen[(*m, "bias")] = jnp.asarray(group["bias"]).astype(rule.quant.dtype)
    if rule.lora is not None:
        pair = init_lora_pair(key, weight_shape(weight), rule.lora.r, _adapter_dtype(rule.lora, rule.dtype,
                                                                                     kernel.dtype))
        lora[(*m, "lora_A")], lora[(*m, "lora_B")] = pair["lora_A"], pair["lora_B"]
    for name in group:
        del params[(*m, name)]
    return ConvertedLayer(
        path=dense.names[m], kind="Dense", rule=i, shape=weight_shape(weight), stacked=(), storage=_storage(rule),
        rank=None if rule.lora is None else rule.lora.r, ragged=ragged_blocks_reason(kernel.shape[0], rule.quant),
        bytes_before=tree_nbytes(group), bytes_after=tree_nbytes([frozen[(*m, k)] for k in ("weight", "bias")
                                                          if (*m, k) in frozen]))


def _converted_variables(variables: Mapping[str, Any], params: dict, frozen: dict, lora: dict
                         ) -> tuple[dict[str, Any], int]:
    """The converted variables (flat ``params``/``frozen``/``lora`` nested again, other collections as
    they were) and the adapters' parameter count."""
    out = _model_variables(variables, params)
    out[FROZEN] = traverse_util.unflatten_dict(frozen)
    if lora:
        out[LORA] = traverse_util.unflatten_dict(lora)
    return out, int(sum(np.prod(x.shape) for x in jax.tree.leaves(out.get(LORA, {}))))


# ------------------------------------------------------------------------------------------------
# Any Linen model, unmodified: the weights a traced forward pass contracts (qlora_jax.nn.traced).


def _placeholder_params(variables: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(params with a ShapeDtypeStruct at every converted weight's path, {path: PackedWeight})``."""
    from qlora_jax.nn.traced import PackedWeight

    params = traverse_util.flatten_dict(dict(variables.get("params", {})))
    packed = {p: v for p, v in traverse_util.flatten_dict(dict(variables.get(FROZEN, {}))).items()
              if isinstance(v, PackedWeight)}
    for path, weight in packed.items():
        params[path] = jax.ShapeDtypeStruct(weight.shape, weight.dtype)
    return params, packed


def _model_variables(variables: Mapping[str, Any], params: dict) -> dict[str, Any]:
    """The variables the model itself knows: ours (packed weights, adapters) left out."""
    out = {name: value for name, value in variables.items() if name not in ("params", FROZEN, LORA)}
    out["params"] = traverse_util.unflatten_dict(params) if params else {}
    return out


def _trace_apply(model: nn.Module, variables: dict, method: Any, args: tuple, kwargs: dict):
    from qlora_jax.nn.dataflow import trace_forward
    from qlora_jax.nn.traced import _split_args

    dyn_args, rebuild = _split_args(args, kwargs)

    def forward(model_vars, dyn):
        call_args, call_kwargs = rebuild(dyn)
        return nn.Module.apply(model, model_vars, *call_args, method=method, **call_kwargs)

    closed, out_tree = trace_forward(forward, variables, dyn_args)
    position = {id(leaf): k for k, leaf in enumerate(jax.tree.leaves((variables, dyn_args)))}
    return closed, out_tree, position, jax.tree.leaves((variables, dyn_args))


def convert_variables(
    model: nn.Module,
    variables: Mapping[str, Any],
    rules: QLoRARule | LoraConfig | Sequence[QLoRARule | LoraConfig],
    *example_args: Any,
    key: jax.Array,
    method: Any = None,
    kernel_backend: str = "auto",
    **example_kwargs: Any,
) -> tuple[dict[str, Any], QLoRAReport]:
    """QLoRA for an unmodified Linen model: the weights its forward pass contracts, selected by ``rules``.

    ``model.apply(variables, *example_args, method=method, **example_kwargs)`` is traced once; each
    ``"params"`` weight of two or more axes that only contractions consume (``jnp.einsum`` with an
    equation given at call time included) is a candidate, as in :func:`qlora_jax.nn.apply_qlora`
    (same rules, paths ``"layer_0.attn.q_einsum.w"`` for the weight and ``"layer_0.attn.q_einsum"``
    for its module, same errors). Each selected weight leaves ``"params"`` and becomes a
    :class:`~qlora_jax.nn.traced.PackedWeight` at the same path of collection ``"frozen"``, with
    adapters ``<name>_lora_A [*lead, r, in]`` / ``<name>_lora_B [*lead, out, r]`` beside it in
    collection ``"lora"`` (PEFT's initialisation from ``key``). Returns ``(variables, report)``;
    run the result with :func:`apply_converted` (or the module :func:`qlora_module` returns).

    Args:
      model: the unmodified Linen model.
      variables: its variables (``{"params": ..., ...}``).
      rules: :class:`~qlora_jax.nn.QLoRARule`\\ s (first match wins), or a PEFT-style ``LoraConfig``.
      *example_args: example positional inputs of ``model.apply`` (traced, not run).
      key: PRNG key for the adapters' initialisation.
      method: the ``method`` passed to ``model.apply`` (``None``: ``__call__``).
      kernel_backend: default backend of the quantized matmuls.
      **example_kwargs: example keyword inputs of ``model.apply``.

    Returns:
      ``(variables, report)``: the converted variables and a :class:`~qlora_jax.nn.QLoRAReport`.

    Raises:
      QLoRAConversionError: as :func:`~qlora_jax.nn.apply_qlora`.
    """
    from qlora_jax.nn import traced
    from qlora_jax.nn.dataflow import weight_uses
    from qlora_jax.nn.surgery import _traced_layout, _use_kind, traced_left

    rules = as_rules(rules)
    _check_traced_conversion(rules, variables, kernel_backend)
    params, packed_before = _placeholder_params(variables)
    candidates = {p: v for p, v in params.items() if np.ndim(v) >= 2}
    traced_params = {p: (jax.ShapeDtypeStruct(np.shape(v), v.dtype) if p in candidates else v)
                     for p, v in params.items()}
    model_vars = _model_variables(variables, traced_params)
    closed, _, position, _ = _trace_apply(model, model_vars, method, example_args, example_kwargs)
    index = {position[id(traced_params[p])]: p for p in candidates}
    uses = weight_uses(closed, {k: tuple(np.shape(candidates[p])) for k, p in index.items()})
    facts = {p: traced.WeightFacts(p, tuple(np.shape(candidates[p])), tuple(uses[k])) for k, p in index.items()}
    converted = set(packed_before)
    names = {p: ".".join(str(k) for k in p) for p in facts}
    cands = [Candidate(p, (names[p], ".".join(str(k) for k in p[:-1])), facts[p].is_linear and p not in converted,
                       "converted" if p in converted else _use_kind(facts[p])) for p in facts]
    owner = f"{type(model).__name__}.{getattr(method, '__name__', method) or '__call__'}"
    claims = match_rules(rules, cands, "these parameters")
    layouts = {p: _traced_layout(p, i, rules[i], facts[p], p in converted, owner) for p, i in claims.items()}

    plain = traverse_util.flatten_dict(dict(variables["params"]))
    frozen = traverse_util.flatten_dict(dict(variables.get(FROZEN, {})))
    lora = traverse_util.flatten_dict(dict(variables.get(LORA, {})))
    layers = [_convert_traced(p, i, rules[i], layouts[p], names[p], plain, frozen, lora, jax.random.fold_in(key, n),
                              kernel_backend)
              for n, (p, i) in enumerate(sorted(claims.items(), key=lambda item: list(facts).index(item[0])))]
    out, trainable = _converted_variables(variables, plain, frozen, lora)
    left = tuple(traced_left(facts, claims, rules, converted))
    return out, QLoRAReport(tuple(layers), trainable, tree_nbytes(dict(variables)), tree_nbytes(out), left)


def _check_traced_conversion(rules: Sequence[QLoRARule], variables: Mapping[str, Any], kernel_backend: str) -> None:
    """Refuses what :func:`convert_variables` cannot do, before tracing."""
    if kernel_backend not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {kernel_backend!r}")
    for i, rule in enumerate(rules):
        if rule.lora is not None and rule.lora.dropout > 0:
            raise NotImplementedError(f"rule {i}: LoRA dropout is not supported when converting by a traced forward "
                                      "pass; use dropout=0")
    if "params" not in variables:
        raise QLoRAConversionError(f"convert_variables takes the variables model.init returned ({{'params': ...}}), "
                                   f"got collections {sorted(variables)}")


def _convert_traced(p: tuple, i: int, rule: QLoRARule, layout: Any, name: str, plain: dict, frozen: dict,
                    lora: dict, key: jax.Array, kernel_backend: str) -> ConvertedLayer:
    """Moves weight ``p`` from ``plain`` into ``frozen`` (a PackedWeight) and new adapters into ``lora``."""
    from qlora_jax.nn import traced
    from qlora_jax.nn.surgery import _storage as storage_of

    weight = jnp.asarray(plain.pop(p))
    packed = traced.pack_for_layout(weight, layout, rule.quant)
    jax.block_until_ready(packed)
    frozen[p] = traced.PackedWeight(packed, layout, jnp.dtype(weight.dtype), 0.0 if rule.lora is None else
                                    rule.lora.scaling, rule.kernel_backend or kernel_backend, rule.lora is not None)
    after = traced.packed_nbytes(packed)
    if rule.lora is not None:
        pair = traced.new_adapters(key, layout, rule.lora.r, _adapter_dtype(rule.lora, rule.dtype, weight.dtype))
        a_name, b_name = traced.adapter_names(p[-1])
        lora[(*p[:-1], a_name)], lora[(*p[:-1], b_name)] = pair["lora_A"], pair["lora_B"]
        after += int(pair["lora_A"].nbytes + pair["lora_B"].nbytes)
    return ConvertedLayer(
        path=name, kind="contraction", rule=i, shape=(layout.out_features, layout.in_features),
        stacked=layout.lead_shape, storage=storage_of(rule), rank=None if rule.lora is None else rule.lora.r,
        ragged=ragged_blocks_reason(layout.in_features, rule.quant), bytes_before=int(weight.nbytes),
        bytes_after=after, layout=layout.describe())


def apply_converted(model: nn.Module, variables: Mapping[str, Any], *args: Any, method: Any = None,
                    **kwargs: Any) -> Any:
    """``model.apply(variables, *args, method=method, **kwargs)`` on variables from :func:`convert_variables`.

    The model's own code runs, with every contraction of a packed weight computed as
    :func:`qlora_jax.kernels.quantized_matmul` plus ``scaling * x @ A.T @ B.T`` (the adapters from
    collection ``"lora"``, differentiable). Keyword arguments of ``apply`` (``mutable``, ``rngs``)
    pass through. Returns what ``apply`` returns.

    Args:
      model: the unmodified Linen model.
      variables: the variables :func:`convert_variables` returned.
      *args: the model's positional inputs.
      method: the ``method`` of ``model.apply``.
      **kwargs: the model's keyword inputs and ``apply``'s own (``mutable``, ``rngs``).

    Returns:
      What ``model.apply`` returns (with ``mutable``, ``(output, updated collections)``).

    Raises:
      ValueError: adapters missing from collection ``"lora"`` for a packed weight that has them.
    """
    from qlora_jax.nn.dataflow import VirtualWeight, run_with_weights
    from qlora_jax.nn.traced import _root_view, adapter_names

    params, packed = _placeholder_params(variables)
    model_vars = _model_variables(variables, params)
    closed, out_tree, position, leaves = _trace_apply(model, model_vars, method, args, kwargs)
    lora = traverse_util.flatten_dict(dict(variables.get(LORA, {})))
    inputs = list(leaves)
    for path, weight in packed.items():
        lora_a = lora_b = None
        if weight.has_lora:
            a_name, b_name = adapter_names(path[-1])
            try:
                lora_a, lora_b = lora[(*path[:-1], a_name)], lora[(*path[:-1], b_name)]
            except KeyError:
                raise ValueError(f"the variables have no adapters {'/'.join(map(str, path[:-1]))}/{a_name} in "
                                 f"collection {LORA!r} for the packed weight {'/'.join(map(str, path))}") from None
        inputs[position[id(params[path])]] = VirtualWeight(
            weight.packed, lora_a, lora_b, weight.scaling, weight.layout, _root_view(weight.layout), weight.dtype,
            weight.backend)
    return jax.tree.unflatten(out_tree, run_with_weights(closed, inputs))


_LINEN_CLASSES: dict[type, type] = {}


def qlora_module(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``apply`` is :func:`apply_converted`, for trainers that call ``model.apply``.

    Args:
      model: the unmodified Linen model.

    Returns:
      An instance of a subclass of ``type(model)`` with the same fields.
    """
    cls = type(model)
    if cls not in _LINEN_CLASSES:
        def apply(self, variables, *args, **kwargs):
            return apply_converted(self, variables, *args, **kwargs)

        _LINEN_CLASSES[cls] = type(f"QLoRA{cls.__name__}", (cls,), {"apply": apply, "__module__": cls.__module__})
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.init and f.name not in ("parent", "name")}
    return _LINEN_CLASSES[cls](**fields)
