#!/usr/bin/env bash
# Full fine-tune of Qwen3-8B on one node of 8 GPUs: TP 2 x DP 4, bf16, distributed optimizer,
# sequence parallelism, 8192-token packs. Hugging Face folder -> import -> preprocess with the
# model's own chat template -> train -> export a Hugging Face folder.
#   HF=models/Qwen3-8B CHATS=data/chats WORK=runs/qwen3_8b bash examples/qwen3_8b_8gpu.sh
# (huggingface-cli download Qwen/Qwen3-8B --local-dir models/Qwen3-8B gets the folder.)
# Relaunching the same command resumes: import and preprocessing are skipped once done, and
# training continues from $WORK/sft.
#
# Memory per GPU (model state, docs/training.md "Memory per GPU"): 8.19e9 parameters / TP 2 =
# 4.10e9 per GPU x (2 + 4 + 12 / d 4) bytes -> 36.9 GB per GPU, plus activations: fits 80 GB GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

HF=${HF:-models/Qwen3-8B}                 # config.json, *.safetensors, tokenizer files
CHATS=${CHATS:-data/chats}                # JSONL / JSON / Parquet files or folders
WORK=${WORK:-runs/qwen3_8b}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
BASE=$WORK/base                           # the imported checkpoint (weights only)
DATA=$WORK/data/chat                      # the packed dataset's prefix
SAVE=$WORK/sft                            # the fine-tune's checkpoints (resumed from)
SEQ_LENGTH=8192

# 1. Import the Hugging Face weights and tokenizer (one process, CPU memory for the model once).
if [ ! -f "$BASE/latest_checkpointed_iteration.txt" ]; then
  python tools/convert_checkpoint.py hf-to-mcore --load-dir "$HF" --save-dir "$BASE" --dtype bf16
fi

# 2. Preprocess with the model's own chat template (reasoning and tool calls as Qwen3 writes them).
if [ ! -f "$DATA.meta.json" ]; then
  python tools/preprocess_dialog.py --input "$CHATS" --tokenizer-type huggingface \
    --tokenizer-path "$BASE/tokenizer" --template hf --seq-length $SEQ_LENGTH --split 98,2 \
    --output-prefix "$DATA" --workers 16
fi

# 3. Train: 8 processes = TP 2 x DP 4; 128 packs (1M tokens) per step = 32 micro-batches of one
#    pack on each data-parallel rank. --use-checkpoint-args takes the architecture from $BASE.
export CUDA_DEVICE_MAX_CONNECTIONS=1
torchrun --nproc_per_node "$GPUS_PER_NODE" pretrain_dialog.py \
  --pretrained-checkpoint "$BASE" --use-checkpoint-args --load "$SAVE" --save "$SAVE" \
  --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer \
  --overlap-grad-reduce --overlap-param-gather --recompute-activations \
  --data-path "$DATA" --seq-length $SEQ_LENGTH --micro-batch-size 1 --global-batch-size 128 \
  --bf16 --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 50 --lr-decay-style cosine \
  --weight-decay 0.0 --clip-grad 1.0 --train-epochs 3 --log-interval 10 \
  --eval-interval 200 --eval-iters 20 --save-interval 200 --exit-signal-handler \
  --tensorboard-dir "$WORK/tensorboard"

# 4. Export for serving (transformers, vLLM): weights, tokenizer and the chat template trained.
python tools/convert_checkpoint.py mcore-to-hf --load-dir "$SAVE" --save-dir "$WORK/hf" --dtype bf16
