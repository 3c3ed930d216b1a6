"""Which parameters weight decay applies to.

The default is Hugging Face Trainer's rule (the one qlora.py trains with): every parameter except
biases and normalisation weights. It looks only at the leaf's path, not its rank, because the
same parameter is ``[L, D]`` when layers are stacked and ``[D]`` in one layer's slice (as
:func:`qlora_jax.optim.per_layer` sees it), and the decision must not change between the two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["key_name", "decays", "decay_mask", "as_mask_fn", "MaskLike"]

MaskLike = Callable[[Any], Any] | Any | None


def key_name(key: Any) -> str:
    """The name of one path entry (dict key, attribute, or sequence index) as a string.

    Args:
      key: a ``jax.tree_util`` path entry (``DictKey``, ``GetAttrKey``, ``SequenceKey``, ...).

    Returns:
      Its key, name or index as ``str``.
    """
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def decays(path: tuple, leaf: Any) -> bool:
    """True unless the path names a bias (last entry contains "bias") or a norm (any entry contains "norm").

    LoRA ``lora_A``/``lora_B``, linear weights and embeddings decay; ``input_layernorm``,
    ``post_attention_layernorm``, ``norm`` and ``*.bias`` do not. Case-insensitive.

    Args:
      path: the leaf's key path (``jax.tree_util`` keys: dict keys, attributes, indices).
      leaf: the leaf (unused).

    Returns:
      Whether weight decay applies to the leaf (``bool``).
    """
    del leaf
    names = [key_name(k).lower() for k in path]
    if names and "bias" in names[-1]:
        return False
    return not any("norm" in n for n in names)


def decay_mask(params: Any) -> Any:
    """Pytree of bools (the structure of ``params``): :func:`decays` of every leaf.

    Args:
      params: the parameters' pytree.

    Returns:
      A pytree of Python bools with ``params``' structure.
    """
    return jax.tree_util.tree_map_with_path(decays, params)


def as_mask_fn(mask: MaskLike) -> Callable[[Any], Any] | None:
    """A weight-decay mask as optax accepts it, usable on any subtree of the parameters.

    ``mask`` is a callable ``params -> pytree of bools`` (returned as is), a pytree of bools with the
    parameters' structure, or None (decay everything). A pytree becomes a lookup by leaf path, so
    that it still applies when an optimizer sees only some leaves at a time (streaming).

    Args:
      mask: a callable, a pytree of Python bools, or ``None``.

    Returns:
      ``None``, ``mask`` itself if callable, or a function ``params -> pytree of bools`` looking
      each leaf's path up in ``mask``.

    Raises:
      TypeError: the pytree holds something other than Python bools.
      KeyError: (when the returned function runs) a parameter path the mask has no entry for.
    """
    if mask is None or callable(mask):
        return mask
    table = {}
    for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]:
        if not isinstance(value, bool):
            raise TypeError(
                f"a weight-decay mask pytree must hold Python bools, got {type(value).__name__} at "
                f"{jax.tree_util.keystr(path)}"
            )
        table[jax.tree_util.keystr(path)] = value

    def lookup(params):
        def one(path, _):
            key = jax.tree_util.keystr(path)
            if key not in table:
                raise KeyError(f"the weight-decay mask has no entry for parameter {key}")
            return table[key]

        return jax.tree_util.tree_map_with_path(one, params)

    return lookup
