#!/usr/bin/env bash
# Recipe: DeepSeek-R1-Distill-Llama-8B on medical-o1-reasoning-SFT (English config), the notebook's
# QLoRA run: the base in 4-bit NF4, LoRA r 16, alpha 16, no dropout, on the seven projections; lr
# 2e-4, batch 2 x accumulation 4, 60 steps, 5 warm-up steps, linear decay, weight decay 0.01, seed
# 3407, sequences up to 2048 tokens. One 16 GB GPU.
#   The prompt: the notebook's, as a template file (templates/medical_o1.txt): "Below is an
#   instruction ... ### Question:\n{Question}\n\n### Response:\n" then the trained part
#   "<think>\n{Complex_CoT}\n</think>\n{Response}", and EOS appended (the notebook appends it too);
#   BOS comes first, as the tokenizer's post-processor (and so the notebook's SFTTrainer) adds it.
#   Two differences, on purpose: the loss covers the response part only (the notebook trains the
#   whole text; `--format text` on pre-rendered records does that), and the trailing spaces of the
#   notebook's prompt lines are dropped. The notebook's 8-bit AdamW is plain AdamW here.
#   Data checked: FreedomIntelligence/medical-o1-reasoning-SFT, config en (file medical_o1_sft.json,
#   a JSON array); records hold Question, Complex_CoT, Response: the names the template uses.
# Switches: MODEL, DATA, OUTPUT, MAX_STEPS (and PYTHON) replace the defaults, extra flags are passed
# on; a test runs the first steps on the CPU with a tiny Llama-shaped model and R1's tokenizer:
#   MODEL=tiny/ DATA=d.json MAX_STEPS=2 bash examples/r1_llama8b_medical_o1.sh --device cpu
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" -m minidistill.train \
  --model "${MODEL:-r1-distill-llama-8b}" \
  --data "${DATA:-FreedomIntelligence/medical-o1-reasoning-SFT:en}" \
  --template "$HERE/templates/medical_o1.txt" \
  --quantize nf4 \
  --lora-r 16 --lora-alpha 16 --lora-dropout 0 \
  --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --lr 2e-4 --batch-size 2 --grad-accum 4 --max-steps "${MAX_STEPS:-60}" --warmup-steps 5 \
  --schedule linear --weight-decay 0.01 --seed 3407 \
  --max-seq-len 2048 --output "${OUTPUT:-runs/r1-llama8b-medical-o1}" "$@"
