"""Oracle: Hugging Face transformers, PEFT and bitsandbytes on CPU (the .venv-oracle environment).

Usage: python hf_models.py IN.npz CONFIG.json OUT.npz

CONFIG: {"cases": [{"name", "op", ...}]}; inputs "<name>/input_ids" (and optional
"<name>/attention_mask") in IN.npz; outputs "<name>/<key>" in OUT.npz. Ops:
  make_model   {model_type, config: {...}, seed, dir, max_shard_size?} -> random model saved with
               save_pretrained; logits_f32 (float32) and logits_bf16 (bfloat16 weights) on the input.
  logits       {dir, dtype} -> logits of the folder as transformers loads it.
  bnb4         {dir, quant_type, double_quant, save_dir?} -> logits of the model loaded in 4-bit with
               bitsandbytes' CPU backend (float32 compute); optionally save_pretrained(save_dir).
  peft_random  {dir, r, alpha, targets, seed, save_dir} -> a PEFT LoRA adapter with random
               (non-zero) A and B saved to save_dir; logits of base+adapter.
  peft_load    {dir, adapter_dir} -> logits of PeftModel.from_pretrained(base, adapter_dir).
  generate     {dir, max_new_tokens} -> "<name>/tokens": greedy continuation of each row of
               input_ids (no stop token), with transformers' own KV cache.
  num_params   {model_type, config} -> "<name>/count": parameters of the model (built on the meta
               device, so a 9B config costs nothing).
  peft_targets {model_type, config, targets: [target_modules, ...]} -> "<name>/matched_<i>": the
               module names PEFT puts LoRA on for each target_modules value (empty if it refuses).
"""

import json
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)


def _logits(model, arrays, name):
    ids = torch.from_numpy(arrays[f"{name}/input_ids"].astype(np.int64))
    mask_key = f"{name}/attention_mask"
    mask = torch.from_numpy(arrays[mask_key].astype(np.int64)) if mask_key in arrays else None
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def _randomize(model, seed):
    """Weights with O(1) logits and non-trivial norms, so that comparisons mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def _exact_cpu_4bit(model):
    """Keeps bitsandbytes on its exact CPU path (dequantize, then a float32 matmul).

    On CPUs with AVX512-BF16, Linear4bit's inference forward otherwise repacks the weight with
    bfloat16-rounded absmax and computes in bfloat16: an approximation, not a reference.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def main(in_path, config_path, out_path):
    arrays = dict(np.load(in_path))
    cases = json.load(open(config_path))["cases"]
    out = {}
    for case in cases:
        name, op = case["name"], case["op"]
        if op == "make_model":
            torch.manual_seed(case.get("seed", 0))
            config = AutoConfig.for_model(case["model_type"], **case["config"])
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            _randomize(model, case.get("seed", 0))
            model.eval()
            kwargs = {"max_shard_size": case["max_shard_size"]} if case.get("max_shard_size") else {}
            model.save_pretrained(case["dir"], safe_serialization=True, **kwargs)
            out[f"{name}/logits_f32"] = _logits(model, arrays, name)
            out[f"{name}/logits_bf16"] = _logits(model.to(torch.bfloat16), arrays, name)
        elif op == "logits":
            dtype = getattr(torch, case.get("dtype", "float32"))
            model = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=dtype, device_map="cpu").eval()
            _exact_cpu_4bit(model)
            out[f"{name}/logits"] = _logits(model, arrays, name)
        elif op == "bnb4":
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=case["quant_type"],
                bnb_4bit_use_double_quant=case["double_quant"],
                bnb_4bit_compute_dtype=torch.float32,
            )
            model = AutoModelForCausalLM.from_pretrained(
                case["dir"], quantization_config=quant, dtype=torch.float32, device_map="cpu"
            ).eval()
            _exact_cpu_4bit(model)
            out[f"{name}/logits"] = _logits(model, arrays, name)
            if case.get("save_dir"):
                model.save_pretrained(case["save_dir"], safe_serialization=True)
        elif op == "peft_random":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(case.get("seed", 0))
            model = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32).eval()
            lora = LoraConfig(r=case["r"], lora_alpha=case["alpha"], target_modules=case["targets"],
                              init_lora_weights=False, lora_dropout=0.0, use_rslora=case.get("use_rslora", False))
            model = get_peft_model(model, lora).eval()
            out[f"{name}/logits"] = _logits(model, arrays, name)
            model.save_pretrained(case["save_dir"])
        elif op == "peft_load":
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32)
            model = PeftModel.from_pretrained(base, case["adapter_dir"]).eval()
            out[f"{name}/logits"] = _logits(model, arrays, name)
        elif op == "generate":
            model = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32).eval()
            model.generation_config.eos_token_id = None  # the full budget, as ours without stop tokens
            ids = torch.from_numpy(arrays[f"{name}/input_ids"].astype(np.int64))
            with torch.no_grad():
                tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=case["max_new_tokens"],
                                        do_sample=False, pad_token_id=0)
            out[f"{name}/tokens"] = tokens[:, ids.shape[1]:].numpy()
        elif op == "num_params":
            config = AutoConfig.for_model(case["model_type"], **case["config"])
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            out[f"{name}/count"] = np.array(sum(p.numel() for p in model.parameters()), np.int64)
        elif op == "peft_targets":
            from peft import LoraConfig, get_peft_model
            from peft.tuners.lora import LoraLayer

            config = AutoConfig.for_model(case["model_type"], **case["config"])
            for i, targets in enumerate(case["targets"]):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
                try:
                    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
                    prefix = "base_model.model."
                    matched = [n.removeprefix(prefix) for n, m in peft_model.named_modules()
                               if isinstance(m, LoraLayer)]
                except ValueError:  # PEFT refuses a target_modules that matches nothing
                    matched = []
                out[f"{name}/matched_{i}"] = np.array(sorted(matched), dtype=str)
        else:
            raise ValueError(f"unknown op {op!r}")
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
