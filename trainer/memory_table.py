"""docs/memory.md's planned table: every family x quantisation x checkpointing x resolution, from the planner."""

from __future__ import annotations

from common.configtree import from_dict
from inference.loading import ModelConfig, resolve_base_model
from trainer.config import Config
from trainer.memory import ModelCounts, gib, plan_training

TABLE_MODELS = {
    "FLUX.2 [klein] 4B": "black-forest-labs/FLUX.2-klein-base-4B",
    "FLUX.2 [klein] 9B": "black-forest-labs/FLUX.2-klein-base-9B",
    "FLUX.2 [dev] 32B": "black-forest-labs/FLUX.2-dev",
}


def memory_table() -> str:
    """docs/memory.md's planned table: family x quantisation x checkpointing x resolution (a test pins it)."""

    lines = [
        "| model | quantize (base and text encoder) | checkpointing | resolution | train step GiB | "
        "peak GPU GiB | peak RAM GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, hub in TABLE_MODELS.items():
        base = resolve_base_model(ModelConfig(path=hub))
        counts = ModelCounts(base)  # counted once per model, not once per row
        for quantize in ("none", "int8", "nf4"):
            for checkpointing in (True, False):
                for resolution in (512, 1024):
                    cfg = from_dict(
                        Config,
                        {
                            "model": {
                                "path": hub,
                                "dtype": "bfloat16",
                                "quantize": quantize,
                                "text_encoder_quantize": quantize,
                            },
                            "data": {"path": "data"},
                            "train": {
                                "mixed_precision": "bf16",
                                "resolution": resolution,
                                "gradient_checkpointing": checkpointing,
                            },
                        },
                    )
                    plan = plan_training(cfg, base, counts=counts)
                    step = next(p for p in plan.phases if p.name == "train step")
                    lines.append(
                        f"| {name} | {quantize} | {'yes' if checkpointing else 'no'} | {resolution} | "
                        f"{gib(step.gpu)} | {gib(plan.peak_gpu)} | {gib(plan.peak_ram)} |"
                    )
    return "\n".join(lines)
