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


def main(in_path, config_path, out_path):
    arrays = dict(np.load(in_path))
    cases = json.load(open(config_path))["cases"]
    out = {}
    for case in cases:
        name = case["name"]
        base = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float64)
        model = PeftModel.from_pretrained(base, case["adapter_dir"], is_trainable=True).double().eval()
        ids = torch.from_numpy(arrays[f"{name}/input_ids"].astype(np.int64))
        attention = torch.from_numpy(arrays[f"{name}/attention_mask"].astype(np.int64))
        loss_mask = torch.from_numpy(arrays[f"{name}/loss_mask"].astype(np.int64))
        logits = model(input_ids=ids, attention_mask=attention).logits  # [B, T, V] float64
        targets = ids[:, 1:]
        weight = (loss_mask[:, 1:] * attention[:, 1:]).to(torch.float64)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="none").reshape(targets.shape)
        tokens = weight.sum()
        loss = (nll * weight).sum() / tokens
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
