"""LoRA adapters in PEFT's format: ``adapter_model.safetensors`` plus ``adapter_config.json``.

Keys follow PEFT's saved names for a causal LM, with the adapter name stripped:
``base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``). Our adapter pytree stacks layers on a leading axis; these
functions split and stack them.

An MoE layer's expert adapters (``[L, E, r, in]`` in our pytree) are read and written in two
formats (``save_peft_adapter(expert_format=...)``; the loader tells them apart by
``target_parameters``):

``"per_expert"`` (the default): one adapter per expert module under transformers 4's names
(``...block_sparse_moe.experts.{e}.w1.lora_A.weight`` for Mixtral,
``...mlp.experts.{e}.gate_proj.lora_A.weight`` for Qwen3-MoE), with ``target_modules`` naming
them (``w1``...): the format PEFT wrote for these models, and which PEFT 0.21 converts to
transformers 5's fused expert parameters when it loads it.

``"fused"``: PEFT's own format for transformers 5, whose experts are 3-D ``nn.Parameter``s of
``model.layers.{i}.mlp.experts`` (``mlp`` for Mixtral too): ``gate_up_proj`` ``[E, 2I, H]`` (rows
``:I`` the gate, ``w1``; rows ``I:`` the up projection, ``w3``) and ``down_proj`` ``[E, H, I]``
(``w2``), adapted through ``target_parameters`` (``["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]``) by PEFT 0.21's ``lora.ParamWrapper`` (peft/tuners/lora/layer.py):

* One wrapper per parameter, nested on the ``experts`` module in the order the module registers
  its parameters (``gate_up_proj`` innermost, whatever the order of ``target_parameters``), so
  the saved keys are ``base_model.model.model.layers.{i}.mlp.experts.base_layer.lora_A.weight``
  for ``gate_up_proj`` and ``...mlp.experts.lora_A.weight`` for ``down_proj`` when both are
  targeted; a lone target has no ``base_layer``.
* With per-expert rank ``R`` (``r``, or ``rank_pattern``'s), ``lora_A`` is ``[E*R, in]`` and
  ``lora_B`` ``[out, E*R]``, folded differently: expert ``e``'s ``A_e`` is
  ``A.reshape(E, R, in)[e]`` (rows ``e*R:(e+1)*R``) but its ``B_e`` is
  ``B.reshape(out, R, E)[:, :, e]`` (columns ``k*E + e``, ``k < R``).
* The delta is per expert, ``W_e + scaling * B_e @ A_e`` with ``scaling = alpha / R`` (rsLoRA:
  ``alpha / sqrt(R)``), the ``R`` and ``alpha`` of ``gate_up_proj`` taken from
  ``rank_pattern``/``alpha_pattern`` where they name it. No expert's delta involves another's
  factors, so every such adapter is per-expert.
* ``gate_up_proj``'s one ``A_e`` feeds both halves. Read at ``R = r``: our gate and up adapters
  each get ``A_e`` and their half of ``B_e`` (exact). Our gate and up adapters have separate
  ``A``s, so they are written at ``R = 2r`` (``rank_pattern``/``alpha_pattern`` on
  ``mlp.experts.gate_up_proj``, the scaling kept): ``A_e = [A_gate; A_up]`` and block-diagonal
  ``B_e``. Read at ``R = 2r``, the off-diagonal blocks must be exactly zero; otherwise a gate or
  up row mixes both rank halves, which independent rank-``r`` adapters cannot express, and the
  file is refused naming the key. Any other ``rank_pattern``/``alpha_pattern`` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.safetensors_io import SafetensorsFolder
from qlora_jax.checkpoints.validate import CheckedSource
from qlora_jax.lora import LoraConfig
from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.layout import adapter_targets  # public here too (save_peft_adapter's module list)

__all__ = ["save_peft_adapter", "load_peft_adapter", "peft_key", "fused_peft_key", "router_key", "adapter_targets",
           "EXPERT_FORMATS", "check_expert_format"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model.model."
# transformers 5's fused experts: the MoE block is ``mlp`` in both families (Mixtral's
# ``block_sparse_moe`` is renamed), its parameters in the order ``*Experts`` registers them, which
# is the order PEFT nests their wrappers in (the first innermost).
_FUSED_MODULE = "mlp.experts"
_FUSED_PARAMS = ("gate_up_proj", "down_proj")
_FUSED_OF = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
# rank_pattern / alpha_pattern keys accepted for a fused file: exactly the gate_up_proj parameter.
_GATE_UP_PATTERNS = ("gate_up_proj", "experts.gate_up_proj", "mlp.experts.gate_up_proj")
EXPERT_FORMATS = ("per_expert", "fused")


def peft_key(layer: int, name: str, matrix: str) -> str:
    """PEFT's saved key of one adapter matrix.

    Args:
      layer: the decoder layer's index.
      name: the linear layer's name (``"q_proj"``, ...).
      matrix: ``"lora_A"`` or ``"lora_B"``.

    Returns:
      e.g. ``"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"``.
    """
    return layout.hf_key(layer, name, f"{matrix}.weight", prefix=_PREFIX)


def fused_peft_key(layer: int, param: str, matrix: str, targeted: tuple[str, ...]) -> str:
    """PEFT's saved key of one fused expert parameter's adapter matrix (``target_parameters``).

    Args:
      layer: the decoder layer's index.
      param: ``"gate_up_proj"`` or ``"down_proj"``.
      matrix: ``"lora_A"`` or ``"lora_B"``.
      targeted: the fused parameters the adapter targets, in ``("gate_up_proj", "down_proj")`` order
        (PEFT nests one wrapper per parameter, the first innermost).

    Returns:
      e.g. ``"base_model.model.model.layers.3.mlp.experts.base_layer.lora_A.weight"``.
    """
    depth = len(targeted) - 1 - targeted.index(param)
    return f"{_PREFIX}layers.{layer}.{_FUSED_MODULE}{'.base_layer' * depth}.{matrix}.weight"


def _fold(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert ``A [E, R, in]``, ``B [E, out, R]`` -> PEFT's ``[E*R, in]`` and ``[out, R*E]``
    (B's column ``k*E + e`` is expert ``e``'s rank component ``k``: ParamWrapper's reshape)."""
    experts, rank, _ = a.shape
    return (np.ascontiguousarray(a.reshape(experts * rank, a.shape[2])),
            np.ascontiguousarray(np.transpose(b, (1, 2, 0)).reshape(b.shape[1], rank * experts)))


def _unfold(a: np.ndarray, b: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`_fold`."""
    rank = a.shape[0] // experts
    return a.reshape(experts, rank, a.shape[1]), np.transpose(b.reshape(b.shape[0], rank, experts), (2, 0, 1))


def _peft_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    # PEFT's update_layer, in Python floats as there.
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _double_rank_alpha(lora_config: LoraConfig) -> float:
    """The alpha that keeps ``lora_config``'s scaling exactly at rank ``2r``."""
    if not lora_config.use_rslora:
        return 2 * lora_config.alpha  # alpha / r == 2 alpha / 2r exactly (a power of two)
    alpha = lora_config.alpha * math.sqrt(2)
    for _ in range(8):  # the float nearest sqrt(2) alpha may miss by an ulp: step to one that hits
        got = _peft_scaling(alpha, 2 * lora_config.r, True)
        if got == lora_config.scaling:
            return alpha
        alpha = math.nextafter(alpha, math.inf if got < lora_config.scaling else -math.inf)
    raise ValueError(f"no lora_alpha gives rsLoRA scaling {lora_config.scaling!r} exactly at rank {2 * lora_config.r}; "
                     "write this adapter with expert_format='per_expert'")


def check_expert_format(expert_format: str, lora_config: LoraConfig) -> None:
    """Whether an MoE model's expert adapters of ``lora_config`` can be written in ``expert_format``.

    Args:
      expert_format: one of :data:`EXPERT_FORMATS` (see :func:`save_peft_adapter`).
      lora_config: the adapters' hyperparameters.

    Raises:
      ValueError: an unknown format; ``"fused"`` with LoRA dropout (PEFT's ``ParamWrapper`` takes
        none), or with rsLoRA whose scaling no ``lora_alpha`` reproduces exactly at rank ``2r``.
    """
    if expert_format not in EXPERT_FORMATS:
        raise ValueError(f"expert_format is {expert_format!r}; expected one of {EXPERT_FORMATS}")
    if expert_format != "fused":
        return
    if lora_config.dropout:
        # PEFT 0.21 refuses to load a target_parameters adapter whose config has lora_dropout != 0.
        raise ValueError(f"expert_format='fused' needs lora_config.dropout == 0 (PEFT's ParamWrapper takes no "
                         f"dropout), got {lora_config.dropout}; write it with dropout=0.0 or "
                         "expert_format='per_expert'")
    _double_rank_alpha(lora_config)


def _fused_tensors(tensors: dict[str, np.ndarray], stacked: Any, fused: list[str], r: int,
                   config: LlamaConfig) -> tuple[tuple[str, ...], int | None]:
    """Adds the fused-format matrices of our expert adapters ``fused`` to ``tensors``.

    Args:
      tensors: the file's tensors, added to.
      stacked: ``stacked(name, matrix)``, our ``[L, E, ...]`` matrix as numpy.
      fused: our expert layers to write fused.
      r: our rank.
      config: the model config.

    Returns:
      ``(the fused parameters written, gate_up_proj's rank or None)``.
    """
    params = tuple(p for p in _FUSED_PARAMS if any(_FUSED_OF[n] == p for n in fused))
    gate_up_rank = None
    if not params:  # nothing fused; and a dense model may have no separate gate_proj (Phi-3's gate_up_proj)
        return params, gate_up_rank
    inter = config.linear_shapes()["gate_proj"][0]
    for layer in range(config.num_hidden_layers):
        for param in params:
            if param == "down_proj":
                a, b = stacked("down_proj", "lora_A")[layer], stacked("down_proj", "lora_B")[layer]
            else:
                # One A for both halves: our separate gate and up adapters side by side in rank
                # (block-diagonal B); one of them alone keeps rank r, the other half of B zero.
                halves = [n for n in ("gate_proj", "up_proj") if n in fused]
                a = np.concatenate([stacked(n, "lora_A")[layer] for n in halves], axis=1)
                b = np.zeros((config.num_experts, 2 * inter, a.shape[1]), a.dtype)
                for n in halves:
                    rows = slice(0, inter) if n == "gate_proj" else slice(inter, 2 * inter)
                    cols = slice(0, r) if n == halves[0] else slice(r, 2 * r)
                    b[:, rows, cols] = stacked(n, "lora_B")[layer]
                gate_up_rank = a.shape[1]
            for matrix, value in zip(("lora_A", "lora_B"), _fold(a, b), strict=True):
                tensors[fused_peft_key(layer, param, matrix, params)] = value
    return params, gate_up_rank


def save_peft_adapter(
    path: str | pathlib.Path,
    lora: dict[str, Any],
    lora_config: LoraConfig,
    config: LlamaConfig,
    *,
    base_model_name_or_path: str | None = None,
    expert_format: str = "per_expert",
) -> pathlib.Path:
    """Writes ``lora`` (our stacked adapter pytree) as a PEFT adapter folder.

    Args:
      path: the folder to write (``adapter_config.json`` and ``adapter_model.safetensors``).
      lora: the adapters, ``{"layers": {group: {name: {"lora_A": [L, r, in], "lora_B": [L, out, r]}}}}``;
        the adapter's modules are those it holds.
      lora_config: the hyperparameters written (r, alpha, dropout, rsLoRA).
      config: the model config (layer count, module names).
      base_model_name_or_path: recorded in ``adapter_config.json`` (None: left empty).
      expert_format: how an MoE model's expert adapters are written (see the module docstring):
        ``"per_expert"``, one adapter per expert under transformers 4's module names (what PEFT
        loads for transformers 4 and 5); or ``"fused"``, PEFT's ``target_parameters`` format on
        transformers 5's fused ``mlp.experts.gate_up_proj`` / ``down_proj`` (gate and up together
        at rank ``2r`` through ``rank_pattern``/``alpha_pattern``, the scaling unchanged; one of
        them alone at rank ``r`` beside a zero half, which reads back as both with the other's
        ``B`` zero). PEFT's ``ParamWrapper`` takes no LoRA dropout, so this needs
        ``lora_config.dropout == 0``. Ignored for a model without experts.

    Returns:
      The folder, as a :class:`pathlib.Path`.

    Raises:
      ValueError: an unknown ``expert_format``; fused expert adapters with LoRA dropout, or with
        rsLoRA whose scaling no ``lora_alpha`` reproduces exactly at rank ``2r``.

    References:
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021.
    """
    targets = adapter_targets(lora)
    fused = [n for n in targets if expert_format == "fused" and config.expert_stack(n)]
    if fused or expert_format not in EXPERT_FORMATS:  # the format is moot for a model without experts
        check_expert_format(expert_format, lora_config)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}

    def stacked(name: str, matrix: str) -> np.ndarray:
        return np.asarray(jax.device_get(lora["layers"][layout.module_group(name)][name][matrix]))

    for name in targets:
        if name in fused:
            continue
        for matrix in ("lora_A", "lora_B"):
            values = stacked(name, matrix)
            for layer in range(config.num_hidden_layers):
                modules = layout.adapter_modules(config, layer, name, prefix=_PREFIX)
                if config.expert_stack(name):  # one adapter per expert module
                    for e, module in enumerate(modules):
                        tensors[f"{module}.{matrix}.weight"] = np.ascontiguousarray(values[layer, e])
                else:
                    tensors[peft_key(layer, name, matrix)] = np.ascontiguousarray(values[layer])
    params, gate_up_rank = _fused_tensors(tensors, stacked, fused, lora_config.r, config)
    tensors.update(_router_tensors(lora, lora_config, config))
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_names = [layout.peft_target_name(config, name) for name in targets if name not in fused]
    peft_config = lora_config.to_peft_config(peft_names, base_model_name_or_path)
    if params:
        peft_config["target_modules"] = peft_config["target_modules"] or None  # PEFT allows none beside these
        peft_config["target_parameters"] = [f"{_FUSED_MODULE}.{p}" for p in params]
        if gate_up_rank == 2 * lora_config.r:
            key = f"{_FUSED_MODULE}.gate_up_proj"
            peft_config["rank_pattern"] = {key: gate_up_rank}
            peft_config["alpha_pattern"] = {key: _double_rank_alpha(lora_config)}
    (path / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
    return path


# adapter_config.json fields (PEFT 0.21) that change what a LoRA adapter computes; qlora-jax
# implements none of them, so each must be off (null, false or empty). Initialisation-only
# settings (init_lora_weights, loftq/eva/corda configs, ...) do not matter once trained.
_MUST_BE_OFF = ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "exclude_modules",
                "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "trainable_token_indices",
                "layer_replication", "alora_invocation_tokens", "use_qalora", "use_bdlora",
                "monteclora_config", "arrow_config", "kasa_config")
_OFF = (None, False, "", [], {})
# (target_parameters is read by _fused_targets, which also takes the rank_pattern / alpha_pattern
# that a fused gate_up_proj of rank 2r needs.)


def _fused_targets(file: pathlib.Path, cfg: dict[str, Any], config: LlamaConfig) -> dict[str, int]:
    """``target_parameters`` (with the ``rank_pattern``/``alpha_pattern`` it may use) checked:
    ``{fused parameter: its per-expert rank}``, empty when the field is off."""
    targets = cfg.get("target_parameters")
    if targets in _OFF:
        return {}
    if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise CheckpointError(f"{file}: field 'target_parameters' is {targets!r:.80}; expected a list of parameter "
                              "names")
    if not config.is_moe:
        raise CheckpointError(f"{file}: field 'target_parameters' is {targets!r:.80}; qlora-jax reads it for the "
                              f"fused experts of an MoE model only, and {config.family.name} has none")
    layers = range(config.num_hidden_layers)
    names = {(i, p): f"model.layers.{i}.{_FUSED_MODULE}.{p}" for i in layers for p in _FUSED_PARAMS}
    hit: set[tuple[int, str]] = set()
    for target in targets:  # PEFT's match: the whole name, or a suffix of it after a dot
        matched = {k for k, n in names.items() if n == target or n.endswith(f".{target}")}
        if not matched:
            raise CheckpointError(f"{file}: field 'target_parameters' entry {target!r} matches no fused expert "
                                  f"parameter of this model; qlora-jax adapts model.layers.{{i}}.{_FUSED_MODULE}."
                                  f"{{{'|'.join(_FUSED_PARAMS)}}} only")
        hit |= matched
    params = [p for p in _FUSED_PARAMS if any((i, p) in hit for i in layers)]
    for param in params:
        missing = [i for i in layers if (i, param) not in hit]
        if missing:
            raise CheckpointError(f"{file}: field 'target_parameters' {targets} leaves {param} of layers {missing} "
                                  "unadapted; qlora-jax puts the same adapters in every layer")
    r, use_rslora = cfg["r"], bool(cfg.get("use_rslora", False))
    alpha = cfg.get("lora_alpha", 8)
    ranks = dict.fromkeys(params, r)
    patterns = {field: cfg.get(field) or {} for field in ("rank_pattern", "alpha_pattern")}
    for field, pattern in patterns.items():
        if not isinstance(pattern, dict) or len(pattern) > 1 or any(
                k not in _GATE_UP_PATTERNS for k in pattern) or (pattern and "gate_up_proj" not in params):
            raise CheckpointError(f"{file}: field {field!r} is {pattern!r:.80}; qlora-jax reads it only as one entry "
                                  f"for the fused gate_up_proj (key one of {_GATE_UP_PATTERNS}), a rank-2r gate and "
                                  "up pair")
    gate_up_rank = next(iter(patterns["rank_pattern"].values()), r)
    gate_up_alpha = next(iter(patterns["alpha_pattern"].values()), alpha)
    if not isinstance(gate_up_rank, int) or isinstance(gate_up_rank, bool) or gate_up_rank not in (r, 2 * r):
        raise CheckpointError(f"{file}: field 'rank_pattern' gives gate_up_proj rank {gate_up_rank!r}; only r={r} "
                              f"(one A for gate and up) or 2r={2 * r} (gate and up side by side) are independent "
                              f"per-expert rank-{r} gate and up adapters")
    if (isinstance(gate_up_alpha, bool) or not isinstance(gate_up_alpha, (int, float))
            or _peft_scaling(gate_up_alpha, gate_up_rank, use_rslora) != _peft_scaling(alpha, r, use_rslora)):
        raise CheckpointError(f"{file}: gate_up_proj's scaling (lora_alpha {gate_up_alpha!r} at rank {gate_up_rank}"
                              f") differs from the other adapters' (lora_alpha {alpha!r} at rank {r}); qlora-jax has "
                              "one scaling for all adapters")
    if "gate_up_proj" in ranks:
        ranks["gate_up_proj"] = gate_up_rank
    return ranks


def _read_adapter_config(file: pathlib.Path, config: LlamaConfig) -> tuple[LoraConfig, dict[str, int]]:
    """The :class:`LoraConfig` of a PEFT ``adapter_config.json``, every field checked and named on error,
    its ``target_modules`` our linear layers (from ``target_modules`` and ``target_parameters``), and
    the fused expert parameters with their ranks (:func:`_fused_targets`)."""
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: field 'peft_type' is {cfg.get('peft_type')!r}; expected 'LORA'")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CheckpointError(f"{file}: field 'r' is {r!r}; expected a positive integer (the LoRA rank)")
    for field in ("lora_alpha", "lora_dropout"):
        value = cfg.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise CheckpointError(f"{file}: field {field!r} is {value!r}; expected a finite number")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise CheckpointError(f"{file}: field 'use_rslora' is {cfg['use_rslora']!r}; expected true or false")
    targets = cfg.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or (
            isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        raise CheckpointError(f"{file}: field 'target_modules' is {targets!r:.80}; expected a module name list or "
                              "a regular expression string")
    fused = _fused_targets(file, cfg, config)
    for field in _MUST_BE_OFF:
        if fused and field in ("rank_pattern", "alpha_pattern"):
            continue  # checked by _fused_targets
        if field == "modules_to_save" and _router_modules_to_save(file, cfg.get(field)):
            continue  # the MoE router, read with the adapters (_read_routers)
        if cfg.get(field) not in _OFF:
            raise CheckpointError(f"{file}: field {field!r} is {cfg[field]!r:.80}; qlora-jax implements plain LoRA "
                                  "only, so it must be null, false or empty")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{file}: field 'bias' is {cfg['bias']!r}; qlora-jax adapters train no biases "
                              "(expected 'none')")
    modules = cfg.get("target_modules")
    plain = {**cfg, "rank_pattern": {}, "alpha_pattern": {}}
    from_fused = tuple(n for n in layout.linear_layers(config) if config.expert_stack(n) and _FUSED_OF[n] in fused)
    try:
        # PEFT's LoraConfig defaults lora_alpha to 8 when the field is absent.
        lora_config = LoraConfig.from_peft_config({"lora_alpha": 8, **plain})
        by_module = () if fused and not modules else layout.lora_targets(lora_config, config)
    except ValueError as err:
        raise CheckpointError(f"{file}: {err}") from err
    if fused:
        if modules in ("all-linear", "all_linear"):
            # transformers 5's fused experts are parameters, not linear modules: all-linear is the rest.
            by_module = tuple(n for n in by_module if not config.expert_stack(n))
        both = [n for n in by_module if n in from_fused]
        if both:
            raise CheckpointError(f"{file}: {both} are adapted both by 'target_modules' {modules!r:.80} (per-expert "
                                  f"modules) and by 'target_parameters' {cfg['target_parameters']} (fused); expected "
                                  "one of the two")
        targets = tuple(n for n in layout.linear_layers(config) if n in by_module or n in from_fused)
        lora_config = dataclasses.replace(lora_config, target_modules=targets)
    return lora_config, fused


def _read_fused(source: CheckedSource, weights: pathlib.Path, fused: dict[str, int], r: int, config: LlamaConfig,
                per_layer: dict[tuple[str, str], list[np.ndarray]]) -> None:
    """Reads the fused expert matrices, unfolded into our per-expert ``gate/up/down_proj`` adapters.

    Args:
      source: the checked weights file.
      weights: its path (for errors).
      fused: ``{fused parameter: its per-expert rank}`` (:func:`_fused_targets`).
      r: our rank.
      config: the model config.
      per_layer: ``{(name, matrix): [per-layer arrays]}``, appended to.

    Raises:
      CheckpointError: a gate_up_proj of rank ``2r`` whose gate or up rows use the other half's
        rank components.
    """
    if not fused:  # nothing fused; and a dense model may have no separate gate_proj (Phi-3's gate_up_proj)
        return
    params, experts = tuple(fused), config.num_experts
    inter, hidden = config.linear_shapes()["gate_proj"]
    shapes = {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}
    for layer in range(config.num_hidden_layers):
        for param, rank in fused.items():
            (out_features, in_features), keys = shapes[param], [fused_peft_key(layer, param, m, params)
                                                                 for m in ("lora_A", "lora_B")]
            a, b = _unfold(source.read(keys[0], (experts * rank, in_features)),
                           source.read(keys[1], (out_features, experts * rank)), experts)
            if param == "down_proj":
                pairs = {"down_proj": (a, b)}
            elif rank == r:  # one A feeds both halves: each of our adapters gets a copy
                pairs = {"gate_proj": (a, b[:, :inter]), "up_proj": (a, b[:, inter:])}
            else:  # 2r: gate's rank components first, up's second, nothing across
                for rows, cols, half in ((slice(0, inter), slice(r, 2 * r), "gate"),
                                         (slice(inter, 2 * inter), slice(0, r), "up")):
                    if np.any(b[:, rows, cols]):
                        raise CheckpointError(
                            f"{weights}: {keys[1]!r} (gate_up_proj at rank 2r={2 * r}) has non-zero {half} rows in the "
                            f"other half's rank components, so its gate and up deltas are not independent rank-{r} "
                            "adapters (qlora-jax's gate_proj and up_proj); it cannot be read exactly")
                pairs = {"gate_proj": (a[:, :r], b[:, :inter, :r]), "up_proj": (a[:, r:], b[:, inter:, r:])}
            for name, (pa, pb) in pairs.items():
                per_layer.setdefault((name, "lora_A"), []).append(np.ascontiguousarray(pa))
                per_layer.setdefault((name, "lora_B"), []).append(np.ascontiguousarray(pb))


def load_peft_adapter(
    path: str | pathlib.Path, config: LlamaConfig, *, dtype: str | None = None
) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT LoRA adapter folder into our stacked pytree and its :class:`LoraConfig`.

    ``adapter_config.json`` is checked field by field; its ``target_modules`` decide which modules
    have adapters, and the weights file must hold exactly their matrices for every layer of
    ``config``, read through a :class:`~qlora_jax.checkpoints.validate.CheckedSource`. An MoE
    model's expert adapters are read in either format of the module docstring: per expert
    module, or fused (``target_parameters`` on transformers 5's ``mlp.experts.gate_up_proj`` /
    ``down_proj``), unfolded exactly into our per-expert adapters.

    Args:
      path: a PEFT adapter folder.
      config: the model config the adapter must fit.
      dtype: the adapters' dtype (None: as stored).

    Returns:
      ``(lora, lora_config)``: ``{"layers": {group: {name: {"lora_A": [L, r, in], "lora_B":
      [L, out, r]}}}}`` and the hyperparameters.

    Raises:
      CheckpointError: settings that change what the adapter computes (DoRA, biases, per-module
        ranks but a fused gate_up_proj's ``2r``), missing or extra tensors (another layer count,
        another module, an adapter on ``lm_head``) listed by name, a matrix of the wrong shape
        (rank ``r``, or ``E*r`` fused), a non-float dtype or non-finite values, or a fused
        gate_up_proj adapter of rank ``2r`` that is not a side-by-side gate and up pair.
    """
    path = pathlib.Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.exists():
        raise CheckpointError(f"{path} has no {ADAPTER_CONFIG}")
    lora_config, fused = _read_adapter_config(config_file, config)
    weights = path / ADAPTER_WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{path} has no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    source = CheckedSource(SafetensorsFolder.from_file(weights), weights,
                           shapes_from=f"{ADAPTER_CONFIG} (r={lora_config.r}) with the model's config")
    targets = layout.lora_targets(lora_config, config)
    lora_config = dataclasses.replace(lora_config, target_modules=targets, dtype=dtype)
    shapes = config.linear_shapes()
    per_module = [n for n in targets if not (config.expert_stack(n) and _FUSED_OF[n] in fused)]
    expected: dict[tuple[str, str], tuple[int, int]] = {}
    for name in per_module:
        out_features, in_features = shapes[name]
        expected[name, "lora_A"] = (lora_config.r, in_features)
        expected[name, "lora_B"] = (out_features, lora_config.r)

    def keys(layer: int, name: str, matrix: str) -> list[str]:
        # One key, or one per expert (stacked on an axis after the layer's).
        return [f"{m}.{matrix}.weight" for m in layout.adapter_modules(config, layer, name, prefix=_PREFIX)]

    source.expect([k for (name, matrix) in expected for layer in range(config.num_hidden_layers)
                   for k in keys(layer, name, matrix)]
                  + [fused_peft_key(layer, param, matrix, tuple(fused)) for param in fused
                     for matrix in ("lora_A", "lora_B") for layer in range(config.num_hidden_layers)]
                  + _router_keys(lora_config, config),
                  num_layers=config.num_hidden_layers)
    per_layer: dict[tuple[str, str], list[np.ndarray]] = {}
    for (name, matrix), shape in expected.items():
        for layer in range(config.num_hidden_layers):
            values = [source.read(k, shape) for k in keys(layer, name, matrix)]
            per_layer.setdefault((name, matrix), []).append(
                np.stack(values) if config.expert_stack(name) else values[0])
    _read_fused(source, weights, fused, lora_config.r, config, per_layer)
    layers: dict[str, dict[str, Any]] = {}
    for (name, matrix), values in per_layer.items():
        stacked = jnp.asarray(np.stack(values))
        layers.setdefault(layout.module_group(name), {}).setdefault(name, {})[matrix] = (
            stacked if dtype is None else stacked.astype(dtype))
    _read_routers(source, layers, lora_config, config, dtype)
    source.check_all_consumed()
    return {"layers": layers}, lora_config


# ------------------------------------------------------------------------------------------ trained MoE routers
# PEFT's modules_to_save=["gate"] trains a full copy of each MoE router; PEFT 0.21 (transformers 5
# module names, Mixtral's included) saves it as base_model.model.model.layers.{i}.mlp.gate.weight
# ([num_experts, hidden], the adapter name stripped) and lists "gate" in modules_to_save.


def router_key(layer: int) -> str:
    """PEFT's saved key of layer ``layer``'s trained router (``modules_to_save=["gate"]``).

    Args:
      layer: the decoder layer's index.

    Returns:
      ``"base_model.model.model.layers.{layer}.mlp.gate.weight"``.
    """
    return f"{_PREFIX}layers.{layer}.mlp.gate.weight"


def _router_modules_to_save(file: pathlib.Path, value: Any) -> bool:
    """Whether ``adapter_config.json``'s ``modules_to_save`` is a list naming only the MoE router ``gate``
    (then the routers are read with the adapters); False for an empty value, an error for anything else."""
    if value in _OFF:
        return False
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value) or set(value) != {"gate"}:
        raise CheckpointError(f"{file}: field 'modules_to_save' is {value!r:.80}; qlora-jax trains in full only the "
                              "MoE router, so it must be null, empty or ['gate']")
    return True


def _router_keys(lora_config: LoraConfig, config: LlamaConfig) -> list[str]:
    """The routers' keys an adapter of ``lora_config`` holds (none unless it trains the router)."""
    return [router_key(layer) for layer in range(config.num_hidden_layers)] if lora_config.train_router else []


def _router_tensors(lora: dict[str, Any], lora_config: LoraConfig, config: LlamaConfig) -> dict[str, np.ndarray]:
    """The trained routers of ``lora`` under PEFT's keys; checks they are there exactly when
    ``lora_config.modules_to_save`` says so."""
    router = lora["layers"].get("mlp", {}).get("gate")
    if (router is not None) != lora_config.train_router:
        raise ValueError(f"the adapters {'hold' if router is not None else 'hold no'} MoE routers but "
                         f"modules_to_save={list(lora_config.modules_to_save)}")
    if router is None:
        return {}
    stacked = np.asarray(jax.device_get(router["weight"]))
    expected = (config.num_hidden_layers, config.num_experts, config.hidden_size)
    if stacked.shape != expected:
        raise ValueError(f"trained router mlp.gate.weight has shape {list(stacked.shape)}; expected "
                         f"[layers, num_experts, hidden] = {list(expected)}")
    return {router_key(layer): np.ascontiguousarray(stacked[layer]) for layer in range(config.num_hidden_layers)}


def _read_routers(source: CheckedSource, layers: dict[str, Any], lora_config: LoraConfig, config: LlamaConfig,
                  dtype: str | None) -> None:
    """Reads the trained routers (``modules_to_save=["gate"]``) into ``layers["mlp"]["gate"]["weight"]``
    ``[L, E, hidden]`` (``dtype``, or as stored); nothing when the adapter trains none."""
    if not lora_config.train_router:
        return
    shape = (config.num_experts, config.hidden_size)
    stacked = jnp.asarray(np.stack([source.read(router_key(layer), shape)
                                    for layer in range(config.num_hidden_layers)]))
    layers.setdefault("mlp", {})["gate"] = {"weight": stacked if dtype is None else stacked.astype(dtype)}
