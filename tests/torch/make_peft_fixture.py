"""Writes tests/fixtures/peft_tiny/: a LoRA adapter saved by Python PEFT itself, for the C++
test that loads it (tests/lora/test_peft_fixture.cpp). Run on the GPU machine (which has
torch + peft):  python3 tests/torch/make_peft_fixture.py OUT_DIR

The adapter wraps a module tree with ChatGLM's names at the tiny test shape (hidden 64,
inner 256, 2 layers; tests/model_fixtures.h): r 4, alpha 8, dropout 0.1 on query_key_value and
dense_h_to_4h, lora_B made non-zero. Beside it, expected.npz-style .npy files: an input x and
the adapted layers' LoRA output delta (PEFT in eval mode: no dropout), so the C++ side checks
it computes what PEFT computes with what PEFT wrote.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_grad_check import MODULES, skeleton  # noqa: E402


def main(out):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1234)
    cfg = {"hidden_size": 64, "inner_hidden_size": 256, "num_layers": 2}
    base = skeleton(cfg)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.05)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, bias="none",
                        target_modules=["query_key_value", "dense_h_to_4h"])
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    x = torch.randn(3, 64)
    np.save(os.path.join(out, "x.npy"), x.numpy())
    for layer in range(cfg["num_layers"]):
        for module in ("query_key_value", "dense_h_to_4h"):
            lin = getattr(getattr(model.base_model.model.transformer.layers[layer], MODULES[module]), module)
            with torch.no_grad():
                delta = lin(x) - lin.base_layer(x)
            np.save(os.path.join(out, f"delta_{layer}_{module}.npy"), delta.numpy())
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    main(sys.argv[1])
