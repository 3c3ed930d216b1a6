"""QLoRA for any NNX model, selected by what each weight does in a traced forward pass.

:func:`convert_traced` (what :func:`qlora_jax.nn.apply_qlora` runs when it is given example
inputs) traces the model's forward pass once with every weight of two or more axes as an input,
and finds with :func:`qlora_jax.nn.dataflow.weight_uses` the weights that are the non-activation
operand of a contraction (``jnp.einsum``, ``jnp.dot``/``matmul``/``@``, ``lax.dot_general``),
whatever module holds them. Each selected weight is then, in place:

* replaced by a :class:`QLoRAWeight` variable holding a :class:`PackedWeight` (bitsandbytes'
  ``[out, in]`` NF4/FP4/Int8 bytes of each matrix of its :class:`~qlora_jax.nn.dataflow.WeightLayout`,
  or a 16-bit copy), which reports the original ``shape`` and ``dtype`` to code that reads them;
* given ``nnx.LoRAParam`` adapters beside it in the same module, ``<name>_lora_A
  [*lead, r, in]`` and ``<name>_lora_B [*lead, out, r]`` (PEFT's orientation per matrix).

The model's class is swapped for a subclass (same fields, same state) whose ``__call__`` (and
the other ``methods`` named) traces the original method and runs it with
:func:`~qlora_jax.nn.dataflow.run_with_weights`: every contraction of a converted weight becomes
``quantized_matmul`` plus the LoRA term; everything else is the model's own code. ``nnx.jit``,
``nnx.grad``, ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and ``nnx.split``/``merge`` see an
ordinary NNX model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.lora import init_lora_pair
from qlora_jax.nn.dataflow import VirtualWeight, WeightLayout, WeightUse, run_with_weights, trace_forward, weight_uses
from qlora_jax.nn.layers import FrozenWeights, pack_weight
from qlora_jax.quant import QuantizedTensor

__all__ = ["PackedWeight", "QLoRAWeight", "WeightFacts", "adapter_names", "state_shardings", "trace_weight_uses",
           "wrap_methods"]

logger = logging.getLogger(__name__)

_INSIDE = threading.local()


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class PackedWeight:
    """A converted weight: the packed matrices and the static facts the forward pass needs.

    ``packed`` (QuantizedTensor or 16-bit array ``[*lead, out, in]``) and the static facts the
    forward pass needs: its :class:`WeightLayout`, the original dtype, the LoRA scaling (0 without
    adapters) and the kernel backend. ``shape``/``dtype``/``ndim`` are the original weight's, so
    model code that reads them runs unchanged.

    Attributes:
      packed: QuantizedTensor or 16-bit array ``[*lead, out, in]`` (the only pytree child).
      layout: the :class:`~qlora_jax.nn.WeightLayout` mapping the original axes to the matrices.
      orig_dtype: the original weight's dtype.
      scaling: the LoRA scale, 0 without adapters.
      backend: the quantized matmul's kernel backend.
      has_lora: whether the weight has adapters.
    """

    packed: Any
    layout: WeightLayout
    orig_dtype: Any
    scaling: float
    backend: str
    has_lora: bool

    def tree_flatten(self):
        return (self.packed,), (self.layout, self.orig_dtype, self.scaling, self.backend, self.has_lora)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.orig_dtype)

    @property
    def ndim(self) -> int:
        return len(self.layout.shape)

    @property
    def nbytes(self) -> int:
        return int(sum(int(x.nbytes) for x in jax.tree.leaves(self.packed)))


class QLoRAWeight(FrozenWeights):
    """A frozen, packed weight that took the place of a model's ``nnx.Param`` (never trained).

    Reading its value outside the converted model's methods is an error naming the fix: the
    adapters live in sibling variables, so a bare read could not include them.
    """

    def get_value(self, **kwargs):
        raw = self.get_raw_value()
        if isinstance(raw, PackedWeight) and not getattr(_INSIDE, "active", False):
            raise RuntimeError(
                "this weight was converted by apply_qlora and holds packed 4-bit matrices plus adapters: it is "
                "only computed with inside the model's converted methods (apply_qlora(..., methods=[...]) names "
                "them; default __call__)")
        return super().get_value(**kwargs)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.get_raw_value().shape)

    @property
    def dtype(self):
        return self.get_raw_value().dtype

    @property
    def ndim(self) -> int:
        return len(self.get_raw_value().shape)


def adapter_names(name: str) -> tuple[str, str]:
    """The attribute names of the adapters of weight ``name``: ``(<name>_lora_A, <name>_lora_B)``.

    Args:
      name: the weight's attribute name, e.g. ``"kernel"``.

    Returns:
      ``(f"{name}_lora_A", f"{name}_lora_B")``.
    """
    return f"{name}_lora_A", f"{name}_lora_B"


@contextlib.contextmanager
def _inside():
    previous = getattr(_INSIDE, "active", False)
    _INSIDE.active = True
    try:
        yield
    finally:
        _INSIDE.active = previous


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)


def _split_args(args: tuple, kwargs: dict):
    """Array leaves of ``(args, kwargs)`` (traced) and a function rebuilding them with the rest kept static."""
    leaves, tree = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def rebuild(values):
        full = list(leaves)
        for i, v in zip(dynamic, values, strict=True):
            full[i] = v
        return jax.tree.unflatten(tree, full)

    return [leaves[i] for i in dynamic], rebuild


@dataclasses.dataclass(frozen=True)
class WeightFacts:
    """A candidate weight: its path in the model, the module path holding it, shape, and its uses.

    Attributes:
      path: the variable's path in ``nnx.state(model)``.
      shape: the weight's shape.
      uses: its :class:`~qlora_jax.nn.dataflow.WeightUse`\\ s in the traced forward pass, in order.
    """

    path: tuple
    shape: tuple[int, ...]
    uses: tuple[WeightUse, ...]

    @property
    def contractions(self) -> tuple[WeightUse, ...]:
        return tuple(u for u in self.uses if u.kind == "contraction")

    @property
    def is_linear(self) -> bool:
        """Used only by contractions, all in one layout: what ``"all-linear"`` converts."""
        return bool(self.uses) and len(self.contractions) == len(self.uses) and len(
            {u.layout for u in self.contractions}) == 1

    @property
    def is_lookup(self) -> bool:
        return any(u.kind == "lookup" for u in self.uses)


def _call_state(model: nnx.Module):
    graphdef, state = nnx.split(model)
    flat = list(nnx.to_flat_state(state))
    return graphdef, flat


def trace_weight_uses(model: nnx.Module, method: str, args: tuple, kwargs: dict,
                      is_candidate: Callable[[tuple, nnx.Variable], bool]) -> dict[tuple, WeightFacts]:
    """Traces ``getattr(model, method)(*args, **kwargs)`` abstractly and returns the weights' uses.

    The uses of every variable ``is_candidate(path, variable)`` selects: ``{path: WeightFacts}``.

    Args:
      model: the NNX model.
      method: name of the method to trace, e.g. ``"__call__"``.
      args: example positional arguments (arrays or ShapeDtypeStructs; nothing is computed).
      kwargs: example keyword arguments.
      is_candidate: ``(path, variable) -> bool``, which variables to follow.

    Returns:
      ``{path: WeightFacts}`` for the selected variables.
    """
    graphdef, flat = _call_state(model)
    dyn_args, rebuild = _split_args(args, kwargs)
    candidates = {i for i, (path, var) in enumerate(flat) if is_candidate(path, var)}
    values = [jax.ShapeDtypeStruct(var.shape, var.dtype) if i in candidates else var.get_raw_value()
              for i, (_, var) in enumerate(flat)]

    def forward(values, dyn):
        st = nnx.from_flat_state([(p, var.replace(v)) for (p, var), v in zip(flat, values, strict=True)])
        m = nnx.merge(graphdef, st)
        call_args, call_kwargs = rebuild(dyn)
        with _inside():
            return getattr(m, method)(*call_args, **call_kwargs)

    closed, _ = trace_forward(forward, values, dyn_args)
    leaves = jax.tree.leaves((values, dyn_args))
    position = {id(leaf): k for k, leaf in enumerate(leaves)}
    index = {position[id(values[i])]: i for i in candidates}
    uses = weight_uses(closed, {k: tuple(values[i].shape) for k, i in index.items()})
    return {flat[i][0]: WeightFacts(flat[i][0], tuple(values[i].shape), tuple(uses[k])) for k, i in index.items()}


def _run_converted(model: nnx.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
    graphdef, flat = _call_state(model)
    dyn_args, rebuild = _split_args(args, kwargs)
    by_path = {path: var for path, var in flat}
    weights = [i for i, (_, var) in enumerate(flat) if isinstance(var.get_raw_value(), PackedWeight)]
    values = []
    for i, (_, var) in enumerate(flat):
        raw = var.get_raw_value()
        values.append(jax.ShapeDtypeStruct(raw.shape, raw.dtype) if i in weights else raw)
    keep = [i for i in range(len(flat)) if i not in weights]

    def forward(values, dyn):
        st = nnx.from_flat_state([(p, var.replace(v)) for (p, var), v in zip(flat, values, strict=True)])
        m = nnx.merge(graphdef, st)
        call_args, call_kwargs = rebuild(dyn)
        with _inside():
            out = original(m, *call_args, **call_kwargs)
        _, new_flat = _call_state(m)
        new = {p: v.get_raw_value() for p, v in new_flat}
        return out, [new[flat[i][0]] for i in keep]

    closed, out_tree = trace_forward(forward, values, dyn_args)
    leaves = jax.tree.leaves((values, dyn_args))
    inputs = list(leaves)
    position = {id(leaf): k for k, leaf in enumerate(leaves)}
    for i in weights:
        path, var = flat[i]
        packed: PackedWeight = var.get_raw_value()
        a_name, b_name = adapter_names(path[-1])
        lora_a = lora_b = None
        if packed.has_lora:
            lora_a = by_path[(*path[:-1], a_name)].get_raw_value()
            lora_b = by_path[(*path[:-1], b_name)].get_raw_value()
        inputs[position[id(values[i])]] = VirtualWeight(
            packed.packed, lora_a, lora_b, packed.scaling, packed.layout,
            _root_view(packed.layout), packed.dtype, packed.backend)
    outs = run_with_weights(closed, inputs)
    out, new_values = jax.tree.unflatten(out_tree, outs)
    for i, value in zip(keep, new_values, strict=True):
        var = flat[i][1]
        if var.get_raw_value() is not value:
            var.set_raw_value(value)
    return out


def _root_view(layout: WeightLayout):
    from qlora_jax.nn.dataflow import _View

    return _View(layout.shape, tuple(range(len(layout.shape))))


_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def wrap_methods(model: nnx.Module, methods: Sequence[str]) -> None:
    """Swaps ``model``'s class for a subclass whose ``methods`` run on the packed weights (see the module doc).

    Args:
      model: the converted NNX model (modified in place).
      methods: names of the methods to convert (added to any converted before).

    Raises:
      AttributeError: the model's class has no such method.
    """
    cls = type(model)
    base = getattr(cls, "_qlora_original_class", cls)
    methods = tuple(sorted(set(methods) | set(getattr(cls, "_qlora_methods", ()))))
    key = (base, methods)
    if key not in _CLASSES:
        attrs: dict[str, Any] = {"_qlora_original_class": base, "_qlora_methods": methods}
        for name in methods:
            original = getattr(base, name, None)
            if not callable(original):
                raise AttributeError(f"apply_qlora(methods=...): {base.__name__} has no method {name!r}")
            attrs[name] = _converted_method(original)
        new = type(f"QLoRA{base.__name__}", (base,), attrs)
        new.__module__ = base.__module__
        new.__qualname__ = f"QLoRA{base.__qualname__}"
        _CLASSES[key] = new
    object.__setattr__(model, "__class__", _CLASSES[key])


def _converted_method(original: Callable) -> Callable:
    def method(self, *args, **kwargs):
        if getattr(_INSIDE, "active", False):
            return original(self, *args, **kwargs)
        return _run_converted(self, original, args, kwargs)

    method.__name__ = getattr(original, "__name__", "method")
    method.__doc__ = getattr(original, "__doc__", None)
    method.__wrapped__ = original
    return method


def pack_for_layout(weight: jax.Array, layout: WeightLayout, quant) -> Any:
    """The packed form of ``weight`` in ``layout`` under ``quant`` (see :func:`qlora_jax.nn.pack_weight`)."""
    return pack_weight(layout.pack(jnp.asarray(weight)), quant)


def new_adapters(key: jax.Array, layout: WeightLayout, r: int, dtype: Any) -> dict[str, jax.Array]:
    """PEFT's initialisation of one adapter per ``[out, in]`` matrix of ``layout``."""
    return init_lora_pair(key, (layout.out_features, layout.in_features), r, dtype, leading=layout.lead_shape)


def packed_nbytes(packed: Any) -> int:
    """Bytes of a packed weight's arrays."""
    if isinstance(packed, QuantizedTensor):
        return int(sum(int(x.nbytes) for x in jax.tree.leaves(packed)))
    return int(packed.nbytes)


def _spec_name(name: Any, size: int, mesh: jax.sharding.Mesh) -> Any:
    """``name`` if the mesh has that axis (or all of a tuple of axes) and it divides ``size``, else None."""
    axes = name if isinstance(name, tuple) else (name,)
    if name is None or any(a not in mesh.shape for a in axes):
        return None
    return name if size % int(np.prod([mesh.shape[a] for a in axes])) == 0 else None


def _packed_shardings(weight: PackedWeight, names: tuple | None, mesh: jax.sharding.Mesh) -> Any:
    layout = weight.layout
    lead_sizes = layout.lead_shape
    names = names or (None,) * (len(lead_sizes) + 2)
    lead = [_spec_name(n, s, mesh) for n, s in zip(names[:-2], lead_sizes, strict=True)]
    out_name = _spec_name(names[-2], layout.out_features, mesh)

    def named(*spec):
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    packed = weight.packed
    if not isinstance(packed, QuantizedTensor):
        return PackedWeight(named(*lead, out_name, _spec_name(names[-1], layout.in_features, mesh)), layout,
                            weight.orig_dtype, weight.scaling, weight.backend, weight.has_lora)
    # Codes and scales split by rows ([out, in] row-major blocks); the nested scales and offset stay whole.
    rows_ok = out_name is not None and layout.in_features % packed.blocksize == 0
    row = out_name if rows_ok else None
    sharded = QuantizedTensor(named(*lead, row, None), named(*lead, row),
                              None if packed.nested_scales is None else named(*lead, None),
                              None if packed.offset is None else named(*lead),
                              packed.shape, packed.dtype, packed.quant_type, packed.blocksize, packed.nested_blocksize)
    return PackedWeight(sharded, layout, weight.orig_dtype, weight.scaling, weight.backend, weight.has_lora)


def state_shardings(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.State:
    """NamedShardings for ``nnx.state(model)`` from its variables' sharding annotations.

    Packed weights follow the ``packed_sharding`` that :func:`~qlora_jax.nn.apply_qlora` carried
    from the original weight's ``out_sharding`` (codes and scales split by the matrices' rows,
    the leading layer/batch axes by their own names), adapters and every other variable their
    ``out_sharding``; an axis the mesh lacks, or that does not divide a dimension, is replicated.
    Place the model with ``nnx.update(model, jax.device_put(nnx.state(model), state_shardings(model, mesh)))``.

    Args:
      model: the (converted) NNX model.
      mesh: the device mesh.

    Returns:
      An ``nnx.State`` of ``jax.sharding.NamedSharding`` with ``nnx.state(model)``'s structure.
    """
    def rule(var):
        if isinstance(var, QLoRAWeight) and isinstance(var.get_raw_value(), PackedWeight):
            return var.replace(_packed_shardings(var.get_raw_value(), var.get_metadata().get("packed_sharding"),
                                                 mesh))
        value = var.get_raw_value()
        names = var.get_metadata().get("out_sharding") or ()
        shape = getattr(value, "shape", ())
        spec = [_spec_name(n, s, mesh) for n, s in zip(names, shape, strict=False)]
        return var.replace(jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)),
                                        value))

    return jax.tree.map(rule, nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))
