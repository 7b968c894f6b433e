#!/usr/bin/env bash
# LoRA fine-tune of Qwen3-32B on 2 GPUs: TP 2, bf16, rank-16 adapters on every linear layer of
# the attention and MLP; the base stays frozen (no gradients, no optimizer state). Exported as a
# PEFT adapter folder (vLLM multi-LoRA) and as a merged Hugging Face model.
#   HF=models/Qwen3-32B CHATS=data/chats WORK=runs/qwen3_32b_lora \
#     bash examples/qwen3_32b_lora_2gpu.sh
#
# Memory per GPU (model state, docs/training.md "Memory per GPU"): the frozen base 32.76e9 / TP 2
# = 16.38e9 parameters x 2 bytes = 32.8 GB, the adapters (0.12e9, counted whole) x (2 + 4 + 12 /
# d 1) = 2.1 GB -> 34.9 GB per GPU, plus activations (--recompute-activations): fits 80 GB
# GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

HF=${HF:-models/Qwen3-32B}
CHATS=${CHATS:-data/chats}
WORK=${WORK:-runs/qwen3_32b_lora}
BASE=$WORK/base
DATA=$WORK/data/chat
SAVE=$WORK/lora
SEQ_LENGTH=4096

# 1. Import: the LoRA checkpoints point at this folder (path and fingerprint): keep it in place.
if [ ! -f "$BASE/latest_checkpointed_iteration.txt" ]; then
  python tools/convert_checkpoint.py hf-to-mcore --load-dir "$HF" --save-dir "$BASE" --dtype bf16
fi

# 2. Preprocess with the model's own chat template.
if [ ! -f "$DATA.meta.json" ]; then
  python tools/preprocess_dialog.py --input "$CHATS" --tokenizer-type huggingface \
    --tokenizer-path "$BASE/tokenizer" --template hf --seq-length $SEQ_LENGTH --split 98,2 \
    --output-prefix "$DATA" --workers 16
fi

# 3. Train the adapters: 2 processes = TP 2; 32 packs per step.
export CUDA_DEVICE_MAX_CONNECTIONS=1
torchrun --nproc_per_node 2 pretrain_dialog.py \
  --pretrained-checkpoint "$BASE" --use-checkpoint-args --load "$SAVE" --save "$SAVE" \
  --lora-rank 16 --lora-alpha 32 --lora-target all --lora-dropout 0.05 \
  --tensor-model-parallel-size 2 --sequence-parallel --recompute-activations \
  --data-path "$DATA" --seq-length $SEQ_LENGTH --micro-batch-size 1 --global-batch-size 32 \
  --bf16 --lr 2e-4 --min-lr 2e-5 --lr-warmup-iters 30 --lr-decay-style cosine \
  --weight-decay 0.0 --clip-grad 1.0 --train-epochs 2 --log-interval 10 \
  --eval-interval 100 --eval-iters 10 --save-interval 100 --exit-signal-handler \
  --tensorboard-dir "$WORK/tensorboard"

# 4. Export: the adapter (loads with peft on top of $HF), and the merged model.
python tools/convert_checkpoint.py mcore-to-hf --load-dir "$SAVE" --save-dir "$WORK/adapter"
python tools/convert_checkpoint.py mcore-to-hf --load-dir "$SAVE" --save-dir "$WORK/merged" \
  --merge-lora --dtype bf16
