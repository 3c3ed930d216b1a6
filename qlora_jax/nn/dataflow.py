"""What each weight of a traced forward pass does, and that forward pass run on packed QLoRA weights.

Two functions over a closed jaxpr (the model's forward pass traced with its weights as inputs):

* :func:`weight_uses` follows every weight input through the layout-only operations
  (``convert_element_type``, ``transpose``, copies, sharding constraints, a static index of a
  leading axis, and into ``jit``, ``remat``/``checkpoint`` and ``scan`` bodies) to the operations
  that consume it, and reports each use: a contraction (``dot_general``, which ``jnp.einsum``,
  ``jnp.dot``/``matmul``/``@`` and ``lax.dot_general`` all lower to) with its
  :class:`WeightLayout`, a lookup (``gather``: an embedding), or another operation.
* :func:`run_with_weights` evaluates the jaxpr with some inputs bound to
  :class:`VirtualWeight`\\ s (a packed weight plus its LoRA adapters): each contraction that
  consumes one runs as :func:`qlora_jax.linear.base_matmul` (so
  :func:`qlora_jax.kernels.quantized_matmul` and its fused GPU kernels) plus the LoRA term, one
  ``[out, in]`` matrix at a time. Every other equation is bound as it was, so the result is the
  model's own computation with ``W`` replaced by ``dequant(W) + scaling * B @ A``; a use the
  interpreter cannot rewrite (a non-linear op) gets that sum materialised, so it is never wrong.

The layout of a weight (Args of :class:`WeightLayout`) classifies its axes as the einsum rule
does: contracted axes are **in**; axes the input shares are a **batch** of matrices (one per
index); the other axes are **out**, except that an axis the output places in front of every
axis coming from the input (the ``C`` of ``'BSD,CKDH->CBSKH'``, the ``S`` of
``'BTD,SNDH->SBTNH'``) is a stack of separate projections, so it joins the batch: one matrix and
one adapter per stacked projection, as PEFT has them unstacked. Axes a ``scan`` (scanned or
``nnx.vmap``-stacked layers) or a static index takes away are **layer** axes, in front of all.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from qlora_jax.linear import base_matmul, lora_delta
from qlora_jax.quant import QuantizedTensor, dequantize

__all__ = ["WeightLayout", "WeightUse", "VirtualWeight", "weight_uses", "run_with_weights", "dequantize_stacked",
           "LAYOUT_OPS"]

# Operations that move a weight without computing with it: the converter looks through them.
LAYOUT_OPS = ("convert_element_type", "transpose", "copy", "copy_p", "sharding_constraint", "slice", "squeeze")
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint")


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """How a weight's axes map to a stack of bitsandbytes ``[out, in]`` matrices.

    Each field holds axes of the original weight (as the model stores it): ``layers`` (taken away
    by a ``scan`` or a static index before the contraction), ``batch`` (one matrix per index:
    batch axes of the contraction and stacked projections), ``out`` and ``in`` (flattened in
    axis order into the matrix's rows and columns). ``shape``: the weight's shape. The packed
    weight is the weight transposed to ``(*layers, *batch, *out, *in)`` and reshaped to
    ``[*layers, *batch, prod(out), prod(in)]``.

    Attributes:
      shape: the weight's shape as the model stores it.
      layers: axes taken away by a ``scan`` or a static index before the contraction.
      batch: axes with one matrix per index.
      out: axes flattened into the matrix's rows (``out_features``).
      in_: axes flattened into the matrix's columns (``in_features``).
    """

    shape: tuple[int, ...]
    layers: tuple[int, ...]
    batch: tuple[int, ...]
    out: tuple[int, ...]
    in_: tuple[int, ...]

    @property
    def order(self) -> tuple[int, ...]:
        return self.layers + self.batch + self.out + self.in_

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """``(*layers, *batch)`` sizes: the axes in front of each ``[out, in]`` matrix."""
        return tuple(self.shape[a] for a in self.layers + self.batch)

    @property
    def out_features(self) -> int:
        return math.prod(self.shape[a] for a in self.out)

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[a] for a in self.in_)

    def pack(self, weight: jax.Array) -> jax.Array:
        """``weight`` (the model's array) -> ``[*layers, *batch, out, in]``."""
        moved = jnp.transpose(weight, self.order)
        return moved.reshape(*self.lead_shape, self.out_features, self.in_features)

    def unpack(self, matrices: jax.Array, n_layers_taken: int = 0) -> jax.Array:
        """The inverse of :meth:`pack`, for the arrays left after ``n_layers_taken`` layer axes were taken."""
        kept = self.order[n_layers_taken:]
        grouped = matrices.reshape(*(self.shape[a] for a in kept))
        # Back to the original axis order of the axes that remain.
        return jnp.transpose(grouped, [int(i) for i in np.argsort(kept)])

    def describe(self) -> str:
        names = {a: f"{a}:{self.shape[a]}" for a in range(len(self.shape))}

        def axes(group):
            return "(" + ",".join(names[a] for a in group) + ")"

        parts = []
        if self.layers:
            parts.append(f"layers {axes(self.layers)}")
        if self.batch:
            parts.append(f"batch {axes(self.batch)}")
        parts.append(f"out {axes(self.out)} x in {axes(self.in_)}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class WeightUse:
    """One use of a weight in the traced forward pass.

    ``kind`` is ``"contraction"`` (with its ``layout``), ``"lookup"`` (a gather: an embedding) or
    ``"other"``; ``op`` names the primitive.

    Attributes:
      kind: ``"contraction"``, ``"lookup"`` or ``"other"``.
      op: the jaxpr primitive's name, e.g. ``"dot_general"``.
      layout: the :class:`WeightLayout` of a contraction, else ``None``.
    """

    kind: str
    op: str
    layout: WeightLayout | None = None


@dataclasses.dataclass(frozen=True)
class _View:
    """A weight as an operation sees it: which original axes remain, in which order, and which were taken."""

    shape: tuple[int, ...]  # the original weight's shape
    axes: tuple[int, ...]  # original axis of each current axis
    taken: tuple[tuple[int, Any], ...] = ()  # (original axis, index or None for a scan slice), in order
    pending: tuple[tuple[int, int], ...] = ()  # (current axis, start) sliced to one element, awaiting squeeze

    def current_shape(self) -> tuple[int, ...]:
        pend = dict(self.pending)
        return tuple(1 if i in pend else self.shape[a] for i, a in enumerate(self.axes))

    def transpose(self, perm: Sequence[int]) -> _View:
        if self.pending:
            raise _Unsupported("transpose of a sliced weight")
        return dataclasses.replace(self, axes=tuple(self.axes[p] for p in perm))

    def slice(self, start: Sequence[int], limit: Sequence[int], strides: Sequence[int] | None) -> _View:
        if strides is not None and any(s != 1 for s in strides):
            raise _Unsupported("strided slice")
        pending = []
        for i, (s, e) in enumerate(zip(start, limit, strict=True)):
            full = self.shape[self.axes[i]]
            if (s, e) == (0, full):
                continue
            if e - s != 1:
                raise _Unsupported("slice of part of an axis")
            pending.append((i, int(s)))
        return dataclasses.replace(self, pending=self.pending + tuple(pending))

    def squeeze(self, dims: Sequence[int]) -> _View:
        pend = dict(self.pending)
        if sorted(dims) != sorted(pend):
            raise _Unsupported("squeeze that is not an index")
        taken = self.taken + tuple((self.axes[d], pend[d]) for d in sorted(dims))
        axes = tuple(a for i, a in enumerate(self.axes) if i not in pend)
        return dataclasses.replace(self, axes=axes, taken=taken, pending=())

    def scan_slice(self) -> _View:
        if self.pending or not self.axes:
            raise _Unsupported("scan over a sliced weight")
        return dataclasses.replace(self, axes=self.axes[1:], taken=self.taken + ((self.axes[0], None),))


class _Unsupported(Exception):
    """An operation on a weight that the converter does not look through."""


def _contraction_layout(view: _View, dims, weight_is_rhs: bool, final_perm: Sequence[int] | None) -> WeightLayout:
    (lc, rc), (lb, rb) = dims
    w_contract, w_batch = (rc, rb) if weight_is_rhs else (lc, lb)
    x_batch_n = len(lb)
    ndim_w = len(view.axes)
    w_free = [d for d in range(ndim_w) if d not in w_contract and d not in w_batch]
    stack: list[int] = []
    if final_perm is not None:
        # dot_general's output: batch, then lhs free, then rhs free. Where does each land?
        n_total = len(final_perm)
        n_w_free = len(w_free)
        n_x_free = n_total - x_batch_n - n_w_free
        if weight_is_rhs:
            x_pos = range(x_batch_n, x_batch_n + n_x_free)
            w_pos = range(x_batch_n + n_x_free, n_total)
        else:
            w_pos = range(x_batch_n, x_batch_n + n_w_free)
            x_pos = range(x_batch_n + n_w_free, n_total)
        final = {src: dst for dst, src in enumerate(final_perm)}
        first_x = min((final[p] for p in x_pos), default=None)
        if first_x is not None:
            stack = [d for d, p in zip(w_free, w_pos, strict=True) if final[p] < first_x]
            if len(stack) == len(w_free):
                stack = []  # all in front: an ordinary projection written output-first
    layers = tuple(a for a, _ in view.taken)
    batch = tuple(sorted(view.axes[d] for d in list(w_batch) + stack))
    out = tuple(sorted(view.axes[d] for d in w_free if d not in stack))
    in_ = tuple(sorted(view.axes[d] for d in w_contract))
    if not in_:
        raise _Unsupported("a contraction over no axis of the weight")
    return WeightLayout(view.shape, layers, batch, out, in_)


def _consumers(jaxpr) -> dict[Any, list]:
    users: dict[Any, list] = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                users.setdefault(v, []).append(eqn)
    return users


def _final_perm(users: dict, outvar) -> Sequence[int] | None:
    following = users.get(outvar, [])
    if len(following) == 1 and following[0].primitive.name == "transpose":
        return tuple(following[0].params["permutation"])
    return None


def _inner(params: dict):
    """The (open) jaxpr of a call-like equation."""
    inner = params.get("jaxpr", params.get("call_jaxpr"))
    return getattr(inner, "jaxpr", inner)


def weight_uses(closed_jaxpr, weights: dict[int, tuple[int, ...]]) -> dict[int, list[WeightUse]]:
    """Every use of the jaxpr inputs ``weights`` (``{input index: the weight's shape}``).

    Returns ``{input index: [WeightUse, ...]}`` in the order the forward pass meets them (an
    input absent from the jaxpr's computation has no uses).

    Args:
      closed_jaxpr: the traced forward pass (``jax.make_jaxpr(...)(...)``).
      weights: ``{input index: the weight's shape}`` of the jaxpr inputs to follow.

    Returns:
      ``{input index: [WeightUse, ...]}``.
    """
    jaxpr = closed_jaxpr.jaxpr
    found: dict[int, list[WeightUse]] = {i: [] for i in weights}
    env = {jaxpr.invars[i]: (i, _View(tuple(shape), tuple(range(len(shape))))) for i, shape in weights.items()}
    _walk(jaxpr, env, found)
    return found


def _walk(jaxpr, env: dict, found: dict[int, list[WeightUse]]) -> None:
    users = _consumers(jaxpr)
    for eqn in jaxpr.eqns:
        hits = [(k, env[v]) for k, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal) and v in env]
        if not hits:
            continue
        name = eqn.primitive.name
        for k, (index, view) in hits:
            record = found[index].append
            try:
                if name == "dot_general":
                    if len(hits) == 2:
                        raise _Unsupported("a contraction of two weights")
                    layout = _contraction_layout(view, eqn.params["dimension_numbers"], k == 1,
                                                 _final_perm(users, eqn.outvars[0]))
                    record(WeightUse("contraction", name, layout))
                elif name in LAYOUT_OPS:
                    env[eqn.outvars[0]] = (index, _apply_view(view, eqn))
                elif name in _CALLS:
                    _walk(_inner(eqn.params), {_inner(eqn.params).invars[k]: (index, view)}, found)
                elif name == "scan":
                    body = _inner(eqn.params)
                    n_consts, n_carry = _scan_groups(eqn)
                    if k < n_consts:
                        _walk(body, {body.invars[k]: (index, view)}, found)
                    elif k >= n_consts + n_carry:
                        _walk(body, {body.invars[k]: (index, view.scan_slice())}, found)
                    else:
                        raise _Unsupported("a weight carried through a scan")
                elif name == "gather":
                    record(WeightUse("lookup", name))
                else:
                    raise _Unsupported(name)
            except _Unsupported as why:
                record(WeightUse("other", str(why) if str(why) != name else name))


def _scan_groups(eqn) -> tuple[int, int]:
    """(number of consts, number of carries) of a scan equation (jax 0.11 keeps them in a FlatTree)."""
    consts, carry, _ = (list(g) for g in eqn.params["ft_in"].update(list(range(len(eqn.invars)))).unpack())
    return len(consts), len(carry)


def _apply_view(view: _View, eqn) -> _View:
    name, params = eqn.primitive.name, eqn.params
    if name == "transpose":
        return view.transpose(params["permutation"])
    if name == "slice":
        return view.slice(params["start_indices"], params["limit_indices"], params.get("strides"))
    if name == "squeeze":
        return view.squeeze(params["dimensions"])
    return view


# ----------------------------------------------------------------------------------------------
# Running a forward pass on packed weights.


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class VirtualWeight:
    """A weight as the rewritten forward pass carries it: packed matrices plus adapters.

    ``packed``: a QuantizedTensor (its metadata one ``[out, in]`` matrix, its arrays with the
    leading ``[*layers, *batch]`` axes that remain) or a 16-bit array ``[*lead, out, in]``;
    ``lora_a`` ``[*lead, r, in]`` and ``lora_b`` ``[*lead, out, r]``, or None; ``scaling``;
    ``layout``; ``view``: the axes the model's code sees now; ``dtype``: the dtype it sees.

    Attributes:
      packed: QuantizedTensor or 16-bit array ``[*lead, out, in]``.
      lora_a: ``[*lead, r, in]`` or ``None``.
      lora_b: ``[*lead, out, r]`` or ``None``.
      scaling: the adapter's scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
      layout: the weight's :class:`WeightLayout`.
      view: the axes the model's code sees now (static).
      dtype: the dtype the model's code sees.
      backend: the quantized matmul's kernel backend.
    """

    packed: Any
    lora_a: Any
    lora_b: Any
    scaling: float
    layout: WeightLayout
    view: _View
    dtype: Any
    backend: str

    def tree_flatten(self):
        return (self.packed, self.lora_a, self.lora_b), (self.scaling, self.layout, self.view, self.dtype,
                                                          self.backend)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def replace(self, **changes) -> VirtualWeight:
        return dataclasses.replace(self, **changes)

    @property
    def n_taken(self) -> int:
        return len(self.view.taken)

    def take(self, index: int | None) -> VirtualWeight:
        """The weight with its next layer axis indexed at ``index`` (a static index)."""
        return self.replace(**{name: _index_leading(getattr(self, name), index)
                               for name in ("packed", "lora_a", "lora_b")})

    def dense(self) -> jax.Array:
        """``dequant(W) + scaling * B @ A`` in the view's axes and dtype (the exact meaning of the weight)."""
        w = dequantize_stacked(self.packed)
        if self.lora_a is not None:
            w = w + self.scaling * jnp.matmul(self.lora_b.astype(jnp.float32), self.lora_a.astype(jnp.float32))
        full = self.layout.unpack(w, self.n_taken)
        remaining = [a for a in self.layout.order if a not in {t for t, _ in self.view.taken}]
        order = sorted(remaining)
        moved = jnp.transpose(full, [order.index(a) for a in self.view.axes])
        for axis, start in self.view.pending:
            moved = jax.lax.slice_in_dim(moved, start, start + 1, axis=axis)
        return moved.astype(self.dtype)


def dequantize_stacked(packed: Any) -> jax.Array:
    """``[*lead, out, in]`` float32 from a packed weight.

    Args:
      packed: a QuantizedTensor whose arrays carry leading axes in front of one matrix's, or a
        16-bit array ``[*lead, out, in]``.

    Returns:
      float32 ``[*lead, out, in]``.
    """
    if not isinstance(packed, QuantizedTensor):
        return jnp.asarray(packed).astype(jnp.float32)
    from qlora_jax.nn.layers import leading_shape

    lead = leading_shape(packed)
    fn = functools.partial(dequantize, dtype=jnp.float32)
    for _ in lead:
        fn = jax.vmap(fn)
    return fn(packed)


def _index_leading(x: Any, index: int | None) -> Any:
    if x is None:
        return None
    if isinstance(x, QuantizedTensor):
        return jax.tree.map(lambda a: a[index], x)
    return x[index]


def run_with_weights(closed_jaxpr, args: Sequence[Any]) -> list[Any]:
    """Evaluates ``closed_jaxpr`` on ``args``, some of which are :class:`VirtualWeight`\\ s.

    Returns the output values (arrays, or tracers under an enclosing transformation). Contractions
    of a virtual weight whose layout is the packed one run as QLoRA matmuls; any other use gets the
    materialised weight (:meth:`VirtualWeight.dense`).

    Args:
      closed_jaxpr: the traced forward pass.
      args: one value per jaxpr input: arrays, or :class:`VirtualWeight` for converted weights.

    Returns:
      The jaxpr's outputs, a list.
    """
    return _eval(closed_jaxpr.jaxpr, closed_jaxpr.consts, list(args))


def _is_virtual(x: Any) -> bool:
    return isinstance(x, VirtualWeight)


def _eval(jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    users = _consumers(jaxpr)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(_is_virtual(x) for x in invals):
            outs = _eval_virtual(eqn, invals, users)
        else:
            outs = _bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _materialised(invals: Sequence[Any]) -> list[Any]:
    return [x.dense() if _is_virtual(x) else x for x in invals]


def _bind(eqn, invals):
    # As jax.core.eval_jaxpr binds an equation (jax 0.11: get_bind_params returns the params alone).
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **params)
    return outs if eqn.primitive.multiple_results else [outs]


def _eval_virtual(eqn, invals: list[Any], users: dict) -> list[Any]:
    name = eqn.primitive.name
    virtual = [k for k, x in enumerate(invals) if _is_virtual(x)]
    try:
        if name == "dot_general" and len(virtual) == 1:
            k = virtual[0]
            return [_qlora_dot(eqn, invals, k, users)]
        if name == "convert_element_type" and len(virtual) == 1:
            return [invals[0].replace(dtype=eqn.params["new_dtype"])]
        if name in LAYOUT_OPS and len(virtual) == 1:
            w = invals[0]
            view = _apply_view(w.view, eqn)
            if len(view.taken) > len(w.view.taken):
                for _, index in view.taken[len(w.view.taken):]:
                    w = w.take(index)
            return [w.replace(view=view)]
        if name in _CALLS:
            inner = _inner(eqn.params)
            consts = getattr(eqn.params.get("jaxpr"), "consts", ())
            if name in ("remat2", "checkpoint"):
                return _remat_call(eqn, inner, invals)
            return _eval(inner, consts, invals)
        if name == "scan":
            return _scan_call(eqn, invals)
    except _Unsupported:
        pass
    return _bind(eqn, _materialised(invals))


def _remat_call(eqn, inner, invals):
    flat, tree = jax.tree.flatten(invals, is_leaf=lambda x: x is None)

    def body(*leaves):
        return _eval(inner, (), jax.tree.unflatten(tree, leaves))

    fn = jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy"))
    return fn(*flat)


def _scan_call(eqn, invals):
    body = _inner(eqn.params)
    n_consts, n_carry = _scan_groups(eqn)
    consts, carry, xs = invals[:n_consts], invals[n_consts:n_consts + n_carry], invals[n_consts + n_carry:]
    if any(_is_virtual(x) for x in carry):
        raise _Unsupported("a weight carried through a scan")
    # A virtual weight among the xs is sliced like its packed arrays: the scan takes their leading axis.
    xs_in = [x.replace(view=x.view.scan_slice()) if _is_virtual(x) else x for x in xs]

    def step(c, x):
        outs = _eval(body, (), [*consts, *c, *x])
        return outs[:n_carry], outs[n_carry:]

    final, ys = jax.lax.scan(step, list(carry), xs_in, length=eqn.params["length"], reverse=eqn.params["reverse"],
                             unroll=eqn.params["unroll"])
    return [*final, *ys]


def _qlora_dot(eqn, invals, k: int, users: dict) -> jax.Array:
    """``dot_general`` with the weight at operand ``k``, as QLoRA matmuls in the packed layout."""
    w: VirtualWeight = invals[k]
    x = invals[1 - k]
    dims = eqn.params["dimension_numbers"]
    layout = _contraction_layout(w.view, dims, k == 1, _final_perm(users, eqn.outvars[0]))
    if layout != w.layout or w.view.pending:
        raise _Unsupported("a contraction in another layout than the packed one")
    (lc, rc), (lb, rb) = dims
    x_contract, w_contract = (lc, rc) if k == 1 else (rc, lc)
    x_batch, w_batch = (lb, rb) if k == 1 else (rb, lb)
    axis_of = dict(enumerate(w.view.axes))  # current weight dim -> original axis
    # x's dims, each labelled by the original weight axis it pairs with ("b"/"c") or as free ("x").
    x_label = {}
    for xd, wd in zip(x_contract, w_contract, strict=True):
        x_label[xd] = ("c", axis_of[wd])
    for xd, wd in zip(x_batch, w_batch, strict=True):
        x_label[xd] = ("b", axis_of[wd])
    x_free = [d for d in range(x.ndim) if d not in x_label]
    batch_axes = layout.batch  # packed leading order (after the taken layer axes)
    x_batch_order = [next(xd for xd, lab in x_label.items() if lab == ("b", a)) for a in batch_axes
                     if ("b", a) in x_label.values()]
    x_contract_order = [next(xd for xd, lab in x_label.items() if lab == ("c", a)) for a in layout.in_]
    xt = jnp.transpose(x, [*x_batch_order, *x_free, *x_contract_order])
    xt = xt.reshape(*xt.shape[:len(x_batch_order) + len(x_free)], layout.in_features)
    compute = x.dtype
    fn = functools.partial(_matrix, scaling=w.scaling, backend=w.backend)
    # One vmap per batch axis of the packed weight, innermost last; x is mapped only over the
    # axes it shares with the weight (contraction batch axes), stacked projections share x.
    is_dot_batch = [("b", a) in x_label.values() for a in batch_axes]
    for shared in reversed(is_dot_batch):
        fn = jax.vmap(fn, in_axes=(0 if shared else None, 0, 0, 0))
    y = fn(xt.astype(compute), w.packed, w.lora_a, w.lora_b)  # [*batch, *x_free, out]
    y = y.reshape(*y.shape[:-1], *(layout.shape[a] for a in layout.out))
    # Labels of y's dims, then the permutation to dot_general's output order.
    y_labels = [("w", a) for a in batch_axes] + [("x", d) for d in x_free] + [("w", a) for a in layout.out]
    w_free = [d for d in range(len(w.view.axes)) if d not in w_contract and d not in w_batch]
    batch_labels = [("w", axis_of[wd]) for wd in w_batch]
    x_free_labels = [("x", d) for d in x_free]
    w_free_labels = [("w", axis_of[wd]) for wd in w_free]
    target = batch_labels + (x_free_labels + w_free_labels if k == 1 else w_free_labels + x_free_labels)
    y = jnp.transpose(y, [y_labels.index(lab) for lab in target])
    return y.astype(eqn.outvars[0].aval.dtype)


def _matrix(x, packed, lora_a, lora_b, *, scaling: float, backend: str):
    y = base_matmul(x, packed, backend=backend)
    if lora_a is not None:
        y = y + lora_delta(x, lora_a, lora_b, scaling)
    return y


def trace_forward(fn: Callable, *args: Any) -> tuple[Any, Any]:
    """``(closed_jaxpr, output tree)`` of ``fn(*args)`` (its flat inputs in ``jax.tree.leaves(args)`` order)."""
    flat, tree = jax.tree.flatten(args)
    out_tree = []

    def flat_fn(*leaves):
        out = fn(*jax.tree.unflatten(tree, leaves))
        leaves_out, treedef = jax.tree.flatten(out)
        out_tree.append(treedef)
        return leaves_out

    closed = jax.make_jaxpr(flat_fn)(*flat)
    return closed, out_tree[0]
