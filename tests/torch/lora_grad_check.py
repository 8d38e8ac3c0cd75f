"""PyTorch autograd check of qinggeng's GPU LoRA gradients at ChatGLM-6B width.

Run on the GPU machine after the hidden Catch test that writes the inputs:
    QG_TORCH_DUMP_DIR=/tmp/d build/bin/qg_cuda_tests "[.torch-dump]"
    python3 tests/torch/lora_grad_check.py /tmp/d
The directory holds a 2-layer hidden-4096 random model (model/), a PEFT adapter written by
qinggeng (adapter/), one example (example.json) and qinggeng's loss and gradients
(qg_grads.safetensors). This script
  1. loads the adapter with Python PEFT (PeftModel.from_pretrained on a module tree with
     ChatGLM's names) and checks every factor equals the file, so PEFT reads what we write;
  2. recomputes the loss with the independent forward of glm_reference.py plus LoRA, in
     float32 on the GPU, and the factors' gradients with autograd;
  3. compares: relative L2 error of every gradient tensor (fp16 engine vs fp32 autograd).
Exit status 0 when every gradient is within tolerance.
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import glm_reference  # noqa: E402

MODULES = {"query_key_value": "attention", "dense": "attention",
           "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}
TOLERANCE = 5e-2


def skeleton(cfg):  # also used by make_peft_fixture.py
    """A module tree with ChatGLM's linear names (weights unused) for PEFT to wrap."""
    H, I = cfg["hidden_size"], cfg["inner_hidden_size"]
    shapes = {"query_key_value": (H, 3 * H), "dense": (H, H), "dense_h_to_4h": (H, I),
              "dense_4h_to_h": (I, H)}
    root = torch.nn.Module()
    root.transformer = torch.nn.Module()
    layers = []
    for _ in range(cfg["num_layers"]):
        layer = torch.nn.Module()
        layer.attention, layer.mlp = torch.nn.Module(), torch.nn.Module()
        for name, (i, o) in shapes.items():
            setattr(getattr(layer, MODULES[name]), name, torch.nn.Linear(i, o, device="meta"))
        layers.append(layer)
    root.transformer.layers = torch.nn.ModuleList(layers)
    # PeftModelForCausalLM (task_type CAUSAL_LM) asks the base model for this hook.
    root.prepare_inputs_for_generation = lambda *args, **kwargs: {}
    return root.to_empty(device="cpu")  # real (uninitialised) storage: PEFT copies into it


def main(d):
    from peft import PeftModel

    cfg = json.load(open(os.path.join(d, "model", "config.json")))
    adapter_cfg = json.load(open(os.path.join(d, "adapter", "adapter_config.json")))
    ours = load_file(os.path.join(d, "adapter", "adapter_model.safetensors"))
    peft_model = PeftModel.from_pretrained(skeleton(cfg), os.path.join(d, "adapter"))
    loaded = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(ours), f"PEFT loaded {sorted(loaded)[:4]}..., file has {sorted(ours)[:4]}..."
    for k, v in ours.items():
        assert torch.equal(loaded[k].float().cpu(), v.float()), f"PEFT value differs for {k}"
    print(f"PEFT {getattr(sys.modules['peft'], '__version__', '?')} loaded all {len(ours)} factors of our adapter exactly")

    dev = "cuda"
    weights = {k: v.to(dev) for k, v in load_file(os.path.join(d, "model", "model.safetensors")).items()}
    example = json.load(open(os.path.join(d, "example.json")))
    scale = adapter_cfg["lora_alpha"] / adapter_cfg["r"]
    params, lora = {}, {}
    for layer in range(cfg["num_layers"]):
        for module, parent in MODULES.items():
            prefix = f"base_model.model.transformer.layers.{layer}.{parent}.{module}"
            if prefix + ".lora_A.weight" not in ours:
                continue
            a = ours[prefix + ".lora_A.weight"].to(dev).float().requires_grad_()
            b = ours[prefix + ".lora_B.weight"].to(dev).float().requires_grad_()
            params[prefix + ".lora_A.weight"], params[prefix + ".lora_B.weight"] = a, b
            lora[(layer, module)] = (a, b, scale)
    logits = glm_reference.forward(weights, cfg, example["input_ids"], lora)
    labels = torch.tensor(example["labels"], device=dev)
    loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
    loss.backward()

    qg = load_file(os.path.join(d, "qg_grads.safetensors"))
    print(f"loss: torch {loss.item():.6f}  qinggeng {qg['loss'].item():.6f}")
    ok = math.isclose(loss.item(), qg["loss"].item(), rel_tol=1e-2)
    worst = 0.0
    for name, p in params.items():
        ref = p.grad.double().cpu()
        got = qg[name].double().reshape(ref.shape)
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
        print(f"{err:9.2e}  |g| {ref.norm().item():9.3e}  {name}")
        ok &= err < TOLERANCE
    print(f"worst relative L2 error {worst:.3e} (tolerance {TOLERANCE}); {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
