"""Writes the small PyTorch-made fixtures under tests/fixtures/ (run on the GPU machine, where
PyTorch is installed; the outputs are committed and the C++ tests read them without Python).

  python3 tests/torch/make_fixtures.py OUT_DIR

- torch_tiny/: a tiny ChatGLM v1 checkpoint in the released layout: config.json, two
  `pytorch_model-0000N-of-00002.bin` shards written by torch.save (fp16, with the
  rotary_emb.inv_freq buffers the release carries) and pytorch_model.bin.index.json;
  golden_*.npy: float32 logits of glm_reference.forward for id sequences in golden.json.
- torch_tiny_bf16/: the same model as one bf16 `pytorch_model.bin`, lm_head tied (absent).
- torch_misc.bin + torch_misc.json: dtypes, a view at a storage offset, a 0-d tensor, two
  tensors sharing one storage, a non-contiguous tensor; the json lists expected values.
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import glm_reference as ref  # noqa: E402

TINY = {
    "architectures": ["ChatGLMModel"],
    "model_type": "chatglm",
    "vocab_size": 160,
    "hidden_size": 64,
    "num_layers": 2,
    "num_attention_heads": 4,
    "inner_hidden_size": 256,
    "layernorm_epsilon": 1e-5,
    "max_sequence_length": 64,
    "position_encoding_2d": True,
    "bos_token_id": 154,
    "eos_token_id": 155,
    "mask_token_id": 150,
    "gmask_token_id": 151,
    "pad_token_id": 3,
    "pre_seq_len": None,
    "torch_dtype": "float16",
    "use_cache": True,
}

GOLDEN = {
    "prompt": [5, 17, 33, 2, 151, 154],
    "answer": [5, 17, 33, 2, 151, 154, 40, 41, 99, 7],
    "mask": [9, 150, 12, 13, 154, 60, 61],
    "plain": [0, 1, 2, 3, 4],
}


def inv_freq_buffer(cfg):
    rot = cfg["hidden_size"] // (cfg["num_attention_heads"] * 2)
    return (1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))).half()


def write_tiny(out):
    w = ref.random_weights(TINY, seed=1234)
    w16 = {k: v.half() for k, v in w.items()}
    os.makedirs(os.path.join(out, "torch_tiny"), exist_ok=True)
    names = list(w16)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in w16.values())}, "weight_map": {}}
    for s, shard_names in enumerate(shards):
        fname = f"pytorch_model-{s + 1:05d}-of-00002.bin"
        sd = {n: w16[n] for n in shard_names}
        for n in shard_names:
            if n.endswith("attention.dense.weight"):
                layer = n.split(".")[2]
                key = f"transformer.layers.{layer}.attention.rotary_emb.inv_freq"
                sd[key] = inv_freq_buffer(TINY)
                index["weight_map"][key] = fname
        torch.save(sd, os.path.join(out, "torch_tiny", fname))
        for n in shard_names:
            index["weight_map"][n] = fname
    with open(os.path.join(out, "torch_tiny", "pytorch_model.bin.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(out, "torch_tiny", "config.json"), "w") as f:
        json.dump(TINY, f, indent=2)
    w32 = {k: v.float() for k, v in w16.items()}
    for name, ids in GOLDEN.items():
        logits = ref.forward(w32, TINY, ids).numpy().astype(np.float32)
        np.save(os.path.join(out, "torch_tiny", f"golden_{name}.npy"), logits)
    with open(os.path.join(out, "torch_tiny", "golden.json"), "w") as f:
        json.dump(GOLDEN, f, indent=2)

    # bf16, single file, tied head.
    os.makedirs(os.path.join(out, "torch_tiny_bf16"), exist_ok=True)
    wt = ref.random_weights(TINY, seed=99, tie_lm_head=True)
    wb = {k: v.bfloat16() for k, v in wt.items()}
    torch.save(wb, os.path.join(out, "torch_tiny_bf16", "pytorch_model.bin"))
    cfg = dict(TINY, torch_dtype="bfloat16")
    with open(os.path.join(out, "torch_tiny_bf16", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    wbf = {k: v.float() for k, v in wb.items()}
    logits = ref.forward(wbf, TINY, GOLDEN["answer"]).numpy().astype(np.float32)
    np.save(os.path.join(out, "torch_tiny_bf16", "golden_answer.npy"), logits)


def write_misc(out):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "f32": torch.tensor([[1.5, -2.0, 3.25], [0.0, 1e-3, -7.0]], dtype=torch.float32),
        "f16": torch.tensor([0.5, -1.25, 65504.0, 6e-5], dtype=torch.float16),
        "bf16": torch.tensor([1.0, -3.5, 1e20, 2.0 ** -20], dtype=torch.bfloat16),
        "i64": torch.tensor([1, -2, 3_000_000_000], dtype=torch.int64),
        "scalar": torch.tensor(42.0, dtype=torch.float32),
        "shared_a": base,
        "shared_row2": base[2],  # a view: same storage, offset 12
        "transposed": base.t(),  # non-contiguous
    }
    torch.save(sd, os.path.join(out, "torch_misc.bin"))
    expect = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape),
                  "values": v.float().flatten().tolist() if v.dtype != torch.int64 else v.flatten().tolist()}
              for k, v in sd.items()}
    with open(os.path.join(out, "torch_misc.json"), "w") as f:
        json.dump(expect, f, indent=2)


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    write_tiny(out)
    write_misc(out)
    print("fixtures written to", out)
