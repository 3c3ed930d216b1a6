"""Training checkpoints with Orbax: adapters, optimizer state, step, data position, RNG, flags.

One :class:`TrainCheckpointer` wraps an ``orbax.checkpoint.CheckpointManager`` (asynchronous
saves). A step directory holds:

* ``trainable``: the adapters (or the full weights when finetuning everything);
* ``opt_state``: the optimizer state (host-offloaded leaves are saved like any other);
* ``meta``: JSON with the step, the data iterator's position, the RNG key data, the flags and
  the LoRA config.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed while saving leaves the previous checkpoint as the latest restorable one. Deleting is made
atomic the same way: a step is first renamed into ``<directory>/deleting/`` (one ``rename``), then
removed from there, so a process killed while deleting never leaves a half-deleted step that still
looks committed; what such a kill leaves in ``deleting/`` is removed by the next checkpointer. Adapters alone
(PEFT format, or ``trainable`` of a checkpoint) can seed another run (``adapter_init``).

Retention (``max_to_keep``) counts *confirmed* checkpoints only: a new checkpoint is unconfirmed
until the caller proves its state good (:meth:`TrainCheckpointer.confirm`, after the next step ran
healthy), and older checkpoints are deleted only then. So a run that dies right after a save
still has a good checkpoint to go back to (:meth:`TrainCheckpointer.discard_after` removes the
unconfirmed ones), even with ``max_to_keep=1``; between a save and its confirmation there may be
``max_to_keep + 1`` checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["TrainCheckpointer", "RestoredState", "abstract_like", "load_trainable", "load_step_meta"]

_log = logging.getLogger(__name__)

# Steps being deleted are renamed into this subdirectory first (not a step name, so Orbax never
# lists it): Orbax's own local delete removes a step's files one by one, and a kill in the middle
# left a step directory that still looked committed but read as truncated OCDBT streams.
DELETING_SUBDIR = "deleting"


@dataclasses.dataclass
class RestoredState:
    step: int
    trainable: Any
    opt_state: Any
    meta: dict[str, Any]

    @property
    def data_state(self) -> dict[str, Any]:
        return self.meta["data_state"]

    @property
    def rng_key(self) -> jax.Array:
        return jax.random.wrap_key_data(jnp.asarray(np.asarray(self.meta["rng_key_data"], np.uint32)))


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding placeholders of ``tree`` (the restore target)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


class TrainCheckpointer:
    """Saves and restores training state under ``directory`` (``directory/<step>/...``).

    ``max_to_keep``: confirmed checkpoints to keep (None: all); see the module docstring. A
    context manager: leaving it waits for pending saves and closes the manager.
    """

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int | None = 2, async_save: bool = True):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1 (or None: keep all), got {max_to_keep}")
        self.directory = pathlib.Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self._unconfirmed: set[int] = set()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None,  # retention is ours: confirmed checkpoints only
                enable_async_checkpointing=async_save,
                create=True,
                todelete_subdir=DELETING_SUBDIR,  # delete by one atomic rename, then purge
            ),
        )
        self._purge_deleted()

    def _purge_deleted(self) -> None:
        """Removes the steps renamed into ``deleting/`` (by this run, or by a run killed before
        it could remove them). Only process 0 deletes, as Orbax's primary host does."""
        trash = self.directory / DELETING_SUBDIR
        if jax.process_index() != 0 or not trash.exists():
            return
        for doomed in sorted(trash.iterdir()):
            _log.info("removing the deleted checkpoint %s", doomed)
            if doomed.is_dir():
                shutil.rmtree(doomed)
            else:
                doomed.unlink()
        trash.rmdir()

    def _delete(self, steps: list[int]) -> None:
        for step in steps:
            self.manager.delete(step)
        self._purge_deleted()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        trainable: Any,
        opt_state: Any,
        *,
        data_state: dict[str, Any],
        rng_key: jax.Array,
        flags: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Starts saving step ``step`` (asynchronously; arrays are copied before this returns)."""
        meta = {
            "step": int(step),
            "data_state": data_state,
            "rng_key_data": np.asarray(jax.random.key_data(rng_key)).tolist(),
            "flags": flags,
            **(extra or {}),
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(trainable),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self._unconfirmed.add(int(step))

    def confirm(self, through_step: int) -> None:
        """Marks the checkpoints up to ``through_step`` good, then deletes the oldest confirmed ones
        beyond ``max_to_keep``."""
        self._unconfirmed = {s for s in self._unconfirmed if s > through_step}
        if self.max_to_keep is None:
            return
        confirmed = [s for s in self.all_steps() if s not in self._unconfirmed]
        if len(confirmed) > self.max_to_keep:
            self.manager.wait_until_finished()
            self._delete(sorted(confirmed)[: -self.max_to_keep])

    def discard_after(self, step: int) -> list[int]:
        """Deletes the checkpoints of steps after ``step`` (states found bad); returns those steps."""
        self.manager.wait_until_finished()
        doomed = sorted(s for s in self.all_steps() if s > step)
        self._delete(doomed)
        self._unconfirmed -= set(doomed)
        return doomed

    def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
        """The JSON ``meta`` item of ``step`` (default: the latest), without restoring any array;
        None if there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def restore(self, trainable_like: Any, opt_state_like: Any, step: int | None = None) -> RestoredState | None:
        """The state saved at ``step`` (default: the latest complete one), or None if there is none.

        ``trainable_like`` / ``opt_state_like``: arrays or ``ShapeDtypeStruct`` giving the target
        structure, dtypes, shardings and memory kinds (e.g. the freshly initialised state).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(abstract_like(trainable_like)),
                opt_state=ocp.args.StandardRestore(abstract_like(opt_state_like)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return RestoredState(step, restored.trainable, restored.opt_state, dict(restored.meta))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _step_directory(path: str | pathlib.Path) -> pathlib.Path:
    """A checkpoint step directory (``.../<step>``), or the latest step under a checkpoint directory."""
    path = pathlib.Path(path).absolute()
    if (path / "trainable").exists():
        return path
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "trainable").exists()) \
        if path.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint with adapters ('trainable') under {path}")
    return path / str(steps[-1])


def load_trainable(path: str | pathlib.Path, trainable_like: Any) -> Any:
    """The ``trainable`` item of a checkpoint step directory (``.../<step>``), or of the latest
    step under a checkpoint directory: adapters to start another run from."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(_step_directory(path) / "trainable", abstract_like(trainable_like))


def load_step_meta(path: str | pathlib.Path) -> dict[str, Any]:
    """The ``meta`` JSON (step, flags, LoRA config, ...) of the checkpoint :func:`load_trainable` reads."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return dict(checkpointer.restore(_step_directory(path) / "meta"))
