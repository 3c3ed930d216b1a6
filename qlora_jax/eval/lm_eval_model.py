"""An lm-evaluation-harness model backed by qlora-jax: ``lm_eval --model qlora_jax``.

::

    python -m experiments.lm_eval --model_args pretrained=<hf folder>,adapter=<run>/adapter \\
        --tasks <task> --include_path <folder of task YAMLs>

Importing this module registers the model ``qlora_jax`` with lm-eval (``pip install
"qlora-jax[lm-eval]"``). It computes what lm-eval's own ``hf`` model (transformers + PEFT)
computes, request by request:

* ``loglikelihood``: lm-eval's tokenization of ``(context, continuation)`` (TemplateLM), the row
  ``(context + continuation)[-(max_length + 1):][:-1]`` scored in float32 over the whole vocabulary,
  ``is_greedy`` the exact "every continuation token is the argmax" (first index on ties, as torch).
  Rows are right-padded to a bucketed length (:func:`qlora_jax.data.bucket_lengths`) in batches
  of exactly ``batch_size`` rows, so :func:`token_logprobs` compiles once per length bucket.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows over ``max_length`` tokens.
* ``generate_until``: our KV-cache generation (:mod:`qlora_jax.generate`), greedy or sampled
  (``do_sample``, ``temperature``, ``top_p``), ``max_gen_toks``, the text cut at lm-eval's stop
  sequences (``until`` plus the EOS text), contexts left-truncated to ``max_length - max_gen_toks``.
* ``apply_chat_template``: the model's own template (``--apply_chat_template``,
  ``--system_instruction``).

``model_args`` (see :class:`QLoraJaxLM`): ``pretrained``, ``quant``, ``double_quant``, ``adapter``,
``compute_dtype``, ``batch_size``, ``mesh``, ``max_length``, ``max_gen_toks``, ``seed``,
``chat_template``. Any other key is an error naming the known ones.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from qlora_jax import data as data_lib
from qlora_jax.models import llama
from qlora_jax.models.spec import ModelSpec
from qlora_jax.quant import QUANT_MODES, QuantConfig

__all__ = ["QLoraJaxLM", "ModelArgsError", "TaskEvaluator", "is_task_yaml", "token_logprobs", "load_model"]

log = logging.getLogger(__name__)

# Positions whose logits [rows, V] the output head makes at once.
_HEAD_ROWS = 512
# Generation kwargs of lm-eval's tasks that we implement (after normalize_gen_kwargs).
_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


class ModelArgsError(ValueError):
    """A ``--model_args`` value the ``qlora_jax`` model cannot take."""


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ModelArgsError(f"model_args {name}={value!r}: expected true or false")


def _as_int(name: str, value: Any, *, minimum: int = 1) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ModelArgsError(f"model_args {name}={value!r}: expected an integer >= {minimum}") from None
    if number < minimum:
        raise ModelArgsError(f"model_args {name}={value!r}: expected an integer >= {minimum}")
    return number


def load_model(pretrained: str, *, quant: str = "nf4", double_quant: bool = True, adapter: str | None = None,
               dtype: str = "bfloat16", compute_dtype: str | None = None, mesh: Any = None) -> tuple[Any, Any]:
    """The model and tokenizer, loaded as ``experiments/generate.py`` loads them.

    Args:
        pretrained: a Hugging Face folder, a ``.gguf`` file, a ``save_quantized`` directory or "embedded".
        quant: "nf4", "fp4", "int8" or "bf16"/"float16"/"float32".
        double_quant: double-quantize the 4-bit scales.
        adapter: a PEFT adapter folder or a finetune's output directory (whose saved quantized
            base, when there is one, is used instead of re-quantizing ``pretrained``; asking for
            another quantization than the stored one is then an error).
        dtype: how the unquantized tensors (embeddings, norms, ``lm_head``) are stored.
        compute_dtype: the activations' dtype (None: float32 on CPU, bfloat16 on accelerators).
        mesh: a :class:`jax.sharding.Mesh` to shard the weights over, or None.

    Returns:
        ``(CausalLM, Tokenizer)``.
    """
    from qlora_jax.model import load_pretrained

    model_path: str | pathlib.Path = pretrained
    quant_config = QuantConfig(quant, double_quant=double_quant, dtype=dtype)
    adapter_dir = None
    if adapter:
        from qlora_jax.checkpoints.base_cache import find_run_adapter
        from qlora_jax.checkpoints.orbax_format import read_saved_quantization

        adapter_dir, saved_base = find_run_adapter(adapter)
        if saved_base is not None and pretrained != str(saved_base):
            stored = read_saved_quantization(saved_base)
            log.info("adapter %s: starting from its run's saved base %s", adapter, saved_base)
            model_path = saved_base
            quant_config = stored
    model, tokenizer = load_pretrained(model_path, quant_config, lora=None, adapter=adapter_dir,
                                       compute_dtype=compute_dtype, mesh=mesh)
    if tokenizer is None:
        raise ModelArgsError(f"model_args pretrained={pretrained!r}: it has no tokenizer (tokenizer.json); lm-eval's "
                             "tasks are text")
    return model, tokenizer


def _head_chunk(rows: int, length: int) -> int:
    """A divisor of ``length`` such that ``rows * chunk`` is about ``_HEAD_ROWS``."""
    chunk = max(1, min(length, _HEAD_ROWS // max(rows, 1)))
    while length % chunk:
        chunk -= 1
    return chunk


@functools.partial(jax.jit, static_argnames=("spec",))
def token_logprobs(spec: ModelSpec, base: Any, lora: Any, input_ids: jax.Array, target_ids: jax.Array) \
        -> tuple[jax.Array, jax.Array]:
    """Per position ``log p(target | prefix)`` and whether the target is the argmax.

    Args:
        spec: the model's :class:`ModelSpec` (static).
        base, lora: its weights (``lora`` None for the base alone).
        input_ids: int32 ``[1, B, T]``, right-padded rows (causal attention: padding after a
            row's tokens cannot change them). The leading axis is
            :func:`~qlora_jax.distributed.shard_batch`'s.
        target_ids: int32 ``[1, B, T]``, the next token of every position.

    Returns:
        ``(logprobs float32 [B, T] in nats, greedy bool [B, T])``; log-softmax over the whole
        vocabulary in float32, greedy the first argmax (torch's tie-breaking) equal to the target.
    """
    ids, targets = input_ids[0], target_ids[0]
    b, t = ids.shape
    hidden, _ = llama.hidden_states(spec, base, lora, ids)
    d = hidden.shape[-1]
    chunk = _head_chunk(b, t)
    h = jnp.moveaxis(hidden.reshape(b, t // chunk, chunk, d), 1, 0)
    y = jnp.moveaxis(targets.reshape(b, t // chunk, chunk), 1, 0)

    def one(x):
        logits = llama.logits_from_hidden(spec, base, x[0].reshape(-1, d))  # [b * chunk, V] float32
        target = x[1].reshape(-1, 1)
        picked = jnp.take_along_axis(logits, target, axis=-1)[:, 0]
        logprob = picked - jax.nn.logsumexp(logits, axis=-1)
        greedy = jnp.argmax(logits, axis=-1) == target[:, 0]
        return logprob, greedy

    logprob, greedy = jax.lax.map(one, (h, y))
    unchunk = lambda a: jnp.moveaxis(a.reshape(t // chunk, b, chunk), 0, 1).reshape(b, t)  # noqa: E731
    return unchunk(logprob), unchunk(greedy)


_KNOWN_ARGS = ("pretrained", "quant", "double_quant", "adapter", "dtype", "compute_dtype", "batch_size", "mesh",
               "max_length", "max_gen_toks", "seed", "chat_template")


@register_model("qlora_jax")
class QLoraJaxLM(TemplateLM):
    """lm-eval's ``qlora_jax`` model (see the module docstring).

    The arguments come from ``--model_args key=value,...``.

    Args:
        pretrained: a Hugging Face folder, a ``.gguf`` file, a ``save_quantized`` directory or
            "embedded" (the default: SmolLM2-135M-Instruct).
        quant: "nf4" (default), "fp4", "int8" or "bf16" (also "float16"/"float32").
        double_quant: double-quantize the 4-bit scales (default true).
        adapter: a PEFT adapter folder or a finetune's output directory.
        dtype: how embeddings, norms and ``lm_head`` are stored: "bfloat16" (default, as
            bitsandbytes leaves them) or "float32"/"float16" (``quant=float32,dtype=float32`` is the
            checkpoint's float32 model exactly).
        compute_dtype: "float32" or "bfloat16" (default: float32 on CPU, bfloat16 on accelerators).
        batch_size: rows per compiled call (default 16; with a mesh, a multiple of its
            data-parallel size). ``--batch_size`` sets it too; the model_args value wins when
            both are given.
        mesh: a device mesh such as ``fsdp=8`` or ``data=2;fsdp=4`` (``;`` between axes, since
            lm-eval splits model_args at commas).
        max_length: the longest row in tokens (default: the model's ``max_position_embeddings``).
        max_gen_toks: the generation budget when a task sets none (default 256, as ``hf``).
        seed: the sampling seed of ``do_sample`` tasks (default 0).
        chat_template: a template name or Jinja string for ``--apply_chat_template`` (default:
            the model's own).
        device: lm-eval's own option. JAX places the model on its default platform (and over
            ``mesh``): a ``device`` naming another platform is logged as not used (lm-eval's
            command line passes ``cuda:0`` when ``--device`` is not given).
        max_batch_size: lm-eval's own option; it only goes with ``batch_size=auto``, which this
            model does not have.

    Raises:
        ModelArgsError: an unknown argument or a value out of range, naming it.
    """

    def __init__(self, pretrained: str = "embedded", quant: str = "nf4", double_quant: Any = True,
                 adapter: str | None = None, dtype: str = "bfloat16", compute_dtype: str | None = None,
                 batch_size: Any = 16,
                 mesh: str | None = None, max_length: Any = None, max_gen_toks: Any = 256, seed: Any = 0,
                 chat_template: str | None = None, device: str | None = None, max_batch_size: Any = None,
                 **unknown: Any):
        super().__init__()
        if unknown:
            raise ModelArgsError(f"model_args {', '.join(sorted(unknown))}: not an argument of the qlora_jax model; "
                                 f"expected some of {', '.join(_KNOWN_ARGS)}")
        if quant not in QUANT_MODES:
            raise ModelArgsError(f"model_args quant={quant!r}: expected one of {', '.join(QUANT_MODES)}")
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ModelArgsError(f"model_args dtype={dtype!r}: expected bfloat16, float16 or float32")
        if compute_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ModelArgsError(f"model_args compute_dtype={compute_dtype!r}: expected float32, bfloat16 or float16")
        if str(batch_size).startswith("auto"):
            raise ModelArgsError(f"batch_size={batch_size!r}: the qlora_jax model takes a fixed batch size (rows per "
                                 "compiled call), e.g. --batch_size 16")
        if max_batch_size is not None:
            raise ModelArgsError(f"max_batch_size={max_batch_size!r}: only meaningful with batch_size=auto, which the "
                                 "qlora_jax model does not have")
        if device is not None:
            platform = {"cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(str(device).split(":")[0])
            if platform != jax.default_backend():
                # lm-eval's command line passes its own default (cuda:0) when --device is not given.
                log.warning("device=%r: not used; JAX runs on its default platform here (%s), over mesh= when "
                            "given", device, jax.default_backend())
        self.batch_size_per_call = _as_int("batch_size", batch_size)
        self._mesh = None
        if mesh:
            from qlora_jax.distributed import BATCH_AXES
            from qlora_jax.distributed.mesh import make_mesh

            try:
                self._mesh = make_mesh(str(mesh).replace(";", ","))
            except ValueError as err:
                raise ModelArgsError(f"model_args mesh={mesh!r}: {err}") from None
            ways = int(np.prod([self._mesh.shape[a] for a in BATCH_AXES]))
            if self.batch_size_per_call % ways:
                raise ModelArgsError(f"batch_size={self.batch_size_per_call} does not split over mesh={mesh!r}'s "
                                     f"data-parallel axes ({ways} ways): make it a multiple of {ways}")
        model, tokenizer = load_model(str(pretrained), quant=quant, double_quant=_as_bool("double_quant", double_quant),
                                      adapter=adapter, dtype=dtype, compute_dtype=compute_dtype, mesh=self._mesh)
        self.pretrained, self.adapter = str(pretrained), adapter
        self._attach(model, tokenizer, max_length=max_length, max_gen_toks=max_gen_toks, seed=seed,
                     chat_template=chat_template)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> QLoraJaxLM:
        """lm-eval's constructor from ``--model_args`` (``arg_dict``) and its own options.

        lm-eval's command line always passes its ``--batch_size`` (default 1), ``device`` and
        ``max_batch_size`` beside the model_args; a key the user wrote in ``--model_args`` is the
        explicit choice and wins over lm-eval's value (lm-eval's own would raise "multiple values").

        Args:
            arg_dict: the parsed ``--model_args``.
            additional_config: lm-eval's options; None values are dropped, as lm-eval does.

        Returns:
            The model.
        """
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> QLoraJaxLM:
        """As :meth:`create_from_arg_obj`, from ``"key=value,..."`` (lm-eval's parser)."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    def _attach(self, model: Any, tokenizer: Any, *, max_length: Any, max_gen_toks: Any, seed: Any,
                chat_template: str | None) -> None:
        config = model.config
        self.spec, self.base, self.lora = model.spec, model.base_params, model.lora_params
        self._tokenizer = tokenizer
        self._max_length = (config.max_position_embeddings if max_length is None
                            else _as_int("max_length", max_length, minimum=2))
        if self._max_length > config.max_position_embeddings:
            raise ModelArgsError(f"model_args max_length={self._max_length}: more than the model's "
                                 f"max_position_embeddings ({config.max_position_embeddings})")
        self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.seed = _as_int("seed", seed, minimum=0)
        self._chat_template_name = chat_template
        if tokenizer.eos_id is None:
            raise ModelArgsError("the model's tokenizer has no EOS token, which lm-eval uses as the end of text")
        self._buckets = data_lib.bucket_lengths(self._max_length + 1)
        self._rank, self._world_size = 0, 1

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, batch_size: int = 16, mesh: Any = None,
                   max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0,
                   chat_template: str | None = None, name: str = "in-memory") -> QLoraJaxLM:
        """The lm-eval model of a loaded :class:`~qlora_jax.model.CausalLM` (the recipe's evaluation).

        Args:
            model: the model (its spec, base and adapters; :meth:`set_weights` replaces the weights).
            tokenizer: its :class:`~qlora_jax.tokenizer.Tokenizer`.
            batch_size: rows per compiled call (with ``mesh``: global, a multiple of its data-parallel size).
            mesh: the :class:`jax.sharding.Mesh` the weights are placed on, or None.
            max_length, max_gen_toks, seed, chat_template: as the model_args of the same names.
            name: what lm-eval's request cache and logs call it.

        Returns:
            The lm-eval model.
        """
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        self.batch_size_per_call, self._mesh = _as_int("batch_size", batch_size), mesh
        self.pretrained, self.adapter = name, None
        self._attach(model, tokenizer, max_length=max_length, max_gen_toks=max_gen_toks, seed=seed,
                     chat_template=chat_template)
        return self

    def set_weights(self, base: Any, lora: Any) -> None:
        """Evaluates ``base`` with adapters ``lora`` from now on (same spec: no recompilation)."""
        self.base, self.lora = base, lora

    # ------------------------------------------------------------------ lm-eval's properties
    @property
    def eot_token_id(self) -> int:
        """The EOS id (lm-eval's end of text)."""
        return self._tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token before an empty context: BOS if the tokenizer has one, else EOS (as ``hf``)."""
        bos = self._tokenizer.bos_id
        return bos if bos is not None else self._tokenizer.eos_id

    @property
    def max_length(self) -> int:
        """The longest scored row, in tokens."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """Tokens generated when a task sets no ``max_gen_toks``."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        """Rows per compiled call."""
        return self.batch_size_per_call

    @property
    def tokenizer_name(self) -> str:
        """What fingerprints lm-eval's request cache: the model and adapter paths."""
        return f"qlora_jax:{self.pretrained}:{self.adapter}".replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string`` as ``hf`` encodes them.

        Args:
            string: the text.
            add_special_tokens: add the BOS token (None: the tokenizer's own setting, and never
                when the text already starts with the BOS text).
            left_truncate_len: keep only the last this many tokens.

        Returns:
            The token ids.
        """
        if kwargs:
            raise TypeError(f"tok_encode: unexpected arguments {sorted(kwargs)}")
        add_bos = add_special_tokens
        bos = self._tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_bos = False
        ids = self._tokenizer.encode(string, add_bos=add_bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``tokens``."""
        return self._tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring
    def _device_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self._mesh is not None:
            from qlora_jax.distributed import shard_batch

            return shard_batch({k: v[None] for k, v in arrays.items()}, self._mesh)
        return {k: jnp.asarray(v[None]) for k, v in arrays.items()}

    def score_rows(self, rows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Summed log-likelihood and greedy flag of the last ``n`` tokens of each token row.

        Args:
            rows: ``(tokens, n)`` per request: ``tokens`` (at most ``max_length + 1``) are read
                left to right, the last ``n`` of them (``n < len(tokens)``) scored.

        Returns:
            ``(sum of log p in nats, every scored token the argmax)`` per row, in order.
        """
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        size, pad = self.batch_size_per_call, self._tokenizer.pad_id
        pending = []
        for first in range(0, len(order), size):
            chunk = order[first:first + size]
            length = data_lib.padded_length(max(len(rows[i][0]) for i in chunk) - 1, self._buckets)
            inputs = np.full((size, length), pad, np.int32)
            targets = np.full((size, length), pad, np.int32)
            for r, i in enumerate(chunk):
                tokens = rows[i][0]
                inputs[r, : len(tokens) - 1] = tokens[:-1]
                targets[r, : len(tokens) - 1] = tokens[1:]
            x = self._device_arrays({"input_ids": inputs, "target_ids": targets})
            result = token_logprobs(self.spec, self.base, self.lora,
                                    x["input_ids"], x["target_ids"])
            pending.append((chunk, result))
        for chunk, (logprob, greedy) in pending:
            logprob, greedy = np.asarray(logprob).astype(np.float64), np.asarray(greedy)
            for r, i in enumerate(chunk):
                tokens, n = rows[i]
                span = slice(len(tokens) - 1 - n, len(tokens) - 1)
                values = logprob[r, span]
                if not np.all(np.isfinite(values)):
                    raise FloatingPointError(f"request {i}: non-finite log-probabilities (the model's logits are not "
                                             "finite)")
                out[i] = (float(values.sum()), bool(np.all(greedy[r, span])))
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per ``(strings, context ids, continuation ids)``."""
        rows = []
        for strings, context, continuation in requests:
            if not context or not continuation:
                raise ValueError(f"request {strings!r}: empty context or continuation tokens")
            if len(continuation) > self._max_length:
                raise ValueError(f"request {strings!r}: a continuation of {len(continuation)} tokens does not fit "
                                 f"max_length={self._max_length}")
            whole = (context + continuation)[-(self._max_length + 1):]
            rows.append((whole, len(continuation)))
        results = self.score_rows(rows)
        for (strings, _, _), answer in zip(requests, results, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text over lm-eval's disjoint rolling windows of ``max_length``."""
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            text_windows = [(None,) + lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self._max_length,
                context_len=1)]
            windows.extend(text_windows)
            counts.append(len(text_windows))
        scores = self._loglikelihood_tokens(windows) if windows else []
        out, at = [], 0
        for req, count in zip(requests, counts, strict=True):
            total = float(sum(s for s, _ in scores[at:at + count]))
            at += count
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each request's generation, cut before its first stop sequence (see the module docstring)."""
        from qlora_jax.generate import SamplingConfig, generate_padded

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        key = jax.random.key(self.seed)
        for members in groups.values():
            gen_kwargs = requests[members[0]].args[1]
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self._max_gen_toks))
            extra = sorted(set(kwargs) - set(_GEN_KWARGS))
            if extra:
                raise ValueError(f"generation kwargs {', '.join(extra)} (from the task's generation_kwargs or "
                                 f"--gen_kwargs): the qlora_jax model implements {', '.join(_GEN_KWARGS)}")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            budget = int(kwargs["max_gen_toks"])
            max_context = self._max_length - budget
            if max_context <= 0:
                raise ValueError(f"max_gen_toks={budget} leaves no room for the context in max_length="
                                 f"{self._max_length}")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            sampling = SamplingConfig(max_new_tokens=budget, temperature=temperature,
                                      top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                                      stop_token_ids=(self.eot_token_id,))
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=max_context) for i in members}
            ordered = sorted(members, key=lambda i: -len(prompts[i]))
            size = self.batch_size_per_call
            for first in range(0, len(ordered), size):
                chunk = ordered[first:first + size]
                length = data_lib.padded_length(max(len(prompts[i]) for i in chunk), self._buckets)
                length = min(length, max_context)
                ids = np.full((size, length), self._tokenizer.pad_id, np.int32)
                mask = np.zeros((size, length), np.int32)
                mask[:, -1] = 1  # filler rows: one padding token, their output discarded
                for r, i in enumerate(chunk):
                    ids[r, length - len(prompts[i]):] = prompts[i]
                    mask[r, length - len(prompts[i]):] = 1
                key, sub = jax.random.split(key)
                x = self._device_arrays({"input_ids": ids, "attention_mask": mask})
                out, _ = generate_padded(self.spec, self.base, self.lora,
                                         x["input_ids"][0], x["attention_mask"][0], sub, sampling=sampling,
                                         pad_id=self._tokenizer.pad_id)
                rows = np.asarray(out).tolist()
                for r, i in enumerate(chunk):
                    tokens = rows[r]
                    if self.eot_token_id in tokens:
                        tokens = tokens[: tokens.index(self.eot_token_id)]
                    text = postprocess_generated_text(self.tok_decode(tokens), stop=until, think_end_token=None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ chat
    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The Jinja template ``--apply_chat_template`` uses (None when it is off)."""
        if chat_template is False or chat_template is None:
            return None
        name = chat_template if isinstance(chat_template, str) else self._chat_template_name
        return self._tokenizer.resolve_template(name)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as prompt text through the model's template.

        Args:
            chat_history: ``[{"role", "content"}, ...]``.
            add_generation_prompt: end with the assistant's turn header; False continues the last
                (assistant) message instead, as transformers' ``continue_final_message``.

        Returns:
            The prompt text. A template that refuses a system message (raises) is retried
            without it, with a warning, as lm-eval's ``hf`` model does.
        """
        from qlora_jax.tokenizer import ChatTemplateError

        def render(messages):
            return self._tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                       template=self._chat_template_name)

        try:
            text = render(chat_history)
        except (ChatTemplateError, ValueError) as err:
            if not any(m["role"] == "system" for m in chat_history):
                raise
            log.warning("the chat template failed (%s); removing the system message", err)
            chat_history = [m for m in chat_history if m["role"] != "system"]
            text = render(chat_history)
        if not add_generation_prompt and chat_history:
            last = chat_history[-1]["content"].strip()
            end = text.rfind(last)
            if end < 0:
                raise ValueError("continue_final_message: the rendered template does not contain the last message")
            text = text[: end + len(last)]
        return text


def is_task_yaml(source: str | pathlib.Path) -> bool:
    """Whether ``source`` (a ``mc_eval_file`` value) names an lm-eval task YAML file.

    Args:
      source: a task name or path.

    Returns:
      True for a ``.yaml``/``.yml`` path.
    """
    return str(source).lower().endswith((".yaml", ".yml"))


class TaskEvaluator:
    """An lm-eval task from its YAML file, scored for any base and adapters: ``evaluator(base, lora)``.

    ::

        evaluator = TaskEvaluator("tasks/my_task.yaml", model, tokenizer, batch_size=16)
        metrics = evaluator(model.base_params, model.lora_params)   # {"mc_task": "my_task", "mc_acc": ...}

    The task is the one the YAML defines (its ``task:``), found by lm-eval with the YAML's folder
    as the only include path (a YAML may ``include:`` its neighbours; lm-eval's built-in tasks are
    not indexed); its dataset must be local
    (the hub is offline). ``<prefix>task`` is its name, ``<prefix>count`` the documents
    evaluated. Metrics are lm-eval's, named ``<prefix><metric>`` (``mc_acc``,
    ``mc_acc_stderr``, ``mc_acc_norm``...; the filter name dropped when it is lm-eval's
    ``none``, kept as ``<metric>_<filter>`` otherwise), numbers only. No standard errors: lm-eval
    computes them only when it bootstraps, in a process pool forked beside JAX's threads.

    Args:
      path: the task's YAML file.
      model: a :class:`~qlora_jax.model.CausalLM` (its spec; base and adapters come per call).
      tokenizer: its tokenizer.
      batch_size: rows per compiled call.
      mesh: shard the batches over it (None: one device).
      max_length: longest row in tokens (None: the model's ``max_position_embeddings``).
      prefix: of every metric name.
      limit: evaluate only the first ``limit`` documents (None: all).

    Raises:
      FileNotFoundError: no such YAML file.
      ValueError: a YAML that defines no single task.
    """

    def __init__(self, path: str | pathlib.Path, model: Any, tokenizer: Any, *, batch_size: int = 16,
                 mesh: Any = None, max_length: int | None = None, prefix: str = "mc_", limit: int | None = None):
        """Args:
            path: the task's YAML file.
            model: the :class:`~qlora_jax.model.CausalLM` whose spec (and tokenizer) the task runs with.
            tokenizer: its :class:`~qlora_jax.tokenizer.Tokenizer`.
            batch_size: rows per compiled call (global, with ``mesh``).
            mesh: the mesh the weights are placed on, or None.
            max_length: longest scored row in tokens (None: the model's ``max_position_embeddings``).
            prefix: of every metric name.
            limit: evaluate only the first this many documents (None: all).
        """
        import os

        from lm_eval.tasks import TaskManager

        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.path = pathlib.Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"{path}: no such lm-eval task YAML file")
        # Only the YAML's folder: indexing lm-eval's thousands of built-in task YAMLs costs ~13 s of
        # CPU per evaluator and none of them is the task (an `include:` is read by path, not index).
        self.task_manager = TaskManager(include_path=str(self.path.parent), include_defaults=False)
        names = [name for name, entry in self.task_manager.task_index.items()
                 if getattr(entry, "yaml_path", None) is not None
                 and pathlib.Path(entry.yaml_path).resolve() == self.path]
        if len(names) != 1:
            raise ValueError(f"{path}: expected a YAML defining one lm-eval task (a `task:` name), found "
                             f"{names or 'none'}")
        self.task, self.prefix, self.limit = names[0], prefix, limit
        self.lm = QLoraJaxLM.from_model(model, tokenizer, batch_size=batch_size, mesh=mesh, max_length=max_length,
                                        name=f"task {self.task}")
        self.description = f"lm-eval task {self.task} ({self.path})"

    def __call__(self, base: Any, lora: Any = None) -> dict[str, Any]:
        """lm-eval's metrics of the task for ``base`` with adapters ``lora`` (see the class docstring)."""
        import lm_eval

        self.lm.set_weights(base, lora)
        results = lm_eval.simple_evaluate(model=self.lm, tasks=[self.task], task_manager=self.task_manager,
                                          limit=self.limit, bootstrap_iters=0, log_samples=False, random_seed=0,
                                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        counts = results.get("n-samples", {}).get(self.task, {})
        out: dict[str, Any] = {f"{self.prefix}task": self.task,
                               f"{self.prefix}count": int(counts.get("effective", counts.get("original", 0)))}
        for key, value in results["results"][self.task].items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            out[f"{self.prefix}{name}"] = float(value)
        return out
