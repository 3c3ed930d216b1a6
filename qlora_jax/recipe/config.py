"""``FinetuneConfig``: every setting of the QLoRA finetune, each declared once.

Each field is a :func:`~qlora_jax.recipe.settings.setting` with its default, help text, choices
and check; ``experiments/finetune.py`` generates its absl flags from these fields
(:func:`~qlora_jax.recipe.flags.define_flags`), and ``__post_init__`` is the one validator of
the values, run before any work: a bad value raises
:class:`~qlora_jax.recipe.settings.ConfigError` naming the setting (= the flag). Field names and
meanings follow artidoro/qlora's ``qlora.py``; where our default differs (so that the default run
fits in minutes on a CPU), the help says qlora.py's value.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

from qlora_jax.data.formats import FORMATS
from qlora_jax.data.sources import BUILTIN_DATASETS
from qlora_jax.distributed.mesh import parse_mesh_spec
from qlora_jax.lora import LoraConfig
from qlora_jax.models.spec import COMPUTE_DTYPES
from qlora_jax.optim.factory import OPTIMIZER_NAMES
from qlora_jax.peft_io import EXPERT_FORMATS, check_expert_format
from qlora_jax.quant import QuantConfig
from qlora_jax.quant.tensor import SUPPORTED_BLOCKSIZES
from qlora_jax.recipe.settings import ConfigError, below_one, non_negative, positive, setting, unit_interval, validate

__all__ = ["FinetuneConfig", "QUANT_FOR_BITS", "LR_SCHEDULES"]

QUANT_FOR_BITS = {4: None, 8: "int8", 16: "bf16", 32: "float32"}
LR_SCHEDULES = ("constant", "linear", "cosine")


def _one_of(values):
    return lambda value: None if value in values else f"must be one of {', '.join(map(str, values))}"


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _existing_path(value: str) -> str | None:
    return None if pathlib.Path(value).expanduser().exists() else "no such file or directory"


def _model_path(value: str) -> str | None:
    return None if value == "embedded" else _existing_path(value)


def _builtin_dataset(value: str) -> bool:
    """As :func:`qlora_jax.data.load_examples` reads a spec: "chatterbot[:language]" or "chitchat"."""
    return value == "chitchat" or value.partition(":")[0] == "chatterbot"


def _dataset(value: str) -> str | None:
    if _builtin_dataset(value) or pathlib.Path(value).expanduser().is_file():
        return None
    return (f"neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) nor an existing .json/.jsonl file "
            "(nothing is downloaded)")


def _mc_eval_file(value: str) -> str | None:
    if value in ("auto", "none") or value.partition(":")[0] == "chatterbot":
        return None
    return _existing_path(value)


def _held_out_size(value: int | float) -> str | None:
    if isinstance(value, int):
        return None if value >= 1 else "a count must be at least 1"
    return None if 0.0 < value < 1.0 else "a fraction must be in (0, 1); write a count as an integer"


def _mesh(value: str) -> str | None:
    """Axis names and sizes only: the device count is checked when the mesh is built."""
    parts = [p for p in value.split(",") if p.strip()]
    explicit = math.prod(max(1, int(s)) for _, _, s in (p.partition("=") for p in parts)
                         if s.strip().lstrip("-").isdigit())
    try:
        parse_mesh_spec(value, explicit)
    except ValueError as err:
        return str(err)
    return None


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything a finetune depends on (see the module docstring; each field's help says what it is)."""

    # model and quantization
    model: str = setting("embedded", "Hugging Face folder, .gguf file, or 'embedded' (SmolLM2-135M-Instruct).",
                         check=_model_path)
    bits: int = setting(4, "Base weight precision: 4 (NF4/FP4), 8 (Int8), 16 (bf16) or 32.",
                        check=_one_of(tuple(QUANT_FOR_BITS)))
    quant_type: str = setting("nf4", "4-bit data type (with --bits=4).", choices=("nf4", "fp4"))
    double_quant: bool = setting(True, "Double-quantize the quantization constants (4.127 instead of 4.5 bits).")
    blocksize: int = setting(64, "Quantization block size.", check=_one_of(SUPPORTED_BLOCKSIZES))
    bnb_backend: str = setting("cuda", "Whose bytes the double-quantized scales (and FP4 near zero) reproduce: "
                               "bitsandbytes' CUDA kernels (nearly every published checkpoint) or its CPU backend.",
                               choices=("cuda", "cpu"))
    compute_dtype: str = setting("auto", "Activation/matmul dtype. auto: bfloat16 on GPU/TPU (the paper's) and on "
                                 "CPUs with native bfloat16 dot products (avx512_bf16 or amx_bf16), float32 on other "
                                 "CPUs (qlora_jax.hardware); the log says which and why.",
                                 choices=("auto", *COMPUTE_DTYPES))
    # LoRA
    lora_r: int = setting(64, "LoRA rank.", check=positive)
    lora_alpha: float = setting(16.0, "LoRA alpha (scaling alpha / r).", check=positive)
    lora_dropout: float = setting(0.0, "Dropout on the LoRA input (qlora.py scripts: 0.1 for 7B, 0.05 for 13B+).",
                                  check=below_one)
    lora_modules: str = setting("all-linear", "'all-linear', a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,"
                                "up_proj,down_proj, or a regular expression over module names (PEFT's "
                                "target_modules).", check=_non_empty)
    use_rslora: bool = setting(False, "rsLoRA scaling alpha / sqrt(r).")
    lora_dtype: str = setting("auto", "Storage dtype of LoRA A and B. auto: the compute dtype (bfloat16 adapters on "
                              "a bfloat16 model, as qlora.py with --bf16; half the adapter and gradient memory); "
                              "float32 (PEFT's default) keeps updates smaller than a bfloat16 step. Adam's moments "
                              "are float32 either way.", choices=("auto", "float32", "bfloat16", "float16"))
    train_router: bool = setting(False, "Also train the MoE routers (mlp.gate) in full, in the adapters' dtype "
                                 "(PEFT's modules_to_save=['gate']; Mixtral and Qwen3-MoE only).")
    peft_expert_format: str = setting("per_expert", "How the exported PEFT adapter writes MoE expert adapters: "
                                      "'per_expert' (transformers 4's per-expert module names; PEFT loads them "
                                      "for transformers 4 and 5) or 'fused' (PEFT's target_parameters on "
                                      "transformers 5's fused experts; needs lora_dropout=0). MoE models only.",
                                      choices=EXPERT_FORMATS, resume_may_change=True)
    full_finetune: bool = setting(False, "Train every weight (needs --bits=16 or 32; no adapters).")
    adapter_init: str | None = setting(None, "Start from these adapters: a PEFT folder, or an earlier run's "
                                       "checkpoints (or one step of them). Their rank, alpha and rsLoRA must match "
                                       "--lora_r, --lora_alpha and --use_rslora.", check=_existing_path)
    # data
    dataset: str = setting("chatterbot", "chatterbot | chitchat | path to a .json/.jsonl file (qlora.py: alpaca).",
                           check=_dataset)
    dataset_format: str = setting("auto", "Format of a local dataset file.", choices=("auto", *FORMATS))
    chat_template: str | None = setting(None, "The model's own template (default), or chatml, llama2, llama3.")
    source_max_len: int = setting(1024, "Maximum source (prompt) tokens; the end is kept.", check=positive)
    target_max_len: int = setting(256, "Maximum target (response) tokens; the start is kept.", check=positive)
    train_on_source: bool = setting(False, "Also train on the prompt tokens.")
    group_by_length: bool = setting(True, "Batch conversations of similar length (Hugging Face's policy).")
    eval_dataset_size: int | float = setting(96, "Held-out conversations: a count, or a fraction if < 1 "
                                             "(qlora.py: 1024).", check=_held_out_size)
    max_train_samples: int | None = setting(None, "Use at most this many training conversations.", check=positive)
    max_eval_samples: int | None = setting(None, "Use at most this many held-out conversations.", check=positive)
    # optimisation
    per_device_train_batch_size: int = setting(8, "Micro-batch size per data-parallel device (qlora.py: 1). May "
                                               "change on --resume if the global batch (this x the mesh's data x "
                                               "fsdp devices) stays the same.", check=positive,
                                               resume_may_change=True)
    per_device_eval_batch_size: int = setting(16, "Evaluation batch size per data-parallel device.",
                                              check=positive, resume_may_change=True)
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimizer step (qlora.py: 16).", check=positive)
    max_steps: int = setting(100, "Optimizer steps (qlora.py: 10000).", check=positive, resume_may_change=True)
    learning_rate: float = setting(2e-4, "Peak learning rate.", check=positive)
    lr_scheduler_type: str = setting("constant", "Schedule after warmup.", choices=LR_SCHEDULES)
    warmup_ratio: float = setting(0.03, "Fraction of max_steps spent warming up linearly.", check=unit_interval)
    adam_beta1: float = setting(0.9, "AdamW beta1.", check=below_one)
    adam_beta2: float = setting(0.999, "AdamW beta2.", check=below_one)
    max_grad_norm: float = setting(0.3, "Gradient clipping by global norm (0: no clipping).", check=non_negative)
    optim: str = setting("paged_adamw_32bit", "Optimizer; 'paged' keeps its state in pinned host memory between "
                         "steps.", choices=OPTIMIZER_NAMES)
    weight_decay: float = setting(0.0, "AdamW weight decay.", check=non_negative)
    gradient_checkpointing: bool = setting(True, "Recompute each layer's activations in the backward pass.")
    # schedule and output (these may change on --resume: they decide what is written, not what is computed)
    logging_steps: int = setting(1, "Write training metrics every N steps.", check=positive, resume_may_change=True)
    eval_steps: int = setting(25, "Evaluate the held-out loss every N steps.", check=positive,
                              resume_may_change=True)
    save_steps: int = setting(50, "Checkpoint every N steps (qlora.py: 250).", check=positive, resume_may_change=True)
    save_total_limit: int | None = setting(2, "Good checkpoints to keep (qlora.py: 40).", check=positive,
                                           resume_may_change=True)
    output_dir: str = setting("outputs/finetune", "Where checkpoints, metrics, plots and the adapter go.",
                              check=_non_empty, resume_may_change=True)
    seed: int = setting(0, "Seed of the adapters, the data split and order, and dropout.", check=non_negative)
    resume: bool = setting(False, "Continue from the latest checkpoint in output_dir; its settings must be this "
                           "run's but for max_steps, the *_steps cadences, save_total_limit, "
                           "per_device_eval_batch_size, data_workers, output_dir, and the mesh and "
                           "per_device_train_batch_size as long as the global batch stays the same.",
                           resume_may_change=True)
    force_unlock: bool = setting(False, "Take over output_dir's lock held by a run on another host (a shared file "
                                 "system), whose liveness cannot be checked from here. A crashed or killed run's "
                                 "lock on this host is taken over without it; a live run's, never.",
                                 resume_may_change=True)
    # multiple-choice evaluation during training (qlora.py's --do_mmlu_eval)
    mc_eval_file: str = setting("auto", "Multiple-choice evaluation: 'chatterbot' (the held-out reply-retrieval "
                                "task built from this run's held-out split), a qlora.py MMLU JSON "
                                "(five_shot_mmlu_val.json), an MMLU / lm-eval-style JSONL or parquet file, an "
                                "lm-eval task YAML (its folder is the include path; its dataset must be local; "
                                "needs the lm-eval extra; its metrics are logged as mc_<metric>), 'none'; "
                                "'auto': chatterbot when dataset is chatterbot and the held-out split is large "
                                "enough for it (else none, with a warning saying why), else none.",
                                check=_mc_eval_file, resume_may_change=True, off="none")
    mc_eval_steps: int | None = setting(None, "Run the multiple-choice evaluation every N steps (default: with "
                                        "every held-out evaluation, eval_steps) and at the end.", check=positive,
                                        resume_may_change=True)
    mc_eval_shots: int = setting(0, "Worked examples per multiple-choice prompt (question files only; qlora.py's "
                                 "five_shot_* files are already 5-shot).", check=non_negative, resume_may_change=True)
    mc_eval_dev_file: str | None = setting(None, "Where the worked examples come from (default: the evaluated file, "
                                           "same subject).", check=_existing_path, resume_may_change=True)
    num_sample_prompts: int = setting(4, "Held-out questions answered before and after training.",
                                      check=non_negative)
    sample_max_new_tokens: int = setting(48, "Token budget of each of those answers.", check=positive)
    data_workers: int = setting(0, "Processes rendering the chat template (0: one per CPU core).",
                                check=non_negative, resume_may_change=True)
    # devices: a mesh spec such as "fsdp=8" or "data=2,fsdp=4" (None: the default device only)
    mesh: str | None = setting(None, "Device mesh over every process's devices, e.g. 'fsdp=8' or 'data=2,fsdp=4' "
                               "(axes data, fsdp, tensor, expert; expert: MoE models' experts split over it; "
                               "-1 = the rest; needed for a multi-process run). May change "
                               "on --resume (another device or process count) if the global batch stays the same; "
                               "the losses then agree to float rounding, not bit for bit.", check=_mesh,
                               resume_may_change=True)

    def __post_init__(self):
        validate(self)
        if self.full_finetune and self.bits < 16:
            raise ConfigError(f"full_finetune=True: needs an unquantized base, bits=16 or 32 (got bits={self.bits})")
        if self.full_finetune and self.train_router:
            raise ConfigError("train_router: a full finetune already trains the routers with every other weight")
        if self.peft_expert_format != "per_expert":
            if self.full_finetune:
                raise ConfigError(f"peft_expert_format={self.peft_expert_format!r}: a full finetune exports no "
                                  "adapter")
            try:
                check_expert_format(self.peft_expert_format, self.lora_config())
            except ValueError as err:
                raise ConfigError(f"peft_expert_format={self.peft_expert_format!r}: {err}") from None
        if self.full_finetune and self.adapter_init:
            raise ConfigError("adapter_init: a full finetune has no adapters to start from")
        if self.bits != 4 and self.quant_type != "nf4":
            raise ConfigError(f"quant_type={self.quant_type!r}: applies to bits=4 only (got bits={self.bits})")
        if self.dataset_format != "auto" and _builtin_dataset(self.dataset):
            raise ConfigError(f"dataset_format={self.dataset_format!r}: applies to local files only, not to the "
                              f"built-in dataset {self.dataset!r}")
        task = self.mc_eval_task
        if task is not None and task.partition(":")[0] == "chatterbot" and not pathlib.Path(task).exists() and (
                self.mc_eval_shots or self.mc_eval_dev_file):
            raise ConfigError(f"mc_eval_shots={self.mc_eval_shots}, mc_eval_dev_file={self.mc_eval_dev_file!r}: the "
                              "chatterbot task is zero-shot chat; worked examples apply to question files only")
        if not self.full_finetune:
            try:
                self.lora_config()
            except ValueError as err:  # the regex of lora_modules
                raise ConfigError(f"lora_modules={self.lora_modules!r}: {err}") from None

    @property
    def mc_eval_task(self) -> str | None:
        """The multiple-choice task to evaluate (``mc_eval_file`` with "auto" and "none" resolved)."""
        if self.mc_eval_file == "none":
            return None
        if self.mc_eval_file == "auto":
            return self.dataset if self.dataset.partition(":")[0] == "chatterbot" else None
        return self.mc_eval_file

    @property
    def quant(self) -> str:
        """The loader's ``quant`` for ``bits`` and ``quant_type``."""
        return self.quant_type if self.bits == 4 else QUANT_FOR_BITS[self.bits]

    def quant_config(self) -> QuantConfig:
        """How the frozen base is stored (``quant``, ``double_quant``, ``blocksize``, ``bnb_backend``)."""
        return QuantConfig(quant=self.quant, double_quant=self.double_quant, blocksize=self.blocksize,
                           bnb_backend=self.bnb_backend)

    def lora_config(self) -> LoraConfig:
        """The adapters' hyperparameters (``lora_dtype="auto"``: the compute dtype)."""
        return LoraConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          target_modules=self.lora_modules, use_rslora=self.use_rslora,
                          dtype=None if self.lora_dtype == "auto" else self.lora_dtype,
                          modules_to_save=("gate",) if self.train_router else ())

    @classmethod
    def resume_may_change(cls) -> tuple[str, ...]:
        """The settings that may differ between a run and its ``--resume``."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["resume_may_change"])

    @classmethod
    def field_default(cls, name: str):
        """The default of setting ``name``."""
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

