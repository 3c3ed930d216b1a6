r"""qlora-jax against transformers + PEFT + bitsandbytes on this CPU: the same QLoRA step, interleaved.

    python -m experiments.bench_cpu_vs_torch                 # make bench-cpu
    python -m experiments.bench_cpu_vs_torch --rounds=8 --json_out=bench.json
    python -m experiments.bench_cpu_vs_torch --smoke         # tiny shapes: a check of the harness, not a timing

The setting (issue 24): SmolLM2-135M-Instruct (the embedded weights), NF4 + double-quant base,
LoRA r=64 alpha=16 on all linear layers (dropout 0), batch 8 x 256 real-text tokens packed from
the embedded datasets (no padding), per-layer gradient checkpointing, AdamW lr 2e-4 (no weight
decay) with gradient clipping 0.3.

* ours (``.venv``): ``load_pretrained`` → ``ModelSpec(remat=True)`` →
  ``make_optimizer("paged_adamw_32bit")`` → ``jit_train_step(..., donate_argnums=(0, 1))``;
* torch (``.venv-oracle``, ``experiments/bench_cpu_torch_worker.py``): ``from_pretrained`` with
  ``BitsAndBytesConfig`` (NF4, double quant, the compute dtype), non-reentrant gradient
  checkpointing, PEFT LoRA on "all-linear", ``torch.optim.AdamW`` + ``clip_grad_norm_``.

Both read the same Hugging Face folder (the embedded GGUF's weights written as bfloat16
safetensors), and our NF4 codes are bitsandbytes' CPU backend's (``bnb_backend="cpu"``), so both
sides train the same quantized model on the same batches. Each side is a resident worker process
(JSON lines over stdin/stdout), pinned to the same ``--threads`` CPUs. Per compute dtype the parent
loads and compiles both, then runs ``--rounds`` rounds of one step each, alternating the order
(A B, B A, ...) so that a drifting machine speed cancels in the per-round ratio. A round counts
only if the processes other than the two workers used at most ``--max_other_cpu`` of the machine
(``/proc/stat`` busy time less the workers' own CPU time from ``/proc/<pid>/stat``); when no round
qualifies the output says so and reports all rounds, marked as loaded.

Model FLOPs per step (the same count for both sides, recomputation not counted): the forward
pass's matmuls (base linears, LoRA, head, attention scores and values) times 2 for the frozen base
and head (forward, input gradient), times 3 for LoRA and attention (forward and both operands'
gradients). Each side's model FLOP/s is given as a fraction of its own GEMM ceiling in that
dtype (``--gemm_n``\ :sup:`3`, best of 5, on the same pinned CPUs).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import flags

from . import cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 8, "Interleaved rounds (one step per side each) per compute dtype.")
flags.DEFINE_integer("batch", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence (packed real text, no padding).")
flags.DEFINE_integer("lora_r", 64, "LoRA rank on every linear layer.")
flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha.")
flags.DEFINE_integer("threads", 2, "CPUs both workers are pinned to (torch.set_num_threads too).")
flags.DEFINE_integer("gemm_n", 2048, "Size of the square GEMM whose FLOP/s is each side's ceiling.")
flags.DEFINE_float("max_other_cpu", 0.05, "A round counts if other processes used at most this fraction of "
                   "the machine's CPU time during it.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to compare (each on both sides).")
flags.DEFINE_string("oracle_python", os.environ.get("QLORA_JAX_ORACLE_PYTHON", ".venv-oracle/bin/python"),
                    "The Python with torch, bitsandbytes, transformers and peft (relative: to the repository; "
                    "default: $QLORA_JAX_ORACLE_PYTHON, else .venv-oracle/bin/python).")
flags.DEFINE_bool("smoke", False, "A tiny random model and 2 rounds: a check of the harness, not a timing.")
flags.DEFINE_string("json_out", None, "Also write the results as JSON here.")
flags.DEFINE_bool("profile", False, "After each pair's rounds, profile one more step on each side and print its time "
                  "by category (experiments/step_profile.py).")
flags.DEFINE_string("worker", None, "Internal: run as our side's resident worker (the value is ignored).")

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_WORKER = pathlib.Path(__file__).resolve().parent / "bench_cpu_torch_worker.py"
SMOKE_CONFIG = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


# ---------------------------------------------------------------------------------------------- the machine
def cpu_info(cpuinfo_text: str | None = None) -> dict[str, Any]:
    """The CPU's model name and the ISA extensions that matter to matmul speed.

    Args:
      cpuinfo_text: the text of ``/proc/cpuinfo`` (None: read it; empty where there is none).
    Returns:
      ``{"model": str, "cpus": int, "isa": {"avx2", "avx512f", "avx512_bf16", "amx_bf16": bool}}``.
    """
    if cpuinfo_text is None:
        try:
            cpuinfo_text = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo_text = ""
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo_text, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.*)$", cpuinfo_text, re.M)
    present = set(flags_line.group(1).split()) if flags_line else set()
    return {"model": model.group(1).strip() if model else "unknown", "cpus": os.cpu_count() or 1,
            "isa": {name: name in present for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}}


def _proc_stat_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot (busy: not idle, not iowait)."""
    fields = [float(x) for x in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def _process_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in jiffies."""
    text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return float(fields[11]) + float(fields[12])


# ---------------------------------------------------------------------------------------------- inputs
def _write_safetensors(path: pathlib.Path, tensors: dict[str, Any]) -> None:
    """A safetensors file of bfloat16 tensors (numpy arrays of any float dtype, rounded here)."""
    import ml_dtypes
    import numpy as np

    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        data = np.ascontiguousarray(np.asarray(value, np.float32).astype(ml_dtypes.bfloat16)).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(np.shape(value)), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)


def export_model(out_dir: pathlib.Path, smoke: bool) -> dict[str, Any]:
    """The model both sides load, as a Hugging Face folder of bfloat16 safetensors.

    Args:
      out_dir: where ``config.json`` and ``model.safetensors`` go.
      smoke: a tiny random LLaMA (seeded) instead of the embedded SmolLM2-135M-Instruct.
    Returns:
      The transformers config dict written.
    """
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    if smoke:
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
               "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": True,
               "hidden_act": "silu", **SMOKE_CONFIG}
        rng = np.random.default_rng(0)
        d, f, hd, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"], cfg["num_hidden_layers"]
        q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
        shapes = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                  "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
        # Tied embeddings of scale d**-0.5: O(1) logits after the final norm (a loss near log V).
        tensors = {"model.embed_tokens.weight": rng.standard_normal((cfg["vocab_size"], d)) / d**0.5,
                   "model.norm.weight": 1.0 + 0.2 * rng.standard_normal(d)}
        for i in range(layers):
            for name, shape in shapes.items():
                tensors[f"model.layers.{i}.{name}.weight"] = rng.standard_normal(shape) / shape[1] ** 0.5
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[f"model.layers.{i}.{norm}.weight"] = 1.0 + 0.2 * rng.standard_normal(d)
    else:
        from qlora_jax import assets
        from qlora_jax.checkpoints.gguf_io import GGUFCheckpoint

        gguf = GGUFCheckpoint(assets.embedded_model_path())
        cfg = {k: v for k, v in gguf.config_dict().items() if v is not None}
        tensors = {key: gguf.get(key) for key in gguf.keys()}
    _write_safetensors(out_dir / "model.safetensors", tensors)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    return cfg


def text_batches(path: pathlib.Path, n: int, batch: int, seq_len: int, smoke: bool) -> None:
    """``n`` batches ``[batch, seq_len]`` of token ids saved to ``path`` (``.npy``, int32).

    Real text packed without padding: the embedded datasets' messages (chitchat, then
    chatterbot), tokenized with the embedded tokenizer, each conversation ended by EOS. In smoke
    mode, ids from a seeded generator (the tiny model has its own vocabulary).
    """
    import numpy as np

    need = n * batch * seq_len
    if smoke:
        ids = np.random.default_rng(0).integers(0, SMOKE_CONFIG["vocab_size"], need)
    else:
        from qlora_jax.data.corpora import load_chatterbot, load_chitchat
        from qlora_jax.model import load_tokenizer

        tokenizer = load_tokenizer("embedded")
        stream: list[int] = []
        for example in load_chitchat() + load_chatterbot():
            stream += tokenizer.encode("\n".join(m["content"] for m in example.messages), add_bos=False)
            stream.append(tokenizer.eos_id)
            if len(stream) >= need:
                break
        ids = np.asarray(stream[:need])
    np.save(path, ids.astype(np.int32).reshape(n, batch, seq_len))


def model_flops(cfg: dict[str, Any], batch: int, seq_len: int, r: int) -> float:
    """Useful FLOPs of one QLoRA training step (see the module docstring; recomputation not counted).

    Args:
      cfg: the transformers config dict. batch, seq_len: the step's shape. r: the LoRA rank.
    Returns:
      FLOPs per step.
    """
    d, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]
    tokens = batch * seq_len
    base = sum(o * i for o, i in shapes) * layers
    lora = sum(r * (o + i) for o, i in shapes) * layers
    head = cfg["vocab_size"] * d
    attention = 2 * 2 * batch * seq_len * seq_len * q * layers  # scores and values, causal mask not subtracted
    return 2 * 2 * tokens * (base + head) + 3 * (2 * tokens * lora + attention)


# ---------------------------------------------------------------------------------------------- our worker
class OurWorker:
    """Our side's resident state: the model, optimizer state, jitted step and batches."""

    def load(self, model_dir: str, compute_dtype: str, lora_r: int, lora_alpha: float, threads: int,
             batches: str) -> dict[str, Any]:
        import jax
        import jax.numpy as jnp
        import numpy as np

        from qlora_jax.lora import LoraConfig
        from qlora_jax.model import load_pretrained
        from qlora_jax.optim import jit_train_step, make_optimizer
        from qlora_jax.quant import QuantConfig
        from qlora_jax.train import make_train_step

        started = time.perf_counter()
        model, _ = load_pretrained(model_dir, QuantConfig("nf4", bnb_backend="cpu"), compute_dtype=compute_dtype,
                                   remat=True, lora=LoraConfig(r=lora_r, alpha=lora_alpha, dropout=0.0))
        self.base, self.lora = model.base_params, model.lora_params
        optimizer = make_optimizer("paged_adamw_32bit", learning_rate=2e-4, max_grad_norm=0.3)
        self.opt_state = optimizer.init(self.lora)
        self.step_fn = jit_train_step(make_train_step(model.spec, optimizer), self.opt_state, donate_argnums=(0, 1))
        ids = np.load(batches)
        ones = jnp.ones(ids.shape[1:], jnp.int32)[None]
        self.batches = [{"input_ids": jnp.asarray(b)[None], "attention_mask": ones, "loss_mask": ones} for b in ids]
        jax.block_until_ready((self.base, self.lora, self.opt_state, self.batches))
        return {"load_seconds": time.perf_counter() - started, "rss_bytes": _rss_bytes()}

    def step(self, index: int) -> dict[str, Any]:
        tick = time.perf_counter()
        self.lora, self.opt_state, metrics = self.step_fn(self.lora, self.opt_state, self.base,
                                                          self.batches[index % len(self.batches)], None)
        loss = float(metrics["loss"])
        return {"seconds": time.perf_counter() - tick, "loss": loss}

    def profile(self, index: int, trace_dir: str) -> dict[str, Any]:
        import gzip

        import jax

        from .step_profile import categorize_xla_trace

        batch = self.batches[index % len(self.batches)]
        hlo = self.step_fn.lower(self.lora, self.opt_state, self.base, batch, None).compile().as_text()
        jax.profiler.start_trace(trace_dir)
        self.lora, self.opt_state, metrics = self.step_fn(self.lora, self.opt_state, self.base, batch, None)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        traces = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
        module = re.match(r"HloModule (\S+?),?\s", hlo)
        with gzip.open(traces[-1]) as f:
            events = json.load(f)["traceEvents"]
        return categorize_xla_trace(events, hlo, module.group(1) if module else None)

    def gemm(self, n: int, dtype: str, reps: int) -> dict[str, Any]:
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
        mm = jax.jit(jnp.dot)
        mm(a, b).block_until_ready()
        best = float("inf")
        for _ in range(reps):
            tick = time.perf_counter()
            mm(a, b).block_until_ready()
            best = min(best, time.perf_counter() - tick)
        return {"flops_per_second": 2.0 * n**3 / best}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_worker() -> None:
    """Our side's JSON-lines loop (the protocol of ``bench_cpu_torch_worker``)."""
    out = sys.stdout
    sys.stdout = sys.stderr
    worker = OurWorker()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op == "quit":
                out.write(json.dumps({"ok": True}) + "\n")
                out.flush()
                return
            if op == "stats":
                reply = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
            else:
                reply = getattr(worker, op)(**request)
        except Exception as err:  # noqa: BLE001 - reported to the parent, which fails with it
            import traceback

            traceback.print_exc()
            reply = {"error": f"{type(err).__name__}: {err}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ---------------------------------------------------------------------------------------------- the parent
class Worker:
    """A resident worker process, pinned to ``cpus``, driven by JSON lines."""

    def __init__(self, name: str, argv: list[str], cpus: set[int], log_path: pathlib.Path):
        self.name = name
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=REPO, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        self.log_path = log_path

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """Sends one request and waits for its reply; RuntimeError (with the worker's log tail) on failure."""
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        reply = json.loads(line) if line else {"error": f"exited with status {self.proc.wait()}"}
        if "error" in reply:
            self.log.flush()
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"{self.name} worker, op {op!r}: {reply['error']}\n--- its stderr (tail) ---\n{tail}")
        return reply

    def cpu_jiffies(self) -> float:
        return _process_cpu(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except (RuntimeError, BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _start(side: str, dtype: str, work: pathlib.Path, cpus: set[int], model_dir: pathlib.Path,
           batches: pathlib.Path) -> tuple[Worker, dict[str, Any]]:
    if side == "ours":
        argv = [sys.executable, "-m", f"{__package__ or 'experiments'}.bench_cpu_vs_torch", "--worker=1"]
    else:
        argv = [str(REPO / FLAGS.oracle_python) if not os.path.isabs(FLAGS.oracle_python) else FLAGS.oracle_python,
                str(TORCH_WORKER)]
    worker = Worker(f"{side} ({dtype})", argv, cpus, work / f"{side}-{dtype}.log")
    loaded = worker.call("load", model_dir=str(model_dir), compute_dtype=dtype, lora_r=FLAGS.lora_r,
                         lora_alpha=FLAGS.lora_alpha, threads=FLAGS.threads, batches=str(batches))
    first = worker.call("step", index=0)  # compilation (ours) or first-touch warm-up (torch), and one step
    gemm = worker.call("gemm", n=FLAGS.gemm_n, dtype=dtype, reps=5)
    return worker, {"load_seconds": loaded["load_seconds"], "first_step_seconds": first["seconds"],
                    "loss_step1": first["loss"], "gemm_flops_per_second": gemm["flops_per_second"]}


def run_pair(ours_dtype: str, torch_dtype: str, work: pathlib.Path, cpus: set[int], model_dir: pathlib.Path,
             batches: pathlib.Path, flops: float, tokens: int, rounds: int) -> dict[str, Any]:
    """Loads, compiles and interleaves one pair of workers; the per-round records and the summary.

    Args:
      ours_dtype, torch_dtype: each side's compute dtype. work: folder for the workers' logs.
      cpus: the CPUs both are pinned to. model_dir, batches: their inputs. flops: model FLOPs per
      step. tokens: tokens per step. rounds: interleaved rounds.
    Returns:
      ``{"ours": side, "torch": side, "rounds": [...], "quiet_rounds": int, "ratio": {...}}``; a
      side holds its dtype, load/first-step seconds, step-1 loss, GEMM ceiling, median step
      seconds, tokens/s, model FLOP/s and its fraction of the ceiling, and peak RSS (bytes).
    """
    workers, sides = {}, {}
    try:
        for side, dtype in (("ours", ours_dtype), ("torch", torch_dtype)):
            workers[side], sides[side] = _start(side, dtype, work, cpus, model_dir, batches)
            sides[side]["dtype"] = dtype
        records = []
        ticks = os.sysconf("SC_CLK_TCK")
        for i in range(rounds):
            order = ("ours", "torch") if i % 2 == 0 else ("torch", "ours")
            busy0, _ = _proc_stat_busy()
            own0 = sum(w.cpu_jiffies() for w in workers.values())
            wall0 = time.perf_counter()
            seconds = {side: workers[side].call("step", index=i + 1)["seconds"] for side in order}
            wall = time.perf_counter() - wall0
            busy1, _ = _proc_stat_busy()
            own1 = sum(w.cpu_jiffies() for w in workers.values())
            other = max(0.0, (busy1 - busy0) - (own1 - own0)) / ticks / (wall * (os.cpu_count() or 1))
            records.append({"order": list(order), "ours_seconds": seconds["ours"], "torch_seconds": seconds["torch"],
                            "ratio": seconds["torch"] / seconds["ours"], "other_cpu": other,
                            "quiet": other <= FLAGS.max_other_cpu})
        quiet = [r for r in records if r["quiet"]]
        counted = quiet or records
        for side in sides:
            med = statistics.median(r[f"{side}_seconds"] for r in counted)
            sides[side].update(step_seconds_median=med, tokens_per_second=tokens / med,
                               model_flops_per_second=flops / med,
                               ceiling_fraction=flops / med / sides[side]["gemm_flops_per_second"],
                               peak_rss_bytes=workers[side].call("stats")["peak_rss_bytes"])
        if FLAGS.profile:
            for side, worker in workers.items():
                kwargs = {"trace_dir": str(work / f"trace-{side}-{sides[side]['dtype']}")} if side == "ours" else {}
                sides[side]["profile"] = worker.call("profile", index=rounds + 1, **kwargs)
        ratios = [r["ratio"] for r in counted]
        return {"ours": sides["ours"], "torch": sides["torch"], "rounds": records, "quiet_rounds": len(quiet),
                "counted": "quiet" if quiet else "all (none quiet)",
                "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                          "n": len(ratios)}}
    finally:
        for worker in workers.values():
            worker.close()


def _print_pair(label: str, pair: dict[str, Any]) -> None:
    gib, r = 2**30, pair["ratio"]
    print(f"\n== {label}: ours {pair['ours']['dtype']} vs torch {pair['torch']['dtype']}")
    for side in ("ours", "torch"):
        s = pair[side]
        print(f"  {side:<6} {s['tokens_per_second']:8.1f} tok/s  step {s['step_seconds_median'] * 1e3:8.1f} ms  "
              f"model {s['model_flops_per_second'] / 1e9:6.1f} GFLOP/s = {100 * s['ceiling_fraction']:5.1f}% of its "
              f"GEMM ceiling  peak RSS {s['peak_rss_bytes'] / gib:.2f} GiB  load {s['load_seconds']:.1f} s  "
              f"first step (compile/warm-up) {s['first_step_seconds']:.1f} s  step-1 loss {s['loss_step1']:.5f}")
    loads = ", ".join(f"{100 * x['other_cpu']:.0f}%" for x in pair["rounds"])
    print(f"  rounds: {len(pair['rounds'])}, quiet (other CPU <= {100 * FLAGS.max_other_cpu:.0f}%): "
          f"{pair['quiet_rounds']}; other processes' CPU per round: {loads}")
    if not pair["quiet_rounds"]:
        print("  NO ROUND WAS QUIET: the figures below count every round and are not a measurement of this CPU")
    print(f"  ratio ours/torch tokens/s per round: median {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}, "
          f"n={r['n']}, {pair['counted']} rounds)")
    if "profile" in pair["ours"]:
        from .step_profile import format_profile

        columns = {f"{side} {pair[side]['dtype']}": pair[side]["profile"]["seconds"] for side in ("ours", "torch")}
        columns.update({f"{side}: recomputed": pair[side]["profile"]["recomputed_seconds"]
                        for side in ("ours", "torch")})
        print("  one profiled step by category (wall seconds, share of the column):")
        print(format_profile(columns))


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.worker:
        run_worker()
        return
    smoke = FLAGS.smoke
    batch, seq_len, rounds, gemm_n = (2, 32, 2, 256) if smoke else (FLAGS.batch, FLAGS.seq_len, FLAGS.rounds,
                                                                     FLAGS.gemm_n)
    FLAGS.gemm_n = gemm_n
    if smoke:
        # The tiny model's hidden size is 64: a rank of 8 keeps the torch profile's rule "a matmul
        # with the rank among its dimensions is LoRA's" unambiguous.
        FLAGS.lora_r = 8
    info = cpu_info()
    allowed = sorted(os.sched_getaffinity(0))
    cpus = set(allowed[:FLAGS.threads])
    load = os.getloadavg()
    print(f"CPU: {info['model']} ({info['cpus']} logical CPUs; workers pinned to {sorted(cpus)}); ISA: "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["isa"].items()))
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("   [smoke: tiny shapes, a harness check, not a timing]" if smoke else ""))
    results: dict[str, Any] = {"cpu": info, "smoke": smoke, "batch": batch, "seq_len": seq_len,
                               "load_average_before": load, "pairs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as tmp:
        work = pathlib.Path(tmp)
        cfg = export_model(work / "model", smoke)
        text_batches(work / "batches.npy", rounds + 1, batch, seq_len, smoke)
        flops = model_flops(cfg, batch, seq_len, FLAGS.lora_r)
        results["model_flops_per_step"] = flops

        def pair(ours_dtype, torch_dtype, key):
            results["pairs"][key] = run_pair(ours_dtype, torch_dtype, work, cpus, work / "model",
                                             work / "batches.npy", flops, batch * seq_len, rounds)
            _print_pair(key, results["pairs"][key])
            if FLAGS.json_out:
                pathlib.Path(FLAGS.json_out).write_text(json.dumps(results, indent=1))

        for dtype in FLAGS.dtypes:
            pair(dtype, dtype, dtype)
        same = {k: v for k, v in results["pairs"].items()}
        best = {side: max(same.values(), key=lambda p, s=side: p[s]["tokens_per_second"])[side]["dtype"]
                for side in ("ours", "torch")}
        if best["ours"] == best["torch"]:
            results["pairs"]["best"] = results["pairs"][best["ours"]]
            _print_pair("best vs best (the same dtype pair as above)", results["pairs"]["best"])
        else:
            pair(best["ours"], best["torch"], "best")
    print("\nGEMM ceilings (" + f"{gemm_n}^3, {FLAGS.threads} threads, GFLOP/s): " + "; ".join(
        f"{p['ours']['dtype']}: XLA {p['ours']['gemm_flops_per_second'] / 1e9:.1f}, torch "
        f"{p['torch']['gemm_flops_per_second'] / 1e9:.1f}" for k, p in results["pairs"].items() if k != "best"))
    load = os.getloadavg()
    results["load_average_after"] = load
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if FLAGS.json_out:
        pathlib.Path(FLAGS.json_out).write_text(json.dumps(results, indent=1))


def entry_point() -> None:
    """The console entry (``python -m experiments.bench_cpu_vs_torch``)."""
    cli.run(main, __name__)


if __name__ == "__main__":
    entry_point()
