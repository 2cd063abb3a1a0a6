#!/usr/bin/env bash
# Recipe: Phi-4 (14B, microsoft/phi-4) on DeepSeek-R1 traces from dolphin-r1, config
# reasoning-deepseek (~300k records, one 3.85 GB JSONL: streamed and tokenized once into the cache),
# with <think> and </think> added to the vocabulary as single tokens (their embedding and head rows
# train, PEFT's trainable tokens); LoRA r 8, alpha 32, dropout 0.1 on q/k/v/o (on Phi-4's fused
# qkv_proj, q/k/v_proj name that one module).
#   The seed's settings: the model, the data, the added tokens and the LoRA settings above. The
#   rest (sequence length, batch 2 x accumulation 8, lr 2e-4, warm-up, cosine, 1000 steps, eval and
#   save intervals) is ours. One 40 GB+ GPU in bf16; add --quantize nf4 (QLoRA) for a 24 GB card.
#   Data checked: the hub card of cognitivecomputations/dolphin-r1 names the config reasoning-deepseek
#   (file dolphin-r1-reasoning-deepseek.jsonl); records hold `messages` (the prompt turns),
#   `reasoning` and `answer`, read as the dolphin-r1 schema (`<think>\n{reasoning}\n</think>\n{answer}`).
# Switches: MODEL, DATA, OUTPUT, MAX_STEPS (and PYTHON) replace the defaults, extra flags are passed
# on; a test runs the first steps on the CPU with a tiny Phi-4-shaped model:
#   MODEL=tiny/ DATA=d.jsonl MAX_STEPS=2 bash examples/phi4_dolphin_r1.sh --device cpu
set -euo pipefail
exec "${PYTHON:-python}" -m minidistill.train \
  --model "${MODEL:-phi-4}" \
  --data "${DATA:-cognitivecomputations/dolphin-r1:reasoning-deepseek}" \
  --add-tokens '<think>,</think>' \
  --lora-r 8 --lora-alpha 32 --lora-dropout 0.1 --lora-targets q_proj,k_proj,v_proj,o_proj \
  --max-seq-len 4096 --batch-size 2 --grad-accum 8 \
  --lr 2e-4 --warmup-steps 20 --schedule cosine --max-steps "${MAX_STEPS:-1000}" \
  --eval-split 0.005 --eval-every 200 --save-every 200 \
  --output "${OUTPUT:-runs/phi4-dolphin-r1}" "$@"
