#!/usr/bin/env bash
# Trains the bundled demo model data/demo-model (what qg-chat runs with no --model): a tiny
# ChatGLM (hidden 128, 3 layers, the demo tokenizer's 3000-token vocabulary) trained from random
# weights, full-parameter on the CPU with qg-train, on our own health-education text:
#   data/text/*.txt   each paragraph answers its file's title; dialogues_qa.txt's 问：/答： pairs
#   data/train/sample.jsonl
# About 15 minutes on 2 cores. It learns to write health-education-like Chinese, nothing more:
# it is not a source of medical advice. Rerunning continues from the last checkpoint in
# build/demo-train (delete that directory to start over); only the finished model replaces
# data/demo-model/config.json and model.safetensors (the tokenizer files are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-32}
WORK=build/demo-train
cmake -S . -B build -G Ninja -DQG_WITH_CUDA=OFF > /dev/null
cmake --build build --target qg-init qg-train qg-chat
mkdir -p "$WORK"

# The corpus as {question, answer} records.
python3 - "$WORK/corpus.jsonl" <<'PY'
import json, pathlib, sys
records = []
for path in sorted(pathlib.Path("data/text").glob("*.txt")):
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
    if path.name == "dialogues_qa.txt":
        question = None
        for l in lines:
            if l.startswith("问："):
                question = l[2:]
            elif l.startswith("答：") and question:
                records.append({"question": question, "answer": l[2:]})
                question = None
    else:
        records += [{"question": lines[0], "answer": p} for p in lines[1:] if p]
# sample.jsonl (any record shape qg-train reads) is appended as it is.
sample = [l for l in pathlib.Path("data/train/sample.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w", encoding="utf-8") as out:
    for r in records:
        out.write(json.dumps(r, ensure_ascii=False) + "\n")
    out.write("\n".join(sample) + "\n")
records += sample
pathlib.Path(tmp).replace(sys.argv[1])
print(f"{len(records)} training records", file=sys.stderr)
PY

if [ ! -f "$WORK/init/model.safetensors" ]; then
  build/bin/qg-init --out "$WORK/init" --tokenizer data/demo-model \
    --hidden 128 --layers 3 --heads 4 --max-seq 512 --seed 2024 --dtype f32
fi
build/bin/qg-train --model "$WORK/init" --data "$WORK/corpus.jsonl" --output "$WORK/out" \
  --mode full --optimizer adamw --lr 3e-3 --weight-decay 0.01 --warmup 100 --schedule cosine \
  --epochs "$EPOCHS" --batch-size 4 --max-length 256 --save-every 200 --keep 1 --seed 7 \
  --dtype f16 --device cpu --resume

for f in config.json model.safetensors; do
  cp "$WORK/out/$f" "data/demo-model/$f.tmp"
  mv "data/demo-model/$f.tmp" "data/demo-model/$f"
done
ls -l data/demo-model
build/bin/qg-chat --prompt "高血压患者饮食要注意什么？" --max-new-tokens 80
