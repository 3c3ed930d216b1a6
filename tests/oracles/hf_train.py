"""Oracle: the training objective's loss and LoRA gradients by transformers + PEFT in float64.

Usage: python hf_train.py IN.npz CONFIG.json OUT.npz

CONFIG: {"cases": [{"name", "dir", "adapter_dir", "save_dir"}]}; inputs "<name>/input_ids",
"<name>/attention_mask" and "<name>/loss_mask", each [B, T], in IN.npz. For each case the model
in "dir" with the PEFT adapter in "adapter_dir" runs in float64, and the loss is written out here,
independently of qlora-jax: position t of the logits predicts token t + 1, a token is a target
where both loss_mask and attention_mask are 1 at t + 1, and the loss is the sum of the targets'
cross-entropies divided by their number (every target token weighs the same, whichever row it is
in). Outputs "<name>/loss" (float64) and "<name>/tokens"; the gradients of the loss with respect
to the adapter's matrices are saved to "save_dir" as a PEFT adapter folder (adapter_config.json
copied, adapter_model.safetensors holding the gradients under the adapter's own keys), so the
test reads them with the same loader as an adapter.

A case with "adamw": {"steps", "lr", "betas", "eps", "weight_decay", "max_grad_norm"} trains
instead: from the adapter in "adapter_dir", "steps" optimizer steps on the same batch, each the
loss above, its backward pass, torch.nn.utils.clip_grad_norm_(max_grad_norm) and torch.optim.AdamW
over the adapter's matrices (what the transformers Trainer runs with PEFT). Outputs "<name>/losses"
([steps + 1] float64: the loss before each step, then after the last) and "<name>/grad_max" ([steps]:
the largest |gradient| entry of each step, before clipping); nothing is saved. "dtype" (default
"float64") is the precision the base and adapter run in; "quant" ("nf4", optional) loads the base
in 4-bit with bitsandbytes' CPU backend (float32 compute) under the adapter instead, as QLoRA does.

A case with "moe": true (Mixtral, Qwen3-MoE) loads the model with transformers' eager experts (a
Python loop over experts, which runs in float64 on CPU) and runs it with output_router_logits=True,
so that transformers computes the load-balancing aux_loss; the loss above then becomes the objective
MixtralForCausalLM optimises with labels, loss + config.router_aux_loss_coef * aux_loss (our train
step's objective). "<name>/losses" are that objective. PEFT converts transformers 4's per-expert
adapters (w1/w3 or gate_proj/up_proj of each expert, rank r each) into one adapter of rank 2r on
the fused gate_up_proj, whose lora_B is block-diagonal: its off-diagonal blocks are zeros that
torch would train, which per-expert Linear layers (transformers 4, and our per-expert adapters)
do not have. With "moe", the exact zeros of the loaded adapter are therefore held at zero (their
gradient masked), so the reference trains the per-expert parameterisation.

An adapter with modules_to_save=["gate"] trains full copies of the MoE routers with the adapters
(PEFT's ModulesToSaveWrapper). An "adamw" case then also outputs "<name>/routers" ([L, E, H]
float64: the trained copies after the last step), and with "save_dir" the trained adapter is saved
there by PEFT's save_pretrained (what a PEFT user's trained adapter folder holds).
"""

import json
import shutil
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
import transformers  # noqa: E402
from peft import PeftModel, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)


def _model(case):
    dtype = getattr(torch, case.get("dtype", "float64"))
    if case.get("quant"):
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=case["quant"], bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        base = AutoModelForCausalLM.from_pretrained(case["dir"], quantization_config=quant, dtype=dtype,
                                                    device_map="cpu")
        import bitsandbytes as bnb

        for module in base.modules():  # the exact CPU path (see hf_models.py's _exact_cpu_4bit)
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        return PeftModel.from_pretrained(base, case["adapter_dir"], is_trainable=True).eval()
    extra = {"experts_implementation": "eager"} if case.get("moe") else {}
    base = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=dtype, **extra)
    return PeftModel.from_pretrained(base, case["adapter_dir"], is_trainable=True).to(dtype).eval()


def _loss(model, ids, attention, loss_mask, moe=False):
    res = model(input_ids=ids, attention_mask=attention, **({"output_router_logits": True} if moe else {}))
    logits = res.logits  # [B, T, V]
    targets = ids[:, 1:]
    weight = (loss_mask[:, 1:] * attention[:, 1:]).to(logits.dtype)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none").reshape(targets.shape)
    tokens = weight.sum()
    loss = (nll * weight).sum() / tokens
    if moe:  # transformers' objective with labels: loss + router_aux_loss_coef * aux_loss
        loss = loss + model.config.router_aux_loss_coef * res.aux_loss
    return loss, tokens


def _train(model, batch, adamw, moe=False):
    params = [p for p in model.parameters() if p.requires_grad]
    if moe:  # the off-diagonal zero blocks of fused gate_up adapters stay zero (see the docstring)
        for p in params:
            if (p == 0).any():
                keep = (p != 0).detach().clone()
                p.register_hook(lambda g, keep=keep: g * keep)
    optimizer = torch.optim.AdamW(params, lr=adamw["lr"], betas=tuple(adamw["betas"]), eps=adamw["eps"],
                                  weight_decay=adamw["weight_decay"])
    losses, grad_max = [], []
    for _ in range(adamw["steps"]):
        optimizer.zero_grad()
        loss, _ = _loss(model, *batch, moe=moe)
        loss.backward()
        losses.append(loss.item())
        grad_max.append(max(p.grad.abs().max().item() for p in params))
        if adamw.get("max_grad_norm"):
            torch.nn.utils.clip_grad_norm_(params, adamw["max_grad_norm"])
        optimizer.step()
    with torch.no_grad():
        losses.append(_loss(model, *batch, moe=moe)[0].item())
    return np.array(losses, np.float64), np.array(grad_max, np.float64)


def main(in_path, config_path, out_path):
    arrays = dict(np.load(in_path))
    cases = json.load(open(config_path))["cases"]
    out = {}
    for case in cases:
        name = case["name"]
        model = _model(case)
        ids = torch.from_numpy(arrays[f"{name}/input_ids"].astype(np.int64))
        attention = torch.from_numpy(arrays[f"{name}/attention_mask"].astype(np.int64))
        loss_mask = torch.from_numpy(arrays[f"{name}/loss_mask"].astype(np.int64))
        if case.get("adamw"):
            out[f"{name}/losses"], out[f"{name}/grad_max"] = _train(model, (ids, attention, loss_mask), case["adamw"],
                                                                 moe=case.get("moe", False))
            routers = [m.modules_to_save["default"].weight.detach().numpy() for n, m in model.named_modules()
                       if n.endswith(".mlp.gate") and hasattr(m, "modules_to_save")]
            if routers:
                out[f"{name}/routers"] = np.stack(routers).astype(np.float64)
            if case.get("save_dir"):
                model.save_pretrained(case["save_dir"])
            continue
        loss, tokens = _loss(model, ids, attention, loss_mask, moe=case.get("moe", False))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        state = get_peft_model_state_dict(model, state_dict=grads)
        shutil.copytree(case["adapter_dir"], case["save_dir"], dirs_exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, f"{case['save_dir']}/adapter_model.safetensors")
        out[f"{name}/loss"] = np.float64(loss.item())
        out[f"{name}/tokens"] = np.float64(tokens.item())
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:])
