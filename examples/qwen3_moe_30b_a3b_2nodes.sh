#!/usr/bin/env bash
# Full fine-tune of Qwen3-30B-A3B (Mixture of Experts: 128 experts, top-8) on 2 nodes of 8 GPUs
# with expert parallelism over both nodes: EP 16 (8 experts per GPU), DP 16, bf16, distributed
# optimizer, all-to-all token dispatch. Run the same command on each node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/qwen3_moe_30b_a3b_2nodes.sh   # node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash examples/qwen3_moe_30b_a3b_2nodes.sh   # node1
# WORK must be a folder both nodes see (a shared file system); steps 1, 2 and 4 run on node 0.
#
# Memory per GPU (model state, docs/training.md "Memory per GPU"): dense 1.54e9 parameters x
# (2 + 4 + 12 / d 16) = 10.4 GB, experts 28.99e9 / EP 16 = 1.81e9 x (2 + 4 + 12 / d 1) = 32.6 GB
# -> 43.0 GB per GPU, plus activations: fits 80 GB GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

HF=${HF:-models/Qwen3-30B-A3B}
CHATS=${CHATS:-data/chats}
WORK=${WORK:-runs/qwen3_moe}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
BASE=$WORK/base
DATA=$WORK/data/chat
SAVE=$WORK/sft
SEQ_LENGTH=4096

if [ "$NODE_RANK" = 0 ]; then
  # 1. Import (Qwen3-MoE: router, 128 experts per layer, q/k norms).
  if [ ! -f "$BASE/latest_checkpointed_iteration.txt" ]; then
    python tools/convert_checkpoint.py hf-to-mcore --load-dir "$HF" --save-dir "$BASE" --dtype bf16
  fi
  # 2. Preprocess with the model's own chat template.
  if [ ! -f "$DATA.meta.json" ]; then
    python tools/preprocess_dialog.py --input "$CHATS" --tokenizer-type huggingface \
      --tokenizer-path "$BASE/tokenizer" --template hf --seq-length $SEQ_LENGTH --split 98,2 \
      --output-prefix "$DATA" --workers 16
  fi
else
  while [ ! -f "$DATA.meta.json" ]; do sleep 30; done   # node 0 imports and preprocesses
fi

# 3. Train: 16 processes, each holding 8 of every layer's 128 experts; the router's load is in
#    the log line. --moe-aux-loss-coeff 1e-3 keeps the fine-tune's load balanced.
export CUDA_DEVICE_MAX_CONNECTIONS=1
torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" pretrain_dialog.py \
  --pretrained-checkpoint "$BASE" --use-checkpoint-args --load "$SAVE" --save "$SAVE" \
  --expert-model-parallel-size 16 --moe-token-dispatcher-type alltoall \
  --moe-aux-loss-coeff 1e-3 --use-distributed-optimizer --overlap-grad-reduce \
  --recompute-activations --data-path "$DATA" --seq-length $SEQ_LENGTH \
  --micro-batch-size 1 --global-batch-size 128 \
  --bf16 --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 50 --lr-decay-style cosine \
  --weight-decay 0.0 --clip-grad 1.0 --train-epochs 2 --log-interval 10 \
  --eval-interval 200 --eval-iters 20 --save-interval 200 --exit-signal-handler \
  --tensorboard-dir "$WORK/tensorboard"

# 4. Export (node 0): a Qwen3MoeForCausalLM folder.
if [ "$NODE_RANK" = 0 ]; then
  python tools/convert_checkpoint.py mcore-to-hf --load-dir "$SAVE" --save-dir "$WORK/hf" \
    --dtype bf16
fi
