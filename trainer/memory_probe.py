"""Measure what a training step allocates, on the CPU, at the real FLUX.2 widths: the stand-in for a GPU's
max_memory_allocated that checks the planner's activation constants (tests/test_memory.py,
benchmarks/memory.py). A slice (a few blocks of the real width) trains a LoRA through peft exactly as the trainer
does: frozen bf16 or torchao-quantised weights, float32 LoRA, bf16 autocast, AdamW.
"""

from __future__ import annotations

import torch

# the real widths: heads of 128 and the text encoders' stacked hidden size (klein-4B, klein-9B, dev)
WIDTHS = {"klein-4B": (24, 7680), "klein-9B": (32, 12288), "dev": (48, 15360)}


def peak_bytes(fn) -> int:
    """Peak of CPU tensor memory allocated while `fn` runs (the profiler's allocator events, summed in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, change in sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.profiler.function_events
    ):
        live += change
        peak = max(peak, live)
    return peak


def measure_step(
    double: int,
    single: int,
    image_tokens: int,
    text_tokens: int,
    quantize: str,
    checkpointing: bool,
    targets: str,
    rank: int = 16,
    width: str = "klein-4B",
) -> tuple[int, dict]:
    """(bytes a second training step allocates on top of weights, LoRA, gradients and optimizer state, the
    slice's config). The first step runs unmeasured: it creates the gradients and the optimizer state."""
    from peft import LoraConfig

    from inference.loading import empty_transformer
    from inference.quantize import TRANSFORMER_KEEP_FULL, converted, torchao_type
    from trainer.lora import PRESETS

    heads, joint = WIDTHS[width]
    config = {
        "_class_name": "Flux2Transformer2DModel",
        "num_attention_heads": heads,
        "attention_head_dim": 128,
        "joint_attention_dim": joint,
        "guidance_embeds": False,
        "num_layers": double,
        "num_single_layers": single,
    }
    model = empty_transformer(config).to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if quantize != "none":
        from torchao.quantization import quantize_

        quantize_(
            model,
            torchao_type(quantize),
            filter_fn=lambda m, name: (
                isinstance(m, torch.nn.Linear) and converted(name, TRANSFORMER_KEEP_FULL)
            ),
        )
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=PRESETS[targets]))
    lora = [p for p in model.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    if checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(lora, lr=1e-4)
    x = torch.randn(1, image_tokens, 128, dtype=torch.bfloat16)
    txt = torch.randn(1, text_tokens, joint, dtype=torch.bfloat16)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(
                hidden_states=x,
                encoder_hidden_states=txt,
                timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(1, image_tokens, 4),
                txt_ids=torch.zeros(1, text_tokens, 4),
                return_dict=False,
            )[0]
        out.float().pow(2).mean().backward()
        optimizer.step()

    step()
    return peak_bytes(step), config
