r"""Evaluate a qlora-jax model (4-bit base + adapters) with EleutherAI's lm-evaluation-harness, offline.

    python -m experiments.lm_eval --model_args pretrained=/path/to/hf_folder,adapter=outputs/finetune \
        --tasks my_task --include_path my_tasks/ --num_fewshot 0 --output_path results/

(installed: ``qlora-jax-eval ...``; needs ``pip install -r requirements/lm-eval.txt``.) Every argument
goes to lm-eval's own command line (``lm-eval run``: ``--tasks``, ``--num_fewshot``, ``--limit``,
``--output_path``, ``--log_samples``, ``--include_path``, ``--apply_chat_template``,
``--system_instruction``, ``--gen_kwargs``, ``--batch_size``...); ``--model`` defaults to
``qlora_jax`` (:mod:`qlora_jax.eval.lm_eval_model`, whose ``--model_args`` are ``pretrained``,
``quant``, ``double_quant``, ``adapter``, ``dtype``, ``compute_dtype``, ``batch_size``, ``mesh``,
``max_length``, ``max_gen_toks``, ``seed``, ``chat_template``).

Nothing is downloaded: ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` are set, so a task reads a
local dataset (``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``, or a dataset
already in the local cache, ``HF_DATASETS_CACHE``); a task whose dataset is not local ends with
an error that says so.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main", "entry_point", "NotLocalError", "UnknownTaskError"]

_OFFLINE_MARKERS = ("offline", "couldn't reach", "could not reach", "connection", "not find",
                    "doesn't exist on the hub", "not found on the hub")


class NotLocalError(RuntimeError):
    """A task's dataset is neither a local file nor in the local dataset cache."""


class UnknownTaskError(ValueError):
    """A ``--tasks`` name that is neither one of lm-eval's tasks nor a YAML under ``--include_path``."""


def _is_not_local(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a dataset or hub lookup refused because we are offline."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name, text = type(err).__name__, str(err).lower()
        if name in ("DatasetNotFoundError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError"):
            return True
        if "hub" in text and any(m in text for m in _OFFLINE_MARKERS):
            return True
        err = err.__cause__ or err.__context__
    return False


def main(argv: list[str] | None = None) -> None:
    """Runs lm-eval's command line with the ``qlora_jax`` model registered and the hub offline.

    Args:
        argv: lm-eval's arguments (default: ``sys.argv[1:]``); ``--model qlora_jax`` is added
            when no ``--model`` is given.

    Raises:
        NotLocalError: a task's dataset is not local (nothing is downloaded).
        UnknownTaskError: a ``--tasks`` name lm-eval does not know.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        raise SystemExit(f"lm-eval is not installed ({err}): pip install -r requirements/lm-eval.txt "
                         "(or pip install 'qlora-jax[lm-eval]')") from None
    import multiprocessing

    import qlora_jax.eval.lm_eval_model  # noqa: F401  (registers the model "qlora_jax")

    # lm-eval's bootstrapped standard errors use a process pool: forked from a process running
    # JAX's threads, a child may deadlock; spawned children start clean (restored afterwards).
    start_method = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    if not any(a == "--model" or a.startswith("--model=") for a in args) and not (args and args[0] in ("ls",
                                                                                                       "validate")):
        args = ["--model", "qlora_jax", *args]
    if not args or args[0] not in ("run", "ls", "validate", "-h", "--help"):
        args = ["run", *args]
    saved, sys.argv = sys.argv, ["lm-eval", *args]
    try:
        cli_evaluate()
    except Exception as err:
        if _is_not_local(err):
            raise NotLocalError(
                f"a task's dataset is not local and nothing is downloaded ({type(err).__name__}: {err}). Point the "
                "task's YAML at local files (dataset_path: json, dataset_kwargs: {data_files: ...}) or fill the local "
                "dataset cache (HF_DATASETS_CACHE) on a machine with internet first") from err
        if isinstance(err, ValueError) and str(err).startswith("Tasks not found"):
            raise UnknownTaskError(f"--tasks: {err}; a task is one of lm-eval's (lm-eval ls tasks) or a task YAML "
                                   "under --include_path") from err
        raise
    finally:
        sys.argv = saved
        multiprocessing.set_start_method(start_method, force=True)


def entry_point() -> None:
    """The ``qlora-jax-eval`` console script: our errors as one line, exit status 1."""
    try:
        main()
    except Exception as err:
        from qlora_jax.checkpoints.errors import CheckpointError
        from qlora_jax.eval.lm_eval_model import ModelArgsError  # main imported it

        if isinstance(err, (NotLocalError, UnknownTaskError, ModelArgsError, CheckpointError)):
            raise SystemExit(f"error: {type(err).__name__}: {err}") from None
        raise


if __name__ == "__main__":
    entry_point()
