"""Oracle: transformers' MoE blocks (Mixtral, Qwen3-MoE) and bitsandbytes' CPU 4-bit quantization.

Usage: python hf_moe.py IN.npz CONFIG.json OUT.npz

CONFIG: {"cases": [{"name", "op", ...}]}; inputs "<name>/<key>" in IN.npz, outputs "<name>/<key>".
Ops:
  block   {model_type, config, seed, quant_type?, double_quant?, lora_scaling?} with x [B, S, H] (float32)
          and optional cotangent [B, S, H] and LoRA arrays lora/<matrix>/lora_A|lora_B [E, r, in]/[E, out, r]:
          a random MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock (transformers' own classes, eager
          experts). Outputs: the weights (gate [E, H], gate_proj/up_proj [E, I, H], down_proj [E, H, I],
          float32); router_logits, top_k_index, top_k_weights and out of the float32 block; out_bf16,
          top_k_index_bf16 of the block in bfloat16.
          With quant_type: each expert matrix through bitsandbytes' quantize_4bit (CPU backend):
          q/<matrix>/packed [E, n/2], absmax [E, blocks], nested_absmax [E, ...], offset [E],
          dequantized [E, out, in]; out_q64: the block in float64 on the dequantized experts.
          With cotangent and lora: the float64 block on the (dequantized, if quant_type) experts with
          W + lora_scaling * B @ A per expert: out_lora64 and the gradients of sum(out * cotangent)
          w.r.t. every lora array (grad/<matrix>/lora_A|lora_B), by torch autograd in float64.
  save_model {model_type, config, seed, dir}: a random tiny *ForCausalLM saved with save_pretrained;
          layer 0's tensors as the module holds them: gate [E, H], gate_up_proj [E, 2I, H], down_proj [E, H, I].
  model_aux {model_type, config, seed} with input_ids [B, S] and optional attention_mask: a random
          tiny *ForCausalLM run with output_router_logits=True: router_logits [L, B*S, E] and aux_loss.
  folder_aux {dir} with input_ids and optional attention_mask: the saved model of the folder with
          output_router_logits=True: logits, aux_loss (the coefficient not applied).
  bnb_model {dir, quant_type, double_quant, blocksize?} with input_ids and optional attention_mask:
          the logits of the saved model (float32) with every decoder linear weight and every expert
          matrix replaced by bitsandbytes' CPU quantize_4bit + dequantize_4bit of it, one expert
          matrix at a time (w1/w3 or gate_proj/up_proj separately, as the per-expert files hold
          them), i.e. what per-expert Linear4bit layers compute on bitsandbytes' exact CPU path
          (dequantize, then a float32 matmul). transformers 5 leaves fused experts unquantized
          under BitsAndBytesConfig, so this is the 4-bit expert reference; lm_head and the router
          stay float32. With save_dir: the folder rewritten as a pre-quantized bitsandbytes
          checkpoint with per-expert 4-bit tensors (transformers 4's per-expert Linear4bit layers):
          every attention projection and expert matrix as Linear4bit saves it (packed weight plus
          its quant_state.as_dict(packed=True) tensors), the rest as stored.
  peft_v4  {dir, r, alpha, targets, seed, save_dir} with input_ids and optional attention_mask: writes
          a random LoRA adapter in PEFT's per-expert format of transformers 4 (keys
          base_model.model.model.layers.{i}.<module>.lora_A|lora_B.weight for every module of the
          model whose leaf name is in targets, experts as block_sparse_moe.experts.{e}.w1 /
          mlp.experts.{e}.gate_proj), then loads it with PeftModel.from_pretrained (which converts it
          to transformers 5's fused experts): logits.
  peft_load {dir, adapter_dir} with input_ids and optional attention_mask: logits of
          PeftModel.from_pretrained(model of dir, adapter_dir).
  peft_fused {dir, r, alpha, target_modules, target_parameters, seed, save_dir, use_rslora?} with
          input_ids and optional attention_mask: get_peft_model on the saved model of dir with
          PEFT's transformers 5 format (target_parameters on the fused experts, e.g.
          mlp.experts.gate_up_proj; target_modules may be null), every lora_A / lora_B replaced by
          seeded random values (A ~ N(0, 1/in), B ~ 0.3 N(0, 1/rank)), saved with save_pretrained to
          save_dir: logits of that model, and the ParamWrapper's delta weight of layer 0's fused
          gate_up_proj as PEFT computes it (delta_gate_up [E, 2I, H]).
"""

import json
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)

MATRICES = ("gate_proj", "up_proj", "down_proj")


def _block(model_type, config):
    if model_type == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    elif model_type == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
    else:
        raise ValueError(f"unknown model_type {model_type!r}")
    return Block(config)


def _split(block):
    """{gate_proj, up_proj, down_proj} [E, out, in] views of transformers' fused expert tensors."""
    gate_up = block.experts.gate_up_proj
    inter = gate_up.shape[1] // 2
    return {"gate_proj": gate_up[:, :inter], "up_proj": gate_up[:, inter:], "down_proj": block.experts.down_proj}


def _set_experts(block, mats):
    """Replaces the fused expert parameters by plain tensors (possibly part of an autograd graph)."""
    del block.experts.gate_up_proj
    del block.experts.down_proj
    block.experts.gate_up_proj = torch.cat([mats["gate_proj"], mats["up_proj"]], dim=1)
    block.experts.down_proj = mats["down_proj"]


def _quantize(w, quant_type, double_quant, blocksize):
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                    quant_type=quant_type)
    out = {"packed": packed.numpy().reshape(-1), "absmax": state.absmax.numpy(),
           "dequantized": F.dequantize_4bit(packed, state).float().numpy()}
    if state.nested:
        out["nested_absmax"] = state.state2.absmax.numpy()
        out["offset"] = np.float32(state.offset.item())
    return out


def _save_bnb_per_expert(case):
    """The folder case["dir"] as a bitsandbytes 4-bit checkpoint with one 4-bit tensor per expert matrix."""
    import os
    import re
    import shutil

    import bitsandbytes.functional as F
    from safetensors.torch import load_file, save_file

    shutil.copytree(case["dir"], case["save_dir"], dirs_exist_ok=True)
    tensors = load_file(os.path.join(case["dir"], "model.safetensors"))
    out = {}
    quantized = re.compile(r".*\.(self_attn\.[qkvo]_proj|experts\.\d+\.(w[123]|gate_proj|up_proj|down_proj))\.weight")
    for key, value in tensors.items():
        if not quantized.fullmatch(key):
            out[key] = value
            continue
        packed, state = F.quantize_4bit(value.contiguous(), blocksize=case.get("blocksize", 64),
                                        compress_statistics=case["double_quant"], quant_type=case["quant_type"])
        out[key] = packed
        for k, v in state.as_dict(packed=True).items():
            out[f"{key}.{k}"] = v
    save_file(out, os.path.join(case["save_dir"], "model.safetensors"), metadata={"format": "pt"})
    config_path = os.path.join(case["save_dir"], "config.json")
    config = json.load(open(config_path))
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                     "bnb_4bit_quant_type": case["quant_type"],
                                     "bnb_4bit_use_double_quant": case["double_quant"],
                                     "bnb_4bit_compute_dtype": "float32"}
    json.dump(config, open(config_path, "w"))


def main(in_path, config_path, out_path):
    arrays = dict(np.load(in_path))
    cases = json.load(open(config_path))["cases"]
    out = {}
    for case in cases:
        name, op = case["name"], case["op"]
        if op == "block":
            config = AutoConfig.for_model(case["model_type"], experts_implementation="eager", **case["config"])
            config._experts_implementation = "eager"
            gen = torch.Generator().manual_seed(case.get("seed", 0))
            block = _block(case["model_type"], config).float().eval()
            with torch.no_grad():
                for p in block.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            x = torch.from_numpy(arrays[f"{name}/x"].astype(np.float32))
            with torch.no_grad():
                logits, weights, index = block.gate(x.reshape(-1, x.shape[-1]))
                out[f"{name}/router_logits"] = logits.numpy()
                out[f"{name}/top_k_index"] = index.numpy()
                out[f"{name}/top_k_weights"] = weights.float().numpy()
                out[f"{name}/out"] = block(x).numpy()
                out[f"{name}/gate"] = block.gate.weight.numpy().copy()
                mats = {k: v.detach().clone() for k, v in _split(block).items()}
                for k, v in mats.items():
                    out[f"{name}/{k}"] = v.numpy()
                bf16 = _block(case["model_type"], config).eval()
                bf16.load_state_dict(block.state_dict())
                bf16 = bf16.to(torch.bfloat16)
                _, _, index_bf16 = bf16.gate(x.to(torch.bfloat16).reshape(-1, x.shape[-1]))
                out[f"{name}/top_k_index_bf16"] = index_bf16.numpy()
                out[f"{name}/out_bf16"] = bf16(x.to(torch.bfloat16)).float().numpy()
            base = mats
            if case.get("quant_type"):
                base = {}
                for k, v in mats.items():
                    per_expert = [_quantize(v[e], case["quant_type"], case["double_quant"], case.get("blocksize", 64))
                                  for e in range(v.shape[0])]
                    for key in per_expert[0]:
                        out[f"{name}/q/{k}/{key}"] = np.stack([p[key] for p in per_expert])
                    base[k] = torch.from_numpy(out[f"{name}/q/{k}/dequantized"])
                block64 = _block(case["model_type"], config).eval()
                block64.load_state_dict(block.state_dict())
                block64 = block64.double()
                _set_experts(block64, {k: v.double() for k, v in base.items()})
                with torch.no_grad():
                    out[f"{name}/out_q64"] = block64(x.double()).numpy()
            if f"{name}/cotangent" in arrays:
                block64 = _block(case["model_type"], config).eval()
                block64.load_state_dict(block.state_dict())
                block64 = block64.double()
                scaling = case.get("lora_scaling", 1.0)
                leaves = {}
                mats64 = {}
                for k in MATRICES:
                    w = base[k].double()
                    if f"{name}/lora/{k}/lora_A" in arrays:
                        a = torch.from_numpy(arrays[f"{name}/lora/{k}/lora_A"].astype(np.float64)).requires_grad_()
                        b = torch.from_numpy(arrays[f"{name}/lora/{k}/lora_B"].astype(np.float64)).requires_grad_()
                        leaves[k] = (a, b)
                        w = w + scaling * torch.bmm(b, a)
                    mats64[k] = w
                _set_experts(block64, mats64)
                y = block64(x.double())
                cot = torch.from_numpy(arrays[f"{name}/cotangent"].astype(np.float64))
                (y * cot).sum().backward()
                out[f"{name}/out_lora64"] = y.detach().numpy()
                for k, (a, b) in leaves.items():
                    out[f"{name}/grad/{k}/lora_A"] = a.grad.numpy()
                    out[f"{name}/grad/{k}/lora_B"] = b.grad.numpy()
        elif op == "save_model":
            config = AutoConfig.for_model(case["model_type"], experts_implementation="eager", **case["config"])
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            gen = torch.Generator().manual_seed(case.get("seed", 0))
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            model.save_pretrained(case["dir"], safe_serialization=True)
            mlp = model.model.layers[0].mlp
            out[f"{name}/gate"] = mlp.gate.weight.detach().numpy()
            out[f"{name}/gate_up_proj"] = mlp.experts.gate_up_proj.detach().numpy()
            out[f"{name}/down_proj"] = mlp.experts.down_proj.detach().numpy()
        elif op == "model_aux":
            torch.manual_seed(case.get("seed", 0))
            config = AutoConfig.for_model(case["model_type"], experts_implementation="eager", **case["config"])
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            gen = torch.Generator().manual_seed(case.get("seed", 0))
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim >= 2:
                        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            ids = torch.from_numpy(arrays[f"{name}/input_ids"].astype(np.int64))
            mask_key = f"{name}/attention_mask"
            mask = torch.from_numpy(arrays[mask_key].astype(np.int64)) if mask_key in arrays else None
            with torch.no_grad():
                res = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
            out[f"{name}/router_logits"] = torch.stack([r.float() for r in res.router_logits]).numpy()
            out[f"{name}/aux_loss"] = np.float32(res.aux_loss.item())
        elif op in ("folder_aux", "bnb_model"):
            model = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32,
                                                         experts_implementation="eager").eval()
            if op == "bnb_model":
                def qdq(w, case=case):
                    q = _quantize(w, case["quant_type"], case["double_quant"], case.get("blocksize", 64))
                    return torch.from_numpy(q["dequantized"]).reshape(w.shape)

                with torch.no_grad():
                    for mod_name, module in model.named_modules():
                        if isinstance(module, torch.nn.Linear) and mod_name != "lm_head":
                            module.weight.copy_(qdq(module.weight))
                    for layer in model.model.layers:
                        experts = layer.mlp.experts
                        inter = experts.gate_up_proj.shape[1] // 2
                        for e in range(experts.gate_up_proj.shape[0]):
                            experts.gate_up_proj[e, :inter] = qdq(experts.gate_up_proj[e, :inter].clone())
                            experts.gate_up_proj[e, inter:] = qdq(experts.gate_up_proj[e, inter:].clone())
                            experts.down_proj[e] = qdq(experts.down_proj[e].clone())
            if op == "bnb_model" and case.get("save_dir"):
                _save_bnb_per_expert(case)
            ids = torch.from_numpy(arrays[f"{name}/input_ids"].astype(np.int64))
            mask_key = f"{name}/attention_mask"
            mask = torch.from_numpy(arrays[mask_key].astype(np.int64)) if mask_key in arrays else None
            with torch.no_grad():
                res = model(input_ids=ids, attention_mask=mask, output_router_logits=op == "folder_aux")
            out[f"{name}/logits"] = res.logits.float().numpy()
            if op == "folder_aux":
                out[f"{name}/aux_loss"] = np.float32(res.aux_loss.item())
        elif op == "peft_v4":
            import os

            from peft import PeftModel
            from safetensors.torch import save_file

            cfg = json.load(open(os.path.join(case["dir"], "config.json")))
            layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
            heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"] or hidden // cfg[
                "num_attention_heads"]
            if cfg["model_type"] == "mixtral":
                block, names, inter = "block_sparse_moe", ("w1", "w3", "w2"), cfg["intermediate_size"]
            else:
                block, names, inter = "mlp", ("gate_proj", "up_proj", "down_proj"), cfg["moe_intermediate_size"]
            experts = cfg.get("num_local_experts") or cfg["num_experts"]
            shapes = {"q_proj": (heads * hd, hidden), "k_proj": (kv * hd, hidden), "v_proj": (kv * hd, hidden),
                      "o_proj": (hidden, heads * hd), names[0]: (inter, hidden), names[1]: (inter, hidden),
                      names[2]: (hidden, inter)}
            gen = torch.Generator().manual_seed(case.get("seed", 0))
            r, tensors = case["r"], {}
            for i in range(layers):
                for t in case["targets"]:
                    out_f, in_f = shapes[t]
                    if t in names:
                        modules = [f"{block}.experts.{e}.{t}" for e in range(experts)]
                    else:
                        modules = [f"self_attn.{t}"]
                    for m in modules:
                        key = f"base_model.model.model.layers.{i}.{m}"
                        tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) / in_f ** 0.5
                        tensors[f"{key}.lora_B.weight"] = 0.3 * torch.randn(out_f, r, generator=gen) / r ** 0.5
            os.makedirs(case["save_dir"], exist_ok=True)
            save_file(tensors, os.path.join(case["save_dir"], "adapter_model.safetensors"), metadata={"format": "pt"})
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": case["alpha"],
                       "lora_dropout": 0.0, "target_modules": case["targets"], "bias": "none",
                       "base_model_name_or_path": case["dir"]},
                      open(os.path.join(case["save_dir"], "adapter_config.json"), "w"))
        if op == "peft_fused":
            from peft import LoraConfig, get_peft_model

            base = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32,
                                                        experts_implementation="eager")
            model = get_peft_model(base, LoraConfig(
                r=case["r"], lora_alpha=case["alpha"], target_modules=case["target_modules"],
                target_parameters=case["target_parameters"], use_rslora=case.get("use_rslora", False),
                lora_dropout=0.0)).eval()
            gen = torch.Generator().manual_seed(case.get("seed", 0))
            with torch.no_grad():
                for pname, param in sorted(model.named_parameters()):
                    if ".lora_A." in pname:
                        param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
                    elif ".lora_B." in pname:
                        param.copy_(0.3 * torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
            model.save_pretrained(case["save_dir"])
            ids = torch.from_numpy(arrays[f"{name}/input_ids"].astype(np.int64))
            mask_key = f"{name}/attention_mask"
            mask = torch.from_numpy(arrays[mask_key].astype(np.int64)) if mask_key in arrays else None
            with torch.no_grad():
                out[f"{name}/logits"] = model(input_ids=ids, attention_mask=mask).logits.float().numpy()
                wrapper = model.base_model.model.model.layers[0].mlp.experts
                while getattr(wrapper, "parameter_name", None) not in (None, "gate_up_proj"):
                    wrapper = wrapper.base_layer
                if getattr(wrapper, "parameter_name", None) == "gate_up_proj":
                    out[f"{name}/delta_gate_up"] = wrapper.get_delta_weight("default").float().numpy()
        if op in ("peft_v4", "peft_load"):
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32,
                                                        experts_implementation="eager")
            adapter = case["save_dir"] if op == "peft_v4" else case["adapter_dir"]
            model = PeftModel.from_pretrained(base, adapter).eval()
            ids = torch.from_numpy(arrays[f"{name}/input_ids"].astype(np.int64))
            mask_key = f"{name}/attention_mask"
            mask = torch.from_numpy(arrays[mask_key].astype(np.int64)) if mask_key in arrays else None
            with torch.no_grad():
                out[f"{name}/logits"] = model(input_ids=ids, attention_mask=mask).logits.float().numpy()
        elif op not in ("block", "save_model", "model_aux", "folder_aux", "bnb_model", "peft_fused"):
            raise ValueError(f"unknown op {op!r}")
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
