#!/usr/bin/env bash
# Recipe: Phi-4-mini-reasoning (3.8B) on the same medical-o1 data and schedule as
# r1_llama8b_medical_o1.sh (r 16, alpha 16, the seven projections, lr 2e-4, batch 2 x accumulation
# 4, 60 steps), with the model's own chat format instead of a prompt template: the records read as
# the medical-o1 schema (user: Question; assistant: <think>\n{Complex_CoT}\n</think>\n{Response})
# and Phi-4-mini-reasoning's template renders them, its reasoning format being the one the model
# was trained on. LoRA in bf16 (the model fits one 16 GB GPU without 4-bit; add --quantize nf4
# for QLoRA). On its fused qkv_proj / gate_up_proj the seven names select the fused modules.
#   Data checked: FreedomIntelligence/medical-o1-reasoning-SFT, config en; Question, Complex_CoT,
#   Response (the medical-o1 schema's fields).
# Switches: MODEL, DATA, OUTPUT, MAX_STEPS (and PYTHON) replace the defaults, extra flags are passed
# on; a test runs the first steps on the CPU with a tiny Phi-4-mini-shaped model:
#   MODEL=tiny/ DATA=d.json MAX_STEPS=2 bash examples/phi4_mini_reasoning_medical_o1.sh --device cpu
set -euo pipefail
exec "${PYTHON:-python}" -m minidistill.train \
  --model "${MODEL:-phi-4-mini-reasoning}" \
  --data "${DATA:-FreedomIntelligence/medical-o1-reasoning-SFT:en}" \
  --format medical-o1 \
  --lora-r 16 --lora-alpha 16 --lora-dropout 0 \
  --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --lr 2e-4 --batch-size 2 --grad-accum 4 --max-steps "${MAX_STEPS:-60}" --warmup-steps 5 \
  --schedule linear --weight-decay 0.01 --seed 3407 \
  --max-seq-len 2048 --output "${OUTPUT:-runs/phi4-mini-reasoning-medical-o1}" "$@"
