"""Measured against planned: the memory a training step allocates on a CPU slice of a real FLUX.2 width.

    python benchmarks/memory.py [--width klein-4B|klein-9B|dev] [--double 2] [--single 2] [--side 24]

For every CPU-testable setting (quantize none / int8 / fp8, gradient checkpointing on / off) it trains a slice
(trainer/memory_probe.py: peft LoRA, bf16 autocast, AdamW) and prints what the step allocated beside what the
planner (trainer/memory.py) predicts for the same slice, as the Markdown rows docs/memory.md quotes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.commands import quiet_libraries
from inference.loading import empty_transformer
from trainer.memory import train_step, transformer_shape
from trainer.memory_probe import WIDTHS, measure_step


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--side", type=int, default=24, help="latent tokens per side (24 -> 384 px)")
    ap.add_argument("--text", type=int, default=96, help="text tokens")
    ap.add_argument(
        "--width", choices=list(WIDTHS), default="klein-4B", help="whose real width the slice has"
    )
    ap.add_argument("--quantize", nargs="+", default=["none", "int8", "fp8"])
    args = ap.parse_args()
    quiet_libraries()
    tokens = args.side**2 + args.text
    print(
        f"slice: {args.width} width, {args.double} double + {args.single} single blocks, {tokens} tokens, rank-16 LoRA "
        "(attention_mlp)\n"
    )
    print(
        "| quantize | checkpointing | measured MiB | planned MiB | planned / measured |\n|---|---|---|---|---|"
    )
    for quantize in args.quantize:
        for checkpointing in (False, True):
            measured, config = measure_step(
                args.double,
                args.single,
                args.side**2,
                args.text,
                quantize,
                checkpointing,
                "attention_mlp",
                width=args.width,
            )
            shape = transformer_shape(empty_transformer(config), 2, 16, "lora", "attention_mlp")
            step = train_step(
                shape,
                quantize=quantize,
                tokens=tokens,
                batch=1,
                act_bytes=2,
                checkpointing=checkpointing,
                targets="attention_mlp",
                optimizer="adamw",
                on_gpu=False,
            )
            planned = step.parts["activations"] + step.parts["dequantised weights"]
            print(
                f"| {quantize} | {'yes' if checkpointing else 'no'} | {measured / 2**20:.0f} | {planned / 2**20:.0f} | "
                f"{planned / measured:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
