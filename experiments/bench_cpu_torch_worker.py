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
* ``stats``: ``{"peak_rss_bytes"}`` (``ru_maxrss``). ``quit``: exits.
"""

import json
import resource
import sys
import time
import warnings

warnings.filterwarnings("ignore")


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
