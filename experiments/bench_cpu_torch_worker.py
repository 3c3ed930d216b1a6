"""The torch side of ``experiments.bench_cpu_vs_torch``: a resident worker in ``.venv-oracle``.

Runs under Python 3.11 with torch (CPU), bitsandbytes, transformers and peft; imports nothing of
qlora_jax. It speaks JSON lines: one request per line on stdin, one reply per line on stdout
(anything else the libraries print goes to stderr). Requests (``"op"``):

* ``load`` ``{"model_dir", "compute_dtype", "lora_r", "lora_alpha", "threads", "batches"}``:
  transformers ``from_pretrained`` with ``BitsAndBytesConfig`` (NF4, double quant, the compute
  dtype), non-reentrant gradient checkpointing, PEFT LoRA on "all-linear" (dropout 0),
  ``torch.optim.AdamW`` (lr 2e-4, no weight decay); ``batches``: an ``.npy`` file of token ids
  ``[n, B, T]``. Reply: ``{"load_seconds", "rss_bytes"}``.
* ``step`` ``{"index"}``: one training step on batch ``index % n`` (forward, backward,
  ``clip_grad_norm_(0.3)``, ``AdamW.step``, ``zero_grad``). Reply: ``{"seconds", "loss"}``; the
  loss is the batch's mean next-token cross-entropy (nats) before the update.
* ``gemm`` ``{"n", "dtype", "reps"}``: the best of ``reps`` ``n x n @ n x n`` products.
  Reply: ``{"flops_per_second"}``.
* ``profile`` ``{"index"}``: one more step under ``torch.profiler``, its time sorted into
  ``step_profile.CATEGORIES`` (see :func:`categorize_torch_events`). Reply: ``{"seconds":
  {category: s}, "recomputed_seconds": {category: s}, "wall_seconds"}``.
* ``stats``: ``{"peak_rss_bytes"}`` (``ru_maxrss``). ``quit``: exits.
"""

import contextlib
import functools
import json
import resource
import sys
import time
import warnings

from step_profile import CATEGORIES  # a sibling module (this script's folder is on sys.path); stdlib only

warnings.filterwarnings("ignore")

_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::addmv")
_LAYOUT = ("aten::copy_", "aten::contiguous", "aten::to", "aten::_to_copy", "aten::t", "aten::transpose",
           "aten::permute", "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::clone", "aten::empty",
           "aten::empty_like", "aten::empty_strided", "aten::as_strided", "aten::expand", "aten::cat",
           "aten::stack", "aten::zeros", "aten::zeros_like", "aten::fill_", "aten::zero_", "aten::unsqueeze",
           "aten::squeeze", "aten::slice", "aten::select", "aten::split", "aten::chunk", "aten::unbind",
           "aten::detach", "aten::alias", "aten::resize_", "aten::new_zeros", "aten::new_empty_strided")
_WRAPPERS = ("forward", "backward", "optimizer", "recompute")


def _high_level(name):
    """The category an operation stands for whatever it calls (None: look at the operation itself)."""
    low = name.lower()
    if "dequantize" in low:
        return "dequantize"
    if "scaled_dot_product" in low or "attention" in low:
        return "attention"
    if "cross_entropy" in low or "log_softmax" in low or "nll_loss" in low or "logsoftmax" in low \
            or "nlllossbackward" in low:
        return "head + cross-entropy"
    return None


def _own_category(event, lora_r, vocab):
    name = event.name
    if name in _WRAPPERS or name.startswith(("autograd::", "torch::autograd::", "Optimizer.")):
        return "idle, control flow"
    if name in _MATMULS:
        dims = {d for shape in event.input_shapes or () for d in shape}
        if vocab in dims:
            return "head + cross-entropy"
        return "LoRA matmul" if lora_r in dims else "base matmul"
    if name in _LAYOUT:
        return "copies, converts, layout"
    return "norms + elementwise"


def categorize_torch_events(events, wall_seconds, lora_r, vocab):
    """One profiled step's time by ``CATEGORIES``, from ``torch.profiler`` events.

    Each event's self CPU time goes to the category of the first of its ancestors (outermost
    first), or itself, that names one: a dequantize op, scaled-dot-product attention, the
    cross-entropy ops; otherwise to its own kind: a matmul is the head's when one of its input
    dimensions is the vocabulary, LoRA's when one is the rank, else the base's; data movement is
    "copies, converts, layout"; the rest is "norms + elementwise". Anything under the
    ``"recompute"`` range (the checkpointed layers run again in the backward pass) is
    "recomputation", anything under ``"optimizer"`` the optimizer's. The step's wall time not
    inside any operation (Python, autograd bookkeeping) is "idle, control flow".
    """
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    recomputed = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        chain = []
        node = event
        while node is not None:
            chain.append(node)
            node = node.cpu_parent
        chain.reverse()
        names = [e.name for e in chain]
        category = next((c for c in map(_high_level, names) if c), None) or _own_category(event, lora_r, vocab)
        own = event.self_cpu_time_total * 1e-6
        if "optimizer" in names:
            category = "optimizer"
        if "recompute" in names:
            recomputed[category] += own
            category = "recomputation"
        seconds[category] += own
    seconds["idle, control flow"] += max(0.0, wall_seconds - sum(seconds.values()))
    return {"seconds": seconds, "recomputed_seconds": recomputed, "wall_seconds": wall_seconds}


def _reply(out, payload):
    out.write(json.dumps(payload) + "\n")
    out.flush()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class Worker:
    def __init__(self):
        self.model = None

    def load(self, model_dir, compute_dtype, lora_r, lora_alpha, threads, batches):
        import numpy as np
        import torch
        import transformers
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        started = time.perf_counter()
        dtype = getattr(torch, compute_dtype)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                     device_map="cpu")
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lora_r, self.vocab, self.phase = lora_r, model.config.vocab_size, "forward"
        for module in model.modules():  # label the checkpointed layers' recomputation for the profile
            if getattr(module, "_gradient_checkpointing_func", None) is not None:
                module._gradient_checkpointing_func = functools.partial(
                    self._labelled_checkpoint, original=module._gradient_checkpointing_func)
        self.optimizer = torch.optim.AdamW(self.params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.model = model
        self.batches = torch.from_numpy(np.load(batches).astype(np.int64))
        return {"load_seconds": time.perf_counter() - started, "rss_bytes": _rss_bytes()}

    def step(self, index):
        import torch

        ids = self.batches[index % self.batches.shape[0]]
        tick = time.perf_counter()
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 0.3)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        return {"seconds": time.perf_counter() - tick, "loss": value}

    def _labelled_checkpoint(self, function, *args, original, **kwargs):
        import torch

        def run(*a, **k):
            label = torch.profiler.record_function("recompute") if self.phase == "backward" \
                else contextlib.nullcontext()
            with label:
                return function(*a, **k)

        return original(run, *args, **kwargs)

    def profile(self, index):
        import torch
        from torch.profiler import ProfilerActivity, record_function

        ids = self.batches[index % self.batches.shape[0]]
        with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            tick = time.perf_counter()
            with record_function("forward"):
                loss = self.model(input_ids=ids, labels=ids).loss
            self.phase = "backward"
            with record_function("backward"):
                loss.backward()
            self.phase = "forward"
            with record_function("optimizer"):
                torch.nn.utils.clip_grad_norm_(self.params, 0.3)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            wall = time.perf_counter() - tick
        return categorize_torch_events(prof.events(), wall, self.lora_r, self.vocab)

    def gemm(self, n, dtype, reps):
        import torch

        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(getattr(torch, dtype))
        b = torch.randn(n, n, generator=gen).to(getattr(torch, dtype))
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            tick = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - tick)
        return {"flops_per_second": 2.0 * n**3 / best}


def main():
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    worker = Worker()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op == "quit":
                _reply(out, {"ok": True})
                return
            if op == "stats":
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                _reply(out, {"peak_rss_bytes": peak})
                continue
            _reply(out, getattr(worker, op)(**request))
        except Exception as err:  # noqa: BLE001 - reported to the parent, which fails with it
            import traceback

            traceback.print_exc()
            _reply(out, {"error": f"{type(err).__name__}: {err}"})


if __name__ == "__main__":
    main()
