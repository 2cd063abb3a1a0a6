#!/usr/bin/env bash
# Recipe: Phi-3-mini-4k-instruct on Magpie-Reasoning-150K with the post's hand-written format
# instead of the chat template: templates/phi3_magpie.txt renders
#   <|user|>\n{instruction}<|end|>\n<|assistant|>\n  (prompt, not trained)  {response}<|end|>  (trained)
# and the tokenizer's EOS (<|endoftext|>) is appended and trained, as for every template sample.
# LoRA r 8, alpha 16, dropout 0.2 (the seed's), on the default targets (q/k/v/o and the MLP: on
# Phi-3's fused qkv_proj / gate_up_proj these names select the fused modules).
#   The seed's settings: the model, the data, the format and the LoRA settings above. The rest
#   (sequence length 4096 = the model's context, batch 2 x accumulation 8, lr 2e-4, 500 steps) is
#   ours. One 24 GB GPU in bf16.
#   Data checked: the hub card of Magpie-Align/Magpie-Reasoning-150K lists the features uuid,
#   instruction, response, conversations, ... (one config, default; files data/train-*): the
#   template names `instruction` and `response`.
# Switches: MODEL, DATA, OUTPUT, MAX_STEPS (and PYTHON) replace the defaults, extra flags are passed
# on; a test runs the first steps on the CPU with a tiny Phi-3-shaped model:
#   MODEL=tiny/ DATA=d.jsonl MAX_STEPS=2 bash examples/phi3_mini_magpie.sh --device cpu
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" -m minidistill.train \
  --model "${MODEL:-phi-3-mini}" \
  --data "${DATA:-Magpie-Align/Magpie-Reasoning-150K}" \
  --template "$HERE/templates/phi3_magpie.txt" \
  --lora-r 8 --lora-alpha 16 --lora-dropout 0.2 \
  --max-seq-len 4096 --batch-size 2 --grad-accum 8 \
  --lr 2e-4 --warmup-steps 10 --max-steps "${MAX_STEPS:-500}" \
  --output "${OUTPUT:-runs/phi3-mini-magpie}" "$@"
