#!/usr/bin/env bash
# The main job on the built-in default, end to end on CPU (a few minutes on 2 cores):
#   1. set up .venv if needed;
#   2. write the demo corpus and tokenizer, pack them into a Megatron indexed dataset (ChatML,
#      512-token packs), verify it and show a pack;
#   3. train a small Llama-style model with tensor parallelism on 2 processes
#      (torchrun --nproc_per_node 2 pretrain_dialog.py --tensor-model-parallel-size 2), turn-
#      normalized loss, and save a checkpoint;
#   4. load the checkpoint in one process and chat with it (greedy) on held-out conversations;
#   5. print a summary: the loss per turn at the first and the last log line.
# Output goes to ./demo_output (override with DEMO_DIR=...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${DEMO_DIR:-demo_output}
py=.venv/bin/python
started=$(date +%s)
set -x
$py -m mt_dialog.demo --output-dir "$out" --conversations 4000
$py tools/preprocess_dialog.py --input "$out/corpus.jsonl" \
  --tokenizer-model "$out/tokenizer.model" --template chatml --seq-length 512 \
  --output-prefix "$out/demo" --workers 2 --overwrite --no-progress
$py tools/inspect_dialog_dataset.py "$out/demo" --verify
$py tools/inspect_dialog_dataset.py "$out/demo" --pack 0 --color never
rm -rf "$out/ckpt"
trained=$(date +%s)
# One thread per process: the 2 processes share the 2 cores.
OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2 pretrain_dialog.py \
  --tensor-model-parallel-size 2 \
  --num-layers 2 --hidden-size 128 --num-attention-heads 4 \
  --data-path "$out/demo" --micro-batch-size 2 --global-batch-size 4 \
  --lr 3e-3 --min-lr 1e-4 --lr-warmup-iters 20 --train-iters 1400 \
  --log-interval 100 --eval-interval 700 --eval-iters 2 --seed 1234 \
  --save "$out/ckpt" 2>&1 | tee "$out/train.log"
train_seconds=$(( $(date +%s) - trained ))
# Held-out conversations (the replies are the model's own, greedy, each stopped at <|im_end|>);
# /reset starts a new conversation.
printf '%s\n' \
  "My name is Zoe and my favourite colour is purple." \
  "What is 7 plus 5?" \
  "Count from 3 to 8." \
  "What is my favourite colour?" \
  "What is my name?" \
  "/reset" \
  "My name is Hugo and my favourite colour is orange." \
  "Spell the word planet." \
  "What is my favourite colour?" \
  | $py tools/chat.py --load "$out/ckpt" --echo --max-new-tokens 48 | tee "$out/chat.txt"
set +x
echo
echo "== demo summary"
awk '/^iter / { split($0, f, "|"); gsub(/^ *loss\/turn | *$/, "", f[2]);
       if (!n++) { first = f[2]; fi = $2 } last = f[2]; li = $2 }
     END { printf "loss per turn (training, per log interval): %s at iter %s -> %s at iter %s\n",
           first, fi, last, li }' "$out/train.log"
grep '^validation' "$out/train.log" | tail -1 || true
echo "training: ${train_seconds} s (TP=2 on 2 processes); checkpoint: $out/ckpt;" \
  "transcript: $out/chat.txt"
echo "demo total: $(( $(date +%s) - started )) s after set-up"
