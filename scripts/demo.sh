#!/usr/bin/env bash
# The main job on the built-in default: set up .venv if needed, write the demo corpus and
# tokenizer, pack it into a Megatron indexed dataset, verify it and show a pack.
# Output goes to ./demo_output (override with DEMO_DIR=...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${DEMO_DIR:-demo_output}
py=.venv/bin/python
set -x
$py -m mt_dialog.demo --output-dir "$out" --conversations 4000
$py tools/preprocess_dialog.py --input "$out/corpus.jsonl" \
  --tokenizer-model "$out/tokenizer.model" --template chatml --seq-length 512 \
  --output-prefix "$out/demo" --workers 2 --overwrite
$py tools/inspect_dialog_dataset.py "$out/demo" --verify
$py tools/inspect_dialog_dataset.py "$out/demo" --pack 0 --color never
