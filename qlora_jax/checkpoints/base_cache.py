"""A finetune's quantized base, saved once per output directory and read back on resume.

Quantizing the base is the slow part of starting a run (tensor by tensor, on the host). A run
writes its base once to ``<output_dir>/base/`` (:func:`~qlora_jax.checkpoints.orbax_format.save_quantized`);
``--resume`` and ``experiments.generate --adapter=<output_dir>`` read that instead, with no
source checkpoint read and no quantizer call. A cached base saved from another source, for another
model config or stored otherwise than asked is refused with an error naming what differs.

:func:`qlora_jax.model.load_pretrained_cached` is :func:`~qlora_jax.model.load_pretrained` with
this cache; it lives in :mod:`qlora_jax.model` because it builds a model, and this module reads and
writes pytrees only (it imports nothing from :mod:`qlora_jax.model`, so there is no import circle).
"""

from __future__ import annotations

import logging
import pathlib
from typing import TYPE_CHECKING, Any

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.load import open_checkpoint, read_config
from qlora_jax.checkpoints.orbax_format import (
    QuantizedCheckpoint,
    check_saved_base,
    is_quantized_checkpoint,
    load_quantized,
    save_quantized,
)
from qlora_jax.quant import QuantConfig

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from qlora_jax.models.config import LlamaConfig
    from qlora_jax.tokenizer import Tokenizer

__all__ = ["BASE_DIR", "QuantizedBaseCache", "find_run_adapter", "source_name"]

log = logging.getLogger(__name__)

BASE_DIR = "base"
PEFT_ADAPTER_DIR = "adapter"


def source_name(source: str | pathlib.Path) -> str:
    """How a source is recorded, so that ``./m`` and ``/abs/m`` agree.

    Args:
      source: a checkpoint path or "embedded".

    Returns:
      "embedded", or the absolute path.
    """
    return "embedded" if str(source) == "embedded" else str(pathlib.Path(source).absolute())


class QuantizedBaseCache:
    """``<output_dir>/base/``: the run's quantized base (a :func:`save_quantized` checkpoint).

    Args:
      output_dir: the run's output directory.
    """

    def __init__(self, output_dir: str | pathlib.Path):
        self.path = pathlib.Path(output_dir).absolute() / BASE_DIR

    def exists(self) -> bool:
        """Whether a committed base is there; a ``base/`` that is something else is an error."""
        if is_quantized_checkpoint(self.path):
            return True
        if self.path.exists():
            raise CheckpointError(f"{self.path} exists but is not a quantized checkpoint written by save_quantized; "
                                  "move it away (the run saves its base there)")
        return False

    def check(self, source: str | pathlib.Path, quant: QuantConfig) -> None:
        """Refuses the cached base unless it was saved from ``source`` with ``quant``, for the model
        config ``source`` has now (read from its config alone, no tensors)."""
        check_saved_base(self.path, source=source_name(source), quant=quant)
        try:
            from qlora_jax import assets

            source_path = assets.embedded_model_path() if str(source) == "embedded" else pathlib.Path(source)
            expected = read_config(open_checkpoint(source_path)[1])
        except (CheckpointError, FileNotFoundError) as err:
            log.warning("cannot read the config of %s to check the cached base %s against it (%s); the source name "
                        "matches, so the cached base is used", source, self.path, err)
            return
        check_saved_base(self.path, config=expected)

    def load(self, source: str | pathlib.Path, quant: QuantConfig, *, mesh: Mesh | None = None
             ) -> QuantizedCheckpoint:
        """The cached base, checked against ``source`` and ``quant`` (see :meth:`check`)."""
        self.check(source, quant)
        return load_quantized(self.path, mesh=mesh, expected_quant=quant)

    def save(self, base: dict[str, Any], config: LlamaConfig, tokenizer: Tokenizer | None,
             source: str | pathlib.Path) -> pathlib.Path:
        """Writes a model's base (not its adapters: the run's checkpoints hold those) and tokenizer.

        Args:
            base: the model's frozen base pytree (``model.base_params``).
            config: its architecture (``model.config``).
            tokenizer: saved with it, if given.
            source: where the base was loaded from (recorded, and checked on reading).

        Returns:
            The cache's path.
        """
        return save_quantized(self.path, base, config=config, tokenizer=tokenizer, source=source_name(source))


def find_run_adapter(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
    """The adapter and saved base of a finetune's output.

    Args:
      path: a finetune's output directory or its ``adapter/`` folder (or any PEFT adapter folder,
        whose parent may hold a saved base).

    Returns:
      ``(PEFT adapter folder, saved base or None)``.

    Raises:
      CheckpointError: ``path`` is neither an adapter folder nor a finetune output directory.
    """
    path = pathlib.Path(path).absolute()
    if (path / "adapter_config.json").exists():
        adapter, run = path, path.parent
    elif (path / PEFT_ADAPTER_DIR / "adapter_config.json").exists():
        adapter, run = path / PEFT_ADAPTER_DIR, path
    else:
        raise CheckpointError(f"{path} is neither a PEFT adapter folder (adapter_config.json) nor a finetune output "
                              f"directory with {PEFT_ADAPTER_DIR}/adapter_config.json (a run writes it when it ends)")
    base = run / BASE_DIR
    return adapter, (base if is_quantized_checkpoint(base) else None)
