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

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qlora_jax.checkpoints.load import QuantConfig
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
from qlora_jax.quant import QuantizedTensor

__all__ = ["FROZEN", "LORA", "QLoRADense", "convert_params"]

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
    """
    rules = as_rules(rules)
    for i, rule in enumerate(rules):
        if rule.kernel_backend is not None:
            raise ValueError(f"rule {i} sets kernel_backend, which in Linen is a field of QLoRADense (set it there)")
    if "params" not in variables:
        raise QLoRAConversionError(f"convert_params takes the variables model.init returned ({{'params': ...}}), got "
                                   f"collections {sorted(variables)}")
    params = traverse_util.flatten_dict(dict(variables["params"]))
    converted_before = {path[:-1] for path in traverse_util.flatten_dict(dict(variables.get(FROZEN, {})))}
    groups: dict[tuple, dict[str, Any]] = {}
    for path, leaf in params.items():
        groups.setdefault(path[:-1], {})[path[-1]] = leaf
    modules = {prefix for path in list(params) + list(converted_before) for prefix in
               (path[:n] for n in range(1, len(path) + 1))} - set(params)

    def is_dense(module: tuple) -> bool:
        leaves = groups.get(module, {})
        return ("kernel" in leaves and set(leaves) <= {"kernel", "bias"} and np.ndim(leaves["kernel"]) == 2
                and np.ndim(leaves.get("bias", np.zeros(1))) == 1)

    names = {m: ".".join(str(k) for k in m) for m in sorted(modules)}
    candidates = [Candidate(m, (names[m],), is_dense(m) or m in converted_before,
                            "converted" if m in converted_before else "Dense" if is_dense(m) else "group")
                  for m in names]
    claims = match_rules(rules, candidates, "these parameters")
    for m, i in claims.items():
        where = f"QLoRA rule {i} (module_path={rules[i].module_path!r}) matches {names[m]!r}"
        if m in converted_before:
            raise QLoRAConversionError(f"{where}, which is converted already (it has frozen QLoRA weights)")
        if not is_dense(m):
            held = sorted(groups.get(m, {})) or "submodules"
            raise QLoRAConversionError(f"{where}, which is not an nn.Dense parameter group (it holds {held}); narrow "
                                       "the rule's module_path")
        in_features = int(np.shape(groups[m]["kernel"])[0])
        ragged = ragged_blocks_reason(in_features, rules[i].quant)
        if ragged and rules[i].on_ragged_blocks == "error":
            raise QLoRAConversionError(f"{where}: {ragged} (on_ragged_blocks='error')")

    frozen = traverse_util.flatten_dict(dict(variables.get(FROZEN, {})))
    lora: dict[tuple, Any] = traverse_util.flatten_dict(dict(variables.get(LORA, {})))
    layers = []
    for n, (m, i) in enumerate(sorted(claims.items(), key=lambda item: names[item[0]])):
        rule, group = rules[i], groups[m]
        kernel = jnp.asarray(group["kernel"])
        weight = pack_weight(kernel.T, rule.quant)
        jax.block_until_ready(weight)
        frozen[(*m, "weight")] = weight
        if "bias" in group:
            frozen[(*m, "bias")] = jnp.asarray(group["bias"]).astype(rule.quant.dtype)
        if rule.lora is not None:
            pair = init_lora_pair(jax.random.fold_in(key, n), weight_shape(weight), rule.lora.r,
                                  _adapter_dtype(rule.lora, rule.dtype, kernel.dtype))
            lora[(*m, "lora_A")], lora[(*m, "lora_B")] = pair["lora_A"], pair["lora_B"]
        for name in group:
            del params[(*m, name)]
        layers.append(ConvertedLayer(
            path=names[m], kind="Dense", rule=i, shape=weight_shape(weight), stacked=(), storage=_storage(rule),
            rank=None if rule.lora is None else rule.lora.r, ragged=ragged_blocks_reason(kernel.shape[0], rule.quant),
            bytes_before=tree_nbytes(group), bytes_after=tree_nbytes([frozen[(*m, k)] for k in ("weight", "bias")
                                                              if (*m, k) in frozen])))
    out = {name: value for name, value in variables.items() if name not in ("params", FROZEN, LORA)}
    out["params"] = traverse_util.unflatten_dict(params) if params else {}
    out[FROZEN] = traverse_util.unflatten_dict(frozen)
    if lora:
        out[LORA] = traverse_util.unflatten_dict(lora)
    trainable = int(sum(np.prod(x.shape) for x in jax.tree.leaves(out.get(LORA, {}))))
    return out, QLoRAReport(tuple(layers), trainable, tree_nbytes(dict(variables)), tree_nbytes(out))
