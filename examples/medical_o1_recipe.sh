#!/usr/bin/env bash
# The common medical-o1 reasoning recipe: Question / Complex_CoT / Response rendered as
# <think>\n{Complex_CoT}\n</think>\n{Response}; r 16, alpha 16, the seven projections,
# lr 2e-4, batch 2 x accumulation 4, 60 steps.
set -euo pipefail
python -m minidistill.train \
  --model "${MODEL:-phi-4-mini}" \
  --data FreedomIntelligence/medical-o1-reasoning-SFT:en \
  --lora-r 16 --lora-alpha 16 \
  --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --lr 2e-4 --batch-size 2 --grad-accum 4 --max-steps 60 --warmup-steps 5 \
  --max-seq-len 2048 --output runs/medical-o1 "$@"
