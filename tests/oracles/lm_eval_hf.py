"""Oracle: lm-evaluation-harness's own ``hf`` model (transformers + PEFT, CPU) on local tasks.

Usage: python lm_eval_hf.py IN.npz CONFIG.json OUT.npz

CONFIG: {"model_args": {...} (lm-eval's hf model_args: pretrained, peft, dtype, max_length,
load_in_4bit, ...), "tasks": [names], "include_path": folder of task YAMLs, "batch_size": int,
"num_fewshot": int or null}. IN.npz is unused. OUT.npz: "result" = one JSON string
{"metrics": {task: {metric: value}}, "samples": {task: [{"doc_id", "resps", "filtered_resps",
"arguments"}]}}, the samples in doc_id order. Nothing is downloaded (HF_*_OFFLINE are set).
"""

import json
import os
import sys
import warnings

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def _exact_cpu_4bit(model) -> None:
    """bitsandbytes' exact CPU path (dequantize, float32 matmul); see hf_models.py."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def main(in_path, config_path, out_path):
    del in_path
    config = json.load(open(config_path))
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model_args = dict(config["model_args"])
    lm = HFLM(**model_args, batch_size=config.get("batch_size", 1), device="cpu")
    _exact_cpu_4bit(lm.model)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=config["tasks"], num_fewshot=config.get("num_fewshot"),
        task_manager=TaskManager(include_path=config["include_path"], include_defaults=False), log_samples=True,
        apply_chat_template=config.get("apply_chat_template", False),
        system_instruction=config.get("system_instruction"), random_seed=0, numpy_random_seed=0,
        torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0,
    )
    out = {"metrics": _plain(results["results"]), "samples": {}}
    for task, samples in results["samples"].items():
        out["samples"][task] = [
            {"doc_id": s["doc_id"], "resps": _plain(s["resps"]), "filtered_resps": _plain(s["filtered_resps"]),
             "arguments": _plain(s["arguments"])}
            for s in sorted(samples, key=lambda s: s["doc_id"])
        ]
    np.savez(out_path, result=np.array(json.dumps(out)))


if __name__ == "__main__":
    main(*sys.argv[1:4])
