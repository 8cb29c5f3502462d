#!/usr/bin/env bash
# Filter your own chat JSONL, then fine-tune a model on what was kept.
#   examples/filter_then_sft/run.sh DATA.jsonl MODEL_DIR OUT_DIR [--group.field VALUE ...]
# DATA.jsonl: one {"messages": [...], "answer": "..."} a line (my_data.jsonl beside this script is an example).
# MODEL_DIR: a checkpoint folder with its tokenizer (for instance runs/pretrain_tiny/final, or a Granite 4.0-H).
# Extra arguments override fields of sft.yaml (e.g. --optim.max_steps 20).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 DATA.jsonl MODEL_DIR OUT_DIR [--group.field VALUE ...]" >&2
  exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
data="$1"; model="$2"; out="$3"; shift 3

posttrain filter --config "$here/filter.yaml" --input "$data" --output "$out/filtered" --no-progress
posttrain sft --config "$here/sft.yaml" --model.path "$model" --data.train_files "[$out/filtered/kept.jsonl]" \
  --checkpoint.output_dir "$out/sft" "$@"
echo "filtered data: $out/filtered/kept.jsonl (rejected.jsonl and manifest.json beside it); model: $out/sft/final"
