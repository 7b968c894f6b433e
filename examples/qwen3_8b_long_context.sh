#!/usr/bin/env bash
# Long conversations (agent trajectories up to 32k tokens) with Qwen3-8B on one node of 8 GPUs:
# context parallelism 4 x TP 2 (each 32,768-token pack split over 4 GPUs), DP 1, bf16,
# distributed optimizer, full recompute. See docs/long-context.md.
#   HF=models/Qwen3-8B CHATS=data/agent_runs WORK=runs/qwen3_8b_32k \
#     bash examples/qwen3_8b_long_context.sh
#
# Memory per GPU (model state, docs/training.md "Memory per GPU"): 8.19e9 parameters / TP 2 =
# 4.10e9 per GPU x (2 + 4 + 12 / d 4: the optimizer is sharded over DP 1 x CP 4) -> 36.9 GB per
# GPU, plus the activations of 32,768 / (CP 4 x TP 2) tokens per layer: fits 80 GB GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

HF=${HF:-models/Qwen3-8B}
CHATS=${CHATS:-data/agent_runs}
WORK=${WORK:-runs/qwen3_8b_32k}
BASE=$WORK/base
DATA=$WORK/data/agent
SAVE=$WORK/sft
SEQ_LENGTH=32768        # Qwen3-8B's native context (max_position_embeddings 40960)

if [ ! -f "$BASE/latest_checkpointed_iteration.txt" ]; then
  python tools/convert_checkpoint.py hf-to-mcore --load-dir "$HF" --save-dir "$BASE" --dtype bf16
fi

# Preprocessing long records needs no other flag; a conversation longer than a pack keeps the
# whole turns that fit (--overlong truncate; the default refuses it).
if [ ! -f "$DATA.meta.json" ]; then
  python tools/preprocess_dialog.py --input "$CHATS" --tokenizer-type huggingface \
    --tokenizer-path "$BASE/tokenizer" --template hf --seq-length $SEQ_LENGTH \
    --overlong truncate --split 98,2 --output-prefix "$DATA" --workers 16
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1
torchrun --nproc_per_node 8 pretrain_dialog.py \
  --pretrained-checkpoint "$BASE" --use-checkpoint-args --load "$SAVE" --save "$SAVE" \
  --context-parallel-size 4 --cp-comm-type p2p --tensor-model-parallel-size 2 \
  --sequence-parallel --use-distributed-optimizer \
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
  --data-path "$DATA" --seq-length $SEQ_LENGTH --micro-batch-size 1 --global-batch-size 32 \
  --bf16 --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 20 --lr-decay-style cosine \
  --weight-decay 0.0 --clip-grad 1.0 --train-epochs 2 --log-interval 5 \
  --eval-interval 100 --eval-iters 8 --save-interval 100 --exit-signal-handler \
  --tensorboard-dir "$WORK/tensorboard"

python tools/convert_checkpoint.py mcore-to-hf --load-dir "$SAVE" --save-dir "$WORK/hf" --dtype bf16
