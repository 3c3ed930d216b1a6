"""Errors raised while reading checkpoints."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint is unreadable or disagrees with its config: the message names the file/tensor."""
