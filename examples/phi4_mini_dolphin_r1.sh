#!/usr/bin/env bash
# Phi-4-mini on DeepSeek-R1 reasoning traces from dolphin-r1 (config reasoning-deepseek, ~300k
# samples, 3.85 GB JSONL, streamed and tokenized once into the on-disk cache).
# One 24 GB GPU with LoRA in bf16; add --quantize nf4 for QLoRA on smaller cards.
set -euo pipefail
python -m minidistill.train \
  --model phi-4-mini \
  --data cognitivecomputations/dolphin-r1:reasoning-deepseek \
  --max-seq-len 4096 --batch-size 2 --grad-accum 8 \
  --lr 2e-4 --warmup-steps 20 --schedule cosine --max-steps 1000 \
  --lora-r 16 --lora-alpha 16 \
  --eval-split 0.005 --eval-every 200 --save-every 200 \
  --output runs/phi4-mini-dolphin-r1 "$@"
