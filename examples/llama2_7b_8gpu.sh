#!/usr/bin/env bash
# Multi-turn SFT of a Llama-2-7B-sized model on 8 GPUs (one node):
#   TP=2 x PP=2 -> DP=2, bf16, distributed optimizer, untied embeddings, 4096-token packs.
# Step 1 packs the conversations (CPU, once); step 2 trains. Override any path with the
# variables below, e.g.  CHATS=my_chats.jsonl SAVE=ckpt/sft bash examples/llama2_7b_8gpu.sh
# Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 (the global batch stays 64 packs).
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CHATS=${CHATS:-data/chats}                                  # JSONL/JSON files or folders
TOKENIZER=${TOKENIZER:-checkpoints/llama-2-7b/tokenizer.model}
DATA=${DATA:-data/llama2_chat}                              # packed dataset prefix
SAVE=${SAVE:-checkpoints/llama2-7b-sft}
PRETRAINED=${PRETRAINED:-}     # optional: megatron dist checkpoint of the base model (weights only)
SEQ_LENGTH=4096

# 1. Preprocess: render with the Llama 2 chat template, pack into 4096-token sequences.
if [ ! -f "$DATA.meta.json" ]; then
  python tools/preprocess_dialog.py --input "$CHATS" --tokenizer-model "$TOKENIZER" \
    --template llama2 --seq-length $SEQ_LENGTH --split 98,2 --output-prefix "$DATA" \
    --workers 16
  python tools/inspect_dialog_dataset.py "$DATA" --verify
fi

# 2. Train: 8 processes = TP 2 x PP 2 x DP 2. Global batch 64 packs (about 262k tokens) per step
#    = 32 micro-batches of 1 pack on each data-parallel rank.
export CUDA_DEVICE_MAX_CONNECTIONS=1
torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  pretrain_dialog.py \
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 \
  --untie-embeddings-and-output-weights --norm-epsilon 1e-5 --rotary-base 10000 \
  --make-vocab-size-divisible-by 128 --recompute-activations \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --use-distributed-optimizer \
  --data-path "$DATA" --seq-length $SEQ_LENGTH --micro-batch-size 1 --global-batch-size 64 \
  --loss-normalization turn \
  --bf16 --lr 2e-5 --min-lr 2e-6 --lr-warmup-iters 30 --lr-decay-style cosine \
  --weight-decay 0.0 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
  --train-epochs 3 --seed 1234 --log-interval 10 \
  --eval-interval 100 --eval-iters 10 \
  --save "$SAVE" --save-interval 250 --tensorboard-dir "$SAVE/tensorboard" \
  ${PRETRAINED:+--load "$PRETRAINED" --finetune}
