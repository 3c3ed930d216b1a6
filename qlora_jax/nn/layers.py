"""Flax NNX QLoRA layers: a frozen (quantized) weight plus LoRA adapters, for any NNX model.

Parameter layout, the same as the built-in LLaMA (:mod:`qlora_jax.models.llama`), PEFT and
bitsandbytes, so that adapters and packed weights move between them without conversion:

* ``weight``: :class:`FrozenWeights` holding a :class:`~qlora_jax.quant.QuantizedTensor` of the
  ``[out, in]`` matrix (bitsandbytes' orientation and bytes: ``to_bnb_state_dict`` writes it as
  ``Linear4bit`` stores it), or a 16-bit ``[out, in]`` array for an unquantized frozen base.
  Flax stores kernels ``[in, out]``; :meth:`QLoRALinear.from_linear` transposes once, at
  conversion, and never again.
* ``bias``: :class:`FrozenWeights` ``[out]``, or None.
* ``lora_A``: ``nnx.LoRAParam`` ``[r, in]``; ``lora_B``: ``nnx.LoRAParam`` ``[out, r]`` (PEFT's
  ``lora_A.weight`` / ``lora_B.weight``), initialised as PEFT does (A Kaiming-uniform, B zero).

``y = x @ W.T + bias + scaling * dropout(x) @ A.T @ B.T`` with ``scaling = alpha / r`` (or
``alpha / sqrt(r)``, rsLoRA). The base matmul runs through
:func:`qlora_jax.kernels.quantized_matmul` with the layer's ``kernel_backend``.

Layers converted from ``nnx.vmap``-stacked modules (``kernel [L, in, out]``) keep the leading
axes on every array (the QuantizedTensor's metadata describes one slice, as in the LLaMA
decoder's layer-stacked base), so an ``nnx.scan`` over the stack sees ordinary layers.

Dtypes follow ``nnx.Linear``: ``dtype`` is the computation dtype (None: the promotion of the
input's dtype and ``param_dtype``, the original weight's dtype). Adapters are stored in
``LoraConfig.dtype``, or by default in the dtype the layer computes in (``dtype``, else
``param_dtype``): bfloat16 adapters on a bfloat16 layer, float32 ones when asked.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.kernels import BACKENDS
from qlora_jax.linear import base_matmul, lora_delta
from qlora_jax.lora import LoraConfig, init_lora_pair
from qlora_jax.quant import QuantConfig, QuantizationError, QuantizedTensor, quantize
from qlora_jax.quant.tensor import codes_shape

__all__ = [
    "FrozenWeights",
    "QLoRALinear",
    "QLoRAEinsum",
    "EinsumLayout",
    "pack_weight",
    "weight_shape",
    "leading_shape",
]

# QLoRA's defaults (qlora.py: r=64, alpha=16; NF4 with double quantization in blocks of 64).
DEFAULT_LORA = LoraConfig()
DEFAULT_QUANT = QuantConfig()


class FrozenWeights(nnx.Variable):
    """Frozen base weights (quantized or not): never a target of ``nnx.Param``/``LoRAParam`` filters."""


def weight_shape(weight: Any) -> tuple[int, int]:
    """``(out, in)`` of one slice of a frozen weight (a QuantizedTensor, or an array ``[*lead, out, in]``).

    Args:
      weight: a 2-D QuantizedTensor (leading axes live in its arrays) or an array ``[*lead, out, in]``.

    Returns:
      ``(out_features, in_features)``.

    Raises:
      ValueError: a QuantizedTensor that is not 2-D, or an array with fewer than 2 axes.
    """
    if isinstance(weight, QuantizedTensor):
        if len(weight.shape) != 2:
            raise ValueError(f"a QLoRA weight is a 2-D [out, in] matrix, got a QuantizedTensor of shape "
                             f"{list(weight.shape)}")
        return weight.shape
    if getattr(weight, "ndim", 0) < 2:
        raise ValueError(f"a QLoRA weight is an [out, in] matrix, got shape {list(getattr(weight, 'shape', ()))}")
    return tuple(weight.shape[-2:])


def leading_shape(weight: Any) -> tuple[int, ...]:
    """The stacked (layer or einsum batch) axes in front of a frozen weight's ``[out, in]`` slices.

    Args:
      weight: a QuantizedTensor (from :func:`pack_weight`) or an array ``[*lead, out, in]``.

    Returns:
      ``lead``, a tuple of ints (empty for one matrix).
    """
    if isinstance(weight, QuantizedTensor):
        per_slice = len(codes_shape(weight.shape, weight.quant_type))
        return tuple(weight.codes.shape[: weight.codes.ndim - per_slice])
    return tuple(weight.shape[:-2])


def pack_weight(matrix: Any, quant: QuantConfig) -> QuantizedTensor | jax.Array:
    """The frozen form of ``matrix`` ``[*lead, out, in]`` (bitsandbytes' orientation) under ``quant``.

    4-bit and 8-bit types give a :class:`~qlora_jax.quant.QuantizedTensor` whose metadata describes
    one ``[out, in]`` slice and whose arrays carry the leading axes; each slice is quantized on its
    own (byte-identical to ``quantize(matrix[i])``), one after another, so the temporaries stay
    those of one slice. Unquantized modes ("bf16", "float16", "float32") store the matrix in
    ``quant.dtype``, as the checkpoint loader does. Non-finite values raise QuantizationError
    (outside tracing).

    Args:
      matrix: ``[*lead, out, in]``, float32, bfloat16 or float16.
      quant: the quantization settings (type, block size, double quant, storage dtype).

    Returns:
      A QuantizedTensor (metadata of one ``[out, in]`` slice, arrays with the leading axes) or an
      array ``[*lead, out, in]`` in ``quant.dtype``.

    Raises:
      ValueError: ``matrix`` has fewer than 2 axes.
      QuantizationError: non-finite values (outside tracing).

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
    """
    matrix = jnp.asarray(matrix)
    if matrix.ndim < 2:
        raise ValueError(f"pack_weight takes an [*lead, out, in] matrix, got shape {list(matrix.shape)}")
    if not quant.quantized:
        return matrix.astype(quant.dtype)
    # Under tracing (jax.eval_shape of an init, jit) the check cannot run; quantize then gives NaN scales.
    if not isinstance(matrix, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(matrix))):
        bad = np.argwhere(~np.isfinite(np.asarray(matrix, np.float32)))
        raise QuantizationError(f"cannot quantize: {len(bad)} non-finite value(s) (NaN or Inf) in the weight, the "
                                f"first at index {tuple(int(i) for i in bad[0])}")

    lead = matrix.shape[:-2]
    if not lead:
        return _quantize_one(matrix, quant)
    stacked = _quantize_slices(matrix.reshape(-1, *matrix.shape[-2:]), quant)
    return jax.tree.map(lambda a: a.reshape(*lead, *a.shape[1:]), stacked)


def _quantize_one(w: jax.Array, quant: QuantConfig) -> QuantizedTensor:
    return quantize(w, quant.quant, blocksize=quant.blocksize, double_quant=quant.double_quant,
                    bnb_backend=quant.bnb_backend, check_finite=False)


@functools.partial(jax.jit, static_argnames="quant")
def _quantize_slices(matrices: jax.Array, quant: QuantConfig) -> QuantizedTensor:
    """``[n, out, in]`` quantized slice by slice (``lax.map``: one slice's temporaries at a time)."""
    return jax.lax.map(lambda w: _quantize_one(w, quant), matrices)


def _adapter_dtype(lora: LoraConfig, dtype: Any, param_dtype: Any) -> jnp.dtype:
    if lora.dtype is not None:
        return jnp.dtype(lora.dtype)
    return jnp.dtype(dtype if dtype is not None else param_dtype)


def _check_backend(kernel_backend: str) -> None:
    if kernel_backend not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {kernel_backend!r}")


def _matrix_forward(x, x_lora, weight, lora_a, lora_b, *, scaling: float, backend: str):
    """``x @ W.T + scaling * x_lora @ A.T @ B.T`` for one ``[out, in]`` slice (``x: [..., in]``)."""
    y = base_matmul(x, weight, backend=backend)
    if lora_a is not None:
        y = y + lora_delta(x_lora, lora_a, lora_b, scaling)
    return y


class _QLoRABase(nnx.Module):
    """What QLoRALinear and QLoRAEinsum share: the frozen weight, the adapters, dropout, dtypes."""

    def _init_common(self, weight, bias, lora, dtype, param_dtype, kernel_backend, rngs, batch_ndim=0):
        _check_backend(kernel_backend)
        out_features, in_features = weight_shape(weight)
        leading = leading_shape(weight)
        stacked = leading[: len(leading) - batch_ndim]
        if param_dtype is None:
            param_dtype = weight.dtype
        self.weight = FrozenWeights(weight)
        self.bias = nnx.data(None) if bias is None else FrozenWeights(jnp.asarray(bias))
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.kernel_backend = kernel_backend
        self.lora_config = lora
        self.lora_A: nnx.LoRAParam | None = nnx.data(None)
        self.lora_B: nnx.LoRAParam | None = nnx.data(None)
        self.lora_dropout: nnx.Dropout | None = nnx.data(None)
        if lora is None:
            return
        if rngs is None:
            raise ValueError("LoRA adapters need rngs=nnx.Rngs(...) for their initialisation")
        pair = init_lora_pair(rngs.params(), (out_features, in_features), lora.r,
                              _adapter_dtype(lora, dtype, param_dtype), leading=leading)
        self.lora_A = nnx.LoRAParam(pair["lora_A"])
        self.lora_B = nnx.LoRAParam(pair["lora_B"])
        if lora.dropout > 0.0:
            if stacked:
                # A stacked layer would need one dropout stream per slice (nnx.split_rngs at build time).
                raise NotImplementedError(f"LoRA dropout on a layer stacked over axes {list(stacked)} (nnx.vmap) "
                                          "is not supported; use dropout=0 for stacked layers")
            self.lora_dropout = nnx.Dropout(lora.dropout, rngs=rngs)

    def _frozen_weight(self, batch_shape: tuple[int, ...] = ()) -> Any:
        weight = self.weight.get_value()
        leading = leading_shape(weight)
        if leading != tuple(batch_shape):
            stacked = leading[: len(leading) - len(batch_shape)]
            raise ValueError(f"{type(self).__name__} is stacked over axes {list(stacked)} (built by nnx.vmap): call "
                             "it inside nnx.scan or nnx.vmap over those axes, as the layer it replaced")
        return weight

    @property
    def scaling(self) -> float:
        """The adapter's output scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); 0 without adapters."""
        return 0.0 if self.lora_config is None else self.lora_config.scaling

    def _compute_dtype(self, x: jax.Array) -> jnp.dtype:
        return self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, self.param_dtype)

    def _adapters(self):
        if self.lora_A is None:
            return None, None
        return self.lora_A[...], self.lora_B[...]

    def _dropped(self, x: jax.Array) -> jax.Array:
        return x if self.lora_dropout is None else self.lora_dropout(x)


class QLoRALinear(_QLoRABase):
    """A linear layer with a frozen quantized ``[out, in]`` weight and a LoRA adapter (see the module docstring).

    ``weight``: a :class:`~qlora_jax.quant.QuantizedTensor` (NF4/FP4/Int8, with or without double
    quantization, any supported block size) or an ``[out, in]`` array; leading axes, if any, are
    stacked layers. ``bias``: ``[out]`` or None. ``lora``: the adapter's hyperparameters (its
    ``target_modules`` is not used here), or None for a frozen layer without adapter. ``dtype``:
    computation dtype (None: promote the input's and ``param_dtype``); ``param_dtype``: the
    original weight's dtype (default: the weight's). ``kernel_backend``: how the quantized matmul
    runs (:data:`qlora_jax.kernels.BACKENDS`); it may be changed on the layer at any time.
    ``rngs``: initialises ``lora_A`` (``rngs.params()``) and the dropout stream (``rngs.dropout``).

    ``layer(x)``: ``x [..., in]`` -> ``[..., out]`` in the computation dtype.

    Args:
      weight: a QuantizedTensor or an array ``[*lead, out, in]``.
      bias: ``[*lead, out]`` or ``None``.
      lora: the adapter's hyperparameters, or ``None`` for a frozen layer without adapter.
      dtype: computation dtype; ``None`` promotes the input's and ``param_dtype``.
      param_dtype: the original weight's dtype; ``None`` is the weight's.
      kernel_backend: the quantized matmul's backend (one of ``qlora_jax.kernels.BACKENDS``).
      rngs: ``nnx.Rngs`` for ``lora_A``'s initialisation and LoRA dropout.

    Raises:
      ValueError: a bias of the wrong shape, a weight that is not ``[out, in]``, or an unknown
        ``kernel_backend``.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021.
    """

    def __init__(
        self,
        weight: QuantizedTensor | jax.Array,
        bias: jax.Array | None = None,
        *,
        lora: LoraConfig | None = DEFAULT_LORA,
        dtype: Any = None,
        param_dtype: Any = None,
        kernel_backend: str = "auto",
        rngs: nnx.Rngs | None = None,
    ):
        leading = leading_shape(weight)
        out_features = weight_shape(weight)[0]
        if bias is not None and tuple(bias.shape) != (*leading, out_features):
            raise ValueError(f"bias has shape {list(bias.shape)}, expected {[*leading, out_features]}")
        self._init_common(weight, bias, lora, dtype, param_dtype, kernel_backend, rngs)

    @classmethod
    def from_linear(
        cls,
        linear: nnx.Linear,
        *,
        lora: LoraConfig | None = DEFAULT_LORA,
        quant: QuantConfig = DEFAULT_QUANT,
        dtype: Any = None,
        kernel_backend: str = "auto",
        rngs: nnx.Rngs | None = None,
    ) -> QLoRALinear:
        """The QLoRA form of an ``nnx.Linear``: its kernel ``[*lead, in, out]`` transposed to
        ``[*lead, out, in]`` and packed by :func:`pack_weight`, its bias kept (in ``quant.dtype``),
        fresh adapters. ``dtype`` defaults to the Linear's own; ``param_dtype`` is the Linear's."""
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"from_linear takes an nnx.Linear, got {type(linear).__name__}")
        kernel = linear.kernel[...]
        if kernel.ndim < 2 or tuple(kernel.shape[-2:]) != (linear.in_features, linear.out_features):
            raise ValueError(f"the Linear's kernel has shape {list(kernel.shape)}, expected [..., "
                             f"{linear.in_features}, {linear.out_features}]")
        weight = pack_weight(jnp.swapaxes(kernel, -1, -2), quant)
        bias = None if linear.bias is None else linear.bias[...].astype(quant.dtype)
        return cls(weight, bias, lora=lora, dtype=linear.dtype if dtype is None else dtype,
                   param_dtype=linear.param_dtype, kernel_backend=kernel_backend, rngs=rngs)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if out_sharding is not None:
            raise NotImplementedError("QLoRALinear does not take out_sharding; shard its input instead")
        if inputs.shape[-1] != self.in_features:
            raise ValueError(f"QLoRALinear takes inputs [..., {self.in_features}], got {list(inputs.shape)}")
        x = inputs.astype(self._compute_dtype(inputs))
        lora_a, lora_b = self._adapters()
        y = _matrix_forward(x, self._dropped(x), self._frozen_weight(), lora_a, lora_b, scaling=self.scaling,
                            backend=self.kernel_backend)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


@dataclasses.dataclass(frozen=True)
class EinsumLayout:
    """How an ``nnx.Einsum`` kernel maps to bitsandbytes ``[out, in]`` matrices.

    For ``einsum_str = "lhs,rhs->out"`` (``rhs``: the kernel's axes, no ``...``), each kernel axis is

    * **in** (contracted): in ``lhs`` and ``rhs``, not in ``out`` (Gemma's ``D`` in ``"BTD,NDH->BTNH"``);
    * **out**: in ``rhs`` and ``out``, not in ``lhs`` (``N`` and ``H`` there);
    * **batch**: in all three (e.g. the experts ``E`` of ``"ECD,EDF->ECF"``): one matrix per index.

    The packed weight is the kernel transposed to ``(*batch, *out, *in)`` (each group in the
    kernel's axis order) and reshaped to ``[*batch, prod(out), prod(in)]``: every batch slice is a
    linear layer ``[out, in]`` quantized in row-major blocks along the flattened in-axes, with
    PEFT-oriented adapters ``lora_A [*batch, r, prod(in)]``, ``lora_B [*batch, prod(out), r]``.
    Input axes that are not in the kernel must appear in the output (they are the rows of the
    matmul); an axis summed away from the input alone, a repeated axis, or a kernel axis that
    neither the input nor the output has is refused.

    Attributes:
      einsum_str: the einsum, ``"lhs,rhs->out"``.
      kernel_shape: the kernel's shape.
      batch_axes: kernel axes with one matrix per index.
      out_axes: kernel axes flattened into the matrices' rows.
      in_axes: kernel axes flattened into the matrices' columns (contracted).
    """

    einsum_str: str
    kernel_shape: tuple[int, ...]
    batch_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    in_axes: tuple[int, ...]

    @classmethod
    def parse(cls, einsum_str: str, kernel_shape: tuple[int, ...]) -> EinsumLayout:
        """Classifies the kernel's axes; raises ValueError naming what the equation does that a linear layer can't."""
        einsum_str = einsum_str.replace(" ", "")
        if "->" not in einsum_str or einsum_str.count(",") != 1:
            raise ValueError(f"einsum_str {einsum_str!r} must be explicit ('lhs,rhs->out') with two operands")
        operands, out = einsum_str.split("->")
        lhs, rhs = operands.split(",")
        kernel_shape = tuple(int(d) for d in kernel_shape)
        if "." in rhs:
            raise ValueError(f"einsum_str {einsum_str!r}: the kernel's axes must be named (no '...')")
        if len(rhs) != len(kernel_shape):
            raise ValueError(f"einsum_str {einsum_str!r} names {len(rhs)} kernel axes, the kernel has shape "
                             f"{list(kernel_shape)}")
        for name, term in (("input", lhs.replace("...", "")), ("kernel", rhs), ("output", out.replace("...", ""))):
            if len(set(term)) != len(term):
                raise ValueError(f"einsum_str {einsum_str!r}: the {name} term repeats an axis (diagonals are not a "
                                 "linear layer)")
        batch, outs, ins = [], [], []
        for i, c in enumerate(rhs):
            if c in lhs and c in out:
                batch.append(i)
            elif c in lhs:
                ins.append(i)
            elif c in out:
                outs.append(i)
            else:
                raise ValueError(f"einsum_str {einsum_str!r}: kernel axis {c!r} is in neither the input nor the "
                                 "output (summed over the kernel alone)")
        summed = [c for c in lhs.replace("...", "") if c not in rhs and c not in out]
        if summed:
            raise ValueError(f"einsum_str {einsum_str!r}: input axes {summed} are summed without the kernel")
        if not ins:
            raise ValueError(f"einsum_str {einsum_str!r} contracts no input axis with the kernel")
        if ("..." in lhs) != ("..." in out):
            raise ValueError(f"einsum_str {einsum_str!r}: '...' must appear in both the input and the output")
        return cls(einsum_str, kernel_shape, tuple(batch), tuple(outs), tuple(ins))

    @property
    def terms(self) -> tuple[str, str, str]:
        operands, out = self.einsum_str.split("->")
        lhs, rhs = operands.split(",")
        return lhs, rhs, out

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.kernel_shape[i] for i in self.batch_axes)

    @property
    def out_features(self) -> int:
        return math.prod(self.kernel_shape[i] for i in self.out_axes)

    @property
    def in_features(self) -> int:
        return math.prod(self.kernel_shape[i] for i in self.in_axes)

    def pack(self, kernel: jax.Array) -> jax.Array:
        """``kernel [*lead, *kernel_shape]`` -> ``[*lead, *batch, out, in]`` (``lead``: stacked layers)."""
        n = len(self.kernel_shape)
        lead = kernel.ndim - n
        if lead < 0 or tuple(kernel.shape[lead:]) != self.kernel_shape:
            raise ValueError(f"kernel shape {list(kernel.shape)} does not end with {list(self.kernel_shape)}")
        perm = (*range(lead), *(lead + i for i in self.batch_axes + self.out_axes + self.in_axes))
        moved = jnp.transpose(kernel, perm)
        return moved.reshape(*kernel.shape[:lead], *self.batch_shape, self.out_features, self.in_features)

    def unpack(self, matrix: jax.Array) -> jax.Array:
        """The inverse of :meth:`pack`: ``[*lead, *batch, out, in]`` -> ``[*lead, *kernel_shape]``."""
        lead = matrix.ndim - len(self.batch_axes) - 2
        order = self.batch_axes + self.out_axes + self.in_axes
        grouped = matrix.reshape(*matrix.shape[:lead], *(self.kernel_shape[i] for i in order))
        inverse = np.argsort(order)
        return jnp.transpose(grouped, (*range(lead), *(lead + int(i) for i in inverse)))

    def bind(self, ndim: int) -> tuple[str, str, str]:
        """``(lhs, rhs, out)`` with ``...`` replaced by fresh axis names for an input of rank ``ndim``."""
        lhs, rhs, out = self.terms
        if "..." not in lhs:
            if len(lhs) != ndim:
                raise ValueError(f"einsum {self.einsum_str!r} takes a rank-{len(lhs)} input, got rank {ndim}")
            return lhs, rhs, out
        named = len(lhs) - 3
        if ndim < named:
            raise ValueError(f"einsum {self.einsum_str!r} takes an input of rank >= {named}, got rank {ndim}")
        fresh = "".join(c for c in string.ascii_letters if c not in self.einsum_str)[: ndim - named]
        return lhs.replace("...", fresh), rhs, out.replace("...", fresh)


class QLoRAEinsum(_QLoRABase):
    """An ``nnx.Einsum`` with a frozen quantized kernel and a LoRA adapter.

    ``einsum_str`` and ``kernel_shape`` as ``nnx.Einsum``'s; the kernel is packed into
    ``[*batch, out, in]`` matrices as :class:`EinsumLayout` documents, ``weight`` is that packed
    form (a QuantizedTensor or array with leading ``batch`` axes; use :meth:`from_einsum` to
    convert a layer). ``bias``: as ``nnx.Einsum``'s (broadcast over the output the same way).
    Other arguments as :class:`QLoRALinear`. ``layer(x)`` computes ``einsum(einsum_str, x, kernel)``
    with the dequantized kernel, plus the bias and ``scaling * lora``, in the computation dtype.

    Args:
      einsum_str: the einsum, ``"lhs,rhs->out"`` (``rhs`` the kernel's axes).
      kernel_shape: the original kernel's shape.
      weight: the packed kernel, QuantizedTensor or array ``[*batch, out, in]``.
      bias: as ``nnx.Einsum``'s, or ``None``.
      lora: the adapter's hyperparameters, or ``None`` for a frozen layer without adapter.
      dtype: computation dtype; ``None`` promotes the input's and ``param_dtype``.
      param_dtype: the original weight's dtype; ``None`` is the weight's.
      kernel_backend: the quantized matmul's backend (one of ``qlora_jax.kernels.BACKENDS``).
      rngs: ``nnx.Rngs`` for ``lora_A``'s initialisation and LoRA dropout.

    Raises:
      ValueError: an einsum :class:`EinsumLayout` refuses, or a weight that does not pack the
        kernel.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
    """

    def __init__(
        self,
        einsum_str: str,
        kernel_shape: tuple[int, ...],
        weight: QuantizedTensor | jax.Array,
        bias: jax.Array | None = None,
        *,
        lora: LoraConfig | None = DEFAULT_LORA,
        dtype: Any = None,
        param_dtype: Any = None,
        kernel_backend: str = "auto",
        rngs: nnx.Rngs | None = None,
    ):
        self.layout = EinsumLayout.parse(einsum_str, tuple(kernel_shape))
        expected = (*self.layout.batch_shape, self.layout.out_features, self.layout.in_features)
        leading = leading_shape(weight)
        got = (*leading, *weight_shape(weight))
        if got[len(got) - len(expected):] != expected:
            raise ValueError(f"einsum {self.layout.einsum_str!r} with kernel {list(kernel_shape)} packs into "
                             f"{list(expected)} matrices, got a weight of {list(got)}")
        self._init_common(weight, bias, lora, dtype, param_dtype, kernel_backend, rngs, len(self.layout.batch_axes))
        self.einsum_str = self.layout.einsum_str
        self.kernel_shape = self.layout.kernel_shape

    @classmethod
    def from_einsum(
        cls,
        einsum: nnx.Einsum,
        *,
        lora: LoraConfig | None = DEFAULT_LORA,
        quant: QuantConfig = DEFAULT_QUANT,
        dtype: Any = None,
        kernel_backend: str = "auto",
        rngs: nnx.Rngs | None = None,
    ) -> QLoRAEinsum:
        """The QLoRA form of an ``nnx.Einsum`` (its ``einsum_str`` must be set on the layer)."""
        if not isinstance(einsum, nnx.Einsum):
            raise TypeError(f"from_einsum takes an nnx.Einsum, got {type(einsum).__name__}")
        if einsum.einsum_str is None:
            raise ValueError("the Einsum has no einsum_str of its own (it is passed at call time); QLoRA packs the "
                             "kernel by the equation, so set einsum_str on the layer")
        layout = EinsumLayout.parse(einsum.einsum_str, tuple(einsum.kernel_shape))
        weight = pack_weight(layout.pack(einsum.kernel[...]), quant)
        bias = None if einsum.bias is None else einsum.bias[...].astype(quant.dtype)
        return cls(layout.einsum_str, layout.kernel_shape, weight, bias, lora=lora,
                   dtype=einsum.dtype if dtype is None else dtype, param_dtype=einsum.param_dtype,
                   kernel_backend=kernel_backend, rngs=rngs)

    def __call__(self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: Any = None) -> jax.Array:
        if out_sharding is not None:
            raise NotImplementedError("QLoRAEinsum does not take out_sharding; shard its input instead")
        if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str:
            raise ValueError(f"this QLoRAEinsum's kernel is packed for {self.einsum_str!r}; it cannot run "
                             f"{einsum_str!r}")
        layout = self.layout
        lhs, rhs, out = layout.bind(inputs.ndim)
        batch = [rhs[i] for i in layout.batch_axes]
        ins = [rhs[i] for i in layout.in_axes]
        outs = [rhs[i] for i in layout.out_axes]
        free = [c for c in lhs if c not in rhs]
        sizes = dict(zip(lhs, inputs.shape, strict=True))
        for c in ins + batch:
            expected = layout.kernel_shape[rhs.index(c)]
            if sizes[c] != expected:
                raise ValueError(f"einsum {self.einsum_str!r}: input axis {c!r} has size {sizes[c]}, the kernel's "
                                 f"{expected}")
        x = inputs.astype(self._compute_dtype(inputs))
        perm = [lhs.index(c) for c in batch + free + ins]
        rows = (*(sizes[c] for c in batch), *(sizes[c] for c in free))

        def to_rows(v):
            return jnp.transpose(v, perm).reshape(*rows, layout.in_features)

        lora_a, lora_b = self._adapters()
        fn = functools.partial(_matrix_forward, scaling=self.scaling, backend=self.kernel_backend)
        for _ in batch:  # one matrix per batch index: map over the leading axis of every operand
            fn = jax.vmap(fn)
        y = fn(to_rows(x), to_rows(self._dropped(x)), self._frozen_weight(layout.batch_shape), lora_a, lora_b)
        kernel_sizes = dict(zip(rhs, layout.kernel_shape, strict=True))
        produced = batch + free + outs
        y = y.reshape(*rows, *(kernel_sizes[c] for c in outs))
        y = jnp.transpose(y, [produced.index(c) for c in out])
        if self.bias is not None:
            # nnx.Einsum's broadcast: the output axes that come from the kernel, in output order.
            y = y + jnp.reshape(self.bias[...], [kernel_sizes.get(c, 1) for c in out]).astype(y.dtype)
        return y
