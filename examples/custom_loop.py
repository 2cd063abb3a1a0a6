"""Your own training loop with the library API: load, add LoRA, build batches, call the loss.

Runs offline on the demo model (a tiny random model and the bundled arithmetic traces):
    python examples/custom_loop.py --steps 60
or on a real model and dataset:
    python examples/custom_loop.py --model phi-4-mini --data my_traces.jsonl --device cuda
"""

import argparse
from pathlib import Path

import torch

import minidistill as md

DEMO_DATA = Path(__file__).resolve().parent / "data" / "arithmetic.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="preset, repo id or folder (default: the demo model)")
    p.add_argument("--data", default=str(DEMO_DATA), help="training data (default: %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="default: %(default)s")
    p.add_argument("--output", default="runs/custom-loop", help="adapter folder parent (default: %(default)s)")
    args = p.parse_args()
    model_dir = args.model
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    tok = md.load_tokenizer(model_dir)
    data = md.prepare_data(args.data, tok, md.DataConfig(max_seq_len=256))  # prints what was kept and dropped
    model = md.load_model(model_dir, dtype=dtype, device=args.device)
    md.apply_lora(model, md.LoraConfig(r=32, alpha=32, targets="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    batches = md.make_batches(data, batch_size=8, seq_len=256, seed=0)  # packed rows
    model.train()
    for step in range(args.steps):
        b = batches[step % len(batches)]
        # model_inputs: ids, positions restarting per sample, and the row layout attention needs
        hidden = model(**b.model_inputs(args.device), return_hidden=True)
        out = md.chunked_cross_entropy(hidden, model.head_weight, b.labels.to(args.device),
                                       positions=b.label_index.to(args.device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            acc = int(out.num_correct) / max(out.num_tokens, 1)
            print(f"step {step:4d}  loss {out.loss.item():.4f}  token accuracy {acc:.3f}")

    model.eval()
    prompt = data.prompts(1)[0]
    print(f"\n{prompt}\n-> {md.generate(model, tok, prompt, max_new_tokens=60)}")
    md.save_adapter(model, Path(args.output) / "adapter")
    print(f"adapter written to {Path(args.output) / 'adapter'}")


if __name__ == "__main__":
    main()
