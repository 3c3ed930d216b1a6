"""Multiple-choice accuracy beside the loss curve: a second y axis on the recipe's loss plot."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["plot_accuracy"]


def plot_accuracy(ax: Any, history: Iterable[Mapping[str, Any]], *, prefix: str = "mc_", kind: str = "mc_eval",
                  label: str = "multiple-choice") -> Any:
    """Draws a metrics history's multiple-choice accuracy on a twin y axis of the matplotlib ``ax``.

    ``{prefix}acc`` and ``{prefix}acc_norm`` are drawn with ±1 standard error. The accuracy axis
    spans 0-1 so that runs compare at a glance; its legend sits at the lower right, away from the
    loss legend.

    Args:
      ax: a matplotlib ``Axes`` (the loss plot's).
      history: the ``metrics.jsonl`` entries (dicts with ``kind`` and ``step``).
      prefix: of the metric names.
      kind: which entries to draw.
      label: names the task in the legend.

    Returns:
      The twin axis, or None when the history has no such entries.
    """
    entries = sorted((h for h in history if h.get("kind") == kind), key=lambda h: h["step"])
    if not entries:
        return None
    twin = ax.twinx()
    for metric, marker in (("acc", "s-"), ("acc_norm", "^--")):
        points = [(h["step"], h[f"{prefix}{metric}"], h.get(f"{prefix}{metric}_stderr") or 0.0)
                  for h in entries if h.get(f"{prefix}{metric}") is not None]
        if points:
            steps, values, errors = zip(*points, strict=True)
            twin.errorbar(steps, values, yerr=errors, fmt=marker, capsize=3, color="tab:green" if metric == "acc"
                          else "tab:olive", label=f"{label} {metric}")
    twin.set_ylim(0.0, 1.0)
    twin.set_ylabel(f"{label} accuracy")
    twin.legend(loc="lower right")
    return twin
