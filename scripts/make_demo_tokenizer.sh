#!/usr/bin/env bash
# Trains the bundled demo tokenizer (data/demo-model/ice_text.model + tokenizer_config.json)
# on our own corpus data/text/*.txt with Debian's sentencepiece CLI (spm_train).
#
# The model is laid out like the updated ChatGLM-6B ice_text.model: every GLM piece is built in,
# so num_image_tokens is 0 and the loader appends nothing. Ids:
#   0 <unk>, 1 <s>, 2 </s>, 3 <pad>,
#   4..11 [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK> (control),
#   12 <n>, 13 <|tab|>, 14..92 <|blank_2|>..<|blank_80|> (user-defined), then byte pieces and the
#   learned pieces. Text is kept as written (identity normalization, spaces not collapsed).
# Training is single-threaded so the output depends only on the corpus.
#
# Usage: scripts/make_demo_tokenizer.sh [vocab_size]   (default 3000; a soft limit)
set -euo pipefail
export LC_ALL=C  # fixed glob order and sorting, for a reproducible model

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vocab_size="${1:-3000}"
out_dir="$root/data/demo-model"

command -v spm_train >/dev/null || {
  echo "spm_train not found: apt-get install sentencepiece" >&2
  exit 1
}

shopt -s nullglob
corpus=("$root"/data/text/*.txt)
if [ ${#corpus[@]} -eq 0 ]; then
  echo "no corpus files in $root/data/text" >&2
  exit 1
fi

controls="[MASK],[gMASK],[sMASK],<unused_0>,<sop>,<eop>,<ENC>,<dBLOCK>"
user_defined="<n>,<|tab|>"
for k in $(seq 2 80); do user_defined+=",<|blank_${k}|>"; done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The model records its input paths and prefix: train from inside the scratch directory with
# relative names so the file does not depend on where the checkout or scratch directory is.
ln -s "$root/data/text" "$work/text"
input="$(cd "$work" && IFS=,; names=(text/*.txt); echo "${names[*]}")"
cd "$work"

spm_train \
  --input="$input" \
  --model_prefix=ice_text \
  --model_type=unigram \
  --vocab_size="$vocab_size" \
  --hard_vocab_limit=false \
  --character_coverage=0.9995 \
  --normalization_rule_name=identity \
  --remove_extra_whitespaces=false \
  --byte_fallback=true \
  --pad_id=3 \
  --control_symbols="$controls" \
  --user_defined_symbols="$user_defined" \
  --num_threads=1 \
  --minloglevel=1

cat > "$work/tokenizer_config.json" <<'JSON'
{
  "tokenizer_class": "ChatGLMTokenizer",
  "num_image_tokens": 0,
  "bos_token": "<sop>",
  "eos_token": "<eop>",
  "end_token": "</s>",
  "mask_token": "[MASK]",
  "gmask_token": "[gMASK]",
  "pad_token": "<pad>",
  "unk_token": "<unk>",
  "remove_space": false,
  "do_lower_case": false
}
JSON

# Replace the outputs only once both are complete (rename is atomic within one filesystem).
mkdir -p "$out_dir"
cp "$work/ice_text.model" "$out_dir/.ice_text.model.tmp"
cp "$work/tokenizer_config.json" "$out_dir/.tokenizer_config.json.tmp"
mv -f "$out_dir/.ice_text.model.tmp" "$out_dir/ice_text.model"
mv -f "$out_dir/.tokenizer_config.json.tmp" "$out_dir/tokenizer_config.json"

pieces="$(wc -l < "$work/ice_text.vocab")"
echo "wrote $out_dir/ice_text.model ($pieces pieces) and tokenizer_config.json"
